"""SMS through the Twilio Messages API and push through FCM HTTP v1, over pooled httpx clients."""

from __future__ import annotations

import httpx
import orjson

from services.notifier.channels.base import CallProgress, Delivery, SendResult, http_failure
from services.notifier.domain.retry_policy import Failure
from services.notifier.settings import ProviderConfig


def _client(config: ProviderConfig) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    return httpx.AsyncClient(base_url=config.base_url, timeout=config.timeout_s, limits=limits)


# Transport errors that leave the request unwritten, so the provider cannot have acted on it: no
# connection (refused, timed out, no free one in the pool, a proxy's), or a write timing out before the
# whole request went out (the provider waits for its Content-Length). Retried, and failed over. A
# WriteError seldom gets here: httpcore swallows it to read an answer the server may have written
# before closing, and what surfaces then is a read error, taken as sent.
NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.WriteTimeout,
    httpx.WriteError,
    httpx.ProxyError,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)


async def _post(
    client: httpx.AsyncClient,
    url: str,
    *,
    progress: CallProgress | None,
    auth: httpx.Auth | None = None,
    **kwargs: object,
) -> httpx.Response | SendResult:
    try:
        request = client.build_request("POST", url, **kwargs)  # type: ignore[arg-type]
    except (ValueError, httpx.InvalidURL) as exc:
        # This message's data cannot be written into a request (a lone surrogate in the number or the
        # text: UnicodeEncodeError): nothing was sent, and no provider could send it.
        return SendResult.failed(Failure.PERMANENT, f"the request cannot be encoded: {type(exc).__name__}")
    if progress is not None:
        progress.sending()  # the point of no return: the request may go out from here on
    try:
        return await client.send(request, auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT)
    except NOT_SENT as exc:
        what = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection"
        return SendResult.failed(Failure.TRANSIENT, f"{what}: {type(exc).__name__}: {exc}")
    # Any other transport error (ReadTimeout, ReadError, RemoteProtocolError, CloseError) came once the
    # request was written: the provider may have accepted it and sent the SMS or push. It propagates,
    # and the router reports the outcome unknown (counted by the breaker, neither failed over nor
    # retried: the backup, or the same provider again, would send it a second time).


# Twilio error codes that say the number does not exist or cannot take SMS: 21211 invalid `To` and
# 21614 not a mobile number (API answers), 30005 unknown destination handset and 30006 landline or
# unreachable carrier (delivery reports). Not 30003 (handset off or out of reach: it may come back).
# And 21610: the number replied STOP to our sender (perhaps before CLM knew it), so Twilio refuses
# every message to it until it replies START, which lifts the suppression too.
TWILIO_STOPPED = 21610
TWILIO_ADDRESS_GONE = frozenset({21211, 21614, 30005, 30006, TWILIO_STOPPED})


def _json_error(content: bytes) -> dict[str, object]:
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def twilio_address_gone(content: bytes) -> str | None:
    """For a Twilio API error (`{"code": 21211, ...}`) that says the number is none to send to: its
    code (`twilio error 21211`), else None."""
    code = _json_error(content).get("code")
    return f"twilio error {code}" if code in TWILIO_ADDRESS_GONE else None


def fcm_unregistered(status: int, content: bytes) -> str | None:
    """FCM's answer for a token the app no longer holds (uninstalled, expired), 404 with the
    `FcmError` detail `UNREGISTERED`: `fcm UNREGISTERED`, else None."""
    if status != 404:
        return None
    error = _json_error(content).get("error")
    details = error.get("details") if isinstance(error, dict) else None
    unregistered = isinstance(details, list) and any(
        isinstance(d, dict) and d.get("errorCode") == "UNREGISTERED" for d in details
    )
    return "fcm UNREGISTERED" if unregistered else None


class TwilioProvider:
    """POST /2010-04-01/Accounts/{sid}/Messages.json (form-encoded, basic auth)."""

    def __init__(self, name: str, config: ProviderConfig, *, status_callback: str | None = None) -> None:
        self.name = name
        self.config = config
        self.status_callback = status_callback
        self._http = _client(config)
        self._auth = httpx.BasicAuth(config.account_sid, config.auth_token.get_secret_value())

    marks_progress = True  # in `_post`, as the request is sent

    async def send(self, delivery: Delivery, progress: CallProgress | None = None) -> SendResult:
        url = f"/2010-04-01/Accounts/{self.config.account_sid}/Messages.json"
        form = {"To": delivery.to, "From": self.config.from_number, "Body": delivery.parts.get("body", "")}
        if self.status_callback:
            # Twilio POSTs delivered / undelivered / failed here later.
            form["StatusCallback"] = self.status_callback
        # Twilio sends this header on its own webhooks; its Messages API documents no deduplication by
        # it, so nothing here relies on it (a repeat may be sent twice: see router._outcome_unknown).
        headers = {"I-Twilio-Idempotency-Token": delivery.message_id}
        got = await _post(self._http, url, progress=progress, data=form, auth=self._auth, headers=headers)
        if isinstance(got, SendResult):
            return got
        if got.status_code >= 300:
            return http_failure(
                got.status_code,
                got.text,
                got.headers.get("Retry-After"),
                address_gone=twilio_address_gone(got.content) if got.status_code == 400 else None,
            )
        try:
            sid = str(orjson.loads(got.content).get("sid") or "")
        except (orjson.JSONDecodeError, AttributeError):
            sid = ""
        return SendResult(True, delivered=False, provider_message_id=sid or None)

    async def close(self) -> None:
        await self._http.aclose()


class FcmProvider:
    """POST /v1/projects/{project}/messages:send with a bearer token (FCM HTTP v1)."""

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.config = config
        self._http = _client(config)

    marks_progress = True  # in `_post`, as the request is sent

    async def send(self, delivery: Delivery, progress: CallProgress | None = None) -> SendResult:
        url = f"/v1/projects/{self.config.project_id}/messages:send"
        body = {
            "message": {
                "token": delivery.to,
                "notification": {
                    "title": delivery.parts.get("title", ""),
                    "body": delivery.parts.get("body", ""),
                },
                "data": {"clm_message_id": delivery.message_id},
            }
        }
        headers = {
            "Authorization": f"Bearer {self.config.bearer_token.get_secret_value()}",
            "Content-Type": "application/json",
        }
        try:
            content = orjson.dumps(body)
        except orjson.JSONEncodeError as exc:  # a lone surrogate in the token or the text
            return SendResult.failed(Failure.PERMANENT, f"the request cannot be encoded: {exc}")
        got = await _post(self._http, url, progress=progress, content=content, headers=headers)
        if isinstance(got, SendResult):
            return got
        if got.status_code >= 300:
            return http_failure(
                got.status_code,
                got.text,
                got.headers.get("Retry-After"),
                address_gone=fcm_unregistered(got.status_code, got.content),
            )
        try:
            name = str(orjson.loads(got.content).get("name") or "")
        except (orjson.JSONDecodeError, AttributeError):
            name = ""
        return SendResult(True, delivered=False, provider_message_id=name or None)

    async def close(self) -> None:
        await self._http.aclose()

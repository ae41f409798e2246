"""Inbound provider webhooks: Twilio incoming SMS ("STOP" unsubscribes the number from SMS marketing)."""

from __future__ import annotations

import base64
import hashlib
import hmac

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.notifier.api.dependencies import NotifierDep
from services.notifier.api.forms import read_form
from services.notifier.channels.http_providers import TWILIO_ADDRESS_GONE
from services.notifier.service import Notifier
from shared.contracts import MessageStatusKind
from shared.http import ApiError

STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"})
START_WORDS = frozenset({"START", "UNSTOP", "YES", "OPTIN"})
TWILIO_FINAL_STATES = {
    "delivered": MessageStatusKind.DELIVERED,
    "undelivered": MessageStatusKind.BOUNCED,
    "failed": MessageStatusKind.FAILED,
}
TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'

api = APIRouter(tags=["inbound"])


def twilio_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's X-Twilio-Signature: base64(HMAC-SHA1(token, url + each sorted key + value))."""
    payload = url + "".join(k + params[k] for k in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()).decode()


async def verified_twilio_form(request: Request, notifier: Notifier) -> dict[str, str]:
    params = dict(await read_form(request))
    settings = notifier.settings
    if settings.twilio_verify_inbound:
        url = settings.public_base_url.rstrip("/") + request.url.path
        given = request.headers.get("X-Twilio-Signature", "").encode("utf-8", "surrogatepass")
        # Any account SMS is routed to (a failover account's replies come to the same URL).
        if not any(
            hmac.compare_digest(twilio_signature(token, url, params).encode(), given)
            for token in settings.inbound_twilio_tokens()
        ):
            raise ApiError(403, "forbidden", "invalid X-Twilio-Signature")
    return params


@api.post("/v1/inbound/twilio/status")
async def twilio_status_callback(request: Request, notifier: NotifierDep) -> Response:
    """Twilio's delivery report for a message we sent: `delivered`, or `bounced`/`failed` with the code."""
    params = await verified_twilio_form(request, notifier)
    sid, state = params.get("MessageSid", ""), params.get("MessageStatus", "")
    kind = TWILIO_FINAL_STATES.get(state)
    if not sid or kind is None:
        return Response(status_code=204)  # queued/sent/... or unknown: nothing final to report
    code = params.get("ErrorCode", "")
    reason = f"twilio {state}" + (f" (error {code})" if code else "")
    # The number the message went to does not exist or takes no SMS: suppressed from now on.
    gone = (
        kind is not MessageStatusKind.DELIVERED
        and code.isascii()
        and code.isdigit()
        and len(code) <= 6
        and int(code) in TWILIO_ADDRESS_GONE
    )
    to = params.get("To")
    # Applied now, or kept and applied once an erasure under way is done: a 2xx either way. Never a
    # 5xx for a report we hold: Twilio does not retry one by default, so it was lost.
    await notifier.record_provider_report(
        sid,
        kind,
        None if kind is MessageStatusKind.DELIVERED else reason,
        gone_address=(to, f"twilio error {int(code)}") if gone and to else None,
    )
    return Response(status_code=204)


@api.post("/v1/inbound/twilio/sms")
async def twilio_inbound_sms(request: Request, notifier: NotifierDep) -> Response:
    params = await verified_twilio_form(request, notifier)
    phone, word = params.get("From", ""), params.get("Body", "").strip().upper()
    if not phone:
        raise ApiError(400, "invalid_request", "From is required")
    if word in STOP_WORDS or word in START_WORDS:
        subscribed = word in START_WORDS
        await notifier.sms_keyword(
            phone, subscribed, source="sms_stop" if not subscribed else f"sms_{word.lower()}"
        )
    return Response(TWIML_EMPTY, media_type="application/xml")

"""Webhooks: Standard Webhooks signatures, and an SSRF guard that checks what it connects to.

The host is resolved here, every resolved address is checked, and the request goes to the checked
address itself (Host header and TLS SNI keep the name), so a DNS answer cannot change between the
check and the connection. Redirects are followed by hand, each hop checked the same way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from services.notifier.channels.base import CallProgress, Delivery, SendResult, http_failure
from services.notifier.domain import standard_webhooks
from services.notifier.domain.address_policy import AddressPolicy, IpAddress, RefusedAddress
from services.notifier.domain.retry_policy import Failure
from services.notifier.settings import ProviderConfig

_REDIRECTS = {301, 302, 303, 307, 308}


async def resolve_checked(policy: AddressPolicy, url: str) -> tuple[str, IpAddress]:
    """(host, address to connect to) for a URL, or RefusedAddress."""
    _, host, port = policy.check_url(url)
    try:
        literal: IpAddress | None = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        addresses: list[IpAddress] = [literal]
    else:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise RefusedAddress(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
    # Every address must pass: a name with one public and one private record is refused.
    for address in addresses:
        policy.check_address(host, address)
    return host, addresses[0]


def _pinned_url(url: str, address: IpAddress) -> str:
    parts = urlsplit(url)
    ip_host = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{ip_host}:{parts.port}" if parts.port else ip_host
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


class WebhookProvider:
    def __init__(
        self, name: str, config: ProviderConfig, *, secret: str, policy: AddressPolicy, max_redirects: int
    ) -> None:
        self.name = name
        self.config = config
        self.secret = secret
        self.policy = policy
        self.max_redirects = max_redirects
        limits = httpx.Limits(
            max_connections=config.concurrency, max_keepalive_connections=config.concurrency
        )
        self._http = httpx.AsyncClient(timeout=config.timeout_s, limits=limits, follow_redirects=False)

    marks_progress = True  # as each request is sent

    async def send(self, delivery: Delivery, progress: CallProgress | None = None) -> SendResult:
        try:
            body = delivery.parts.get("payload", "{}").encode()
        except ValueError as exc:
            # A lone surrogate in the payload (UnicodeEncodeError): the message's own failure, not the
            # receiver's; nothing was sent.
            return SendResult.failed(
                Failure.PERMANENT, f"webhook refused: the payload cannot be encoded ({type(exc).__name__})"
            )
        signed = standard_webhooks.headers(self.secret, delivery.message_id, int(time.time()), body)
        url, method = delivery.to, "POST"
        for _hop in range(self.max_redirects + 1):
            try:
                host, address = await resolve_checked(self.policy, url)
                parts = urlsplit(url)
                headers = {
                    "Host": parts.netloc.rsplit("@", 1)[-1],
                    "Content-Type": "application/json",
                    **signed,
                }
                request = self._http.build_request(
                    method,
                    _pinned_url(url, address),
                    content=body if method == "POST" else None,
                    headers=headers,
                    extensions={"sni_hostname": host},
                )
            except RefusedAddress as exc:
                return SendResult.failed(Failure.PERMANENT, f"webhook refused: {exc}")
            except (ValueError, httpx.InvalidURL) as exc:
                # The URL cannot be requested at all (a port out of range, a host name IDNA cannot
                # encode, a character no header takes: UnicodeError is a ValueError): nothing was sent.
                return SendResult.failed(
                    Failure.PERMANENT,
                    f"webhook refused: not a URL that can be requested ({type(exc).__name__})",
                )
            if progress is not None:
                progress.sending()  # the point of no return: the request may go out from here on
            try:
                response = await self._http.send(request)
            except httpx.TimeoutException as exc:
                return SendResult.failed(Failure.TRANSIENT, f"webhook timeout: {type(exc).__name__}")
            except httpx.TransportError as exc:
                return SendResult.failed(
                    Failure.TRANSIENT, f"webhook connection: {type(exc).__name__}: {exc}"
                )
            if response.status_code in _REDIRECTS and "location" in response.headers:
                url = urljoin(url, response.headers["location"])
                if response.status_code in (301, 302, 303):
                    method = "GET"
                continue
            if response.status_code >= 300:
                return http_failure(response.status_code, response.text, response.headers.get("Retry-After"))
            return SendResult(True, delivered=True, provider_message_id=delivery.message_id)
        return SendResult.failed(Failure.PERMANENT, f"webhook: more than {self.max_redirects} redirects")

    async def close(self) -> None:
        await self._http.aclose()

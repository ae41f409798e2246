"""What every provider receives and returns."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.notifier.domain.email_content import ComposedEmail
from services.notifier.domain.retry_policy import Failure, classify_http
from shared.contracts import Channel


@dataclass(frozen=True)
class Delivery:
    message_id: str
    customer_id: str
    channel: Channel
    # Email address, phone number, push token, webhook URL or (in-app) customer id.
    to: str
    parts: dict[str, str] = field(default_factory=dict)
    email: ComposedEmail | None = None


@dataclass(frozen=True)
class SendResult:
    ok: bool
    # The provider confirmed delivery to the recipient (SMTP accepted, webhook 2xx, stored in the inbox),
    # as opposed to only accepting it for later delivery (SMS, push).
    delivered: bool = False
    provider_message_id: str | None = None
    failure: Failure | None = None
    reason: str | None = None
    retry_after_s: float | None = None
    # The provider said the address does not exist (a hard bounce), in its codes only (`SMTP 550
    # 5.1.1`, `twilio error 21211`): the address is suppressed from now on, with this as the reason
    # (never the provider's words, which often quote the address).
    address_gone: str | None = None

    @staticmethod
    def failed(
        failure: Failure, reason: str, retry_after_s: float | None = None, *, address_gone: str | None = None
    ) -> SendResult:
        return SendResult(
            False, failure=failure, reason=reason, retry_after_s=retry_after_s, address_gone=address_gone
        )


class SendAborted(Exception):
    """Raised by a caller's before-call hook: this delivery must not be sent (nothing was)."""


# Called once right before the point of no return of a send (the delivery loop commits `sending`).
BeforeCall = Callable[[], Awaitable[None]]


class CallProgress:
    """Whether a provider's call got to its point of no return: the moment it starts handing the
    message over (SMTP's DATA, an HTTP request being sent). Before it, an unexpected error left nothing
    ambiguous (the message may be tried again, elsewhere too); from it on, the provider may have
    delivered the message. Providers that mark it (`marks_progress = True`) take it as `progress`."""

    __slots__ = ("may_have_sent",)

    def __init__(self) -> None:
        self.may_have_sent = False

    def sending(self) -> None:
        self.may_have_sent = True


class Provider(Protocol):
    name: str

    async def send(self, delivery: Delivery) -> SendResult: ...

    async def close(self) -> None: ...


def http_failure(
    status: int, body: str, retry_after: str | None, *, address_gone: str | None = None
) -> SendResult:
    failure = classify_http(status) or Failure.PERMANENT
    after: float | None = None
    if retry_after:
        try:
            after = float(retry_after)
        except ValueError:
            after = None
    return SendResult.failed(failure, f"HTTP {status}: {body[:300]}", after, address_gone=address_gone)

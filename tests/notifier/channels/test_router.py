"""The provider router on its own (no broker, no database): the `sending` hook and the breaker."""

from __future__ import annotations

import asyncio

import pytest

from services.notifier.channels.base import Delivery, SendAborted, SendResult
from services.notifier.channels.router import GuardedProvider, ProviderRouter
from services.notifier.channels.smtp import SmtpProvider
from services.notifier.domain.email_content import build_email
from services.notifier.domain.provider_guards import CircuitBreaker, TokenBucket
from services.notifier.domain.retry_policy import Failure
from services.notifier.settings import ProviderConfig
from shared.contracts import Channel


class FlakySms:
    name = "twilio"

    def __init__(self) -> None:
        self.fail = True
        self.calls = 0

    async def send(self, delivery: Delivery) -> SendResult:
        self.calls += 1
        return SendResult.failed(Failure.TRANSIENT, "503") if self.fail else SendResult(True)

    async def close(self) -> None:
        pass


def guarded(provider: object, breaker: CircuitBreaker) -> GuardedProvider:
    return GuardedProvider(provider, breaker, TokenBucket(1000, 1000), 4)  # type: ignore[arg-type]


async def test_an_aborted_half_open_trial_does_not_keep_the_circuit_open() -> None:
    """The trial's `sending` commit failed (a lost claim): nothing was sent, and the next call may
    try. The trial stayed "in flight" for ever: every later send failed "circuit open" until restart."""
    sms = FlakySms()
    gp = guarded(sms, CircuitBreaker(2, 0.05))
    router = ProviderRouter({Channel.SMS: [gp]}, [gp])
    delivery = Delivery("m", "c", Channel.SMS, "+4790000001", {"body": "x"})

    async def ok() -> None:
        pass

    async def lost() -> None:
        raise SendAborted("claim lost")

    for _ in range(2):
        assert (await router.send(delivery, ok))[1].ok is False  # the circuit opens
    await asyncio.sleep(0.1)
    sms.fail = False
    with pytest.raises(SendAborted):
        await router.send(delivery, lost)
    name, result = await router.send(delivery, ok)
    assert (name, result.ok) == ("twilio", True)


class RecordingSmtp(SmtpProvider):
    async def send(self, delivery: Delivery, before_data: object = None) -> SendResult:
        assert before_data is not None, "the backup must mark the row sending before its DATA"
        await before_data()  # type: ignore[operator]
        return SendResult(True, delivered=True)


async def test_a_backup_smtp_server_marks_the_row_sending_before_its_data() -> None:
    """The primary refused the connection, so its DATA (and the hook) never ran: the backup sent
    while the row was still `claimed`, which a crash or a stale claim would have sent again."""
    primary = SmtpProvider("smtp", ProviderConfig(kind="smtp", host="127.0.0.1", port=1, timeout_s=1))
    backup = RecordingSmtp("smtp_backup", ProviderConfig(kind="smtp"))
    routes = [guarded(primary, CircuitBreaker(5, 30)), guarded(backup, CircuitBreaker(5, 30))]
    router = ProviderRouter({Channel.EMAIL: routes}, [])
    marks: list[str] = []

    async def mark_sending() -> None:
        marks.append("sending")

    email = build_email(
        message_id="m1",
        sender="a@example.com",
        to="x@example.com",
        subject="s",
        text="t",
        body_html="h",
        unsubscribe_url=None,
        sent_at_epoch=0,
    )
    delivery = Delivery("m1", "c1", Channel.EMAIL, "x@example.com", {}, email)
    name, result = await router.send(delivery, before_call=mark_sending)
    assert (name, result.ok) == ("smtp_backup", True)
    assert marks == ["sending"]

"""The provider router on its own (no broker, no database): the `sending` hook and the breaker."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from services.notifier.channels.base import Delivery, SendAborted, SendResult
from services.notifier.channels.http_providers import TwilioProvider
from services.notifier.channels.router import GuardedProvider, ProviderRouter
from services.notifier.channels.smtp import SmtpProvider
from services.notifier.channels.webhook import WebhookProvider
from services.notifier.domain.address_policy import AddressPolicy
from services.notifier.domain.email_content import build_email
from services.notifier.domain.provider_guards import CircuitBreaker, TokenBucket
from services.notifier.domain.retry_policy import Failure
from services.notifier.settings import ProviderConfig
from shared.contracts import Channel
from tests.notifier.provider_servers import ProviderServer, twilio_ok


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
    async def send(
        self, delivery: Delivery, before_data: object = None, progress: object = None
    ) -> SendResult:
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


# Unexpected errors (a bug, ours or a library's): failed over, and not counted by the breaker, while
# nothing can have been sent; counted, and not sent again, once something may have been.


def twilio(name: str, url: str, timeout_s: float = 5) -> TwilioProvider:
    config = ProviderConfig(
        kind="twilio",
        base_url=url,
        account_sid="AC1",
        auth_token=SecretStr("token"),
        from_number="+15550000000",
        timeout_s=timeout_s,
    )
    return TwilioProvider(name, config)


def sms(to: str = "+15550100001", message_id: str = "m1") -> Delivery:
    return Delivery(message_id, "c1", Channel.SMS, to, {"body": "Hi"})


async def nothing() -> None:
    pass


async def test_an_error_after_an_http_request_went_out_is_not_failed_over() -> None:
    """Twilio accepted the SMS and its answer failed to decode (a `Content-Encoding` it does not
    hold to): the backup sent it again, for every message, for as long as the error lasted. Twilio
    documents no idempotency key for its Messages API (`I-Twilio-Idempotency-Token` is what it sends
    on its webhooks), so a retry there would send it again too: the outcome is unknown, not resent."""
    primary_server = await ProviderServer(
        lambda _: (201, b'{"sid": "SM1"}', {"Content-Encoding": "gzip"})
    ).start()
    backup_server = await ProviderServer(twilio_ok).start()
    try:
        primary = guarded(twilio("twilio", primary_server.url), CircuitBreaker(2, 60))
        backup = guarded(twilio("twilio_backup", backup_server.url), CircuitBreaker(2, 60))
        router = ProviderRouter({Channel.SMS: [primary, backup]}, [primary, backup])
        for n in range(2):
            name, result = await router.send(sms(message_id=f"m{n}"), nothing)
            assert (name, result.failure) == ("twilio", Failure.PERMANENT), result.reason
            assert result.reason is not None
            assert result.reason.startswith("outcome unknown: twilio: DecodingError")
        # Counted: two opened the primary's circuit. The next message goes to the backup; the two
        # before it never do.
        assert primary.breaker.is_open
        name, result = await router.send(sms(message_id="m2"), nothing)
        assert (name, result.ok) == ("twilio_backup", True)
        assert len(primary_server.requests) == 2
        assert [r.headers["i-twilio-idempotency-token"] for r in backup_server.requests] == ["m2"]
        await router.close()
    finally:
        await primary_server.stop()
        await backup_server.stop()


class BrokenBeforeData(SmtpProvider):
    """An SMTP provider failing before its point of no return (DATA): nothing can have been sent."""

    async def send(
        self, delivery: Delivery, before_data: object = None, progress: object = None
    ) -> SendResult:
        raise RuntimeError("a bug before the envelope")


async def test_an_error_before_anything_was_sent_fails_over_and_is_not_counted() -> None:
    """No answer of the provider's explains it: more likely a bug of ours than the server failing,
    and one message hitting it on every retry must not open the circuit for every email."""
    primary = guarded(BrokenBeforeData("smtp", ProviderConfig(kind="smtp")), CircuitBreaker(2, 60))
    backup = guarded(RecordingSmtp("smtp_backup", ProviderConfig(kind="smtp")), CircuitBreaker(2, 60))
    router = ProviderRouter({Channel.EMAIL: [primary, backup]}, [primary, backup])
    marks: list[str] = []

    async def mark_sending() -> None:
        marks.append("sending")

    for _ in range(2):
        name, result = await router.send(email_delivery(), mark_sending)
        assert (name, result.ok) == ("smtp_backup", True)
    assert not primary.breaker.is_open and primary.breaker.failures == 0
    assert marks == ["sending"] * 2


class FailingInbox:
    name = "in_app"
    idempotent = True  # as InAppProvider: a repeated call stores nothing twice

    async def send(self, delivery: Delivery) -> SendResult:
        raise RuntimeError("the commit's answer was lost")

    async def close(self) -> None:
        pass


async def test_an_idempotent_provider_is_retried_after_an_error() -> None:
    gp = guarded(FailingInbox(), CircuitBreaker(5, 60))
    router = ProviderRouter({Channel.IN_APP: [gp]}, [gp])
    name, result = await router.send(Delivery("m1", "c1", Channel.IN_APP, "c1", {}), nothing)
    assert (name, result.failure) == ("in_app", Failure.TRANSIENT)
    assert gp.breaker.failures == 1


async def test_a_failing_sending_commit_is_nobodys_and_not_failed_over() -> None:
    """Nothing was sent; a backup would have sent it without its `sending` commit."""
    sms_provider = FlakySms()
    sms_provider.fail = False
    backup = FlakySms()
    primary_guard = guarded(sms_provider, CircuitBreaker(1, 60))
    router = ProviderRouter({Channel.SMS: [primary_guard, guarded(backup, CircuitBreaker(1, 60))]}, [])

    async def commit_fails() -> None:
        raise RuntimeError("the database went away")

    name, result = await router.send(sms(), commit_fails)
    assert (name, result.failure) == ("twilio", Failure.TRANSIENT)
    assert (sms_provider.calls, backup.calls) == (0, 0)
    assert not primary_guard.breaker.is_open and primary_guard.breaker.failures == 0


@pytest.mark.parametrize(
    ("to", "body"), [("+1555\ud800", "Hi"), ("+15550100001", "Hi \ud800")], ids=["number", "text"]
)
async def test_a_message_no_request_can_hold_fails_at_once_unsent(to: str, body: str) -> None:
    server = await ProviderServer(twilio_ok).start()
    try:
        gp = guarded(twilio("twilio", server.url), CircuitBreaker(1, 60))
        router = ProviderRouter({Channel.SMS: [gp]}, [gp])
        name, result = await router.send(Delivery("m1", "c1", Channel.SMS, to, {"body": body}), nothing)
        assert (name, result.failure) == ("twilio", Failure.PERMANENT), result.reason
        assert result.reason == "the request cannot be encoded: UnicodeEncodeError"
        assert not server.requests and not gp.breaker.is_open
        await router.close()
    finally:
        await server.stop()


def email_delivery() -> Delivery:
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
    return Delivery("m1", "c1", Channel.EMAIL, "x@example.com", {}, email)


async def test_a_webhook_url_no_request_can_hold_fails_at_once() -> None:
    """A host name IDNA cannot encode (a label over 63 characters) raised UnicodeError out of the
    provider: retried and failed over as an outage."""
    provider = WebhookProvider(
        "webhook",
        ProviderConfig(kind="webhook"),
        secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        policy=AddressPolicy([]),
        max_redirects=2,
    )
    gp = guarded(provider, CircuitBreaker(1, 60))
    router = ProviderRouter({Channel.WEBHOOK: [gp]}, [gp])
    url = f"https://{'a' * 70}.example/hook"
    name, result = await router.send(Delivery("m1", "c1", Channel.WEBHOOK, url, {"payload": "{}"}), nothing)
    assert (name, result.failure) == ("webhook", Failure.PERMANENT)
    assert result.reason == "webhook refused: not a URL that can be requested (UnicodeError)"
    assert not gp.breaker.is_open
    await router.close()


async def test_a_webhook_payload_that_cannot_be_encoded_fails_at_once_uncounted() -> None:
    """A lone surrogate in the payload raised out of the provider: "outcome unknown", and counted by
    the breaker (two such messages opened the circuit for every webhook)."""
    provider = WebhookProvider(
        "webhook",
        ProviderConfig(kind="webhook"),
        secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        policy=AddressPolicy([]),
        max_redirects=2,
    )
    gp = guarded(provider, CircuitBreaker(2, 60))
    router = ProviderRouter({Channel.WEBHOOK: [gp]}, [gp])
    for n in range(2):
        delivery = Delivery(
            f"m{n}", "c1", Channel.WEBHOOK, "https://example.com/hook", {"payload": '"\ud800"'}
        )
        name, result = await router.send(delivery, nothing)
        assert (name, result.failure) == ("webhook", Failure.PERMANENT)
        assert result.reason == "webhook refused: the payload cannot be encoded (UnicodeEncodeError)"
    assert not gp.breaker.is_open and gp.breaker.failures == 0
    await router.close()


async def test_an_http_provider_failing_before_its_request_is_sent_fails_over() -> None:
    """Its point of no return is the request being sent, not the call: an error building it (a bug)
    sent nothing, so the backup sends it, and the breaker does not count it."""
    backup_server = await ProviderServer(twilio_ok).start()
    try:
        broken = twilio("twilio", "http://127.0.0.1:1")

        def bug(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug building the request")

        broken._http.build_request = bug  # type: ignore[method-assign,assignment]
        primary = guarded(broken, CircuitBreaker(1, 60))
        backup = guarded(twilio("twilio_backup", backup_server.url), CircuitBreaker(1, 60))
        router = ProviderRouter({Channel.SMS: [primary, backup]}, [primary, backup])
        name, result = await router.send(sms(), nothing)
        assert (name, result.ok) == ("twilio_backup", True), result.reason
        assert len(backup_server.requests) == 1
        assert not primary.breaker.is_open and primary.breaker.failures == 0
        await router.close()
    finally:
        await backup_server.stop()


class Unanswering:
    """An HTTP server that reads each request whole, then closes the connection (`close`) or keeps
    it open (`hang`) without an answer: what a provider that took the request looks like when the
    network or the provider fails before its answer gets back."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.requests = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        self.requests += 1
        if self.behaviour == "close":
            writer.close()

    async def stop(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()


@pytest.mark.parametrize(("behaviour", "error"), [("close", "RemoteProtocolError"), ("hang", "ReadTimeout")])
async def test_an_sms_whose_answer_never_came_is_not_sent_again(behaviour: str, error: str) -> None:
    """Twilio had the request (it may have sent the SMS) when the connection dropped or timed out
    waiting for the answer: it was retried and failed over, and the customer could get it twice."""
    unanswering = Unanswering(behaviour)
    url = await unanswering.start()
    backup_server = await ProviderServer(twilio_ok).start()
    try:
        primary = guarded(twilio("twilio", url, timeout_s=0.5), CircuitBreaker(1, 60))
        backup = guarded(twilio("twilio_backup", backup_server.url), CircuitBreaker(1, 60))
        router = ProviderRouter({Channel.SMS: [primary, backup]}, [primary, backup])
        name, result = await router.send(sms(), nothing)
        assert (name, result.failure) == ("twilio", Failure.PERMANENT), result.reason
        assert result.reason is not None and result.reason.startswith(f"outcome unknown: twilio: {error}")
        assert unanswering.requests == 1 and not backup_server.requests
        assert primary.breaker.is_open  # the provider's failure: counted
        await router.close()
    finally:
        await unanswering.stop()
        await backup_server.stop()


async def test_an_sms_that_never_reached_the_provider_fails_over() -> None:
    """No connection (refused): nothing was sent, so the backup sends it."""
    backup_server = await ProviderServer(twilio_ok).start()
    try:
        primary = guarded(twilio("twilio", "http://127.0.0.1:1"), CircuitBreaker(1, 60))
        backup = guarded(twilio("twilio_backup", backup_server.url), CircuitBreaker(1, 60))
        router = ProviderRouter({Channel.SMS: [primary, backup]}, [primary, backup])
        name, result = await router.send(sms(), nothing)
        assert (name, result.ok) == ("twilio_backup", True), result.reason
        assert len(backup_server.requests) == 1 and primary.breaker.is_open
        await router.close()
    finally:
        await backup_server.stop()


async def test_a_webhook_whose_answer_never_came_is_retried() -> None:
    """Webhooks are at least once: each carries `webhook-id` (the message id, the same on every
    try), which receivers are told to drop duplicates by."""
    unanswering = Unanswering("close")
    url = await unanswering.start()
    try:
        provider = WebhookProvider(
            "webhook",
            ProviderConfig(kind="webhook", timeout_s=1),
            secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            policy=AddressPolicy(["127.0.0.1/32"]),
            max_redirects=2,
        )
        gp = guarded(provider, CircuitBreaker(5, 60))
        router = ProviderRouter({Channel.WEBHOOK: [gp]}, [gp])
        name, result = await router.send(
            Delivery("m1", "c1", Channel.WEBHOOK, f"{url}/hook", {"payload": "{}"}), nothing
        )
        assert (name, result.failure) == ("webhook", Failure.TRANSIENT), result.reason
        assert unanswering.requests == 1
        await router.close()
    finally:
        await unanswering.stop()

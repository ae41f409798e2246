"""A relay that refuses to work for us (at its greeting: our host blocked) is a provider failure:
the mail is retried or goes through the backup relay; it is never `bounced`, and the recipient's
address is not suppressed for the relay's refusal."""

from __future__ import annotations

from datetime import timedelta

from services.notifier.settings import ProviderConfig
from shared.clock import ManualClock
from shared.contracts import Channel
from tests.notifier.conftest import ADMIN, Harness, request
from tests.notifier.provider_servers import ScriptedSmtp
from tests.support import eventually

RECEIPT = {
    "id": "receipt",
    "name": "Receipt",
    "channel": "email",
    "default_locale": "en",
    "variants": {"en": {"subject": "Receipt", "html": "<p>Thanks</p>", "text": "Thanks"}},
}
BLOCKED = "554 5.7.1 Service unavailable; client host [127.0.0.1] blocked"
ROUTES = {"sms": ["twilio"], "push": ["fcm"], "webhook": ["webhook"], "in_app": ["in_app"]}


async def suppressed(h: Harness, address: str) -> bool:
    response = await h.client.get(
        "/v1/suppressions", params={"channel": "email", "address": address}, headers=ADMIN
    )
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


async def test_a_relay_refusing_the_greeting_hands_the_mail_to_the_backup(start_notifier) -> None:  # type: ignore[no-untyped-def]
    blocked = await ScriptedSmtp(greeting=BLOCKED).start()
    try:
        async with start_notifier(
            providers={"smtp_blocked": ProviderConfig(kind="smtp", host="127.0.0.1", port=blocked.port)},
            channel_providers={"email": ["smtp_blocked", "smtp"], **ROUTES},
        ) as h:
            await h.create_template(RECEIPT)
            await h.publish(
                request(
                    "m-g1",
                    "c-g1",
                    "email",
                    "receipt",
                    category="transactional",
                    recipient={"email": "ann@example.com"},
                )
            )
            mine = await h.wait_status("m-g1", "delivered")
            assert [s["status"] for s in mine] == ["queued", "sent", "delivered"]
            got = (await h.client.get("/v1/messages/m-g1", headers=ADMIN)).json()
            assert (got["state"], got["provider"], got["attempts"]) == ("delivered", "smtp", 1)
            assert [m.envelope_to for m in h.sink.messages] == [["ann@example.com"]]
            assert blocked.connections == 1
            assert not await suppressed(h, "ann@example.com")
            breaker = h.app.state.notifier.router.routes[Channel.EMAIL][0].breaker
            assert breaker.failures == 1  # the refusal counts against the blocked relay
    finally:
        await blocked.stop()


async def test_a_relay_refusing_the_greeting_is_retried_until_it_takes_the_mail(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """The only relay refuses us: the mail waits for the next attempt (it used to end `bounced`, for
    good, as if the address did not exist), then goes once the relay lets us in."""
    relay = await ScriptedSmtp(greeting=BLOCKED).start()
    clock = ManualClock()
    try:
        async with start_notifier(clock=clock, smtp_port=relay.port) as h:
            await h.create_template(RECEIPT)
            await h.publish(
                request(
                    "m-g2",
                    "c-g2",
                    "email",
                    "receipt",
                    category="transactional",
                    recipient={"email": "bob@example.com"},
                )
            )
            entry = await eventually(lambda: h.ledger_entry("m-g2", "pending", attempts=1))
            assert entry["reason"] == f"SMTP refused: {BLOCKED}"
            assert entry["next_attempt_at"] is not None
            assert not await suppressed(h, "bob@example.com")
            relay.greeting = "220 relay ready"
            clock.advance(timedelta(minutes=15))
            h.app.state.notifier.worker.wake()
            mine = await h.wait_status("m-g2", "delivered")
            assert "bounced" not in [s["status"] for s in mine]
            assert len(relay.messages) == 1 and relay.connections == 2
    finally:
        await relay.stop()

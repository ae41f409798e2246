"""The at-most-once window is the provider call itself: rows a dead worker only claimed are handed
back and sent once, a row left `sending` becomes `unknown` (never resent), a worker whose claim was
handed back cannot send, and each outcome is recorded as soon as its own provider call returns."""

from __future__ import annotations

from datetime import datetime, timedelta

from services.notifier.store import ledger_repo
from services.notifier.store.ledger_repo import LedgerEntry
from shared.clock import ManualClock
from shared.contracts import MessageRequested
from tests.notifier.conftest import ADMIN, Harness, request
from tests.support import eventually

SMS = {
    "id": "sms-hello",
    "name": "SMS",
    "channel": "sms",
    "default_locale": "en",
    "variants": {"en": {"body": "Hi, code {{ event.code }}"}},
}


def sms(message_id: str, customer_id: str = "c1") -> MessageRequested:
    return request(
        message_id,
        customer_id,
        "sms",
        "sms-hello",
        category="transactional",
        recipient={"phone": "+15551239999"},
        data={"event": {"code": message_id}},
    )


async def ledger(h: Harness, message_id: str) -> dict[str, object]:
    response = await h.client.get(f"/v1/messages/{message_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    return dict(response.json())


def sends_of(h: Harness, message_id: str) -> int:
    return sum(r.form().get("Body", "").endswith(f"code {message_id}") for r in h.twilio.requests)


async def claim_as_dead_worker(
    h: Harness, message_ids: list[str], due: datetime, token: str
) -> list[LedgerEntry]:
    """Insert requests due at `due` (in the future: the live loops leave them alone) and claim them as
    another worker would, committed, before it dies."""
    requests = [sms(m) for m in message_ids]
    async with h.platform.unit_of_work() as uow:
        await ledger_repo.insert_new(uow.session, requests, due)
    async with h.platform.unit_of_work() as uow:
        claimed = await ledger_repo.claim_due(uow.session, due, 10, token)
    assert sorted(e.message_id for e in claimed) == sorted(message_ids)
    return claimed


async def test_rows_claimed_by_a_dead_worker_are_handed_back_and_sent_once(start_notifier) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        await h.create_template(SMS)
        worker = h.app.state.notifier.worker
        later = clock.now() + timedelta(hours=1)
        await claim_as_dead_worker(h, ["m-claimed-1", "m-claimed-2"], later, "dead-worker")
        assert (await ledger(h, "m-claimed-1"))["state"] == "claimed"

        # Younger than `claim_stale_after_s`: the owner may still be alive, nothing happens.
        clock.advance(timedelta(hours=1, seconds=h.settings.claim_stale_after_s / 2))
        await worker.resolve_stale(every_s=0)
        assert (await ledger(h, "m-claimed-1"))["state"] == "claimed"

        clock.advance(timedelta(seconds=h.settings.claim_stale_after_s))
        await worker.resolve_stale(every_s=0)
        await h.wait_status("m-claimed-1", "sent")
        await h.wait_status("m-claimed-2", "sent")
        for message_id in ("m-claimed-1", "m-claimed-2"):
            row = await ledger(h, message_id)
            # The claim that never reached a provider is not counted as an attempt.
            assert (row["state"], row["attempts"]) == ("sent", 1), row
            assert sends_of(h, message_id) == 1
        await worker.resolve_stale(every_s=0)  # nothing stale any more: nothing changes
        assert [sends_of(h, m) for m in ("m-claimed-1", "m-claimed-2")] == [1, 1]


async def test_a_worker_whose_claim_was_handed_back_cannot_send(start_notifier) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        await h.create_template(SMS)
        worker = h.app.state.notifier.worker
        later = clock.now() + timedelta(hours=1)
        # A worker claims the row, then stalls (GC pause, partition from the database...) past the limit.
        stalled = await claim_as_dead_worker(h, ["m-stalled"], later, "stalled-worker")
        clock.advance(timedelta(hours=1, seconds=h.settings.claim_stale_after_s + 1))
        await worker.resolve_stale(every_s=0)
        await h.wait_status("m-stalled", "sent")  # handed back and sent by a live loop
        assert sends_of(h, "m-stalled") == 1

        # The stalled worker wakes up and goes on with its old claim: its move to `sending` matches
        # nothing (token), so it never calls the provider and records nothing.
        await worker.deliver(stalled)
        async with h.platform.unit_of_work() as uow:
            assert (
                await ledger_repo.mark_sending(uow.session, [("m-stalled", "stalled-worker")], later) == set()
            )
        assert sends_of(h, "m-stalled") == 1
        row = await ledger(h, "m-stalled")
        assert (row["state"], row["attempts"]) == ("sent", 1), row
        statuses = await h.statuses(idle=0.5, timeout=3)
        assert [s["status"] for s in statuses if s["message_id"] == "m-stalled"].count("sent") == 1


async def test_a_row_left_sending_becomes_unknown_and_is_never_resent(start_notifier) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        await h.create_template(SMS)
        worker = h.app.state.notifier.worker
        later = clock.now() + timedelta(hours=1)
        await claim_as_dead_worker(h, ["m-in-flight", "m-waiting"], later, "dead-worker")
        # The dead worker had started the provider call of one row; the other was still waiting.
        async with h.platform.unit_of_work() as uow:
            await ledger_repo.mark_sending(uow.session, [("m-in-flight", "dead-worker")], later)
        clock.advance(timedelta(hours=1, seconds=h.settings.claim_stale_after_s + 1))
        await worker.resolve_stale(every_s=0)
        await h.wait_status("m-waiting", "sent")
        assert (await ledger(h, "m-in-flight"))["state"] == "sending"  # not stale yet: left alone

        clock.advance(timedelta(seconds=h.settings.sending_stale_after_s))
        await worker.resolve_stale(every_s=0)
        statuses = await h.wait_status("m-in-flight", "failed")
        assert statuses[-1]["reason"].startswith("outcome unknown")
        row = await ledger(h, "m-in-flight")
        assert (row["state"], row["attempts"]) == ("unknown", 1), row
        assert sends_of(h, "m-in-flight") == 0 and sends_of(h, "m-waiting") == 1
        clock.advance(timedelta(hours=2))
        await worker.resolve_stale(every_s=0)
        statuses = await h.statuses(idle=0.5, timeout=3)
        assert [s["status"] for s in statuses if s["message_id"] == "m-in-flight"] == ["failed"]
        assert sends_of(h, "m-in-flight") == 0


async def test_each_outcome_is_recorded_when_its_own_call_returns(start_notifier) -> None:  # type: ignore[no-untyped-def]
    # One token per second: the second row of the batch waits for the rate limiter, still `claimed`
    # (safe to hand back), while the first one's outcome is already recorded.
    async with start_notifier(provider_rate_per_s=0.5, provider_burst=1) as h:
        await h.create_template(SMS)
        await h.publish(sms("m-first"))
        await h.publish(sms("m-second"))
        await eventually(lambda: len(h.twilio.requests) >= 1, timeout=10)
        first_sent = [m for m in ("m-first", "m-second") if sends_of(h, m) == 1]
        assert len(first_sent) == 1
        other = "m-second" if first_sent == ["m-first"] else "m-first"

        async def first_recorded() -> bool:
            return (await ledger(h, first_sent[0]))["state"] == "sent"

        await eventually(first_recorded, timeout=5)

        # The first is sent as soon as it is queued, so the other may still be on its way; once queued
        # it waits for the rate limiter (or, on a slow machine, is not even claimed yet): never `sending`.
        async def other_waiting() -> bool:
            response = await h.client.get(f"/v1/messages/{other}", headers=ADMIN)
            return response.status_code == 200 and response.json()["state"] in ("claimed", "pending")

        await eventually(other_waiting, timeout=5)
        assert sends_of(h, other) == 0


EMAIL = {
    "id": "welcome",
    "name": "Welcome",
    "channel": "email",
    "default_locale": "en",
    "variants": {"en": {"subject": "Welcome", "html": "<p>Hi</p>", "text": "Hi"}},
}


async def test_smtp_stops_before_data_when_the_claim_was_handed_back(start_notifier) -> None:  # type: ignore[no-untyped-def]
    # Over SMTP the row moves to `sending` right before DATA; a lost claim resets the envelope there,
    # sends nothing, and the connection is reused for the next message.
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        await h.create_template(EMAIL)
        worker = h.app.state.notifier.worker
        later = clock.now() + timedelta(hours=1)
        mail = request("m-mail-stalled", "c9", "email", "welcome", recipient={"email": "c9@example.com"})
        async with h.platform.unit_of_work() as uow:
            await ledger_repo.insert_new(uow.session, [mail], later)
        async with h.platform.unit_of_work() as uow:
            stalled = await ledger_repo.claim_due(uow.session, later, 10, "stalled-worker")
        clock.advance(timedelta(hours=1, seconds=h.settings.claim_stale_after_s + 1))
        await worker.resolve_stale(every_s=0)
        await h.wait_status("m-mail-stalled", "delivered")
        await worker.deliver(stalled)  # the stalled worker's late attempt: stops before DATA
        await h.publish(
            request("m-mail-next", "c9", "email", "welcome", recipient={"email": "c9@example.com"})
        )
        await h.wait_status("m-mail-next", "delivered")
        # The stalled attempt added nothing: one mail per message.
        assert len(h.sink.to("c9@example.com")) == 2
        row = await ledger(h, "m-mail-stalled")
        assert (row["state"], row["attempts"]) == ("delivered", 1), row

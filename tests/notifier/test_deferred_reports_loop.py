"""The loop that applies delivery reports kept during an erasure (`Notifier.run_deferred_reports`),
as the app runs it: a report whose try fails holds back none of the others and is dropped after its
last try; reports another replica kept are found by polling; two passes at once apply each report
once; a report kept after the erasure's delete, or on a message pruned from the ledger, writes
nothing; a repeat of a kept report never waits for an erasure deleting the kept copy."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from services.notifier import service as notifier_service
from services.notifier.service import DEFERRED_REPORTS_OLDEST_AGE, DEFERRED_REPORTS_SETTLED
from services.notifier.store import provider_reports_repo
from shared.clock import ManualClock
from shared.privacy import erasure_gate
from tests.notifier.conftest import ADMIN, Harness
from tests.notifier.test_deferred_reports import kept, report, reported, sent_sms
from tests.notifier.test_links_after_erasure import erase, waiting_for_the_gate
from tests.support import eventually


def settled(outcome: str) -> float:
    return float(DEFERRED_REPORTS_SETTLED.labels(outcome)._value.get())


async def none_kept(h: Harness) -> bool:
    return await kept(h) == []


async def tries(h: Harness, provider_message_id: str) -> list[int]:
    async with h.platform.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT attempts FROM deferred_provider_reports WHERE provider_message_id = :p"),
            {"p": provider_message_id},
        )
        return [r[0] for r in rows]


async def suppressions(h: Harness) -> list[tuple[Any, ...]]:
    async with h.platform.engine.connect() as conn:
        rows = await conn.execute(text("SELECT channel, reason, message_id FROM address_suppressions"))
        return [tuple(r) for r in rows]


async def test_a_report_whose_try_fails_holds_back_none_and_is_dropped_after_its_last_try(
    start_notifier: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, one report raising rolled back its whole batch, and every pass took the same oldest
    batch again: every kept report behind it waited for ever, logged about once a second. Each report
    is tried in a savepoint now: the failing one leaves nothing (not the engagement it wrote, no
    status), is tried again later, and deleted after its last try; the others are applied."""
    caplog.set_level(logging.WARNING, logger=notifier_service.__name__)
    clock = ManualClock()
    async with start_notifier(
        clock=clock,
        deferred_reports_poll_s=0.1,
        deferred_reports_retry_s=30.0,
        deferred_reports_max_attempts=3,
    ) as h:
        sid_a = await sent_sms(h, "m-a", "ann", "+15550100031")
        sid_b = await sent_sms(h, "m-b", "bob", "+15550100032")
        sid_c = await sent_sms(h, "m-c", "cy", "+15550100033")
        notifier = h.app.state.notifier
        real = notifier._apply_report

        async def failing(uow: Any, entry: Any, kept_report: Any) -> Any:
            applied = await real(uow, entry, kept_report)  # its engagement written: rolled back below
            if kept_report.provider_message_id == sid_a:
                raise RuntimeError("a persistent failure of one report")
            return applied

        notifier._apply_report = failing
        failed, dropped = settled("failed"), settled("dropped")
        gone = {"MessageStatus": "undelivered", "ErrorCode": "30005"}
        async with h.platform.unit_of_work() as erasing:
            await erasure_gate(erasing.session, exclusive=True)
            assert await report(h, {"MessageSid": sid_a, **gone, "To": "+15550100031"}) == 204
            assert await report(h, {"MessageSid": sid_b, "MessageStatus": "delivered"}) == 204
            assert await report(h, {"MessageSid": sid_c, **gone, "To": "+15550100033"}) == 204
        # The app's loop, woken by the reports, applies the two healthy ones at once.
        await h.wait_status("m-b", "delivered")
        await h.wait_status("m-c", "bounced")
        assert await eventually(lambda: tries(h, sid_a)) == [1]
        assert await reported(h, "m-a") == []  # the failed try's engagement rolled back
        assert [s[2] for s in await suppressions(h)] == ["m-c"]
        assert settled("failed") == failed + 1
        # Not due again before its retry time (the clock does not move): tried once so far.
        await asyncio.sleep(0.5)
        assert await tries(h, sid_a) == [1]

        clock.advance(timedelta(seconds=30))  # the first retry's wait
        assert await eventually(lambda: _equals(tries(h, sid_a), [2]))
        # The oldest kept report's age, as of the loop's last pass.
        await eventually(lambda: DEFERRED_REPORTS_OLDEST_AGE._value.get() >= 30)
        clock.advance(timedelta(seconds=60))  # the second's, doubled: its last try
        await eventually(lambda: none_kept(h))
        assert settled("failed") == failed + 2
        assert settled("dropped") == dropped + 1
        await eventually(lambda: DEFERRED_REPORTS_OLDEST_AGE._value.get() == 0)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR and "dropped" in r.getMessage()]
        assert len(errors) == 1 and sid_a in errors[0].getMessage() and errors[0].exc_info

        values = await h.statuses(idle=1.0)
        mine = {m: [v["status"] for v in values if v["message_id"] == m] for m in ("m-a", "m-b", "m-c")}
        assert mine == {
            "m-a": ["queued", "sent"],
            "m-b": ["queued", "sent", "delivered"],
            "m-c": ["queued", "sent", "bounced"],
        }
        assert await reported(h, "m-a") == []
        assert [s[2] for s in await suppressions(h)] == ["m-c"]


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_the_loop_finds_a_report_another_replica_kept_by_polling(start_notifier: Any) -> None:
    """Kept by another replica (or a process stopped before its loop ran): no wake-up here, the
    loop's poll (`deferred_reports_poll_s`) finds it."""
    async with start_notifier(deferred_reports_poll_s=0.5) as h:
        sid = await sent_sms(h, "m-p", "pia", "+15550100034")
        async with h.platform.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO deferred_provider_reports (provider_message_id, kind, received_at, "
                    "next_attempt_at) VALUES (:s, 'delivered', now(), now())"
                ),
                {"s": sid},
            )
        await eventually(lambda: none_kept(h))
        assert await reported(h, "m-p") == ["delivered"]
        await h.wait_status("m-p", "delivered")


async def test_a_kept_report_whose_message_left_the_ledger_writes_nothing(start_notifier: Any) -> None:
    async with start_notifier() as h:
        sid = await sent_sms(h, "m-q", "quinn", "+15550100035")
        before = settled("unknown_message")
        async with h.platform.unit_of_work() as erasing:
            await erasure_gate(erasing.session, exclusive=True)
            assert await report(h, {"MessageSid": sid, "MessageStatus": "delivered"}) == 204
            # Retention prunes the message meanwhile.
            async with h.platform.engine.begin() as conn:
                await conn.execute(text("DELETE FROM send_ledger WHERE message_id = 'm-q'"))
        await eventually(lambda: none_kept(h))
        assert settled("unknown_message") == before + 1
        assert await reported(h, "m-q") == []


async def test_passes_at_once_apply_each_kept_report_once(start_notifier: Any) -> None:
    """Replicas' loops (and this one's) at once: each takes reports the others do not (SKIP LOCKED)."""
    async with start_notifier() as h:
        sids = [await sent_sms(h, f"m-c{i}", f"c{i}", f"+1555010004{i}") for i in range(5)]
        notifier = h.app.state.notifier
        async with h.platform.unit_of_work() as erasing:
            await erasure_gate(erasing.session, exclusive=True)
            for sid in sids:
                assert await report(h, {"MessageSid": sid, "MessageStatus": "delivered"}) == 204
            passes = [asyncio.create_task(notifier.apply_deferred_reports(1)) for _ in range(6)]
            await asyncio.sleep(0.3)
            assert not any(p.done() for p in passes)  # waiting for the erasure
        taken = await asyncio.wait_for(asyncio.gather(*passes), 20)
        assert all(n <= 1 for n in taken)
        await eventually(lambda: none_kept(h))
        values = await h.statuses(idle=1.0)
        for i in range(5):
            assert [v["status"] for v in values if v["message_id"] == f"m-c{i}"] == [
                "queued",
                "sent",
                "delivered",
            ]
            assert await reported(h, f"m-c{i}") == ["delivered"]


async def test_a_report_kept_after_the_erasures_delete_writes_nothing(
    start_notifier: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real erasure; the report, which found the gate busy, is stored only after the erasure
    committed (after its delete of the customer's kept reports): the loop finds the tombstones and
    deletes it, writing nothing (no status, engagement or suppression)."""
    async with start_notifier() as h:
        sid = await sent_sms(h, "m-r", "rita", "+15550100036")
        storing, go = asyncio.Event(), asyncio.Event()
        real_store = provider_reports_repo.store

        async def late_store(session: Any, kept_report: Any) -> bool:
            storing.set()
            await go.wait()
            return await real_store(session, kept_report)

        monkeypatch.setattr(notifier_service.provider_reports_repo, "store", late_store)
        before = settled("erased")
        async with h.platform.unit_of_work() as batch:
            await erasure_gate(batch.session, exclusive=False)
            erasing = asyncio.create_task(erase(h, "rita", ["rita"]))
            await eventually(lambda: waiting_for_the_gate(h), timeout=15)
            form = {
                "MessageSid": sid,
                "MessageStatus": "undelivered",
                "ErrorCode": "30005",
                "To": "+15550100036",
            }
            posting = asyncio.create_task(report(h, form))
            await asyncio.wait_for(storing.wait(), 30)  # it found the gate busy: storing the report
        await asyncio.wait_for(erasing, 20)
        go.set()
        assert await posting == 204
        await eventually(lambda: none_kept(h))
        assert settled("erased") == before + 1
        assert await reported(h, "m-r") == []
        assert await suppressions(h) == []
        values = await h.statuses(idle=1.0)
        assert [v["status"] for v in values if v["message_id"] == "m-r"] == ["queued", "sent"]


async def test_a_repeated_report_does_not_wait_for_an_erasure_deleting_the_kept_copy(
    start_notifier: Any,
) -> None:
    """The erasure deletes the customer's kept report and holds its transaction open; Twilio sends
    the same report again meanwhile. With a unique constraint the insert waited on the uncommitted
    delete until the erasure committed, a pooled connection held. Answered at once now (the kept
    copy it still sees stands for it; the erasure's commit deletes that)."""
    async with start_notifier(deferred_reports_poll_s=3600) as h:
        sid = await sent_sms(h, "m-w", "wes", "+15550100037")
        form = {"MessageSid": sid, "MessageStatus": "delivered"}
        notifier = h.app.state.notifier
        notifier._report_wakeups.put_nowait = lambda _: None  # the loop leaves the first copy kept
        async with h.platform.unit_of_work() as other:
            await erasure_gate(other.session, exclusive=True)
            assert await report(h, form) == 204
        assert len(await kept(h)) == 1
        # Wes's erasure: holds the gate and has deleted the kept row (uncommitted).
        async with h.platform.unit_of_work() as erasing:
            await erasure_gate(erasing.session, exclusive=True)
            await erasing.session.execute(text("DELETE FROM deferred_provider_reports"))
            assert await report(h, form) == 204  # while the erasure is still open
        assert await kept(h) == []
        assert await reported(h, "m-w") == []


async def test_a_batch_suppresses_a_gone_number_reported_twice_once(start_notifier: Any) -> None:
    """Two messages to the same number, both reported gone during an erasure: the pass adds the
    batch's suppressions together (one sorted statement: added report by report, two replicas' passes
    could each wait for the other), the first report's kept."""
    async with start_notifier() as h:
        first = await sent_sms(h, "m-g1", "gus", "+15550100038")
        second = await sent_sms(h, "m-g2", "gus", "+15550100038")
        gone = {"MessageStatus": "undelivered", "ErrorCode": "30005", "To": "+15550100038"}
        async with h.platform.unit_of_work() as erasing:
            await erasure_gate(erasing.session, exclusive=True)
            assert await report(h, {"MessageSid": first, **gone}) == 204
            assert await report(h, {"MessageSid": second, **gone}) == 204
        await eventually(lambda: none_kept(h))
        assert await reported(h, "m-g1") == ["bounced"] and await reported(h, "m-g2") == ["bounced"]
        found = await h.client.get(
            "/v1/suppressions", params={"channel": "sms", "address": "+15550100038"}, headers=ADMIN
        )
        assert found.status_code == 200
        assert len(await suppressions(h)) == 1
        assert found.json()["message_id"] in ("m-g1", "m-g2")

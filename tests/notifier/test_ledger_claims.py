"""Claiming rows of the send ledger: the delivery loops take due pending rows in due order and skip
rows another transaction holds; the request consumer's hand-off takes just the rows it inserted."""

from __future__ import annotations

from datetime import timedelta

from services.notifier.store import ledger_repo
from shared.clock import ManualClock
from shared.contracts import MessageRequested
from tests.notifier.conftest import request


def sms(message_id: str) -> MessageRequested:
    return request(message_id, "c1", "sms", "sms-hello", category="transactional")


async def test_claim_new_takes_only_the_listed_rows_still_pending_and_due(start_notifier) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        # Due an hour ahead, so the live delivery loops leave them alone.
        due = clock.now() + timedelta(hours=1)
        async with h.platform.unit_of_work() as uow:
            await ledger_repo.insert_new(uow.session, [sms(m) for m in ("older", "taken", "late")], due)
        async with h.platform.unit_of_work() as uow:
            assert [e.message_id for e in await ledger_repo.claim_new(uow.session, ["taken"], due, "t0")] == [
                "taken"
            ]
        async with h.platform.unit_of_work() as uow:
            await ledger_repo.insert_new(uow.session, [sms("fresh-1"), sms("fresh-2")], due)
            claimed = await ledger_repo.claim_new(
                uow.session, ["fresh-1", "fresh-2", "taken", "unknown"], due, "t1"
            )
            # "taken" is no longer pending; "older" is due too but was not listed.
            assert sorted(e.message_id for e in claimed) == ["fresh-1", "fresh-2"]
            assert {(e.state, e.claim_token, e.attempts) for e in claimed} == {("claimed", "t1", 1)}
            assert await ledger_repo.claim_new(uow.session, ["late"], due - timedelta(seconds=1), "t2") == []
            assert await ledger_repo.claim_new(uow.session, [], due, "t2") == []


async def test_claim_due_takes_due_rows_in_order_and_skips_rows_held_elsewhere(start_notifier) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        base = clock.now() + timedelta(hours=1)
        async with h.platform.unit_of_work() as uow:
            for i in range(4):
                await ledger_repo.insert_new(uow.session, [sms(f"due-{i}")], base + timedelta(seconds=i))
            await ledger_repo.insert_new(uow.session, [sms("not-yet")], base + timedelta(hours=1))
        now = base + timedelta(seconds=10)
        async with h.platform.unit_of_work() as first:
            held = await ledger_repo.claim_due(first.session, now, 2, "first")
            assert [e.message_id for e in held] == ["due-0", "due-1"]
            # Another worker meanwhile: the first one's rows are locked, not waited for.
            async with h.platform.unit_of_work() as second:
                rest = await ledger_repo.claim_due(second.session, now, 10, "second")
            assert sorted(e.message_id for e in rest) == ["due-2", "due-3"]
        async with h.platform.unit_of_work() as uow:
            assert await ledger_repo.claim_due(uow.session, now, 10, "third") == []

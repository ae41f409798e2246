"""A due timer whose re-evaluation fails holds no other back: an evaluation that raises is counted in
the transaction that re-evaluates the others, a batch that fails in the database is taken apart, a
pass that stalls claims fewer timers, a batch whose every timer fails in several segments is taken
for an outage; tried again later, parked after its tries; outages never counted; nothing announced
twice; logs never quote the database's DETAIL."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Collection, Mapping
from datetime import datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.segmenter import due_timers
from services.segmenter.domain.catalog import Catalog, SegmentRule
from services.segmenter.domain.profile import ProfileSnapshot
from services.segmenter.due_timers import DueTimers
from services.segmenter.reevaluation import SegmentCatalogCache
from services.segmenter.reevaluation import reevaluate as real_reevaluate
from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import timers as timer_store
from shared.db.unit_of_work import UnitOfWork
from tests.segmenter.conftest import ADMIN, START, Harness, make_event
from tests.segmenter.test_backfill_failures import allow, refuse, sql

# Buyers whose last order is 30 days old: a timer per customer, due 30 days after their order.
LAPSED = {"and": [{"performed": "Order Completed"}, {"not_performed": "Order Completed", "since": "30d"}]}


def counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("clm_segmenter_timer_failures_total", {"outcome": outcome}) or 0.0


def outcomes() -> dict[str, float]:
    names = ("retried", "parked", "stalled", "put_off", "backed_off", "error")
    return {name: counted(name) for name in names}


def since(before: dict[str, float]) -> dict[str, float]:
    """The outcomes counted since `before`, those that moved only."""
    return {k: v - before[k] for k, v in outcomes().items() if v != before[k]}


async def buyers(h: Harness, n: int, prefix: str = "u", at: datetime = START) -> None:
    """<prefix>00..<prefix><n-1>, one order each, a second apart (the first first): their timers
    come due in that order, 30 days after `at` (and a minute before)."""
    events = [
        make_event(
            f"o-{prefix}{i}",
            "track",
            user_id=f"{prefix}{i:02d}",
            event="Order Completed",
            timestamp=at - timedelta(seconds=60 - i),
        )
        for i in range(n)
    ]
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(uow, events)


class Poisoned(SegmentCatalogCache):
    """The due-timer loop's catalogue, whose segments' evaluation raises `error` for these customers
    (of these segments only, if given), as a bug in the evaluator or in a definition would. The
    event path's catalogue is left alone."""

    def __init__(
        self,
        real: SegmentCatalogCache,
        customers: Collection[str],
        segments: Collection[str] | None = None,
        error: type[Exception] = RuntimeError,
    ) -> None:
        super().__init__()
        self.real, self.customers, self.segments, self.error = real, set(customers), segments, error

    async def refresh(self, session: AsyncSession) -> Catalog:
        catalog = await self.real.refresh(session)
        return Catalog.build(self._poison(s) for s in catalog.segments)

    def _poison(self, seg: SegmentRule) -> SegmentRule:
        if self.segments is not None and seg.segment_id not in self.segments:
            return seg
        real, customers, error = seg.holds, self.customers, self.error

        def holds(p: ProfileSnapshot, now: datetime) -> bool:
            if p.customer_id in customers:
                raise error(f"evaluation failed for {p.customer_id}")
            return real(p, now)

        return dataclasses.replace(seg, holds=holds)


def poison(
    h: Harness,
    monkeypatch: pytest.MonkeyPatch,
    *customers: str,
    segments: Collection[str] | None = None,
    error: type[Exception] = RuntimeError,
) -> None:
    timers = h.segmenter.timers
    monkeypatch.setattr(timers, "catalog_cache", Poisoned(timers.catalog_cache, customers, segments, error))


def fail_after_writes(monkeypatch: pytest.MonkeyPatch, customer: str, error: Exception) -> None:
    """The due-timer loop's unit of work raises `error` after its re-evaluation wrote the memberships
    and queued their announcements (all rolled back), whenever it re-evaluates `customer`."""

    async def failing(
        uow: UnitOfWork,
        catalog: Catalog,
        profiles: Mapping[str, ProfileSnapshot],
        affected: Mapping[str, set[str]],
        causes: Mapping[str, str],
        now: datetime,
        failed: dict[tuple[str, str], Exception] | None = None,
    ) -> int:
        changed = await real_reevaluate(uow, catalog, profiles, affected, causes, now, failed)
        if affected.get(customer):
            raise error
        return changed

    monkeypatch.setattr(due_timers, "reevaluate", failing)


def count_units(h: Harness, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The due-timer loop's units of work (each try of a batch or of a part of one), as the number of
    timers each claimed, in order."""
    timers = h.segmenter.timers
    real = timers._fire
    units: list[int] = []

    async def counting(claimed: list[timer_store.DueTimer], limit: int, keys: Any) -> Any:
        try:
            return await real(claimed, limit, keys)
        finally:
            units.append(len(claimed))

    monkeypatch.setattr(timers, "_fire", counting)
    return units


async def refuse_customers(
    h: Harness, customers: Collection[str], sqlstate: str = "23514", detail: str = ""
) -> None:
    """Writing a membership of one of `customers` fails in PostgreSQL with `sqlstate` (and a DETAIL
    line, as a constraint's would quote the row)."""
    ids = ", ".join(f"'{c}'" for c in sorted(customers))
    await sql(
        h,
        f"""CREATE OR REPLACE FUNCTION refuse_customer(cust text) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN
            IF cust IN ({ids}) THEN
                RAISE EXCEPTION 'refused for the test' USING ERRCODE = '{sqlstate}', DETAIL = '{detail}';
            END IF;
            RETURN true;
        END $$""",
    )
    await sql(
        h, "ALTER TABLE memberships ADD CONSTRAINT refused_customer CHECK (refuse_customer(customer_id))"
    )


async def allow_customers(h: Harness) -> None:
    await sql(h, "ALTER TABLE memberships DROP CONSTRAINT refused_customer")


async def timers(h: Harness) -> dict[str, tuple[datetime, int]]:
    """customer -> (due_at, attempts), of every segment (tests with one segment)."""
    async with h.segmenter.platform.engine.connect() as conn:
        rows = await conn.execute(text("SELECT customer_id, due_at, attempts FROM segment_timers"))
        return {r[0]: (r[1], r[2]) for r in rows}


async def timer_rows(h: Harness) -> dict[tuple[str, str], dict[str, Any]]:
    async with h.segmenter.platform.engine.connect() as conn:
        rows = await conn.execute(text("SELECT * FROM segment_timers"))
        return {(r.customer_id, r.segment_id): dict(r._mapping) for r in rows}


async def parked(h: Harness) -> dict[str, dict[str, Any]]:
    async with h.segmenter.platform.engine.connect() as conn:
        rows = await conn.execute(text("SELECT * FROM segment_timers_parked"))
        return {r.customer_id: dict(r._mapping) for r in rows}


async def parked_pairs(h: Harness) -> list[tuple[str, str]]:
    async with h.segmenter.platform.engine.connect() as conn:
        rows = await conn.execute(text("SELECT customer_id, segment_id FROM segment_timers_parked"))
        return sorted((r[0], r[1]) for r in rows)


async def entered(h: Harness) -> list[str]:
    """Customers announced as entering, each once (asserted)."""
    msgs = await h.memberships()
    assert len({m["event_id"] for m in msgs}) == len(msgs)  # nothing announced twice
    return sorted(m["customer_id"] for m in msgs if m["change"] == "entered")


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def records(caplog: pytest.LogCaptureFixture, attribute: str) -> list[dict[str, Any]]:
    """The due-timer loop's log records with `attribute` (an `extra` field), as their fields."""
    return [
        vars(r) for r in caplog.records if r.name == "services.segmenter.due_timers" and hasattr(r, attribute)
    ]


async def test_a_poisoned_timer_holds_no_other_back_is_tried_again_then_parked(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the batch failed on every pass and no due timer of any customer fired again. Now the
    failing evaluation is counted in the one transaction that commits the others."""
    h = harness
    sid = await h.create_segment(LAPSED, name="Lapsed")
    await buyers(h, 10)
    poison(h, monkeypatch, "u03")
    units = count_units(h, monkeypatch)
    before = outcomes()
    h.clock.advance(timedelta(days=30))

    with caplog.at_level(logging.WARNING, logger="services.segmenter.due_timers"):
        assert await h.segmenter.timers.run_once() == 10
        assert units == [10]  # one transaction: nothing taken apart
        assert await entered(h) == [f"u{i:02d}" for i in range(10) if i != 3]
        first_try = h.clock.now()
        assert await timers(h) == {"u03": (first_try + timedelta(seconds=60), 1)}  # tried again in 60 s
        assert since(before) == {"retried": 1}

        h.clock.advance(timedelta(seconds=59))
        assert await h.segmenter.timers.run_once() == 0  # not yet: no pass claims it first meanwhile
        h.clock.advance(timedelta(seconds=1))
        assert await h.segmenter.timers.run_once() == 1
        assert await timers(h) == {"u03": (h.clock.now() + timedelta(seconds=120), 2)}  # then in 120 s
        h.clock.advance(timedelta(seconds=119))
        assert await h.segmenter.timers.run_once() == 0
        h.clock.advance(timedelta(seconds=1))
        assert await h.segmenter.timers.run_once() == 1  # the third try: parked

    assert await timers(h) == {}
    row = (await parked(h))["u03"]
    assert (row["segment_id"], row["attempts"], row["stalls"], row["parked_at"]) == (sid, 3, 0, h.clock.now())
    assert row["due_at"] == h.clock.now()  # as due at its last try: requeued, due at once
    assert row["error"] == "RuntimeError: evaluation failed for u03"
    assert since(before) == {"retried": 2, "parked": 1}
    logged = [(r["levelno"], r["customer_id"], r["attempts"]) for r in records(caplog, "attempts")]
    assert logged == [(logging.WARNING, "u03", 1), (logging.WARNING, "u03", 2), (logging.ERROR, "u03", 3)]
    # Where it was raised, never the exception itself (its text, chained ones, locals: a customer's data).
    assert all(r["exc_info"] is None and r["at"].endswith("in holds") for r in records(caplog, "attempts"))
    h.clock.advance(timedelta(days=1))
    assert await h.segmenter.timers.run_once() == 0  # parked: no longer claimed

    r = await h.client.get(f"/v1/segments/{sid}/parked-timers", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "parked_timers": [
            {
                "customer_id": "u03",
                "due_at": iso(row["due_at"]),
                "parked_at": iso(row["parked_at"]),
                "attempts": 3,
                "stalls": 0,
                "error": "RuntimeError: evaluation failed for u03",
                "rescheduled_due_at": None,
            }
        ],
        "next_after": None,
    }
    assert (await h.client.get(f"/v1/segments/{sid}", headers=ADMIN)).json()["parked_timer_count"] == 1
    listed = (await h.client.get("/v1/segments", headers=ADMIN)).json()["segments"]
    assert [(s["id"], s["parked_timer_count"]) for s in listed] == [(sid, 1)]

    # The cause gone, put back: due at once, re-evaluated, announced once.
    monkeypatch.undo()
    r = await h.client.post(f"/v1/segments/{sid}/parked-timers/requeue", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"requeued": 1}, r.text
    assert await parked(h) == {} and (await timers(h))["u03"][1] == 0
    assert await h.segmenter.timers.run_once() == 1
    assert await entered(h) == [f"u{i:02d}" for i in range(10)]
    view = (await h.client.get(f"/v1/segments/{sid}", headers=ADMIN)).json()
    assert (view["member_count"], view["parked_timer_count"]) == (10, 0)


async def test_the_oldest_timer_failing_holds_no_later_batch_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failing timer is the oldest: claimed first, it failed every batch before. Now the others
    go through in batches behind it, and an event that re-evaluates its customer starts its tries
    afresh."""
    h = harness
    h.segmenter.settings.timer_batch_size = 4
    sid = await h.create_segment(LAPSED, name="Lapsed")
    await buyers(h, 10)
    poison(h, monkeypatch, "u00")
    h.clock.advance(timedelta(days=30))
    passes = [await h.segmenter.timers.run_once() for _ in range(4)]
    assert passes == [4, 4, 2, 0]
    assert await entered(h) == [f"u{i:02d}" for i in range(1, 10)]
    assert await timers(h) == {"u00": (h.clock.now() + timedelta(seconds=60), 1)}

    # A new order re-evaluates u00 on the event path (its catalogue is not poisoned): a fresh timer,
    # no try counted.
    order = make_event("o-new", "track", user_id="u00", event="Order Completed", timestamp=h.clock.now())
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(uow, [order])
    assert await timers(h) == {"u00": (h.clock.now() + timedelta(days=30), 0)}
    assert (await h.client.get(f"/v1/segments/{sid}", headers=ADMIN)).json()["member_count"] == 9


async def test_dense_failures_in_one_segment_cost_one_transaction(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every timer of the batch fails, in one segment (its definition breaks the evaluator): one
    transaction counts them all (taken apart by halves, 60 failing timers cost 119 transactions and
    60 more to count them). A broken segment is its own: counted, not taken for an outage."""
    h = harness
    n = 60
    sid = await h.create_segment(LAPSED, name="Lapsed")
    await buyers(h, n)
    poison(h, monkeypatch, *[f"u{i:02d}" for i in range(n)])
    units = count_units(h, monkeypatch)
    before = outcomes()
    h.clock.advance(timedelta(days=30))
    assert await h.segmenter.timers.run_once() == n
    assert units == [n]
    assert since(before) == {"retried": n}
    rows = await timer_rows(h)
    assert {k: (r["due_at"], r["attempts"]) for k, r in rows.items()} == {
        (f"u{i:02d}", sid): (h.clock.now() + timedelta(seconds=60), 1) for i in range(n)
    }
    assert await h.memberships() == []


async def test_a_batch_failing_in_several_segments_and_nowhere_else_is_taken_for_an_outage(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every timer of the batch fails, in two segments, none goes through: a release that broke the
    evaluator, not those timers. Nothing is counted, the timers are put off (the later ones get
    their turn), the loop backs off; a timer put off so `segment_timer_outage_passes` times is
    counted all the same."""
    h = harness
    h.segmenter.settings.timer_batch_size = 6
    h.segmenter.settings.segment_timer_outage_passes = 2
    first = await h.create_segment(LAPSED, name="Lapsed")
    second = await h.create_segment(LAPSED, name="Lapsed too")
    await buyers(h, 3)  # 6 timers, due first
    await buyers(h, 2, prefix="v", at=START + timedelta(seconds=30))  # 4 due 30 s later
    poison(h, monkeypatch, "u00", "u01", "u02")
    units = count_units(h, monkeypatch)
    before = outcomes()
    h.clock.advance(timedelta(days=30, minutes=1))
    due = await timer_rows(h)

    with pytest.raises(due_timers.TimersFailing, match="all 6 due timers of the batch failed, in 2 segments"):
        await h.segmenter.timers.run_once()
    assert units == [6]
    assert since(before) == {"put_off": 6, "backed_off": 1}
    rows = await timer_rows(h)
    put_off = h.clock.now() + timedelta(seconds=60)
    for i in range(3):
        for sid in (first, second):
            assert (rows[f"u{i:02d}", sid]["due_at"], rows[f"u{i:02d}", sid]["attempts"]) == (put_off, 0)
    assert rows[("v00", first)] == due[("v00", first)]
    assert await h.memberships() == []

    # The later timers' turn: they go through (the batch's failures were not everyone's).
    assert await h.segmenter.timers.run_once() == 4
    assert await entered(h) == ["v00", "v00", "v01", "v01"]

    # Put off a second time: counted all the same (a try each, not parked for it).
    h.clock.advance(timedelta(seconds=60))
    assert await h.segmenter.timers.run_once() == 6
    assert since(before) == {"put_off": 6, "backed_off": 1, "retried": 6}
    rows = await timer_rows(h)
    assert {r["attempts"] for r in rows.values()} == {1} and len(rows) == 6
    assert await parked(h) == {}


async def test_a_segment_built_on_the_timers_failing_counts_on_the_timer_and_the_rest_commits(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timer's segment evaluates; one built on it (member_of) raises for that customer: the timer's
    own change commits and is announced, a try is counted on the timer (tried again, the dependent
    with it); the other customers go through whole."""
    h = harness
    lapsed = await h.create_segment(LAPSED, name="Lapsed")
    built = await h.create_segment({"member_of": lapsed}, name="Built on it")
    await buyers(h, 3)
    poison(h, monkeypatch, "u01", segments={built})
    h.clock.advance(timedelta(days=30))
    assert await h.segmenter.timers.run_once() == 3
    msgs = await h.memberships()
    assert sorted((m["customer_id"], m["segment_id"]) for m in msgs) == sorted(
        [("u00", lapsed), ("u00", built), ("u01", lapsed), ("u02", lapsed), ("u02", built)]
    )
    rows = await timer_rows(h)
    assert {k: (r["due_at"], r["attempts"]) for k, r in rows.items()} == {
        ("u01", lapsed): (h.clock.now() + timedelta(seconds=60), 1)
    }

    monkeypatch.undo()
    h.clock.advance(timedelta(seconds=60))
    assert await h.segmenter.timers.run_once() == 1
    msgs = await h.memberships()
    assert ("u01", built) in [(m["customer_id"], m["segment_id"]) for m in msgs]
    assert len({m["event_id"] for m in msgs}) == len(msgs) == 6
    assert await timer_rows(h) == {}


async def test_database_failures_in_both_halves_are_found_and_counted(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch that fails in the database (a constraint) is taken apart by halves: failing timers in
    both halves are each found alone and counted, in one transaction, the others commit once. The
    logs say what failed (the driver's first line, the SQLSTATE), never the DETAIL line that can
    quote a customer's row, and carry no exception."""
    h = harness
    await h.create_segment(LAPSED, name="Lapsed")
    await buyers(h, 8)
    await refuse_customers(h, ["u01", "u06"], detail="secret@example.com")
    units = count_units(h, monkeypatch)
    before = outcomes()
    h.clock.advance(timedelta(days=30))
    with caplog.at_level(logging.INFO):
        assert await h.segmenter.timers.run_once() == 8
    # The batch, its halves, their halves (each with one failing timer), then the failing timers.
    assert units == [8, 4, 2, 1, 1, 2, 4, 2, 2, 1, 1]
    assert since(before) == {"retried": 2}
    assert await entered(h) == ["u00", "u02", "u03", "u04", "u05", "u07"]
    assert await timers(h) == {
        "u01": (h.clock.now() + timedelta(seconds=60), 1),
        "u06": (h.clock.now() + timedelta(seconds=60), 1),
    }
    tried = records(caplog, "attempts")
    assert sorted(r["customer_id"] for r in tried) == ["u01", "u06"]
    assert {(r["error"], r["sqlstate"]) for r in tried} == {
        ("CheckViolationError: refused for the test", "23514")
    }
    for r in caplog.records:
        assert "secret" not in r.getMessage() and "secret" not in str(r.__dict__), r
        if r.name.startswith("services.segmenter"):
            assert r.exc_info is None, r

    # Twice more each (60 s, then 120 s later): parked, after 3 tries in all.
    for wait in (60, 120):
        h.clock.advance(timedelta(seconds=wait))
        assert await h.segmenter.timers.run_once() == 2
    assert sorted(await parked(h)) == ["u01", "u06"]
    assert {r["attempts"] for r in (await parked(h)).values()} == {3}
    assert since(before) == {"retried": 4, "parked": 2}

    await allow_customers(h)
    assert await entered(h) == ["u00", "u02", "u03", "u04", "u05", "u07"]


async def test_committed_parts_stay_when_a_passing_condition_strikes_mid_split(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking a batch apart, the parts done commit; a passing condition in a later part raises the
    pass (backed off), no try counted on anyone, the other timers due as they were."""
    h = harness
    await h.create_segment(LAPSED, name="Lapsed")
    await buyers(h, 10)
    await refuse_customers(h, ["u01"])
    real = h.segmenter.timers._fire

    class StatementTimeout(Exception):
        sqlstate = "57014"

    async def timing_out(claimed: list[timer_store.DueTimer], limit: int, keys: Any) -> Any:
        if keys is not None and any(k.customer_id == "u05" for k in keys):
            raise StatementTimeout("canceling statement due to statement timeout")
        return await real(claimed, limit, keys)

    monkeypatch.setattr(h.segmenter.timers, "_fire", timing_out)
    before = outcomes()
    h.clock.advance(timedelta(days=30))
    due = await timer_rows(h)
    with pytest.raises(StatementTimeout):
        await h.segmenter.timers.run_once()
    assert since(before) == {"backed_off": 1}
    # The first half taken apart: u00, u02-u04 through; u01 found alone but not counted (the pass
    # was raised before); the second half as it was.
    assert await entered(h) == ["u00", "u02", "u03", "u04"]
    rows = await timer_rows(h)
    assert sorted(c for c, _ in rows) == ["u01", "u05", "u06", "u07", "u08", "u09"]
    assert all(rows[k] == due[k] for k in rows)

    monkeypatch.undo()
    await allow_customers(h)
    assert await h.segmenter.timers.run_once() == 6
    assert await entered(h) == [f"u{i:02d}" for i in range(10)]


@pytest.mark.parametrize("cause", ["connection", "25006", "58030"])
async def test_an_outage_is_retried_and_never_counted(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, cause: str
) -> None:
    """A lost connection, a read-only transaction (a former primary after a failover), an I/O error:
    none is the timers' fault, however many passes it lasts. Nothing is parked, no try counted, the
    batch claimed whole again, nothing announced; once it passes, every timer fires, once."""
    h = harness
    sid = await h.create_segment(LAPSED, name="Lapsed")
    await buyers(h, 5)
    if cause == "connection":
        fail_after_writes(monkeypatch, "u02", ConnectionResetError("connection reset by peer"))
    else:
        await refuse(h, sid, cause, customer="u02")  # raised by PostgreSQL writing u02's membership
    units = count_units(h, monkeypatch)
    before = outcomes()
    h.clock.advance(timedelta(days=30))
    due = await timer_rows(h)
    for _ in range(5):
        with pytest.raises(
            Exception, match="connection reset" if cause == "connection" else "refused for the test"
        ):
            await h.segmenter.timers.run_once()
        h.clock.advance(timedelta(minutes=10))
    assert units == [5] * 5  # never taken apart, nor claimed smaller
    assert await timer_rows(h) == due  # all still due, as they were, no try counted
    assert await parked(h) == {}
    assert since(before) == {"backed_off": 5}
    assert await h.memberships() == []

    if cause == "connection":
        monkeypatch.undo()
    else:
        await allow(h)
    assert await h.segmenter.timers.run_once() == 5
    assert await entered(h) == [f"u{i:02d}" for i in range(5)]


@pytest.mark.parametrize("cause", ["57014", "55P03", "53200", "40P01"])
async def test_a_timer_whose_pass_always_stalls_holds_no_other_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, cause: str
) -> None:
    """A statement timeout (a customer whose re-evaluation always outlasts it), a lock timeout, out of
    memory, a deadlock on every quick try: before, the same batch was claimed first again on every
    pass and no timer fired. Now the next pass claims half as many, down to the timer at fault
    alone, which has a stall counted and is put off (the others go through behind it, and the
    batch grows back), and is parked after `segment_timer_max_stalls` stalls in a row; no try
    (`attempts`) counted."""
    h = harness
    h.segmenter.settings.segment_timer_max_stalls = 2
    sid = await h.create_segment(LAPSED, name="Lapsed")
    await buyers(h, 5)
    await refuse(h, sid, cause, customer="u02")
    units = count_units(h, monkeypatch)
    before = outcomes()
    h.clock.advance(timedelta(days=30))
    timers_ = h.segmenter.timers

    async def stalls() -> None:
        with pytest.raises(Exception, match="refused for the test"):
            await timers_.run_once()

    with caplog.at_level(logging.WARNING, logger="services.segmenter.due_timers"):
        await stalls()  # 5 claimed: the next claims 2
        assert timers_.batch_size() == 2
        assert await timers_.run_once() == 2  # u00, u01 through: the next claims 4
        assert timers_.batch_size() == 4
        await stalls()  # u02-u04: the next claims 1
        assert timers_.batch_size() == 1
        await stalls()  # u02 alone: a stall counted, put off 60 s
        row = (await timer_rows(h))[("u02", sid)]
        assert (row["due_at"], row["attempts"], row["stalls"]) == (
            h.clock.now() + timedelta(seconds=60),
            0,
            1,
        )
        assert await timers_.run_once() == 1  # u03
        assert await timers_.run_once() == 1  # u04: idle, grown back
        assert await timers_.run_once() == 0
    quick = 3 if cause == "40P01" else 0  # a deadlock is tried again at once first, 4 tries in all
    assert units == [5] * (1 + quick) + [2] + [3] * (1 + quick) + [1] * (1 + quick) + [1, 1, 0]
    assert await entered(h) == ["u00", "u01", "u03", "u04"]
    assert since(before) == {"backed_off": 3, "stalled": 1}
    assert [(r["customer_id"], r["stalls"]) for r in records(caplog, "stalls")] == [("u02", 1)]
    assert [r.getMessage() for r in caplog.records].count(
        "due timer pass stalled; the next claims fewer timers"
    ) == 2

    h.clock.advance(timedelta(seconds=60))
    await stalls()  # its second stall in a row: parked
    row = (await parked(h))["u02"]
    assert (row["attempts"], row["stalls"]) == (0, 2) and row["error"].endswith("Error: refused for the test")
    assert await timer_rows(h) == {}
    assert since(before) == {"backed_off": 4, "stalled": 1, "parked": 1}

    await allow(h)
    r = await h.client.post(f"/v1/segments/{sid}/parked-timers/requeue", headers=ADMIN)
    assert r.json() == {"requeued": 1}
    assert await timers_.run_once() == 1
    assert await entered(h) == [f"u{i:02d}" for i in range(5)]


async def test_two_workers_count_one_try_between_them(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas' loops at once share the batch (SKIP LOCKED): each failing timer is claimed, and
    counted, once. Two workers that both found the same timer failing alone count one try: the
    second finds it put off already."""
    h = harness
    s = h.segmenter
    sid = await h.create_segment(LAPSED, name="Lapsed")
    await buyers(h, 10)
    poison(h, monkeypatch, "u03", "u07")
    other = DueTimers(s.platform, s.clock, s.timers.catalog_cache, s.settings)
    s.settings.timer_batch_size = 5
    h.clock.advance(timedelta(days=30))
    claimed = await asyncio.gather(s.timers.run_once(), other.run_once())
    assert sorted(claimed) == [5, 5]
    assert await entered(h) == [f"u{i:02d}" for i in range(10) if i not in (3, 7)]
    assert {c: t[1] for c, t in (await timers(h)).items()} == {"u03": 1, "u07": 1}

    # The same timer found failing alone by both (its batch taken apart by each in turn).
    h.clock.advance(timedelta(seconds=60))
    timer = next(t for t in await claimed_now(h) if t.customer_id == "u03")
    failure = RuntimeError("evaluation failed for u03")
    await s.timers._failed_alone([(timer, failure)], every=False)
    await other._failed_alone([(timer, failure)], every=False)
    row = (await timer_rows(h))[("u03", sid)]
    assert (row["attempts"], row["due_at"]) == (2, h.clock.now() + timedelta(seconds=120))


async def claimed_now(h: Harness) -> list[timer_store.DueTimer]:
    """The timers due now, as a claim would return them (nothing claimed: rolled back)."""
    async with h.segmenter.platform.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT customer_id, segment_id, due_at, attempts, stalls FROM segment_timers "
                "WHERE due_at <= :now"
            ),
            {"now": h.clock.now()},
        )
        return [timer_store.DueTimer(*r) for r in rows]


async def test_an_error_before_any_timer_is_claimed_is_not_counted_as_backed_off(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness

    async def broken(*args: Any, **kwargs: Any) -> list[timer_store.DueTimer]:
        raise RuntimeError("a bug before the claim")

    monkeypatch.setattr(timer_store, "claim_due_timers", broken)
    before = outcomes()
    with pytest.raises(RuntimeError):
        await h.segmenter.timers.run_once()
    assert since(before) == {"error": 1}


async def test_the_waits_are_bounded_whatever_the_tries(harness: Harness) -> None:
    """The next try's wait doubles at most to a day, whatever the tries (no overflow of the
    doubling), and the settings bound the tries."""
    h = harness
    now = h.clock.now()
    await sql(
        h,
        "INSERT INTO segment_timers (customer_id, segment_id, due_at, attempts) VALUES ('c', 's', :now, 500)",
        now=now,
    )
    async with h.segmenter.platform.unit_of_work() as uow:
        noted = await timer_store.note_failures(
            uow.session,
            [(timer_store.DueTimer("c", "s", now, 500), "RuntimeError: x")],
            now,
            counter="attempts",
            retry_s=86400,
            max_tries=10_000,
        )
    assert noted == [
        timer_store.TimerFailure("c", "s", 501, now + timedelta(seconds=timer_store.RETRY_MAX_S))
    ]
    bounds: list[tuple[str, Any]] = [
        ("segment_timer_max_attempts", 21),
        ("segment_timer_max_stalls", 51),
        ("segment_timer_retry_s", 86401),
        ("segment_timer_sweep_s", 0),
    ]
    for name, value in bounds:
        with pytest.raises(ValidationError, match=name):
            SegmenterSettings(**{name: value})

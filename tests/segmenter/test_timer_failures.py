"""A due timer whose re-evaluation fails: its batch is taken apart, the other timers go through (once
each), it is tried again later and parked after its tries; outages and passing conditions of the
database are retried and never counted; a back-fill of the segment, a requeue, an erasure clear the
parked rows."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from services.segmenter import due_timers
from services.segmenter.domain.catalog import Catalog
from services.segmenter.domain.profile import ProfileSnapshot
from shared.db.unit_of_work import UnitOfWork
from tests.segmenter.conftest import ADMIN, START, Harness, make_event
from tests.segmenter.test_backfill_failures import allow, refuse

# Buyers whose last order is 30 days old: a timer per customer, due 30 days after their order.
LAPSED = {"and": [{"performed": "Order Completed"}, {"not_performed": "Order Completed", "since": "30d"}]}


def counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("clm_segmenter_timer_failures_total", {"outcome": outcome}) or 0.0


async def buyers(h: Harness, n: int) -> None:
    """u00..u<n-1>, one order each, a second apart (u00 first): their timers come due in that order."""
    events = [
        make_event(
            f"o{i}",
            "track",
            user_id=f"u{i:02d}",
            event="Order Completed",
            timestamp=START - timedelta(seconds=60 - i),
        )
        for i in range(n)
    ]
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(uow, events)


def poison(monkeypatch: pytest.MonkeyPatch, *customers: str, error: type[Exception] = RuntimeError) -> None:
    """The due-timer loop's evaluation raises whenever it re-evaluates one of `customers`, after it has
    written the batch's memberships and queued their announcements (all rolled back)."""
    real = due_timers.reevaluate

    async def failing(
        uow: UnitOfWork,
        catalog: Catalog,
        profiles: Mapping[str, ProfileSnapshot],
        affected: Mapping[str, set[str]],
        causes: Mapping[str, str],
        now: datetime,
    ) -> int:
        changed = await real(uow, catalog, profiles, affected, causes, now)
        bad = sorted(c for c in customers if affected.get(c))
        if bad:
            raise error(f"evaluation failed for {bad[0]}")
        return changed

    monkeypatch.setattr(due_timers, "reevaluate", failing)


async def timers(h: Harness) -> dict[str, tuple[datetime, int]]:
    async with h.segmenter.platform.engine.connect() as conn:
        rows = await conn.execute(text("SELECT customer_id, due_at, attempts FROM segment_timers"))
        return {r[0]: (r[1], r[2]) for r in rows}


async def parked(h: Harness) -> dict[str, dict[str, Any]]:
    async with h.segmenter.platform.engine.connect() as conn:
        rows = await conn.execute(text("SELECT * FROM segment_timers_parked"))
        return {r.customer_id: dict(r._mapping) for r in rows}


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


async def test_a_poisoned_timer_holds_no_other_back_is_tried_again_then_parked(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the batch failed on every pass and no due timer of any customer fired again."""
    h = harness
    sid = await h.create_segment(LAPSED, name="Lapsed")
    await buyers(h, 10)
    poison(monkeypatch, "u03")
    retried, parked_before = counted("retried"), counted("parked")
    h.clock.advance(timedelta(days=30))

    with caplog.at_level(logging.WARNING, logger="services.segmenter.due_timers"):
        assert await h.segmenter.timers.run_once() == 10  # one batch: taken apart, 9 through
        msgs = await h.memberships()
        assert sorted(m["customer_id"] for m in msgs) == [f"u{i:02d}" for i in range(10) if i != 3]
        assert {(m["segment_id"], m["change"], m["cause"]) for m in msgs} == {(sid, "entered", "schedule")}
        first_try = h.clock.now()
        assert await timers(h) == {"u03": (first_try + timedelta(seconds=60), 1)}  # tried again in 60 s
        assert counted("retried") - retried == 1

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
    assert (row["segment_id"], row["attempts"], row["parked_at"]) == (sid, 3, h.clock.now())
    assert row["due_at"] == h.clock.now()  # as it was due at its last try: requeued, due at once
    assert row["error"] == "RuntimeError: evaluation failed for u03"
    assert (counted("retried") - retried, counted("parked") - parked_before) == (2, 1)
    logged = [
        (r.levelno, getattr(r, "customer_id", None), getattr(r, "attempts", None))
        for r in caplog.records
        if r.name == "services.segmenter.due_timers" and hasattr(r, "attempts")
    ]
    assert logged == [(logging.WARNING, "u03", 1), (logging.WARNING, "u03", 2), (logging.ERROR, "u03", 3)]
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
                "error": "RuntimeError: evaluation failed for u03",
                "rescheduled_due_at": None,
            }
        ],
        "next_after": None,
    }
    assert (await h.client.get(f"/v1/segments/{sid}", headers=ADMIN)).json()["parked_timer_count"] == 1

    # The cause gone, put back: due at once, re-evaluated, announced once.
    monkeypatch.undo()
    r = await h.client.post(f"/v1/segments/{sid}/parked-timers/requeue", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"requeued": 1}, r.text
    assert await parked(h) == {} and (await timers(h))["u03"][1] == 0
    assert await h.segmenter.timers.run_once() == 1
    msgs = await h.memberships()
    assert sorted(m["customer_id"] for m in msgs) == [f"u{i:02d}" for i in range(10)]
    assert len({m["event_id"] for m in msgs}) == 10  # nothing announced twice
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
    poison(monkeypatch, "u00")
    h.clock.advance(timedelta(days=30))
    passes = [await h.segmenter.timers.run_once() for _ in range(4)]
    assert passes == [4, 4, 2, 0]
    msgs = await h.memberships()
    assert sorted(m["customer_id"] for m in msgs) == [f"u{i:02d}" for i in range(1, 10)]
    assert len({m["event_id"] for m in msgs}) == 9
    assert await timers(h) == {"u00": (h.clock.now() + timedelta(seconds=60), 1)}

    # A new order re-evaluates u00 on the event path (not poisoned): a fresh timer, no try counted.
    order = make_event("o-new", "track", user_id="u00", event="Order Completed", timestamp=h.clock.now())
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(uow, [order])
    assert await timers(h) == {"u00": (h.clock.now() + timedelta(days=30), 0)}
    assert (await h.client.get(f"/v1/segments/{sid}", headers=ADMIN)).json()["member_count"] == 9


@pytest.mark.parametrize("cause", ["40P01", "57014", "53100", "connection"])
async def test_an_outage_or_a_passing_condition_is_retried_and_never_counted(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, cause: str
) -> None:
    """A deadlock (retried at once, then the pass fails), a statement timeout, a full disk, a lost
    connection: none is the timers' fault, however many passes it lasts. Nothing is parked, no try
    counted, nothing announced; once it passes, every timer fires, each announced once."""
    h = harness
    sid = await h.create_segment(LAPSED, name="Lapsed")
    await buyers(h, 5)
    if cause == "connection":
        poison(monkeypatch, "u02", error=ConnectionResetError)
    else:
        await refuse(h, sid, cause, customer="u02")  # raised by PostgreSQL writing u02's membership
    retried, parked_before, backed_off = counted("retried"), counted("parked"), counted("backed_off")
    h.clock.advance(timedelta(days=30))
    due = await timers(h)
    assert len(due) == 5
    with caplog.at_level(logging.INFO, logger="services.segmenter.due_timers"):
        for _ in range(5):
            with pytest.raises(Exception, match="u02" if cause == "connection" else "refused for the test"):
                await h.segmenter.timers.run_once()
            h.clock.advance(timedelta(minutes=10))
    quick = [
        r for r in caplog.records if r.getMessage().startswith("due timer unit of work met a concurrent")
    ]
    assert len(quick) == (5 * (due_timers.CONFLICT_TRIES - 1) if cause == "40P01" else 0)
    assert await timers(h) == due  # all still due, as they were, no try counted
    assert await parked(h) == {}
    assert (counted("retried"), counted("parked")) == (retried, parked_before)
    assert counted("backed_off") - backed_off == 5
    assert await h.memberships() == []

    if cause == "connection":
        monkeypatch.undo()
    else:
        await allow(h)
    assert await h.segmenter.timers.run_once() == 5
    msgs = await h.memberships()
    assert sorted(m["customer_id"] for m in msgs) == [f"u{i:02d}" for i in range(5)]
    assert len({m["event_id"] for m in msgs}) == 5


async def test_a_back_fill_an_erasure_and_a_deletion_clear_parked_timers(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-saving the segment back-fills it: every customer re-evaluated (in SQL), their parked timers
    done with. An erased customer's parked timers go with their data; a deleted segment's too."""
    h = harness
    h.segmenter.settings.segment_timer_max_attempts = 1
    sid = await h.create_segment(LAPSED, name="Lapsed")
    other = await h.create_segment(LAPSED, name="Lapsed too")
    await buyers(h, 4)
    poison(monkeypatch, "u01", "u02")
    h.clock.advance(timedelta(days=30))
    assert await h.segmenter.timers.run_once() == 8
    async with h.segmenter.platform.engine.connect() as conn:
        pairs = sorted(
            tuple(r)
            for r in await conn.execute(text("SELECT customer_id, segment_id FROM segment_timers_parked"))
        )
    assert pairs == sorted([("u01", sid), ("u01", other), ("u02", sid), ("u02", other)])

    # Paged by customer, as the members are.
    page = (await h.client.get(f"/v1/segments/{sid}/parked-timers?limit=1", headers=ADMIN)).json()
    assert [p["customer_id"] for p in page["parked_timers"]] == ["u01"] and page["next_after"] == "u01"
    page = (await h.client.get(f"/v1/segments/{sid}/parked-timers?limit=1&after=u01", headers=ADMIN)).json()
    assert [p["customer_id"] for p in page["parked_timers"]] == ["u02"]

    r = await h.client.delete("/v1/customers/u02", headers={**ADMIN, "X-CLM-Actor": "dpo"})
    assert r.status_code == 202, r.text
    async with h.segmenter.platform.engine.connect() as conn:
        pairs = sorted(
            tuple(r)
            for r in await conn.execute(text("SELECT customer_id, segment_id FROM segment_timers_parked"))
        )
    assert pairs == sorted([("u01", sid), ("u01", other)])

    r = await h.client.put(
        f"/v1/segments/{sid}", json={"name": "Lapsed", "definition": LAPSED}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    await h.segmenter.backfill.run_until_idle()
    async with h.segmenter.platform.engine.connect() as conn:
        pairs = sorted(
            tuple(r)
            for r in await conn.execute(text("SELECT customer_id, segment_id FROM segment_timers_parked"))
        )
    assert pairs == [("u01", other)]  # the other segment's stays until it is back-filled or requeued
    msgs = await h.memberships()
    assert [(m["segment_id"], m["customer_id"], m["cause"]) for m in msgs if m["customer_id"] == "u01"] == [
        (sid, "u01", "backfill")
    ]
    assert (await h.client.get(f"/v1/segments/{sid}", headers=ADMIN)).json()["parked_timer_count"] == 0

    assert (await h.client.delete(f"/v1/segments/{other}", headers=ADMIN)).status_code == 204
    assert await parked(h) == {}


async def test_parked_timer_routes_follow_the_segment_conventions(harness: Harness) -> None:
    h = harness
    for method, path in [("GET", "parked-timers"), ("POST", "parked-timers/requeue")]:
        r = await h.client.request(method, f"/v1/segments/seg_nope/{path}", headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"] == "not_found", r.text
        r = await h.client.request(method, f"/v1/segments/seg_nope/{path}")
        assert r.status_code == 401, r.text
    sid = await h.create_segment(LAPSED, name="Lapsed")
    r = await h.client.get(f"/v1/segments/{sid}/parked-timers?limit=0", headers=ADMIN)
    assert r.status_code == 400, r.text
    assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [("limit", "greater_than_equal")]
    r = await h.client.get(f"/v1/segments/{sid}/parked-timers", headers=ADMIN)
    assert r.json() == {"parked_timers": [], "next_after": None}
    r = await h.client.post(f"/v1/segments/{sid}/parked-timers/requeue", headers=ADMIN)
    assert r.json() == {"requeued": 0}


async def test_a_merge_removes_the_merged_away_customers_parked_timers(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    h.segmenter.settings.segment_timer_max_attempts = 1
    await h.create_segment(LAPSED, name="Lapsed")
    events = [
        make_event(
            "i1", "identify", user_id="u1", traits={"plan": "pro"}, timestamp=START - timedelta(hours=1)
        ),
        make_event(
            "o1", "track", anonymous_id="a1", event="Order Completed", timestamp=START - timedelta(hours=1)
        ),
    ]
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(uow, events)
    poison(monkeypatch, "a1")
    h.clock.advance(timedelta(days=30))
    assert await h.segmenter.timers.run_once() == 1
    assert list(await parked(h)) == ["a1"]

    merge = make_event("i2", "identify", user_id="u1", anonymous_id="a1", timestamp=h.clock.now())
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(uow, [merge])
    assert await parked(h) == {}
    assert (await h.customer("a1"))["customer_id"] == "u1"

"""Parked due timers: listed and requeued through the API (in chunks, 503 when a row is held), cleared
by a back-fill, an erasure, a merge (also one racing the parking) and a deletion, gone once the pair
is re-evaluated again, and swept when an earlier release left them behind."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from services.segmenter.api import segments as segments_api
from services.segmenter.store import timers as timer_store
from services.segmenter.store.privacy import CUSTOMER_TABLES
from tests.segmenter.conftest import ADMIN, START, Harness, make_event
from tests.segmenter.test_erasure_races import Pause
from tests.segmenter.test_timer_failures import (
    LAPSED,
    allow_customers,
    buyers,
    parked,
    parked_pairs,
    poison,
    refuse_customers,
    timer_rows,
    timers,
)


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
    poison(h, monkeypatch, "u01", "u02")
    h.clock.advance(timedelta(days=30))
    assert await h.segmenter.timers.run_once() == 8
    assert await parked_pairs(h) == sorted([("u01", sid), ("u01", other), ("u02", sid), ("u02", other)])

    # Paged by customer, as the members are.
    page = (await h.client.get(f"/v1/segments/{sid}/parked-timers?limit=1", headers=ADMIN)).json()
    assert [p["customer_id"] for p in page["parked_timers"]] == ["u01"] and page["next_after"] == "u01"
    page = (await h.client.get(f"/v1/segments/{sid}/parked-timers?limit=1&after=u01", headers=ADMIN)).json()
    assert [p["customer_id"] for p in page["parked_timers"]] == ["u02"]

    r = await h.client.delete("/v1/customers/u02", headers={**ADMIN, "X-CLM-Actor": "dpo"})
    assert r.status_code == 202, r.text
    assert await parked_pairs(h) == sorted([("u01", sid), ("u01", other)])

    r = await h.client.put(
        f"/v1/segments/{sid}", json={"name": "Lapsed", "definition": LAPSED}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    await h.segmenter.backfill.run_until_idle()
    assert await parked_pairs(h) == [
        ("u01", other)
    ]  # the other segment's stays until back-filled or requeued
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
    listed = (await h.client.get("/v1/segments", headers=ADMIN)).json()["segments"]
    assert [(s["id"], s["parked_timer_count"]) for s in listed] == [(sid, 0)]


async def test_a_merge_removes_the_merged_away_customers_parked_timers(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    h.segmenter.settings.segment_timer_max_attempts = 1
    await h.create_segment(LAPSED, name="Lapsed")
    await anonymous_buyer(h)
    poison(h, monkeypatch, "a1")
    h.clock.advance(timedelta(days=30))
    assert await h.segmenter.timers.run_once() == 1
    assert list(await parked(h)) == ["a1"]

    merge = make_event("i2", "identify", user_id="u1", anonymous_id="a1", timestamp=h.clock.now())
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(uow, [merge])
    assert await parked(h) == {}
    assert (await h.customer("a1"))["customer_id"] == "u1"


async def anonymous_buyer(h: Harness) -> None:
    """u1 (a known user) and a1 (an anonymous buyer, whose timer comes due 30 days later)."""
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


async def test_a_merge_racing_a_timer_being_parked_leaves_no_parked_row(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merged-away customer's timer fails in the database and is parked in a transaction of its
    own (no profile lock) while a merge of that customer runs: the merge waits for the timer's row,
    and its later statement (the profile's deletion) sees the parked row and deletes it too."""
    h = harness
    h.segmenter.settings.segment_timer_max_attempts = 1
    await h.create_segment(LAPSED, name="Lapsed")
    await anonymous_buyer(h)
    await refuse_customers(h, ["a1"])
    pause = Pause(monkeypatch, timer_store, "note_failures", after=True)  # parked, not committed
    h.clock.advance(timedelta(days=30))
    loop = asyncio.ensure_future(h.segmenter.timers.run_once())
    await asyncio.wait_for(pause.reached.wait(), 10)
    merge = make_event("i2", "identify", user_id="u1", anonymous_id="a1", timestamp=h.clock.now())
    merging = asyncio.ensure_future(h.segmenter.events.handle_in_own_unit([merge]))
    done, _ = await asyncio.wait({merging}, timeout=1.0)
    assert not done  # waiting for the timer's row
    pause.release.set()
    assert await loop == 1
    await merging
    assert await parked(h) == {} and await timers(h) == {}
    assert (await h.customer("a1"))["customer_id"] == "u1"
    await allow_customers(h)


async def test_a_rescheduled_pair_keeps_its_timer_when_requeued(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event re-evaluates a parked pair: it gets a fresh timer, listed as `rescheduled_due_at`. A
    requeue then keeps that timer as it is (the evaluation since set it: not pulled back to the
    parked due time, which is past), and the parked row is done with."""
    h = harness
    h.segmenter.settings.segment_timer_max_attempts = 1
    sid = await h.create_segment(LAPSED, name="Lapsed")
    await buyers(h, 2)
    poison(h, monkeypatch, "u01")
    h.clock.advance(timedelta(days=30))
    assert await h.segmenter.timers.run_once() == 2
    parked_due = (await parked(h))["u01"]["due_at"]
    monkeypatch.undo()

    h.clock.advance(timedelta(hours=1))
    order = make_event("o-new", "track", user_id="u01", event="Order Completed", timestamp=h.clock.now())
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(uow, [order])
    fresh = h.clock.now() + timedelta(days=30)
    page = (await h.client.get(f"/v1/segments/{sid}/parked-timers", headers=ADMIN)).json()
    assert [(p["customer_id"], p["rescheduled_due_at"]) for p in page["parked_timers"]] == [
        ("u01", fresh.isoformat().replace("+00:00", "Z"))
    ]
    assert parked_due < h.clock.now()

    r = await h.client.post(f"/v1/segments/{sid}/parked-timers/requeue", headers=ADMIN)
    assert r.json() == {"requeued": 1}
    assert await timers(h) == {"u01": (fresh, 0)}
    assert await parked(h) == {}
    assert await h.segmenter.timers.run_once() == 0  # nothing due at once


async def test_a_parked_row_goes_once_its_pair_is_re_evaluated_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parked pair re-evaluated on the event path has a timer again; when that timer is claimed,
    the stale parked row goes in the same statement: re-evaluated without failing, nothing stays
    parked; failing again, it is parked afresh (this try's error and time)."""
    h = harness
    h.segmenter.settings.segment_timer_max_attempts = 1
    sid = await h.create_segment(LAPSED, name="Lapsed")
    await buyers(h, 3)
    poison(h, monkeypatch, "u01", "u02")
    h.clock.advance(timedelta(days=30))
    assert await h.segmenter.timers.run_once() == 3
    assert sorted(await parked(h)) == ["u01", "u02"]
    first_parked = h.clock.now()

    h.clock.advance(timedelta(hours=1))
    orders = [
        make_event(f"o-new{c}", "track", user_id=c, event="Order Completed", timestamp=h.clock.now())
        for c in ("u01", "u02")
    ]
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(uow, orders)
    assert sorted(await timers(h)) == ["u01", "u02"]
    monkeypatch.undo()
    poison(h, monkeypatch, "u02")  # u01's cause is gone, u02's is not
    h.clock.advance(timedelta(days=30))
    assert await h.segmenter.timers.run_once() == 2
    rows = await parked(h)
    assert list(rows) == ["u02"] and rows["u02"]["parked_at"] > first_parked
    assert (await h.client.get(f"/v1/segments/{sid}", headers=ADMIN)).json()["parked_timer_count"] == 1


async def test_a_requeue_goes_in_chunks_and_answers_503_when_a_row_is_held(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requeue commits chunk by chunk (by customer id); a row a concurrent writer holds (here a
    customer being written) past the lock timeout answers 503 `segment_busy` with Retry-After,
    the chunks before it requeued, the rest still parked; tried again, it goes on with the rest."""
    h = harness
    h.segmenter.settings.segment_timer_max_attempts = 1
    monkeypatch.setattr(segments_api, "REQUEUE_CHUNK", 2)
    monkeypatch.setattr(segments_api, "REQUEUE_LOCK_TIMEOUT_MS", 200)
    sid = await h.create_segment(LAPSED, name="Lapsed")
    await buyers(h, 5)
    poison(h, monkeypatch, *[f"u{i:02d}" for i in range(5)])
    h.clock.advance(timedelta(days=30))
    assert await h.segmenter.timers.run_once() == 5
    assert len(await parked(h)) == 5

    async with h.segmenter.platform.engine.connect() as conn:
        await conn.execute(text("SELECT 1 FROM customers WHERE customer_id = 'u03' FOR UPDATE"))
        r = await h.client.post(f"/v1/segments/{sid}/parked-timers/requeue", headers=ADMIN)
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"] == "segment_busy" and "2 requeued before" in r.json()["message"]
        await conn.rollback()
    assert sorted(await parked(h)) == ["u02", "u03", "u04"]
    assert sorted(await timers(h)) == ["u00", "u01"]

    r = await h.client.post(f"/v1/segments/{sid}/parked-timers/requeue", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"requeued": 3}, r.text
    assert await parked(h) == {}
    assert {c: t[1] for c, t in (await timers(h)).items()} == {f"u{i:02d}": 0 for i in range(5)}


async def test_the_sweep_removes_parked_rows_an_earlier_release_left_behind(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release that did not know `segment_timers_parked` (beside this one in a rolling upgrade, or
    after a rollback) erases, merges and deletes without touching it: the erased customer's id and
    error stay. The loop sweeps them at its start and then every `segment_timer_sweep_s` while idle,
    and sets the gauge of parked timers."""
    h = harness
    s = h.segmenter
    s.settings.segment_timer_max_attempts = 1
    sid = await h.create_segment(LAPSED, name="Lapsed")
    other = await h.create_segment(LAPSED, name="Lapsed too")
    await buyers(h, 4)
    poison(h, monkeypatch, "u01", "u02", "u03")
    h.clock.advance(timedelta(days=30))
    assert await s.timers.run_once() == 8
    assert len(await parked_pairs(h)) == 6

    # The earlier release's erasure of u01 (every table it knew), merge of u02 (its profile row
    # deleted), deletion of `other` (its row, memberships and timers).
    async with s.platform.engine.begin() as conn:
        for table, column, _ in CUSTOMER_TABLES:
            if table != "segment_timers_parked" and await conn.scalar(text(f"SELECT to_regclass('{table}')")):
                await conn.execute(text(f"DELETE FROM {table} WHERE {column} = 'u01'"))
        await conn.execute(text("DELETE FROM customers WHERE customer_id = 'u02'"))
        for table in ("memberships", "segment_timers", "segments"):
            await conn.execute(text(f"DELETE FROM {table} WHERE segment_id = :s"), {"s": other})

    await s.timers.maybe_sweep()  # the first: at the loop's start
    assert await parked_pairs(h) == [("u03", sid)]
    assert REGISTRY.get_sample_value("clm_segmenter_timers_parked") == 1

    async with s.platform.engine.begin() as conn:
        await conn.execute(text("DELETE FROM customers WHERE customer_id = 'u03'"))
    h.clock.advance(timedelta(seconds=s.settings.segment_timer_sweep_s - 1))
    await s.timers.maybe_sweep()  # not yet
    assert await parked_pairs(h) == [("u03", sid)]
    h.clock.advance(timedelta(seconds=1))
    await s.timers.maybe_sweep()
    assert await parked_pairs(h) == []
    assert REGISTRY.get_sample_value("clm_segmenter_timers_parked") == 0
    assert await timer_rows(h) == {}

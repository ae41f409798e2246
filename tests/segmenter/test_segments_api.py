"""The segment API: back-fill with progress, preview, members, explain, edits, and clear 4xx."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from services.segmenter.store import segments as segment_store
from shared.contracts.events import CustomerEvent, SegmentMembershipChanged
from tests.segmenter.conftest import ADMIN, START, Harness, make_event
from tests.segmenter.test_erasure_races import Pause


async def seed(h: Harness, n: int) -> None:
    events = [
        make_event(
            f"id{i}",
            "identify",
            user_id=f"u{i:02d}",
            traits={"plan": "pro" if i % 3 == 0 else "free", "age": 20 + i},
        )
        for i in range(n)
    ]
    async with h.segmenter.platform.unit_of_work() as uow:
        await h.segmenter.events.handle(uow, events)


async def test_backfill_preview_members_explain_and_edit(harness: Harness) -> None:
    await seed(harness, 12)
    harness.segmenter.settings.backfill_chunk_size = 5  # several chunks, progress in between
    definition = {"trait": "plan", "op": "equals", "value": "pro"}
    preview = await harness.client.post(
        "/v1/segments/preview", json={"definition": definition, "sample": 2}, headers=ADMIN
    )
    assert preview.json() == {"count": 4, "sample": ["u00", "u03"]}

    r = await harness.client.post(
        "/v1/segments", json={"name": "Pro", "definition": definition}, headers=ADMIN
    )
    assert r.status_code == 201
    sid = r.json()["id"]
    assert r.json()["status"] == "backfilling" and r.json()["backfill"]["total"] == 12
    assert await harness.segmenter.backfill.run_once()
    mid = (await harness.client.get(f"/v1/segments/{sid}", headers=ADMIN)).json()
    assert mid["status"] == "backfilling" and mid["backfill"]["processed"] == 5
    await harness.segmenter.backfill.run_until_idle()
    done = (await harness.client.get(f"/v1/segments/{sid}", headers=ADMIN)).json()
    assert done["status"] == "ready" and done["backfill"]["progress"] == 1.0 and done["member_count"] == 4

    page = (await harness.client.get(f"/v1/segments/{sid}/members?limit=3", headers=ADMIN)).json()
    assert page == {"members": ["u00", "u03", "u06"], "next_after": "u06"}
    page2 = (await harness.client.get(f"/v1/segments/{sid}/members?limit=3&after=u06", headers=ADMIN)).json()
    assert page2 == {"members": ["u09"], "next_after": None}
    msgs = await harness.memberships()
    # Back-fill writes its announcements in SQL: they must be valid contract messages all the same.
    assert all(SegmentMembershipChanged.model_validate(m).segment_name == "Pro" for m in msgs)
    assert sorted((m["customer_id"], m["change"], m["cause"]) for m in msgs) == [
        (f"u{i:02d}", "entered", "backfill") for i in (0, 3, 6, 9)
    ]

    explained = (await harness.client.get(f"/v1/segments/{sid}/explain/u01", headers=ADMIN)).json()
    assert explained["member"] is False and explained["matches_now"] is False
    assert explained["explanation"]["detail"] == {"trait": "plan", "op": "equals", "actual": "free"}

    # An edit re-runs the back-fill: who leaves and who joins is announced once each.
    edited = {"and": [definition, {"trait": "age", "op": "gte", "value": 25}]}
    r = await harness.client.put(
        f"/v1/segments/{sid}", json={"name": "Pro 25+", "definition": edited}, headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["status"] == "backfilling"
    await harness.segmenter.backfill.run_until_idle()
    msgs = await harness.memberships()
    exits = [(m["customer_id"], m["event_id"]) for m in msgs if m["change"] == "exited"]
    assert exits == [("u00", f"u00:{sid}:2"), ("u03", f"u03:{sid}:2")]
    assert len(msgs) == 6
    mine = (await harness.client.get("/v1/customers/u06/segments", headers=ADMIN)).json()
    assert [s["name"] for s in mine["segments"]] == ["Pro 25+"]


async def test_segments_of_segments_and_delete(harness: Harness) -> None:
    await seed(harness, 6)
    pro = (
        await harness.client.post(
            "/v1/segments",
            json={"name": "Pro", "definition": {"trait": "plan", "op": "equals", "value": "pro"}},
            headers=ADMIN,
        )
    ).json()["id"]
    await harness.segmenter.backfill.run_until_idle()
    older = (
        await harness.client.post(
            "/v1/segments",
            json={
                "name": "Older pro",
                "definition": {"and": [{"member_of": pro}, {"trait": "age", "op": "gt", "value": 21}]},
            },
            headers=ADMIN,
        )
    ).json()["id"]
    await harness.segmenter.backfill.run_until_idle()
    members = (await harness.client.get(f"/v1/segments/{older}/members", headers=ADMIN)).json()["members"]
    assert members == ["u03"]
    # Real time follows the chain: a trait change moves u04 into Pro and so into Older pro.
    await harness.send(
        make_event(
            "m1", "identify", user_id="u04", traits={"plan": "pro"}, timestamp=START + timedelta(minutes=1)
        )
    )
    await harness.processed(1)
    members = (await harness.client.get(f"/v1/segments/{older}/members", headers=ADMIN)).json()["members"]
    assert members == ["u03", "u04"]

    r = await harness.client.delete(f"/v1/segments/{pro}", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"] == "segment_in_use"
    assert (await harness.client.delete(f"/v1/segments/{older}", headers=ADMIN)).status_code == 204
    assert (await harness.client.get(f"/v1/segments/{older}", headers=ADMIN)).status_code == 404
    listed = (await harness.client.get("/v1/segments", headers=ADMIN)).json()["segments"]
    assert [s["id"] for s in listed] == [pro]
    # Its members' exits are announced, so that journeys stop counting them; non-members say nothing.
    announced = [m for m in await harness.memberships() if m["segment_id"] == older]
    exits = [m for m in announced if m["cause"] == "segment_deleted"]
    assert sorted((m["customer_id"], m["change"]) for m in exits) == [("u03", "exited"), ("u04", "exited")]
    assert all(m["segment_name"] == "Older pro" for m in exits)
    assert len({m["event_id"] for m in announced}) == len(announced)  # never an entry's id again
    assert (await harness.client.delete(f"/v1/segments/{older}", headers=ADMIN)).status_code == 404


async def test_deleting_a_segment_while_a_backfill_chunk_writes_leaves_no_member_behind(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed(harness, 6)
    r = await harness.client.post(
        "/v1/segments",
        json={"name": "Pro", "definition": {"trait": "plan", "op": "equals", "value": "pro"}},
        headers=ADMIN,
    )
    sid = r.json()["id"]
    # The chunk has written its memberships and `entered` announcements, not yet committed.
    pause = Pause(monkeypatch, segment_store, "advance_backfill", after=True)
    backfill = asyncio.ensure_future(harness.segmenter.backfill.run_until_idle())
    try:
        await asyncio.wait_for(pause.reached.wait(), 10)
        # Reading the segment does not wait for the chunk.
        got = await asyncio.wait_for(harness.client.get(f"/v1/segments/{sid}", headers=ADMIN), 3)
        assert got.json()["status"] == "backfilling" and got.json()["member_count"] == 0
        deletion = asyncio.ensure_future(harness.client.delete(f"/v1/segments/{sid}", headers=ADMIN))
        await asyncio.wait({deletion}, timeout=1.0)
    finally:
        pause.release.set()
    await backfill
    assert (await deletion).status_code == 204

    async with harness.segmenter.platform.unit_of_work() as uow:
        left = await uow.session.execute(
            text("SELECT count(*) FROM memberships WHERE segment_id = :s"), {"s": sid}
        )
        assert left.scalar_one() == 0
    # Every entry the chunk announced is followed by its exit.
    changes = [(m["customer_id"], m["change"]) for m in await harness.memberships() if m["segment_id"] == sid]
    assert sorted(changes) == sorted(
        [(c, "entered") for c in ("u00", "u03")] + [(c, "exited") for c in ("u00", "u03")]
    )
    for c in ("u00", "u03"):  # one key, one partition: in order
        assert changes.index((c, "entered")) < changes.index((c, "exited"))


async def _members_of(h: Harness, sid: str) -> int:
    async with h.segmenter.platform.unit_of_work() as uow:
        rows = await uow.session.execute(
            text("SELECT count(*) FROM memberships WHERE segment_id = :s"), {"s": sid}
        )
        return int(rows.scalar_one())


def batch_paused_after(
    h: Harness, monkeypatch: pytest.MonkeyPatch, store_function: str, events: list[CustomerEvent]
) -> tuple[Pause, asyncio.Future[None]]:
    """An event batch in its own unit of work that stops right after `segment_store.<store_function>`
    until `pause.release` is set."""
    pause = Pause(monkeypatch, segment_store, store_function, after=True)
    return pause, asyncio.ensure_future(h.segmenter.events.handle_in_own_unit(events))


async def test_an_event_batch_that_read_the_segments_before_a_deletion_records_no_member_of_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    sid = await h.create_segment({"trait": "plan", "op": "equals", "value": "pro"}, name="Pro")
    # The batch has read the segment list (Pro still in it) and holds nothing on Pro yet.
    pause, unit = batch_paused_after(
        h,
        monkeypatch,
        "segment_versions",
        [make_event("m1", "identify", user_id="u1", traits={"plan": "pro"})],
    )
    try:
        await asyncio.wait_for(pause.reached.wait(), 10)
        deleted = await asyncio.wait_for(h.client.delete(f"/v1/segments/{sid}", headers=ADMIN), 5)
        assert deleted.status_code == 204
    finally:
        pause.release.set()
    await unit

    assert (await h.customer("u1"))["traits"]["plan"] == "pro"  # the event itself is not lost
    assert await _members_of(h, sid) == 0
    assert [m for m in await h.memberships() if m["segment_id"] == sid] == []


async def test_deleting_a_segment_while_an_event_batch_writes_its_member_announces_the_exit(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    sid = await h.create_segment({"trait": "plan", "op": "equals", "value": "pro"}, name="Pro")
    # The batch has written u1's membership and its announcement, not yet committed.
    pause, unit = batch_paused_after(
        h,
        monkeypatch,
        "apply_membership_changes",
        [make_event("m1", "identify", user_id="u1", traits={"plan": "pro"})],
    )
    try:
        await asyncio.wait_for(pause.reached.wait(), 10)
        deletion = asyncio.ensure_future(h.client.delete(f"/v1/segments/{sid}", headers=ADMIN))
        done, _ = await asyncio.wait({deletion}, timeout=1.0)
        assert not done  # it waits for the batch
    finally:
        pause.release.set()
    await unit
    assert (await deletion).status_code == 204

    assert await _members_of(h, sid) == 0
    changes = [(m["customer_id"], m["change"], m["cause"]) for m in await h.memberships()]
    assert changes == [("u1", "entered", "m1"), ("u1", "exited", "segment_deleted")]


async def test_deleting_a_segment_while_a_batch_has_written_its_timer_neither_deadlocks_nor_waits_long(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch has moved (customer, segment)'s due timer and not yet locked the segment to write
    the exit; a deletion in one transaction then waited for that timer row while the batch waited
    for the segment: a deadlock, which PostgreSQL broke by failing one of them (the deletion: 500)."""
    h = harness
    sid = await h.create_segment(
        {
            "and": [
                {"performed": "Signed In", "within": "7d"},
                {"trait": "plan", "op": "equals", "value": "pro"},
            ]
        },
        name="Active pro",
    )
    await h.send(
        make_event("m0", "identify", user_id="u1", traits={"plan": "pro"}),
        make_event("m1", user_id="u1", event="Signed In"),
    )
    await h.processed(2)
    later = START + timedelta(days=1)
    pause, unit = batch_paused_after(
        h,
        monkeypatch,
        "set_timers",
        [
            # Moves u1's timer (a later sign-in: a row lock) and takes u1 out (plan).
            make_event("m2", "identify", user_id="u1", traits={"plan": "free"}, timestamp=later),
            make_event("m3", user_id="u1", event="Signed In", timestamp=later),
        ],
    )
    try:
        await asyncio.wait_for(pause.reached.wait(), 10)
        deletion = asyncio.ensure_future(h.client.delete(f"/v1/segments/{sid}", headers=ADMIN))
        # Released before PostgreSQL's deadlock check (deadlock_timeout, 1 s) of a deletion waiting
        # for the timer row: in one transaction the deletion was the one it then failed.
        await asyncio.wait({deletion}, timeout=0.3)
    finally:
        pause.release.set()
    await unit
    assert (await deletion).status_code == 204
    assert await _members_of(h, sid) == 0
    changes = [(m["customer_id"], m["change"]) for m in await h.memberships() if m["segment_id"] == sid]
    assert changes == [("u1", "entered"), ("u1", "exited")]  # the exit announced once, by the deletion


async def test_a_deletion_left_half_done_is_finished_by_the_backfill_worker(harness: Harness) -> None:
    h = harness
    await seed(h, 4)
    sid = await h.create_segment({"trait": "plan", "op": "equals", "value": "pro"}, name="Pro")
    # A crash after the first step: the segment is hidden, its memberships are still there.
    async with h.segmenter.platform.unit_of_work() as uow:
        await segment_store.hide_segment(uow.session, sid, "Pro", START)
    assert (await h.client.get(f"/v1/segments/{sid}", headers=ADMIN)).status_code == 404
    assert await _members_of(h, sid) == 2
    assert await h.segmenter.backfill.run_once()
    assert await _members_of(h, sid) == 0
    exits = [m for m in await h.memberships() if m["segment_id"] == sid and m["change"] == "exited"]
    assert sorted(m["customer_id"] for m in exits) == ["u00", "u03"]
    assert all(m["cause"] == "segment_deleted" and m["segment_name"] == "Pro" for m in exits)
    assert not await h.segmenter.backfill.finish_deletion()


async def test_an_edit_in_flight_does_not_hold_up_real_time_membership_writes(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    sid = await h.create_segment({"trait": "plan", "op": "equals", "value": "pro"}, name="Pro")
    pause = Pause(monkeypatch, segment_store, "update_segment", after=True)
    edit = asyncio.ensure_future(
        h.client.put(
            f"/v1/segments/{sid}",
            json={"name": "Pro", "definition": {"trait": "plan", "op": "in", "values": ["pro", "max"]}},
            headers=ADMIN,
        )
    )
    try:
        await asyncio.wait_for(pause.reached.wait(), 10)
        await asyncio.wait_for(
            h.segmenter.events.handle_in_own_unit(
                [make_event("m1", "identify", user_id="u1", traits={"plan": "pro"})]
            ),
            5,
        )
    finally:
        pause.release.set()
    assert (await edit).status_code == 200
    assert await _members_of(h, sid) == 1


async def test_a_backfill_chunk_in_flight_does_not_hold_up_real_time_membership_writes(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    await seed(h, 3)
    r = await h.client.post(
        "/v1/segments",
        json={"name": "Pro", "definition": {"trait": "plan", "op": "equals", "value": "pro"}},
        headers=ADMIN,
    )
    sid = r.json()["id"]
    pause = Pause(monkeypatch, segment_store, "advance_backfill", after=True)
    backfill = asyncio.ensure_future(h.segmenter.backfill.run_until_idle())
    try:
        await asyncio.wait_for(pause.reached.wait(), 10)
        # u01 becomes pro while the chunk (which saw u01 as free) holds the segment.
        await asyncio.wait_for(
            h.segmenter.events.handle_in_own_unit(
                [make_event("m1", "identify", user_id="u01", traits={"plan": "pro"})]
            ),
            5,
        )
    finally:
        pause.release.set()
    await backfill
    members = (await h.client.get(f"/v1/segments/{sid}/members", headers=ADMIN)).json()["members"]
    assert members == ["u00", "u01"]


async def bad(
    h: Harness, body: dict[str, Any], method: str = "post", path: str = "/v1/segments"
) -> dict[str, Any]:
    r = await h.client.request(method.upper(), path, json=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    out: dict[str, Any] = r.json()
    return out


async def test_invalid_definitions_get_a_clear_400_naming_the_node(harness: Harness) -> None:
    body = await bad(
        harness,
        {
            "name": "x",
            "definition": {
                "and": [
                    {"trait": "plan", "op": "equals", "value": "pro"},
                    {"trait": "age", "op": "gt", "value": "old"},
                ]
            },
        },
    )
    assert body["error"] == "invalid_definition"
    assert body["errors"] == [
        {"field": "definition.and[1].value", "rule": "number", "message": "`gt` needs a number"}
    ]
    body = await bad(harness, {"name": "x", "definition": {"or": [{"performed": "X", "within": "a while"}]}})
    assert body["errors"][0]["field"] == "definition.or[0].within"
    body = await bad(harness, {"name": "x", "definition": {"member_of": "seg_nope"}})
    assert body["errors"] == [
        {"field": "definition.member_of", "rule": "unknown_segment", "message": "no segment 'seg_nope'"}
    ]
    body = await bad(harness, {"name": "x", "definition": {"wat": 1}})
    assert body["errors"][0]["field"] == "definition" and body["errors"][0]["rule"] == "unknown_rule"
    body = await bad(harness, {"name": "", "definition": {"trait": "a", "op": "exists"}})
    assert body["errors"][0]["field"] == "name"
    body = await bad(harness, {"definition": {"trait": "a", "op": "nope"}}, path="/v1/segments/preview")
    assert body["errors"][0]["field"] == "definition.op"
    # A cycle through member_of is refused.
    a = (
        await harness.client.post(
            "/v1/segments", json={"name": "a", "definition": {"trait": "a", "op": "exists"}}, headers=ADMIN
        )
    ).json()["id"]
    b = (
        await harness.client.post(
            "/v1/segments", json={"name": "b", "definition": {"member_of": a}}, headers=ADMIN
        )
    ).json()["id"]
    body = await bad(harness, {"name": "a", "definition": {"member_of": b}}, "put", f"/v1/segments/{a}")
    assert body["errors"] == [
        {"field": "definition.member_of", "rule": "cycle", "message": f"{a} -> {b} -> {a}"}
    ]
    assert (await harness.client.get("/v1/segments", headers=ADMIN)).json()["segments"][0]["version"] == 1
    # And without the admin token nothing is readable.
    assert (await harness.client.get("/v1/segments")).status_code == 401
    assert (
        await harness.client.get("/v1/customers/u1", headers={"Authorization": "Bearer wrong"})
    ).status_code == 401
    assert (await harness.client.get("/v1/customers/nobody", headers=ADMIN)).status_code == 404


async def test_hostile_input_is_a_400_naming_the_field_and_changes_nothing(harness: Harness) -> None:
    """Found by fuzzing the OpenAPI document: text PostgreSQL cannot store, a cursor past 64 bits."""
    await seed(harness, 2)
    body = await bad(harness, {"name": "Pro\x00", "definition": {"trait": "plan", "op": "exists"}})
    assert [(e["field"], e["rule"]) for e in body["errors"]] == [("body.name", "no_nul_character")]
    body = await bad(harness, {"name": "Pro", "definition": {"trait": "pl\x00an", "op": "exists"}})
    assert [(e["field"], e["rule"]) for e in body["errors"]] == [
        ("body.definition.trait", "no_nul_character")
    ]
    listed = await harness.client.get("/v1/segments", headers=ADMIN)
    assert listed.json()["segments"] == []

    for path, field in [
        ("/v1/customers/u00%00", "path"),
        ("/v1/segments/x/members?after=a%00", "query.after"),
    ]:
        r = await harness.client.get(path, headers=ADMIN)
        assert r.status_code == 400, (path, r.text)
        assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [(field, "no_nul_character")]
    huge = "/v1/customers/u00/events?before=99999999999999999999999-1"
    r = await harness.client.get(huge, headers=ADMIN)
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "before", r.text
    r = await harness.client.get("/v1/customers/u00/events?before=1-99999999999999999999999", headers=ADMIN)
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "before", r.text


EXTREME_DATES = [
    ({"trait": "d", "op": "before", "value": "9999-12-31T23:59:59-01:00"}, "definition.value"),
    ({"trait": "d", "op": "after", "value": "0001-01-01T00:00:00+01:00"}, "definition.value"),
    (
        {"performed": "Order Completed", "between": {"from": "0001-01-01T00:00:00+01:00"}},
        "definition.between.from",
    ),
    (
        {"performed": "Order Completed", "between": {"to": "9999-12-31T23:59:59-01:00"}},
        "definition.between.to",
    ),
    (
        {"last_performed": "Order Completed", "op": "after", "value": "0001-01-01T00:00:00+01:00"},
        "definition.value",
    ),
    (
        {
            "or": [
                {"trait": "plan", "op": "exists"},
                {
                    "performed": "Order Completed",
                    "where": [{"property": "at", "op": "before", "value": "9999-12-31T23:59:59-01:00"}],
                },
            ]
        },
        "definition.or[1].where[0].value",
    ),
]


@pytest.mark.parametrize(("definition", "field"), EXTREME_DATES)
async def test_a_date_of_year_10000_or_0_in_utc_is_a_400_naming_it_not_a_500(
    harness: Harness, definition: dict[str, Any], field: str
) -> None:
    """In UTC these are year 10000 or year 0: accepted, PostgreSQL refused them as parameters, so
    preview answered 500 and every back-fill chunk of the segment failed."""
    await harness.send(make_event("m1", "track", user_id="u1", event="Order Completed"))
    await harness.processed(1)
    expected = [{"field": field, "rule": "range", "message": "must be from 0001-01-01 to 9999-12-31 in UTC"}]
    body = await bad(harness, {"definition": definition}, path="/v1/segments/preview")
    assert body["error"] == "invalid_definition" and body["errors"] == expected
    body = await bad(harness, {"name": "x", "definition": definition})
    assert body["errors"] == expected
    assert (await harness.client.get("/v1/segments", headers=ADMIN)).json()["segments"] == []


def failures(outcome: str) -> float:
    return REGISTRY.get_sample_value("clm_segmenter_backfill_failures_total", {"outcome": outcome}) or 0.0


async def test_a_segment_whose_backfill_keeps_failing_is_failed_and_holds_up_no_other(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Back-fill claims the oldest edit first: a segment whose chunk always failed was claimed first on
    every pass, and no other segment was ever back-filled. Now each failure sends it behind the
    others, to be retried a minute later, and after `backfill_max_failures` (3) it is `failed`, with
    the error, until saved again."""
    await seed(harness, 6)
    everyone = {"trait": "plan", "op": "exists"}
    r = await harness.client.post(
        "/v1/segments", json={"name": "Stuck", "definition": everyone}, headers=ADMIN
    )
    stuck = r.json()["id"]
    # Its memberships cannot be written: every chunk of it fails in the database, like a rule PostgreSQL
    # cannot run would.
    async with harness.segmenter.platform.engine.begin() as conn:
        await conn.execute(
            text(f"ALTER TABLE memberships ADD CONSTRAINT refuse_stuck CHECK (segment_id <> '{stuck}')")
        )
    harness.clock.advance(timedelta(seconds=1))  # edited later: claimed after it
    r = await harness.client.post(
        "/v1/segments",
        json={"name": "Pro", "definition": {"trait": "plan", "op": "equals", "value": "pro"}},
        headers=ADMIN,
    )
    pro = r.json()["id"]
    retried, failed = failures("retried"), failures("failed")

    assert await harness.segmenter.backfill.run_once()  # the stuck one's chunk fails: counted, not raised
    view = (await harness.client.get(f"/v1/segments/{stuck}", headers=ADMIN)).json()
    assert view["status"] == "backfilling" and view["backfill"]["failures"] == 1
    assert view["backfill"]["failed_at"] == harness.clock.now().isoformat().replace("+00:00", "Z")
    assert view["backfill"]["error"] == (
        'CheckViolationError: new row for relation "memberships" violates check constraint "refuse_stuck"'
    )
    await harness.segmenter.backfill.run_until_idle()  # the other one, then nothing until the retry
    done = (await harness.client.get(f"/v1/segments/{pro}", headers=ADMIN)).json()
    assert done["status"] == "ready" and done["member_count"] == 2 and done["backfill"]["failures"] == 0
    for _ in range(2):  # retried a minute (backfill_retry_after_s) after each failure
        harness.clock.advance(timedelta(seconds=59))
        assert not await harness.segmenter.backfill.run_once()
        harness.clock.advance(timedelta(seconds=1))
        assert await harness.segmenter.backfill.run_once()
    view = (await harness.client.get(f"/v1/segments/{stuck}", headers=ADMIN)).json()
    assert view["status"] == "failed" and view["member_count"] == 0
    assert view["backfill"]["failures"] == 3 and view["backfill"]["processed"] == 0
    assert view["backfill"]["progress"] == 0.0 and "refuse_stuck" in view["backfill"]["error"]
    assert (failures("retried") - retried, failures("failed") - failed) == (2, 1)
    logged = [
        (r.levelno, r.getMessage(), getattr(r, "segment_id", None), getattr(r, "failures", None))
        for r in caplog.records
        if r.name == "services.segmenter.schedules"
    ]
    retry = "segment back-fill chunk failed; retried later, behind the other segments"
    assert logged == [
        (logging.WARNING, retry, stuck, 1),
        (logging.WARNING, retry, stuck, 2),
        (logging.ERROR, "segment back-fill failed; stopped until retried or saved again", stuck, 3),
    ]
    harness.clock.advance(timedelta(hours=1))
    assert not await harness.segmenter.backfill.run_once()  # no longer claimed

    # Saved again once the cause is gone: a new pass, from no failure.
    async with harness.segmenter.platform.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE memberships DROP CONSTRAINT refuse_stuck"))
    r = await harness.client.put(
        f"/v1/segments/{stuck}", json={"name": "Stuck", "definition": everyone}, headers=ADMIN
    )
    assert r.json()["status"] == "backfilling" and r.json()["backfill"]["failures"] == 0
    assert r.json()["backfill"]["error"] is None and r.json()["backfill"]["failed_at"] is None
    await harness.segmenter.backfill.run_until_idle()
    view = (await harness.client.get(f"/v1/segments/{stuck}", headers=ADMIN)).json()
    assert view["status"] == "ready" and view["member_count"] == 6


async def test_a_segment_stored_with_a_definition_now_refused_is_failed_at_once_not_ready(
    harness: Harness,
) -> None:
    """A year-10000 date was accepted before 2026-12-07: such a stored definition is invalid now. Real
    time leaves it out; its back-fill is `failed` with what is wrong instead of `ready` with no member,
    and the other segments are back-filled."""
    await seed(harness, 3)
    stored = {"trait": "d", "op": "before", "value": "9999-12-31T23:59:59-01:00"}
    async with harness.segmenter.platform.unit_of_work() as uow:
        await segment_store.insert_segment(uow.session, "seg_old", "Old", "", stored, START)
    pro = await harness.create_segment({"trait": "plan", "op": "equals", "value": "pro"}, name="Pro")
    old = (await harness.client.get("/v1/segments/seg_old", headers=ADMIN)).json()
    assert old["status"] == "failed" and old["backfill"]["failures"] == 1
    assert old["backfill"]["error"] == (
        "InvalidRule: definition.value: must be from 0001-01-01 to 9999-12-31 in UTC"
    )
    assert (await harness.client.get(f"/v1/segments/{pro}", headers=ADMIN)).json()["status"] == "ready"


async def test_an_unknown_or_cyclic_member_of_is_named_by_its_node(harness: Harness) -> None:
    """Every other error names its node; these named only `definition`, however deep the node was."""
    body = await bad(
        harness,
        {"name": "s", "definition": {"and": [{"trait": "plan", "op": "exists"}, {"member_of": "seg_nope"}]}},
    )
    assert body["errors"] == [
        {
            "field": "definition.and[1].member_of",
            "rule": "unknown_segment",
            "message": "no segment 'seg_nope'",
        }
    ]
    pro = await harness.create_segment({"trait": "plan", "op": "equals", "value": "pro"}, name="Pro")
    nested = {
        "or": [
            {"not": {"member_of": "seg_gone"}},
            {"member_of": pro},
            {"and": [{"trait": "a", "op": "exists"}, {"member_of": "seg_gone"}]},
        ]
    }
    body = await bad(harness, {"definition": nested}, path="/v1/segments/preview")
    assert [(e["field"], e["rule"]) for e in body["errors"]] == [
        ("definition.or[0].not.member_of", "unknown_segment"),
        ("definition.or[2].and[1].member_of", "unknown_segment"),
    ]
    # A cycle: the nodes that close it, each with the cycle it closes.
    vip = await harness.create_segment({"and": [{"member_of": pro}, {"trait": "vip", "op": "exists"}]}, "Vip")
    top = await harness.create_segment({"member_of": vip}, name="Top")
    body = await bad(
        harness,
        {
            "name": "Pro",
            "definition": {
                "or": [
                    {"trait": "plan", "op": "equals", "value": "pro"},
                    {"not": {"member_of": top}},
                    {"member_of": pro},
                ]
            },
        },
        "put",
        f"/v1/segments/{pro}",
    )
    assert body["errors"] == [
        {
            "field": "definition.or[1].not.member_of",
            "rule": "cycle",
            "message": f"{pro} -> {top} -> {vip} -> {pro}",
        },
        {"field": "definition.or[2].member_of", "rule": "cycle", "message": f"{pro} -> {pro}"},
    ]
    assert (await harness.client.get(f"/v1/segments/{pro}", headers=ADMIN)).json()["version"] == 1

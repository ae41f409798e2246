"""Runs that enrol a segment's members (a broadcast, `enrol_current`): only while the journey is still
one, only for members on the segment's entering side, and never a member entered since the run began."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import text

from tests.journey_engine.harness import ADMIN, START, Harness, engine_running

RUN_AT = START + timedelta(hours=1)
SEND = [
    {"id": "start", "type": "entry"},
    {"id": "hi", "type": "send", "channel": "email", "template_id": "hi"},
    {"id": "done", "type": "exit"},
]
EDGES = [{"from": "start", "to": "hi"}, {"from": "hi", "to": "done"}]


def weekly(segment_id: str) -> dict[str, Any]:
    return {
        "name": "Weekly",
        "entry": {"type": "schedule", "segment_id": segment_id, "at": RUN_AT.isoformat(), "every": "P7D"},
        "nodes": SEND,
        "edges": EDGES,
    }


def on_segment(segment_id: str, **entry: Any) -> dict[str, Any]:
    return {
        "name": "On segment",
        "entry": {"type": "segment", "segment_id": segment_id} | entry,
        "reentry": {"policy": "always"},
        "nodes": SEND,
        "edges": EDGES,
    }


async def edit(h: Harness, journey_id: str, definition: dict[str, Any]) -> dict[str, Any]:
    r = await h.client.put(f"/v1/journeys/{journey_id}", json={"definition": definition}, headers=ADMIN)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def run_progress(h: Harness, journey_id: str) -> tuple[Any, Any, Any]:
    [row] = await h.rows(
        "SELECT next_run_at, broadcast_run_at, broadcast_cursor FROM journeys WHERE id = :j", j=journey_id
    )
    return row[0], row[1], row[2]


async def test_a_broadcast_edited_into_a_segment_triggered_journey_does_not_send_its_pending_run(
    make_settings: Any,
) -> None:
    async with engine_running(make_settings) as h:
        jid = await h.journey(weekly("subs"))
        await h.membership("c1", "subs")
        # The newsletter becomes a welcome for NEW subscribers only: c1 was one already.
        body = await edit(h, jid, on_segment("subs", enrol_current=False))
        assert body["next_run_at"] is None
        await h.advance(timedelta(hours=2))
        assert await h.instances(jid) == []
        await h.membership("c2", "subs")  # a new subscriber is welcomed
        assert [(r.customer_id, r.status) for r in await h.instances(jid)] == [("c2", "exited")]
        assert [m["customer_id"] for m in await h.requests(until=lambda m: len(m) >= 1)] == ["c2"]


async def test_a_broadcast_edited_into_a_segment_journey_mid_run_sends_the_rest_nothing(
    make_settings: Any,
) -> None:
    async with engine_running(make_settings, broadcast_chunk_size=1) as h:
        jid = await h.journey(weekly("subs"))
        await h.membership("a1", "subs")
        await h.membership("b2", "subs")
        h.clock.advance(timedelta(hours=1))
        assert await h.engine._broadcast_chunk(jid) == (1, True)  # a1 done, b2 left
        # Even a segment journey that enrols current members: that happens on activation, not now.
        body = await edit(h, jid, on_segment("subs", enrol_current=True))
        assert body["next_run_at"] is None
        assert await run_progress(h, jid) == (None, None, None)  # the run's progress is forgotten too
        await h.advance(timedelta(days=8))
        assert [r.customer_id for r in await h.instances(jid)] == ["a1"]


async def test_a_pending_enrolment_of_current_members_runs_only_while_the_definition_asks_for_it(
    make_settings: Any,
) -> None:
    async with engine_running(make_settings) as h:
        await h.membership("vip1", "vip")
        kept = await h.journey(on_segment("vip", enrol_current=True))
        dropped = await h.journey(on_segment("vip", enrol_current=True))
        # Edited before the timer loop got to the enrolment: kept while the new version still asks.
        body = await edit(h, kept, on_segment("vip", enrol_current=True) | {"name": "Renamed"})
        assert body["next_run_at"] == START.isoformat()
        body = await edit(h, dropped, on_segment("vip", enrol_current=False))
        assert body["next_run_at"] is None
        await h.fire_due()
        assert [r.customer_id for r in await h.instances(kept)] == ["vip1"]
        assert await h.instances(dropped) == []


async def test_enrol_current_on_a_segment_exit_is_refused(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        winback = on_segment("vip", change="exited", enrol_current=True)
        r = await h.client.post("/v1/journeys", json={"definition": winback}, headers=ADMIN)
        assert r.status_code == 400, r.text
        assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [
            ("definition.entry.segment.enrol_current", "enrol_current_exited")
        ]
        assert (await h.client.get("/v1/journeys", headers=ADMIN)).json()["journeys"] == []
        # An edit into one is refused too, and changes nothing.
        jid = await h.journey(on_segment("vip", change="exited"))
        r = await h.client.put(f"/v1/journeys/{jid}", json={"definition": winback}, headers=ADMIN)
        assert r.status_code == 400, r.text
        assert (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()["version"] == 1


async def test_a_stored_journey_on_a_segment_exit_with_enrol_current_enrols_no_current_member(
    make_settings: Any,
) -> None:
    async with engine_running(make_settings) as h:
        await h.membership("vip1", "vip")
        jid = await h.journey(on_segment("vip", change="exited"), activate=False)
        # Saved before the rule: the engine reads it, and does not enrol the segment's members.
        stored = on_segment("vip", change="exited", enrol_current=True)
        async with h.platform.engine.begin() as conn:
            await conn.execute(
                text("UPDATE journey_versions SET definition = CAST(:d AS jsonb) WHERE journey_id = :j"),
                {"d": orjson.dumps(stored).decode(), "j": jid},
            )
        r = await h.client.post(f"/v1/journeys/{jid}/activate", headers=ADMIN)
        assert r.status_code == 200, r.text
        await h.fire_due()
        assert await h.instances(jid) == []
        assert (await run_progress(h, jid))[0] is None
        await h.membership("vip1", "vip", "exited")  # the win-back is for those who leave
        assert [r.customer_id for r in await h.instances(jid)] == ["vip1"]


async def test_a_member_who_entered_after_activation_is_not_entered_again_by_the_enrolment(
    make_settings: Any,
) -> None:
    async with engine_running(make_settings) as h:
        await h.membership("early", "vip")
        jid = await h.journey(on_segment("vip", enrol_current=True))  # its enrolment is due now
        await h.membership("c1", "vip")  # a moment later, before the timer loop's pass
        assert [r.customer_id for r in await h.instances(jid)] == ["c1"]
        await h.fire_due()
        assert [r.customer_id for r in await h.instances(jid)] == ["c1", "early"]
        requests = await h.requests(until=lambda m: len(m) >= 2)
        assert sorted(m["customer_id"] for m in requests) == ["c1", "early"]


async def test_a_profile_merged_during_a_run_is_not_sent_the_broadcast_twice(make_settings: Any) -> None:
    async with engine_running(make_settings, broadcast_chunk_size=1) as h:
        jid = await h.journey(weekly("subs"))  # a recurring broadcast: re-entry `always`
        await h.membership("a_old", "subs")
        await h.membership("z_new", "subs")
        h.clock.advance(timedelta(hours=1))
        assert await h.engine._broadcast_chunk(jid) == (1, True)  # a_old entered
        await h.profile(
            "z_new",
            {},
            kind="identity_merged",
            merged_ids=["a_old"],
            identities={"user_id": ["z_new", "a_old"]},
        )
        while (await h.engine._broadcast_chunk(jid))[1]:
            pass
        requests = await h.requests(idle=1.0)
        assert len(requests) == 1, requests
        assert [r.customer_id for r in await h.instances(jid)] == ["z_new"]  # a_old's, moved to z_new
        # The next week's run reaches the person once again.
        await h.advance(timedelta(days=7))
        assert len(await h.requests(until=lambda m: len(m) >= 2)) == 2

"""Broadcasts to a segment (`schedule`, `enrol_current`): bounded chunks, resumable, isolated per journey."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.journey_engine.execution import engine as engine_module
from services.journey_engine.store import projection
from tests.journey_engine.harness import ADMIN, START, Harness, engine_running

RUN_AT = START + timedelta(hours=1)


def broadcast(segment_id: str, **extra: Any) -> dict[str, Any]:
    """A weekly broadcast whose members leave at once (so only the run's bookkeeping stops a re-entry)."""
    return {
        "name": "Weekly",
        "entry": {"type": "schedule", "segment_id": segment_id, "at": RUN_AT.isoformat(), "every": "P7D"},
        "reentry": {"policy": "always"},
        "nodes": [{"id": "start", "type": "entry"}, {"id": "done", "type": "exit"}],
        "edges": [{"from": "start", "to": "done"}],
    } | extra


async def add_members(h: Harness, segment_id: str, n: int) -> None:
    """Members as the engine's projection knows them (written directly: n membership events would be slow)."""
    async with h.platform.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO segment_members (segment_id, customer_id) "
                "SELECT :s, 'm' || lpad(g::text, 5, '0') FROM generate_series(1, :n) AS g"
            ),
            {"s": segment_id, "n": n},
        )


async def entered(h: Harness, journey_id: str) -> list[tuple[str, int]]:
    """(customer, instances) for every customer who entered."""
    rows = await h.rows(
        "SELECT customer_id, count(*) FROM instances WHERE journey_id = :j GROUP BY 1 ORDER BY 1",
        j=journey_id,
    )
    return [(r[0], r[1]) for r in rows]


def failures(journey_id: str) -> float:
    return float(engine_module.BROADCAST_FAILURES.labels(journey_id)._value.get())


def watch_locks(monkeypatch: pytest.MonkeyPatch, fail_on_call: int | None = None) -> list[int]:
    """Record the advisory locks a broadcast transaction holds after locking its customers (and fail
    the `fail_on_call`-th time, as a crash mid-way would)."""
    held: list[int] = []
    original: Callable[..., Any] = projection.lock_customers

    async def lock_customers(session: AsyncSession, customer_ids: list[str]) -> None:
        await original(session, customer_ids)
        if fail_on_call is not None and len(held) + 1 == fail_on_call:
            held.append(-1)
            raise RuntimeError("the database went away")
        held.append(
            await session.scalar(
                # Exclusive: the customers' (the erasure gate, held shared, is one lock whatever the size).
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ExclusiveLock' "
                    "AND pid = pg_backend_pid()"
                )
            )
        )

    monkeypatch.setattr(projection, "lock_customers", lock_customers)
    return held


async def test_a_large_segment_is_enrolled_holding_one_chunk_of_locks_at_a_time(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each transaction holds at most a chunk's customer locks (one lock per member of the whole
    segment in one transaction ran PostgreSQL's shared lock table out of memory), and the next run
    is scheduled only once the last chunk is done."""
    async with engine_running(make_settings, broadcast_chunk_size=100) as h:
        await add_members(h, "everyone", 1050)
        jid = await h.journey(broadcast("everyone"))
        held = watch_locks(monkeypatch)
        h.clock.set(RUN_AT)
        await h.fire_due()
        assert held and max(held) <= 100
        assert len(held) == 11
        assert [n for _, n in await entered(h, jid)] == [1] * 1050
        body = (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()
        assert body["next_run_at"].startswith((RUN_AT + timedelta(days=7)).isoformat()[:16])
        assert await h.scalar("SELECT broadcast_cursor FROM journeys WHERE id = :j", j=jid) is None
        # The next week's run reaches everyone again (the policy is `always`).
        h.clock.set(RUN_AT + timedelta(days=7))
        await h.fire_due()
        assert [n for _, n in await entered(h, jid)] == [2] * 1050


async def test_a_broadcast_that_fails_mid_way_resumes_without_entering_anyone_twice(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine_running(make_settings, broadcast_chunk_size=100, broadcast_retry_s=60) as h:
        await add_members(h, "everyone", 350)
        jid = await h.journey(broadcast("everyone"))
        before = failures(jid)
        watch_locks(monkeypatch, fail_on_call=3)
        h.clock.set(RUN_AT)
        await h.fire_due()
        # Two chunks committed, the third rolled back; the run is not over, so not rescheduled.
        assert len(await entered(h, jid)) == 200
        assert failures(jid) == before + 1
        body = (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()
        assert body["next_run_at"].startswith(RUN_AT.isoformat()[:16])
        # Waiting out the failure: nothing is retried before `broadcast_retry_s`.
        h.clock.advance(timedelta(seconds=30))
        await h.fire_due()
        assert len(await entered(h, jid)) == 200
        h.clock.advance(timedelta(seconds=31))
        await h.fire_due()
        assert [n for _, n in await entered(h, jid)] == [1] * 350
        body = (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()
        assert body["next_run_at"].startswith((RUN_AT + timedelta(days=7)).isoformat()[:16])


async def test_a_failing_broadcast_does_not_hold_up_the_others(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine_running(make_settings) as h:
        await add_members(h, "everyone", 5)
        broken = await h.journey(broadcast("everyone"), journey_id="a-broken")
        fine = await h.journey(broadcast("everyone"), journey_id="b-fine")
        original = engine_module.JourneyEngine._enrol_members

        async def enrol(self: Any, uow: Any, journey: Any, *args: Any) -> int:
            if journey.row.id == broken:
                raise RuntimeError("boom")
            return await original(self, uow, journey, *args)

        monkeypatch.setattr(engine_module.JourneyEngine, "_enrol_members", enrol)
        before = failures(broken)
        h.clock.set(RUN_AT)
        await h.fire_due()
        assert len(await entered(h, fine)) == 5
        assert await entered(h, broken) == []
        assert failures(broken) == before + 1
        monkeypatch.setattr(engine_module.JourneyEngine, "_enrol_members", original)
        await h.advance(timedelta(minutes=2))
        assert len(await entered(h, broken)) == 5


async def test_a_schedule_too_far_apart_is_refused(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        for entry, field in (
            ({"every": "P9999999D"}, "every"),
            ({"at": "9999-12-31T00:00:00Z"}, "at"),
        ):
            definition = broadcast("everyone")
            definition["entry"] |= entry
            r = await h.client.post("/v1/journeys", json={"definition": definition}, headers=ADMIN)
            assert r.status_code == 400, r.text
            assert any(
                e["field"].startswith("definition.entry.schedule") and field in e["field"] + e["message"]
                for e in r.json()["errors"]
            ), r.text


def test_next_run_skips_missed_runs_and_never_overflows() -> None:
    from services.journey_engine.domain.timing import next_run

    at = datetime(2026, 1, 6, tzinfo=UTC)
    week = timedelta(days=7)
    assert next_run(at, week, at) == at + week
    assert next_run(at, week, at + timedelta(days=20)) == at + 3 * week
    assert next_run(at, None, at) is None
    assert next_run(datetime(2999, 12, 1, tzinfo=UTC), week * 10, at) is None
    assert next_run(at, timedelta(days=999_999_999), at) is None


async def test_a_recurring_broadcast_reaches_its_members_every_run_unless_told_otherwise(
    make_settings: Any,
) -> None:
    """Without `reentry`, a recurring broadcast re-enters its members each run (the usual `once`
    reached each member only the first week, silently); an explicit `once` is kept, with a warning."""
    async with engine_running(make_settings) as h:
        await add_members(h, "everyone", 3)
        default = broadcast("everyone")
        del default["reentry"]
        r = await h.client.post("/v1/journeys", headers=ADMIN, json={"id": "weekly", "definition": default})
        assert r.status_code == 201 and r.json()["warnings"] == []
        assert r.json()["definition"]["reentry"]["policy"] == "always"
        await h.client.post("/v1/journeys/weekly/activate", headers=ADMIN)

        once = broadcast("everyone", reentry={"policy": "once"})
        r = await h.client.post("/v1/journeys", headers=ADMIN, json={"id": "weekly-once", "definition": once})
        assert r.status_code == 201
        [warning] = r.json()["warnings"]
        assert (warning["field"], warning["rule"]) == ("definition.reentry", "recurring_once")
        r = await h.client.put("/v1/journeys/weekly-once", headers=ADMIN, json={"definition": once})
        assert [w["rule"] for w in r.json()["warnings"]] == ["recurring_once"]
        await h.client.post("/v1/journeys/weekly-once/activate", headers=ADMIN)

        for week in range(2):
            h.clock.set(RUN_AT + timedelta(days=7 * week))
            await h.fire_due()
        assert [n for _, n in await entered(h, "weekly")] == [2, 2, 2]
        assert [n for _, n in await entered(h, "weekly-once")] == [1, 1, 1]
        # A one-off broadcast keeps the usual default.
        one_off = broadcast("everyone")
        del one_off["reentry"], one_off["entry"]["every"]
        r = await h.client.post("/v1/journeys", headers=ADMIN, json={"definition": one_off})
        assert r.json()["definition"]["reentry"]["policy"] == "once" and r.json()["warnings"] == []


def one_off(at: datetime, **extra: Any) -> dict[str, Any]:
    definition = broadcast("everyone", **extra)
    definition["entry"] = {"type": "schedule", "segment_id": "everyone", "at": at.isoformat()}
    definition["reentry"] = {"policy": "once"}
    return definition


async def put(h: Harness, journey_id: str, definition: dict[str, Any]) -> httpx.Response:
    return await h.client.put(f"/v1/journeys/{journey_id}", json={"definition": definition}, headers=ADMIN)


async def next_run_at(h: Harness, journey_id: str) -> str | None:
    body = (await h.client.get(f"/v1/journeys/{journey_id}", headers=ADMIN)).json()
    value = body["next_run_at"]
    return value if value is None else datetime.fromisoformat(value).isoformat()


async def test_a_paused_broadcast_moved_to_another_time_runs_then(make_settings: Any) -> None:
    """Paused, moved a week later, resumed: it went out at its old time all the same (an edit set the
    run only while active, a resume never)."""
    later = RUN_AT + timedelta(days=7)
    async with engine_running(make_settings) as h:
        await add_members(h, "everyone", 3)
        jid = await h.journey(one_off(RUN_AT))
        assert (await h.client.post(f"/v1/journeys/{jid}/pause", headers=ADMIN)).status_code == 200
        r = await put(h, jid, one_off(later))
        assert r.status_code == 200, r.text
        assert await next_run_at(h, jid) == later.isoformat()
        r = await h.client.post(f"/v1/journeys/{jid}/activate", headers=ADMIN)
        assert r.status_code == 200 and r.json()["status"] == "active"
        assert await next_run_at(h, jid) == later.isoformat()
        await h.advance(timedelta(hours=2))  # its old time passes
        assert await entered(h, jid) == []
        h.clock.set(later)
        await h.fire_due()
        assert [n for _, n in await entered(h, jid)] == [1, 1, 1]
        assert await next_run_at(h, jid) is None


async def test_a_one_off_whose_time_passed_while_paused_is_not_sent_late_at_once(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        await add_members(h, "everyone", 3)
        jid = await h.journey(one_off(RUN_AT))
        await h.client.post(f"/v1/journeys/{jid}/pause", headers=ADMIN)
        h.clock.set(RUN_AT + timedelta(days=1))
        r = await h.client.post(f"/v1/journeys/{jid}/activate", headers=ADMIN)
        assert r.status_code == 409, r.text
        [error] = r.json()["errors"]
        assert (error["field"], error["rule"]) == ("definition.entry.at", "schedule_passed")
        assert RUN_AT.isoformat() in error["message"] and "archive" in error["message"]
        # Nor moved to another time that has passed (nothing is saved)...
        r = await put(h, jid, one_off(RUN_AT + timedelta(hours=12)))
        assert r.status_code == 409 and r.json()["errors"][0]["rule"] == "schedule_passed", r.text
        body = (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()
        assert (body["status"], body["versions"]) == ("paused", [1])
        await h.fire_due()
        assert await entered(h, jid) == []
        # ...while an edit of something else keeps it as it is, and a time ahead sends it then.
        r = await put(h, jid, one_off(RUN_AT, name="Launch (final)"))
        assert r.status_code == 200 and await next_run_at(h, jid) == RUN_AT.isoformat()
        soon = h.clock.now() + timedelta(minutes=5)
        assert (await put(h, jid, one_off(soon))).status_code == 200
        assert (await h.client.post(f"/v1/journeys/{jid}/activate", headers=ADMIN)).status_code == 200
        await h.fire_due()
        assert await entered(h, jid) == []
        await h.advance(timedelta(minutes=5))
        assert [n for _, n in await entered(h, jid)] == [1, 1, 1]


async def test_a_draft_one_off_whose_time_passed_is_refused_on_activation(make_settings: Any) -> None:
    """Activated after its time, a draft one-off went out at once, late (a paused one was refused
    already). Now refused the same way, nothing changed, one due this instant too (as on resume and
    edit); a time ahead is sent then, and a recurring schedule begun already goes out at once."""
    async with engine_running(make_settings) as h:
        await add_members(h, "everyone", 3)
        jid = await h.journey(one_off(RUN_AT), activate=False)
        h.clock.set(RUN_AT + timedelta(hours=1))
        r = await h.client.post(f"/v1/journeys/{jid}/activate", headers=ADMIN)
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "schedule_passed"
        [error] = r.json()["errors"]
        assert (error["field"], error["rule"]) == ("definition.entry.at", "schedule_passed")
        assert RUN_AT.isoformat() in error["message"]
        body = (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()
        assert (body["status"], body["next_run_at"], body["versions"]) == ("draft", None, [1])
        await h.fire_due()
        assert await entered(h, jid) == []
        # A draft may still be edited to a time ahead, then activated: sent then, not before.
        soon = h.clock.now() + timedelta(minutes=5)
        assert (await put(h, jid, one_off(soon))).status_code == 200
        r = await h.client.post(f"/v1/journeys/{jid}/activate", headers=ADMIN)
        assert r.status_code == 200 and r.json()["next_run_at"] is not None, r.text
        await h.fire_due()
        assert await entered(h, jid) == []
        await h.advance(timedelta(minutes=5))
        assert [n for _, n in await entered(h, jid)] == [1, 1, 1]

        # Due this very instant: passed, as on resume and edit.
        now_id = await h.journey(one_off(h.clock.now()), activate=False)
        r = await h.client.post(f"/v1/journeys/{now_id}/activate", headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"] == "schedule_passed", r.text
        await h.fire_due()
        assert await entered(h, now_id) == []
        # With `local_time`, `at` is what has passed (when the run enrols), though each member's
        # 23:00 is still ahead; refused as on resume, the message saying what it is (it said the
        # broadcast would go out at once, late, which was not so).
        local = one_off(h.clock.now() - timedelta(minutes=1))
        local["entry"]["local_time"] = "23:00"
        local_id = await h.journey(local, activate=False)
        r = await h.client.post(f"/v1/journeys/{local_id}/activate", headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"] == "schedule_passed", r.text
        assert "which has passed, and has not gone out" in r.json()["message"]
        assert "late" not in r.json()["message"]
        # A recurring schedule whose first `at` has passed is not refused (it has runs ahead).
        weekly = await h.journey(broadcast("everyone"), activate=False)
        assert (await h.client.post(f"/v1/journeys/{weekly}/activate", headers=ADMIN)).status_code == 200


async def test_a_recurring_broadcast_resumes_on_its_definitions_schedule(make_settings: Any) -> None:
    """Runs missed while paused are skipped (as while the engine is down); an edit while paused moves
    the schedule to the new definition's runs, and the runs after it follow them too."""
    async with engine_running(make_settings) as h:
        await add_members(h, "everyone", 2)
        jid = await h.journey(broadcast("everyone"))
        h.clock.set(RUN_AT)
        await h.fire_due()
        assert [n for _, n in await entered(h, jid)] == [1, 1]
        await h.client.post(f"/v1/journeys/{jid}/pause", headers=ADMIN)
        h.clock.set(RUN_AT + timedelta(days=8))  # the second week's run was missed
        r = await h.client.post(f"/v1/journeys/{jid}/activate", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert await next_run_at(h, jid) == (RUN_AT + timedelta(days=14)).isoformat()
        await h.fire_due()
        assert [n for _, n in await entered(h, jid)] == [1, 1]

        await h.client.post(f"/v1/journeys/{jid}/pause", headers=ADMIN)
        daily = broadcast("everyone")
        daily["entry"]["every"] = "P1D"
        assert (await put(h, jid, daily)).status_code == 200
        assert await next_run_at(h, jid) == (RUN_AT + timedelta(days=9)).isoformat()
        await h.client.post(f"/v1/journeys/{jid}/activate", headers=ADMIN)
        h.clock.set(RUN_AT + timedelta(days=9))
        await h.fire_due()
        assert [n for _, n in await entered(h, jid)] == [2, 2]
        assert await next_run_at(h, jid) == (RUN_AT + timedelta(days=10)).isoformat()


async def test_a_broadcast_paused_mid_run_goes_on_where_it_stopped(make_settings: Any) -> None:
    # A tiny budget: each pass enrols one chunk, then leaves the rest for the next.
    async with engine_running(make_settings, broadcast_chunk_size=2, broadcast_budget_s=1e-6) as h:
        await add_members(h, "everyone", 5)
        jid = await h.journey(one_off(RUN_AT))
        h.clock.set(RUN_AT + timedelta(hours=1))
        assert await h.engine.run_due_broadcasts() == 2 and h.engine.broadcasts_pending
        await h.client.post(f"/v1/journeys/{jid}/pause", headers=ADMIN)
        assert await h.engine.run_due_broadcasts() == 0
        r = await h.client.post(f"/v1/journeys/{jid}/activate", headers=ADMIN)
        assert r.status_code == 200, r.text
        await h.fire_due()
        assert [n for _, n in await entered(h, jid)] == [1] * 5
        assert await next_run_at(h, jid) is None


async def test_a_resumed_broadcast_runs_when_its_definition_says_not_when_an_old_replica_left_it(
    make_settings: Any,
) -> None:
    """A replica of the release before kept a paused broadcast's next run at its old time when it
    saved an edit; resumed, it went out then (a resume kept any run still ahead)."""
    later = RUN_AT + timedelta(days=7)
    async with engine_running(make_settings) as h:
        await add_members(h, "everyone", 3)
        jid = await h.journey(one_off(RUN_AT))
        await h.client.post(f"/v1/journeys/{jid}/pause", headers=ADMIN)
        assert (await put(h, jid, one_off(later))).status_code == 200
        # What the old replica's edit left: the run at its old time.
        async with h.platform.engine.begin() as conn:
            await conn.execute(
                text("UPDATE journeys SET next_run_at = :t WHERE id = :j"), {"t": RUN_AT, "j": jid}
            )
        r = await h.client.post(f"/v1/journeys/{jid}/activate", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert await next_run_at(h, jid) == later.isoformat()
        h.clock.set(RUN_AT + timedelta(minutes=1))
        await h.fire_due()
        assert await entered(h, jid) == []
        h.clock.set(later)
        await h.fire_due()
        assert [n for _, n in await entered(h, jid)] == [1, 1, 1]


async def test_a_recurring_broadcast_made_a_one_off_runs_no_more(make_settings: Any) -> None:
    """Removing `every` from a broadcast that has run: no more runs (it was refused, 409 saying the
    broadcast had not gone out yet: its pending run was read as a one-off never sent)."""
    async with engine_running(make_settings) as h:
        await add_members(h, "everyone", 2)
        jid = await h.journey(broadcast("everyone"))
        h.clock.set(RUN_AT)
        await h.fire_due()
        assert [n for _, n in await entered(h, jid)] == [1, 1]
        h.clock.set(RUN_AT + timedelta(days=1))
        once = broadcast("everyone")
        del once["entry"]["every"]
        r = await put(h, jid, once)
        assert r.status_code == 200, r.text
        assert r.json()["next_run_at"] is None and await next_run_at(h, jid) is None
        await h.advance(timedelta(days=7))
        assert [n for _, n in await entered(h, jid)] == [1, 1]


async def test_a_live_journey_made_a_one_off_at_a_time_that_passed_is_refused(make_settings: Any) -> None:
    """An event journey switched to a broadcast at a time that has passed was saved (200) with no run
    at all: nothing ever went out. A time ahead is its first run."""
    async with engine_running(make_settings) as h:
        await add_members(h, "everyone", 2)
        jid = await h.journey(
            {
                "name": "Welcome",
                "entry": {"type": "event", "event": "Signed Up"},
                "nodes": [{"id": "start", "type": "entry"}, {"id": "done", "type": "exit"}],
                "edges": [{"from": "start", "to": "done"}],
            }
        )
        h.clock.set(RUN_AT + timedelta(hours=1))
        r = await put(h, jid, one_off(RUN_AT))
        assert r.status_code == 409, r.text
        [error] = r.json()["errors"]
        assert (error["field"], error["rule"]) == ("definition.entry.at", "schedule_passed")
        assert RUN_AT.isoformat() in error["message"]
        body = (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()
        assert (body["versions"], body["next_run_at"]) == ([1], None)
        soon = h.clock.now() + timedelta(minutes=5)
        assert (await put(h, jid, one_off(soon))).status_code == 200
        await h.advance(timedelta(minutes=5))
        assert [n for _, n in await entered(h, jid)] == [1, 1]


async def test_an_edit_during_a_recurring_run_sets_the_runs_after_it(make_settings: Any) -> None:
    """The run in progress finishes; the next is the edited definition's first run after it (its new
    `at`), not the old one's a week after this run."""
    async with engine_running(make_settings, broadcast_chunk_size=2, broadcast_budget_s=1e-6) as h:
        await add_members(h, "everyone", 5)
        jid = await h.journey(broadcast("everyone"))
        h.clock.set(RUN_AT + timedelta(minutes=1))
        assert await h.engine.run_due_broadcasts() == 2 and h.engine.broadcasts_pending
        moved = broadcast("everyone")
        moved["entry"]["at"] = (RUN_AT + timedelta(days=2)).isoformat()
        r = await put(h, jid, moved)
        assert r.status_code == 200, r.text
        assert await next_run_at(h, jid) == RUN_AT.isoformat()  # the run goes on
        await h.fire_due()
        assert [n for _, n in await entered(h, jid)] == [1] * 5
        assert await next_run_at(h, jid) == (RUN_AT + timedelta(days=2)).isoformat()
        h.clock.set(RUN_AT + timedelta(days=2))
        await h.fire_due()
        assert [n for _, n in await entered(h, jid)] == [2] * 5
        assert await next_run_at(h, jid) == (RUN_AT + timedelta(days=9)).isoformat()


async def test_a_one_off_being_sent_cannot_be_moved_ahead(make_settings: Any) -> None:
    """Moved to a time ahead while its run had members left, it went out a second time then: to
    everyone, with re-entry `always`. Refused until the run is over (then it is sent again, as asked)."""
    async with engine_running(make_settings, broadcast_chunk_size=2, broadcast_budget_s=1e-6) as h:
        await add_members(h, "everyone", 5)
        again = {"reentry": {"policy": "always"}}
        jid = await h.journey(one_off(RUN_AT) | again)
        h.clock.set(RUN_AT + timedelta(minutes=1))
        assert await h.engine.run_due_broadcasts() == 2 and h.engine.broadcasts_pending
        tomorrow = RUN_AT + timedelta(days=1)
        r = await put(h, jid, one_off(tomorrow) | again)
        assert r.status_code == 409, r.text
        [error] = r.json()["errors"]
        assert (error["field"], error["rule"]) == ("definition.entry.at", "schedule_passed")
        assert RUN_AT.isoformat() in error["message"] and tomorrow.isoformat() in error["message"]
        assert (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()["versions"] == [1]
        # Another edit goes through; the run finishes once.
        assert (await put(h, jid, one_off(RUN_AT, name="Launch (final)") | again)).status_code == 200
        await h.fire_due()
        assert [n for _, n in await entered(h, jid)] == [1] * 5
        assert await next_run_at(h, jid) is None
        h.clock.set(tomorrow)
        await h.fire_due()
        assert [n for _, n in await entered(h, jid)] == [1] * 5
        # Over, it can be sent again.
        r = await put(h, jid, one_off(tomorrow + timedelta(hours=1)) | again)
        assert (
            r.status_code == 200 and await next_run_at(h, jid) == (tomorrow + timedelta(hours=1)).isoformat()
        )

"""Broadcasts to a segment (`schedule`, `enrol_current`): bounded chunks, resumable, isolated per journey."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

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
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
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

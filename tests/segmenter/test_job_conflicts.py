"""Whole-base jobs (recommendations recompute, profile republish, lifecycle write-back) against an
event batch with a merge: the batch locks the merge's two rows before the rest of its customers, a
job's chunk locks its customers in id order, so each can wait on the other. The chunk gives way
after a short lock timeout (not the 1 s deadlock timeout, the event batch stalled all along), rolls
back, pauses and runs again once the batch committed; the job completes, the batch is not retried.

Each interleaving is forced: the batch is held with the merge's rows locked, the job started, and
the batch let go only once the chunk is seen waiting for a row the batch holds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.segmenter import conflicts
from services.segmenter.store import catalogue as catalogue_store
from services.segmenter.store import profiles as profile_store
from shared.contracts.topics import PROFILES
from tests.segmenter.conftest import ADMIN, START, Harness, make_event, read_all
from tests.segmenter.test_erasure_races import Pause
from tests.support import eventually


class HeldWithPid:
    """Holds the next call of `module.name(session, ...)` before it runs, noting the backend pid of
    its transaction (whose locks a job's chunk then waits for)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> None:
        self.reached = asyncio.Event()
        self.release = asyncio.Event()
        self.pid = 0
        original: Callable[..., Awaitable[Any]] = getattr(module, name)

        async def held(session: AsyncSession, *args: Any, **kwargs: Any) -> Any:
            if not self.reached.is_set():
                self.pid = int((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())
                self.reached.set()
                await self.release.wait()
            return await original(session, *args, **kwargs)

        monkeypatch.setattr(module, name, held)


async def blocked_by(h: Harness, pid: int) -> bool:
    """Some transaction waits for a lock the backend `pid` holds (only this test's job can)."""
    async with h.segmenter.platform.engine.connect() as conn:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE CAST(:pid AS int) = ANY(pg_blocking_pids(pid))"
        return bool((await conn.execute(text(sql), {"pid": pid})).scalar_one())


async def handle(h: Harness, *events: Any) -> None:
    await h.segmenter.events.handle_in_own_unit(list(events))


async def customers(h: Harness) -> None:
    """a0 < b9 < u1 < x2 by id. The batch (`merge_batch`) merges x2 into u1 and changes a0; b9, whom
    no batch touches, is in the chunk too, between the rows it gets and the one it waits for."""
    await handle(h, make_event("i0", "identify", user_id="a0", traits={"k": 1}))
    await handle(
        h, make_event("o9", user_id="b9", event="Order Completed", timestamp=START - timedelta(days=50))
    )
    await handle(h, make_event("i1", "identify", user_id="u1", anonymous_id="x1"))
    await handle(h, make_event("t2", anonymous_id="x2", event="Seen"))


def merge_batch() -> list[Any]:
    return [
        make_event("i3", "identify", user_id="a0", traits={"k": 2}),
        make_event("i4", "identify", user_id="u1", anonymous_id="x2", traits={"n": 1}),
    ]


async def start_job(h: Harness, job: str) -> asyncio.Future[Any]:
    if job == "recompute":
        return asyncio.ensure_future(h.segmenter.recommendations.recompute())
    if job == "republish":
        assert await h.segmenter.republisher.start() is not None
        return asyncio.ensure_future(h.segmenter.republisher.wait())
    # A policy under which b9 (an order 50 days ago: retention) is onboarding: one stage change.
    return asyncio.ensure_future(
        h.client.put("/v1/lifecycle/stages", json={"thresholds": {"onboarding_days": 60}}, headers=ADMIN)
    )


@pytest.mark.parametrize("job", ["recompute", "republish", "lifecycle"])
async def test_a_job_chunk_gives_way_to_a_merge_batch_and_runs_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, job: str
) -> None:
    h = harness
    caplog.set_level(logging.INFO)
    await customers(h)
    assert (await h.customer("b9"))["lifecycle"]["stage"] == "retention"

    held = HeldWithPid(monkeypatch, profile_store, "lock_profiles")  # after the merge, before the rest
    batch = asyncio.ensure_future(handle(h, *merge_batch()))
    await asyncio.wait_for(held.reached.wait(), 10)  # u1 and x2 held FOR UPDATE by the merge
    pauses: list[float] = []

    async def pause(seconds: float) -> None:  # the chunk's next try comes once the batch committed
        pauses.append(seconds)
        await batch

    monkeypatch.setattr(conflicts, "pause", pause)
    running = await start_job(h, job)
    await eventually(lambda: blocked_by(h, held.pid), timeout=20)  # the chunk holds a0, b9; waits on u1
    held.release.set()  # the batch now waits for a0: the chunk gives way
    await asyncio.wait_for(batch, 30)
    outcome = await asyncio.wait_for(running, 60)

    gave_way = [r for r in caplog.records if r.getMessage().startswith("customers held by a concurrent")]
    assert [getattr(r, "lock_timeout", None) for r in gave_way] == [True]
    assert len(pauses) == 1 and conflicts.JOB_FIRST_PAUSE_S / 2 <= pauses[0] <= conflicts.JOB_FIRST_PAUSE_S
    # The batch waited for the chunk's lock timeout, not the deadlock timeout: never retried.
    assert not [r for r in caplog.records if "retrying the batch" in r.getMessage()]
    assert (await h.customer("a0"))["traits"] == {"k": 2}
    assert (await h.customer("u1"))["traits"] == {"n": 1}

    if job == "recompute":
        assert outcome.customers == 3  # a0, b9, u1: x2 was merged away before the chunk's new try
    elif job == "republish":
        republished = h.segmenter.republisher.job
        assert republished is not None and republished.error is None and republished.done == 3
        await h.relay()
        messages = await read_all(h.settings.topic(PROFILES.name))
        snapshots = [m["value"] for m in messages if m["value"]["kind"] == "snapshot"]
        # Read on the new try, after the batch: its change, not what the chunk first locked.
        assert {m["customer_id"]: m["traits"] for m in snapshots} == {
            "a0": {"k": 2},
            "b9": {},
            "u1": {"n": 1},
        }
    else:
        assert outcome.status_code == 200, outcome.text
        # The chunk's new try wrote the customer the batch did not change (the others it skips: the
        # event path recomputed them); the refit's segments restart afterwards as before.
        assert outcome.json()["recomputed"]["stage_changes"] == 1
        assert (await h.customer("b9"))["lifecycle"]["stage"] == "onboarding"


async def test_a_recompute_counts_the_customers_it_held_not_those_merged_away_meanwhile(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    await customers(h)
    pause = Pause(monkeypatch, catalogue_store, "lock_customers", after=False)
    recompute = asyncio.ensure_future(h.segmenter.recommendations.recompute())
    await asyncio.wait_for(pause.reached.wait(), 10)  # the chunk read a0, b9, u1, x2
    await handle(h, *merge_batch())  # x2 merged into u1
    pause.release.set()
    assert (await recompute).customers == 3


async def test_a_chunk_refused_every_time_fails_its_job_after_its_tries_and_pauses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The retry policy alone: a lock timeout or deadlock every time, tried JOB_CONFLICT_ATTEMPTS
    times with doubling pauses (at most JOB_MAX_PAUSE_S); any other error at once."""
    import asyncpg

    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(conflicts, "pause", pause)
    monkeypatch.setattr(conflicts, "jitter", lambda lo, hi: hi)  # the longest pause each time
    tries = 0

    async def refused() -> None:
        nonlocal tries
        tries += 1
        raise (
            asyncpg.exceptions.LockNotAvailableError
            if tries % 2
            else asyncpg.exceptions.DeadlockDetectedError
        )("held")

    with pytest.raises(asyncpg.exceptions.PostgresError):
        await conflicts.retry_job_chunk(refused, "test chunk")
    assert tries == conflicts.JOB_CONFLICT_ATTEMPTS and len(pauses) == tries - 1
    assert pauses[:3] == [conflicts.JOB_FIRST_PAUSE_S * n for n in (1, 2, 4)]
    assert max(pauses) == pauses[-1] == conflicts.JOB_MAX_PAUSE_S

    async def broken() -> None:
        nonlocal tries
        tries += 1
        raise asyncpg.exceptions.UniqueViolationError("duplicate key")

    tries, pauses[:] = 0, []
    with pytest.raises(asyncpg.exceptions.UniqueViolationError):
        await conflicts.retry_job_chunk(broken, "test chunk")
    assert tries == 1 and pauses == []

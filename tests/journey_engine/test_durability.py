"""Timers survive a stopped engine and fire exactly once, even with two engines racing on one table;
a failed batch rolls back and its timers fire on the next pass."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

import pytest

from shared.clock import ManualClock
from tests.journey_engine.harness import START, engine_running
from tests.journey_engine.test_timing_and_rules import linear
from tests.support import eventually

DELAYED = linear(
    "Delayed",
    "Signed Up",
    [
        {"id": "wait", "type": "delay", "duration": "PT1H"},
        {"id": "mail", "type": "send", "channel": "email", "template_id": "later"},
    ],
)
CUSTOMERS = 120


async def test_timers_due_while_stopped_fire_once_across_two_racing_engines(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(START)
    async with engine_running(make_settings, clock=clock) as h:
        jid = await h.journey(DELAYED)
        for i in range(CUSTOMERS):
            await h.track(f"c{i}", "Signed Up", wait=False)
        await h.processed("events")
        assert await h.scalar("SELECT count(*) FROM timers") == CUSTOMERS
    clock.advance(timedelta(hours=3))  # every timer came due while no engine ran

    async with (
        engine_running(make_settings, clock=clock, timer_batch_size=7) as one,
        engine_running(make_settings, clock=clock, timer_batch_size=7) as two,
    ):
        # A crash mid-batch: the step fails after claiming, the transaction rolls back, nothing is lost.
        def explode(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("engine crashed mid-step")

        monkeypatch.setattr(one.engine, "_react", explode)
        with pytest.raises(RuntimeError):
            await one.engine.run_once()
        assert await one.scalar("SELECT count(*) FROM timers") == CUSTOMERS
        monkeypatch.undo()

        claimed = await asyncio.gather(one.fire_due(), two.fire_due(), one.fire_due(), two.fire_due())
        assert sum(claimed) == CUSTOMERS
        assert claimed[0] + claimed[2] > 0 and claimed[1] + claimed[3] > 0  # both engines did work
        assert await one.scalar("SELECT count(*) FROM timers") == 0
        assert await one.scalar("SELECT count(*) FROM message_log") == CUSTOMERS
        assert {r.status for r in await one.instances(jid)} == {"exited"}
        requests = await one.requests(until=lambda m: len(m) >= CUSTOMERS, idle=1.0)
        assert len(requests) == CUSTOMERS
        assert len({m["message_id"] for m in requests}) == CUSTOMERS
        stats = (
            await one.client.get(
                f"/v1/journeys/{jid}/stats", headers={"Authorization": "Bearer test-admin-token"}
            )
        ).json()
        nodes = {n["node_id"]: n for n in stats["versions"][0]["nodes"]}
        assert nodes["wait"]["passed"] == CUSTOMERS and nodes["mail"]["passed"] == CUSTOMERS


async def test_background_timer_loop_fires_due_timers_by_itself(make_settings: Any) -> None:
    clock = ManualClock(START)
    async with engine_running(
        make_settings, clock=clock, run_timer_loop=True, timer_poll_interval_s=0.05
    ) as h:
        jid = await h.journey(DELAYED)
        await h.track("solo", "Signed Up")
        clock.advance(timedelta(hours=1))

        async def exited() -> bool:
            return [r.status for r in await h.instances(jid)] == ["exited"]

        await eventually(exited, timeout=10)
        [request] = await h.requests(until=lambda m: len(m) >= 1)
        assert request["customer_id"] == "solo" and request["template_id"] == "later"


async def test_the_timer_worker_looks_for_due_broadcasts_less_often_than_for_timers(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each look is a transaction on every replica: timers every 20 ms here, broadcasts every 300 ms.
    async with engine_running(make_settings, timer_poll_interval_s=0.02, broadcast_poll_interval_s=0.3) as h:
        passes, looks = 0, 0
        run_once, run_due_broadcasts = h.engine.run_once, h.engine.run_due_broadcasts

        async def counted_pass(*, broadcasts: bool = True) -> int:
            nonlocal passes
            passes += 1
            return await run_once(broadcasts=broadcasts)

        async def counted_look() -> int:
            nonlocal looks
            looks += 1
            return await run_due_broadcasts()

        monkeypatch.setattr(h.engine, "run_once", counted_pass)
        monkeypatch.setattr(h.engine, "run_due_broadcasts", counted_look)
        worker = asyncio.create_task(h.engine.run_forever())
        try:
            await eventually(lambda: passes >= 30, timeout=30)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        assert 1 <= looks < passes / 3

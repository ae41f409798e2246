"""Journey engine timers: fired per second with 1,000,000 waiting instances, against a raw SQL
claim-and-delete loop on the same table in the same run; then lateness at half that rate.

    python -m bench.journeys        (KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL point at a broker and database)

Environment knobs: BENCH_INSTANCES (1,000,000), BENCH_DUE (timers due per measured phase, 100,000),
BENCH_WORKERS (engine timer workers, 2), BENCH_BATCH (timers per claim, 500), BENCH_LATENESS_S (10).

Every instance waits at a one-hour delay followed by an exit: a fired timer is a full engine step
(claim, customer lock, instance lock, walk, state update, per-node counters), without a message.
The baseline does only the claim-and-delete, in one loop, on the same table, with the same batch size.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from bench.report import last_line, line, percentile, ratio
from services.journey_engine.app import MIGRATIONS
from services.journey_engine.execution.engine import JourneyEngine
from services.journey_engine.settings import JourneyEngineSettings
from services.journey_engine.store import journeys as journey_store
from shared.clock import ManualClock, SystemClock
from shared.db.engine import asyncpg_dsn, drop_schema
from shared.runtime import Platform

INSTANCES = int(os.environ.get("BENCH_INSTANCES", "1000000"))
DUE = int(os.environ.get("BENCH_DUE", "100000"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
BATCH = int(os.environ.get("BENCH_BATCH", "500"))
LATENESS_S = float(os.environ.get("BENCH_LATENESS_S", "10"))
SCHEMA = "journey_engine_bench"
JOURNEY = "bench"
DEFINITION = {
    "name": "Bench",
    "entry": {"type": "event", "event": "Signed Up"},
    "nodes": [
        {"id": "start", "type": "entry"},
        {"id": "wait", "type": "delay", "duration": "PT1H"},
        {"id": "done", "type": "exit"},
    ],
    "edges": [{"from": "start", "to": "wait"}, {"from": "wait", "to": "done"}],
}
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
FAR = T0 + timedelta(days=365)
# Phase A timers (baseline) are due just before T_A, phase B (engine) just before T_B.
T_A = T0 + timedelta(hours=1)
T_B = T0 + timedelta(hours=2)

CLAIM = (
    "DELETE FROM timers WHERE id IN (SELECT id FROM timers WHERE due_at <= $1 ORDER BY due_at "
    "LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING instance_id, seq, due_at"
)


async def load(conn: asyncpg.Connection) -> None:
    """COPY 1,000,000 waiting instances and their timers: 2 x DUE of them due, the rest next year."""
    started = time.perf_counter()
    ctx = orjson.dumps({"visits": {}}).decode()
    wait = orjson.dumps({"kind": "delay"}).decode()
    chunk = 100_000
    for lo in range(0, INSTANCES, chunk):
        hi = min(INSTANCES, lo + chunk)
        await conn.copy_records_to_table(
            "instances",
            columns=[
                "id",
                "journey_id",
                "version",
                "customer_id",
                "correlation",
                "status",
                "node_id",
                "wait",
                "context",
                "seq",
                "entered_at",
                "updated_at",
            ],
            records=[
                (f"i{n}", JOURNEY, 1, f"c{n}", "", "active", "wait", wait, ctx, 1, T0, T0)
                for n in range(lo, hi)
            ],
        )

        def due(n: int) -> datetime:
            if n < DUE:
                return T_A - timedelta(microseconds=DUE - n)
            if n < 2 * DUE:
                return T_B - timedelta(microseconds=2 * DUE - n)
            return FAR

        await conn.copy_records_to_table(
            "timers",
            columns=["instance_id", "seq", "due_at"],
            records=[(f"i{n}", 1, due(n)) for n in range(lo, hi)],
        )
    await conn.execute("ANALYZE instances; ANALYZE timers")
    line("bulk load (COPY) instances + timers", INSTANCES, f"rows in {time.perf_counter() - started:.1f} s")


async def baseline(dsn: str) -> float:
    """Raw SQL: claim-and-delete the due timers in batches, one transaction per batch, nothing else."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": SCHEMA})
    fired = 0
    started = time.perf_counter()
    try:
        while True:
            async with conn.transaction():
                rows = await conn.fetch(CLAIM, T_A, BATCH)
            fired += len(rows)
            if not rows:
                break
    finally:
        await conn.close()
    elapsed = time.perf_counter() - started
    assert fired == DUE, f"baseline fired {fired}, expected {DUE}"
    return fired / elapsed


async def engine_throughput(platform: Platform, settings: JourneyEngineSettings, workers: int) -> float:
    clock = ManualClock(T_B)
    engine = JourneyEngine(platform, settings, clock)
    fired = 0

    async def worker() -> None:
        nonlocal fired
        while (n := await engine.run_once()) > 0:
            fired += n

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - started
    assert fired == DUE, f"engine fired {fired}, expected {DUE}"
    return fired / elapsed


async def lateness(
    platform: Platform, settings: JourneyEngineSettings, rate: float, conn: asyncpg.Connection
) -> list[float]:
    """Arm timers due at `rate` per second (wall clock) and measure fire time minus due time."""
    count = int(rate * LATENESS_S)
    start = datetime.now(UTC) + timedelta(seconds=2)
    ids = [f"i{n}" for n in range(2 * DUE, 2 * DUE + count)]
    await conn.copy_records_to_table(
        "timers",
        columns=["instance_id", "seq", "due_at"],
        records=[(i, 1, start + timedelta(seconds=k / rate)) for k, i in enumerate(ids)],
    )
    late: list[float] = []
    engine = JourneyEngine(platform, settings, SystemClock())

    def record(due_times: list[datetime]) -> None:
        now = datetime.now(UTC)
        late.extend((now - d).total_seconds() for d in due_times if d < FAR)

    engine.on_fired = record
    tasks = [asyncio.create_task(engine.run_forever()) for _ in range(WORKERS)]
    deadline = time.monotonic() + LATENESS_S + 60
    while len(late) < count and time.monotonic() < deadline:  # noqa: ASYNC110 (polling a counter)
        await asyncio.sleep(0.2)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return late


async def main() -> None:
    settings = JourneyEngineSettings(
        db_schema=SCHEMA,
        topic_prefix="bench.",
        run_timer_loop=False,
        timer_batch_size=BATCH,
        timer_workers=WORKERS,
        db_pool_size=max(4, WORKERS * 2),
    )
    await drop_schema(settings.database_url, SCHEMA)
    platform = Platform(settings, migrations=MIGRATIONS)
    await platform.start()
    dsn = asyncpg_dsn(settings.database_url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": SCHEMA})
    try:
        async with platform.unit_of_work() as uow:
            await journey_store.create(uow.session, JOURNEY, "Bench", DEFINITION, None, T0)
            await journey_store.update(uow.session, JOURNEY, now=T0, status="active")
        print(
            f"instances={INSTANCES} due_per_phase={DUE} batch={BATCH} engine_workers={WORKERS} "
            f"cpus={os.cpu_count()}"
        )
        await load(conn)

        # Each phase starts from a vacuumed table, so neither pays for the other's dead index entries.
        await conn.execute("VACUUM ANALYZE timers")
        base = await baseline(dsn)
        line("baseline: raw claim-and-delete loop", base, "timers/s")
        await conn.execute("VACUUM ANALYZE timers")
        ours = await engine_throughput(platform, settings, WORKERS)
        line(f"engine: full steps, {WORKERS} workers", ours, "timers/s")
        r = ratio("engine / baseline", ours, base)
        waiting = await conn.fetchval("SELECT count(*) FROM instances WHERE status = 'active'")
        line("instances still waiting afterwards", waiting)

        half = ours / 2
        late = await lateness(platform, settings, half, conn)
        line(f"lateness run at {half:.0f} timers/s for {LATENESS_S:.0f} s: fired", len(late))
        line("lateness p50", percentile(late, 50) * 1000, "ms")
        line("lateness p99", percentile(late, 99) * 1000, "ms")
        print(
            f"goals: ratio >= 0.5 ({'met' if r >= 0.5 else 'NOT met'}), > 2000/s "
            f"({'met' if ours > 2000 else 'NOT met'}), p99 < 1 s "
            f"({'met' if percentile(late, 99) < 1 else 'NOT met'})"
        )
        last_line("journey_timers_per_s", ours)
    finally:
        await conn.close()
        await platform.stop()
        await drop_schema(settings.database_url, SCHEMA)


if __name__ == "__main__":
    asyncio.run(main())

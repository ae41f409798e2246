"""Segmenter benchmark: `python -m bench.segmenter` (needs KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL).

1. Throughput: N events pre-produced to clm.events.v1, consumed by the real service (20 active
   segments, real-time evaluation, outbox announcements) until every profile update is committed;
   against a raw asyncpg batch upsert of the same rows (customers, event aggregates, timeline,
   inbox) in the same run, as a ratio.
2. Back-fill: a new segment over 1,000,000 profiles bulk-loaded with COPY (time to `ready`).
3. Latency: event -> membership announcement on clm.segment-membership.v1 at half the max rate, the
   load being the throughput phase's mix with one event in ten a new customer's first order (the
   timed ones); the service runs as its own process (`python -m services.segmenter`), the load
   generator and the watcher in another.

Scale-out: fresh events consumed by BENCH_REPLICAS replicas (`python -m services.segmenter`
processes in one consumer group, as a deployment adds them; default 2, one per core), against the
raw upsert baseline given as many connections writing at once. The headline (last line) and the
latency phase stay with one process, the default deployment.

Env: BENCH_EVENTS (default 100000), BENCH_CUSTOMERS (20000), BENCH_PROFILES (1000000),
BENCH_LATENCY_S (10), BENCH_LATENCY_WARMUP_S (15), BENCH_LATENCY_RATE (default: half the measured
max), BENCH_TIMED_EVERY (10), BENCH_REPLICAS (2), BENCH_SEGMENTS (20),
BENCH_PHASES (throughput,latency,scaleout,backfill).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import uvloop
from aiokafka import AIOKafkaConsumer

from bench.report import last_line, line, percentile, ratio
from deploy.local.processes import ManagedProcess
from services.segmenter.app import create_app
from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import segments as segment_store
from shared.contracts.events import CustomerEvent
from shared.contracts.headers import Headers
from shared.contracts.topics import CUSTOMER_EVENTS, SEGMENT_MEMBERSHIP
from shared.db.engine import asyncpg_dsn, drop_schema
from shared.heap import settle_heap
from shared.kafka.admin import ensure_topics
from shared.kafka.producer import EventProducer, encode_message
from tests.support import free_port

N_EVENTS = int(os.environ.get("BENCH_EVENTS", "100000"))
N_CUSTOMERS = int(os.environ.get("BENCH_CUSTOMERS", "20000"))
N_PROFILES = int(os.environ.get("BENCH_PROFILES", "1000000"))
LATENCY_S = float(os.environ.get("BENCH_LATENCY_S", "10"))
# The same load first, not timed: a broker is a long-running JVM, and a fresh one spends its first
# minute of a new pattern of requests compiling (its compiler thread took 27% of a core during an
# unwarmed latency phase, its request handling 10%).
LATENCY_WARMUP_S = float(os.environ.get("BENCH_LATENCY_WARMUP_S", "15"))
N_SEGMENTS = int(os.environ.get("BENCH_SEGMENTS", "20"))
REPLICAS = int(os.environ.get("BENCH_REPLICAS", "2"))
PHASES = set(os.environ.get("BENCH_PHASES", "throughput,latency,scaleout,backfill").split(","))
NOW = datetime.now(UTC)

SEGMENTS: list[dict[str, Any]] = [
    {"trait": "plan", "op": "equals", "value": "pro"},
    {"trait": "plan", "op": "in", "values": ["team", "enterprise"]},
    {"trait": "age", "op": "gte", "value": 40},
    {"trait": "email", "op": "contains", "value": "@corp."},
    {"trait": "country", "op": "equals", "value": "NO"},
    {"performed": "Order Completed"},
    {"performed": "Order Completed", "count": {"op": "at_least", "value": 3}},
    {
        "performed": "Order Completed",
        "within": "30d",
        "where": [{"property": "revenue", "op": "gte", "value": 100}],
    },
    {"not_performed": "Order Completed", "since": "30d"},
    {"performed": "Product Viewed", "within": "7d", "count": {"op": "at_least", "value": 5}},
    {"performed": "Signed In", "count": {"op": "at_least", "value": 2}},
    {"last_performed": "Signed In", "op": "before", "ago": "14d"},
    {"profile": "revenue", "op": "gt", "value": 500},
    {"profile": "orders_count", "op": "gte", "value": 2},
    {"profile": "last_seen", "op": "within", "duration": "1d"},
    {"and": [{"trait": "plan", "op": "equals", "value": "pro"}, {"performed": "Order Completed"}]},
    {"or": [{"trait": "age", "op": "lt", "value": 25}, {"performed": "Added To Cart"}]},
    {"not": {"trait": "email", "op": "exists"}},
    {"random_bucket": {"buckets": 100, "below": 10, "salt": "holdout"}},
    {
        "and": [
            {"performed": "Added To Cart", "within": "1d"},
            {"not": {"performed": "Order Completed", "within": "1d"}},
        ]
    },
]


# Latency phase: one timed event (a new customer's first order) in ten, the rest the throughput mix.
TIMED_EVERY = int(os.environ.get("BENCH_TIMED_EVERY", "10"))


def make_events(
    n: int, customers: int, prefix: str, seed: int = 1, id_prefix: str | None = None
) -> list[CustomerEvent]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        uid = f"{prefix}{rnd.randrange(customers)}"
        ts = NOW - timedelta(seconds=rnd.randrange(0, 40 * 86400))
        roll = rnd.random()
        base = {
            "message_id": f"{id_prefix or prefix}-{i}",
            "user_id": uid,
            "timestamp": ts,
            "received_at": NOW,
        }
        if roll < 0.1:
            e = {
                **base,
                "type": "identify",
                "traits": {
                    "plan": rnd.choice(["free", "pro", "team", "enterprise"]),
                    "age": rnd.randint(18, 70),
                    "email": f"{uid}@{rnd.choice(['corp.com', 'mail.com'])}",
                    "country": rnd.choice(["NO", "SE", "DE"]),
                },
            }
        elif roll < 0.25:
            e = {**base, "type": "page", "name": "Home"}
        else:
            name = rnd.choice(
                ["Product Viewed", "Product Viewed", "Added To Cart", "Signed In", "Order Completed"]
            )
            props = {"revenue": rnd.choice([20, 80, 150])} if name == "Order Completed" else {"sku": "A1"}
            e = {**base, "type": "track", "event": name, "properties": props}
        out.append(CustomerEvent.model_validate(e))
    return out


async def produce(settings: SegmenterSettings, events: list[CustomerEvent]) -> None:
    producer = EventProducer(settings)
    await producer.start()
    try:
        topic = settings.topic(CUSTOMER_EVENTS.name)
        msgs = [encode_message(topic, e.customer_key, e, producer="bench") for e in events]
        for i in range(0, len(msgs), 5000):
            await producer.send_many(msgs[i : i + 5000])
    finally:
        await producer.stop()


async def create_segments(app: Any, definitions: list[dict[str, Any]]) -> list[str]:
    platform = app.state.platform
    ids = []
    async with platform.unit_of_work() as uow:
        for i, d in enumerate(definitions):
            sid = f"seg_bench_{i:02d}"
            await segment_store.insert_segment(uow.session, sid, f"bench {i}", "", d, datetime.now(UTC))
            ids.append(sid)
    await app.state.segmenter.backfill.run_until_idle()
    return ids


# --------------------------------------------------------------------------- 1. throughput


async def throughput(settings: SegmenterSettings) -> float:
    events = make_events(N_EVENTS, N_CUSTOMERS, "u")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await create_segments(app, SEGMENTS[:N_SEGMENTS])
    t = time.perf_counter()
    await produce(settings, events)
    line("produced events (setup)", len(events) / (time.perf_counter() - t), "events/s")
    # The service runs in this process: the 100k pre-made events would be garbage it never holds in
    # production, yet every full collection walks them (seconds of GC). Re-made for the baseline.
    n_events = len(events)
    del events

    app = create_app(settings)
    settle_heap(settings.gc_young_threshold)  # as `shared.runtime.serve` does before serving a service
    async with app.router.lifespan_context(app):
        runner = app.state.platform.consumers[0]
        started, cpu_started = time.perf_counter(), time.process_time()
        while runner.processed < n_events:  # noqa: ASYNC110 - polling the runner's counter is the measurement
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        relay = app.state.platform.relay
        relayed_by_then = relay.relayed
        from sqlalchemy import text

        # The announcements are committed in the outbox with the profiles; the relay publishes them
        # meanwhile, sharing the process. How far behind it is when the last event is committed:
        async def outbox_waiting() -> int:
            async with app.state.platform.engine.connect() as conn:
                return int(await conn.scalar(text("SELECT count(*) FROM outbox")) or 0)

        drain_started = time.perf_counter()
        while await outbox_waiting():  # noqa: ASYNC110 - the drain time is the measurement
            await asyncio.sleep(0.05)
        drained_s = time.perf_counter() - drain_started
        async with app.state.platform.engine.connect() as conn:
            members = await conn.scalar(text("SELECT count(*) FROM memberships WHERE is_member"))
            profiles = await conn.scalar(text("SELECT count(*) FROM customers"))
        ours = n_events / elapsed
        line(f"segmenter: events -> committed profiles ({N_SEGMENTS} segments)", ours, "events/s")
        line("  profiles", float(profiles or 0))
        line("  memberships", float(members or 0))
        line("  outbox messages published by the last commit", float(relayed_by_then))
        line("  outbox messages published in all", float(relay.relayed))
        line("  outbox drained after the last commit (setup)", drained_s, "s")
        line("  service process CPU / wall time", cpu / elapsed * 100, "% (Python-bound near 100)")

    baseline = await raw_upsert_baseline(settings, make_events(N_EVENTS, N_CUSTOMERS, "u"))
    line("raw asyncpg batch upsert of the same rows", baseline, "events/s")
    ratio("ratio segmenter / raw upsert (goal >= 0.5)", ours, baseline)
    return ours


async def raw_upsert_baseline(
    settings: SegmenterSettings, events: list[CustomerEvent], lanes: int = 1
) -> float:
    """The same customers/aggregates/timeline/inbox rows written with plain asyncpg unnest upserts,
    pre-aggregated per batch, no identity resolution, no segments, no Kafka. With `lanes` > 1 the
    customers are split by hash over that many connections writing at once (as partitions split
    them over replicas), so the baseline uses the cores the replicas get."""
    schema = settings.db_schema + "_raw"
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE; CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path = "{schema}"')
        await conn.execute(
            "CREATE TABLE customers (customer_id text PRIMARY KEY, traits jsonb NOT NULL DEFAULT '{}', "
            "last_seen timestamptz, event_count bigint NOT NULL DEFAULT 0);"
            "CREATE TABLE event_counts (customer_id text, event text, count bigint, first_at timestamptz, "
            "last_at timestamptz, PRIMARY KEY (customer_id, event));"
            "CREATE TABLE events (seq bigserial PRIMARY KEY, customer_id text, message_id text, type text, "
            "event text,"
            " properties jsonb, traits jsonb, timestamp timestamptz, received_at timestamptz);"
            "CREATE INDEX ON events (customer_id, event, timestamp); CREATE INDEX ON events (customer_id, "
            "timestamp, seq);"
            "CREATE TABLE inbox (consumer text, message_id text, PRIMARY KEY (consumer, message_id));"
        )
        shares: list[list[CustomerEvent]] = [[] for _ in range(lanes)]
        for e in events:
            shares[zlib.crc32(e.customer_key.encode()) % lanes].append(e)
        lane_conns = [await asyncpg.connect(asyncpg_dsn(settings.database_url)) for _ in shares]
        try:
            for c in lane_conns:
                await c.execute(f'SET search_path = "{schema}"')
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    _raw_upsert_lane(c, share, settings.consumer_max_batch)
                    for c, share in zip(lane_conns, shares, strict=True)
                )
            )
            return len(events) / (time.perf_counter() - started)
        finally:
            for c in lane_conns:
                await c.close()
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def _raw_upsert_lane(conn: asyncpg.Connection, events: list[CustomerEvent], size: int) -> None:
    for i in range(0, len(events), size):
        batch = events[i : i + size]
        per_customer: dict[str, list[Any]] = {}
        counts: dict[tuple[str, str], list[Any]] = {}
        for e in batch:
            c = per_customer.setdefault(e.customer_key, [{}, e.timestamp, 0])
            c[0].update(e.traits)
            c[1] = max(c[1], e.timestamp)
            c[2] += 1
            name = e.event or e.type.value
            agg = counts.setdefault((e.customer_key, name), [0, e.timestamp, e.timestamp])
            agg[0] += 1
            agg[1], agg[2] = min(agg[1], e.timestamp), max(agg[2], e.timestamp)
        # Each statement's rows as one jsonb array of arrays: measured against unnest arrays on the
        # same rows, less client CPU and less wall time (see `shared.db.engine.json_rows`).
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO inbox SELECT 'raw', v->>0 FROM jsonb_array_elements($1::text::jsonb) AS r(v) "
                "ON CONFLICT DO NOTHING",
                orjson.dumps([[e.message_id] for e in batch]).decode(),
            )
            await conn.execute(
                "INSERT INTO customers (customer_id, traits, last_seen, event_count) "
                "SELECT v->>0, v->1, (v->>2)::timestamptz, (v->>3)::bigint "
                "FROM jsonb_array_elements($1::text::jsonb) AS r(v) "
                "ON CONFLICT (customer_id) DO UPDATE SET traits = customers.traits || excluded.traits, "
                "last_seen = GREATEST(customers.last_seen, excluded.last_seen), "
                "event_count = customers.event_count + excluded.event_count",
                orjson.dumps([[k, *per_customer[k]] for k in sorted(per_customer)]).decode(),
            )
            await conn.execute(
                "INSERT INTO event_counts SELECT v->>0, v->>1, (v->>2)::bigint, (v->>3)::timestamptz, "
                "(v->>4)::timestamptz FROM jsonb_array_elements($1::text::jsonb) AS r(v) "
                "ON CONFLICT (customer_id, event) DO UPDATE SET "
                "count = event_counts.count + excluded.count, first_at = LEAST(event_counts.first_at, "
                "excluded.first_at), last_at = GREATEST(event_counts.last_at, excluded.last_at)",
                orjson.dumps([[*k, *v] for k, v in counts.items()]).decode(),
            )
            await conn.execute(
                "INSERT INTO events (customer_id, message_id, type, event, properties, traits, "
                "timestamp, received_at) SELECT v->>0, v->>1, v->>2, v->>3, v->4, v->5, "
                "(v->>6)::timestamptz, (v->>7)::timestamptz "
                "FROM jsonb_array_elements($1::text::jsonb) AS r(v)",
                orjson.dumps(
                    [
                        [
                            e.customer_key,
                            e.message_id,
                            e.type.value,
                            e.event,
                            e.properties,
                            e.traits,
                            e.timestamp,
                            e.received_at,
                        ]
                        for e in batch
                    ]
                ).decode(),
            )


class Replicas:
    """`python -m services.segmenter` processes in one consumer group (the real entry point, as a
    deployment's replicas run it), on free ports; their logs go to a temporary directory."""

    def __init__(self, settings: SegmenterSettings, n: int) -> None:
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "DATABASE_URL": settings.database_url,
            "CLM_TOPIC_PREFIX": settings.topic_prefix,
            "CLM_DB_SCHEMA": settings.db_schema,
            "CLM_DB_POOL_SIZE": str(settings.db_pool_size),
            "CLM_LOG_LEVEL": settings.log_level,
        }
        logs = tempfile.mkdtemp(prefix="bench-segmenter-")
        self.topic = settings.topic(CUSTOMER_EVENTS.name)
        self.ports = [free_port() for _ in range(n)]
        self.processes = [
            ManagedProcess(
                f"segmenter-{i}",
                [sys.executable, "-m", "services.segmenter"],
                {**env, "CLM_PORT": str(port)},
                Path(logs) / f"segmenter-{i}.log",
                port,
            )
            for i, port in enumerate(self.ports)
        ]

    async def __aenter__(self) -> Replicas:
        for p in self.processes:
            p.start()
        for p in self.processes:
            await asyncio.to_thread(p.wait_ready)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for p in self.processes:
            await asyncio.to_thread(p.stop)

    async def processed(self, client: httpx.AsyncClient) -> int:
        """Events handled (unit of work committed) by all replicas: their consumer counters."""
        total = 0
        for port in self.ports:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            for row in text.splitlines():
                if row.startswith("clm_consumer_messages_total{") and f'topic="{self.topic}"' in row:
                    total += int(float(row.rsplit(" ", 1)[1]))
        return total


async def scale_out(settings: SegmenterSettings) -> float:
    """Fresh events for the same customers, consumed by REPLICAS service processes from where the
    throughput phase's group left off; timed from the first handled event to the last."""
    await ensure_segments(settings)
    events = make_events(N_EVENTS, N_CUSTOMERS, "u", seed=4, id_prefix="scale")
    await produce(settings, events)
    n_events = len(events)
    del events
    async with Replicas(settings, REPLICAS) as replicas, httpx.AsyncClient() as client:
        started: float | None = None
        while (done := await replicas.processed(client)) < n_events:
            if done and started is None:
                started, first = time.perf_counter(), done
            await asyncio.sleep(0.1)
        if started is None:  # all of it handled between two polls
            started, first = time.perf_counter() - 0.1, 0
        ours = (n_events - first) / (time.perf_counter() - started)
    line(f"segmenter x{REPLICAS} replicas: events -> committed profiles", ours, "events/s")
    baseline = await raw_upsert_baseline(
        settings, make_events(N_EVENTS, N_CUSTOMERS, "u", seed=4, id_prefix="scale"), lanes=REPLICAS
    )
    line(f"raw asyncpg batch upsert, {REPLICAS} connections at once", baseline, "events/s")
    ratio(f"ratio segmenter x{REPLICAS} / raw upsert x{REPLICAS} (goal >= 0.5)", ours, baseline)
    return ours


async def ensure_segments(settings: SegmenterSettings) -> None:
    """The benchmark's segments, unless an earlier phase of this run created them."""
    app = create_app(settings.model_copy(update={"run_background_loops": False}))
    async with app.router.lifespan_context(app):
        async with app.state.platform.unit_of_work() as uow:
            missing = await segment_store.get_segment(uow.session, "seg_bench_05") is None
        if missing:
            await create_segments(app, SEGMENTS[: max(6, N_SEGMENTS)])


# --------------------------------------------------------------------------- 2. back-fill


async def load_profiles(settings: SegmenterSettings, n: int) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        await conn.execute(f'SET search_path = "{settings.db_schema}"')
        rnd = random.Random(3)
        plans = ["free", "pro", "team"]
        rows, counts = [], []
        for i in range(n):
            cid = f"b{i:07d}"
            orders = rnd.choice([0, 0, 1, 2, 5])
            last_order = NOW - timedelta(days=rnd.randrange(0, 90)) if orders else None
            rows.append(
                (
                    cid,
                    orjson.dumps({"plan": rnd.choice(plans), "age": rnd.randint(18, 70)}).decode(),
                    NOW - timedelta(days=100),
                    NOW,
                    orders * 3 + 1,
                    orders,
                    orders * 40.0,
                    last_order,
                    last_order,
                    NOW,
                    NOW,
                )
            )
            if orders:
                counts.append((cid, "Order Completed", orders, last_order, last_order))
        await conn.copy_records_to_table(
            "customers",
            records=rows,
            columns=[
                "customer_id",
                "traits",
                "first_seen",
                "last_seen",
                "event_count",
                "orders_count",
                "revenue",
                "first_order_at",
                "last_order_at",
                "created_at",
                "updated_at",
            ],
        )
        await conn.copy_records_to_table(
            "event_counts", records=counts, columns=["customer_id", "event", "count", "first_at", "last_at"]
        )
        await conn.execute("ANALYZE customers; ANALYZE event_counts")
    finally:
        await conn.close()


async def backfill(settings: SegmenterSettings) -> None:
    app = create_app(settings.model_copy(update={"run_background_loops": False}))
    async with app.router.lifespan_context(app):
        t = time.perf_counter()
        await load_profiles(settings, N_PROFILES)
        line(f"COPY {N_PROFILES} profiles (setup)", time.perf_counter() - t, "s")
        platform = app.state.platform
        for label, definition in [
            (
                "trait + profile rule",
                {
                    "and": [
                        {"trait": "plan", "op": "equals", "value": "pro"},
                        {"profile": "orders_count", "op": "gte", "value": 2},
                    ]
                },
            ),
            (
                "behaviour rule (30d lapse, timers)",
                {
                    "and": [
                        {"performed": "Order Completed"},
                        {"not_performed": "Order Completed", "since": "30d"},
                    ]
                },
            ),
        ]:
            sid = f"seg_backfill_{uuid.uuid4().hex[:6]}"
            async with platform.unit_of_work() as uow:
                await segment_store.insert_segment(uow.session, sid, label, "", definition, datetime.now(UTC))
            started = time.perf_counter()
            await app.state.segmenter.backfill.run_until_idle()
            elapsed = time.perf_counter() - started
            async with platform.unit_of_work() as uow:
                row = await segment_store.get_segment(uow.session, sid)
                members = await segment_store.member_count(uow.session, sid)
            assert row is not None and row["status"] == "ready"
            line(f"back-fill {label} over {row['backfill_done']} profiles (goal < 60 s)", elapsed, "s")
            line("  members entered (announced via outbox)", float(members))


# --------------------------------------------------------------------------- 3. latency


async def analyze(settings: SegmenterSettings) -> None:
    """The planner statistics a running system has: autovacuum analyzes a table once a tenth of it has
    changed, within a minute. This database is seconds old and was filled by the throughput phase, so
    it has none, and the per-batch reads (`customer_id = ANY(...)`) were planned as sequential scans
    of the whole events, memberships and timers tables (27 ms a batch instead of a few)."""
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        # This schema's tables only: a bare ANALYZE would take every table of the database.
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", settings.db_schema)
        started = time.perf_counter()
        if tables:
            names = ", ".join(f'"{settings.db_schema}"."{t["tablename"]}"' for t in tables)
            await conn.execute(f"ANALYZE {names}")
        line("ANALYZE, as autovacuum would have by now (setup)", time.perf_counter() - started, "s")
    finally:
        await conn.close()


async def latency(settings: SegmenterSettings, max_rate: float) -> None:
    """One service process (`python -m services.segmenter`, whose maximum the throughput phase
    measured); the load generator and the announcement watcher run in a child process of their own.
    Replicas are not used here: at the same rate two of them were slower than one (p99 339 against
    261 ms at 3,000/s), each paying a unit of work's fixed cost for half the events."""
    rate = float(os.environ.get("BENCH_LATENCY_RATE", 0)) or max(50.0, max_rate / 2)
    await ensure_segments(settings)
    await analyze(settings)
    async with Replicas(settings, 1):
        child = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "bench.segmenter",
                "--latency-load",
                settings.kafka_bootstrap_servers,
                settings.topic(CUSTOMER_EVENTS.name),
                settings.topic(SEGMENT_MEMBERSHIP.name),
                str(rate),
                str(int(rate * LATENCY_S)),
                str(int(rate * LATENCY_WARMUP_S)),
            ],
            stdout=subprocess.PIPE,  # its errors go to our stderr
            check=True,
        )
    result = orjson.loads(child.stdout)
    delays: list[float] = result["delays"]
    line("latency test rate (half of max unless BENCH_LATENCY_RATE)", rate, "events/s")
    line("  announcements received (distinct event ids)", float(len(delays)), f"of {result['sent']}")
    line("  same event id received again (relay retries)", float(result["redelivered"]))
    line("event -> membership announcement p50", percentile(delays, 50) * 1000, "ms")
    line("event -> membership announcement p99 (goal < 200)", percentile(delays, 99) * 1000, "ms")
    to_emit: list[float] = result["to_emit"]
    line("  event -> announcement emitted (in the unit of work) p50", percentile(to_emit, 50) * 1000, "ms")
    line("  event -> announcement emitted (in the unit of work) p99", percentile(to_emit, 99) * 1000, "ms")


async def latency_load(
    bootstrap: str, events_topic: str, membership_topic: str, rate: float, n: int, warmup: int
) -> None:
    """In the child process: post `warmup` + `n` events at `rate` (open loop, 10 ms ticks), the
    throughput phase's mix over its customers (so the load costs per event what the maximum was
    measured with); after the warm-up, one in TIMED_EVERY is replaced by a new customer's first
    `Order Completed`, whose announcement for the watched segment is timed; prints JSON for the
    parent."""
    watcher = AIOKafkaConsumer(
        membership_topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="latest",
        enable_auto_commit=False,
    )
    await watcher.start()
    await watcher.seek_to_end()
    for tp in watcher.assignment():
        await watcher.position(tp)
    sent: dict[str, float] = {}  # time.time(): comparable with the produced-at header
    delays: list[float] = []
    to_emit: list[float] = []  # event sent -> announcement emitted by the handler (its produced-at header)
    seen_ids: set[str] = set()
    redelivered = 0
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal redelivered
        while not stop.is_set():
            batch = await watcher.getmany(timeout_ms=50)
            now = time.time()
            for records in batch.values():
                for r in records:
                    v = orjson.loads(r.value)
                    if v["segment_id"] != "seg_bench_05" or v["cause"] not in sent:
                        continue
                    if v["event_id"] in seen_ids:
                        redelivered += 1  # at-least-once transport: same event id, consumers drop it
                        continue
                    seen_ids.add(v["event_id"])
                    delays.append(now - sent[v["cause"]])
                    produced = dict(r.headers).get(Headers.PRODUCED_AT_MS)
                    if produced is not None:
                        to_emit.append(int(produced) / 1000 - sent[v["cause"]])

    watching = asyncio.create_task(watch())
    producer = EventProducer(SegmenterSettings(kafka_bootstrap_servers=bootstrap))
    await producer.start()
    total = warmup + n
    background = make_events(total, N_CUSTOMERS, "u", seed=2, id_prefix="lat-bg")
    # Encoded before the clock starts, and sent a record batch per partition as ingest sends them: the
    # generator shares the two cores with what it measures (15-17% of a core as it was).
    messages, timed = [], {}
    for i, e in enumerate(background):
        if i >= warmup and not i % TIMED_EVERY:
            e = CustomerEvent(
                message_id=f"lat-{i}",
                type="track",
                user_id=f"lat{i}",
                event="Order Completed",
                properties={"revenue": 10},
                timestamp=datetime.now(UTC),
                received_at=datetime.now(UTC),
            )
            timed[i] = e.message_id
        messages.append(encode_message(events_topic, e.customer_key, e, producer="bench"))
    del background
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    start = time.perf_counter()
    i = 0
    while i < total:
        chunk = messages[i : i + per_tick]
        now = time.time()
        for j in range(i, i + len(chunk)):
            if j in timed:
                sent[timed[j]] = now
        await producer.send_batched(chunk)
        i += len(chunk)
        await asyncio.sleep(max(0.0, start + (i / rate) - time.perf_counter()))
    deadline = time.perf_counter() + 15
    while len(delays) < len(sent) and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    stop.set()
    await watching
    await watcher.stop()
    await producer.stop()
    result = {"delays": delays, "to_emit": to_emit, "sent": len(sent), "redelivered": redelivered}
    print(orjson.dumps(result).decode(), flush=True)


async def main() -> None:
    run = uuid.uuid4().hex[:6]
    settings = SegmenterSettings(
        topic_prefix=f"bench{run}.",
        db_schema=f"segmenter_bench_{run}",
        db_pool_size=10,
        log_level="WARNING",
    )
    await ensure_topics(settings)
    try:
        rate = await throughput(settings) if "throughput" in PHASES else 2000.0
        if "latency" in PHASES:
            await latency(settings, rate)
        # After the latency phase, so that autovacuum is not still working off its 100k updates then.
        if "scaleout" in PHASES and REPLICAS > 1:
            await scale_out(settings)
        if "backfill" in PHASES:
            await backfill(settings)
    finally:
        await drop_schema(settings.database_url, settings.db_schema)
    last_line("segmenter_events_per_s", rate)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--latency-load"]:
        bootstrap, events_topic, membership_topic, rate, n, warmup = sys.argv[2:8]
        asyncio.run(latency_load(bootstrap, events_topic, membership_topic, float(rate), int(n), int(warmup)))
    else:
        # The service runs in this process: on uvloop, as `python -m services.segmenter` runs it.
        uvloop.run(main())

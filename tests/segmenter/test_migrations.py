"""Migrations 0005 and 0006 repair what earlier versions stored for hostile events: infinite times
(events stamped 0001-01-01 or 9999-12-31, asyncpg's datetime.min/max) and infinite revenue (order
amounts summed past float8), which made every later event of their customer fail. Migration 0014
counts a back-fill pass's failed chunks on the segment; 0015 parks due timers that keep failing."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text

from services.segmenter.app import MIGRATIONS
from services.segmenter.settings import SegmenterSettings
from shared.db.engine import create_engine, ensure_schema
from shared.db.migrations import run_migrations


async def test_infinite_times_and_revenue_are_repaired(make_settings: Any) -> None:
    settings = make_settings(SegmenterSettings)
    await ensure_schema(settings.database_url, settings.db_schema)
    engine = create_engine(settings.database_url, settings.db_schema)
    try:
        await run_migrations(engine, MIGRATIONS, settings.db_schema, revision="0004_identity_owner_index")
        async with engine.begin() as conn:
            for sql in [
                "INSERT INTO customers (customer_id, first_seen, last_seen, event_count, revenue) "
                "VALUES ('bad', '-infinity', 'infinity', 2, 'Infinity'), "
                "('good', '2026-01-01Z', '2026-02-01Z', 1, 5)",
                "INSERT INTO events (customer_id, message_id, type, event, properties, traits, timestamp, "
                "received_at) VALUES ('bad', 'o1', 'track', 'Order Completed', '{\"revenue\": 20}', '{}', "
                "'2026-01-01Z', '2026-01-01Z'), ('bad', 'o2', 'track', 'Order Completed', "
                "'{\"revenue\": 1e308}', '{}', '2026-01-02Z', '2026-01-02Z')",
                "INSERT INTO event_counts (customer_id, event, count, first_at, last_at) VALUES "
                "('bad', 'A', 1, '-infinity', '2026-01-01Z'), ('bad', 'B', 1, '-infinity', 'infinity'), "
                "('good', 'A', 1, '2026-01-01Z', '2026-01-02Z')",
                "INSERT INTO events (customer_id, message_id, type, event, properties, traits, timestamp, "
                "received_at) VALUES ('bad', 'm1', 'track', 'A', '{}', '{}', '-infinity', '2026-03-01Z')",
                "INSERT INTO segment_timers (customer_id, segment_id, due_at) VALUES "
                "('bad', 's', 'infinity'), ('good', 's', '2026-04-01Z')",
            ]:
                await conn.execute(text(sql))
        await run_migrations(engine, MIGRATIONS, settings.db_schema)
        async with engine.connect() as conn:
            customers = (
                await conn.execute(
                    text(
                        "SELECT customer_id, first_seen IS NULL, last_seen IS NULL FROM customers ORDER BY 1"
                    )
                )
            ).all()
            assert [tuple(r) for r in customers] == [("bad", True, True), ("good", False, False)]
            counts = (
                await conn.execute(
                    text(
                        "SELECT customer_id, event, first_at::text, last_at::text FROM event_counts "
                        "ORDER BY 1, 2"
                    )
                )
            ).all()
            assert [(r[0], r[1], r[2] == r[3]) for r in counts] == [("bad", "A", True), ("good", "A", False)]
            moved = await conn.scalar(
                text("SELECT timestamp = received_at FROM events WHERE message_id = 'm1'")
            )
            assert moved is True
            timers = (await conn.execute(text("SELECT customer_id FROM segment_timers"))).scalars().all()
            assert timers == ["good"]
            revenue = (
                await conn.execute(text("SELECT customer_id, revenue FROM customers ORDER BY 1"))
            ).all()
            assert [tuple(r) for r in revenue] == [("bad", 20.0), ("good", 5.0)]
    finally:
        await engine.dispose()


def _downgrade(connection: Connection, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, revision)


async def test_backfill_failures_both_ways(make_settings: Any) -> None:
    """0014 counts a pass's failed chunks on the segment; its downgrade keeps `failed` segments so (an
    older release would otherwise claim them first on every pass again)."""
    settings = make_settings(SegmenterSettings)
    await ensure_schema(settings.database_url, settings.db_schema)
    engine = create_engine(settings.database_url, settings.db_schema)
    columns = (
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = 'segments' AND column_name LIKE 'backfill_%' ORDER BY 1"
    )
    try:
        await run_migrations(engine, MIGRATIONS, settings.db_schema, revision="0013_outbox_packed")
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO segments (segment_id, name, definition, status, created_at, updated_at) "
                    "VALUES ('s1', 'a', '{}', 'backfilling', now(), now())"
                )
            )
        await run_migrations(engine, MIGRATIONS, settings.db_schema)
        async with engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT backfill_failures, backfill_stalls, backfill_error, backfill_failed_at, "
                        "backfill_failed_pass FROM segments"
                    )
                )
            ).one()
            assert tuple(row) == (0, 0, None, None, None)
            await conn.execute(text("UPDATE segments SET status = 'failed', backfill_failures = 3"))
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, "0013_outbox_packed")
        async with engine.connect() as conn:
            assert (await conn.execute(text(columns))).scalars().all() == [
                "backfill_cursor",
                "backfill_done",
                "backfill_finished_at",
                "backfill_started_at",
                "backfill_total",
            ]
            assert await conn.scalar(text("SELECT status FROM segments")) == "failed"
    finally:
        await engine.dispose()


async def test_segment_timers_parked_both_ways(make_settings: Any) -> None:
    """0015 adds `segment_timers.attempts` and `.stalls` (existing timers: none counted) and the parked
    table; its downgrade puts parked timers back among the due ones (a timer written since for the
    same pair, by an evaluation after the parking, is kept as it is)."""
    settings = make_settings(SegmenterSettings)
    await ensure_schema(settings.database_url, settings.db_schema)
    engine = create_engine(settings.database_url, settings.db_schema)
    try:
        await run_migrations(engine, MIGRATIONS, settings.db_schema, revision="0014_backfill_failures")
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO segment_timers (customer_id, segment_id, due_at) VALUES "
                    "('a', 's', '2026-04-01Z'), ('b', 's', '2026-04-02Z')"
                )
            )
        await run_migrations(engine, MIGRATIONS, settings.db_schema)
        async with engine.begin() as conn:
            rows = (
                await conn.execute(
                    text("SELECT customer_id, attempts, stalls FROM segment_timers ORDER BY 1")
                )
            ).all()
            assert [tuple(r) for r in rows] == [("a", 0, 0), ("b", 0, 0)]
            await conn.execute(text("DELETE FROM segment_timers WHERE customer_id = 'a'"))
            await conn.execute(
                text(
                    "INSERT INTO segment_timers_parked "
                    "(segment_id, customer_id, due_at, parked_at, attempts, stalls, error) VALUES "
                    "('s', 'a', '2026-04-01Z', '2026-04-01Z', 3, 0, 'RuntimeError: x'), "
                    "('s', 'b', '2026-03-01Z', '2026-03-01Z', 0, 10, 'QueryCanceledError: y')"
                )
            )
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, "0014_backfill_failures")
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    text("SELECT customer_id, due_at::date::text FROM segment_timers ORDER BY 1")
                )
            ).all()
            assert [tuple(r) for r in rows] == [("a", "2026-04-01"), ("b", "2026-04-02")]
            assert await conn.scalar(text("SELECT to_regclass('segment_timers_parked')")) is None
            columns = await conn.scalar(
                text(
                    "SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema() "
                    "AND table_name = 'segment_timers' AND column_name IN ('attempts', 'stalls')"
                )
            )
            assert columns == 0
    finally:
        await engine.dispose()

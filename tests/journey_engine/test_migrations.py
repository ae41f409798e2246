"""Migrations that carry data forward or back, run against rows written under the other revision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text

import services.journey_engine.store as journey_store
from services.journey_engine.settings import JourneyEngineSettings
from shared.db.engine import create_engine, ensure_schema
from shared.db.migrations import run_migrations
from tests.journey_engine.harness import START

MIGRATIONS = Path(journey_store.__file__).parent / "migrations"


def _downgrade(connection: Connection, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, revision)


async def _columns(conn: Any, schema: str, table: str) -> set[str]:
    rows = await conn.execute(
        text(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = :s AND table_name = :t"
        ),
        {"s": schema, "t": table},
    )
    return {r[0] for r in rows}


async def test_timers_of_the_release_before_are_kept_and_it_runs_beside_this_one(make_settings: Any) -> None:
    """0013 rewrites nothing: timers due before keep their rows (no tries counted), and the release
    before inserts and claims timers as it did, beside this one (rolling upgrade, or undone)."""
    settings = make_settings(JourneyEngineSettings)
    await ensure_schema(settings.database_url, settings.db_schema)
    engine = create_engine(settings.database_url, settings.db_schema)
    try:
        await run_migrations(engine, MIGRATIONS, settings.db_schema, "0012_outbox_packed")
        async with engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO timers (instance_id, seq, due_at) VALUES ('i-1', 1, :t)"), {"t": START}
            )
        await run_migrations(engine, MIGRATIONS, settings.db_schema)
        async with engine.begin() as conn:
            # The release before's statements (`store.instances`, 0012).
            await conn.execute(
                text("INSERT INTO timers (instance_id, seq, due_at) VALUES ('i-2', 1, :t)"), {"t": START}
            )
            claimed = await conn.execute(
                text(
                    "DELETE FROM timers WHERE id = ANY(ARRAY(SELECT id FROM timers WHERE due_at <= :now "
                    "ORDER BY due_at LIMIT :n FOR UPDATE SKIP LOCKED)) RETURNING instance_id, seq, due_at"
                ),
                {"now": START, "n": 1},
            )
            assert len(claimed.all()) == 1
            rows = (await conn.execute(text("SELECT instance_id, attempts FROM timers"))).all()
            assert len(rows) == 1 and rows[0][1] == 0
    finally:
        await engine.dispose()


async def test_parked_timers_go_back_to_the_due_ones_on_a_downgrade(make_settings: Any) -> None:
    settings = make_settings(JourneyEngineSettings)
    await ensure_schema(settings.database_url, settings.db_schema)
    engine = create_engine(settings.database_url, settings.db_schema)
    try:
        await run_migrations(engine, MIGRATIONS, settings.db_schema)
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO timers_parked (id, instance_id, seq, due_at, parked_at, attempts, error) "
                    "VALUES (7, 'i-1', 2, :t, :t, 3, 'boom')"
                ),
                {"t": START},
            )
            await conn.run_sync(_downgrade, "0012_outbox_packed")
        async with engine.connect() as conn:
            timers = (await conn.execute(text("SELECT instance_id, seq, due_at FROM timers"))).all()
            parked = await conn.scalar(text("SELECT to_regclass('timers_parked')"))
            columns = await _columns(conn, settings.db_schema, "timers")
        assert [tuple(t) for t in timers] == [("i-1", 2, START)] and parked is None
        assert columns == {"id", "instance_id", "seq", "due_at"}
    finally:
        await engine.dispose()

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
        assert [tuple(t) for t in timers] == [("i-1", 2, START)] and parked is None
    finally:
        await engine.dispose()

"""A service whose schema a newer version migrated (a rollback, an old replica restarted during a
rollout) starts on it instead of failing on the revision it does not know."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from services.ingest.app import create_app
from services.ingest.settings import IngestSettings
from shared.clock import ManualClock
from shared.db.engine import create_engine, ensure_schema
from shared.db.migrations import run_migrations, unknown_revisions
from tests.support import running

INGEST_MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "ingest" / "store" / "migrations"


async def test_a_schema_migrated_by_a_newer_version_is_used_as_is(
    make_settings: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    settings: IngestSettings = make_settings(IngestSettings, write_keys=["k" * 24])
    await ensure_schema(settings.database_url, settings.db_schema)
    engine = create_engine(settings.database_url, settings.db_schema)
    try:
        await run_migrations(engine, INGEST_MIGRATIONS, settings.db_schema)
        async with engine.begin() as conn:
            assert await conn.run_sync(unknown_revisions, INGEST_MIGRATIONS) == []
            # What a newer version's migration leaves: its revision, a table this code does not know.
            await conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
            await conn.execute(text("CREATE TABLE from_the_future (id int)"))
        async with engine.begin() as conn:
            assert await conn.run_sync(unknown_revisions, INGEST_MIGRATIONS) == ["0099_from_the_future"]
        await run_migrations(engine, INGEST_MIGRATIONS, settings.db_schema)  # no error
        async with engine.connect() as conn:
            stored = await conn.scalar(text("SELECT version_num FROM alembic_version"))
        assert stored == "0099_from_the_future"
    finally:
        await engine.dispose()
    assert "migrated by a newer version" in caplog.text

    # The whole service starts on it and serves.
    async with running(create_app(settings, ManualClock())) as client:
        response = await client.post("/v1/track", json={"userId": "u", "event": "E"}, auth=("k" * 24, ""))
        assert response.status_code == 200, response.text

"""Alembic per service, applied on start inside the service's schema (to all heads: features may
add migrations on separate branches of one service's history; a merge revision joins them later).

A service's `store/migrations/env.py` is two lines: import its metadata and call `run_env(metadata)`.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, MetaData, text
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)


def advisory_key(name: str) -> int:
    return zlib.crc32(name.encode())


def unknown_revisions(connection: Connection, script_location: Path) -> list[str]:
    """The schema's revisions this code's history does not hold: a newer version migrated it."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    script = ScriptDirectory.from_config(cfg)
    unknown = []
    for revision in MigrationContext.configure(connection).get_current_heads():
        try:
            known = script.get_revision(revision) is not None
        except CommandError:  # alembic's "Can't locate revision identified by ..."
            known = False
        if not known:
            unknown.append(revision)
    return unknown


def _upgrade(connection: Connection, script_location: Path, revision: str) -> None:
    # An older version starting against a schema a newer one migrated (a rollback, an old replica
    # restarted mid-rollout): migrations are written for old and new code to run side by side, so
    # it runs on that schema as is. Upgrading would fail on the unknown revision, and the process
    # would restart until its deadline, for good.
    if ahead := unknown_revisions(connection, script_location):
        log.warning(
            "the schema was migrated by a newer version; running on it without migrating",
            extra={"schema_revisions": ahead, "migrations": str(script_location)},
        )
        return
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def run_migrations(
    engine: AsyncEngine, script_location: Path, schema: str, revision: str = "heads"
) -> None:
    async with engine.begin() as conn:
        # Two replicas starting at once must not both migrate.
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key(f"migrate:{schema}")})
        await conn.run_sync(_upgrade, script_location, revision)


def run_env(metadata: MetaData) -> None:
    """Body of every service's Alembic env.py (online mode, on the connection `run_migrations` gave)."""
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("CLM migrations run on start through shared.db.migrations.run_migrations")
    context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=False)
    with context.begin_transaction():
        context.run_migrations()

"""The packed outbox's migration (`shared.db.messaging_tables`), both ways, on rows waiting: the
downgrade unpacks packed rows in the order the relay would publish them, and keeps parked messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text

import services.ingest.store as ingest_store
from services.ingest.settings import IngestSettings
from shared.db.engine import create_engine, ensure_schema
from shared.db.migrations import run_migrations

MIGRATIONS = Path(ingest_store.__file__).parent / "migrations"


def _downgrade(connection: Connection, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, revision)


def _message(n: int) -> list[Any]:
    return ["t", f"k{n}", orjson.dumps({"n": n}).decode(), {"clm-event-id": f"e{n}"}]


async def test_the_downgrade_unpacks_waiting_rows_in_order_and_keeps_parked_messages(
    make_settings: Any,
) -> None:
    settings = make_settings(IngestSettings)
    await ensure_schema(settings.database_url, settings.db_schema)
    engine = create_engine(settings.database_url, settings.db_schema)
    try:
        await run_migrations(engine, MIGRATIONS, settings.db_schema, "0005_outbox_packed")
        async with engine.begin() as conn:
            storage = await conn.scalar(
                text(
                    "SELECT attstorage FROM pg_attribute WHERE attrelid = 'outbox'::regclass "
                    "AND attname = 'value'"
                )
            )
            assert storage in ("e", b"e")  # EXTERNAL: stored uncompressed
            await conn.execute(
                text("INSERT INTO outbox (value, messages) VALUES (:v, 2)"),
                {"v": orjson.dumps([_message(1), _message(2)])},
            )
            await conn.execute(
                text(
                    "INSERT INTO outbox (topic, key, value, headers) "
                    "VALUES ('t', 'k3', convert_to('{\"n\": 3}', 'UTF8'), '{\"clm-event-id\": \"e3\"}')"
                )
            )
            await conn.execute(
                text("INSERT INTO outbox (value, messages) VALUES (:v, 1)"),
                {"v": orjson.dumps([_message(4)])},
            )
            for part in (0, 2):
                await conn.execute(
                    text(
                        "INSERT INTO outbox_parked (id, part, topic, value, headers, created_at, reason) "
                        "VALUES (1, :p, 't', 'x', '{}', now(), 'too large')"
                    ),
                    {"p": part},
                )
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, "0004_outbox_parked")
        async with engine.connect() as conn:
            rows = (
                await conn.execute(text("SELECT topic, key, value, headers FROM outbox ORDER BY id"))
            ).all()
            parked_ids = list(
                (await conn.execute(text("SELECT id FROM outbox_parked ORDER BY id"))).scalars()
            )
            max_outbox_id = await conn.scalar(text("SELECT max(id) FROM outbox"))
            storage = await conn.scalar(
                text(
                    "SELECT attstorage FROM pg_attribute "
                    "WHERE attrelid = 'outbox'::regclass AND attname = 'value'"
                )
            )
            key = list(
                (
                    await conn.execute(
                        text(
                            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'outbox_parked'::regclass "
                            "AND i.indisprimary"
                        )
                    )
                ).scalars()
            )
        assert [(t, k, orjson.loads(v)["n"], h["clm-event-id"]) for t, k, v, h in rows] == [
            ("t", f"k{n}".encode(), n, f"e{n}") for n in (1, 2, 3, 4)
        ]
        # The message parked from a packed row: an id of its own, never one an outbox row had or has.
        assert len(parked_ids) == 2 and parked_ids[0] == 1 and parked_ids[1] > max_outbox_id
        assert storage in ("x", b"x") and key == ["id"]
        await run_migrations(engine, MIGRATIONS, settings.db_schema)  # and up again
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM outbox WHERE messages IS NULL")) == 4
    finally:
        await engine.dispose()

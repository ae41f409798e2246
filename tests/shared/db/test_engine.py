"""`shared.db.engine.driver_autocommit`: single statements on a pooled asyncpg connection, each
committed on its own, in one round trip (no BEGIN, no COMMIT)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from shared.db.engine import Statement, driver_autocommit
from shared.runtime import Platform
from shared.settings import BaseServiceSettings
from tests.support import messaging_platform


class EngineSettings(BaseServiceSettings):
    service_name: str = "engine_test"
    db_schema: str = "engine"


@pytest.fixture
async def platform(make_settings: Callable[..., Any]) -> AsyncIterator[Platform]:
    async with messaging_platform(make_settings(EngineSettings)) as p:
        async with p.engine.begin() as conn:
            await conn.execute(text("CREATE TABLE counters (id text PRIMARY KEY, n int NOT NULL)"))
            await conn.execute(text("INSERT INTO counters VALUES ('a', 0)"))
        yield p


_BUMP = Statement("UPDATE counters SET n = n + 1 WHERE id = :id RETURNING n")


async def test_each_statement_commits_on_its_own_in_one_round_trip(platform: Platform) -> None:
    async with driver_autocommit(platform.engine) as conn:
        sent: list[str] = []

        def log(query: asyncpg.connection.LoggedQuery) -> None:
            sent.append(query.query)

        conn.add_query_logger(log)
        assert [r[0] for r in await _BUMP.fetch(conn, {"id": "a"})] == [1]
        # Committed already: another connection sees it while this one is still held.
        async with platform.engine.connect() as other:
            assert await other.scalar(text("SELECT n FROM counters")) == 1
        # A failing statement takes nothing back with it.
        with pytest.raises(asyncpg.PostgresError):
            await conn.execute("UPDATE counters SET n = n / 0")
        await asyncio.sleep(0.05)  # asyncpg calls query loggers soon after the query
        conn.remove_query_logger(log)
    assert sent[0] == _BUMP.sql and not any(q.strip().upper() in ("BEGIN", "COMMIT") for q in sent)
    async with platform.engine.connect() as other:
        assert await other.scalar(text("SELECT n FROM counters")) == 1
    # The connection goes back to the pool clean: the next user gets no transaction of ours.
    async with driver_autocommit(platform.engine) as conn:
        assert not conn.is_in_transaction()

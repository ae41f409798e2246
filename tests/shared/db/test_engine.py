"""`shared.db.engine.driver_autocommit`: single statements on a pooled asyncpg connection, each
committed on its own, in one round trip (no BEGIN, no COMMIT)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from shared.db.engine import (
    Statement,
    array_from_json,
    create_engine,
    driver_autocommit,
    ensure_schema,
    json_list,
    json_rows,
    rows_from_json,
    session_factory,
)
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


# --------------------------------------------------------------------------- JSON-parameter batches

_ROUND_TRIP = Statement(
    "SELECT * FROM "
    + rows_from_json(
        "rows",
        [
            ("t", "text"),
            ("i", "bigint"),
            ("f", "float8"),
            ("b", "boolean"),
            ("ts", "timestamptz"),
            ("j", "jsonb"),
        ],
        ordinality="n",
    )
    + " AS x ORDER BY n"
)
_ANY = Statement(f"SELECT s FROM unnest(CAST(:all AS text[])) AS s WHERE s = ANY({array_from_json('some')})")
_INTS = Statement(f"SELECT {array_from_json('xs', 'int')}")


async def test_json_rows_come_back_as_the_values_and_types_sent(platform: Platform) -> None:
    """Every type the batch statements send, at its edges: quotes, backslashes and non-ASCII text,
    64-bit ints, floats to the last bit, microseconds and offsets, nested JSON (its own nulls kept),
    SQL NULL in every column; a naive time is taken as UTC, as asyncpg takes it."""
    aware = datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5)))
    rows: list[tuple[Any, ...]] = [
        (
            'q"uo\\te \u00e6\u00f8\u00e5 \U0001f600',
            2**62 + 1,
            0.1 + 0.2,
            True,
            aware,
            {"a": [1, None, {"b": "c"}]},
        ),
        ("", -(2**63), -1.5e-300, False, datetime(2026, 1, 1, 12, 0), []),
        (None, None, None, None, None, None),
        ("nan", 0, float("nan"), False, aware, {"x": None}),
    ]
    async with driver_autocommit(platform.engine) as conn:
        got = [tuple(r) for r in await _ROUND_TRIP.fetch(conn, {"rows": json_rows(rows)})]
    assert got[0] == (*rows[0], 1)
    assert got[1] == ("", -(2**63), -1.5e-300, False, datetime(2026, 1, 1, 12, 0, tzinfo=UTC), [], 2)
    assert got[2] == (None, None, None, None, None, None, 3)
    # JSON has no NaN: it arrives as NULL (callers send finite numbers).
    assert got[3] == ("nan", 0, None, False, aware, {"x": None}, 4)
    assert got[0][4].utcoffset() == timedelta(0) and got[0][4] == aware


async def test_json_lists_read_as_arrays_in_order(platform: Platform) -> None:
    async with driver_autocommit(platform.engine) as conn:
        some = ["b", 'd"', "\u00e6"]
        got = await _ANY.fetch(conn, {"all": ["a", "b", "c", 'd"', "\u00e6"], "some": json_list(some)})
        assert sorted(r[0] for r in got) == sorted(some)
        assert (await _INTS.fetch(conn, {"xs": json_list([3, 1, 2])}))[0][0] == [3, 1, 2]
        assert (await _INTS.fetch(conn, {"xs": json_list([])}))[0][0] == []


async def test_statements_stay_in_their_sessions_transaction_across_transactions(platform: Platform) -> None:
    """`driver_connection` keeps the asyncpg connection for the session's transaction: a statement
    of the next transaction (same session) must not run on the last one's, nor outside any."""
    bump = Statement("UPDATE counters SET n = n + 1 WHERE id = 'a'")
    read = Statement("SELECT n FROM counters WHERE id = 'a'")
    async with platform.sessions() as session:
        async with session.begin():
            await bump.execute(session)
            await bump.execute(session)
            assert (await read.fetch(session))[0][0] == 2
            await session.rollback()
        async with session.begin():
            assert (await read.fetch(session))[0][0] == 0  # the rollback took both
            await bump.execute(session)
        async with session.begin():
            await bump.execute(session)
            await session.rollback()
        async with session.begin():
            await bump.execute(session)
    async with platform.engine.connect() as conn:
        assert (await conn.execute(text("SELECT n FROM counters WHERE id = 'a'"))).scalar_one() == 2


async def test_a_sessions_next_transaction_never_borrows_the_connection_another_session_now_holds(
    platform: Platform,
) -> None:
    """The pooled connection a session's last transaction used may be another session's now: the
    next transaction gets a connection of its own (else its statement would run in, and roll back
    with, the other session's transaction)."""
    s = platform.settings
    engine = create_engine(s.database_url, s.db_schema, pool_size=1)  # one pooled connection (+1 overflow)
    sessions = session_factory(engine)
    bump = Statement("UPDATE counters SET n = n + 1 WHERE id = :id")
    try:
        async with platform.engine.begin() as conn:
            await conn.execute(text("INSERT INTO counters VALUES ('b', 0)"))
        async with sessions() as a, sessions() as b:
            async with a.begin():
                await bump.execute(a, {"id": "b"})
            await b.begin()
            await bump.execute(b, {"id": "a"})  # the connection `a` gave back
            async with a.begin():
                await bump.execute(a, {"id": "b"})
            await b.rollback()
    finally:
        await engine.dispose()
    async with platform.engine.connect() as conn:
        rows = {r[0]: r[1] for r in await conn.execute(text("SELECT id, n FROM counters ORDER BY id"))}
    assert rows == {"a": 0, "b": 2}


@pytest.mark.parametrize("sslmode", ["disable", "prefer"])
async def test_a_url_with_libpq_parameters_connects(make_settings: Callable[..., Any], sslmode: str) -> None:
    """`?sslmode=...` (what managed databases hand out) reaches asyncpg as libpq does, for the
    engine as for the schema set-up; the local server has no TLS, so `prefer` falls back to plain."""
    settings = make_settings(EngineSettings)
    separator = "&" if "?" in settings.database_url else "?"
    url = f"{settings.database_url}{separator}sslmode={sslmode}"
    await ensure_schema(url, settings.db_schema)
    engine = create_engine(url, settings.db_schema)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT current_schema()")) == settings.db_schema
            # The JSON codec is still the engine's (orjson, non-string keys allowed).
            as_json = text("SELECT :v").bindparams(bindparam("v", type_=JSONB))
            assert await conn.scalar(as_json, {"v": {1: "a"}}) == {"1": "a"}
    finally:
        await engine.dispose()

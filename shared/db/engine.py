"""Async SQLAlchemy engines bound to one service's PostgreSQL schema (via `search_path`)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import asyncpg
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


def asyncpg_dsn(url: str) -> str:
    """The plain `postgresql://` form asyncpg accepts."""
    for prefix in ("postgresql+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def sqlalchemy_url(url: str) -> str:
    return "postgresql+asyncpg://" + asyncpg_dsn(url)[len("postgresql://") :]


def create_engine(
    url: str, schema: str, *, pool_size: int = 10, echo: bool = False, plan_cache_mode: str = "auto"
) -> AsyncEngine:
    # Every connection sees only the service's own schema first: tables are declared without a
    # schema, so tests can give each test a fresh schema of its own.
    server_settings = {
        "search_path": f'"{schema}",public',
        "application_name": schema,
        # asyncpg keeps statements prepared, so a generic plan chosen early (costed for a 10-row
        # unnest and the table sizes of that moment) can stay for good: see `db_plan_cache_mode`.
        "plan_cache_mode": plan_cache_mode,
    }
    dsn = asyncpg_dsn(url)

    async def connect() -> asyncpg.Connection:
        # asyncpg reads the URL itself, as libpq does: `?sslmode=require`, `sslrootcert=`, several
        # hosts, `target_session_attrs=` (the forms managed databases hand out). Through SQLAlchemy's
        # URL they became keyword arguments asyncpg does not take, and no connection was made.
        return await asyncpg.connect(dsn, server_settings=server_settings)

    return create_async_engine(
        sqlalchemy_url(url),
        async_creator=connect,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        echo=echo,
        # orjson instead of the stdlib for jsonb columns: profiles, timelines and outbox rows are JSON-heavy.
        json_serializer=json_text,
        json_deserializer=orjson.loads,
    )


def json_text(value: Any) -> str:
    """JSON for a jsonb parameter (orjson; non-string keys allowed, as the stdlib allows them)."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def json_rows(rows: Iterable[Sequence[Any]]) -> str:
    """Many rows as one jsonb parameter (an array of arrays), read back in SQL by `rows_from_json`.

    Values: str, int, float, bool, None, timezone-aware datetimes and JSON values; a row may be a
    NamedTuple. Stricter than asyncpg's arrays: no numpy scalars or `date`s, an int column needs a
    Python int; a naive datetime is written as UTC (asyncpg took it as the host's local time; CLM's
    times are aware); NaN and infinities become null (JSON has none); and the whole value must stay
    under jsonb's 256 MB (a statement's parameters could reach 1 GB before).

    For batch statements: asyncpg encodes an array parameter element by element (0.5-2 us each,
    mostly `collections.abc` checks; timestamps the dearest), orjson a whole batch in one call. On a
    2,000-row, 8-column timeline insert: 13-15 ms less client CPU than an unnest of arrays, 3.5-4.5 ms
    more database CPU (it parses the JSON and the text of the times)."""
    return _json_array(rows)


def _as_array(value: Any) -> Any:
    """orjson's fallback: a NamedTuple (orjson takes only plain tuples) as its fields."""
    if isinstance(value, tuple):
        return tuple(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_array(values: Iterable[Any]) -> str:
    values = values if isinstance(values, list) else list(values)
    options = orjson.OPT_NON_STR_KEYS | orjson.OPT_NAIVE_UTC
    return orjson.dumps(values, default=_as_array, option=options).decode()


def rows_from_json(param: str, columns: Sequence[tuple[str, str]], *, ordinality: str | None = None) -> str:
    """SQL: a subquery over `json_rows(...)` passed as `:param`, one typed column per array position
    (`columns`: name and PostgreSQL type, `jsonb` for a JSON value, JSON null read as SQL NULL).
    `ordinality`: also a bigint column of that name numbering the rows from 1, in the given order."""
    values = []
    for i, (name, kind) in enumerate(columns):
        if kind == "jsonb":
            values.append(f"NULLIF(r.v->{i}, 'null'::jsonb) AS {name}")
        elif kind == "text":
            values.append(f"r.v->>{i} AS {name}")
        else:
            values.append(f"CAST(r.v->>{i} AS {kind}) AS {name}")
    if ordinality:
        values.append(f"r.n AS {ordinality}")
    # The LIMIT (the array's length: every row) lowers the planner's row estimate to the batch's
    # size, at most the 100 rows it assumes for a set-returning function (a generic plan: 10): a
    # 10-row batch joined to a 20k-row table was a hash join over a scan of the whole table (4 ms)
    # instead of 10 index probes (0.3 ms). It also keeps the subquery from being merged into the
    # outer query (~1.5 ms more on a join of two 4,000-row batches; not seen in the segmenter's
    # figures).
    return (
        f"(SELECT {', '.join(values)} FROM jsonb_array_elements(CAST(:{param} AS jsonb)) "
        f"WITH ORDINALITY AS r(v, n) LIMIT jsonb_array_length(CAST(:{param} AS jsonb)))"
    )


def json_list(values: Iterable[Any]) -> str:
    """A list of values as one jsonb parameter, read back in SQL by `array_from_json` (same types and
    reasons as `json_rows`: for a 2,000-id `= ANY(...)` read, 3.1-3.5 -> 1.6 ms of client CPU)."""
    return _json_array(values)


def array_from_json(param: str, kind: str = "text") -> str:
    """SQL: an array of `kind` from `json_list(...)` passed as `:param`, in its order (for
    `x = ANY(...)`; a sub-select, so name it once in a MATERIALIZED CTE when a statement reads it
    several times)."""
    if kind == "text":
        return f"ARRAY(SELECT jsonb_array_elements_text(CAST(:{param} AS jsonb)))"
    return f"ARRAY(SELECT CAST(x AS {kind}) FROM jsonb_array_elements_text(CAST(:{param} AS jsonb)) AS x)"


_UNKNOWN = object()
# A session's `info` key: its transaction's asyncpg connection (`driver_connection`).
_DRIVER = "clm.driver_connection"


def _asyncpg(driver: Any) -> asyncpg.Connection:
    assert isinstance(driver, asyncpg.Connection), "the engine's driver is asyncpg"
    return driver


async def driver_connection(session: AsyncSession) -> asyncpg.Connection:
    """The asyncpg connection under `session`, inside the session's transaction (begun if it was not).

    For the few statements every batch runs (inbox, outbox, erasure gate): through it a statement
    costs ~140 us less CPU than through `session.execute` (measured: 230 vs 370 us a one-statement
    transaction), and it still commits or rolls back with the session.
    """
    # Kept for the transaction: SQLAlchemy's way to it costs ~40 us of CPU a statement, and a unit of
    # work sends a dozen or more.
    cached = session.info.get(_DRIVER)
    if cached is not None:
        held_for, held_adapter, held_driver = cached
        if held_for is session.sync_session.get_transaction() and held_adapter._transaction is not None:
            return _asyncpg(held_driver)
    conn = await session.connection()
    fairy = await conn.get_raw_connection()
    adapter: Any = fairy.dbapi_connection
    # SQLAlchemy's asyncpg adapter sends BEGIN lazily, with its first statement: a statement sent
    # straight to asyncpg before that would run outside the transaction.
    transaction = getattr(adapter, "_transaction", _UNKNOWN)
    if transaction is None:
        await adapter._start_transaction()
    elif transaction is _UNKNOWN:  # an adapter of another shape: let SQLAlchemy begin its usual way
        await session.execute(text("SELECT 1"))
        return _asyncpg(fairy.driver_connection)
    driver = _asyncpg(fairy.driver_connection)
    session.info[_DRIVER] = (session.sync_session.get_transaction(), adapter, driver)
    return driver


class Statement:
    """A SQL text with `:name` parameters, as `sqlalchemy.text` takes, run straight on asyncpg inside
    the session's transaction (`driver_connection`), or on an asyncpg connection in a transaction of
    its own (`driver_transaction`): for the queries every batch runs. Rows are
    asyncpg records (by index, by column name, or unpacked), jsonb decoded as through SQLAlchemy.
    Like `text`, it takes `:word` anywhere as a parameter, so keep such text out of string literals."""

    # `:name`, but not the second colon of a `::type` cast.
    _PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")

    def __init__(self, sql: str) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        self.sql = self._PARAM.sub(number, sql)
        self.names = tuple(names)

    def _args(self, params: Mapping[str, Any] | None) -> list[Any]:
        return [(params or {})[name] for name in self.names]

    @staticmethod
    async def _on(target: AsyncSession | asyncpg.Connection) -> asyncpg.Connection:
        return target if isinstance(target, asyncpg.Connection) else await driver_connection(target)

    async def fetch(
        self, target: AsyncSession | asyncpg.Connection, params: Mapping[str, Any] | None = None
    ) -> list[Any]:
        return list(await (await self._on(target)).fetch(self.sql, *self._args(params)))

    async def execute(
        self, target: AsyncSession | asyncpg.Connection, params: Mapping[str, Any] | None = None
    ) -> int:
        """Runs the statement; returns the rows it affected (INSERT/UPDATE/DELETE) or 0."""
        status = await (await self._on(target)).execute(self.sql, *self._args(params))
        count = status.rsplit(" ", 1)[-1]
        return int(count) if count.isdigit() else 0


@contextlib.asynccontextmanager
async def driver_transaction(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A transaction straight on a pooled asyncpg connection (committed on exit, rolled back on an
    error), for hot paths that run no ORM statement: the outbox relay, ingest's dedupe claim."""
    async with engine.connect() as conn:
        driver = _asyncpg((await conn.get_raw_connection()).driver_connection)
        async with driver.transaction():
            yield driver


@contextlib.asynccontextmanager
async def driver_autocommit(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A pooled asyncpg connection outside any transaction: each statement commits on its own. For
    single-statement writes on hot paths: one round trip, where BEGIN, the statement and COMMIT take
    three (measured: 99 against 258 us of client CPU). Never for two statements that must commit
    together."""
    async with engine.connect() as conn:
        yield _asyncpg((await conn.get_raw_connection()).driver_connection)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


async def ensure_schema(url: str, schema: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    finally:
        await conn.close()


async def drop_schema(url: str, schema: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()

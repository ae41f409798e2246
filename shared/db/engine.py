"""Async SQLAlchemy engines bound to one service's PostgreSQL schema (via `search_path`)."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
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
    return create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        echo=echo,
        # orjson instead of the stdlib for jsonb columns: profiles, timelines and outbox rows are JSON-heavy.
        json_serializer=json_text,
        json_deserializer=orjson.loads,
        connect_args={
            "server_settings": {
                "search_path": f'"{schema}",public',
                "application_name": schema,
                # asyncpg keeps statements prepared, so a generic plan chosen early (costed for a
                # 10-row unnest and the table sizes of that moment) can stay for good: see the
                # `db_plan_cache_mode` setting.
                "plan_cache_mode": plan_cache_mode,
            }
        },
    )


def json_text(value: Any) -> str:
    """JSON for a jsonb parameter (orjson; non-string keys allowed, as the stdlib allows them)."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


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

"""`try_exclusive`: one holder at a time across engines (replicas), released on exit."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.engine import create_engine, ensure_schema
from shared.db.locks import try_exclusive
from shared.settings import BaseServiceSettings


@pytest.fixture
async def replicas(make_settings) -> AsyncIterator[tuple[str, AsyncEngine, AsyncEngine]]:  # type: ignore[no-untyped-def]
    """A lock name of this test's schema and two engines on it, as two replicas of a service have."""
    settings = make_settings(BaseServiceSettings)
    await ensure_schema(settings.database_url, settings.db_schema)
    a = create_engine(settings.database_url, settings.db_schema)
    b = create_engine(settings.database_url, settings.db_schema)
    yield f"{settings.db_schema}:job", a, b
    await a.dispose()
    await b.dispose()


async def test_one_holder_at_a_time_then_released(replicas: tuple[str, AsyncEngine, AsyncEngine]) -> None:
    name, replica_a, replica_b = replicas
    async with try_exclusive(replica_a, name) as first:
        assert first
        async with try_exclusive(replica_b, name) as second:
            assert not second
        async with try_exclusive(replica_b, f"{name}-other") as other:
            assert other
    async with try_exclusive(replica_b, name) as after_release:
        assert after_release


async def test_released_when_the_block_fails(replicas: tuple[str, AsyncEngine, AsyncEngine]) -> None:
    name, failing, other = replicas
    with pytest.raises(RuntimeError):
        async with try_exclusive(failing, name) as got:
            assert got
            raise RuntimeError("job failed")
    # Another session (a lock is re-entrant within one, so the same engine would prove nothing).
    async with try_exclusive(other, name) as again:
        assert again

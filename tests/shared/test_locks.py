"""`try_exclusive`: one holder at a time across engines (replicas), released on exit."""

from __future__ import annotations

from shared.db.engine import create_engine, ensure_schema
from shared.db.locks import try_exclusive
from shared.settings import BaseServiceSettings


async def test_one_holder_at_a_time_then_released(make_settings) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(BaseServiceSettings)
    await ensure_schema(settings.database_url, settings.db_schema)
    replica_a = create_engine(settings.database_url, settings.db_schema)
    replica_b = create_engine(settings.database_url, settings.db_schema)
    name = f"{settings.db_schema}:job"
    try:
        async with try_exclusive(replica_a, name) as first:
            assert first
            async with try_exclusive(replica_b, name) as second:
                assert not second
            async with try_exclusive(replica_b, f"{settings.db_schema}:other-job") as other:
                assert other
        async with try_exclusive(replica_b, name) as after_release:
            assert after_release
    finally:
        await replica_a.dispose()
        await replica_b.dispose()


async def test_released_when_the_block_fails(make_settings) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(BaseServiceSettings)
    await ensure_schema(settings.database_url, settings.db_schema)
    failing = create_engine(settings.database_url, settings.db_schema)
    other = create_engine(settings.database_url, settings.db_schema)
    name = f"{settings.db_schema}:job"
    try:
        try:
            async with try_exclusive(failing, name) as got:
                assert got
                raise RuntimeError("job failed")
        except RuntimeError:
            pass
        # Another session (a lock is re-entrant within one, so the same engine would prove nothing).
        async with try_exclusive(other, name) as again:
            assert again
    finally:
        await failing.dispose()
        await other.dispose()

"""One replica at a time for the background jobs every replica runs on a schedule (a full recompute,
a model refit): PostgreSQL session advisory locks, so no extra coordinator is needed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.migrations import advisory_key


@contextlib.asynccontextmanager
async def try_exclusive(engine: AsyncEngine, name: str) -> AsyncIterator[bool]:
    """Hold the advisory lock `name` for the block if no other session holds it; yields whether it
    was taken (the caller skips its run when not). The lock lives on a connection of its own, so a
    process that dies releases it with its session."""
    key = advisory_key(name)
    async with engine.connect() as conn:
        got = bool(await conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}))
        # A session lock outlives the transaction: commit so the connection is not left idle in one
        # for the whole job.
        await conn.commit()
        try:
            yield got
        finally:
            if got:
                try:
                    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    await conn.commit()
                except BaseException:
                    # Never hand a connection still holding the lock back to the pool: closing its
                    # session releases it.
                    await conn.invalidate()
                    raise

"""Every query on `dedupe`: claiming messageIds for publication, and pruning the past window."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.engine import Statement

# One statement for a whole group of events. An id seen before the window's start is claimed again
# (its row is refreshed); an id claimed by a transaction still in flight makes this one wait for it,
# so a publish that fails (rolled back) never hides a later retry.
# The transaction commits without waiting for its WAL flush (synchronous_commit off, set in the same
# statement to save a round trip): the event itself is durable in Kafka before the commit, and a
# database crash can at worst forget the last fraction of a second of ids, so a client's retry of one
# of those is published again, with the same messageId consumers dedupe on.
# Straight to asyncpg (`Statement`): it runs for every group of events.
_CLAIM = Statement(
    "WITH fast_commit AS (SELECT set_config('synchronous_commit', 'off', true)) "
    "INSERT INTO dedupe (message_id, seen_at) SELECT unnest(CAST(:ids AS text[])), :now FROM fast_commit "
    "ON CONFLICT (message_id) DO UPDATE SET seen_at = EXCLUDED.seen_at WHERE dedupe.seen_at < :cutoff "
    "RETURNING message_id"
)
_PRUNE = text(
    "DELETE FROM dedupe WHERE message_id IN "
    "(SELECT message_id FROM dedupe WHERE seen_at < :cutoff LIMIT :limit)"
)


async def claim(conn: asyncpg.Connection, ids: Sequence[str], now: datetime, cutoff: datetime) -> set[str]:
    """Record `ids` (distinct; sorted by the caller so that concurrent claims lock in one order) as
    seen at `now`, inside the caller's transaction (on the asyncpg connection); returns those not seen
    since `cutoff`."""
    if not ids:
        return set()
    rows = await _CLAIM.fetch(conn, {"ids": list(ids), "now": now, "cutoff": cutoff})
    return {r[0] for r in rows}


async def prune(engine: AsyncEngine, cutoff: datetime, batch: int = 10_000) -> int:
    """Delete ids seen before `cutoff`, a batch per transaction (short locks); returns how many."""
    total = 0
    while True:
        async with engine.begin() as conn:
            deleted = (await conn.execute(_PRUNE, {"cutoff": cutoff, "limit": batch})).rowcount
        total += deleted
        if deleted < batch:
            return total

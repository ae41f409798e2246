"""Every query on `dedupe`: claiming messageIds for publication, and pruning the past window."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.engine import Statement

# One statement for a whole group of events. An id seen before the window's start is claimed again
# (its row is refreshed); an id claimed by a transaction still in flight makes this one wait for it,
# so a publish that fails (rolled back) never hides a later retry. That wait is bounded (lock_timeout,
# `LockNotAvailableError` past it): a holder that never ends (a replica frozen between its claim and
# its commit) would otherwise hold up this group, and every group after it, for good.
# The transaction commits without waiting for its WAL flush (synchronous_commit off): the event
# itself is durable in Kafka before the commit, and a database crash can at worst forget the last
# fraction of a second of ids, so a client's retry of one of those is published again, with the same
# messageId consumers dedupe on. Both settings are made in the same statement, to save a round trip
# (a CTE the insert reads, so they are set before its first row).
# Straight to asyncpg (`Statement`): it runs for every group of events.
_CLAIM = Statement(
    "WITH local AS (SELECT set_config('synchronous_commit', 'off', true), "
    "set_config('lock_timeout', :lock_timeout, true)) "
    "INSERT INTO dedupe (message_id, seen_at) SELECT unnest(CAST(:ids AS text[])), :now FROM local "
    "ON CONFLICT (message_id) DO UPDATE SET seen_at = EXCLUDED.seen_at WHERE dedupe.seen_at < :cutoff "
    "RETURNING message_id"
)
_RELEASE = Statement("DELETE FROM dedupe WHERE message_id = ANY(CAST(:ids AS text[]))")
_PRUNE = text(
    "DELETE FROM dedupe WHERE message_id IN "
    "(SELECT message_id FROM dedupe WHERE seen_at < :cutoff LIMIT :limit)"
)


async def claim(
    conn: asyncpg.Connection, ids: Sequence[str], now: datetime, cutoff: datetime, lock_wait_ms: int
) -> set[str]:
    """Record `ids` (distinct; sorted by the caller so that concurrent claims lock in one order) as
    seen at `now`, inside the caller's transaction (on the asyncpg connection); returns those not seen
    since `cutoff`. Raises `asyncpg.LockNotAvailableError` (the transaction then fails) if another
    transaction holds one of them longer than `lock_wait_ms` (> 0)."""
    if not ids:
        return set()
    params = {"ids": list(ids), "now": now, "cutoff": cutoff, "lock_timeout": f"{max(1, lock_wait_ms)}ms"}
    rows = await _CLAIM.fetch(conn, params)
    return {r[0] for r in rows}


async def claim_uncontested(
    conn: asyncpg.Connection,
    ids: Sequence[str],
    now: datetime,
    cutoff: datetime,
    lock_wait_ms: int,
    budget_s: float,
) -> tuple[set[str], set[str]]:
    """`claim`, for when it failed on a lock: claims the ids no other transaction holds past
    `lock_wait_ms`, each part in a savepoint, halving the parts that wait too long. Returns the fresh
    ids claimed, and the contested ones (not claimed). Only after a timeout: a statement per part.
    Each held id costs about 2 log2(n) failed parts (every id held: 2n), so the whole search stops
    after `budget_s`: the ids of the parts not yet tried or split count as contested (their requests
    get 503 and are retried) rather than holding up the group, and its writer, for minutes."""
    deadline = time.monotonic() + budget_s
    fresh: set[str] = set()
    contested: set[str] = set()
    parts = [list(ids)]
    while parts:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            contested.update(*parts)
            break
        part = parts.pop()  # left to right: locks are still taken in the callers' sorted order
        try:
            async with conn.transaction():
                fresh |= await claim(conn, part, now, cutoff, min(lock_wait_ms, left_ms))
        except asyncpg.LockNotAvailableError:
            if len(part) == 1:
                contested.add(part[0])
            else:
                middle = len(part) // 2
                parts += [part[middle:], part[:middle]]
    return fresh, contested


async def release(conn: asyncpg.Connection, ids: Sequence[str]) -> None:
    """Forget claims made in the caller's transaction (events Kafka did not take): the client's retry
    of them is published, not answered as a duplicate."""
    if ids:
        await _RELEASE.execute(conn, {"ids": list(ids)})


async def prune(engine: AsyncEngine, cutoff: datetime, batch: int = 10_000) -> int:
    """Delete ids seen before `cutoff`, a batch per transaction (short locks); returns how many."""
    total = 0
    while True:
        async with engine.begin() as conn:
            deleted = (await conn.execute(_PRUNE, {"cutoff": cutoff, "limit": batch})).rowcount
        total += deleted
        if deleted < batch:
            return total

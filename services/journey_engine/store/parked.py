"""Parked timers (`timers_parked`) as operators see and handle them: listed per journey, put back
into the due timers, or discarded. Which journey a parked timer belongs to comes from its instance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True)
class ParkedTimer:
    id: int  # the timer's (kept when it is put back)
    instance_id: str
    seq: int  # the instance's step it was armed for
    due_at: datetime
    parked_at: datetime
    attempts: int
    error: str
    customer_id: str
    version: int
    node_id: str  # where the instance is now
    instance_status: str
    # The instance waits on it: active, at the step it was armed for. Otherwise it moved on or
    # exited since (a migration keeps the step, an event or an archive does not), and the timer
    # fires as a no-op if put back.
    holds_instance: bool


_SELECT = (
    "SELECT p.id, p.instance_id, p.seq, p.due_at, p.parked_at, p.attempts, p.error, i.customer_id, "
    "i.version, i.node_id, i.status, (i.status = 'active' AND i.seq = p.seq) "
    "FROM timers_parked AS p JOIN instances AS i ON i.id = p.instance_id WHERE i.journey_id = :j"
)


def _node(node_id: str | None) -> tuple[str, dict[str, Any]]:
    return ("", {}) if node_id is None else (" AND i.node_id = :node", {"node": node_id})


async def page(
    session: AsyncSession,
    journey_id: str,
    limit: int,
    after: tuple[datetime, int] | None,
    node_id: str | None = None,
) -> list[ParkedTimer]:
    """A journey's parked timers, oldest parked first, after the cursor (parked_at, id) of the page
    before; of the instances at `node_id` only, if given."""
    where, params = _node(node_id)
    if after is not None:
        where += " AND (p.parked_at, p.id) > (:at, :id)"
        params |= {"at": after[0], "id": after[1]}
    rows = await session.execute(
        text(f"{_SELECT}{where} ORDER BY p.parked_at, p.id LIMIT :n"),
        {"j": journey_id, "n": limit, **params},
    )
    return [ParkedTimer(*r) for r in rows]


async def find(session: AsyncSession, journey_id: str, timer_ids: Sequence[int]) -> list[ParkedTimer]:
    """These parked timers of the journey (those that are)."""
    rows = await session.execute(
        text(f"{_SELECT} AND p.id = ANY(CAST(:ids AS bigint[])) ORDER BY p.id"),
        {"j": journey_id, "ids": list(timer_ids)},
    )
    return [ParkedTimer(*r) for r in rows]


async def next_chunk(
    session: AsyncSession, journey_id: str, after_id: int, limit: int, node_id: str | None = None
) -> list[ParkedTimer]:
    """The journey's parked timers by id past `after_id` (a bulk request's chunks)."""
    where, params = _node(node_id)
    rows = await session.execute(
        text(f"{_SELECT}{where} AND p.id > :after ORDER BY p.id LIMIT :n"),
        {"j": journey_id, "after": after_id, "n": limit, **params},
    )
    return [ParkedTimer(*r) for r in rows]


async def due_timers(session: AsyncSession, journey_id: str, timer_ids: Sequence[int]) -> dict[int, datetime]:
    """Of these ids, those among the journey's due timers (a parked timer put back keeps its id):
    id -> due_at."""
    rows = await session.execute(
        text(
            "SELECT t.id, t.due_at FROM timers AS t JOIN instances AS i ON i.id = t.instance_id "
            "WHERE t.id = ANY(CAST(:ids AS bigint[])) AND i.journey_id = :j"
        ),
        {"ids": list(timer_ids), "j": journey_id},
    )
    return {r[0]: r[1] for r in rows}


# Back among the due timers under the same id, due now with no tries counted: the next pass fires it.
# Each parked row (still there, still of this instance and step) goes once: its deletion and the
# insert are one statement, and one already back under its id is left parked (no second timer).
_REQUEUE = text(
    "WITH gone AS (DELETE FROM timers_parked AS p WHERE p.id = ANY(CAST(:ids AS bigint[])) "
    "AND (p.id, p.instance_id, p.seq) IN (SELECT * FROM unnest(CAST(:ids AS bigint[]), "
    "CAST(:instances AS text[]), CAST(:seqs AS int[]))) "
    "AND NOT EXISTS (SELECT 1 FROM timers AS t WHERE t.id = p.id) RETURNING p.id, p.instance_id, p.seq) "
    "INSERT INTO timers (id, instance_id, seq, due_at, attempts) "
    "SELECT id, instance_id, seq, :now, 0 FROM gone RETURNING id"
)


async def requeue(session: AsyncSession, timers: Sequence[ParkedTimer], now: datetime) -> set[int]:
    """Put these parked timers back, due `now`; the ids put back (not those gone meanwhile)."""
    if not timers:
        return set()
    rows = await session.execute(
        _REQUEUE,
        {
            "ids": [t.id for t in timers],
            "instances": [t.instance_id for t in timers],
            "seqs": [t.seq for t in timers],
            "now": now,
        },
    )
    return {r[0] for r in rows}


_DISCARD = text(
    "DELETE FROM timers_parked AS p WHERE p.id = ANY(CAST(:ids AS bigint[])) "
    "AND (p.id, p.instance_id, p.seq) IN (SELECT * FROM unnest(CAST(:ids AS bigint[]), "
    "CAST(:instances AS text[]), CAST(:seqs AS int[]))) RETURNING p.id"
)


async def discard(session: AsyncSession, timers: Sequence[ParkedTimer]) -> set[int]:
    """Delete these parked timers; the ids deleted (not those gone meanwhile)."""
    if not timers:
        return set()
    rows = await session.execute(
        _DISCARD,
        {
            "ids": [t.id for t in timers],
            "instances": [t.instance_id for t in timers],
            "seqs": [t.seq for t in timers],
        },
    )
    return {r[0] for r in rows}

"""Every SQL query of the due-timer loop (`due_timers.py`): claiming due timers, counting the tries of
one whose re-evaluation fails alone, parking it, and the parked timers' admin queries. (The
re-evaluation writes the next due moments: `segments.set_timers`.)"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.engine import Statement, json_rows, rows_from_json


class DueTimer(NamedTuple):
    customer_id: str
    segment_id: str
    due_at: datetime


# Oldest first, the rows another worker holds skipped (not waited for); deleted here, so a rollback
# puts them back as they were. `keys`: only these (a part of a failed batch being taken apart), those
# still there and still due: one another worker re-evaluated or put off meanwhile is left alone.
_CLAIM = (
    "DELETE FROM segment_timers t USING (SELECT customer_id, segment_id FROM segment_timers "
    "WHERE due_at <= :now {keys} ORDER BY due_at LIMIT :n FOR UPDATE SKIP LOCKED) d "
    "WHERE t.customer_id = d.customer_id AND t.segment_id = d.segment_id "
    "RETURNING t.customer_id, t.segment_id, t.due_at"
)
_KEYS = (
    "AND (customer_id, segment_id) IN (SELECT c, s FROM "
    + rows_from_json("keys", [("c", "text"), ("s", "text")])
    + " AS k)"
)


async def claim_due_timers(
    session: AsyncSession, now: datetime, limit: int, keys: Sequence[DueTimer] | None = None
) -> list[DueTimer]:
    """Due timers (or these `keys`, those still there and due), taken for this transaction."""
    params: dict[str, Any] = {"now": now, "n": limit}
    if keys is not None:
        params["keys"] = json_rows((k.customer_id, k.segment_id) for k in keys)
    rows = await session.execute(text(_CLAIM.format(keys=_KEYS if keys is not None else "")), params)
    return [DueTimer(r[0], r[1], r[2]) for r in rows]


# A timer whose re-evaluation failed alone, for a reason of its own: one more try counted on its row,
# and the next one later (`retry_s`, doubled each time: 60 s, then 120 s), so that a brief incident
# does not use up its tries; claimed again as any due timer then. The last try leaves `due_at` as it
# was (parked with it: requeued, it is due at once). Only while it is due: one another worker found
# failing too and has put off already was tried once, not twice. Returns the tries so far.
_NOTE_FAILURE = Statement(
    "UPDATE segment_timers SET attempts = attempts + 1, due_at = CASE WHEN attempts + 1 < CAST(:max AS int) "
    "THEN CAST(:now AS timestamptz) "
    "+ make_interval(secs => CAST(:retry_s AS double precision) * power(2, attempts)) "
    "ELSE due_at END WHERE customer_id = :c AND segment_id = :s AND due_at <= CAST(:now AS timestamptz) "
    "RETURNING attempts, due_at"
)
# After the last try: out of the due timers, with why. A row parked for the same pair before (requeued
# and parked again, say) is replaced: parking never fails on it.
_PARK = Statement(
    "WITH gone AS (DELETE FROM segment_timers WHERE customer_id = :c AND segment_id = :s "
    "RETURNING segment_id, customer_id, due_at, attempts) "
    "INSERT INTO segment_timers_parked (segment_id, customer_id, due_at, parked_at, attempts, error) "
    "SELECT segment_id, customer_id, due_at, CAST(:now AS timestamptz), attempts, CAST(:error AS text) "
    "FROM gone ON CONFLICT (segment_id, customer_id) DO UPDATE SET due_at = excluded.due_at, "
    "parked_at = excluded.parked_at, attempts = excluded.attempts, error = excluded.error"
)


class TimerFailure(NamedTuple):
    attempts: int  # tries that failed alone so far
    retry_at: datetime | None  # the next try; None: parked


async def note_timer_failure(
    session: AsyncSession,
    timer: DueTimer,
    error: str,
    now: datetime,
    *,
    retry_s: float,
    max_attempts: int,
) -> TimerFailure | None:
    """Count a try of a timer that failed alone, and try it again later, or park it (with the error)
    once it has failed `max_attempts` times; None when it is no longer there or not due (re-evaluated,
    put off or parked by another worker meanwhile, moved by an event)."""
    key = {"c": timer.customer_id, "s": timer.segment_id}
    rows = await _NOTE_FAILURE.fetch(session, {**key, "now": now, "retry_s": retry_s, "max": max_attempts})
    if not rows:
        return None
    attempts, retry_at = rows[0]
    if attempts < max_attempts:
        return TimerFailure(attempts, retry_at)
    await _PARK.execute(session, {**key, "now": now, "error": error})
    return TimerFailure(attempts, None)


async def parked_timers(
    session: AsyncSession, segment_id: str, after: str | None, limit: int
) -> list[dict[str, Any]]:
    """A page of the segment's parked timers, by customer id; `rescheduled_due_at`: the due time of a
    timer written for the pair since (an event of theirs re-evaluated the customer), if any."""
    rows = await session.execute(
        text(
            "SELECT p.customer_id, p.due_at, p.parked_at, p.attempts, p.error, "
            "t.due_at AS rescheduled_due_at FROM segment_timers_parked p "
            "LEFT JOIN segment_timers t ON t.customer_id = p.customer_id AND t.segment_id = p.segment_id "
            "WHERE p.segment_id = :s AND p.customer_id > :after ORDER BY p.customer_id LIMIT :n"
        ),
        {"s": segment_id, "after": after or "", "n": limit},
    )
    return [dict(r._mapping) for r in rows]


async def parked_count(session: AsyncSession, segment_id: str) -> int:
    return int(
        await session.scalar(
            text("SELECT count(*) FROM segment_timers_parked WHERE segment_id = :s"), {"s": segment_id}
        )
        or 0
    )


async def requeue_parked(session: AsyncSession, segment_id: str) -> int:
    """Put the segment's parked timers back among the due ones, no try counted, due at the time they
    were parked with (past: due at once). A timer written for the pair since keeps its row, due at the
    earlier of the two. Returns how many."""
    return int(
        (
            await session.execute(
                text(
                    "WITH p AS (DELETE FROM segment_timers_parked WHERE segment_id = :s "
                    "RETURNING customer_id, segment_id, due_at), "
                    "q AS (INSERT INTO segment_timers (customer_id, segment_id, due_at) "
                    "SELECT customer_id, segment_id, due_at FROM p "
                    "ON CONFLICT (customer_id, segment_id) DO UPDATE "
                    "SET due_at = LEAST(segment_timers.due_at, excluded.due_at), attempts = 0 RETURNING 1) "
                    "SELECT count(*) FROM q"
                ),
                {"s": segment_id},
            )
        ).scalar_one()
    )

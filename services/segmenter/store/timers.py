"""Every SQL query of the due-timer loop (`due_timers.py`): claiming due timers, counting the tries of
one whose re-evaluation fails (`attempts`) or whose pass stalls alone (`stalls`), putting timers off,
parking them, sweeping parked rows left behind, and the parked timers' admin queries. (The
re-evaluation writes the next due moments: `segments.set_timers`.)"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal, NamedTuple

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.engine import Statement, json_rows, rows_from_json

# The longest wait before a failed or stalled timer's next try, however many tries it had.
RETRY_MAX_S = 86400


class DueTimer(NamedTuple):
    customer_id: str
    segment_id: str
    due_at: datetime
    attempts: int = 0  # tries whose re-evaluation failed, in a row
    stalls: int = 0  # passes of it alone that stalled (a statement timeout, say), in a row


def delay_sql(tries: str) -> str:
    """SQL: seconds before the next try after `tries` (an SQL expression, at least 1) failed ones:
    `:retry_s`, doubled each time, at most RETRY_MAX_S (the exponent bounded: no overflow)."""
    return f"LEAST(CAST(:retry_s AS double precision) * power(2, LEAST(({tries}) - 1, 30)), {RETRY_MAX_S})"


# Oldest first, the rows another worker holds skipped (not waited for); deleted here, so a rollback
# puts them back as they were. `keys`: only these (a part of a failed batch being taken apart), those
# still there and still due: one another worker re-evaluated or put off meanwhile is left alone. A
# parked row of a pair claimed here is stale (an event or a back-fill wrote the pair a timer since it
# was parked): gone too, in the same statement (the event path stays as it is); the unit that
# re-evaluates the pair writes what holds now, a row parked again included.
_CLAIM = (
    "WITH d AS MATERIALIZED (SELECT customer_id, segment_id FROM segment_timers "
    "WHERE due_at <= :now {keys} ORDER BY due_at LIMIT :n FOR UPDATE SKIP LOCKED), "
    "unparked AS (DELETE FROM segment_timers_parked p USING d "
    "WHERE p.customer_id = d.customer_id AND p.segment_id = d.segment_id) "
    "DELETE FROM segment_timers t USING d "
    "WHERE t.customer_id = d.customer_id AND t.segment_id = d.segment_id "
    "RETURNING t.customer_id, t.segment_id, t.due_at, t.attempts, t.stalls"
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
    return [DueTimer(*r) for r in rows]


_FAILED = rows_from_json("failed", [("c", "text"), ("s", "text"), ("e", "text")])
_PARKED_UPSERT = (
    "ON CONFLICT (segment_id, customer_id) DO UPDATE SET due_at = excluded.due_at, "
    "parked_at = excluded.parked_at, attempts = excluded.attempts, stalls = excluded.stalls, "
    "error = excluded.error"
)

# Claimed timers (deleted by this transaction) whose pair's evaluation raised, in the unit of work
# that re-evaluated the others: each has one more try, and is due again later (its stalls cleared:
# its pass went through), or is parked at its `:max`-th try. A row the re-evaluation wrote meanwhile
# for the same pair (a dependent segment failed, not the timer's own) is replaced.
_CHARGE = Statement(
    "WITH f AS MATERIALIZED (SELECT * FROM "
    + rows_from_json(
        "failed", [("c", "text"), ("s", "text"), ("d", "timestamptz"), ("a", "int"), ("e", "text")]
    )
    + " AS x), "
    "parked AS (INSERT INTO segment_timers_parked "
    "(segment_id, customer_id, due_at, parked_at, attempts, stalls, error) "
    "SELECT s, c, d, CAST(:now AS timestamptz), a, 0, e FROM f WHERE a >= CAST(:max AS int) "
    + _PARKED_UPSERT
    + "), gone AS (DELETE FROM segment_timers t USING f WHERE f.a >= CAST(:max AS int) "
    "AND t.customer_id = f.c AND t.segment_id = f.s) "
    "INSERT INTO segment_timers (customer_id, segment_id, due_at, attempts, stalls) "
    "SELECT c, s, CAST(:now AS timestamptz) + make_interval(secs => "
    + delay_sql("a")
    + "), a, 0 FROM f WHERE a < CAST(:max AS int) ORDER BY c, s "
    "ON CONFLICT (customer_id, segment_id) DO UPDATE SET due_at = excluded.due_at, "
    "attempts = excluded.attempts, stalls = 0 RETURNING customer_id, segment_id, due_at"
)


class TimerFailure(NamedTuple):
    customer_id: str
    segment_id: str
    tries: int  # tries counted so far (attempts, or stalls)
    retry_at: datetime | None  # the next try; None: parked


async def charge_claimed(
    session: AsyncSession,
    failed: Sequence[tuple[DueTimer, str]],
    now: datetime,
    *,
    retry_s: float,
    max_attempts: int,
) -> list[TimerFailure]:
    """One more try on each of these claimed timers (`failed`: with the error), in the unit of work
    that claimed them: due again later, or parked at the `max_attempts`-th try."""
    if not failed:
        return []
    rows = await _CHARGE.fetch(
        session,
        {
            "failed": json_rows(
                (t.customer_id, t.segment_id, t.due_at, t.attempts + 1, error) for t, error in failed
            ),
            "now": now,
            "retry_s": retry_s,
            "max": max_attempts,
        },
    )
    retry = {(r[0], r[1]): r[2] for r in rows}
    return [
        TimerFailure(t.customer_id, t.segment_id, t.attempts + 1, retry.get((t.customer_id, t.segment_id)))
        for t, _ in failed
    ]


def _note(counter: Literal["attempts", "stalls"]) -> Statement:
    """One more try in `counter` on each timer named (still there and still due: one another worker
    re-evaluated, put off or parked meanwhile, or an event moved, is left alone: workers that meet
    the same failing timer count one try between them), and its next try later, doubled each time;
    at its `:max`-th the due time stays (parked with it, by `_PARK`: requeued, it is due at once). A
    failure clears the stalls in a row (its pass went as far as a failure of its own)."""
    other = ", stalls = 0" if counter == "attempts" else ""
    return Statement(
        f"UPDATE segment_timers t SET {counter} = t.{counter} + 1{other}, due_at = CASE "
        f"WHEN t.{counter} + 1 < CAST(:max AS int) THEN CAST(:now AS timestamptz) + make_interval(secs => "
        + delay_sql(f"t.{counter} + 1")
        + ") ELSE t.due_at END FROM "
        + _FAILED
        + " AS f WHERE t.customer_id = f.c AND t.segment_id = f.s AND t.due_at <= CAST(:now AS timestamptz) "
        f"RETURNING t.customer_id, t.segment_id, t.{counter}, t.due_at"
    )


_NOTE = {"attempts": _note("attempts"), "stalls": _note("stalls")}
# Out of the due timers, with why (`e`). A row parked for the same pair before is replaced: parking
# never fails on it.
_PARK = Statement(
    "WITH gone AS (DELETE FROM segment_timers t USING "
    + _FAILED
    + " AS f WHERE t.customer_id = f.c AND t.segment_id = f.s "
    "RETURNING t.segment_id, t.customer_id, t.due_at, t.attempts, t.stalls, f.e) "
    "INSERT INTO segment_timers_parked (segment_id, customer_id, due_at, parked_at, attempts, stalls, error) "
    "SELECT segment_id, customer_id, due_at, CAST(:now AS timestamptz), attempts, stalls, e FROM gone "
    + _PARKED_UPSERT
)


async def note_failures(
    session: AsyncSession,
    failed: Sequence[tuple[DueTimer, str]],
    now: datetime,
    *,
    counter: Literal["attempts", "stalls"],
    retry_s: float,
    max_tries: int,
) -> list[TimerFailure]:
    """Count a try in `counter` on each of these timers (with the error), each tried again later or
    parked at its `max_tries`-th; those no longer there or not due are left out. Outside the unit of
    work that failed (rolled back: the rows are as they were), in place: an erasure or a merge
    deleting the customer's timers meanwhile waits for the row and then deletes what this wrote."""
    if not failed:
        return []
    errors = {(t.customer_id, t.segment_id): error for t, error in failed}
    rows = await _NOTE[counter].fetch(
        session,
        {
            "failed": json_rows((c, s, e) for (c, s), e in sorted(errors.items())),
            "now": now,
            "retry_s": retry_s,
            "max": max_tries,
        },
    )
    out = [TimerFailure(c, s, tries, at if tries < max_tries else None) for c, s, tries, at in rows]
    parked = [
        (t.customer_id, t.segment_id, errors[t.customer_id, t.segment_id]) for t in out if t.retry_at is None
    ]
    if parked:
        await _PARK.execute(session, {"failed": json_rows(parked), "now": now})
    return out


_PUT_OFF = Statement(
    "UPDATE segment_timers t SET due_at = CAST(:now AS timestamptz) + make_interval(secs => "
    "CAST(:delay AS double precision)) FROM "
    + rows_from_json("keys", [("c", "text"), ("s", "text")])
    + " AS k WHERE t.customer_id = k.c AND t.segment_id = k.s AND t.due_at <= CAST(:now AS timestamptz)"
)


async def put_off(session: AsyncSession, timers: Sequence[DueTimer], now: datetime, delay_s: float) -> int:
    """Due again `delay_s` later, no try counted (those still there and due)."""
    return await _PUT_OFF.execute(
        session,
        {
            "keys": json_rows(sorted((t.customer_id, t.segment_id) for t in timers)),
            "now": now,
            "delay": delay_s,
        },
    )


async def sweep_parked(session: AsyncSession) -> tuple[int, int]:
    """Delete the parked rows whose customer or segment no longer exists (an erasure, a merge or a
    deletion by a release that did not know the table: a rolling upgrade, a rollback); (deleted,
    left)."""
    row = (
        await session.execute(
            text(
                "WITH gone AS (DELETE FROM segment_timers_parked p "
                "WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.customer_id = p.customer_id) "
                "OR NOT EXISTS (SELECT 1 FROM segments s WHERE s.segment_id = p.segment_id) RETURNING 1) "
                "SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM segment_timers_parked)"
            )
        )
    ).one()
    # The count reads the statement's snapshot, from before its deletion.
    return int(row[0]), int(row[1]) - int(row[0])


async def parked_timers(
    session: AsyncSession, segment_id: str, after: str | None, limit: int
) -> list[dict[str, Any]]:
    """A page of the segment's parked timers, by customer id; `rescheduled_due_at`: the due time of a
    timer written for the pair since (an event of theirs re-evaluated the customer), if any."""
    rows = await session.execute(
        text(
            "SELECT p.customer_id, p.due_at, p.parked_at, p.attempts, p.stalls, p.error, "
            "t.due_at AS rescheduled_due_at FROM segment_timers_parked p "
            "LEFT JOIN segment_timers t ON t.customer_id = p.customer_id AND t.segment_id = p.segment_id "
            "WHERE p.segment_id = :s AND p.customer_id > :after ORDER BY p.customer_id LIMIT :n"
        ),
        {"s": segment_id, "after": after or "", "n": limit},
    )
    return [dict(r._mapping) for r in rows]


async def parked_counts(session: AsyncSession, segment_ids: Sequence[str]) -> dict[str, int]:
    """Parked timers per segment, of these segments (those with none left out)."""
    rows = await session.execute(
        text(
            "SELECT segment_id, count(*) FROM segment_timers_parked "
            "WHERE segment_id = ANY(CAST(:s AS text[])) GROUP BY segment_id"
        ),
        {"s": list(segment_ids)},
    )
    return {r[0]: int(r[1]) for r in rows}


# A chunk of the segment's parked timers, by customer id past `:after`, back among the due ones with no
# try counted, due at the time they were parked with (past: due at once). A pair that has a timer
# again (written by an evaluation since it was parked: an event, a back-fill chunk) keeps it as it
# is: the parked row is done with. Rows are locked in customer order, then the timers written in that
# order, so two requeues (or a requeue and a back-fill chunk) meet in one order. The customer's row is
# key-share locked: an erasure or a merge (which lock it first) either waits for the chunk, and then
# deletes the timer it wrote, or went first, and the customer's parked rows are gone or left to the
# sweep (`sweep_parked`). Returns how many, and the last customer id.
_REQUEUE = text(
    "WITH p AS (DELETE FROM segment_timers_parked WHERE (segment_id, customer_id) IN "
    "(SELECT p.segment_id, p.customer_id FROM segment_timers_parked p JOIN customers c "
    "ON c.customer_id = p.customer_id WHERE p.segment_id = :s AND p.customer_id > :after "
    "ORDER BY p.customer_id LIMIT :n FOR UPDATE OF p FOR KEY SHARE OF c) "
    "RETURNING customer_id, segment_id, due_at), "
    "q AS (INSERT INTO segment_timers (customer_id, segment_id, due_at) "
    "SELECT customer_id, segment_id, due_at FROM p ORDER BY customer_id "
    "ON CONFLICT (customer_id, segment_id) DO NOTHING) "
    "SELECT count(*), max(customer_id) FROM p"
)


async def requeue_parked_chunk(
    session: AsyncSession, segment_id: str, after: str, limit: int
) -> tuple[int, str | None]:
    """Requeue up to `limit` of the segment's parked timers past customer `after` (`_REQUEUE`): how
    many, and the last customer id (None: none left)."""
    n, last = (await session.execute(_REQUEUE, {"s": segment_id, "after": after, "n": limit})).one()
    return int(n), last

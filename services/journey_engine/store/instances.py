"""Journey instances, their timers, enrolments, per-node counters and the message log."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.journey_engine.domain.entry import correlation_key
from services.journey_engine.domain.walker import MIGRATED_FROM
from shared.db.engine import Statement

# Where an instance keeps its correlation value as sent when the `correlation` column holds its
# digest (a long value: `domain.entry.correlation_key`). In the context, which every release carries
# from step to step as it found it (the walker copies every key): no column, so no migration and no
# lock on this table for it, and nothing the release before could trip over beside this one.
CORRELATION_VALUE = "correlation_value"


@dataclass
class InstanceRow:
    id: str
    journey_id: str
    version: int
    customer_id: str
    correlation: str  # the value as sent (shown, given to templates, compared by waits)
    status: str
    node_id: str
    wait: dict[str, Any] | None
    context: dict[str, Any]
    seq: int
    entered_at: datetime
    exit_reason: str | None = None
    converted_at: datetime | None = None
    # The seq as read: the update only applies if nobody stepped the instance since (optimistic lock).
    read_seq: int = -1

    def __post_init__(self) -> None:
        if self.read_seq < 0:
            self.read_seq = self.seq
        if self.correlation_key != self.correlation:
            self.context.setdefault(CORRELATION_VALUE, self.correlation)

    @property
    def correlation_key(self) -> str:
        """What the `correlation` column holds: the value is indexed and compared by it."""
        return correlation_key(self.correlation)


class InstanceConflict(Exception):
    """An instance moved on since it was read (a guard: steps hold the row lock): roll back, retry."""


_COLUMNS = (
    "id, journey_id, version, customer_id, correlation, status, node_id, wait, context, seq, "
    "entered_at, exit_reason, converted_at"
)


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value


def _row(r: Any) -> InstanceRow:
    context = _json(r[8]) or {}
    value = context.get(CORRELATION_VALUE)
    # The column holds the key; the value as sent is in the context when the key is its digest.
    correlation = value if isinstance(value, str) and correlation_key(value) == r[4] else r[4]
    return InstanceRow(
        r[0], r[1], r[2], r[3], correlation, r[5], r[6], _json(r[7]), context, r[9], r[10], r[11], r[12]
    )


@dataclass(frozen=True)
class ClaimedTimer:
    id: int
    instance_id: str
    seq: int
    due_at: datetime


def _claimable(
    ids: Sequence[int] | None, other_than: Sequence[str] | None = None
) -> tuple[str, dict[str, Any]]:
    """The timers a claim takes: those due (oldest first); of those, these ones (a failed batch's,
    taken apart: `JourneyEngine._isolate`), or those whose instance is in none of these journeys (a
    probe past a batch that failed in them: `JourneyEngine._probe`). Always due: a timer another
    worker has just put off (its next try, `note_timer_failure`) is not fired before its time."""
    if ids is not None:
        return "id = ANY(CAST(:ids AS bigint[])) AND due_at <= :now", {"ids": list(ids)}
    if other_than is not None:
        return (
            "due_at <= :now AND NOT EXISTS (SELECT 1 FROM instances AS x WHERE x.id = timers.instance_id "
            "AND x.journey_id = ANY(CAST(:other_than AS text[])))",
            {"other_than": sorted(set(other_than))},
        )
    return "due_at <= :now", {}


async def claim_due_timers(
    session: AsyncSession,
    now: datetime,
    limit: int,
    ids: Sequence[int] | None = None,
    other_than: Sequence[str] | None = None,
) -> list[ClaimedTimer]:
    """Delete and return due timers (`_claimable`); rows another worker holds are skipped, and come
    back on rollback."""
    where, params = _claimable(ids, other_than)
    rows = await session.execute(
        text(
            f"DELETE FROM timers WHERE id = ANY(ARRAY(SELECT id FROM timers WHERE {where} "
            "ORDER BY due_at LIMIT :n FOR UPDATE SKIP LOCKED)) RETURNING id, instance_id, seq, due_at"
        ),
        {"now": now, "n": limit, **params},
    )
    return [ClaimedTimer(*r) for r in rows]


# A step's instance with whether its journey is archived: an archive exits its customers after it
# committed, and a step that comes first must exit the instance rather than send.
_STEP_COLUMNS = ", ".join("i." + c for c in _COLUMNS.split(", ")) + (
    ", EXISTS (SELECT 1 FROM journeys AS j WHERE j.id = i.journey_id AND j.status = 'archived')"
)


async def claim_due_steps(
    session: AsyncSession,
    now: datetime,
    limit: int,
    ids: Sequence[int] | None = None,
    other_than: Sequence[str] | None = None,
) -> list[tuple[ClaimedTimer, InstanceRow, bool]]:
    """Claim due timers (`_claimable`: or these `ids`, those still there and due) and lock their
    instances (in id order) in one round trip: (timer, instance, whether its journey is archived)."""
    where, params = _claimable(ids, other_than)
    rows = await session.execute(
        text(
            "WITH claimed AS (DELETE FROM timers WHERE id = ANY(ARRAY(SELECT id FROM timers "
            f"WHERE {where} ORDER BY due_at LIMIT :n FOR UPDATE SKIP LOCKED)) "
            "RETURNING id AS timer_id, instance_id, seq AS timer_seq, due_at) "
            f"SELECT c.timer_id, c.instance_id, c.timer_seq, c.due_at, {_STEP_COLUMNS} "
            "FROM claimed AS c JOIN instances AS i ON i.id = c.instance_id ORDER BY i.id FOR UPDATE OF i"
        ),
        {"now": now, "n": limit, **params},
    )
    return [(ClaimedTimer(r[0], r[1], r[2], r[3]), _row(r[4:-1]), bool(r[-1])) for r in rows]


# A timer whose step failed alone, for a reason of its own (not an outage): one more try counted on
# its row, and the next one later (`due_at`: `retry_s`, doubled each time), so that a brief incident
# does not use up its tries; the row is claimed again as any due timer. The last try leaves `due_at`
# as it was (parked with it: put back, it is due). Only while it is due: a timer that another worker
# found failing too and has already put off was tried once, not twice. Returns the tries so far.
_NOTE_FAILURE = Statement(
    "UPDATE timers SET attempts = attempts + 1, due_at = CASE WHEN attempts + 1 < CAST(:max AS int) "
    "THEN CAST(:now AS timestamptz) "
    "+ make_interval(secs => CAST(:retry_s AS double precision) * power(2, attempts)) "
    "ELSE due_at END WHERE id = CAST(:id AS bigint) AND due_at <= CAST(:now AS timestamptz) "
    "RETURNING attempts, due_at"
)
# After `timer_max_attempts` tries: out of the due timers, with why, and where it was (the instance's
# journey, for the metric and the log). A row parked under the same id before (put back by hand with
# its id, say) is replaced: parking never fails on it.
_PARK = Statement(
    "WITH gone AS (DELETE FROM timers WHERE id = CAST(:id AS bigint) "
    "RETURNING id, instance_id, seq, due_at, attempts), "
    "parked AS (INSERT INTO timers_parked (id, instance_id, seq, due_at, parked_at, attempts, error) "
    "SELECT id, instance_id, seq, due_at, CAST(:now AS timestamptz), attempts, CAST(:error AS text) "
    "FROM gone ON CONFLICT (id) DO UPDATE SET instance_id = excluded.instance_id, seq = excluded.seq, "
    "due_at = excluded.due_at, parked_at = excluded.parked_at, attempts = excluded.attempts, "
    "error = excluded.error RETURNING instance_id) "
    "SELECT p.instance_id, i.journey_id, i.node_id FROM parked AS p LEFT JOIN instances AS i "
    "ON i.id = p.instance_id"
)


@dataclass(frozen=True)
class TimerFailure:
    attempts: int  # tries that failed alone so far
    retry_at: datetime | None  # the next try; None: parked
    journey_id: str | None = None  # parked: where it was (None: the instance is gone)
    node_id: str | None = None


async def note_timer_failure(
    session: AsyncSession,
    timer_id: int,
    error: str,
    now: datetime,
    *,
    retry_s: float,
    max_attempts: int,
) -> TimerFailure | None:
    """Count a try of a timer that failed alone, and retry it later, or park it (`timers_parked`, with
    the error) once it has failed `max_attempts` times; None when the timer is no longer there or not
    due (fired, parked or put off by another worker meanwhile)."""
    rows = await _NOTE_FAILURE.fetch(
        session, {"id": timer_id, "now": now, "retry_s": retry_s, "max": max_attempts}
    )
    if not rows:
        return None
    attempts, retry_at = rows[0]
    if attempts < max_attempts:
        return TimerFailure(attempts, retry_at)
    parked = await _PARK.fetch(session, {"id": timer_id, "error": error, "now": now})
    return TimerFailure(attempts, None, parked[0][1], parked[0][2])


# Timers of a batch taken for an outage (`JourneyEngine._failed_alone`): put off to `retry_s` from
# now, no try counted, so that the timers due after them get their turn on the next passes (claimed
# oldest first, they were claimed first again on every pass, and nothing behind them fired). Only
# while due: one another worker has put off already keeps its time.
_PUT_OFF = Statement(
    "UPDATE timers SET due_at = CAST(:now AS timestamptz) "
    "+ make_interval(secs => CAST(:retry_s AS double precision)) "
    "WHERE id = ANY(CAST(:ids AS bigint[])) AND due_at <= CAST(:now AS timestamptz)"
)


async def put_off_timers(
    session: AsyncSession, timer_ids: Sequence[int], now: datetime, retry_s: float
) -> None:
    """Try these due timers again `retry_s` from now, counting no try."""
    await _PUT_OFF.execute(session, {"ids": list(timer_ids), "now": now, "retry_s": retry_s})


async def journeys_of_instances(session: AsyncSession, instance_ids: Sequence[str]) -> dict[str, str]:
    """instance id -> its journey, for the instances that exist."""
    rows = await session.execute(
        text("SELECT id, journey_id FROM instances WHERE id = ANY(CAST(:ids AS text[]))"),
        {"ids": sorted(set(instance_ids))},
    )
    return {r[0]: r[1] for r in rows}


async def lock_instances(
    session: AsyncSession, ids: list[str], *, skip_locked: bool = False
) -> list[tuple[InstanceRow, bool]]:
    """Row locks are always taken in id order (here and below), so two batches never deadlock.
    (instance, whether its journey is archived); with `skip_locked`, those held elsewhere are left
    out rather than waited for."""
    if not ids:
        return []
    skip = " SKIP LOCKED" if skip_locked else ""
    rows = await session.execute(
        text(
            f"SELECT {_STEP_COLUMNS} FROM instances AS i WHERE i.id = ANY(CAST(:ids AS text[])) "
            f"ORDER BY i.id FOR UPDATE OF i{skip}"
        ),
        {"ids": ids},
    )
    return [(_row(r[:-1]), bool(r[-1])) for r in rows]


# The statements each consumer batch runs go straight to asyncpg (`Statement`).
# Read by `store.batch_read` before the rest of a batch's reads, as its own statement (the rows are
# locked, in id order: no deadlocks; what a lock holder committed must be seen by the reads after).
ACTIVE_FOR_CUSTOMERS_SQL = (
    f"SELECT {_COLUMNS} FROM instances WHERE customer_id = ANY(CAST(:ids AS text[])) AND status = 'active' "
    "ORDER BY id FOR UPDATE"
)
# Whose instances these are now (`store.batch_read`: read again after a batch's locks).
OWNERS_SQL = "SELECT id, customer_id FROM instances WHERE id = ANY(CAST(:instance_ids AS text[]))"
_OWNERS = Statement(OWNERS_SQL)


async def owners(session: AsyncSession, instance_ids: Sequence[str]) -> dict[str, str]:
    """instance id -> its customer, for the instances that exist."""
    if not instance_ids:
        return {}
    rows = await _OWNERS.fetch(session, {"instance_ids": sorted(set(instance_ids))})
    return {r[0]: r[1] for r in rows}


ENTRIES_OF_CUSTOMERS_SQL = (
    "SELECT journey_id, customer_id, correlation, last_entered_at FROM enrolments "
    "WHERE customer_id = ANY(CAST(:ids AS text[]))"
)
# Not an archived journey's: archiving closes them, though they are deleted after it committed.
OPEN_GOALS_SQL = (
    "SELECT instance_id, customer_id, journey_id, version, node_id, correlation, entered_at "
    "FROM goal_windows WHERE customer_id = ANY(CAST(:ids AS text[])) "
    "AND (open_until IS NULL OR open_until > CAST(:now AS timestamptz)) "
    "AND NOT EXISTS (SELECT 1 FROM journeys AS j WHERE j.id = goal_windows.journey_id "
    "AND j.status = 'archived')"
)
_UPDATE_INSTANCES = Statement(
    "UPDATE instances AS i SET node_id = u.node, status = u.status, wait = CAST(u.wait AS jsonb), "
    "context = CAST(u.ctx AS jsonb), seq = u.seq, exit_reason = u.reason, "
    "converted_at = CASE WHEN u.status = 'converted' "
    "THEN COALESCE(i.converted_at, CAST(:now AS timestamptz)) ELSE i.converted_at END, "
    "updated_at = CAST(:now AS timestamptz) FROM unnest(CAST(:id AS text[]), CAST(:node AS text[]), "
    "CAST(:status AS text[]), CAST(:wait AS text[]), CAST(:ctx AS text[]), CAST(:seq AS int[]), "
    "CAST(:reason AS text[]), CAST(:read_seq AS int[])) "
    "AS u(id, node, status, wait, ctx, seq, reason, read_seq) WHERE i.id = u.id AND i.seq = u.read_seq"
)


# A finished instance's conversion: once (the window row goes with it), counted at the node where it
# finished, in the same statement so a count never exists without its conversion or the other way round.
_CONVERT_FINISHED = Statement(
    "WITH gone AS (DELETE FROM goal_windows WHERE instance_id = ANY(CAST(:ids AS text[])) "
    "RETURNING instance_id, journey_id, version, node_id), "
    "marked AS (UPDATE instances SET converted_at = CAST(:now AS timestamptz) "
    "WHERE id IN (SELECT instance_id FROM gone) AND converted_at IS NULL) "
    "INSERT INTO node_counts (journey_id, version, node_id, metric, n) "
    "SELECT journey_id, version, node_id, 'converted', count(*) FROM gone GROUP BY 1, 2, 3"
)

# A re-entered customer's earlier instances of the journey stop counting its goal (not the newest's
# own window, opened in the same batch when it finished at once).
_SUPERSEDE_WINDOWS = Statement(
    "DELETE FROM goal_windows AS g USING unnest(CAST(:j AS text[]), CAST(:c AS text[]), "
    "CAST(:k AS text[]), CAST(:i AS text[])) AS u(j, c, k, i) "
    "WHERE g.customer_id = u.c AND g.journey_id = u.j AND g.correlation = u.k AND g.instance_id <> u.i"
)


@dataclass(frozen=True)
class GoalWindow:
    """A finished instance whose journey's goal may still be reached (see `tables.goal_windows`)."""

    instance_id: str
    customer_id: str
    journey_id: str
    version: int
    node_id: str
    correlation: str  # as stored: the key (`domain.entry.correlation_key`; older rows: the value)
    entered_at: datetime
    open_until: datetime | None = None


# A profile merged into another (`ProfileChanged` `identity_merged`): what the engine keeps under the
# merged-away id becomes the survivor's, so the re-entry policy, frequency caps and goals count the
# person once. Its active instances that collide with the survivor's (same journey and correlation
# value: one active per key) must be exited first (`StepWriter`), or the update breaks that index.
_MOVE_CUSTOMER = Statement(
    "WITH moved AS (UPDATE instances SET customer_id = :new WHERE customer_id = :old), "
    "windows AS (UPDATE goal_windows SET customer_id = :new WHERE customer_id = :old), "
    "log AS (UPDATE message_log SET customer_id = :new WHERE customer_id = :old), "
    "gone AS (DELETE FROM enrolments WHERE customer_id = :old "
    "RETURNING journey_id, correlation, last_entered_at, entries) "
    "INSERT INTO enrolments (journey_id, customer_id, correlation, last_entered_at, entries) "
    "SELECT journey_id, :new, correlation, last_entered_at, entries FROM gone "
    "ON CONFLICT (journey_id, customer_id, correlation) DO UPDATE "
    "SET last_entered_at = GREATEST(enrolments.last_entered_at, excluded.last_entered_at), "
    "entries = enrolments.entries + excluded.entries"
)


# Then one goal per person and journey (and correlation value), as for a customer who entered again
# (`_SUPERSEDE_WINDOWS`): both profiles' windows, or a window beside an instance still inside, counted
# one purchase twice. The instance inside owns it (it converts as it leaves), else the newest window.
# A statement of its own: the move's updates are not visible to the statement that makes them.
_SUPERSEDE_MERGED_WINDOWS = Statement(
    "DELETE FROM goal_windows AS g WHERE g.customer_id = :new AND EXISTS (SELECT 1 FROM instances AS i "
    "WHERE i.customer_id = :new AND i.journey_id = g.journey_id AND i.correlation = g.correlation "
    "AND i.id <> g.instance_id "
    "AND (i.status = 'active' OR (i.entered_at, i.id) > (g.entered_at, g.instance_id))) "
    "RETURNING g.instance_id"
)


async def move_customer(session: AsyncSession, old: str, new: str) -> set[str]:
    """Everything kept under customer `old` (instances of any status, goal windows, the message log,
    entries) now under `new`; the instances whose goal windows closed because another instance of
    the person owns the goal now."""
    await _MOVE_CUSTOMER.execute(session, {"old": old, "new": new})
    return {r[0] for r in await _SUPERSEDE_MERGED_WINDOWS.fetch(session, {"new": new})}


async def prune_goal_windows(session: AsyncSession, now: datetime) -> int:
    """Forget windows that closed unconverted."""
    result = await session.execute(text("DELETE FROM goal_windows WHERE open_until <= :now"), {"now": now})
    return int(getattr(result, "rowcount", 0) or 0)


def active_rows(rows: Sequence[Sequence[Any]]) -> list[InstanceRow]:
    """Rows of `ACTIVE_FOR_CUSTOMERS_SQL`, oldest entry first."""
    return sorted((_row(r) for r in rows), key=lambda r: (r.entered_at, r.id))


def entries(rows: Sequence[Sequence[Any]]) -> dict[tuple[str, str, str], datetime]:
    """Rows of `ENTRIES_OF_CUSTOMERS_SQL`: (journey, customer, correlation as stored) -> last entry,
    for the re-entry policy."""
    return {(r[0], r[1], r[2]): r[3] for r in rows}


def goal_windows(rows: Sequence[Sequence[Any]]) -> list[GoalWindow]:
    """Rows of `OPEN_GOALS_SQL`."""
    return [GoalWindow(*r) for r in rows]


async def inside_or_entered(
    session: AsyncSession, journey_id: str, customer_ids: list[str], instance_ids: list[str]
) -> set[str]:
    """Of these customers, those active in the journey, or whose instance for this run (one of
    `instance_ids`, which are deterministic) already exists: a resumed broadcast skips them."""
    rows = await session.execute(
        text(
            "SELECT customer_id FROM instances WHERE journey_id = :j AND status = 'active' "
            "AND customer_id = ANY(CAST(:c AS text[])) "
            "UNION SELECT customer_id FROM instances WHERE id = ANY(CAST(:ids AS text[]))"
        ),
        {"j": journey_id, "c": customer_ids, "ids": instance_ids},
    )
    return {r[0] for r in rows}


async def last_entries(
    session: AsyncSession, journey_id: str, customer_ids: list[str]
) -> dict[tuple[str, str], datetime]:
    rows = await session.execute(
        text(
            "SELECT customer_id, correlation, last_entered_at FROM enrolments WHERE journey_id = :j "
            "AND customer_id = ANY(CAST(:c AS text[]))"
        ),
        {"j": journey_id, "c": customer_ids},
    )
    return {(r[0], r[1]): r[2] for r in rows}


async def _lock_active(session: AsyncSession, journey_id: str) -> None:
    """Lock a journey's active instances in id order (as steps do) before a bulk change."""
    await session.execute(
        text("SELECT id FROM instances WHERE journey_id = :j AND status = 'active' ORDER BY id FOR UPDATE"),
        {"j": journey_id},
    )


async def lock_waiting(session: AsyncSession, journey_id: str, to_version: int) -> list[tuple[int, str, int]]:
    """Lock a journey's active instances (as a migration must, before checking them) and return where
    those not yet on `to_version` wait: (version, node id, instances)."""
    await _lock_active(session, journey_id)
    rows = await session.execute(
        text(
            "SELECT version, node_id, count(*) FROM instances WHERE journey_id = :j AND status = 'active' "
            "AND version <> :v GROUP BY version, node_id ORDER BY version, node_id"
        ),
        {"j": journey_id, "v": to_version},
    )
    return [(r[0], r[1], int(r[2])) for r in rows]


async def migrate_version(
    session: AsyncSession, journey_id: str, to_version: int, checked: list[tuple[int, str]]
) -> int:
    """Move active instances to `to_version` from the (version, node id) places the caller checked
    under `lock_waiting` (the node exists there, of the same type). Only those: an instance that
    entered meanwhile at a place not checked stays on its version. The caller holds `lock_waiting`'s
    locks.

    The version an instance leaves at its first migration is kept in its context (`walker.
    MIGRATED_FROM`): its messages sent before their ids were recorded went out under it."""
    if not checked:
        return 0
    result = await session.execute(
        text(
            "UPDATE instances SET version = :v, context = context || jsonb_build_object("
            f"'{MIGRATED_FROM}', COALESCE(context -> '{MIGRATED_FROM}', to_jsonb(version))) "
            "WHERE journey_id = :j AND status = 'active' "
            "AND (version, node_id) IN "
            "(SELECT * FROM unnest(CAST(:versions AS int[]), CAST(:nodes AS text[]))) AND version <> :v"
        ),
        {
            "j": journey_id,
            "v": to_version,
            "versions": [v for v, _ in checked],
            "nodes": [n for _, n in checked],
        },
    )
    return int(getattr(result, "rowcount", 0) or 0)


_LOG_COLUMNS = (
    "message_id",
    "customer_id",
    "channel",
    "category",
    "decision",
    "reason",
    "template_id",
    "journey_id",
    "version",
    "instance_id",
    "node_id",
)
_LOG_TYPES = ("text", "text", "text", "text", "text", "text", "text", "text", "int", "text", "text")
# New instances, timers, node counts, the message log and enrolments in one statement (empty arrays
# insert nothing). No foreign keys between them, and no sub-statement reads what another writes.
_FLUSH_INSERTS = Statement(
    "WITH new_instances AS (INSERT INTO instances (id, journey_id, version, customer_id, correlation, "
    "status, node_id, wait, context, seq, entered_at, updated_at, exit_reason, converted_at) "
    "SELECT id, journey, version, customer, corr, status, node, CAST(wait AS jsonb), CAST(ctx AS jsonb), "
    "seq, entered, CAST(:now AS timestamptz), reason, converted FROM unnest(CAST(:i_id AS text[]), "
    "CAST(:i_journey AS text[]), CAST(:i_version AS int[]), CAST(:i_customer AS text[]), "
    "CAST(:i_corr AS text[]), CAST(:i_status AS text[]), CAST(:i_node AS text[]), CAST(:i_wait AS text[]), "
    "CAST(:i_ctx AS text[]), CAST(:i_seq AS int[]), CAST(:i_entered AS timestamptz[]), "
    "CAST(:i_reason AS text[]), CAST(:i_converted AS timestamptz[])) "
    "AS u(id, journey, version, customer, corr, status, node, wait, ctx, seq, entered, reason, converted)), "
    "new_timers AS (INSERT INTO timers (instance_id, seq, due_at) SELECT * FROM unnest("
    "CAST(:t_i AS text[]), CAST(:t_s AS int[]), CAST(:t_d AS timestamptz[]))), "
    "new_counts AS (INSERT INTO node_counts (journey_id, version, node_id, metric, n) SELECT * FROM unnest("
    "CAST(:c_j AS text[]), CAST(:c_v AS int[]), CAST(:c_nd AS text[]), CAST(:c_m AS text[]), "
    "CAST(:c_n AS bigint[]))), "
    "new_windows AS (INSERT INTO goal_windows (instance_id, customer_id, journey_id, version, node_id, "
    "correlation, entered_at, open_until) SELECT * FROM unnest(CAST(:w_i AS text[]), CAST(:w_c AS text[]), "
    "CAST(:w_j AS text[]), CAST(:w_v AS int[]), CAST(:w_n AS text[]), CAST(:w_k AS text[]), "
    "CAST(:w_e AS timestamptz[]), CAST(:w_u AS timestamptz[])) ON CONFLICT (instance_id) DO NOTHING), "
    f"new_log AS (INSERT INTO message_log ({', '.join(_LOG_COLUMNS)}, decided_at) "
    "SELECT *, CAST(:now AS timestamptz) FROM unnest("
    + ", ".join(f"CAST(:m_{c} AS {t}[])" for c, t in zip(_LOG_COLUMNS, _LOG_TYPES, strict=True))
    + ") ON CONFLICT (message_id) DO NOTHING) "
    # One row per key with its count (`StepWriter.enrolments`): two entries of a customer in one
    # batch would make ON CONFLICT touch a row twice, failing the whole batch.
    "INSERT INTO enrolments (journey_id, customer_id, correlation, last_entered_at, entries) "
    "SELECT j, c, k, CAST(:now AS timestamptz), n FROM unnest(CAST(:e_j AS text[]), CAST(:e_c AS text[]), "
    "CAST(:e_k AS text[]), CAST(:e_n AS int[])) AS u(j, c, k, n) "
    "ON CONFLICT (journey_id, customer_id, correlation) DO UPDATE "
    "SET last_entered_at = excluded.last_entered_at, entries = enrolments.entries + excluded.entries"
)


@dataclass
class StepWriter:
    """Collects a batch of steps' writes and flushes them in a handful of bulk statements."""

    now: datetime
    new_instances: list[InstanceRow] = field(default_factory=list)
    changed: list[InstanceRow] = field(default_factory=list)
    timers: list[tuple[str, int, datetime]] = field(default_factory=list)
    counts: Counter[tuple[str, int, str, str]] = field(default_factory=Counter)
    messages: list[dict[str, Any]] = field(default_factory=list)
    # (journey, customer, correlation key) -> entries in this batch
    enrolments: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    # Instances that finished in this batch with their goal still reachable, and finished ones that
    # reached it.
    windows: list[GoalWindow] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    # (journey, customer, correlation as stored) -> the instance entered last: older instances' windows
    # close.
    superseded: dict[tuple[str, str, str], str] = field(default_factory=dict)

    async def flush(self, session: AsyncSession) -> None:
        # The optimistic update first (its caller checks the row count), then every insert in one
        # statement: a batch's writes cost two round trips instead of up to six.
        if self.changed:
            await self._update_instances(session)
        if (
            self.new_instances
            or self.timers
            or self.counts
            or self.messages
            or self.enrolments
            or self.windows
        ):
            await _FLUSH_INSERTS.execute(session, self._insert_params())
        if self.converted:
            await _CONVERT_FINISHED.execute(session, {"ids": self.converted, "now": self.now})
        if self.superseded:
            keys = list(self.superseded)
            await _SUPERSEDE_WINDOWS.execute(
                session,
                {
                    "j": [k[0] for k in keys],
                    "c": [k[1] for k in keys],
                    "k": [k[2] for k in keys],
                    "i": list(self.superseded.values()),
                },
            )
        for r in (*self.new_instances, *self.changed):
            r.read_seq = r.seq
        self.new_instances.clear()
        self.changed.clear()
        self.timers.clear()
        self.counts.clear()
        self.messages.clear()
        self.enrolments.clear()
        self.windows.clear()
        self.converted.clear()
        self.superseded.clear()

    @staticmethod
    def _columns(rows: list[InstanceRow]) -> dict[str, list[Any]]:
        return {
            "id": [r.id for r in rows],
            "node": [r.node_id for r in rows],
            "status": [r.status for r in rows],
            "wait": [None if r.wait is None else orjson.dumps(r.wait).decode() for r in rows],
            "ctx": [orjson.dumps(r.context).decode() for r in rows],
            "seq": [r.seq for r in rows],
            "reason": [r.exit_reason for r in rows],
        }

    def _insert_params(self) -> dict[str, Any]:
        rows = self.new_instances
        keys = list(self.counts)
        return (
            {f"i_{k}": v for k, v in self._columns(rows).items()}
            | {
                "i_journey": [r.journey_id for r in rows],
                "i_version": [r.version for r in rows],
                "i_customer": [r.customer_id for r in rows],
                "i_corr": [r.correlation_key for r in rows],
                "i_entered": [r.entered_at for r in rows],
                # An instance entered and converted in the same batch (A/B results count converted_at).
                "i_converted": [r.converted_at for r in rows],
                "now": self.now,
                "t_i": [t[0] for t in self.timers],
                "t_s": [t[1] for t in self.timers],
                "t_d": [t[2] for t in self.timers],
                "c_j": [k[0] for k in keys],
                "c_v": [k[1] for k in keys],
                "c_nd": [k[2] for k in keys],
                "c_m": [k[3] for k in keys],
                "c_n": [self.counts[k] for k in keys],
                "e_j": [e[0] for e in self.enrolments],
                "e_c": [e[1] for e in self.enrolments],
                "e_k": [e[2] for e in self.enrolments],
                "e_n": list(self.enrolments.values()),
                "w_i": [w.instance_id for w in self.windows],
                "w_c": [w.customer_id for w in self.windows],
                "w_j": [w.journey_id for w in self.windows],
                "w_v": [w.version for w in self.windows],
                "w_n": [w.node_id for w in self.windows],
                "w_k": [w.correlation for w in self.windows],
                "w_e": [w.entered_at for w in self.windows],
                "w_u": [w.open_until for w in self.windows],
            }
            | {f"m_{c}": [m[c] for m in self.messages] for c in _LOG_COLUMNS}
        )

    async def _update_instances(self, session: AsyncSession) -> None:
        # A row stepped twice in one batch is written once, with its final state.
        new_ids = {r.id for r in self.new_instances}
        rows = [r for r in {r.id: r for r in self.changed}.values() if r.id not in new_ids]
        if not rows:
            return
        updated = await _UPDATE_INSTANCES.execute(
            session, self._columns(rows) | {"now": self.now, "read_seq": [r.read_seq for r in rows]}
        )
        if updated != len(rows):
            raise InstanceConflict(f"{len(rows) - updated} instance(s) moved on")


# --------------------------------------------------------------------------- stats

# Every unit of work adds its counts as new rows (no hot row): roll a journey's rows up into one per
# (version, node, metric) so that its stats stay a read of a few rows. Rows inserted meanwhile are not
# in the DELETE's snapshot and stay as they are: the sums never change.
_COMPACT = text(
    "WITH gone AS (DELETE FROM node_counts WHERE journey_id = :j RETURNING version, node_id, metric, n) "
    "INSERT INTO node_counts (journey_id, version, node_id, metric, n) "
    "SELECT :j, version, node_id, metric, sum(n) FROM gone GROUP BY version, node_id, metric"
)
_CROWDED = text(
    "SELECT journey_id FROM node_counts GROUP BY journey_id "
    "HAVING count(*) > :rows_per_total * count(DISTINCT (version, node_id, metric))"
)


async def crowded_journeys(session: AsyncSession, rows_per_total: int) -> list[str]:
    """Journeys whose counters hold more than `rows_per_total` rows per total they add up to."""
    return [r[0] for r in await session.execute(_CROWDED, {"rows_per_total": rows_per_total})]


async def compact_node_counts(session: AsyncSession, journey_id: str) -> None:
    await session.execute(_COMPACT, {"j": journey_id})


async def node_totals(session: AsyncSession, journey_id: str) -> dict[tuple[int, str], dict[str, int]]:
    rows = await session.execute(
        text(
            "SELECT version, node_id, metric, sum(n) FROM node_counts WHERE journey_id = :j "
            "GROUP BY version, node_id, metric"
        ),
        {"j": journey_id},
    )
    out: dict[tuple[int, str], dict[str, int]] = {}
    for version, node, metric, n in rows:
        out.setdefault((version, node), {})[metric] = int(n)
    rows = await session.execute(
        text(
            "SELECT version, node_id, count(*) FROM instances WHERE journey_id = :j AND status = 'active' "
            "GROUP BY version, node_id"
        ),
        {"j": journey_id},
    )
    for version, node, n in rows:
        out.setdefault((version, node), {})["waiting"] = int(n)
    return out


async def arm_outcomes(session: AsyncSession, journey_id: str) -> list[tuple[int, str, str, int, int, int]]:
    """(version, split node, arm, customers assigned, customers converted, entries) for every A/B
    split. Per customer, not per instance: a weekly broadcast enters its members every run, and
    counting each run as another customer overstated the arm and its z-test. A customer converted
    when any of their instances reached the goal, inside or, within the goal's window, after the
    path ended; `entries` counts the instances (exposures)."""
    rows = await session.execute(
        text(
            "SELECT version, a.key, a.value #>> '{}', count(DISTINCT customer_id), "
            "count(DISTINCT customer_id) FILTER (WHERE converted_at IS NOT NULL), count(*) "
            "FROM instances, jsonb_each(context -> 'arms') AS a WHERE journey_id = :j "
            "GROUP BY version, a.key, a.value #>> '{}' ORDER BY 1, 2, 3"
        ),
        {"j": journey_id},
    )
    return [(r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5])) for r in rows]


# An archived journey's customers exit after the archive committed, a chunk per transaction
# (`JourneyEngine.finish_archive`), each counted as exited at its node. By the primary key (an array:
# a join with the chosen rows read the whole table each chunk).
_EXIT = (
    "gone AS (UPDATE instances AS i SET status = 'exited', exit_reason = :r, wait = NULL, seq = i.seq + 1, "
    "updated_at = :now WHERE i.id = ANY(ARRAY(SELECT id FROM chosen)) RETURNING i.version, i.node_id), "
    "counted AS (INSERT INTO node_counts (journey_id, version, node_id, metric, n) "
    "SELECT :j, version, node_id, 'exited', count(*) FROM gone GROUP BY version, node_id)"
)
# First those no step holds (SKIP LOCKED: never waits, so its order crosses no other locker's), in
# the order of the journey's partial index, from where the last chunk stopped (the dead entries
# behind it are not read again); the last (customer, correlation) chosen comes back.
_EXIT_UNHELD = (
    "WITH chosen AS (SELECT id, customer_id, correlation FROM instances "
    "WHERE journey_id = :j AND status = 'active'{after} "
    "ORDER BY customer_id, correlation LIMIT :n FOR UPDATE SKIP LOCKED), "
    f"{_EXIT} SELECT (SELECT count(*) FROM gone), c.customer_id, c.correlation FROM chosen AS c "
    "ORDER BY c.customer_id DESC, c.correlation DESC LIMIT 1"
)
_EXIT_FIRST = text(_EXIT_UNHELD.format(after=""))
_EXIT_NEXT = text(_EXIT_UNHELD.format(after=" AND (customer_id, correlation) > (:c, :k)"))
# Then the rest, which steps in flight held: waiting for them, in id order as steps lock. Found
# through the journey's partial index first (ordered by id, the planner may walk the primary key
# through every journey's instances, expecting the many this journey had).
_EXIT_HELD = text(
    "WITH found AS MATERIALIZED (SELECT id FROM instances WHERE journey_id = :j AND status = 'active' "
    "LIMIT :n), chosen AS (SELECT id FROM instances WHERE id = ANY(ARRAY(SELECT id FROM found)) "
    f"AND status = 'active' ORDER BY id FOR UPDATE), {_EXIT} SELECT count(*) FROM gone"
)


async def exit_unheld(
    session: AsyncSession,
    journey_id: str,
    reason: str,
    now: datetime,
    limit: int,
    after: tuple[str, str] | None,
) -> tuple[int, tuple[str, str] | None]:
    """Exit up to `limit` active instances of the journey that no step holds, after `after` (where
    the chunk before stopped; None: from the start): (exited, where this one stopped, None when it
    found none)."""
    params: dict[str, Any] = {"j": journey_id, "r": reason, "now": now, "n": limit}
    if after is not None:
        params |= {"c": after[0], "k": after[1]}
    row = (await session.execute(_EXIT_FIRST if after is None else _EXIT_NEXT, params)).first()
    return (0, None) if row is None else (int(row[0]), (row[1], row[2]))


async def exit_held(session: AsyncSession, journey_id: str, reason: str, now: datetime, limit: int) -> int:
    """Exit up to `limit` active instances of the journey, waiting for the steps that hold them."""
    result = await session.execute(_EXIT_HELD, {"j": journey_id, "r": reason, "now": now, "n": limit})
    return int(result.scalar_one())


async def close_goal_windows(session: AsyncSession, journey_id: str) -> int:
    """An archived journey counts no more conversions (batches skip its windows already). One
    statement: no step waits for these rows."""
    result = await session.execute(text("DELETE FROM goal_windows WHERE journey_id = :j"), {"j": journey_id})
    return int(getattr(result, "rowcount", 0) or 0)


async def parked_timers(session: AsyncSession, journey_id: str) -> int:
    """How many of the journey's timers are parked (`timers_parked`): customers held at a step. Only
    those the instance still waits on (active, at that step): a parked row outlives an instance that
    moved on (a migration, an event) or exited (an archive), and holds nobody then."""
    return int(
        await session.scalar(
            text(
                "SELECT count(*) FROM timers_parked AS p JOIN instances AS i ON i.id = p.instance_id "
                "AND i.status = 'active' AND i.seq = p.seq WHERE i.journey_id = :j"
            ),
            {"j": journey_id},
        )
        or 0
    )


async def with_parked_timers(session: AsyncSession, instance_ids: Sequence[str]) -> set[str]:
    """Of these instances, those waiting on a parked timer (active, at the step it was armed for)."""
    rows = await session.execute(
        text(
            "SELECT DISTINCT p.instance_id FROM timers_parked AS p JOIN instances AS i "
            "ON i.id = p.instance_id AND i.status = 'active' AND i.seq = p.seq "
            "WHERE p.instance_id = ANY(CAST(:ids AS text[]))"
        ),
        {"ids": list(instance_ids)},
    )
    return {r[0] for r in rows}


async def list_for_journey(session: AsyncSession, journey_id: str, limit: int = 100) -> list[InstanceRow]:
    rows = await session.execute(
        text(f"SELECT {_COLUMNS} FROM instances WHERE journey_id = :j ORDER BY entered_at DESC, id LIMIT :n"),
        {"j": journey_id, "n": limit},
    )
    return [_row(r) for r in rows]

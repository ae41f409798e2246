"""Every SQL query on segments, memberships, due timers and back-fill."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple

import orjson
from pydantic import TypeAdapter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.segmenter.domain.profile import EventAggregate, Occurrence
from services.segmenter.domain.rules import Rule
from services.segmenter.store.sql_rules import RuleSql
from shared.contracts.events import RESYNC_CAUSE
from shared.db.engine import Statement, json_rows, rows_from_json

# Whether the failure recorded on a segment is its current pass's: a failure is charged to the pass
# that had the chunk, `backfill_failed_pass` holding that pass's `backfill_started_at`, matched
# exactly. Every restart of a pass sets `backfill_started_at`, but a release before 2026-12-08 (an
# old replica during a rollout) does not reset the failure columns: its new pass does not match, and
# a failure of an earlier pass is none of its business. (Not `backfill_failed_at >= started_at`: the
# two come from different replicas' clocks, and the worker's `now` is taken before its claim.)
_CURRENT_FAILURE = "backfill_failed_pass IS NOT DISTINCT FROM backfill_started_at"
# The current pass's failed chunks in a row (an older failure counts none).
_FAILURES = f"(CASE WHEN {_CURRENT_FAILURE} THEN backfill_failures ELSE 0 END)"
# The current pass's stalls in a row: chunks struck by a passing cause or an outage.
_STALLS = f"(CASE WHEN {_CURRENT_FAILURE} THEN backfill_stalls ELSE 0 END)"
SEGMENT_COLUMNS = (
    "segment_id, name, description, definition, version, status, backfill_cursor, backfill_done, "
    f"backfill_total, backfill_started_at, backfill_finished_at, {_FAILURES} AS backfill_failures, "
    f"{_STALLS} AS backfill_stalls, CASE WHEN {_CURRENT_FAILURE} THEN backfill_error END AS backfill_error, "
    f"CASE WHEN {_CURRENT_FAILURE} THEN backfill_failed_at END AS backfill_failed_at, created_at, updated_at"
)
# How the error of a segment failed for its stored definition begins (`fail_definition`, and a chunk
# failing with `InvalidRule`): the only failure a later release can mend by itself, so the worker
# looks for it (`failed_for_definition`), on the current pass only (`_CURRENT_FAILURE`). Every release
# that marks segments `failed` writes it so, but for a bare `InvalidRule` (the 2026-12-07 release's
# fallback when the catalogue gave no reason), recognised too.
DEFINITION_ERROR = "InvalidRule: "
_DEFINITION_FAILURE = (
    f"({_CURRENT_FAILURE} AND (backfill_error = :definition_bare "
    "OR starts_with(backfill_error, :definition_error)))"
)
_DEFINITION_PARAMS = {"definition_error": DEFINITION_ERROR, "definition_bare": DEFINITION_ERROR[:-2]}
# A new back-fill pass: from the first customer, no failure yet.
_START_PASS = (
    "status = 'backfilling', backfill_cursor = NULL, backfill_done = 0, "
    "backfill_total = (SELECT count(*) FROM customers), backfill_started_at = :now, "
    "backfill_finished_at = NULL, backfill_failures = 0, backfill_stalls = 0, backfill_error = NULL, "
    "backfill_failed_at = NULL, backfill_failed_pass = NULL"
)


async def list_segments(session: AsyncSession) -> list[dict[str, Any]]:
    rows = await session.execute(
        text(f"SELECT {SEGMENT_COLUMNS} FROM segments ORDER BY created_at, segment_id")
    )
    return [dict(r._mapping) for r in rows]


_SEGMENT_VERSIONS = Statement("SELECT segment_id, version, name, definition FROM segments")


async def segment_versions(session: AsyncSession) -> list[tuple[str, int, str, Any]]:
    """(id, version, name, definition) of every segment: the real-time catalogue's source (read by
    every unit of work, so straight on the driver)."""
    return [(r[0], r[1], r[2], r[3]) for r in await _SEGMENT_VERSIONS.fetch(session)]


async def get_segment(
    session: AsyncSession, segment_id: str, *, lock: Literal["", "FOR UPDATE", "FOR NO KEY UPDATE"] = ""
) -> dict[str, Any] | None:
    """The segment's row; `lock`: FOR UPDATE waits for the back-fill chunk and the real-time units
    writing its memberships (they hold it FOR KEY SHARE), FOR NO KEY UPDATE for the chunk only."""
    sql = f"SELECT {SEGMENT_COLUMNS} FROM segments WHERE segment_id = :s {lock}"
    row = (await session.execute(text(sql), {"s": segment_id})).first()
    return dict(row._mapping) if row else None


async def insert_segment(
    session: AsyncSession, segment_id: str, name: str, description: str, definition: Any, now: datetime
) -> None:
    await session.execute(
        text(
            "INSERT INTO segments (segment_id, name, description, definition, version, status, "
            "backfill_total, "
            "backfill_started_at, created_at, updated_at) "
            "VALUES (:s, :n, :d, CAST(:def AS jsonb), 1, 'backfilling', (SELECT count(*) FROM customers), "
            ":now, :now, :now)"
        ),
        {"s": segment_id, "n": name, "d": description, "def": orjson.dumps(definition).decode(), "now": now},
    )


async def update_segment(
    session: AsyncSession, segment_id: str, name: str, description: str, definition: Any, now: datetime
) -> None:
    """A new version: back-fill starts over (memberships stay as they are until it passes them)."""
    await session.execute(
        text(
            "UPDATE segments SET name = :n, description = :d, definition = CAST(:def AS jsonb), "
            f"version = version + 1, {_START_PASS}, updated_at = :now WHERE segment_id = :s"
        ),
        {"s": segment_id, "n": name, "d": description, "def": orjson.dumps(definition).decode(), "now": now},
    )


async def restart_backfill(session: AsyncSession, segment_ids: Iterable[str], now: datetime) -> None:
    await session.execute(
        text(f"UPDATE segments SET {_START_PASS} WHERE segment_id = ANY(CAST(:ids AS text[]))"),
        {"ids": list(segment_ids), "now": now},
    )


async def hide_segment(session: AsyncSession, segment_id: str, name: str, now: datetime) -> None:
    """A deletion's first, short transaction: the segment's row goes (the catalogue, the API and
    real-time membership writes no longer see it) and a `segment_deletions` row takes its place until
    `delete_segment` has removed its memberships. The caller holds the row FOR UPDATE (so the back-fill
    chunk and the real-time units writing its memberships have committed) and nothing else: a unit
    waiting for it holds customer locks, so the wait stays this short."""
    await session.execute(
        text(
            "INSERT INTO segment_deletions (segment_id, name, requested_at) VALUES (:s, :n, :now) "
            "ON CONFLICT (segment_id) DO NOTHING"
        ),
        {"s": segment_id, "n": name, "now": now},
    )
    await session.execute(text("DELETE FROM segments WHERE segment_id = :s"), {"s": segment_id})


async def claim_deletion(session: AsyncSession, segment_id: str | None = None) -> tuple[str, str] | None:
    """A hidden segment whose memberships are still to remove (`segment_id`'s, or the oldest), locked
    for this transaction; another worker skips it."""
    row = (
        await session.execute(
            text(
                "SELECT segment_id, name FROM segment_deletions "
                "WHERE (CAST(:s AS text) IS NULL OR segment_id = :s) "
                "ORDER BY requested_at LIMIT 1 FOR UPDATE SKIP LOCKED"
            ),
            {"s": segment_id},
        )
    ).first()
    return (row[0], row[1]) if row else None


async def delete_segment(session: AsyncSession, segment_id: str, announce: Announcement) -> int:
    """A deletion's second transaction (after `hide_segment`, the `segment_deletions` row claimed):
    the memberships and timers go, and every member's exit is announced (cause `segment_deleted`),
    so that journeys and other consumers of memberships stop counting them. Returns the exits
    announced. Real time no longer writes memberships of the segment (its row is gone), so this
    waits for no event batch however many members it has."""
    exits = (
        await session.execute(
            text(
                "WITH gone AS (DELETE FROM memberships WHERE segment_id = :seg "
                "RETURNING customer_id, is_member, transitions), "
                "announced AS (SELECT g.customer_id, "
                "g.customer_id || ':' || :seg || ':' || (g.transitions + 1) AS event_id, "
                + _ONE_SEGMENT
                + "false AS is_member, c.traits FROM gone g JOIN customers c USING (customer_id) "
                "WHERE g.is_member), "
                "outboxed AS (" + _outbox_announcements("announced") + ") "
                "SELECT count(*) FROM outboxed"
            ),
            {"seg": segment_id, **announce.params("segment_deleted")},
        )
    ).scalar_one()
    await session.execute(text("DELETE FROM segment_timers WHERE segment_id = :s"), {"s": segment_id})
    await session.execute(text("DELETE FROM segment_timers_parked WHERE segment_id = :s"), {"s": segment_id})
    await session.execute(text("DELETE FROM segment_deletions WHERE segment_id = :s"), {"s": segment_id})
    return int(exits)


# --------------------------------------------------------------------------- memberships


@dataclass(frozen=True)
class MembershipState:
    is_member: bool
    transitions: int


# The statements of every event batch go straight to asyncpg (`Statement`).
_EVALUATION_INPUTS = Statement(
    # The ids stay a text[]: read four times, as one array the planner sees (JSON here cost the
    # database more than it saved Python).
    "SELECT 'c' AS src, customer_id, event AS name, count AS n, first_at AS t1, last_at AS t2, "
    "NULL::boolean AS flag, NULL::jsonb AS props FROM event_counts "
    "WHERE customer_id = ANY(CAST(:ids AS text[])) AND event = ANY(CAST(:counted AS text[])) "
    "UNION ALL SELECT 'o', e.customer_id, e.event, NULL, e.timestamp, NULL, NULL, e.properties FROM "
    "events e JOIN "
    + rows_from_json("windows", [("name", "text"), ("since", "timestamptz")])
    + " AS w ON e.event = w.name AND (w.since IS NULL OR e.timestamp >= w.since) "
    "WHERE e.customer_id = ANY(CAST(:ids AS text[])) "
    "UNION ALL SELECT 'm', customer_id, segment_id, transitions, NULL, NULL, is_member, NULL FROM "
    "memberships "
    "WHERE customer_id = ANY(CAST(:ids AS text[])) "
    "UNION ALL SELECT 't', customer_id, segment_id, NULL, due_at, NULL, NULL, NULL FROM "
    "segment_timers "
    "WHERE customer_id = ANY(CAST(:ids AS text[]))"
)
# The segments written are held FOR KEY SHARE until commit (`live`): a deletion's first step (FOR
# UPDATE on the segment row, `hide_segment`) either waits for this unit, whose memberships its second
# step then removes with their exits announced, or commits first and the rows of the segment it hid
# are skipped here (neither recorded nor announced). A back-fill chunk and an edit hold the segment
# FOR NO KEY UPDATE, which does not conflict: real time never waits for them.
_APPLY_MEMBERSHIP_CHANGES = Statement(
    "WITH u AS MATERIALIZED "
    + rows_from_json("rows", [("s", "text"), ("c", "text"), ("m", "boolean"), ("k", "text")])
    + ", live AS MATERIALIZED (SELECT segment_id FROM segments "
    "WHERE segment_id = ANY(ARRAY(SELECT DISTINCT s FROM u)) FOR KEY SHARE) "
    "INSERT INTO memberships (segment_id, customer_id, is_member, transitions, changed_at, cause) "
    "SELECT s, c, m, 1, :now, k FROM u "
    "WHERE s = ANY(ARRAY(SELECT segment_id FROM live)) "
    "ON CONFLICT (segment_id, customer_id) DO UPDATE SET is_member = excluded.is_member, "
    "transitions = memberships.transitions + 1, changed_at = excluded.changed_at, cause = "
    "excluded.cause "
    "WHERE memberships.is_member IS DISTINCT FROM excluded.is_member "
    "RETURNING segment_id, customer_id, is_member, transitions, cause"
)
_SET_TIMERS = Statement(
    "WITH cleared AS (DELETE FROM segment_timers t USING "
    + rows_from_json("clear", [("c", "text"), ("s", "text")])
    + " AS u WHERE t.customer_id = u.c AND t.segment_id = u.s) "
    "INSERT INTO segment_timers (customer_id, segment_id, due_at) SELECT * FROM "
    + rows_from_json("due", [("c", "text"), ("s", "text"), ("d", "timestamptz")])
    # Evaluated without failing: a timer moved here starts its tries afresh (`due_timers.py`).
    + " AS u ON CONFLICT (customer_id, segment_id) DO UPDATE SET due_at = excluded.due_at, attempts = 0, "
    "stalls = 0"
)


async def load_memberships(
    session: AsyncSession, customer_ids: Iterable[str]
) -> dict[str, dict[str, MembershipState]]:
    rows = await session.execute(
        text(
            "SELECT customer_id, segment_id, is_member, transitions FROM memberships "
            "WHERE customer_id = ANY(CAST(:ids AS text[]))"
        ),
        {"ids": list(customer_ids)},
    )
    out: dict[str, dict[str, MembershipState]] = {}
    for r in rows:
        out.setdefault(r.customer_id, {})[r.segment_id] = MembershipState(r.is_member, r.transitions)
    return out


class MembershipChange(NamedTuple):  # built for every change: ~4x cheaper than a frozen dataclass
    segment_id: str
    customer_id: str
    is_member: bool
    cause: str


async def apply_membership_changes(
    session: AsyncSession, changes: Sequence[MembershipChange], now: datetime
) -> list[tuple[str, str, bool, int, str]]:
    """Write the changes; returns those that really changed the stored state (segment, customer,
    is_member, transitions, cause). The guard in `WHERE` makes a concurrent writer (back-fill vs
    real time) that already made the same change a no-op, so each transition is announced once."""
    if not changes:
        return []
    rows = await _APPLY_MEMBERSHIP_CHANGES.fetch(
        session,
        {"rows": json_rows(changes), "now": now},
    )
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


async def members_page(session: AsyncSession, segment_id: str, after: str | None, limit: int) -> list[str]:
    rows = await session.execute(
        text(
            "SELECT customer_id FROM memberships WHERE segment_id = :s AND is_member "
            "AND customer_id > :after ORDER BY customer_id LIMIT :n"
        ),
        {"s": segment_id, "after": after or "", "n": limit},
    )
    return [r[0] for r in rows]


async def member_count(session: AsyncSession, segment_id: str) -> int:
    return int(
        await session.scalar(
            text("SELECT count(*) FROM memberships WHERE segment_id = :s AND is_member"), {"s": segment_id}
        )
        or 0
    )


async def segments_of(session: AsyncSession, customer_id: str) -> list[dict[str, Any]]:
    rows = await session.execute(
        text(
            "SELECT m.segment_id, s.name, m.changed_at AS since, m.cause FROM memberships m "
            "JOIN segments s USING (segment_id) WHERE m.customer_id = :c AND m.is_member ORDER BY s.name"
        ),
        {"c": customer_id},
    )
    return [dict(r._mapping) for r in rows]


@dataclass
class EvaluationInputs:
    """Everything rules read besides the profile row, for a set of customers (one round trip)."""

    counts: dict[str, dict[str, EventAggregate]]
    occurrences: dict[str, dict[str, list[Occurrence]]]
    memberships: dict[str, dict[str, MembershipState]]
    timers: dict[tuple[str, str], datetime]


async def load_evaluation_inputs(
    session: AsyncSession,
    customer_ids: Iterable[str],
    count_events: Iterable[str],
    timeline_since: dict[str, datetime | None],
) -> EvaluationInputs:
    ids = list(customer_ids)
    names = list(timeline_since)
    rows = await _EVALUATION_INPUTS.fetch(
        session,
        {
            "ids": ids,
            "counted": list(count_events),
            "windows": json_rows((n, timeline_since[n]) for n in names),
        },
    )
    out = EvaluationInputs({}, {}, {}, {})
    for src, customer_id, name, n, t1, t2, flag, props in rows:
        if src == "c":
            out.counts.setdefault(customer_id, {})[name] = EventAggregate(n, t1, t2)
        elif src == "o":
            out.occurrences.setdefault(customer_id, {}).setdefault(name, []).append(Occurrence(t1, props))
        elif src == "m":
            out.memberships.setdefault(customer_id, {})[name] = MembershipState(flag, n)
        else:
            out.timers[(customer_id, name)] = t1
    return out


# --------------------------------------------------------------------------- due timers


async def set_timers(
    session: AsyncSession, due: Sequence[tuple[str, str, datetime]], clear: Sequence[tuple[str, str]]
) -> None:
    """Schedule (or move) and clear due timers in one statement."""
    if not due and not clear:
        return
    await _SET_TIMERS.execute(
        session,
        {"due": json_rows(due), "clear": json_rows(clear)},
    )


# --------------------------------------------------------------------------- back-fill and preview


async def claim_backfill(
    session: AsyncSession, now: datetime, retry_after_s: float, max_backoff_s: float
) -> dict[str, Any] | None:
    """One segment waiting for back-fill, locked for this chunk's transaction (FOR NO KEY UPDATE: an
    edit or a deletion waits for the chunk, real-time membership writes do not). The oldest edit
    first, behind every segment whose pass has failed or stalled fewer chunks in a row, and one whose
    chunk failed (or stalled) only once its back-off is over: `retry_after_s` after its last failure,
    doubled for each stall in a row after the first, at most `max_backoff_s` (`backoff_s`). A segment
    whose chunk keeps failing never holds up the others."""
    row = (
        await session.execute(
            text(
                f"SELECT {SEGMENT_COLUMNS} FROM segments WHERE status = 'backfilling' "
                f"AND (backfill_failed_at IS NULL OR NOT ({_CURRENT_FAILURE}) "
                "OR backfill_failed_at <= CAST(:now AS timestamptz) - make_interval(secs => "
                "LEAST(CAST(:base AS float8) * power(2, LEAST(GREATEST("
                f"{_STALLS} - 1, 0), 40)), GREATEST(CAST(:cap AS float8), CAST(:base AS float8))))) "
                f"ORDER BY {_FAILURES} + {_STALLS}, updated_at LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED"
            ),
            {"now": now, "base": float(retry_after_s), "cap": float(max_backoff_s)},
        )
    ).first()
    return dict(row._mapping) if row else None


def backoff_s(stalls: int, retry_after_s: float, max_backoff_s: float) -> float:
    """How long after its last failure a segment with `stalls` in a row is tried again (as
    `claim_backfill` reckons it)."""
    doubled: float = retry_after_s * 2.0 ** min(max(stalls - 1, 0), 40)
    return min(doubled, max(max_backoff_s, retry_after_s))


class RecordedFailure(NamedTuple):
    status: str
    failures: int
    stalls: int


async def record_backfill_failure(
    session: AsyncSession,
    row: Mapping[str, Any],
    error: str,
    now: datetime,
    *,
    counted: bool,
    max_failures: int,
    max_stalls: int,
) -> RecordedFailure | None:
    """Record a failed chunk on the pass `row` (a claimed segment row) was in, if it still is (same
    `version` and `backfill_started_at`, still back-filling), charged to that pass: its error and
    time, which send it behind the others until it is retried. `counted`: one more failed chunk in a
    row, and the segment is `failed` at `max_failures`; else (a passing cause, an outage) one more
    stall in a row, which backs it off twice as long as the last, and it is `failed` at `max_stalls`.
    Returns (status, failures, stalls), or None if the segment was edited, restarted or deleted
    meanwhile."""
    found = (
        await session.execute(
            text(
                f"UPDATE segments SET backfill_failures = {_FAILURES} + :add, "
                f"backfill_stalls = {_STALLS} + :stall, backfill_error = :err, "
                "backfill_failed_at = :now, backfill_failed_pass = backfill_started_at, "
                f"status = CASE WHEN {_FAILURES} + :add >= :max OR {_STALLS} + :stall >= :max_stalls "
                "THEN 'failed' ELSE status END "
                "WHERE segment_id = :s AND version = :v AND status = 'backfilling' "
                "AND backfill_started_at IS NOT DISTINCT FROM :started "
                "RETURNING status, backfill_failures, backfill_stalls"
            ),
            {
                "s": row["segment_id"],
                "v": row["version"],
                "started": row["backfill_started_at"],
                "err": error,
                "add": 1 if counted else 0,
                "stall": 0 if counted else 1,
                # Each count fails it only by its own limit, whatever the other was before.
                "max": max_failures if counted else 2**31 - 1,
                "max_stalls": 2**31 - 1 if counted else max_stalls,
                "now": now,
            },
        )
    ).first()
    return RecordedFailure(found[0], found[1], found[2]) if found else None


async def fail_definition(
    session: AsyncSession, segment_id: str, version: int, error: str, now: datetime
) -> bool:
    """Mark `failed`, whatever its status, a segment whose stored `version` no longer validates (saved
    by an earlier release), with why; False if it already is, or was edited or deleted meanwhile."""
    result = await session.execute(
        text(
            f"UPDATE segments SET status = 'failed', backfill_failures = {_FAILURES} + 1, "
            f"backfill_stalls = {_STALLS}, "
            "backfill_error = :err, backfill_failed_at = :now, backfill_failed_pass = backfill_started_at "
            "WHERE segment_id = :s AND version = :v AND status <> 'failed'"
        ),
        {"s": segment_id, "v": version, "err": error, "now": now},
    )
    return bool(getattr(result, "rowcount", 0))


async def failed_for_definition(session: AsyncSession) -> list[tuple[str, int, datetime | None]]:
    """(id, version, failed at) of the segments `failed` because their stored definition did not
    validate (by the error of their current pass): a release that accepts it again may back-fill them
    again."""
    rows = await session.execute(
        text(
            "SELECT segment_id, version, backfill_failed_at FROM segments "
            f"WHERE status = 'failed' AND {_DEFINITION_FAILURE} ORDER BY segment_id"
        ),
        _DEFINITION_PARAMS,
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def restart_failed_definition(
    session: AsyncSession, segment_id: str, version: int, now: datetime
) -> bool:
    """A new pass, from the first customer, for a segment still `failed` for its stored `version`'s
    definition (which now validates): real time and its due timers skipped it while it did not, so
    customers before its cursor may be out of date too. False if it was edited, retried, deleted or
    failed for something else meanwhile."""
    result = await session.execute(
        text(
            f"UPDATE segments SET {_START_PASS} WHERE segment_id = :s AND version = :v "
            f"AND status = 'failed' AND {_DEFINITION_FAILURE}"
        ),
        {"s": segment_id, "v": version, "now": now, **_DEFINITION_PARAMS},
    )
    return bool(getattr(result, "rowcount", 0))


def failed_for_its_definition(row: Mapping[str, Any]) -> bool:
    """Whether a segment row (`SEGMENT_COLUMNS`: its current pass's error) failed for its stored
    definition."""
    error = str(row["backfill_error"] or "")
    return row["status"] == "failed" and (
        error == _DEFINITION_PARAMS["definition_bare"] or error.startswith(DEFINITION_ERROR)
    )


async def retry_backfill(session: AsyncSession, segment_id: str) -> None:
    """A failed (or backed-off) pass goes on from where it stopped, with no failure counted: its
    cursor, progress and start are kept. A pass that had finished (a segment failed for its stored
    definition once `ready`) starts over instead: real time skipped it meanwhile."""
    await session.execute(
        text(
            "UPDATE segments SET status = 'backfilling', backfill_failures = 0, backfill_stalls = 0, "
            "backfill_error = NULL, "
            "backfill_failed_at = NULL, backfill_failed_pass = NULL, "
            "backfill_cursor = CASE WHEN backfill_finished_at IS NULL THEN backfill_cursor END, "
            "backfill_done = CASE WHEN backfill_finished_at IS NULL THEN backfill_done ELSE 0 END, "
            "backfill_finished_at = NULL WHERE segment_id = :s"
        ),
        {"s": segment_id},
    )


async def chunk_upper_bound(session: AsyncSession, after: str | None, size: int) -> str | None:
    """The last customer id of the next chunk (keyset paging over the primary key)."""
    row = (
        await session.execute(
            text(
                "SELECT max(customer_id) FROM (SELECT customer_id FROM customers "
                "WHERE customer_id > :after ORDER BY customer_id LIMIT :n) x"
            ),
            {"after": after or "", "n": size},
        )
    ).first()
    return row[0] if row and row[0] is not None else None


@dataclass(frozen=True)
class Announcement:
    """What a statement needs to write `SegmentMembershipChanged` outbox rows itself (back-fill,
    deletion): no Python per customer."""

    topic: str
    segment_name: str
    occurred_at: str  # as the contract model serializes it
    producer: str
    produced_at_ms: str

    @classmethod
    def of(cls, topic: str, producer: str, segment_name: str, now: datetime) -> Announcement:
        return cls(
            topic=topic,
            segment_name=segment_name,
            occurred_at=str(TypeAdapter(datetime).dump_python(now, mode="json")),
            producer=producer,
            produced_at_ms=str(int(time.time() * 1000)),
        )

    def params(self, cause: str) -> dict[str, str]:
        return {
            "cause": cause,
            "topic": self.topic,
            "seg_name": self.segment_name,
            "occurred": self.occurred_at,
            "producer": self.producer,
            "produced_ms": self.produced_at_ms,
        }


def _outbox_announcements(source: str) -> str:
    """An INSERT of one `SegmentMembershipChanged` outbox row per row of `source` (customer_id,
    event_id, segment_id, segment_name, is_member, traits); the `Announcement.params` bind the rest."""
    return (
        "INSERT INTO outbox (topic, key, value, headers) "
        "SELECT :topic, convert_to(a.customer_id, 'UTF8'), convert_to(jsonb_build_object("
        "'event_id', a.event_id, 'customer_id', a.customer_id, 'segment_id', a.segment_id, "
        "'segment_name', a.segment_name, "
        "'change', CASE WHEN a.is_member THEN 'entered' ELSE 'exited' END, 'occurred_at', CAST(:occurred AS "
        "text), "
        "'cause', CAST(:cause AS text), 'traits', a.traits)::text, 'UTF8'), "
        "jsonb_build_object('clm-event-id', a.event_id, "
        "'clm-event-type', 'segment_membership_changed', "
        "'clm-schema-version', '1', "
        "'clm-correlation-id', gen_random_uuid()::text, "
        "'clm-producer', CAST(:producer AS text), "
        "'clm-produced-at-ms', CAST(:produced_ms AS text)) "
        f"FROM {source} a ORDER BY a.customer_id, a.segment_id RETURNING 1"
    )


# The segment of a one-segment statement (back-fill, deletion), as `_outbox_announcements` reads it.
_ONE_SEGMENT = "CAST(:seg AS text) AS segment_id, CAST(:seg_name AS text) AS segment_name, "


async def backfill_chunk(
    session: AsyncSession,
    segment_id: str,
    rule: Rule,
    after: str | None,
    upto: str,
    now: datetime,
    announce: Announcement,
) -> tuple[int, int]:
    """Evaluate the rule for customers in (after, upto] in one statement: store each one's next due
    moment, write the memberships that differ and their `SegmentMembershipChanged` outbox rows
    (built in SQL: no Python per customer). Returns (customers seen, changes announced)."""
    sql = RuleSql(now)
    predicate, due = sql.predicate(rule), sql.next_change(rule)
    params = {
        **sql.params,
        "seg": segment_id,
        # '' sorts before every id: a plain range keeps the index scan to this chunk (an `IS NULL OR`
        # here made generic plans scan from the start on every chunk).
        "after": after or "",
        "upto": upto,
        **announce.params("backfill"),
    }
    evaluated = (
        "WITH chunk AS (SELECT c.customer_id, c.traits, " + predicate + " AS hit, " + due + " AS due "
        "FROM customers c WHERE c.customer_id > :after AND c.customer_id "
        "<= :upto), "
        # Both joins below are bounded to the chunk's id range too: planned with stale statistics (the
        # tables grow chunk by chunk), the delete once read every timer the earlier chunks wrote and
        # scanned the whole chunk for each (80 s for one chunk of 50,000 instead of under 2 s).
        "cleared AS (DELETE FROM segment_timers t USING chunk WHERE t.segment_id = :seg "
        "AND t.customer_id > :after AND t.customer_id <= :upto "
        "AND t.customer_id = chunk.customer_id AND chunk.due IS NULL), "
        "timed AS (INSERT INTO segment_timers (customer_id, segment_id, due_at) "
        "SELECT customer_id, :seg, due FROM chunk WHERE due IS NOT NULL "
        "ON CONFLICT (customer_id, segment_id) DO UPDATE SET due_at = excluded.due_at, attempts = 0, "
        "stalls = 0), "
        # The chunk's customers are re-evaluated and get fresh timers: their parked ones are done with
        # (a re-save or any other back-fill of the segment clears them, chunk by chunk).
        "unparked AS (DELETE FROM segment_timers_parked p WHERE p.segment_id = :seg "
        "AND p.customer_id > :after AND p.customer_id <= :upto), "
        "changed AS (INSERT INTO memberships (segment_id, customer_id, is_member, transitions, changed_at, "
        "cause) "
        "SELECT :seg, ch.customer_id, ch.hit, 1, :now, :cause FROM chunk ch "
        "LEFT JOIN memberships ms ON ms.segment_id = :seg AND ms.customer_id > :after "
        "AND ms.customer_id <= :upto AND ms.customer_id = ch.customer_id "
        "WHERE ch.hit <> coalesce(ms.is_member, false) "
        "ON CONFLICT (segment_id, customer_id) DO UPDATE SET is_member = excluded.is_member, "
        "transitions = memberships.transitions + 1, changed_at = excluded.changed_at, cause = excluded.cause "
        "WHERE memberships.is_member IS DISTINCT FROM excluded.is_member "
        "RETURNING customer_id, is_member, transitions), "
        "announced AS (SELECT ch.customer_id, ch.customer_id || ':' || :seg || ':' || ch.transitions AS "
        "event_id, "
        + _ONE_SEGMENT
        + "ch.is_member, k.traits FROM changed ch JOIN chunk k USING (customer_id)), "
        "outboxed AS (" + _outbox_announcements("announced") + ") "
        "SELECT (SELECT count(*) FROM chunk) AS seen, (SELECT count(*) FROM outboxed) AS announced"
    )
    # A chunk statement is big and its best plan depends on the chunk: plan it for these values, and
    # give hashes (the `not_performed` subplan over event_counts, joins) room instead of per-row loops.
    await session.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
    await session.execute(text("SET LOCAL work_mem = '64MB'"))
    row = (await session.execute(text(evaluated), params)).one()
    return int(row.seen), int(row.announced)


async def advance_backfill(
    session: AsyncSession, segment_id: str, cursor: str | None, seen: int, finished: bool, now: datetime
) -> None:
    await session.execute(
        text(
            "UPDATE segments SET backfill_cursor = :cur, backfill_done = backfill_done + :seen, "
            "status = CASE WHEN :fin THEN 'ready' ELSE status END, "
            "backfill_total = CASE WHEN :fin THEN backfill_done + :seen ELSE GREATEST(backfill_total, "
            "backfill_done + :seen) END, "
            "backfill_finished_at = CASE WHEN :fin THEN CAST(:now AS timestamptz) ELSE NULL END, "
            # Failures and stalls count in a row: a chunk that went through clears them (a statement
            # timeout now and then over a pass of hours never adds up to `failed`).
            "backfill_failures = 0, backfill_stalls = 0, backfill_error = NULL, backfill_failed_at = NULL, "
            "backfill_failed_pass = NULL WHERE segment_id = :s"
        ),
        {"cur": cursor, "seen": seen, "fin": finished, "now": now, "s": segment_id},
    )


async def preview(session: AsyncSession, rule: Rule, now: datetime, sample: int) -> tuple[int, list[str]]:
    sql = RuleSql(now)
    predicate = sql.predicate(rule)
    count = await session.scalar(text(f"SELECT count(*) FROM customers c WHERE {predicate}"), sql.params)
    rows = await session.execute(
        text(f"SELECT c.customer_id FROM customers c WHERE {predicate} ORDER BY c.customer_id LIMIT :sample"),
        {**sql.params, "sample": sample},
    )
    return int(count or 0), [r[0] for r in rows]


async def matching_ids(session: AsyncSession, rule: Rule, now: datetime) -> set[str]:
    """Every customer the compiled rule selects (tests compare it with the Python evaluator)."""
    sql = RuleSql(now)
    rows = await session.execute(
        text(f"SELECT c.customer_id FROM customers c WHERE {sql.predicate(rule)}"), sql.params
    )
    return {r[0] for r in rows}


async def due_moments(session: AsyncSession, rule: Rule, now: datetime) -> dict[str, datetime | None]:
    sql = RuleSql(now)
    rows = await session.execute(
        text(f"SELECT c.customer_id, {sql.next_change(rule)} AS due FROM customers c"), sql.params
    )
    return {r.customer_id: r.due for r in rows}


async def resync_chunk(
    session: AsyncSession, customer_ids: Sequence[str], job: str, announce: Announcement
) -> int:
    """The stored memberships of these customers (a republish chunk's, held by it) announced again as
    they are (entered for members, exited for the others), cause `resync`, in one statement; returns
    how many."""
    return int(
        (
            await session.execute(
                text(
                    "WITH announced AS (SELECT m.customer_id, "
                    "m.customer_id || ':' || m.segment_id || ':resync:' || :job AS event_id, "
                    "m.segment_id, s.name AS segment_name, m.is_member, c.traits FROM memberships m "
                    "JOIN segments s USING (segment_id) JOIN customers c USING (customer_id) "
                    "WHERE m.customer_id = ANY(CAST(:ids AS text[]))), "
                    "outboxed AS (" + _outbox_announcements("announced") + ") "
                    "SELECT count(*) FROM outboxed"
                ),
                {"ids": list(customer_ids), "job": job, **announce.params(RESYNC_CAUSE)},
            )
        ).scalar_one()
    )

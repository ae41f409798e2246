"""Journey definitions and their versions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# The entry gate: consumer batches that may enter customers in journeys hold it shared from before
# they read which journeys are active until they commit (`projection.lock_customers`); a pause or
# archive holds it exclusive (`hold_entries`). Two 32-bit keys: a key space apart from the customers'
# 64-bit advisory locks, the schema's name in the second.
ENTRY_GATE = "hashtext('clm.journey_entries'), hashtext(current_schema())"


@dataclass(frozen=True)
class JourneyRow:
    id: str
    name: str
    status: str
    current_version: int
    entry_cap: int | None
    entered_count: int
    next_run_at: datetime | None
    created_at: datetime
    updated_at: datetime


_COLUMNS = "id, name, status, current_version, entry_cap, entered_count, next_run_at, created_at, updated_at"


async def create(
    session: AsyncSession,
    journey_id: str,
    name: str,
    definition: dict[str, Any],
    entry_cap: int | None,
    now: datetime,
) -> None:
    await session.execute(
        text(
            "INSERT INTO journeys (id, name, status, current_version, entry_cap, created_at, updated_at) "
            "VALUES (:id, :name, 'draft', 1, :cap, :now, :now)"
        ),
        {"id": journey_id, "name": name, "cap": entry_cap, "now": now},
    )
    await add_version(session, journey_id, 1, definition, now)


async def add_version(
    session: AsyncSession, journey_id: str, version: int, definition: dict[str, Any], now: datetime
) -> None:
    await session.execute(
        text(
            "INSERT INTO journey_versions (journey_id, version, definition, created_at) "
            "VALUES (:id, :v, CAST(:d AS jsonb), :now)"
        ),
        {"id": journey_id, "v": version, "d": orjson.dumps(definition).decode(), "now": now},
    )


async def get(session: AsyncSession, journey_id: str, *, for_update: bool = False) -> JourneyRow | None:
    lock = " FOR UPDATE" if for_update else ""
    row = (
        await session.execute(
            text(f"SELECT {_COLUMNS} FROM journeys WHERE id = :id{lock}"), {"id": journey_id}
        )
    ).first()
    return JourneyRow(*row) if row else None


async def hold_entries(session: AsyncSession) -> None:
    """Wait for the consumer batches entering customers now to commit, and keep new ones waiting
    until this transaction ends. Taken before any other lock by a status change that stops entries:
    every entry is then either committed before it (an archive exits it with the rest) or reads the
    journey's new status (a batch that read it as active created a live instance after the archive
    had exited everyone inside). Batches hold it shared only: they never wait on each other, but all
    of them wait behind this request while it waits: take it under a `set_lock_timeout`."""
    await session.execute(text(f"SELECT pg_advisory_xact_lock({ENTRY_GATE})"))


async def list_all(session: AsyncSession) -> list[JourneyRow]:
    rows = await session.execute(text(f"SELECT {_COLUMNS} FROM journeys ORDER BY created_at, id"))
    return [JourneyRow(*r) for r in rows]


# Read by every consumer batch, with the rest of its reads (`store.batch_read`).
ACTIVE_SQL = f"SELECT {_COLUMNS} FROM journeys WHERE status = 'active' ORDER BY id"


def active_rows(rows: Sequence[Sequence[Any]]) -> list[JourneyRow]:
    """Rows of `ACTIVE_SQL`, in their order (by id)."""
    return [JourneyRow(*r) for r in rows]


# Of the journeys a batch's active instances are in, the archived ones (`store.batch_read`): an
# archive exits its customers after it committed, and a step that comes first exits the instance.
ARCHIVED_SQL = "SELECT id FROM journeys WHERE id = ANY(CAST(:journey_ids AS text[])) AND status = 'archived'"


async def unfinished_archives(session: AsyncSession) -> list[str]:
    """Archived journeys with customers still inside or goal windows still open: the archive's
    answer did not get to them (a crash after its status change), or an entry committed after it
    (a replica of the release before takes no entry gate)."""
    rows = await session.execute(
        text(
            "SELECT id FROM journeys AS j WHERE status = 'archived' AND ("
            "EXISTS (SELECT 1 FROM instances WHERE journey_id = j.id AND status = 'active') "
            "OR EXISTS (SELECT 1 FROM goal_windows WHERE journey_id = j.id)) ORDER BY updated_at, id"
        )
    )
    return [r[0] for r in rows]


async def definition(session: AsyncSession, journey_id: str, version: int) -> dict[str, Any] | None:
    value = await session.scalar(
        text("SELECT definition FROM journey_versions WHERE journey_id = :id AND version = :v"),
        {"id": journey_id, "v": version},
    )
    if value is None:
        return None
    return value if isinstance(value, dict) else orjson.loads(value)


async def versions(session: AsyncSession, journey_id: str) -> list[int]:
    rows = await session.execute(
        text("SELECT version FROM journey_versions WHERE journey_id = :id ORDER BY version"),
        {"id": journey_id},
    )
    return [r[0] for r in rows]


async def update(
    session: AsyncSession,
    journey_id: str,
    *,
    now: datetime,
    name: str | None = None,
    status: str | None = None,
    current_version: int | None = None,
    entry_cap: int | None = None,
    set_entry_cap: bool = False,
    next_run_at: datetime | None = None,
    set_next_run: bool = False,
) -> None:
    sets = ["updated_at = :now"]
    params: dict[str, Any] = {"id": journey_id, "now": now}
    for column, value, wanted in (
        ("name", name, name is not None),
        ("status", status, status is not None),
        ("current_version", current_version, current_version is not None),
        ("entry_cap", entry_cap, set_entry_cap),
        ("next_run_at", next_run_at, set_next_run),
    ):
        if wanted:
            sets.append(f"{column} = :{column}")
            params[column] = value
    await session.execute(text(f"UPDATE journeys SET {', '.join(sets)} WHERE id = :id"), params)


async def count_past_entries(session: AsyncSession, journey_id: str) -> None:
    """A cap set on a journey that had none counts the entries made meanwhile: uncapped, entries
    are not counted on the journey's row (`take_entry_slot`, one hot row every entering batch would
    wait on), so the count is taken from the enrolments once, here. The larger of the two: a cap set
    before counted entries whose enrolments an erasure may have deleted since."""
    await session.execute(
        text(
            "UPDATE journeys SET entered_count = GREATEST(entered_count, "
            "(SELECT COALESCE(sum(entries), 0) FROM enrolments WHERE journey_id = :id)) WHERE id = :id"
        ),
        {"id": journey_id},
    )


async def entered(session: AsyncSession, rows: Sequence[JourneyRow]) -> dict[str, int]:
    """How many times customers entered each journey, all versions: a capped journey's count
    (what the cap counts); an uncapped one's from its enrolments (erased customers' not)."""
    out = {r.id: r.entered_count for r in rows}
    uncapped = [r.id for r in rows if r.entry_cap is None]
    if uncapped:
        found = await session.execute(
            text(
                "SELECT journey_id, sum(entries) FROM enrolments "
                "WHERE journey_id = ANY(CAST(:ids AS text[])) GROUP BY journey_id"
            ),
            {"ids": uncapped},
        )
        out |= {i: 0 for i in uncapped} | {r[0]: int(r[1]) for r in found}
    return out


async def take_entry_slot(session: AsyncSession, journey_id: str) -> bool:
    """Count one entry against the journey's cap; False when the cap is reached."""
    row = await session.execute(
        text(
            "UPDATE journeys SET entered_count = entered_count + 1 "
            "WHERE id = :id AND (entry_cap IS NULL OR entered_count < entry_cap) RETURNING entered_count"
        ),
        {"id": journey_id},
    )
    return row.first() is not None


async def due_runs(session: AsyncSession, now: datetime, skip: list[str], limit: int = 100) -> list[str]:
    """Active journeys whose broadcast (or enrolment of current members) is due, oldest first; `skip`
    are journeys waiting out a failure. Not locked: each chunk locks the row itself."""
    rows = await session.execute(
        text(
            "SELECT id FROM journeys WHERE status = 'active' AND next_run_at <= :now "
            "AND NOT (id = ANY(CAST(:skip AS text[]))) ORDER BY next_run_at, id LIMIT :n"
        ),
        {"now": now, "skip": skip, "n": limit},
    )
    return [r[0] for r in rows]


@dataclass(frozen=True)
class RunState:
    """A journey's broadcast as read (unlocked) before a chunk: `lock_run` takes it only if unchanged."""

    id: str
    status: str
    version: int
    next_run_at: datetime | None
    run_at: datetime | None
    cursor: str | None

    @property
    def started(self) -> bool:
        """Whether the next run is in progress: some of its chunks committed."""
        return self.run_at is not None and self.run_at == self.next_run_at

    @property
    def resume_after(self) -> str | None:
        """The last member enrolled by this run's chunks so far (None: start from the first)."""
        return self.cursor if self.started else None


async def run_state(session: AsyncSession, journey_id: str) -> RunState | None:
    row = (
        await session.execute(
            text(
                "SELECT id, status, current_version, next_run_at, broadcast_run_at, broadcast_cursor "
                "FROM journeys WHERE id = :id"
            ),
            {"id": journey_id},
        )
    ).first()
    return RunState(*row) if row else None


async def lock_run(session: AsyncSession, state: RunState) -> JourneyRow | None:
    """Lock the journey for one chunk if its run is still where `state` saw it; None when another
    worker holds it or moved it on, or the journey changed (version, status, schedule)."""
    row = (
        await session.execute(
            text(
                f"SELECT {_COLUMNS} FROM journeys WHERE id = :id AND status = 'active' "
                "AND current_version = :v AND next_run_at = :next "
                "AND broadcast_run_at IS NOT DISTINCT FROM :run_at "
                "AND broadcast_cursor IS NOT DISTINCT FROM :cursor FOR UPDATE SKIP LOCKED"
            ),
            {
                "id": state.id,
                "v": state.version,
                "next": state.next_run_at,
                "run_at": state.run_at,
                "cursor": state.cursor,
            },
        )
    ).first()
    return JourneyRow(*row) if row else None


async def save_progress(
    session: AsyncSession, journey_id: str, run_at: datetime, cursor: str, now: datetime
) -> None:
    await session.execute(
        text(
            "UPDATE journeys SET broadcast_run_at = :run_at, broadcast_cursor = :cursor, updated_at = :now "
            "WHERE id = :id"
        ),
        {"id": journey_id, "run_at": run_at, "cursor": cursor, "now": now},
    )


async def finish_run(
    session: AsyncSession, journey_id: str, next_run_at: datetime | None, now: datetime
) -> None:
    """The run is over: schedule the next one (None: no more) and forget the progress."""
    await session.execute(
        text(
            "UPDATE journeys SET next_run_at = :next, broadcast_run_at = NULL, broadcast_cursor = NULL, "
            "updated_at = :now WHERE id = :id"
        ),
        {"id": journey_id, "next": next_run_at, "now": now},
    )

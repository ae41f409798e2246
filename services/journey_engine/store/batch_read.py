"""Everything a batch of customers' steps needs, read in one round trip once their locks are held
(`projection.lock_customers`): projection rows, recent marketing sends (frequency caps), active
instances (row-locked, in id order), enrolments, open goal windows, and the active journeys.

Each part is its module's own query (`projection.LOAD_SQL`, `instances.ACTIVE_FOR_CUSTOMERS_SQL`,
...), sent as one statement of `ARRAY(SELECT ROW(q.*) FROM (<query>) AS q)` columns: every consumer
batch ran them as five to seven statements, a round trip each on the event -> message path. Not
merged with the lock: a statement reads with the snapshot it started with, before its locks were
granted, so reads after a wait would miss what the lock holder committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from services.journey_engine.store import instances, journeys, projection
from services.journey_engine.store.instances import GoalWindow, InstanceRow
from services.journey_engine.store.journeys import JourneyRow
from services.journey_engine.store.projection import CustomerRecord
from shared.db.engine import Statement


def _rows_of(sql: str, only_if: str | None = None) -> str:
    # A false `only_if` is a one-time filter: the part's query is not run at all.
    guard = f" WHERE {only_if}" if only_if else ""
    return f"ARRAY(SELECT ROW(q.*) FROM ({sql}) AS q{guard})"


_READ = Statement(
    "SELECT "
    + ", ".join(
        [
            _rows_of(projection.LOAD_SQL),
            _rows_of(projection.RECENT_SENDS_SQL, "CAST(:since AS timestamptz) IS NOT NULL"),
            _rows_of(instances.ACTIVE_FOR_CUSTOMERS_SQL),
            _rows_of(instances.ENTRIES_OF_CUSTOMERS_SQL),
            _rows_of(instances.OPEN_GOALS_SQL, "CAST(:goals AS boolean)"),
            _rows_of(journeys.ACTIVE_SQL),
        ]
    )
)


@dataclass(frozen=True)
class BatchRead:
    customers: dict[str, CustomerRecord]
    active: list[InstanceRow]  # oldest entry first
    entries: dict[tuple[str, str, str], datetime]  # (journey, customer, correlation) -> last entry
    windows: list[GoalWindow]
    journeys: list[JourneyRow]  # by id


async def read(
    session: AsyncSession,
    customer_ids: list[str],
    *,
    now: datetime,
    sends_since: datetime | None,
    goals: bool,
) -> BatchRead:
    """`sends_since`: recent sends only when frequency caps are configured; `goals`: open goal windows
    only for event batches (goals are events)."""
    ids = sorted(set(customer_ids))
    [row] = await _READ.fetch(session, {"ids": ids, "since": sends_since, "now": now, "goals": goals})
    loaded, sends, active, entries, windows, active_journeys = row
    return BatchRead(
        customers=projection.records(ids, loaded, sends),
        active=instances.active_rows(active),
        entries=instances.entries(entries),
        windows=instances.goal_windows(windows),
        journeys=journeys.active_rows(active_journeys),
    )

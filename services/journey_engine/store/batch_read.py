"""Everything a batch of customers' steps needs, read in two statements once their locks are held
(`projection.lock_customers`): the active instances, row-locked in id order, then in one round trip
the projection rows, recent marketing sends (frequency caps), enrolments, open goal windows, the
active journeys, which of the instances' journeys are archived and which customers are erased.

The second statement sends each module's own query (`projection.LOAD_SQL`, ...) as an
`ARRAY(SELECT ROW(q.*) FROM (<query>) AS q)` column: every consumer batch ran them as four to six
statements, a round trip each on the event -> message path. Neither lock is merged into it: a
statement reads with the snapshot it started with, before its locks were granted, so reads after a
wait would miss what the lock holder committed (a timer step holds an instance's row lock, not the
customer's, while it finishes the instance and opens its goal window).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from services.journey_engine.store import instances, journeys, projection
from services.journey_engine.store.instances import GoalWindow, InstanceRow
from services.journey_engine.store.journeys import JourneyRow
from services.journey_engine.store.projection import CustomerRecord
from shared.db.engine import Statement


def _rows_of(sql: str, *, only_if: str | None = None, order_by: str | None = None) -> str:
    # A false `only_if` is a one-time filter: the part's query is not run at all.
    guard = f" WHERE {only_if}" if only_if else ""
    order = f" ORDER BY {order_by}" if order_by else ""
    return f"ARRAY(SELECT ROW(q.*) FROM ({sql}) AS q{guard}{order})"


_ACTIVE = Statement(instances.ACTIVE_FOR_CUSTOMERS_SQL)
_READ = Statement(
    "SELECT "
    + ", ".join(
        [
            _rows_of(projection.LOAD_SQL),
            _rows_of(projection.RECENT_SENDS_SQL, only_if="CAST(:since AS timestamptz) IS NOT NULL"),
            _rows_of(instances.ENTRIES_OF_CUSTOMERS_SQL),
            _rows_of(instances.OPEN_GOALS_SQL, only_if="CAST(:goals AS boolean)"),
            # In the database's order (its collation), as journeys have always been tried.
            _rows_of(journeys.ACTIVE_SQL, order_by="q.id"),
            _rows_of(journeys.ARCHIVED_SQL),
            # What the caller looked up before the locks, looked up again after them: a merge may
            # have moved a customer meanwhile (`identities`: to customers; `instance_ids`: owners).
            _rows_of(projection.RESOLVE_IDENTITIES_SQL),
            _rows_of(instances.OWNERS_SQL),
            _rows_of(projection.MERGED_AWAY_SQL),
            # Which of the customers' id hashes have an erasure tombstone (the caller holds the
            # erasure gate, taken before this statement: it sees every erasure committed).
            _rows_of(projection.TOMBSTONES_SQL, only_if="cardinality(CAST(:hashes AS text[])) > 0"),
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
    # The archived journeys among those of `active` (not exited yet: their steps exit them).
    archived: set[str]
    # After the locks: the `identities` asked for -> their customers, `instance_ids` -> their customers.
    resolved: dict[str, str]
    owners: dict[str, str]
    # The batch's customers that were merged into another profile (`projection.forget_merged`).
    merged_away: set[str]
    # The `hashes` asked for that have an erasure tombstone.
    tombstoned: set[str]


async def read(
    session: AsyncSession,
    customer_ids: list[str],
    *,
    now: datetime,
    sends_since: datetime | None,
    goals: bool,
    identities: Collection[str] = (),
    instance_ids: Collection[str] = (),
    hashes: Collection[str] = (),
) -> BatchRead:
    """`sends_since`: recent sends only when frequency caps are configured; `goals`: open goal windows
    only for event batches (goals are events); `identities`, `instance_ids`: see `BatchRead`;
    `hashes`: identity hashes (`shared.privacy.identity_hash`) to look up among the tombstones."""
    ids = sorted(set(customer_ids))
    active = instances.active_rows(await _ACTIVE.fetch(session, {"ids": ids}))
    [row] = await _READ.fetch(
        session,
        {
            "ids": ids,
            "journey_ids": sorted({r.journey_id for r in active}),
            "since": sends_since,
            "now": now,
            "goals": goals,
            "identities": sorted(set(identities)),
            "instance_ids": sorted(set(instance_ids)),
            "hashes": sorted(set(hashes)),
        },
    )
    loaded, sends, entries, windows, active_journeys, archived, resolved, owners, merged_away, erased = row
    return BatchRead(
        customers=projection.records(ids, loaded, sends),
        active=active,
        entries=instances.entries(entries),
        windows=instances.goal_windows(windows),
        journeys=journeys.active_rows(active_journeys),
        archived={r[0] for r in archived},
        resolved={r[0]: r[1] for r in resolved},
        owners={r[0]: r[1] for r in owners},
        merged_away={r[0] for r in merged_away},
        tombstoned={r[0] for r in erased},
    )

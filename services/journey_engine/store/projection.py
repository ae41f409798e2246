"""The engine's projections of other services' topics: customers (traits, contact), identities, segments."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.journey_engine.store import journeys
from shared.db.engine import Statement


@dataclass
class CustomerRecord:
    customer_id: str
    traits: dict[str, Any] = field(default_factory=dict)
    timezone: str | None = None
    locale: str | None = None
    email: str | None = None
    phone: str | None = None
    stage: str | None = None
    segments: set[str] = field(default_factory=set)
    recent_sends: dict[str, list[datetime]] = field(default_factory=dict)
    recommendations: dict[str, Any] | None = None  # issue 9: the segmenter's current lists


# The statements each consumer batch runs go straight to asyncpg (`Statement`).
_CUSTOMER_KEYS = (
    "(SELECT DISTINCT hashtextextended(c, 7) AS k FROM unnest(CAST(:ids AS text[])) AS c ORDER BY k) AS s"
)
_LOCK_CUSTOMERS = Statement(f"SELECT pg_advisory_xact_lock(k) FROM {_CUSTOMER_KEYS}")
# The same after the entry gate (shared), in the same round trip. The gate comes first (the customer
# locks are taken as the join's rows come out): a batch waiting for it holds no customer's lock, which
# a broadcast chunk could be waiting for while holding the journey's row an archive waits for.
_LOCK_CUSTOMERS_ENTERING = Statement(
    f"WITH gate AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared({journeys.ENTRY_GATE})) "
    f"SELECT pg_advisory_xact_lock(k) FROM gate, {_CUSTOMER_KEYS}"
)
_RESOLVE_SQL = (
    "SELECT identity, customer_id FROM customer_identities WHERE identity = ANY(CAST(:ids AS text[]))"
)
_RESOLVE = Statement(_RESOLVE_SQL)
# The same lookup, read again by `store.batch_read` after a batch's locks.
RESOLVE_IDENTITIES_SQL = _RESOLVE_SQL.replace(":ids", ":identities")
# The same, with the erasure tombstones among :hashes (rows with a NULL identity): one round trip for
# an event batch's two reads after the erasure gate (the statement's snapshot follows the gate).
_RESOLVE_READING_TOMBSTONES = Statement(
    f"{_RESOLVE_SQL} UNION ALL SELECT NULL, identity_hash FROM erasure_tombstones "
    "WHERE identity_hash = ANY(CAST(:hashes AS text[]))"
)
# Also read, with the rest of a batch's reads, by `store.batch_read` (the SQL text is shared).
LOAD_SQL = (
    "SELECT x.id, c.traits, c.timezone, c.locale, c.email, c.phone, c.stage, "
    "ARRAY(SELECT m.segment_id FROM segment_members AS m WHERE m.customer_id = x.id), "
    "(SELECT r.lists FROM customer_recommendations AS r WHERE r.customer_id = x.id) "
    "FROM unnest(CAST(:ids AS text[])) AS x(id) LEFT JOIN customers AS c ON c.customer_id = x.id"
)
RECENT_SENDS_SQL = (
    "SELECT customer_id, channel, decided_at FROM message_log WHERE customer_id = ANY(CAST(:ids AS text[])) "
    "AND decided_at > :since AND decision = 'requested' AND category = 'marketing' ORDER BY decided_at"
)
_LOAD = Statement(LOAD_SQL)
_RECENT_SENDS = Statement(RECENT_SENDS_SQL)
_UPSERT_CUSTOMER = Statement(
    "INSERT INTO customers (customer_id, traits, timezone, locale, email, phone, stage, updated_at) "
    "VALUES (:id, CAST(:traits AS jsonb), :tz, :locale, :email, :phone, :stage, :now) "
    "ON CONFLICT (customer_id) DO UPDATE SET traits = excluded.traits, timezone = excluded.timezone, "
    "locale = excluded.locale, email = excluded.email, phone = excluded.phone, "
    "stage = COALESCE(excluded.stage, customers.stage), updated_at = excluded.updated_at"
)
# Newest announcement wins (see `tables.customer_identities.linked_at`).
_ADD_IDENTITIES = Statement(
    "INSERT INTO customer_identities (identity, customer_id, linked_at) "
    "SELECT unnest(CAST(:ids AS text[])), :cid, :at "
    "ON CONFLICT (identity) DO UPDATE SET customer_id = excluded.customer_id, linked_at = excluded.linked_at "
    "WHERE customer_identities.linked_at <= excluded.linked_at"
)
_ADD_MEMBER = Statement(
    "INSERT INTO segment_members (segment_id, customer_id) VALUES (:s, :c) ON CONFLICT DO NOTHING"
)
_REMOVE_MEMBER = Statement("DELETE FROM segment_members WHERE segment_id = :s AND customer_id = :c")


async def lock_customers(session: AsyncSession, customer_ids: list[str], *, entering: bool = False) -> None:
    """Serialize work on the same customers across consumers, timer workers and engine processes.

    Locks are taken in one global order (by hash), so two transactions never wait on each other in a cycle.
    `entering`: the work may enter them in journeys; it holds the entry gate too (`journeys.hold_entries`).
    """
    if customer_ids:
        statement = _LOCK_CUSTOMERS_ENTERING if entering else _LOCK_CUSTOMERS
        await statement.fetch(session, {"ids": sorted(set(customer_ids))})


async def lock_customers_of_instances(session: AsyncSession, instance_ids: list[str]) -> set[str]:
    """Lock the customers these instances belong to; returns them. Read before the locks are granted:
    an instance a merge moved to another customer meanwhile belongs to one not in the set."""
    if not instance_ids:
        return set()
    rows = await session.execute(
        text(
            "SELECT s.c, pg_advisory_xact_lock(s.k) FROM (SELECT DISTINCT customer_id AS c, "
            "hashtextextended(customer_id, 7) AS k FROM instances WHERE id = ANY(CAST(:ids AS text[])) "
            "ORDER BY k) AS s"
        ),
        {"ids": instance_ids},
    )
    return {r[0] for r in rows}


async def resolve(session: AsyncSession, identities: list[str]) -> dict[str, str]:
    """identity -> canonical customer id, for the identities the projection knows."""
    if not identities:
        return {}
    rows = await _RESOLVE.fetch(session, {"ids": list(set(identities))})
    return {r[0]: r[1] for r in rows}


async def resolve_reading_tombstones(
    session: AsyncSession, identities: Iterable[str], hashes: Sequence[str]
) -> tuple[dict[str, str], set[str]]:
    """`resolve`, and which identity `hashes` have an erasure tombstone, in one round trip (the
    transaction must hold the erasure gate already). Returns (resolution, tombstoned hashes)."""
    rows = await _RESOLVE_READING_TOMBSTONES.fetch(
        session, {"ids": list(set(identities)), "hashes": list(hashes)}
    )
    return {r[0]: r[1] for r in rows if r[0] is not None}, {r[1] for r in rows if r[0] is None}


async def load(
    session: AsyncSession, customer_ids: list[str], sends_since: datetime | None
) -> dict[str, CustomerRecord]:
    """Projection rows (or empty records for unknown customers), memberships and recent marketing sends
    (only when `sends_since` is given: frequency caps are configured)."""
    ids = list(set(customer_ids))
    if not ids:
        return {}
    # One round trip: the projection row (if any) and the segment memberships of each customer.
    rows = await _LOAD.fetch(session, {"ids": ids})
    sends = (
        [] if sends_since is None else await _RECENT_SENDS.fetch(session, {"ids": ids, "since": sends_since})
    )
    return records(ids, rows, sends)


def records(
    ids: list[str], rows: Sequence[Sequence[Any]], sends: Sequence[Sequence[Any]]
) -> dict[str, CustomerRecord]:
    """Customer records from rows of `LOAD_SQL` and `RECENT_SENDS_SQL` (records or tuples)."""
    out = {c: CustomerRecord(c) for c in ids}
    for cid, traits, tz, locale, email, phone, stage, segments, recommendations in rows:
        rec = out[cid]
        if traits is not None:
            rec.traits = traits if isinstance(traits, dict) else orjson.loads(traits)
        rec.timezone, rec.locale, rec.email, rec.phone, rec.stage = tz, locale, email, phone, stage
        rec.segments = set(segments or ())
        rec.recommendations = (
            orjson.loads(recommendations) if isinstance(recommendations, str) else recommendations
        )
    by_customer: dict[str, dict[str, list[datetime]]] = defaultdict(lambda: defaultdict(list))
    for cid, channel, at in sorted(sends, key=lambda s: s[2]):
        by_customer[cid][channel].append(at)
    for cid, by_channel in by_customer.items():
        out[cid].recent_sends = dict(by_channel)
    return out


async def upsert_customer(
    session: AsyncSession,
    customer_id: str,
    traits: dict[str, Any],
    *,
    timezone: str | None,
    locale: str | None,
    email: str | None,
    phone: str | None,
    stage: str | None,
    now: datetime,
) -> None:
    await _UPSERT_CUSTOMER.execute(
        session,
        {
            "id": customer_id,
            "traits": orjson.dumps(traits).decode(),
            "tz": timezone,
            "locale": locale,
            "email": email,
            "phone": phone,
            "stage": stage,
            "now": now,
        },
    )


async def merge_traits(session: AsyncSession, customer_id: str, patch: dict[str, Any], now: datetime) -> None:
    """Apply a journey's own trait update to the projection (the next ProfileChanged confirms it)."""
    await session.execute(
        text(
            "INSERT INTO customers (customer_id, traits, updated_at) VALUES (:id, CAST(:p AS jsonb), :now) "
            "ON CONFLICT (customer_id) DO UPDATE SET traits = customers.traits || excluded.traits, "
            "updated_at = excluded.updated_at"
        ),
        {"id": customer_id, "p": orjson.dumps(patch).decode(), "now": now},
    )


async def add_identities(
    session: AsyncSession, customer_id: str, identities: list[str], at: datetime
) -> None:
    """Point `identities` (and the customer's own id) at `customer_id` as of `at`, unless a newer
    announcement points one elsewhere."""
    ids = sorted({i for i in identities if i} | {customer_id})
    await _ADD_IDENTITIES.execute(session, {"ids": ids, "cid": customer_id, "at": at})


async def forget_merged(session: AsyncSession, customer_id: str, merged_into: str, at: datetime) -> None:
    """A profile merged into another: its projection rows go (the survivor's announcement carries the
    traits, and its memberships' exits come on the membership topic: none may enrol it meanwhile),
    and it is recorded as merged (`merged_profiles`); its identities point at the survivor
    (`add_identities`)."""
    for statement in (
        "DELETE FROM customers WHERE customer_id = :id",
        "DELETE FROM customer_recommendations WHERE customer_id = :id",
        "DELETE FROM segment_members WHERE customer_id = :id",
    ):
        await session.execute(text(statement), {"id": customer_id})
    await _MERGED.execute(session, {"id": customer_id, "into": merged_into, "at": at})


_MERGED = Statement(
    "INSERT INTO merged_profiles (customer_id, merged_into, merged_at) VALUES (:id, :into, :at) "
    "ON CONFLICT (customer_id) DO UPDATE "
    "SET merged_into = excluded.merged_into, merged_at = excluded.merged_at"
)
# Where each id ends up through its chain of merges (at most 32 deep: a cycle cannot loop).
_SURVIVORS = Statement(
    "WITH RECURSIVE chain(start, cur, depth) AS ("
    "SELECT s, s, 0 FROM unnest(CAST(:ids AS text[])) AS s "
    "UNION ALL SELECT c.start, m.merged_into, c.depth + 1 FROM chain AS c "
    "JOIN merged_profiles AS m ON m.customer_id = c.cur WHERE c.depth < 32) "
    "SELECT DISTINCT ON (start) start, cur FROM chain WHERE depth > 0 ORDER BY start, depth DESC"
)


async def survivors(session: AsyncSession, customer_ids: Sequence[str]) -> dict[str, str]:
    """The customer each of these merged-away ids was merged into in the end; ids never merged away
    are left out."""
    if not customer_ids:
        return {}
    rows = await _SURVIVORS.fetch(session, {"ids": sorted(set(customer_ids))})
    return {r[0]: r[1] for r in rows}


# Which of a batch's customers' id hashes have an erasure tombstone (`store.batch_read`).
TOMBSTONES_SQL = (
    "SELECT identity_hash FROM erasure_tombstones WHERE identity_hash = ANY(CAST(:hashes AS text[]))"
)
# Which of a batch's customers were merged away (`store.batch_read`).
MERGED_AWAY_SQL = "SELECT customer_id FROM merged_profiles WHERE customer_id = ANY(CAST(:ids AS text[]))"


async def set_membership(session: AsyncSession, segment_id: str, customer_id: str, member: bool) -> None:
    await (_ADD_MEMBER if member else _REMOVE_MEMBER).execute(session, {"s": segment_id, "c": customer_id})


async def segment_members_after(
    session: AsyncSession, segment_id: str, after: str | None, limit: int
) -> list[str]:
    """The next `limit` members of a segment in id order, after `after` (a keyset page of the key)."""
    if after is None:
        sql = "SELECT customer_id FROM segment_members WHERE segment_id = :s ORDER BY customer_id LIMIT :n"
    else:
        sql = (
            "SELECT customer_id FROM segment_members WHERE segment_id = :s AND customer_id > :after "
            "ORDER BY customer_id LIMIT :n"
        )
    rows = await session.execute(text(sql), {"s": segment_id, "after": after, "n": limit})
    return [r[0] for r in rows]


def sends_window(now: datetime, caps_configured: bool = True) -> datetime | None:
    """How far back frequency caps look (a rolling week, plus a day for calendar days in any timezone)."""
    return now - timedelta(days=8) if caps_configured else None

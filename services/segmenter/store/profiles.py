"""Every SQL query on profiles: identities, merges, the profile rows, event aggregates and timeline.

Batch-shaped: each function takes all customers of a Kafka batch and runs one set-based statement
(unnest arrays), never a statement per event.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.segmenter.domain.identity import Identifier, Merge
from services.segmenter.domain.lifecycle.tracking import STORED_FIELDS
from services.segmenter.domain.profile import (
    EventAggregate,
    ProfileSnapshot,
    TraitLimits,
    TraitRefusal,
    merge_bounded_traits,
)
from services.segmenter.store import lifecycle as lifecycle_store
from shared.db.engine import Statement, array_from_json, json_list, json_rows, json_text, rows_from_json
from shared.db.retention import RetentionRule

FIELD_NAMES = (
    "first_seen",
    "last_seen",
    "event_count",
    "orders_count",
    "revenue",
    "first_order_at",
    "last_order_at",
    # Lifecycle columns (migration 0003_lifecycle), written by store/lifecycle.py.
    *STORED_FIELDS,
)
PROFILE_COLUMNS = "customer_id, traits, trait_times, updated_at, " + ", ".join(FIELD_NAMES)


# The statements of every event batch go straight to asyncpg (`Statement`).
_LOOKUP_IDENTITIES = Statement(
    "SELECT i.kind, i.value, i.customer_id, "
    "EXISTS (SELECT 1 FROM identities u WHERE u.customer_id = i.customer_id AND u.kind = 'user') AS has_user "
    "FROM identities i JOIN "
    + rows_from_json("idents", [("kind", "text"), ("value", "text")])
    + " AS q ON i.kind = q.kind AND i.value = q.value "
    "UNION ALL SELECT NULL, NULL, customer_id, false FROM customers "
    "WHERE customer_id = ANY(CAST(:cands AS text[])) "
    # Ids of customers merged into others: a new customer must not take one (see `retired_ids`).
    "UNION ALL SELECT 'retired', NULL, value, false FROM identities "
    "WHERE kind = 'merged' AND value = ANY(CAST(:cands AS text[]))"
)
# Ids starting with `<kind>:<value>:`, for the identifiers whose value and `<kind>:<value>` are both
# taken (rare): `domain.identity.new_customer_id` goes on with `:2`, `:3`, ...
_TAKEN_WITH_PREFIX = Statement(
    "SELECT customer_id FROM customers JOIN unnest(CAST(:prefixes AS text[])) AS p(prefix) "
    "ON starts_with(customer_id, p.prefix) "
    # Merged-away ids too: retired, never given out again.
    "UNION ALL SELECT value FROM identities JOIN unnest(CAST(:prefixes AS text[])) AS p(prefix) "
    "ON kind = 'merged' AND starts_with(value, p.prefix)"
)
_INSERT_CUSTOMERS_AND_LINKS = Statement(
    "WITH new_customers AS (INSERT INTO customers (customer_id, created_at, updated_at) "
    "SELECT jsonb_array_elements_text(CAST(:ids AS jsonb)), :now, :now ON CONFLICT DO NOTHING RETURNING 1), "
    "linked AS (INSERT INTO identities (kind, value, customer_id, linked_at) "
    "SELECT k, v, c, :now FROM "
    + rows_from_json("links", [("k", "text"), ("v", "text"), ("c", "text")])
    + " AS u ON CONFLICT (kind, value) DO NOTHING RETURNING 1) "
    "SELECT (SELECT count(*) FROM new_customers), (SELECT count(*) FROM linked)"
)
_LOCK_PROFILES = Statement(
    f"SELECT {PROFILE_COLUMNS} FROM customers WHERE customer_id = ANY({array_from_json('ids')}) "
    "ORDER BY customer_id FOR UPDATE"
)
# An event batch's aggregate increments and timeline rows; written before its lifecycle metrics are
# computed (their order aggregates read this batch's orders too).
_SAVE_EVENTS = Statement(
    "WITH counted AS (INSERT INTO event_counts (customer_id, event, count, first_at, last_at) "
    "SELECT * FROM "
    + rows_from_json(
        "counts",
        [
            ("customer_id", "text"),
            ("event", "text"),
            ("count", "bigint"),
            ("first_at", "timestamptz"),
            ("last_at", "timestamptz"),
        ],
    )
    + " AS x ON CONFLICT (customer_id, event) DO UPDATE SET count = event_counts.count + excluded.count, "
    "first_at = LEAST(event_counts.first_at, excluded.first_at), "
    "last_at = GREATEST(event_counts.last_at, excluded.last_at)) "
    "INSERT INTO events (customer_id, message_id, type, event, properties, traits, timestamp, "
    "received_at) SELECT * FROM "
    + rows_from_json(
        "timeline",
        [
            ("customer_id", "text"),
            ("message_id", "text"),
            ("type", "text"),
            ("event", "text"),
            ("properties", "jsonb"),
            ("traits", "jsonb"),
            ("timestamp", "timestamptz"),
            ("received_at", "timestamptz"),
        ],
    )
    + " AS t"
)
# The batch's profile rows, their lifecycle columns where they changed (`store.lifecycle`'s
# fragments: one UPDATE of each row, where two updates left a dead row version each), stage history
# and survey answers. NULL traits: no trait written by the batch, the stored ones stay.
_SAVE_PROFILES = Statement(
    "WITH saved AS (UPDATE customers c SET traits = COALESCE(u.traits, c.traits), "
    "trait_times = COALESCE(u.trait_times, c.trait_times), "
    "first_seen = u.first_seen, last_seen = u.last_seen, event_count = u.event_count, "
    "orders_count = u.orders_count, revenue = u.revenue, first_order_at = u.first_order_at, "
    "last_order_at = u.last_order_at, updated_at = u.updated_at, "
    f"{lifecycle_store.EVENT_PATH_SET} FROM "
    + rows_from_json(
        "rows",
        [
            ("customer_id", "text"),
            ("traits", "jsonb"),
            ("trait_times", "jsonb"),
            ("first_seen", "timestamptz"),
            ("last_seen", "timestamptz"),
            ("event_count", "bigint"),
            ("orders_count", "int"),
            ("revenue", "float8"),
            ("first_order_at", "timestamptz"),
            ("last_order_at", "timestamptz"),
            ("updated_at", "timestamptz"),
        ],
    )
    + f" AS u LEFT JOIN {lifecycle_store.EVENT_PATH_VALUES} ON l.customer_id = u.customer_id "
    "WHERE c.customer_id = u.customer_id), "
    f"{lifecycle_store.EVENT_PATH_INSERTS} "
    "SELECT 1"
)


def _snapshot(row: Any) -> ProfileSnapshot:
    """From a row of PROFILE_COLUMNS, by position: an asyncpg record (`Statement`) or a SQLAlchemy row."""
    times = {k: datetime.fromisoformat(v) for k, v in (row[2] or {}).items()}
    return ProfileSnapshot(
        customer_id=row[0],
        traits=dict(row[1] or {}),
        trait_times=times,
        # Positional: PROFILE_COLUMNS lists the fields in FIELD_NAMES order after the first four.
        fields=dict(zip(FIELD_NAMES, row[4:], strict=True)),
        updated_at=row[3],
    )


# --------------------------------------------------------------------------- identities


@dataclass
class KnownIdentities:
    links: dict[Identifier, str]  # identifier -> customer
    with_user: set[str]  # customers among those that hold a userId
    taken_ids: set[str]  # candidate canonical ids that already exist
    retired_ids: set[str]  # candidate ids of customers since merged into others


async def lookup_identities(
    session: AsyncSession, idents: Iterable[Identifier], candidate_ids: Iterable[str]
) -> KnownIdentities:
    """One round trip: which customer each identifier belongs to, which of those hold a userId, and
    which candidate ids for new customers are taken already."""
    pairs = list(idents)
    rows = await _LOOKUP_IDENTITIES.fetch(
        session,
        {"idents": json_rows(pairs), "cands": list(candidate_ids)},
    )
    out = KnownIdentities({}, set(), set(), set())
    for kind, value, customer_id, has_user in rows:
        if kind is None:
            out.taken_ids.add(customer_id)
            continue
        if kind == "retired":
            out.retired_ids.add(customer_id)
            continue
        out.links[(kind, value)] = customer_id
        if has_user:
            out.with_user.add(customer_id)
    unavailable = out.taken_ids | out.retired_ids
    prefixes = sorted(f"{k}:{v}:" for k, v in pairs if v in unavailable and f"{k}:{v}" in unavailable)
    if prefixes:
        out.taken_ids.update(r[0] for r in await _TAKEN_WITH_PREFIX.fetch(session, {"prefixes": prefixes}))
    return out


async def existing_customer_ids(session: AsyncSession, ids: Iterable[str]) -> set[str]:
    rows = await session.execute(
        text("SELECT customer_id FROM customers WHERE customer_id = ANY(CAST(:ids AS text[]))"),
        {"ids": list(ids)},
    )
    return {r[0] for r in rows}


async def insert_customers_and_links(
    session: AsyncSession, ids: Sequence[str], links: Sequence[tuple[str, str, str]], now: datetime
) -> int:
    """New customers and new identifier links, in one statement; returns how many links were new
    (fewer than asked means a concurrent transaction linked one of them first). Raises
    `CustomerIdTaken` (a transient conflict: the unit of work restarts and picks another id) if a
    concurrent transaction created one of these customer ids for other identifiers first: linking
    to it would fold one person's events into another's profile."""
    if not ids and not links:
        return 0
    # In one global order: two units inserting the same new ids in different orders wait on each
    # other's unique-index entries (a deadlock); in the same order one just waits for the other.
    ids, links = sorted(ids), sorted(links)
    rows = await _INSERT_CUSTOMERS_AND_LINKS.fetch(
        session,
        {"ids": json_list(ids), "now": now, "links": json_rows(links)},
    )
    created, linked = rows[0]
    if created != len(ids):
        raise CustomerIdTaken(f"{len(ids) - created} of {len(ids)} new customer ids already exist")
    return int(linked)


async def identities_of(
    session: AsyncSession, customer_ids: Iterable[str]
) -> dict[str, dict[str, list[str]]]:
    rows = await _IDENTITIES_OF.fetch(session, {"ids": list(customer_ids)})
    out: dict[str, dict[str, list[str]]] = {}
    for customer_id, kind, value in rows:
        out.setdefault(customer_id, {}).setdefault(_IDENTITY_LABEL.get(kind, kind), []).append(value)
    return out


# Run by every unit of work that publishes a profile change: straight on the driver.
_IDENTITIES_OF = Statement(
    "SELECT customer_id, kind, value FROM identities WHERE customer_id = ANY(CAST(:ids AS text[])) "
    "ORDER BY customer_id, kind, value"
)


_IDENTITY_LABEL = {"user": "user_id", "anon": "anonymous_id", "merged": "merged_customer_id"}


async def resolve_customer(session: AsyncSession, ref: str) -> str | None:
    """A canonical id from a canonical id, userId, anonymousId, former (merged) id or email trait."""
    row = await session.execute(
        text(
            "SELECT customer_id FROM customers WHERE customer_id = :r "
            "UNION ALL (SELECT customer_id FROM identities WHERE value = :r ORDER BY kind DESC LIMIT 1) "
            "UNION ALL (SELECT customer_id FROM customers WHERE traits ->> 'email' = :r LIMIT 1) LIMIT 1"
        ),
        {"r": ref},
    )
    found = row.first()
    return str(found[0]) if found else None


# --------------------------------------------------------------------------- merges


class ProfileGone(Exception):
    """A profile vanished under us (a concurrent merge folded it away): retry with fresh identities."""


class CustomerIdTaken(ProfileGone):
    """A new customer's id was created meanwhile by a concurrent unit of work: retry, the lookup then
    sees it taken (a `ProfileGone`, so the events handler retries it as a transient conflict)."""


@dataclass
class MergeResult:
    changed_traits: set[str]
    # Memberships the merged-away profile held: each ends (announced as an exit of that id).
    exited: list[tuple[str, int]]  # segment_id, transitions after the exit
    # The merged-away profile's trait values left out to keep the survivor within the bound.
    dropped_traits: TraitRefusal | None = None


async def merge_customers(
    session: AsyncSession, merge: Merge, now: datetime, limits: TraitLimits | None = None
) -> MergeResult:
    """Fold `from` into `into`: traits (most recent per trait wins, within `limits`: see
    `merge_bounded_traits`), aggregates, timeline, identities, merge history; `from`'s memberships
    and timers end (the survivor is re-evaluated by the caller)."""
    rows = {
        r.customer_id: r
        for r in await session.execute(
            text(
                f"SELECT {PROFILE_COLUMNS} FROM customers WHERE customer_id IN (:a, :b) ORDER BY customer_id "
                "FOR UPDATE"
            ),
            {"a": merge.from_id, "b": merge.into_id},
        )
    }
    if merge.into_id not in rows or merge.from_id not in rows:
        raise ProfileGone(merge.from_id if merge.from_id not in rows else merge.into_id)
    into, other = _snapshot(rows[merge.into_id]), _snapshot(rows[merge.from_id])
    merged = merge_bounded_traits(
        (into.traits, into.trait_times), (other.traits, other.trait_times), limits or TraitLimits()
    )
    traits, times = merged.traits, merged.times
    await session.execute(
        text(
            "UPDATE customers c SET traits = CAST(:traits AS jsonb), trait_times = CAST(:times AS jsonb), "
            "first_seen = LEAST(c.first_seen, f.first_seen), last_seen = GREATEST(c.last_seen, f.last_seen), "
            "event_count = c.event_count + f.event_count, orders_count = c.orders_count + f.orders_count, "
            "revenue = c.revenue + f.revenue, first_order_at = LEAST(c.first_order_at, f.first_order_at), "
            "last_order_at = GREATEST(c.last_order_at, f.last_order_at), "
            # Never back in time (see `CustomerEventsHandler.handle`), nor before the merged-away
            # profile's last change: the merge's announcement must be newer than any of `from`'s.
            "updated_at = GREATEST(c.updated_at, f.updated_at, :now) "
            "FROM customers f WHERE c.customer_id = :into AND f.customer_id = :from"
        ),
        {
            "traits": json_text(traits),
            "times": json_text({k: v.isoformat() for k, v in times.items()}),
            "into": merge.into_id,
            "from": merge.from_id,
            "now": now,
        },
    )
    params = {"into": merge.into_id, "from": merge.from_id, "now": now}
    await session.execute(
        text(
            "INSERT INTO event_counts (customer_id, event, count, first_at, last_at) "
            "SELECT :into, event, count, first_at, last_at FROM event_counts WHERE customer_id = :from "
            "ON CONFLICT (customer_id, event) DO UPDATE SET count = event_counts.count + excluded.count, "
            "first_at = LEAST(event_counts.first_at, excluded.first_at), "
            "last_at = GREATEST(event_counts.last_at, excluded.last_at)"
        ),
        params,
    )
    await session.execute(text("DELETE FROM event_counts WHERE customer_id = :from"), {"from": merge.from_id})
    await session.execute(text("UPDATE events SET customer_id = :into WHERE customer_id = :from"), params)
    await session.execute(text("UPDATE identities SET customer_id = :into WHERE customer_id = :from"), params)
    await session.execute(
        text(
            "INSERT INTO identities (kind, value, customer_id, linked_at) VALUES ('merged', :from, :into, "
            ":now) "
            "ON CONFLICT (kind, value) DO UPDATE SET customer_id = excluded.customer_id"
        ),
        params,
    )
    await session.execute(text("UPDATE merges SET canonical_id = :into WHERE canonical_id = :from"), params)
    await session.execute(
        text(
            "INSERT INTO merges (canonical_id, into_id, from_id, message_id, event_type, identifiers, "
            "merged_at) "
            "VALUES (:into, :into, :from, :mid, :etype, CAST(:idents AS jsonb), :now)"
        ),
        {
            **params,
            "mid": merge.message_id,
            "etype": merge.event_type,
            "idents": json_text([{"kind": k, "value": v} for k, v in merge.identifiers]),
        },
    )
    exited = [
        (r.segment_id, r.transitions)
        for r in await session.execute(
            text(
                "WITH gone AS (DELETE FROM memberships WHERE customer_id = :from RETURNING segment_id, "
                "is_member, "
                "transitions) SELECT segment_id, transitions + 1 AS transitions FROM gone WHERE is_member"
            ),
            {"from": merge.from_id},
        )
    ]
    await session.execute(
        text("DELETE FROM segment_timers WHERE customer_id = :from"), {"from": merge.from_id}
    )
    # The parked timers after the timers, in a later statement (a later snapshot): a due timer of
    # `from` being parked meanwhile holds its row until it commits, and its parked row is then seen
    # here. With the profile's deletion: no statement more on the event path.
    await session.execute(
        text(
            "WITH unparked AS (DELETE FROM segment_timers_parked WHERE customer_id = :from) "
            "DELETE FROM customers WHERE customer_id = :from"
        ),
        {"from": merge.from_id},
    )
    return MergeResult(merged.changed, exited, merged.dropped)


async def merge_history(session: AsyncSession, customer_id: str) -> list[dict[str, Any]]:
    rows = await session.execute(
        text(
            "SELECT into_id, from_id, message_id, event_type, identifiers, merged_at FROM merges "
            "WHERE canonical_id = :c ORDER BY id"
        ),
        {"c": customer_id},
    )
    return [
        {
            "merged_id": r.from_id,
            "into_id": r.into_id,
            "cause": {"message_id": r.message_id, "event_type": r.event_type, "identifiers": r.identifiers},
            "merged_at": r.merged_at,
        }
        for r in rows
    ]


# --------------------------------------------------------------------------- profile rows


async def lock_profiles(session: AsyncSession, customer_ids: Iterable[str]) -> dict[str, ProfileSnapshot]:
    """The profiles, locked for this transaction (in id order, so concurrent batches cannot deadlock)."""
    rows = await _LOCK_PROFILES.fetch(session, {"ids": json_list(sorted(set(customer_ids)))})
    return {r[0]: _snapshot(r) for r in rows}


async def read_profile(session: AsyncSession, customer_id: str) -> ProfileSnapshot | None:
    row = (
        await session.execute(
            text(f"SELECT {PROFILE_COLUMNS} FROM customers WHERE customer_id = :c"), {"c": customer_id}
        )
    ).first()
    return _snapshot(row) if row else None


class TimelineRow(NamedTuple):  # a NamedTuple: built for every event, ~4x cheaper than a frozen dataclass
    customer_id: str
    message_id: str
    type: str
    event: str | None
    properties: dict[str, Any]
    traits: dict[str, Any]
    timestamp: datetime
    received_at: datetime


async def save_events(
    session: AsyncSession,
    counts: dict[tuple[str, str], EventAggregate],
    timeline: Sequence[TimelineRow],
) -> None:
    """A batch's event aggregate increments (pre-summed per customer and event) and its timeline rows,
    in one statement."""
    await _SAVE_EVENTS.execute(
        session,
        {
            "counts": json_rows(
                (cid, name, a.count, a.first_at, a.last_at) for (cid, name), a in counts.items()
            ),
            "timeline": json_rows(timeline),
        },
    )


async def save_profiles(
    session: AsyncSession,
    profiles: Sequence[ProfileSnapshot],
    now: datetime,
    lifecycle: lifecycle_store.EventPathWrite | None = None,
) -> None:
    """A batch's profile rows (their traits only where the batch wrote one, `traits_written`) with
    its lifecycle writes (`Lifecycle.on_batch`: the columns of customers among `profiles`, stage
    history, survey answers), in one statement. Each row's `updated_at` is its snapshot's (the time
    the batch dates its change by), `now` where not set."""
    lifecycle = lifecycle or lifecycle_store.EventPathWrite()
    ids = {p.customer_id for p in profiles}
    assert all(cid in ids for cid, _ in lifecycle.values), "lifecycle values of a profile not written"
    await _SAVE_PROFILES.execute(
        session,
        {
            "now": now,
            "rows": json_rows(
                (
                    p.customer_id,
                    p.traits if p.traits_written else None,
                    p.trait_times if p.traits_written else None,
                    (f := p.fields)["first_seen"],
                    f["last_seen"],
                    f["event_count"],
                    f["orders_count"],
                    float(f["revenue"]),
                    f["first_order_at"],
                    f["last_order_at"],
                    p.updated_at or now,
                )
                for p in profiles
            ),
            **lifecycle.params(),
        },
    )


async def load_event_counts(
    session: AsyncSession, customer_ids: Iterable[str], names: Iterable[str] | None
) -> dict[str, dict[str, EventAggregate]]:
    """Aggregates per customer, for the given event names (all names when None)."""
    sql = (
        "SELECT customer_id, event, count, first_at, last_at FROM event_counts "
        "WHERE customer_id = ANY(CAST(:ids AS text[]))"
    )
    params: dict[str, Any] = {"ids": list(customer_ids)}
    if names is not None:
        sql += " AND event = ANY(CAST(:names AS text[]))"
        params["names"] = list(names)
    out: dict[str, dict[str, EventAggregate]] = {}
    for r in await session.execute(text(sql), params):
        out.setdefault(r.customer_id, {})[r.event] = EventAggregate(r[2], r.first_at, r.last_at)
    return out


async def timeline_page(
    session: AsyncSession, customer_id: str, limit: int, before: tuple[datetime, int] | None
) -> list[dict[str, Any]]:
    sql = (
        "SELECT seq, message_id, type, event, properties, traits, timestamp, received_at FROM events "
        "WHERE customer_id = :c"
    )
    params: dict[str, Any] = {"c": customer_id, "n": limit}
    if before is not None:
        sql += " AND (timestamp, seq) < (:bt, :bs)"
        params |= {"bt": before[0], "bs": before[1]}
    sql += " ORDER BY timestamp DESC, seq DESC LIMIT :n"
    return [dict(r._mapping) for r in await session.execute(text(sql), params)]


def timeline_rule(days: float) -> RetentionRule:
    """The oldest events by insertion order (the primary key, no scan of the table): a batch stops at
    the first events received within the period. Orders go too: the lifecycle models and the KPIs,
    computed from the timeline's orders, then see only the period kept (see the setting)."""
    return RetentionRule(
        "events",
        days,
        "WITH head AS (SELECT seq, received_at FROM events ORDER BY seq LIMIT :batch) "
        "DELETE FROM events WHERE seq IN (SELECT seq FROM head WHERE received_at < :cutoff) RETURNING 1",
    )


async def customer_count(session: AsyncSession) -> int:
    return int((await session.execute(text("SELECT count(*) FROM customers"))).scalar_one())


async def snapshot_chunk(
    session: AsyncSession,
    after: str | None,
    limit: int,
    job: str,
    announce: dict[str, str],
    identities_per_message: int = 1000,
) -> list[str]:
    """The next `limit` customers after `after` (by id) as `ProfileChanged(kind=snapshot)` outbox rows,
    built in one statement (no Python per customer); returns the customers announced, in id order.

    The customers are held FOR SHARE until the chunk commits (a statement of its own, in id order as
    the event path locks them): a change committing while the chunk reads would otherwise be
    published before a snapshot of the state it replaced, which consumers that keep the last message
    (the journey engine) would then keep. The snapshot is read after the locks are granted, so it
    sees what their holders committed."""
    ids = [
        r[0]
        for r in await session.execute(
            text(
                "SELECT customer_id FROM customers WHERE customer_id > :after ORDER BY customer_id "
                "LIMIT :limit FOR SHARE"
            ),
            {"after": after or "", "limit": limit},
        )
    ]
    if not ids:
        return []
    # Every locked row is there: FOR SHARE waited for a deletion (merge, erasure) and skipped its row.
    await session.execute(
        text(
            "WITH chunk AS (SELECT customer_id, traits, lifecycle_stage, updated_at FROM customers "
            "WHERE customer_id = ANY(CAST(:ids AS text[]))), "
            # A large identity set goes out in parts of at most :per identities, one message each
            # (as real time does, `split_identities`): part 0 keeps the plain event id.
            "numbered AS (SELECT i.customer_id, CASE i.kind WHEN 'user' THEN 'user_id' "
            "WHEN 'anon' THEN 'anonymous_id' WHEN 'merged' THEN 'merged_customer_id' ELSE i.kind END "
            "AS label, i.value FROM identities i JOIN chunk USING (customer_id)), "
            "parted AS (SELECT customer_id, label, value, (row_number() OVER (PARTITION BY customer_id "
            "ORDER BY label, value) - 1) / :per AS part FROM numbered), "
            "labelled AS (SELECT customer_id, part, label, jsonb_agg(value ORDER BY value) AS vals "
            "FROM parted GROUP BY 1, 2, 3), "
            "ids AS (SELECT customer_id, part, jsonb_object_agg(label, vals) AS identities FROM labelled "
            "GROUP BY customer_id, part), "
            "outboxed AS (INSERT INTO outbox (topic, key, value, headers) "
            "SELECT :topic, convert_to(c.customer_id, 'UTF8'), convert_to(jsonb_build_object("
            "'event_id', 'profile:' || c.customer_id || ':snapshot:' || :job "
            "|| CASE WHEN ids.part > 0 THEN ':' || 'identities-' || (ids.part + 1) ELSE '' END, "
            # As of the profile's last change, not now: a consumer that already has a newer change
            # (one committing while this chunk was read) keeps it (newest wins).
            "'customer_id', c.customer_id, 'kind', 'snapshot', "
            "'occurred_at', c.updated_at, "
            "'traits', c.traits, 'identities', COALESCE(ids.identities, '{}'::jsonb), "
            "'lifecycle_stage', c.lifecycle_stage)::text, 'UTF8'), "
            "jsonb_build_object('clm-event-id', 'profile:' || c.customer_id || ':snapshot:' || :job "
            "|| CASE WHEN ids.part > 0 THEN ':' || 'identities-' || (ids.part + 1) ELSE '' END, "
            "'clm-event-type', 'profile_changed', 'clm-schema-version', '1', "
            "'clm-correlation-id', CAST(:job AS text), 'clm-producer', CAST(:producer AS text), "
            "'clm-produced-at-ms', CAST(:produced_ms AS text)) "
            "FROM chunk c LEFT JOIN ids USING (customer_id) ORDER BY c.customer_id, ids.part "
            "RETURNING 1) "
            "SELECT count(*) FROM outboxed"
        ),
        {"ids": ids, "job": job, "per": identities_per_message, **announce},
    )
    return ids

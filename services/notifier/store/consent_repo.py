"""Every query on `subscription_topics`, `preferences`, `consent_ledger`, `sms_address_optouts` and
`email_address_optouts`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifier.domain.consent import SubscriptionTopic
from services.notifier.store import identities_repo
from services.notifier.store.sql_arrays import any_of
from services.notifier.store.tables import (
    consent_ledger,
    email_address_optouts,
    preferences,
    sms_address_optouts,
    subscription_topics,
)
from shared.db.engine import Statement


def _topic(row: Mapping[Any, Any]) -> SubscriptionTopic:
    return SubscriptionTopic(
        id=row["id"],
        name=row["name"],
        channels=tuple(row["channels"]),
        default_subscribed=row["default_subscribed"],
    )


def topic_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "channels": row.channels,
        "default_subscribed": row.default_subscribed,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


async def upsert_topic(
    session: AsyncSession,
    *,
    topic_id: str,
    name: str,
    description: str,
    channels: list[str],
    default_subscribed: bool,
    now: datetime,
) -> dict[str, Any]:
    stmt = insert(subscription_topics).values(
        id=topic_id,
        name=name,
        description=description,
        channels=channels,
        default_subscribed=default_subscribed,
        created_at=now,
        updated_at=now,
    )
    upsert = stmt.on_conflict_do_update(
        index_elements=["id"],
        set_={
            "name": stmt.excluded.name,
            "description": stmt.excluded.description,
            "channels": stmt.excluded.channels,
            "default_subscribed": stmt.excluded.default_subscribed,
            "updated_at": stmt.excluded.updated_at,
        },
    ).returning(*subscription_topics.c)
    return topic_dict((await session.execute(upsert)).one())


async def list_topics(session: AsyncSession) -> list[dict[str, Any]]:
    rows = await session.execute(sa.select(subscription_topics).order_by(subscription_topics.c.id))
    return [topic_dict(r) for r in rows]


# Read for every batch of sends (with the rest of its context: `send_context_repo`).
TOPICS_BY_ID_SQL = (
    "SELECT id, name, channels, default_subscribed FROM subscription_topics "
    "WHERE id = ANY(CAST(:topics AS text[]))"
)
# By any identifier of the customer.
CHOICES_FOR_SQL = (
    "SELECT q.id, p.topic, p.channel, p.subscribed FROM unnest(CAST(:customers AS text[])) AS q(id) "
    "LEFT JOIN customer_aliases AS ci ON ci.identity = q.id "  # see `identities_repo`
    "JOIN preferences AS p ON p.customer_id = COALESCE(ci.customer_id, q.id)"
)
_TOPICS_BY_ID = Statement(TOPICS_BY_ID_SQL)
_CHOICES_FOR = Statement(CHOICES_FOR_SQL)


async def offered_on(session: AsyncSession, channel: str) -> list[SubscriptionTopic]:
    """The topics offered on `channel`, by id: what the hosted preference page shows for it."""
    rows = (
        await session.execute(
            sa.select(subscription_topics)
            .where(subscription_topics.c.channels.contains([channel]))
            .order_by(subscription_topics.c.id)
        )
    ).mappings()
    return [_topic(r) for r in rows]


async def topics_by_id(session: AsyncSession, ids: set[str]) -> dict[str, SubscriptionTopic]:
    if not ids:
        return {}
    return topics(await _TOPICS_BY_ID.fetch(session, {"topics": list(ids)}))


def topics(rows: Sequence[Mapping[str, Any]]) -> dict[str, SubscriptionTopic]:
    """Rows of `TOPICS_BY_ID_SQL` (by column name), by topic id."""
    return {r["id"]: _topic(r) for r in rows}


async def delete_topic(session: AsyncSession, topic_id: str) -> bool:
    result = await session.execute(
        sa.delete(subscription_topics)
        .where(subscription_topics.c.id == topic_id)
        .returning(subscription_topics.c.id)
    )
    return result.first() is not None


async def choices_for(
    session: AsyncSession, customer_ids: set[str]
) -> dict[str, dict[tuple[str, str], bool]]:
    """customer (as asked for: any identifier of the customer) -> (topic, channel) -> subscribed."""
    if not customer_ids:
        return {}
    return choices(customer_ids, await _CHOICES_FOR.fetch(session, {"customers": list(customer_ids)}))


def choices(
    customer_ids: Iterable[str], rows: Sequence[Mapping[str, Any]]
) -> dict[str, dict[tuple[str, str], bool]]:
    """Rows of `CHOICES_FOR_SQL` (by column name): customer as asked for -> (topic, channel) -> subscribed."""
    out: dict[str, dict[tuple[str, str], bool]] = {c: {} for c in customer_ids}
    for r in rows:
        out[r["id"]][(r["topic"], r["channel"])] = r["subscribed"]
    return out


async def preferences_of(session: AsyncSession, customer_id: str) -> list[dict[str, Any]]:
    rows = await session.execute(
        sa.select(preferences)
        .where(preferences.c.customer_id == customer_id)
        .order_by(preferences.c.topic, preferences.c.channel)
    )
    return [
        {
            "topic": r.topic,
            "channel": r.channel,
            "subscribed": r.subscribed,
            "source": r.source,
            "updated_at": r.updated_at,
        }
        for r in rows
    ]


async def record_choices(
    session: AsyncSession,
    customer_id: str,
    changes: Sequence[tuple[str, str, bool]],
    *,
    source: str,
    now: datetime,
    message_id: str | None = None,
) -> list[tuple[str, str, bool]]:
    """Apply (topic, channel, subscribed) choices (the last one per topic and channel wins); every one
    that changes something goes to the ledger. Returns the changes that were new. `customer_id` may
    be any identifier of the customer: the choices are kept under the customer's id (see
    `identities_repo`)."""
    _, changed = await apply_choices(
        session, customer_id, changes, source=source, now=now, message_id=message_id
    )
    return changed


async def apply_choices(
    session: AsyncSession,
    customer_id: str,
    changes: Sequence[tuple[str, str, bool]],
    *,
    source: str,
    now: datetime,
    message_id: str | None = None,
) -> tuple[dict[tuple[str, str], bool], list[tuple[str, str, bool]]]:
    """`record_choices`, also returning the customer's choices as they were right before, read under
    the write lock: (topic, channel) -> subscribed, and the changes that were new."""
    customer_id = await identities_repo.resolve_for_write(session, customer_id)
    current = (await choices_for(session, {customer_id}))[customer_id]
    # One choice per topic and channel, the last given winning: one INSERT ... ON CONFLICT DO UPDATE
    # may not touch a row twice (PostgreSQL refuses the whole statement). The API refuses conflicting
    # duplicates before this.
    wanted = {(t, ch): s for t, ch, s in changes}
    changed = [(t, ch, s) for (t, ch), s in wanted.items() if current.get((t, ch)) is not s]
    if not changed:
        return current, []
    stmt = insert(preferences).values(
        [
            {
                "customer_id": customer_id,
                "topic": t,
                "channel": ch,
                "subscribed": s,
                "source": source,
                "updated_at": now,
            }
            for t, ch, s in changed
        ]
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["customer_id", "topic", "channel"],
        set_={
            "subscribed": stmt.excluded.subscribed,
            "source": stmt.excluded.source,
            "updated_at": stmt.excluded.updated_at,
        },
    )
    await session.execute(stmt)
    await session.execute(
        sa.insert(consent_ledger),
        [
            {
                "customer_id": customer_id,
                "topic": t,
                "channel": ch,
                "subscribed": s,
                "source": source,
                "message_id": message_id,
                "occurred_at": now,
            }
            for t, ch, s in changed
        ],
    )
    return current, changed


async def move_choices(session: AsyncSession, from_ids: Sequence[str], into_id: str, now: datetime) -> None:
    """Choices recorded under identifiers that turn out to be `into_id`'s (an opt-out sent with the
    userId of a customer known by their anonymousId, a merged-away profile's) become `into_id`'s.
    Where both hold one for a topic and channel, the latest choice wins (an opt-out on a tie): it is
    what the customer said last. Each change to `into_id`'s choices is in the ledger."""
    if not from_ids:
        return
    # Before reading: a choice written for `into_id` meanwhile must be in what is compared.
    await identities_repo.lock(session, [into_id])
    rows = (
        await session.execute(
            sa.select(preferences).where(any_of(preferences.c.customer_id, [*from_ids, into_id]))
        )
    ).all()
    if not any(r.customer_id != into_id for r in rows):
        return
    latest: dict[tuple[str, str], Any] = {}
    for r in rows:
        key = (r.topic, r.channel)
        seen = latest.get(key)
        if seen is None or (r.updated_at, not r.subscribed) > (seen.updated_at, not seen.subscribed):
            latest[key] = r
    await session.execute(sa.delete(preferences).where(any_of(preferences.c.customer_id, list(from_ids))))
    await record_choices(
        session,
        into_id,
        [(t, ch, r.subscribed) for (t, ch), r in sorted(latest.items())],
        source="identity_merge",
        now=now,
    )


async def history(session: AsyncSession, customer_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The ledger of a customer under all its identifiers (rows keep the id they were recorded with)."""
    rows = await session.execute(
        sa.select(consent_ledger)
        .where(any_of(consent_ledger.c.customer_id, list(customer_ids)))
        .order_by(consent_ledger.c.id)
    )
    return [
        {
            "topic": r.topic,
            "channel": r.channel,
            "subscribed": r.subscribed,
            "source": r.source,
            "message_id": r.message_id,
            "occurred_at": r.occurred_at,
        }
        for r in rows
    ]


async def set_sms_address_optout(
    session: AsyncSession, phone_hash: str, opted_out: bool, *, source: str, now: datetime
) -> bool:
    """STOP (`opted_out`) or START from a number (by its `phone_key`); True if it changed something.
    A repeated STOP keeps the first one's time."""
    if opted_out:
        result = await session.execute(
            insert(sms_address_optouts)
            .values(phone_hash=phone_hash, source=source, opted_out_at=now)
            .on_conflict_do_nothing()
        )
    else:
        result = await session.execute(
            sa.delete(sms_address_optouts).where(sms_address_optouts.c.phone_hash == phone_hash)
        )
    return bool(getattr(result, "rowcount", 0))


async def add_email_address_optouts(
    session: AsyncSession, address_hashes: Sequence[str], *, source: str, now: datetime
) -> set[str]:
    """Spam complaints about these addresses (by `suppression.address_key`); returns the ones new. A
    repeated complaint keeps the first one's time and source."""
    if not address_hashes:
        return set()
    # In one order (sorted): two imports naming the same addresses in other orders deadlocked.
    rows = [{"address_hash": h, "source": source, "opted_out_at": now} for h in sorted(set(address_hashes))]
    result = await session.execute(
        insert(email_address_optouts)
        .values(rows)
        .on_conflict_do_nothing()
        .returning(email_address_optouts.c.address_hash)
    )
    return set(result.scalars())


async def get_email_address_optout(session: AsyncSession, address_hash: str) -> tuple[str, datetime] | None:
    """The source and time of the complaint about this address, if any."""
    row = (
        await session.execute(
            sa.select(email_address_optouts.c.source, email_address_optouts.c.opted_out_at).where(
                email_address_optouts.c.address_hash == address_hash
            )
        )
    ).first()
    return (row[0], row[1]) if row else None


async def remove_email_address_optout(session: AsyncSession, address_hash: str) -> bool:
    result = await session.execute(
        sa.delete(email_address_optouts)
        .where(email_address_optouts.c.address_hash == address_hash)
        .returning(email_address_optouts.c.address_hash)
    )
    return result.first() is not None

"""Every query on `contacts` (the projection of clm.profiles.v1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifier.domain.composition import ContactView
from services.notifier.store.sql_arrays import any_of
from services.notifier.store.tables import contacts
from shared.db.engine import Statement, json_text

# Every profile change of every customer lands here (the notifier's projection of clm.profiles.v1),
# a few rows at a time when traffic is single events: straight to asyncpg (`Statement`). As an
# `insert().values([...])` SQLAlchemy compiled it anew for each number of rows (7% of the notifier's
# CPU at 400 single posts/s).
_UPSERT = Statement(
    "INSERT INTO contacts (customer_id, email, email_address, phone, phone_e164, push_token, "
    "webhook_url, locale, timezone, traits, profile_at) "
    "SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:email AS text[]), CAST(:mailbox AS text[]), "
    "CAST(:phone AS text[]), CAST(:e164 AS text[]), CAST(:push AS text[]), CAST(:hook AS text[]), "
    "CAST(:locale AS text[]), CAST(:tz AS text[]), CAST(:traits AS jsonb[]), CAST(:at AS timestamptz[])) "
    "AS u(id, em, ma, ph, e1, pu, ho, lo, tz, tr, at) "
    # Not a profile merged into another since (a late announcement from another partition): its row
    # would make its id "a customer's own" again (`identities_repo`).
    "WHERE NOT EXISTS (SELECT 1 FROM customer_identities ci "
    "WHERE ci.identity = u.id AND ci.linked_at > u.at) "
    "ON CONFLICT (customer_id) DO UPDATE SET email = excluded.email, "
    "email_address = excluded.email_address, phone = excluded.phone, "
    "phone_e164 = excluded.phone_e164, push_token = excluded.push_token, "
    "webhook_url = excluded.webhook_url, locale = excluded.locale, timezone = excluded.timezone, "
    "traits = excluded.traits, profile_at = excluded.profile_at "
    "WHERE contacts.profile_at <= excluded.profile_at"
)


async def upsert(session: AsyncSession, items: Sequence[tuple[ContactView, datetime]]) -> None:
    """Newest profile wins: an older event arriving late does not overwrite a newer projection."""
    latest: dict[str, tuple[ContactView, datetime]] = {}
    for contact, at in items:
        seen = latest.get(contact.customer_id)
        if seen is None or at >= seen[1]:
            latest[contact.customer_id] = (contact, at)
    if not latest:
        return
    rows = [latest[k] for k in sorted(latest)]  # one lock order for concurrent batches
    await _UPSERT.execute(
        session,
        {
            "ids": [c.customer_id for c, _ in rows],
            "email": [c.email for c, _ in rows],
            "mailbox": [c.email_address for c, _ in rows],
            "phone": [c.phone for c, _ in rows],
            "e164": [c.phone_e164 for c, _ in rows],
            "push": [c.push_token for c, _ in rows],
            "hook": [c.webhook_url for c, _ in rows],
            "locale": [c.locale for c, _ in rows],
            "tz": [c.timezone for c, _ in rows],
            "traits": [json_text(c.traits) for c, _ in rows],
            "at": [at for _, at in rows],
        },
    )


async def delete(session: AsyncSession, customer_ids: Sequence[str]) -> None:
    if customer_ids:
        await session.execute(sa.delete(contacts).where(any_of(contacts.c.customer_id, customer_ids)))


# A contact row's columns are the view's fields, by the same names.
_VIEW_COLUMNS = (
    "customer_id",
    "email",
    "email_address",
    "phone",
    "phone_e164",
    "push_token",
    "webhook_url",
    "locale",
    "timezone",
    "traits",
)


def _contact(row: Mapping[Any, Any]) -> ContactView:
    """From a row by column name: an asyncpg record (`Statement`) or a SQLAlchemy row's `_mapping`."""
    return ContactView(**{name: row[name] for name in _VIEW_COLUMNS})


async def get(session: AsyncSession, customer_id: str) -> ContactView | None:
    """By any identifier of the customer."""
    return (await get_many(session, {customer_id})).get(customer_id)


# Read for every batch of sends (with the rest of its context: `send_context_repo`).
GET_MANY_SQL = (
    f"SELECT q.id AS asked, {', '.join(f'c.{c}' for c in _VIEW_COLUMNS)} "
    "FROM unnest(CAST(:customers AS text[])) AS q(id) "
    "LEFT JOIN customer_aliases AS ci ON ci.identity = q.id "  # see `identities_repo`
    "JOIN contacts AS c ON c.customer_id = COALESCE(ci.customer_id, q.id)"
)
_GET_MANY = Statement(GET_MANY_SQL)


async def get_many(session: AsyncSession, customer_ids: set[str]) -> dict[str, ContactView]:
    """By the ids asked for, which may be any identifier of the customer (a request made with a userId
    for a customer known by its anonymousId); the views carry the customer's id."""
    if not customer_ids:
        return {}
    return views(await _GET_MANY.fetch(session, {"customers": list(customer_ids)}))


def views(rows: Sequence[Mapping[str, Any]]) -> dict[str, ContactView]:
    """Rows of `GET_MANY_SQL` (by column name), by the id asked for."""
    return {r["asked"]: _contact(r) for r in rows}


async def find_by_phone(session: AsyncSession, e164: str) -> list[str]:
    """The customers whose profile phone is this number (E.164), however the profile wrote it."""
    rows = await session.execute(sa.select(contacts.c.customer_id).where(contacts.c.phone_e164 == e164))
    return list(rows.scalars())


async def find_by_emails(session: AsyncSession, mailboxes: Sequence[str]) -> dict[str, list[str]]:
    """The customers whose profile email is one of these mailboxes (`domain.email_addresses`),
    however the profile wrote it, by mailbox."""
    rows = await session.execute(
        sa.select(contacts.c.email_address, contacts.c.customer_id)
        .where(contacts.c.email_address == sa.any_(sa.cast(list(mailboxes), sa.ARRAY(sa.Text))))
        .order_by(contacts.c.customer_id)
    )
    found: dict[str, list[str]] = {}
    for address, customer_id in rows.all():
        found.setdefault(address, []).append(customer_id)
    return found

"""Every query on `contacts` (the projection of clm.profiles.v1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifier.domain.composition import ContactView
from services.notifier.store.sql_arrays import any_of
from services.notifier.store.tables import contacts
from shared.db.engine import Statement


async def upsert(session: AsyncSession, items: Sequence[tuple[ContactView, datetime]]) -> None:
    """Newest profile wins: an older event arriving late does not overwrite a newer projection."""
    latest: dict[str, tuple[ContactView, datetime]] = {}
    for contact, at in items:
        seen = latest.get(contact.customer_id)
        if seen is None or at >= seen[1]:
            latest[contact.customer_id] = (contact, at)
    if not latest:
        return
    stmt = insert(contacts).values(
        [
            {
                "customer_id": c.customer_id,
                "email": c.email,
                "phone": c.phone,
                "push_token": c.push_token,
                "webhook_url": c.webhook_url,
                "locale": c.locale,
                "timezone": c.timezone,
                "traits": c.traits,
                "profile_at": at,
            }
            for c, at in latest.values()
        ]
    )
    excluded = stmt.excluded
    stmt = stmt.on_conflict_do_update(
        index_elements=["customer_id"],
        set_={
            col: excluded[col]
            for col in (
                "email",
                "phone",
                "push_token",
                "webhook_url",
                "locale",
                "timezone",
                "traits",
                "profile_at",
            )
        },
        where=contacts.c.profile_at <= excluded.profile_at,
    )
    await session.execute(stmt)


async def delete(session: AsyncSession, customer_ids: Sequence[str]) -> None:
    if customer_ids:
        await session.execute(sa.delete(contacts).where(any_of(contacts.c.customer_id, customer_ids)))


# A contact row's columns are the view's fields, by the same names.
_VIEW_COLUMNS = ("customer_id", "email", "phone", "push_token", "webhook_url", "locale", "timezone", "traits")


def _contact(row: Mapping[Any, Any]) -> ContactView:
    """From a row by column name: an asyncpg record (`Statement`) or a SQLAlchemy row's `_mapping`."""
    return ContactView(**{name: row[name] for name in _VIEW_COLUMNS})


async def get(session: AsyncSession, customer_id: str) -> ContactView | None:
    row = (await session.execute(sa.select(contacts).where(contacts.c.customer_id == customer_id))).first()
    return _contact(row._mapping) if row else None


# Read for every batch of sends: straight to asyncpg (`Statement`).
_GET_MANY = Statement(
    f"SELECT {', '.join(_VIEW_COLUMNS)} FROM contacts WHERE customer_id = ANY(CAST(:ids AS text[]))"
)


async def get_many(session: AsyncSession, customer_ids: set[str]) -> dict[str, ContactView]:
    if not customer_ids:
        return {}
    rows = await _GET_MANY.fetch(session, {"ids": list(customer_ids)})
    return {r["customer_id"]: _contact(r) for r in rows}


async def find_by_phone(session: AsyncSession, phone: str) -> list[str]:
    rows = await session.execute(sa.select(contacts.c.customer_id).where(contacts.c.phone == phone))
    return list(rows.scalars())

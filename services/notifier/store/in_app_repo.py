"""Every query on `in_app_messages`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifier.store.sql_arrays import any_of
from services.notifier.store.tables import in_app_messages


async def store_message(
    session: AsyncSession, *, customer_id: str, message_id: str, title: str, body: str, now: datetime
) -> None:
    await session.execute(
        insert(in_app_messages)
        .values(customer_id=customer_id, message_id=message_id, title=title, body=body, created_at=now)
        .on_conflict_do_nothing(index_elements=["message_id"])
    )


async def list_for(
    session: AsyncSession, customer_id: str, *, unread_only: bool, limit: int
) -> list[dict[str, Any]]:
    stmt = sa.select(in_app_messages).where(in_app_messages.c.customer_id == customer_id)
    if unread_only:
        stmt = stmt.where(in_app_messages.c.read_at.is_(None))
    rows = await session.execute(stmt.order_by(in_app_messages.c.id.desc()).limit(limit))
    return [
        {
            "id": r.id,
            "message_id": r.message_id,
            "title": r.title,
            "body": r.body,
            "created_at": r.created_at,
            "read_at": r.read_at,
        }
        for r in rows
    ]


async def mark_read(session: AsyncSession, customer_id: str, item_id: int, now: datetime) -> bool:
    result = await session.execute(
        sa.update(in_app_messages)
        .where(in_app_messages.c.customer_id == customer_id, in_app_messages.c.id == item_id)
        .values(read_at=sa.func.coalesce(in_app_messages.c.read_at, now))
        .returning(in_app_messages.c.id)
    )
    return result.first() is not None


async def delete_for(session: AsyncSession, customer_ids: list[str]) -> None:
    if customer_ids:
        await session.execute(
            sa.delete(in_app_messages).where(any_of(in_app_messages.c.customer_id, customer_ids))
        )


async def move(session: AsyncSession, from_ids: list[str], into_id: str) -> None:
    """Messages kept under identifiers that turn out to be `into_id`'s inbox become its."""
    if from_ids:
        await session.execute(
            sa.update(in_app_messages)
            .where(any_of(in_app_messages.c.customer_id, from_ids))
            .values(customer_id=into_id)
        )

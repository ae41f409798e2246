"""The projection of the segmenter's recommendation lists (`ProfileChanged.recommendations`, issue 9):
kept per customer so a send step can put them in `MessageRequested.data["recommendations"]`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


async def set_lists(session: AsyncSession, customer_id: str, lists: dict[str, Any], now: datetime) -> None:
    await session.execute(
        text(
            "INSERT INTO customer_recommendations (customer_id, lists, updated_at) "
            "VALUES (:c, CAST(:l AS jsonb), :now) ON CONFLICT (customer_id) "
            "DO UPDATE SET lists = excluded.lists, updated_at = excluded.updated_at"
        ),
        {"c": customer_id, "l": orjson.dumps(lists).decode(), "now": now},
    )

"""The contact's recommendation lists (`ProfileChanged.recommendations`, issue 9). Sends get them in
the request's data from the journey engine; previews of a real customer read them from here."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


async def upsert(session: AsyncSession, items: Sequence[tuple[str, dict[str, Any], datetime]]) -> None:
    """Newest profile wins, as for the contact projection."""
    latest: dict[str, tuple[dict[str, Any], datetime]] = {}
    for cid, lists, at in items:
        seen = latest.get(cid)
        if seen is None or at >= seen[1]:
            latest[cid] = (lists, at)
    if not latest:
        return
    ids = sorted(latest)
    await session.execute(
        text(
            "INSERT INTO contact_recommendations (customer_id, lists, profile_at) "
            "SELECT c, l, a FROM unnest(CAST(:c AS text[]), CAST(:l AS jsonb[]), CAST(:a AS timestamptz[])) "
            "AS q(c, l, a) ON CONFLICT (customer_id) DO UPDATE SET lists = excluded.lists, "
            "profile_at = excluded.profile_at WHERE contact_recommendations.profile_at <= excluded.profile_at"
        ),
        {
            "c": ids,
            "l": [orjson.dumps(latest[c][0]).decode() for c in ids],
            "a": [latest[c][1] for c in ids],
        },
    )


async def get(session: AsyncSession, customer_id: str) -> dict[str, Any] | None:
    row = (
        await session.execute(
            text("SELECT lists FROM contact_recommendations WHERE customer_id = :c"), {"c": customer_id}
        )
    ).first()
    return dict(row[0]) if row else None


async def delete(session: AsyncSession, customer_ids: Sequence[str]) -> None:
    await session.execute(
        text("DELETE FROM contact_recommendations WHERE customer_id = ANY(CAST(:ids AS text[]))"),
        {"ids": list(customer_ids)},
    )

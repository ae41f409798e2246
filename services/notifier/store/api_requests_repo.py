"""Every query on `api_requests` (Idempotency-Key -> message id)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifier.store.tables import api_requests
from shared.db.retention import RetentionRule


async def claim_idempotency_key(
    session: AsyncSession, key: str, message_id: str, request_hash: str
) -> tuple[str, str]:
    """(message id, request hash) stored for this key: ours if new, the first request's otherwise."""
    await session.execute(
        insert(api_requests)
        .values(idempotency_key=key, message_id=message_id, request_hash=request_hash)
        .on_conflict_do_nothing()
    )
    row = (
        await session.execute(
            sa.select(api_requests.c.message_id, api_requests.c.request_hash).where(
                api_requests.c.idempotency_key == key
            )
        )
    ).one()
    return row.message_id, row.request_hash


def idempotency_rule(days: float) -> RetentionRule:
    return RetentionRule(
        "api_requests",
        days,
        "DELETE FROM api_requests WHERE idempotency_key IN (SELECT idempotency_key FROM api_requests "
        "WHERE created_at < :cutoff LIMIT :batch) RETURNING 1",
    )

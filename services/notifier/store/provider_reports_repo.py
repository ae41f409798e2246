"""Every query on `deferred_provider_reports`: delivery reports that came while an erasure held the
gate, kept until `Notifier.apply_deferred_reports` settles them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifier.store.sql_arrays import any_of
from services.notifier.store.tables import deferred_provider_reports as reports
from services.notifier.store.tables import send_ledger
from shared.contracts import MessageStatusKind


@dataclass(frozen=True)
class ProviderReport:
    """A provider's later report on a message it took: the outcome, in its codes (never its words),
    and the address it says does not exist as its suppression key (a salted hash, never the address).
    `id` once stored."""

    provider_message_id: str
    kind: MessageStatusKind
    reason: str | None
    received_at: datetime
    gone_address_hash: str | None = None
    gone_reason: str | None = None
    id: int | None = None


async def store(session: AsyncSession, report: ProviderReport) -> bool:
    """Keep the report for later; False when the same outcome of the message already waits."""
    stmt = (
        insert(reports)
        .values(
            provider_message_id=report.provider_message_id,
            kind=report.kind.value,
            reason=report.reason,
            gone_address_hash=report.gone_address_hash,
            gone_reason=report.gone_reason,
            received_at=report.received_at,
        )
        .on_conflict_do_nothing(constraint="deferred_provider_reports_once")
        .returning(reports.c.id)
    )
    return (await session.execute(stmt)).first() is not None


async def any_waiting(session: AsyncSession) -> bool:
    return await session.scalar(sa.select(reports.c.id).limit(1)) is not None


async def take(session: AsyncSession, limit: int) -> list[ProviderReport]:
    """The oldest waiting reports, locked until the transaction ends (another replica's loop skips
    them)."""
    rows = await session.execute(
        sa.select(reports).order_by(reports.c.id).limit(limit).with_for_update(skip_locked=True)
    )
    return [
        ProviderReport(
            provider_message_id=r.provider_message_id,
            kind=MessageStatusKind(r.kind),
            reason=r.reason,
            received_at=r.received_at,
            gone_address_hash=r.gone_address_hash,
            gone_reason=r.gone_reason,
            id=r.id,
        )
        for r in rows
    ]


async def delete(session: AsyncSession, ids: Sequence[int]) -> None:
    if ids:
        await session.execute(sa.delete(reports).where(reports.c.id.in_(list(ids))))


async def forget_customers(session: AsyncSession, customer_ids: Sequence[str]) -> None:
    """On erasure: the waiting reports on the customers' messages (the loop would drop them anyway,
    but only once it runs)."""
    theirs = sa.select(send_ledger.c.provider_message_id).where(
        any_of(send_ledger.c.customer_id, customer_ids), send_ledger.c.provider_message_id.is_not(None)
    )
    await session.execute(sa.delete(reports).where(reports.c.provider_message_id.in_(theirs)))

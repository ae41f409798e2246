"""Every query on `deferred_provider_reports`: delivery reports that came while an erasure held the
gate, kept until `Notifier.apply_deferred_reports` settles them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifier.store.sql_arrays import any_of
from services.notifier.store.tables import deferred_provider_reports as reports
from services.notifier.store.tables import send_ledger
from shared.contracts import MessageStatusKind


@dataclass(frozen=True)
class ProviderReport:
    """A provider's later report on a message it took: the outcome, in its codes (never its words),
    and the address it says does not exist as its suppression key (a salted hash, never the address).
    `id` and the tries that failed (`attempts`) once stored."""

    provider_message_id: str
    kind: MessageStatusKind
    reason: str | None
    received_at: datetime
    gone_address_hash: str | None = None
    gone_reason: str | None = None
    id: int | None = None
    attempts: int = 0


async def store(session: AsyncSession, report: ProviderReport) -> bool:
    """Keep the report for later; False when the same outcome of the message already waits (as
    committed: a copy another transaction is inserting meanwhile is not seen, and two are kept; the
    second settles as a duplicate). A plain insert, no unique index: an insert that conflicted with
    a row an erasure is deleting would wait for the erasure to commit, a pooled connection held."""
    same = sa.select(reports.c.id).where(
        reports.c.provider_message_id == report.provider_message_id, reports.c.kind == report.kind.value
    )
    stmt = (
        sa.insert(reports)
        .from_select(
            [
                "provider_message_id",
                "kind",
                "reason",
                "gone_address_hash",
                "gone_reason",
                "received_at",
                "next_attempt_at",
            ],
            sa.select(
                sa.literal(report.provider_message_id, sa.Text),
                sa.literal(report.kind.value, sa.Text),
                sa.literal(report.reason, sa.Text),
                sa.literal(report.gone_address_hash, sa.Text),
                sa.literal(report.gone_reason, sa.Text),
                sa.literal(report.received_at, reports.c.received_at.type),
                sa.literal(report.received_at, reports.c.next_attempt_at.type),
            ).where(~sa.exists(same)),
        )
        .returning(reports.c.id)
    )
    return (await session.execute(stmt)).first() is not None


async def waiting(session: AsyncSession, now: datetime) -> tuple[datetime | None, bool]:
    """When the oldest kept report came (None: none kept), and whether any is due by `now`."""
    row = (
        await session.execute(
            sa.select(
                sa.select(sa.func.min(reports.c.received_at)).scalar_subquery(),
                sa.exists(sa.select(reports.c.id).where(reports.c.next_attempt_at <= now)),
            )
        )
    ).one()
    return row[0], bool(row[1])


async def take(session: AsyncSession, limit: int, now: datetime) -> list[ProviderReport]:
    """The reports due by `now`, those due first (a report whose try failed is due again later, so
    it does not hold back those behind it), locked until the transaction ends (another replica's
    loop skips them)."""
    rows = await session.execute(
        sa.select(reports)
        .where(reports.c.next_attempt_at <= now)
        .order_by(reports.c.next_attempt_at, reports.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
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
            attempts=r.attempts,
        )
        for r in rows
    ]


async def failed(session: AsyncSession, report_id: int, next_attempt_at: datetime) -> None:
    """One more try failed: tried again at `next_attempt_at`."""
    await session.execute(
        sa.update(reports)
        .where(reports.c.id == report_id)
        .values(attempts=reports.c.attempts + 1, next_attempt_at=next_attempt_at)
    )


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

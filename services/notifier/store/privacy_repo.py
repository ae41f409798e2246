"""Every query behind erasure and export of one customer's data (clm.privacy.v1)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifier.store import identities_repo, provider_reports_repo
from services.notifier.store.sql_arrays import any_of
from services.notifier.store.tables import (
    address_suppressions,
    consent_ledger,
    contacts,
    customer_identities,
    engagements,
    in_app_messages,
    preferences,
    send_ledger,
)

# Ledger rows stay (their message ids keep a redelivered request from being sent), emptied of
# personal data; what was still waiting is not sent any more (a `claimed` row too: its worker then
# fails to move it to `sending` and skips it).
_SCRUB_LEDGER = sa.text(
    "UPDATE send_ledger SET request = jsonb_set(jsonb_set(request, '{recipient}', '{}'), '{data}', '{}'), "
    "state = CASE WHEN state IN ('pending', 'claimed') THEN 'failed' ELSE state END, "
    # Failed ones too: `POST /v1/messages/retry-failed` never requeues a row with this reason.
    "reason = CASE WHEN state IN ('pending', 'claimed', 'failed') THEN 'customer erased' "
    # A provider's answer may quote the address ("550 <eve@example.com>: no such user", a number).
    "ELSE regexp_replace(regexp_replace(reason, '[^\\s<>\"'',;()]+@[^\\s<>\"'',;()]+', "
    "'[erased]', 'g'), '[+]?[0-9][0-9 ().-]{6,}[0-9]', '[erased]', 'g') END, "
    "updated_at = :now "
    "WHERE customer_id = ANY(CAST(:ids AS text[]))"
)


async def erase(session: AsyncSession, customer_ids: Sequence[str], now: datetime) -> None:
    ids = list(dict.fromkeys(customer_ids))
    messages = sa.select(send_ledger.c.message_id).where(any_of(send_ledger.c.customer_id, ids))
    await session.execute(sa.delete(engagements).where(engagements.c.message_id.in_(messages)))
    # A suppressed address stays suppressed, but no longer says which of their messages found out.
    await session.execute(
        sa.update(address_suppressions)
        .where(address_suppressions.c.message_id.in_(messages))
        .values(message_id=None)
    )
    # Delivery reports kept during an erasure, on their messages (found by the provider's message id,
    # which the scrubbed ledger row keeps).
    await provider_reports_repo.forget_customers(session, ids)
    await session.execute(_SCRUB_LEDGER, {"ids": ids, "now": now})
    for table in (contacts, in_app_messages, preferences, consent_ledger):
        await session.execute(sa.delete(table).where(any_of(table.c.customer_id, ids)))
    await identities_repo.forget(session, ids)


def _identities_of(ids: list[str]) -> sa.ColumnElement[bool]:
    return sa.or_(any_of(customer_identities.c.customer_id, ids), any_of(customer_identities.c.identity, ids))


def _rows(result: Any) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in result]


async def export(session: AsyncSession, customer_ids: Sequence[str]) -> dict[str, Any]:
    ids = list(dict.fromkeys(customer_ids))
    ledger = sa.select(
        send_ledger.c.message_id,
        send_ledger.c.channel,
        send_ledger.c.category,
        send_ledger.c.template_id,
        send_ledger.c.state,
        send_ledger.c.reason,
        send_ledger.c.created_at,
    ).where(any_of(send_ledger.c.customer_id, ids))
    return {
        "contacts": _rows(
            await session.execute(sa.select(contacts).where(any_of(contacts.c.customer_id, ids)))
        ),
        "preferences": _rows(
            await session.execute(sa.select(preferences).where(any_of(preferences.c.customer_id, ids)))
        ),
        "consent_history": _rows(
            await session.execute(
                sa.select(consent_ledger)
                .where(any_of(consent_ledger.c.customer_id, ids))
                .order_by(consent_ledger.c.id)
            )
        ),
        "in_app_messages": _rows(
            await session.execute(
                sa.select(in_app_messages).where(any_of(in_app_messages.c.customer_id, ids))
            )
        ),
        "messages": _rows(await session.execute(ledger.order_by(send_ledger.c.created_at))),
        "identities": _rows(
            await session.execute(
                sa.select(customer_identities)
                .where(_identities_of(ids))
                .order_by(customer_identities.c.identity)
            )
        ),
    }

"""Erased customers in the notifier: tombstones (salted hashes) and suppressing what is requested later.

Kept apart from `privacy_repo` (erasure and export of what is held): this is what keeps messages
from reaching a customer after the erasure.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts import MessageRequested

ERASED_REASON = "erased"

# The request keeps no personal data (recipient, template data) once it is known to be for an erased
# customer; the row stays so a redelivered request is recognized and not sent either. A `claimed` row
# is safe to stop too: its worker's `sending` mark then fails and nothing is sent.
_SUPPRESS = sa.text(
    "UPDATE send_ledger SET state = 'suppressed', reason = :reason, next_attempt_at = NULL, "
    "request = jsonb_set(jsonb_set(request, '{recipient}', '{}'), '{data}', '{}'), updated_at = :now "
    "WHERE message_id = ANY(CAST(:ids AS text[])) AND state IN ('pending', 'claimed') "
    "RETURNING message_id"
)


def request_identities(r: MessageRequested) -> list[str]:
    """What a request is addressed by: its customer id and its recipient's email and phone."""
    return [i for i in (r.customer_id, r.recipient.email, r.recipient.phone) if i]


def addressed_to_erased(requests: Sequence[MessageRequested], erased: set[str]) -> list[MessageRequested]:
    """The requests addressed to an erased customer (`erased`: their identifiers, as
    `shared.privacy.erased_identities` gives them): by customer id, or by recipient email/phone."""
    return [r for r in requests if erased.intersection(request_identities(r))] if erased else []


async def suppress(session: AsyncSession, message_ids: Sequence[str], now: datetime) -> set[str]:
    if not message_ids:
        return set()
    rows = await session.execute(_SUPPRESS, {"ids": list(message_ids), "reason": ERASED_REASON, "now": now})
    return {r[0] for r in rows}

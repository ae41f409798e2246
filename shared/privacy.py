"""Erasure and export over clm.privacy.v1: the conventions every service follows.

- The segmenter publishes `erase_requested` / `export_requested` (key: canonical customer id) with
  every identifier the customer was known by. Each service answers once per request with
  `erase_completed` / `export_part`, its own name in `service`, event id
  `<request_id>:<service>:<action>` (so a redelivered request re-answers with the same id), emitted
  through the outbox in the same unit of work as the erasure and the inbox claim.
- An erased customer's identifiers are remembered only as salted hashes (`erasure_tombstones`), so
  later events or message requests carrying them can be recognized without keeping them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts.events import PrivacyAction, PrivacyRequest
from shared.db.engine import Statement

# The services that must confirm an erasure and answer an export.
SERVICES = ("segmenter", "ingest", "journey_engine", "notifier")


def identity_hash(salt: str, identity: str) -> str:
    return hmac.new(salt.encode(), identity.strip().encode(), hashlib.sha256).hexdigest()


def identity_hashes(salt: str, identities: Iterable[str]) -> list[str]:
    return sorted({identity_hash(salt, i) for i in identities if i})


def answer(
    request: PrivacyRequest,
    service: str,
    action: PrivacyAction,
    now: datetime,
    data: dict[str, Any] | None = None,
) -> PrivacyRequest:
    return PrivacyRequest(
        event_id=f"{request.request_id}:{service}:{action.value}",
        request_id=request.request_id,
        action=action,
        customer_id=request.customer_id,
        identities=request.identities,
        service=service,
        occurred_at=now,
        data=data or {},
    )


# Straight to asyncpg (`Statement`): every event batch runs them.
_GATE = Statement("SELECT pg_advisory_xact_lock_shared(hashtext('clm.erasure.' || current_schema()))")
_GATE_EXCLUSIVE = Statement("SELECT pg_advisory_xact_lock(hashtext('clm.erasure.' || current_schema()))")
_ERASED_AMONG = Statement(
    "SELECT identity_hash FROM erasure_tombstones WHERE identity_hash = ANY(CAST(:h AS text[]))"
)


async def erasure_gate(session: AsyncSession, *, exclusive: bool) -> None:
    """Order erasures against event processing in one schema, until the transaction ends.

    Event handlers hold it shared (they never wait on each other) from before their tombstone check
    to their commit; an erasure holds it exclusive from before it reads anything. So an event batch
    either committed before the erasure (whose delete then covers what it wrote) or checks the
    tombstones after the erasure committed; none can slip between check and erasure.
    """
    await (_GATE_EXCLUSIVE if exclusive else _GATE).execute(session)


async def add_tombstones(
    session: AsyncSession, salt: str, identities: Iterable[str], request_id: str, now: datetime
) -> None:
    hashes = identity_hashes(salt, identities)
    if hashes:
        await session.execute(
            text(
                "INSERT INTO erasure_tombstones (identity_hash, request_id, erased_at) "
                "SELECT unnest(CAST(:h AS text[])), :r, :now ON CONFLICT DO NOTHING"
            ),
            {"h": hashes, "r": request_id, "now": now},
        )


async def erased_among(session: AsyncSession, salt: str, identities: Iterable[str]) -> set[str]:
    """The given identifiers that belong to an erased customer."""
    by_hash = {identity_hash(salt, i): i for i in set(identities) if i}
    if not by_hash:
        return set()
    rows = await _ERASED_AMONG.fetch(session, {"h": list(by_hash)})
    return {by_hash[r[0]] for r in rows}

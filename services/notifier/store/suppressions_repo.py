"""Every query on `address_suppressions` (addresses a provider said do not exist), and the one read
of a batch of sends that checks it, `sms_address_optouts` and `email_address_optouts`."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.engine import Statement


@dataclass(frozen=True)
class Suppression:
    address_hash: str
    channel: str
    reason: str
    provider: str | None
    message_id: str | None
    suppressed_at: datetime


# The first bounce is kept: it says when the address stopped working, and which message found out.
_ADD = Statement(
    "INSERT INTO address_suppressions (address_hash, channel, reason, provider, message_id, suppressed_at) "
    "SELECT * FROM unnest(CAST(:keys AS text[]), CAST(:channels AS text[]), CAST(:reasons AS text[]), "
    "CAST(:providers AS text[]), CAST(:messages AS text[]), CAST(:at AS timestamptz[])) "
    "ON CONFLICT (address_hash) DO NOTHING RETURNING address_hash, channel"
)


async def add(
    target: AsyncSession | asyncpg.Connection, suppressions: Sequence[Suppression]
) -> dict[str, str]:
    """Returns the addresses newly suppressed (their keys), each with its channel."""
    if not suppressions:
        return {}
    first = {s.address_hash: s for s in reversed(suppressions)}  # an address twice: its first bounce
    # In one order (sorted): two batches naming the same addresses in other orders deadlocked.
    rows = [first[key] for key in sorted(first)]
    found = await _ADD.fetch(
        target,
        {
            "keys": [s.address_hash for s in rows],
            "channels": [s.channel for s in rows],
            "reasons": [s.reason for s in rows],
            "providers": [s.provider for s in rows],
            "messages": [s.message_id for s in rows],
            "at": [s.suppressed_at for s in rows],
        },
    )
    return {r[0]: r[1] for r in found}


_GET = Statement(
    "SELECT address_hash, channel, reason, provider, message_id, suppressed_at "
    "FROM address_suppressions WHERE address_hash = :key"
)


async def get(session: AsyncSession, address_hash: str) -> Suppression | None:
    rows = await _GET.fetch(session, {"key": address_hash})
    return Suppression(*rows[0]) if rows else None


_REMOVE = Statement("DELETE FROM address_suppressions WHERE address_hash = :key RETURNING address_hash")
_REMOVE_FOR_REASON = Statement(
    "DELETE FROM address_suppressions WHERE address_hash = :key AND reason = :reason RETURNING address_hash"
)


async def remove(session: AsyncSession, address_hash: str, *, reason: str | None = None) -> bool:
    """`reason`: only an entry suppressed for that reason (START lifts a STOP Twilio reported)."""
    if reason is None:
        return bool(await _REMOVE.fetch(session, {"key": address_hash}))
    return bool(await _REMOVE_FOR_REASON.fetch(session, {"key": address_hash, "reason": reason}))


# One round trip for a batch of sends: which of their addresses are suppressed, and which of the
# addresses their marketing goes to opted out (an SMS STOP, an email spam complaint: keys of two
# kinds that never meet, `phone_key` and `address_key`).
_BLOCKED = Statement(
    "SELECT ARRAY(SELECT address_hash FROM address_suppressions "
    "WHERE address_hash = ANY(CAST(:suppression_keys AS text[])) ORDER BY address_hash), "
    "ARRAY(SELECT reason FROM address_suppressions "
    "WHERE address_hash = ANY(CAST(:suppression_keys AS text[])) ORDER BY address_hash), "
    "ARRAY(SELECT phone_hash FROM sms_address_optouts WHERE phone_hash = ANY(CAST(:stop_keys AS text[])) "
    "UNION ALL SELECT address_hash FROM email_address_optouts "
    "WHERE address_hash = ANY(CAST(:stop_keys AS text[])))"
)


async def blocked(
    session: AsyncSession, suppression_keys: Collection[str], stop_keys: Collection[str]
) -> tuple[dict[str, str], set[str]]:
    """Of these keys: the suppressed addresses (`domain.suppression.address_key`) with their reasons,
    and the marketing addresses opted out: numbers that sent STOP (`domain.consent.phone_key`), email
    addresses a complaint named (`address_key`)."""
    if not suppression_keys and not stop_keys:
        return {}, set()
    [(suppressed, reasons, stopped)] = await _BLOCKED.fetch(
        session, {"suppression_keys": sorted(suppression_keys), "stop_keys": sorted(stop_keys)}
    )
    return dict(zip(suppressed, reasons, strict=True)), set(stopped)

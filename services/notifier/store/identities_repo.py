"""Every query on `customer_identities`: which customer an identifier (a userId, an anonymousId, a
merged-away profile's id) belongs to, as the segmenter last announced it.

A customer's own id wins over the mapping: when one customer's id is another's identifier of
another kind (an anonymousId `u1` made a customer before the userId `u1` made `user:u1`, as the
segmenter names it), `u1` is still the first customer, as in the segmenter's API. The notifier knows
a customer's own id from its contact row (`contacts`, which merges delete for merged-away ids).
The view `customer_aliases` (migration 0007) is that rule: lookups read it, links write the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.engine import Statement

# Newest announcement wins: one about a merged-away profile that arrives after the merge (another key,
# so another partition) must not take its identifiers back. Returns the identifiers that were not
# this customer's before (new, or moved from another customer): only under those can something be
# kept that is now this customer's.
_LINK = Statement(
    "WITH linked AS (INSERT INTO customer_identities (identity, customer_id, linked_at) "
    "SELECT unnest(CAST(:ids AS text[])), :cid, :at "
    "ON CONFLICT (identity) DO UPDATE SET customer_id = excluded.customer_id, linked_at = excluded.linked_at "
    "WHERE customer_identities.linked_at <= excluded.linked_at "
    "AND customer_identities.customer_id <> excluded.customer_id "
    "RETURNING identity) "
    # The `customer_aliases` rule, on the rows just written (the view cannot see them yet).
    "SELECT identity FROM linked "
    "WHERE NOT EXISTS (SELECT 1 FROM contacts c WHERE c.customer_id = linked.identity)"
)

# Serializes a link with a choice written under the same identifier (`resolve_for_write`): either the
# writer waits and then sees the link, or the link waits and then moves what the writer stored.
_LOCK = Statement(
    "SELECT pg_advisory_xact_lock(k) FROM (SELECT DISTINCT hashtextextended(i, 11) AS k "
    "FROM unnest(CAST(:ids AS text[])) AS i ORDER BY k) AS s"
)
_RESOLVE = Statement("SELECT customer_id FROM customer_aliases WHERE identity = :id")
_ALIASES = Statement("SELECT identity FROM customer_aliases WHERE customer_id = :cid ORDER BY identity")
_FORGET = Statement(
    "DELETE FROM customer_identities "
    "WHERE customer_id = ANY(CAST(:ids AS text[])) OR identity = ANY(CAST(:ids AS text[]))"
)


async def link(session: AsyncSession, customer_id: str, identities: Sequence[str], at: datetime) -> list[str]:
    """Point `identities` at `customer_id` as of `at`; returns those that newly do (not those that
    already did, nor those a newer announcement points elsewhere, nor another customer's own id):
    what is kept under them becomes this customer's."""
    ids = sorted({i for i in identities if i and i != customer_id})
    if not ids:
        return []
    await _LOCK.fetch(session, {"ids": ids})
    return [r[0] for r in await _LINK.fetch(session, {"ids": ids, "cid": customer_id, "at": at})]


async def canonical(session: AsyncSession, identifier: str) -> str:
    """The customer `identifier` belongs to; an identifier never announced is its own customer id."""
    rows = await _RESOLVE.fetch(session, {"id": identifier})
    return str(rows[0][0]) if rows else identifier


async def lock(session: AsyncSession, identifiers: Sequence[str]) -> None:
    """Hold the identifiers' write lock for the transaction (see `_LOCK`)."""
    await _LOCK.fetch(session, {"ids": sorted(set(identifiers))})


async def resolve_for_write(session: AsyncSession, identifier: str) -> str:
    """`canonical`, for a write kept under the result (a consent choice): locked against a concurrent
    `link` of the identifier, then read anew, so nothing is kept under an id just linked elsewhere."""
    await _LOCK.fetch(session, {"ids": [identifier]})
    return await canonical(session, identifier)


async def aliases(session: AsyncSession, customer_id: str) -> list[str]:
    """The other identifiers that resolve to `customer_id`."""
    return [r[0] for r in await _ALIASES.fetch(session, {"cid": customer_id})]


async def forget(session: AsyncSession, ids: Sequence[str]) -> None:
    """Erasure: every link of these customers, and these identifiers' own."""
    if ids:
        await _FORGET.execute(session, {"ids": list(dict.fromkeys(ids))})

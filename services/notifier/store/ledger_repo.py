"""The send ledger: every query on `send_ledger` and `engagements`."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifier.store.tables import engagements, send_ledger
from shared.contracts import MessageRequested
from shared.db.engine import Statement
from shared.db.retention import RetentionRule
from shared.db.unit_of_work import OUTBOX_OF_CHANGED, AnnouncedChanges

PENDING = "pending"
# Taken by a worker, no provider called yet: safe to hand back to `pending`.
CLAIMED = "claimed"
# The provider call is about to start or in flight: after a crash, its outcome is unknown.
SENDING = "sending"
FINAL_STATES = frozenset({"sent", "delivered", "failed", "suppressed", "bounced", "unknown"})


@dataclass(frozen=True)
class LedgerEntry:
    message_id: str
    request: MessageRequested
    state: str
    attempts: int
    provider: str | None
    reason: str | None
    next_attempt_at: datetime | None
    provider_message_id: str | None = None
    claim_token: str | None = None
    correlation_id: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What one attempt decided for one ledger row."""

    message_id: str
    state: str
    attempts: int
    next_attempt_at: datetime | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    reason: str | None = None
    # The claim this outcome belongs to: a claim handed back meanwhile records nothing.
    claim_token: str | None = None


def _entry(row: Mapping[Any, Any]) -> LedgerEntry:
    """From a row by column name: an asyncpg record (`Statement`) or a SQLAlchemy row's `_mapping`."""
    return LedgerEntry(
        message_id=row["message_id"],
        request=MessageRequested.model_validate(row["request"]),
        state=row["state"],
        attempts=row["attempts"],
        provider=row["provider"],
        reason=row["reason"],
        next_attempt_at=row["next_attempt_at"],
        provider_message_id=row["provider_message_id"],
        claim_token=row["claim_token"],
        correlation_id=row["correlation_id"],
    )


# The statements of every message's way through the ledger go straight to asyncpg (`Statement`).
_INSERT_NEW_SQL = (
    "INSERT INTO send_ledger (message_id, customer_id, channel, category, template_id, request, state, "
    "next_attempt_at, created_at, updated_at, correlation_id) "
    "SELECT m, c, ch, cat, t, r, 'pending', :now, :now, :now, k FROM unnest(CAST(:ids AS text[]), "
    "CAST(:customers AS text[]), CAST(:channels AS text[]), CAST(:categories AS text[]), "
    "CAST(:templates AS text[]), CAST(:requests AS jsonb[]), CAST(:correlations AS text[])) "
    "AS n(m, c, ch, cat, t, r, k) "
    "ON CONFLICT (message_id) DO NOTHING RETURNING message_id"
)
_INSERT_NEW = Statement(_INSERT_NEW_SQL)
# The same insert, reading the erasure tombstones among :hashes in the same round trip (rows with a
# NULL message id). Only after the erasure gate: the statement's snapshot must follow it.
_INSERT_NEW_READING_TOMBSTONES = Statement(
    f"WITH inserted AS ({_INSERT_NEW_SQL}) SELECT message_id, NULL AS tombstone FROM inserted "
    "UNION ALL SELECT NULL, identity_hash FROM erasure_tombstones "
    "WHERE identity_hash = ANY(CAST(:hashes AS text[]))"
)


def _insert_params(
    requests: Sequence[MessageRequested], now: datetime, correlations: Mapping[str, str] | None
) -> dict[str, Any]:
    unique = list({r.message_id: r for r in requests}.values())
    return {
        "now": now,
        "ids": [r.message_id for r in unique],
        "customers": [r.customer_id for r in unique],
        "channels": [r.channel.value for r in unique],
        "categories": [r.category.value for r in unique],
        "templates": [r.template_id for r in unique],
        "requests": [r.model_dump_json() for r in unique],
        "correlations": [(correlations or {}).get(r.message_id) for r in unique],
    }


async def insert_new(
    session: AsyncSession,
    requests: Sequence[MessageRequested],
    now: datetime,
    correlations: Mapping[str, str] | None = None,
) -> set[str]:
    """Record requests not seen before as pending, each with its correlation id (by message id);
    returns the ids that are new."""
    if not requests:
        return set()
    rows = await _INSERT_NEW.fetch(session, _insert_params(requests, now, correlations))
    return {r[0] for r in rows}


async def insert_new_reading_tombstones(
    session: AsyncSession,
    requests: Sequence[MessageRequested],
    now: datetime,
    correlations: Mapping[str, str] | None,
    hashes: Sequence[str],
) -> tuple[set[str], set[str]]:
    """`insert_new`, and which of the identity `hashes` have an erasure tombstone, in one round trip
    (the transaction must hold the erasure gate already). Returns (new ids, tombstoned hashes)."""
    if not requests:
        return set(), set()
    rows = await _INSERT_NEW_READING_TOMBSTONES.fetch(
        session, {**_insert_params(requests, now, correlations), "hashes": list(hashes)}
    )
    return {r[0] for r in rows if r[0] is not None}, {r[1] for r in rows if r[0] is None}


_CLAIM = (
    "UPDATE send_ledger SET state = 'claimed', claim_token = :token, claimed_at = :now, "
    "attempts = attempts + 1, updated_at = :now WHERE {where} "
    "RETURNING message_id, request, state, attempts, provider, reason, next_attempt_at, "
    "provider_message_id, claim_token, correlation_id"
)
# ARRAY(...) takes the due ids once, through the partial index: with `message_id IN (SELECT ...)`
# PostgreSQL chose a hash join over the whole ledger (5 ms a claim at 12k rows, growing with it).
_CLAIM_DUE = Statement(
    _CLAIM.format(
        where="message_id = ANY(ARRAY(SELECT message_id FROM send_ledger WHERE state = 'pending' "
        "AND next_attempt_at <= :now ORDER BY next_attempt_at LIMIT :limit FOR UPDATE SKIP LOCKED))"
    )
)
# Rows the caller's transaction has just inserted: primary-key probes, no scan of the due index (whose
# entries for rows already sent stay until vacuum, and each scan steps over them).
_CLAIM_NEW = Statement(
    _CLAIM.format(
        where="message_id = ANY(CAST(:ids AS text[])) AND state = 'pending' AND next_attempt_at <= :now"
    )
)


async def claim_due(session: AsyncSession, now: datetime, limit: int, token: str) -> list[LedgerEntry]:
    """Move due pending rows to `claimed` under `token` (SKIP LOCKED: parallel loops never share a row).
    No provider is called for a claimed row until `mark_sending` moved it to `sending`."""
    rows = await _CLAIM_DUE.fetch(session, {"now": now, "limit": limit, "token": token})
    return [_entry(r) for r in rows]


async def claim_new(
    session: AsyncSession, message_ids: Collection[str], now: datetime, token: str
) -> list[LedgerEntry]:
    """`claim_due` for rows this transaction inserted (`insert_new`): those still pending and due."""
    if not message_ids:
        return []
    rows = await _CLAIM_NEW.fetch(session, {"ids": list(message_ids), "now": now, "token": token})
    return [_entry(r) for r in rows]


_MARK_SENDING = Statement(
    "UPDATE send_ledger AS l SET state = 'sending', claimed_at = :now, updated_at = :now "
    "FROM unnest(CAST(:ids AS text[]), CAST(:tokens AS text[])) AS c(message_id, token) "
    "WHERE l.message_id = c.message_id AND l.state = 'claimed' AND l.claim_token = c.token "
    "RETURNING l.message_id"
)


async def mark_sending(
    target: AsyncSession | asyncpg.Connection, claims: Sequence[tuple[str, str]], now: datetime
) -> set[str]:
    """`claimed` -> `sending` for the (message id, claim token) pairs still owned; returns those ids.
    The caller commits this before calling the provider (one statement: on a connection outside a
    transaction, it commits on its own); a row not returned must not be sent."""
    if not claims:
        return set()
    rows = await _MARK_SENDING.fetch(
        target, {"now": now, "ids": [c[0] for c in claims], "tokens": [c[1] for c in claims]}
    )
    return {r[0] for r in rows}


_RECORD_SQL = (
    "UPDATE send_ledger AS l SET state = o.state, attempts = o.attempts, next_attempt_at = o.next_at, "
    "provider = COALESCE(o.provider, l.provider), "
    "provider_message_id = COALESCE(o.pmid, l.provider_message_id), "
    "reason = o.reason, claimed_at = NULL, claim_token = NULL, updated_at = :now "
    "FROM unnest(CAST(:ids AS text[]), CAST(:states AS text[]), CAST(:attempts AS int[]), "
    "CAST(:next_ats AS timestamptz[]), CAST(:providers AS text[]), CAST(:pmids AS text[]), "
    "CAST(:reasons AS text[]), CAST(:tokens AS text[])) "
    "AS o(message_id, state, attempts, next_at, provider, pmid, reason, token) "
    "WHERE l.message_id = o.message_id AND l.state IN ('claimed', 'sending') "
    "AND l.claim_token IS NOT DISTINCT FROM o.token "
    "RETURNING l.message_id"
)
_RECORD = Statement(_RECORD_SQL)
# The outcomes and the statuses announcing them in one statement, committing on its own: the statuses
# of the rows it wrote only (`AnnouncedChanges`).
_RECORD_ANNOUNCING = Statement(
    f"WITH recorded AS ({_RECORD_SQL}), "
    f"announced AS ({OUTBOX_OF_CHANGED.format(changed='recorded', column='message_id')}) "
    "SELECT message_id FROM recorded"
)


def _record_params(outcomes: Sequence[Outcome], now: datetime) -> dict[str, Any]:
    return {
        "now": now,
        "ids": [o.message_id for o in outcomes],
        "states": [o.state for o in outcomes],
        "attempts": [o.attempts for o in outcomes],
        "next_ats": [o.next_attempt_at for o in outcomes],
        "providers": [o.provider for o in outcomes],
        "pmids": [o.provider_message_id for o in outcomes],
        "reasons": [o.reason for o in outcomes],
        "tokens": [o.claim_token for o in outcomes],
    }


async def record_outcomes(session: AsyncSession, outcomes: Sequence[Outcome], now: datetime) -> set[str]:
    """Write outcomes of rows still held by the outcome's claim; returns the ids written (statuses are
    emitted for those only: a claim handed back or resolved meanwhile says nothing)."""
    if not outcomes:
        return set()
    rows = await _RECORD.fetch(session, _record_params(outcomes, now))
    return {r[0] for r in rows}


async def record_outcomes_announcing(
    conn: asyncpg.Connection, outcomes: Sequence[Outcome], announced: AnnouncedChanges, now: datetime
) -> set[str]:
    """`record_outcomes` and the outbox rows of `announced` (emitted for their outcome's message id)
    in one statement, on a connection outside any transaction (`driver_autocommit`): the rows written
    and their statuses commit together. Returns the ids written."""
    if not outcomes:
        return set()
    rows = await _RECORD_ANNOUNCING.fetch(conn, {**_record_params(outcomes, now), **announced.params()})
    return {r[0] for r in rows}


_HAND_BACK = sa.text(
    "UPDATE send_ledger AS l SET state = 'pending', attempts = GREATEST(l.attempts - 1, 0), "
    "next_attempt_at = :now, claimed_at = NULL, claim_token = NULL, updated_at = :now "
    "FROM unnest(CAST(:ids AS text[]), CAST(:tokens AS text[])) AS c(message_id, token) "
    "WHERE l.message_id = c.message_id AND l.state = 'claimed' AND l.claim_token = c.token"
)


async def hand_back(session: AsyncSession, claims: Sequence[tuple[str, str]], now: datetime) -> None:
    """Give claimed rows (never handed to a provider) back to `pending`, the attempt not counted."""
    if claims:
        await session.execute(
            _HAND_BACK, {"now": now, "ids": [c[0] for c in claims], "tokens": [c[1] for c in claims]}
        )


_HAND_BACK_STALE = sa.text(
    "UPDATE send_ledger SET state = 'pending', attempts = GREATEST(attempts - 1, 0), "
    "next_attempt_at = :now, claimed_at = NULL, claim_token = NULL, updated_at = :now "
    "WHERE state = 'claimed' AND claimed_at < :before RETURNING message_id"
)


async def hand_back_stale_claims(session: AsyncSession, claimed_before: datetime, now: datetime) -> int:
    """Claims a dead (or stuck) worker left before calling any provider: safe to send again. The old
    claim's token no longer matches, so its worker cannot move the row to `sending` any more."""
    result = await session.execute(_HAND_BACK_STALE, {"now": now, "before": claimed_before})
    return len(result.all())


async def stale_sending(
    session: AsyncSession, started_before: datetime, limit: int = 500
) -> list[LedgerEntry]:
    """Rows a dead process left mid-call: their outcome is unknown."""
    stmt = (
        sa.select(send_ledger)
        .where(send_ledger.c.state == SENDING, send_ledger.c.claimed_at < started_before)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [_entry(r._mapping) for r in await session.execute(stmt)]


async def get(session: AsyncSession, message_id: str) -> LedgerEntry | None:
    row = (
        await session.execute(sa.select(send_ledger).where(send_ledger.c.message_id == message_id))
    ).first()
    return _entry(row._mapping) if row else None


async def by_provider_message_id(session: AsyncSession, provider_message_id: str) -> LedgerEntry | None:
    row = (
        await session.execute(
            sa.select(send_ledger).where(send_ledger.c.provider_message_id == provider_message_id).limit(1)
        )
    ).first()
    return _entry(row._mapping) if row else None


async def by_provider_message_ids(
    session: AsyncSession, provider_message_ids: Collection[str]
) -> dict[str, LedgerEntry]:
    """The ledger entries of these provider message ids (those found), by that id."""
    if not provider_message_ids:
        return {}
    rows = await session.execute(
        sa.select(send_ledger).where(send_ledger.c.provider_message_id.in_(sorted(provider_message_ids)))
    )
    found: dict[str, LedgerEntry] = {}
    for row in rows:
        found.setdefault(row.provider_message_id, _entry(row._mapping))
    return found


async def latest_marketing_delivered(
    session: AsyncSession, customer_ids: Sequence[str], channel: str
) -> LedgerEntry | None:
    """The customer's latest marketing message on `channel` that reached the provider (sent or
    delivered): what a spam complaint or an SMS STOP is about. `customer_ids`: every identifier of
    the customer (a message asked for under a userId is kept under it), as `history` takes them."""
    row = (
        await session.execute(
            sa.select(send_ledger)
            .where(
                send_ledger.c.customer_id.in_(list(customer_ids)),
                send_ledger.c.channel == channel,
                send_ledger.c.category == "marketing",
                send_ledger.c.state.in_(("sent", "delivered")),
            )
            .order_by(send_ledger.c.created_at.desc())
            .limit(1)
        )
    ).first()
    return _entry(row._mapping) if row else None


async def record_engagement(
    session: AsyncSession, message_id: str, kind: str, detail: str, at: datetime
) -> bool:
    """True the first time this (message, kind, detail) happens; later repeats emit nothing."""
    stmt = (
        insert(engagements)
        .values(message_id=message_id, kind=kind, detail=detail, occurred_at=at)
        .on_conflict_do_nothing()
        .returning(engagements.c.message_id)
    )
    return (await session.execute(stmt)).first() is not None


def ledger_rule(days: float) -> RetentionRule:
    """Decided messages (never one still pending, claimed or sending) and their engagements."""
    return RetentionRule(
        "send_ledger",
        days,
        "WITH old AS (SELECT message_id FROM send_ledger WHERE created_at < :cutoff "
        "AND state NOT IN ('pending', 'claimed', 'sending') ORDER BY created_at LIMIT :batch), "
        "gone AS (DELETE FROM engagements WHERE message_id IN (SELECT message_id FROM old)) "
        "DELETE FROM send_ledger WHERE message_id IN (SELECT message_id FROM old) RETURNING 1",
    )


# Failed messages back to `pending`, their attempts from zero: an operator's retry after an outage
# outlasted the retries, or a fixed template. Never `unknown` ones (a provider may have sent them:
# at most once) nor an erased customer's (emptied of their data).
_REQUEUE = Statement(
    "UPDATE send_ledger SET state = 'pending', attempts = 0, next_attempt_at = :now, reason = NULL, "
    "claim_token = NULL, claimed_at = NULL, updated_at = :now "
    "WHERE message_id IN (SELECT message_id FROM send_ledger WHERE state = 'failed' "
    "AND reason IS DISTINCT FROM 'customer erased' "
    "AND (CAST(:ids AS text[]) IS NULL OR message_id = ANY(CAST(:ids AS text[]))) "
    "AND created_at >= :since AND created_at < :until "
    "AND (CAST(:template AS text) IS NULL OR template_id = :template) "
    "AND (CAST(:journey AS text) IS NULL OR request->>'journey_id' = :journey) "
    "AND (CAST(:reason AS text) IS NULL OR strpos(reason, :reason) > 0) "
    "ORDER BY created_at LIMIT :limit) "
    "RETURNING message_id"
)


async def requeue_failed(
    session: AsyncSession,
    now: datetime,
    *,
    message_ids: Sequence[str] | None,
    since: datetime,
    until: datetime,
    template_id: str | None,
    journey_id: str | None,
    reason_contains: str | None,
    limit: int,
) -> list[str]:
    """Failed messages matching every filter given, back to `pending`; their ids."""
    rows = await _REQUEUE.fetch(
        session,
        {
            "now": now,
            "ids": list(message_ids) if message_ids is not None else None,
            "since": since,
            "until": until,
            "template": template_id,
            "journey": journey_id,
            "reason": reason_contains,
            "limit": limit,
        },
    )
    return [r[0] for r in rows]


# A customer's messages, newest first, with what became of them (`send_ledger_customer` index).
_HISTORY = Statement(
    "SELECT l.message_id, l.customer_id, l.channel, l.category, l.template_id, "
    "l.request->>'journey_id' AS journey_id, l.request->>'node_id' AS node_id, l.state, l.reason, "
    "l.attempts, l.created_at, l.updated_at, "
    "coalesce(g.opened, false) AS opened, coalesce(g.clicked, false) AS clicked, "
    "coalesce(g.unsubscribed, false) AS unsubscribed "
    "FROM send_ledger l LEFT JOIN LATERAL (SELECT bool_or(e.kind = 'opened') AS opened, "
    "bool_or(e.kind = 'clicked') AS clicked, bool_or(e.kind = 'unsubscribed') AS unsubscribed "
    "FROM engagements e WHERE e.message_id = l.message_id) g ON true "
    "WHERE l.customer_id = ANY(CAST(:ids AS text[])) "
    # Keyset (time, id): a batch's messages share their request time.
    "AND (CAST(:bt AS timestamptz) IS NULL OR (l.created_at, l.message_id) < (:bt, :bm)) "
    "ORDER BY l.created_at DESC, l.message_id DESC LIMIT :limit"
)


async def history(
    session: AsyncSession, customer_ids: Sequence[str], before: tuple[datetime, str] | None, limit: int
) -> list[dict[str, Any]]:
    """Messages asked for under any of `customer_ids` (one customer's identifiers), newest first,
    those before the (request time, message id) `before`."""
    bt, bm = before if before is not None else (None, None)
    rows = await _HISTORY.fetch(session, {"ids": list(customer_ids), "bt": bt, "bm": bm, "limit": limit})
    return [dict(r) for r in rows]

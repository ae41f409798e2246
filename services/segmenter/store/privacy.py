"""Every query behind erasure, export and the privacy receipt in the segmenter.

`CUSTOMER_TABLES` is the one list of tables that hold a customer's data, with the column naming the
customer: erasure deletes from each, export reads each. A later feature adds its tables here; a
table whose migration has not run (an optional feature) is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts.events import PrivacyAction
from shared.db import privacy_tables
from shared.privacy import merge_chunks, merge_parts

# (table, customer column, order for export). Profile last: the others reference its id.
CUSTOMER_TABLES: tuple[tuple[str, str, str], ...] = (
    ("events", "customer_id", "timestamp, seq"),
    ("event_counts", "customer_id", "event"),
    ("memberships", "customer_id", "segment_id"),
    ("segment_timers", "customer_id", "segment_id"),
    ("segment_timers_parked", "customer_id", "segment_id"),
    ("merges", "canonical_id", "id"),
    ("identities", "customer_id", "kind, value"),
    # Recommendations (issue 9), lifecycle (issue 7): present once their migrations ran.
    ("customer_products", "customer_id", "kind, product_id"),
    ("customer_recommendations", "customer_id", "customer_id"),
    ("lifecycle_stage_history", "customer_id", "id"),
    ("survey_responses", "customer_id", "message_id"),
    ("customer_messages", "customer_id", "message_id"),
    ("customers", "customer_id", "customer_id"),
)
# The segmenter's own part never travels on Kafka (it is stored with the request), but it is one JSONB
# row and part of one HTTP document: the timeline in it is capped to the newest events (2,000 of at
# most ingest's 32 KB each), and a capped timeline says so (`events_truncated`: exported and total).
EXPORT_EVENTS_LIMIT = 2000

metadata = sa.MetaData()
audit_log = privacy_tables.define_audit_log(metadata)
erasure_tombstones = privacy_tables.define_tombstones(metadata)

privacy_requests = sa.Table(
    "privacy_requests",
    metadata,
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),  # erase | export
    sa.Column("customer_id", sa.Text, nullable=False),
    # Salted hashes only: the receipt outlives the identifiers it was about.
    sa.Column("identity_hashes", sa.ARRAY(sa.Text), nullable=False),
    sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
)

# One row per (request, service, answer): erase_completed confirmations and export parts.
privacy_answers = sa.Table(
    "privacy_answers",
    metadata,
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column("service", sa.Text, primary_key=True),
    sa.Column("action", sa.Text, primary_key=True),
    sa.Column("data", JSONB, nullable=False, server_default="{}"),
    sa.Column("answered_at", sa.DateTime(timezone=True), nullable=False),
)

# The pieces of answers that came in several messages, until the last one arrives: then merged into
# `privacy_answers` and deleted (revisions 0009_privacy_answer_chunks, 0012_privacy_request_parts).
# A piece is one chunk (`shared.privacy.answers`) of the answer to one part of the request (`parts` > 1
# when the request named too many identifiers for one message). The chunks of one part's answer share
# `answered_at` (the answer's occurred_at) and `chunks`.
privacy_answer_chunks = sa.Table(
    "privacy_answer_chunks",
    metadata,
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column("service", sa.Text, primary_key=True),
    sa.Column("action", sa.Text, primary_key=True),
    sa.Column("parts", sa.Integer, primary_key=True, server_default="1"),
    sa.Column("part", sa.Integer, primary_key=True, server_default="0"),
    sa.Column("answered_at", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("chunks", sa.Integer, primary_key=True),
    sa.Column("chunk", sa.Integer, primary_key=True),
    sa.Column("data", JSONB, nullable=False, server_default="{}"),
)


async def _existing(session: AsyncSession) -> list[tuple[str, str, str]]:
    names = [t for t, _, _ in CUSTOMER_TABLES]
    rows = await session.execute(
        text("SELECT n FROM unnest(CAST(:n AS text[])) AS n WHERE to_regclass(n) IS NOT NULL"), {"n": names}
    )
    present = {r[0] for r in rows}
    return [t for t in CUSTOMER_TABLES if t[0] in present]


async def lock_customer(session: AsyncSession, customer_id: str) -> bool:
    """Lock the profile row (the events consumer locks the same rows): False if it is gone."""
    row = await session.execute(
        text("SELECT 1 FROM customers WHERE customer_id = :c FOR UPDATE"), {"c": customer_id}
    )
    return row.first() is not None


async def known_identifiers(session: AsyncSession, customer_id: str) -> list[str]:
    """Every identifier of the customer: canonical id, userIds, anonymousIds, former ids, email."""
    rows = await session.execute(
        text(
            "SELECT value FROM identities WHERE customer_id = :c "
            "UNION SELECT traits ->> 'email' FROM customers WHERE customer_id = :c AND traits ? 'email' "
            "UNION SELECT from_id FROM merges WHERE canonical_id = :c"
        ),
        {"c": customer_id},
    )
    return sorted({customer_id, *(str(r[0]) for r in rows if r[0])})


async def own_customer_ids(session: AsyncSession, customer_id: str) -> list[str]:
    """The ids the customer's rows are stored under: its canonical id and the ids of the profiles merged
    into it. Never its identifier values: customer `user:7` with userId `7` is not customer `7`. A
    merged-away id that names a live customer again is that customer's."""
    rows = await session.execute(
        text(
            "SELECT m.id FROM (SELECT value FROM identities WHERE customer_id = :c AND kind = 'merged' "
            "UNION SELECT from_id FROM merges WHERE canonical_id = :c) AS m(id) "
            "WHERE NOT EXISTS (SELECT 1 FROM customers x WHERE x.customer_id = m.id)"
        ),
        {"c": customer_id},
    )
    return sorted({customer_id, *(str(r[0]) for r in rows)})


async def erase_customer(session: AsyncSession, customer_ids: Sequence[str]) -> dict[str, int]:
    """Delete the rows of these customer ids (`own_customer_ids`) from every per-customer table;
    returns the row counts."""
    deleted: dict[str, int] = {}
    for table, column, _ in await _existing(session):
        result = await session.execute(
            text(f"DELETE FROM {table} WHERE {column} = ANY(CAST(:ids AS text[]))"),
            {"ids": list(customer_ids)},
        )
        deleted[table] = int(getattr(result, "rowcount", 0) or 0)
    # Earlier exports of the customer are their data too (every service's part, and the chunks of
    # one still arriving): the request rows stay as receipts, their contents go.
    exports = (
        "SELECT request_id FROM privacy_requests "
        "WHERE kind = 'export' AND customer_id = ANY(CAST(:ids AS text[]))"
    )
    for table in ("privacy_answer_chunks", "privacy_answers"):
        result = await session.execute(
            text(f"DELETE FROM {table} WHERE request_id IN ({exports})"), {"ids": list(customer_ids)}
        )
        deleted[table] = int(getattr(result, "rowcount", 0) or 0)
    return deleted


async def export_customer(session: AsyncSession, customer_ids: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for table, column, order in await _existing(session):
        limit = f" LIMIT {EXPORT_EVENTS_LIMIT}" if table == "events" else ""
        desc = " DESC" if table == "events" else ""
        order_sql = ", ".join(f"{c.strip()}{desc}" for c in order.split(","))
        rows = await session.execute(
            text(
                f"SELECT * FROM {table} WHERE {column} = ANY(CAST(:ids AS text[])) "
                f"ORDER BY {order_sql}{limit}"
            ),
            {"ids": list(customer_ids)},
        )
        # JSON round trip: datetimes and decimals become strings, so the part fits the contract.
        out[table] = orjson.loads(orjson.dumps([dict(r._mapping) for r in rows], default=str))
        if table == "events" and len(out[table]) >= EXPORT_EVENTS_LIMIT:
            total = await session.scalar(
                text(f"SELECT count(*) FROM {table} WHERE {column} = ANY(CAST(:ids AS text[]))"),
                {"ids": list(customer_ids)},
            )
            if total and total > EXPORT_EVENTS_LIMIT:
                out["events_truncated"] = {"exported": EXPORT_EVENTS_LIMIT, "total": int(total)}
    return out


async def insert_request(
    session: AsyncSession, request_id: str, kind: str, customer_id: str, hashes: list[str], now: datetime
) -> None:
    await session.execute(
        sa.insert(privacy_requests).values(
            request_id=request_id,
            kind=kind,
            customer_id=customer_id,
            identity_hashes=hashes,
            requested_at=now,
        )
    )


async def record_answer(
    session: AsyncSession, request_id: str, service: str, action: str, data: dict[str, Any], at: datetime
) -> None:
    stmt = (
        pg_insert(privacy_answers)
        .values(request_id=request_id, service=service, action=action, data=data, answered_at=at)
        .on_conflict_do_nothing()
    )
    await session.execute(stmt)


async def record_piece(
    session: AsyncSession,
    request_id: str,
    service: str,
    action: str,
    data: dict[str, Any],
    at: datetime,
    *,
    chunk: int = 0,
    chunks: int = 1,
    part: int = 0,
    parts: int = 1,
) -> bool:
    """Keep one piece of a service's answer (chunk `chunk` of its answer to request part `part`); once
    it answered every part, each in full, record the answer (chunks merged in order, parts with
    `shared.privacy.merge_parts`, at the latest part's time) and drop the pieces. True if the answer
    is now recorded. A piece of an answer already recorded (redelivered, or of a later re-answer) is
    dropped; the chunks of one part's answer are told from another answer's by their time and count."""
    # Two pieces of one answer handled at once (a rebalance) must not each miss the other's.
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtext('clm.privacy.answer'), hashtext(:k))"),
        {"k": f"{request_id}:{service}:{action}"},
    )
    done = await session.scalar(
        sa.select(sa.literal(1)).where(
            privacy_answers.c.request_id == request_id,
            privacy_answers.c.service == service,
            privacy_answers.c.action == action,
        )
    )
    t = privacy_answer_chunks.c
    if done:  # pieces of an answer recorded another way (an older replica's whole answer) go too
        await session.execute(
            sa.delete(privacy_answer_chunks).where(
                t.request_id == request_id, t.service == service, t.action == action
            )
        )
        return True
    this_answer = (t.request_id == request_id, t.service == service, t.action == action, t.parts == parts)
    await session.execute(
        pg_insert(privacy_answer_chunks)
        .values(
            request_id=request_id,
            service=service,
            action=action,
            parts=parts,
            part=part,
            answered_at=at,
            chunks=chunks,
            chunk=chunk,
            data=data,
        )
        .on_conflict_do_nothing()
    )
    # Per part, the earliest answer of which every chunk is here.
    complete = await session.execute(
        sa.select(t.part, t.answered_at, t.chunks)
        .where(*this_answer)
        .group_by(t.part, t.answered_at, t.chunks)
        .having(sa.func.count() == t.chunks)
        .order_by(t.part, t.answered_at.desc())
    )
    answered = {p: (when, n) for p, when, n in complete}  # the earliest wins: ordered last
    if len(answered) != parts:
        return False
    merged: list[dict[str, Any]] = []
    for p in range(parts):
        when, n = answered[p]
        pieces = await session.execute(
            sa.select(t.data)
            .where(*this_answer, t.part == p, t.answered_at == when, t.chunks == n)
            .order_by(t.chunk)
        )
        merged.append(merge_chunks([piece[0] for piece in pieces]))
    data = merged[0] if parts == 1 else merge_parts(PrivacyAction(action), merged)
    await record_answer(
        session, request_id, service, action, data, max(when for when, _ in answered.values())
    )
    await session.execute(
        sa.delete(privacy_answer_chunks).where(
            privacy_answer_chunks.c.request_id == request_id,
            privacy_answer_chunks.c.service == service,
            privacy_answer_chunks.c.action == action,
        )
    )
    return True


async def answered_services(session: AsyncSession, request_id: str, action: str) -> set[str]:
    """The services whose (whole) answer is recorded: what the export waits on, without its data."""
    rows = await session.execute(
        sa.select(privacy_answers.c.service).where(
            privacy_answers.c.request_id == request_id, privacy_answers.c.action == action
        )
    )
    return {r[0] for r in rows}


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    kind: str
    customer_id: str
    requested_at: datetime
    answers: dict[str, tuple[datetime, dict[str, Any]]]  # service -> (answered_at, data)


async def read_request(session: AsyncSession, request_id: str) -> RequestRecord | None:
    row = (
        await session.execute(sa.select(privacy_requests).where(privacy_requests.c.request_id == request_id))
    ).first()
    if row is None:
        return None
    action = "erase_completed" if row.kind == "erase" else "export_part"
    answers = await session.execute(
        sa.select(privacy_answers.c.service, privacy_answers.c.answered_at, privacy_answers.c.data).where(
            privacy_answers.c.request_id == request_id, privacy_answers.c.action == action
        )
    )
    return RequestRecord(
        row.request_id,
        row.kind,
        row.customer_id,
        row.requested_at,
        {a.service: (a.answered_at, a.data) for a in answers},
    )

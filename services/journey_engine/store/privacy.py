"""Every query behind erasure and export of one customer's data in the journey engine.

The customer is found by any identifier the segmenter sent (canonical id, userIds, anonymousIds,
former ids, email): the projection's identity table maps them to the ids instances are keyed by.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# (table, customer column), children before parents; timers (due or parked) go by their instance.
CUSTOMER_TABLES: tuple[tuple[str, str], ...] = (
    ("goal_windows", "customer_id"),
    ("instances", "customer_id"),
    ("enrolments", "customer_id"),
    ("message_log", "customer_id"),
    ("segment_members", "customer_id"),
    ("customer_recommendations", "customer_id"),
    ("customer_identities", "customer_id"),
    ("customers", "customer_id"),
)


async def customer_ids(session: AsyncSession, identities: Sequence[str]) -> list[str]:
    ids = list(dict.fromkeys(i for i in identities if i))
    rows = await session.execute(
        text(
            "SELECT customer_id FROM customer_identities WHERE identity = ANY(CAST(:ids AS text[])) "
            "UNION SELECT unnest(CAST(:ids AS text[]))"
        ),
        {"ids": ids},
    )
    return sorted({str(r[0]) for r in rows})


async def identities_of(session: AsyncSession, cid: str) -> list[str]:
    """The identities the engine knows the customer by, their merged-away profiles' ids among them."""
    rows = await session.execute(
        text(
            "SELECT identity FROM customer_identities WHERE customer_id = :c "
            "UNION SELECT customer_id FROM merged_profiles WHERE merged_into = :c"
        ),
        {"c": cid},
    )
    return sorted(str(r[0]) for r in rows)


async def erase(session: AsyncSession, cids: Sequence[str]) -> dict[str, int]:
    params = {"ids": list(cids)}
    # Lock the instances first, in id order: the same order the engine's steps and timers lock them.
    await session.execute(
        text("SELECT id FROM instances WHERE customer_id = ANY(CAST(:ids AS text[])) ORDER BY id FOR UPDATE"),
        params,
    )
    deleted: dict[str, int] = {}
    # Parked timers too: their error may quote the customer's data.
    for table in ("timers", "timers_parked"):
        result = await session.execute(
            text(
                f"DELETE FROM {table} WHERE instance_id IN "
                "(SELECT id FROM instances WHERE customer_id = ANY(CAST(:ids AS text[])))"
            ),
            params,
        )
        deleted[table] = int(getattr(result, "rowcount", 0) or 0)
    for table, column in CUSTOMER_TABLES:
        result = await session.execute(
            text(f"DELETE FROM {table} WHERE {column} = ANY(CAST(:ids AS text[]))"), params
        )
        deleted[table] = int(getattr(result, "rowcount", 0) or 0)
    await session.execute(
        text("DELETE FROM customer_identities WHERE identity = ANY(CAST(:ids AS text[]))"), params
    )
    # Their merged-away profiles (found among the identities) and merges into them.
    result = await session.execute(text(_MERGED_OF), params)
    deleted["merged_profiles"] = len(result.all())
    return deleted


_MERGED_OF = (
    "DELETE FROM merged_profiles WHERE customer_id = ANY(CAST(:ids AS text[])) "
    "OR merged_into = ANY(CAST(:ids AS text[])) RETURNING customer_id"
)


async def export(session: AsyncSession, cids: Sequence[str]) -> dict[str, Any]:
    params = {"ids": list(cids)}
    out: dict[str, Any] = {}
    for table, column in CUSTOMER_TABLES:
        rows = await session.execute(
            text(f"SELECT * FROM {table} WHERE {column} = ANY(CAST(:ids AS text[]))"), params
        )
        out[table] = [dict(r._mapping) for r in rows]
    timers = await session.execute(
        text(
            "SELECT t.instance_id, t.seq, t.due_at FROM timers t JOIN instances i ON i.id = t.instance_id "
            "WHERE i.customer_id = ANY(CAST(:ids AS text[])) ORDER BY t.due_at"
        ),
        params,
    )
    out["timers"] = [dict(r._mapping) for r in timers]
    parked = await session.execute(
        text(
            "SELECT t.instance_id, t.seq, t.due_at, t.parked_at, t.error FROM timers_parked t "
            "JOIN instances i ON i.id = t.instance_id WHERE i.customer_id = ANY(CAST(:ids AS text[])) "
            "ORDER BY t.due_at"
        ),
        params,
    )
    out["timers_parked"] = [dict(r._mapping) for r in parked]
    merged = await session.execute(
        text(
            "SELECT customer_id, merged_into, merged_at FROM merged_profiles "
            "WHERE customer_id = ANY(CAST(:ids AS text[])) OR merged_into = ANY(CAST(:ids AS text[]))"
        ),
        params,
    )
    out["merged_profiles"] = [dict(r._mapping) for r in merged]
    # JSON round trip: datetimes become strings, so the part fits the contract's JSON object.
    parsed: dict[str, Any] = orjson.loads(orjson.dumps(out, default=str))
    return parsed

"""Every SQL query of the lifecycle feature: order aggregates, lifecycle columns, stage history, fitted
models, the stage policy, survey answers, message engagement, and the KPI inputs.

Set-based: one statement for a batch's customers or a chunk of the base (unnest arrays).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.segmenter.domain.lifecycle.tracking import CustomerInputs, OrderAggregate
from services.segmenter.domain.profile import MAX_ORDER_AMOUNT
from shared.db.engine import Statement, json_rows, rows_from_json

# `order_revenue` of domain/profile.py in SQL: `revenue`, else `total`, numbers or numeric strings.
_NUM = r"'^[ \t]*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9][0-9]?[0-9]?)?[ \t]*$'"


def _amount(key: str) -> tuple[str, str]:
    p = f"properties -> '{key}'"
    s = f"properties ->> '{key}'"
    # Compared as numeric (which holds any such text: an event is at most 32 KB, an exponent 3 digits)
    # so that an amount past the bound is skipped, never a float8 overflow. The inner CASE orders the
    # evaluation: the cast only runs on a number or a numeric string.
    numeric = f"jsonb_typeof({p}) = 'number' OR (jsonb_typeof({p}) = 'string' AND {s} ~ {_NUM})"
    within = f"CASE WHEN {numeric} THEN abs(({s})::numeric) <= {MAX_ORDER_AMOUNT:.0f} ELSE false END"
    return (f"WHEN {within} THEN ({s})::float8 ", s)


ORDER_AMOUNT_SQL = "CASE " + _amount("revenue")[0] + _amount("total")[0] + "ELSE 0 END"

_ORDER_AGGREGATES = (
    "WITH o AS (SELECT customer_id, timestamp AS ts, (timestamp AT TIME ZONE 'UTC')::date AS d, "
    f"{ORDER_AMOUNT_SQL} AS amount FROM events WHERE {{where}} AND event = 'Order Completed' "
    "AND timestamp <= :now), "
    "per_day AS (SELECT customer_id, d, sum(amount) AS amount, min(ts) AS first_ts, max(ts) AS last_ts, "
    "count(*) FILTER (WHERE ts > :recent) AS recent, "
    "count(*) FILTER (WHERE ts <= :recent AND ts > :previous) AS previous FROM o GROUP BY 1, 2) "
    "SELECT customer_id, count(*) AS days, min(d) - date '1970-01-01' AS first_date, "
    "max(d) - date '1970-01-01' AS last_date, extract(epoch FROM min(first_ts)) / 86400 AS first_at, "
    "extract(epoch FROM max(last_ts)) / 86400 AS last_at, (array_agg(amount ORDER BY d))[1] AS first_amount, "
    "sum(amount) AS total_amount, sum(recent) AS recent, sum(previous) AS previous "
    "FROM per_day GROUP BY customer_id"
)


def _aggregate(r: Mapping[Any, Any]) -> OrderAggregate:
    """From a row by column name: an asyncpg record (`Statement`) or a SQLAlchemy row's `_mapping`."""
    return OrderAggregate(
        order_days=int(r["days"]),
        first_date=int(r["first_date"]),
        last_date=int(r["last_date"]),
        first_at=float(r["first_at"]),
        last_at=float(r["last_at"]),
        first_day_amount=float(r["first_amount"]),
        total_amount=float(r["total_amount"]),
        orders_recent=int(r["recent"]),
        orders_previous=int(r["previous"]),
    )


# The statements of every event batch go straight to asyncpg (`Statement`).
_ORDER_AGGREGATES_OF = Statement(_ORDER_AGGREGATES.format(where="customer_id = ANY(CAST(:ids AS text[]))"))


def _window(now: datetime, window_days: int) -> dict[str, Any]:
    return {
        "now": now,
        "recent": now - timedelta(days=window_days),
        "previous": now - timedelta(days=2 * window_days),
    }


async def order_aggregates(
    session: AsyncSession, customer_ids: Iterable[str], now: datetime, window_days: int
) -> dict[str, OrderAggregate]:
    ids = sorted(set(customer_ids))
    if not ids:
        return {}
    rows = await _ORDER_AGGREGATES_OF.fetch(session, {"ids": ids, **_window(now, window_days)})
    return {r["customer_id"]: _aggregate(r) for r in rows}


@dataclass(frozen=True)
class BaseRow:
    inputs: CustomerInputs
    stage: str | None
    event_count: int  # a guard: the write-back skips customers whose profile changed since


async def base_chunk(
    session: AsyncSession, after: str | None, limit: int, now: datetime, window_days: int
) -> tuple[list[BaseRow], dict[str, OrderAggregate]]:
    """A keyset chunk of the base (by customer id) with its order aggregates, in two statements."""
    rows = (
        await session.execute(
            text(
                "SELECT customer_id, orders_count, revenue, first_seen, nps_score, csat_score, "
                "lifecycle_stage, "
                "event_count FROM customers WHERE (CAST(:after AS text) IS NULL OR customer_id > :after) "
                "ORDER BY customer_id LIMIT :limit"
            ),
            {"after": after, "limit": limit},
        )
    ).all()
    out = [
        BaseRow(
            CustomerInputs(
                r.customer_id, r.orders_count, float(r.revenue), r.first_seen, r.nps_score, r.csat_score
            ),
            r.lifecycle_stage,
            r.event_count,
        )
        for r in rows
    ]
    if not out:
        return [], {}
    aggregates = await session.execute(
        text(
            _ORDER_AGGREGATES.format(
                where="customer_id >= :lo AND customer_id <= :hi",
            )
        ),
        {"lo": out[0].inputs.customer_id, "hi": out[-1].inputs.customer_id, **_window(now, window_days)},
    )
    return out, {r.customer_id: _aggregate(r._mapping) for r in aggregates}


# --------------------------------------------------------------------------- writing lifecycle columns

_METRIC_COLUMNS = ("p_alive", "churn_risk", "expected_orders", "predicted_clv")
_RFM_COLUMNS = ("rfm_r", "rfm_f", "rfm_m", "rfm_score")


@dataclass(frozen=True)
class SurveyRow:
    message_id: str
    customer_id: str
    survey_type: str
    score: int
    comment: str | None
    survey_id: str | None
    answered_at: datetime


@dataclass(frozen=True)
class StageChange:
    customer_id: str
    from_stage: str | None
    to_stage: str
    traits: dict[str, Any] | None = None  # the profile's traits (refit announcements carry them)
    # When the profile (traits, identities) last changed, read with the traits under the row lock:
    # what a refit announcement is dated by.
    as_of: datetime | None = None


# An event batch's lifecycle writes, as fragments of the batch's profile write
# (`store.profiles.save_profiles`): one UPDATE of each customer row for both, not two.
# (column, SQL type) of the lifecycle columns the event path writes, in `EventPathWrite.values`'
# order.
_EVENT_PATH_COLUMNS = (
    ("lifecycle_stage", "text"),
    ("lifecycle_stage_since", "timestamptz"),
    ("p_alive", "float8"),
    ("churn_risk", "float8"),
    ("expected_orders", "float8"),
    ("predicted_clv", "float8"),
    ("rfm_r", "int"),
    ("rfm_f", "int"),
    ("rfm_m", "int"),
    ("rfm_score", "int"),
    ("nps_score", "int"),
    ("nps_category", "text"),
    ("nps_at", "timestamptz"),
    ("csat_score", "int"),
    ("csat_at", "timestamptz"),
)
# The new values of the customers whose lifecycle columns changed (`l`, LEFT JOINed on the customer
# id by the profile write), and the SET list keeping the others' stored values.
EVENT_PATH_VALUES = rows_from_json("l_rows", [("customer_id", "text"), *_EVENT_PATH_COLUMNS]) + " AS l"
EVENT_PATH_SET = ", ".join(
    f"{column} = CASE WHEN l.customer_id IS NULL THEN c.{column} ELSE l.{column} END"
    for column, _ in _EVENT_PATH_COLUMNS
)
# The stage history and survey answers: two sub-statements (CTEs) of the profile write.
EVENT_PATH_INSERTS = (
    "history AS (INSERT INTO lifecycle_stage_history (customer_id, from_stage, to_stage, changed_at, "
    "cause) SELECT h.c, h.f, h.t, :now, h.cause FROM "
    + rows_from_json("h_rows", [("c", "text"), ("f", "text"), ("t", "text"), ("cause", "text")])
    + " AS h), "
    "surveys AS (INSERT INTO survey_responses (message_id, customer_id, survey_type, score, comment, "
    "survey_id, answered_at) SELECT * FROM "
    + rows_from_json(
        "s_rows",
        [
            ("message_id", "text"),
            ("customer_id", "text"),
            ("survey_type", "text"),
            ("score", "int"),
            ("comment", "text"),
            ("survey_id", "text"),
            ("answered_at", "timestamptz"),
        ],
    )
    + " AS s ON CONFLICT (message_id) DO NOTHING)"
)


@dataclass(frozen=True)
class EventPathWrite:
    """What an event batch writes for the lifecycle: the changed customers' lifecycle columns, their
    stage changes and the survey answers; the parameters of the fragments above."""

    values: Sequence[tuple[str, dict[str, Any]]] = ()
    changes: Sequence[StageChange] = ()
    surveys: Sequence[SurveyRow] = ()
    cause: Mapping[str, str] = field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        return {
            "l_rows": json_rows(
                (cid, *(x[column] for column, _ in _EVENT_PATH_COLUMNS)) for cid, x in self.values
            ),
            "h_rows": json_rows(
                (c.customer_id, c.from_stage, c.to_stage, self.cause.get(c.customer_id, "event"))
                for c in self.changes
            ),
            "s_rows": json_rows(
                (s.message_id, s.customer_id, s.survey_type, s.score, s.comment, s.survey_id, s.answered_at)
                for s in self.surveys
            ),
        }


async def save_recomputed(
    session: AsyncSession,
    ids: Sequence[str],
    event_counts: Sequence[int],
    values: Sequence[dict[str, Any]],
    now: datetime,
    cause: str,
) -> list[StageChange]:
    """A recomputed chunk: lifecycle columns of the customers whose profile did not change since it was
    read (same event_count), locked in id order like the event path; stage changes recorded in the
    history. Returns the stage changes actually written."""
    if not ids:
        return []
    rows = await session.execute(
        text(
            "WITH u AS (SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:ec AS bigint[]), CAST(:stage AS "
            "text[]), "
            "CAST(:p_alive AS float8[]), CAST(:churn AS float8[]), CAST(:expected AS float8[]), "
            "CAST(:clv AS float8[]), CAST(:r AS int[]), CAST(:f AS int[]), CAST(:m AS int[]), CAST(:rfm AS "
            "int[])) "
            "AS u(customer_id, event_count, stage, p_alive, churn_risk, expected_orders, predicted_clv, "
            "rfm_r, "
            "rfm_f, rfm_m, rfm_score)), "
            "locked AS (SELECT c.customer_id, c.lifecycle_stage AS old_stage FROM customers c JOIN u "
            "ON c.customer_id = u.customer_id AND c.event_count = u.event_count ORDER BY c.customer_id "
            "FOR UPDATE OF c), "
            "saved AS (UPDATE customers c SET lifecycle_stage = u.stage, lifecycle_stage_since = CASE WHEN "
            "c.lifecycle_stage IS DISTINCT FROM u.stage THEN :now ELSE c.lifecycle_stage_since END, "
            "p_alive = u.p_alive, churn_risk = u.churn_risk, expected_orders = u.expected_orders, "
            "predicted_clv = u.predicted_clv, rfm_r = u.rfm_r, rfm_f = u.rfm_f, rfm_m = u.rfm_m, "
            "rfm_score = u.rfm_score FROM u, locked l WHERE c.customer_id = u.customer_id "
            "AND l.customer_id = u.customer_id RETURNING c.customer_id, l.old_stage, u.stage, c.traits, "
            "c.updated_at), "
            "history AS (INSERT INTO lifecycle_stage_history (customer_id, from_stage, to_stage, "
            "changed_at, cause) "
            "SELECT customer_id, old_stage, stage, :now, :cause FROM saved WHERE old_stage IS DISTINCT FROM "
            "stage) "
            "SELECT customer_id, old_stage, stage, traits, updated_at FROM saved "
            "WHERE old_stage IS DISTINCT FROM stage "
            "ORDER BY customer_id"
        ),
        {
            "ids": list(ids),
            "ec": list(event_counts),
            "stage": [x["lifecycle_stage"] for x in values],
            "p_alive": [x["p_alive"] for x in values],
            "churn": [x["churn_risk"] for x in values],
            "expected": [x["expected_orders"] for x in values],
            "clv": [x["predicted_clv"] for x in values],
            "r": [x["rfm_r"] for x in values],
            "f": [x["rfm_f"] for x in values],
            "m": [x["rfm_m"] for x in values],
            "rfm": [x["rfm_score"] for x in values],
            "now": now,
            "cause": cause,
        },
    )
    return [
        StageChange(r.customer_id, r.old_stage, r.stage, dict(r.traits or {}), r.updated_at) for r in rows
    ]


async def restart_lifecycle_segments(
    session: AsyncSession, fields: Iterable[str], now: datetime
) -> list[str]:
    """Back-fill again the segments whose definition names a lifecycle field (values changed in bulk)."""
    pattern = '"profile": "(' + "|".join(sorted(fields)) + ')"'
    rows = await session.execute(
        text(
            "UPDATE segments SET status = 'backfilling', backfill_cursor = NULL, backfill_done = 0, "
            "backfill_started_at = :now, backfill_finished_at = NULL, backfill_failures = 0, "
            "backfill_error = NULL, backfill_failed_at = NULL, updated_at = :now "
            "WHERE definition::text ~ :pattern RETURNING segment_id"
        ),
        {"pattern": pattern, "now": now},
    )
    return [r[0] for r in rows]


# --------------------------------------------------------------------------- models and policy


async def insert_model(
    session: AsyncSession,
    fitted_at: datetime,
    transactions: dict[str, Any] | None,
    spend: dict[str, Any] | None,
    rfm_cuts: dict[str, Any],
    customers: int,
    buyers: int,
    duration_s: float,
) -> int:
    row = await session.execute(
        text(
            "INSERT INTO lifecycle_models (fitted_at, transactions, spend, rfm_cuts, customers, buyers, "
            "duration_s) "
            "VALUES (:at, CAST(:t AS jsonb), CAST(:s AS jsonb), CAST(:c AS jsonb), :n, :b, :d) RETURNING id"
        ),
        {
            "at": fitted_at,
            "t": orjson.dumps(transactions).decode() if transactions is not None else None,
            "s": orjson.dumps(spend).decode() if spend is not None else None,
            "c": orjson.dumps(rfm_cuts).decode(),
            "n": customers,
            "b": buyers,
            "d": duration_s,
        },
    )
    return int(row.scalar_one())


async def latest_model(session: AsyncSession) -> dict[str, Any] | None:
    row = (
        await session.execute(
            text(
                "SELECT id, fitted_at, transactions, spend, rfm_cuts, customers, buyers, duration_s "
                "FROM lifecycle_models ORDER BY id DESC LIMIT 1"
            )
        )
    ).first()
    return dict(row._mapping) if row else None


async def get_policy(session: AsyncSession) -> tuple[dict[str, Any], datetime] | None:
    row = (
        await session.execute(text("SELECT policy, updated_at FROM lifecycle_policy WHERE id = 1"))
    ).first()
    return (dict(row.policy), row.updated_at) if row else None


async def put_policy(session: AsyncSession, policy: dict[str, Any], now: datetime) -> None:
    await session.execute(
        text(
            "INSERT INTO lifecycle_policy (id, policy, updated_at) VALUES (1, CAST(:p AS jsonb), :now) "
            "ON CONFLICT (id) DO UPDATE SET policy = excluded.policy, updated_at = excluded.updated_at"
        ),
        {"p": orjson.dumps(policy).decode(), "now": now},
    )


# --------------------------------------------------------------------------- engagement


@dataclass(frozen=True)
class MessageStatusRow:
    customer_id: str
    message_id: str
    channel: str
    template_id: str | None
    status: str
    at: datetime


RECEIVED = ("sent", "delivered", "opened", "clicked")
OPENED = ("opened", "clicked")


async def save_message_statuses(session: AsyncSession, rows: Sequence[MessageStatusRow]) -> None:
    """One upsert per batch: per (customer, message) the latest status and whether it was received,
    opened, clicked (a click implies an open and a receipt, even if those statuses come later or never)."""
    if not rows:
        return
    await session.execute(
        text(
            "INSERT INTO customer_messages (customer_id, message_id, channel, template_id, status, "
            "status_at, "
            "received, opened, clicked) "
            "SELECT DISTINCT ON (c, m) c, m, ch, tpl, st, at, bool_or(st = ANY(CAST(:received AS text[]))) "
            "OVER w, "
            "bool_or(st = ANY(CAST(:opened AS text[]))) OVER w, bool_or(st = 'clicked') OVER w "
            "FROM unnest(CAST(:c AS text[]), CAST(:m AS text[]), CAST(:ch AS text[]), CAST(:tpl AS text[]), "
            "CAST(:st AS text[]), CAST(:at AS timestamptz[])) AS u(c, m, ch, tpl, st, at) "
            "WINDOW w AS (PARTITION BY c, m) ORDER BY c, m, at DESC "
            "ON CONFLICT (customer_id, message_id) DO UPDATE SET "
            "status = CASE WHEN excluded.status_at >= customer_messages.status_at THEN excluded.status "
            "ELSE customer_messages.status END, "
            "status_at = GREATEST(customer_messages.status_at, excluded.status_at), "
            "template_id = coalesce(customer_messages.template_id, excluded.template_id), "
            "received = customer_messages.received OR excluded.received, "
            "opened = customer_messages.opened OR excluded.opened, "
            "clicked = customer_messages.clicked OR excluded.clicked"
        ),
        {
            "c": [r.customer_id for r in rows],
            "m": [r.message_id for r in rows],
            "ch": [r.channel for r in rows],
            "tpl": [r.template_id for r in rows],
            "st": [r.status for r in rows],
            "at": [r.at for r in rows],
            "received": list(RECEIVED),
            "opened": list(OPENED),
        },
    )


async def engagement_of(session: AsyncSession, customer_id: str, recent: int = 5) -> dict[str, Any]:
    counts = (
        await session.execute(
            text(
                "SELECT count(*) FILTER (WHERE received) AS received, count(*) FILTER (WHERE opened) AS "
                "opened, "
                "count(*) FILTER (WHERE clicked) AS clicked, max(status_at) AS last_at "
                "FROM customer_messages WHERE customer_id = :c"
            ),
            {"c": customer_id},
        )
    ).one()
    rows = await session.execute(
        text(
            "SELECT message_id, channel, template_id, status, status_at FROM customer_messages "
            "WHERE customer_id = :c ORDER BY status_at DESC, message_id LIMIT :n"
        ),
        {"c": customer_id, "n": recent},
    )
    return {
        "messages_received": counts.received,
        "messages_opened": counts.opened,
        "messages_clicked": counts.clicked,
        "last_message_at": counts.last_at,
        "recent_messages": [
            {
                "message_id": r.message_id,
                "channel": r.channel,
                "template_id": r.template_id,
                "status": r.status,
                "at": r.status_at,
            }
            for r in rows
        ],
    }


async def stage_history_of(session: AsyncSession, customer_id: str, tail: int = 10) -> list[dict[str, Any]]:
    rows = await session.execute(
        text(
            "SELECT from_stage, to_stage, changed_at, cause FROM lifecycle_stage_history WHERE customer_id "
            "= :c "
            "ORDER BY id DESC LIMIT :n"
        ),
        {"c": customer_id, "n": tail},
    )
    return [
        {"from": r.from_stage, "to": r.to_stage, "at": r.changed_at, "cause": r.cause}
        for r in reversed(rows.all())
    ]


# --------------------------------------------------------------------------- KPI inputs

_IN_SEGMENT = (
    "(CAST(:segment AS text) IS NULL OR EXISTS (SELECT 1 FROM memberships m WHERE m.segment_id = :segment "
    "AND m.customer_id = {col} AND m.is_member))"
)


async def segment_exists(session: AsyncSession, segment_id: str) -> bool:
    row = await session.execute(text("SELECT 1 FROM segments WHERE segment_id = :s"), {"s": segment_id})
    return row.first() is not None


async def purchases(
    session: AsyncSession, until: datetime, segment_id: str | None
) -> tuple[list[str], list[datetime]]:
    """Every order up to `until` (customer, time), optionally of a segment's current members."""
    rows = await session.execute(
        text(
            "SELECT customer_id, timestamp FROM events e WHERE event = 'Order Completed' AND timestamp <= "
            ":until "
            "AND " + _IN_SEGMENT.format(col="e.customer_id") + " ORDER BY timestamp"
        ),
        {"until": until, "segment": segment_id},
    )
    out = rows.all()
    return [r.customer_id for r in out], [r.timestamp for r in out]


async def survey_answers(
    session: AsyncSession, survey_type: str, start: datetime, end: datetime, segment_id: str | None
) -> tuple[list[datetime], list[int]]:
    rows = await session.execute(
        text(
            "SELECT answered_at, score FROM survey_responses s WHERE survey_type = :t AND answered_at >= "
            ":start "
            "AND answered_at < :end AND " + _IN_SEGMENT.format(col="s.customer_id") + " ORDER BY answered_at"
        ),
        {"t": survey_type, "start": start, "end": end, "segment": segment_id},
    )
    out = rows.all()
    return [r.answered_at for r in out], [int(r.score) for r in out]


async def clv_rows(session: AsyncSession, segment_id: str | None) -> list[Any]:
    """Per buyer (or lead): stage, historical revenue, predicted CLV and the segments they are in now."""
    rows = await session.execute(
        text(
            "SELECT c.customer_id, c.lifecycle_stage, c.revenue, c.predicted_clv, "
            "coalesce((SELECT array_agg(m.segment_id) FROM memberships m WHERE m.customer_id = c.customer_id "
            "AND m.is_member), CAST('{}' AS text[])) AS segments FROM customers c WHERE "
            + _IN_SEGMENT.format(col="c.customer_id")
        ),
        {"segment": segment_id},
    )
    return list(rows.all())


async def stages_at(session: AsyncSession, at: datetime, segment_id: str | None) -> dict[str, str]:
    """Each customer's stage at `at`: the target of their last stage change at or before it."""
    rows = await session.execute(
        text(
            "SELECT DISTINCT ON (customer_id) customer_id, to_stage FROM lifecycle_stage_history h "
            "WHERE changed_at <= :at AND " + _IN_SEGMENT.format(col="h.customer_id") + " "
            "ORDER BY customer_id, changed_at DESC, id DESC"
        ),
        {"at": at, "segment": segment_id},
    )
    return {r.customer_id: r.to_stage for r in rows}


async def transitions_between(
    session: AsyncSession, start: datetime, end: datetime, segment_id: str | None
) -> list[Any]:
    rows = await session.execute(
        text(
            "SELECT coalesce(from_stage, 'none') AS source, to_stage AS target, count(*) AS n FROM "
            "lifecycle_stage_history h "
            "WHERE changed_at >= :start AND changed_at < :end AND "
            + _IN_SEGMENT.format(col="h.customer_id")
            + " GROUP BY 1, 2 ORDER BY 1, 2"
        ),
        {"start": start, "end": end, "segment": segment_id},
    )
    return list(rows.all())


async def revenue_by_stage(
    session: AsyncSession, start: datetime, end: datetime, segment_id: str | None
) -> list[Any]:
    """Order revenue in [start, end) by the stage the customer was in when the order was placed
    (their last stage change at or before the order; `none` before any)."""
    rows = await session.execute(
        text(
            f"SELECT coalesce(st.to_stage, 'none') AS stage, count(*) AS orders, sum({ORDER_AMOUNT_SQL}) AS "
            "revenue "
            "FROM events e LEFT JOIN LATERAL (SELECT to_stage FROM lifecycle_stage_history h "
            "WHERE h.customer_id = e.customer_id AND h.changed_at <= e.timestamp ORDER BY h.changed_at DESC, "
            "h.id DESC LIMIT 1) st ON true WHERE e.event = 'Order Completed' AND e.timestamp >= :start "
            "AND e.timestamp < :end AND " + _IN_SEGMENT.format(col="e.customer_id") + " GROUP BY 1 ORDER BY 1"
        ),
        {"start": start, "end": end, "segment": segment_id},
    )
    return list(rows.all())

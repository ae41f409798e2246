"""The message performance query: the send ledger and engagements of a period, counted per group."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifier.domain.performance import COUNTS, GROUP_COLUMNS, GroupBy, Performance

# Fixed expressions per column (never from the request): the ledger keeps journey and node ids in the
# request it stored.
_COLUMN_SQL = {
    "template_id": "l.template_id",
    "channel": "l.channel",
    "category": "l.category",
    "journey_id": "l.request->>'journey_id'",
    "node_id": "l.request->>'node_id'",
}
_FILTERS = {"template_id": "l.template_id", "journey_id": "l.request->>'journey_id'", "channel": "l.channel"}


async def performance(
    session: AsyncSession,
    group_by: GroupBy | None,
    start: datetime,
    end: datetime,
    filters: dict[str, str],
    limit: int = 1,
) -> list[Performance]:
    """Per group of `group_by`, the busiest `limit` first; with None, one row for everything."""
    columns = GROUP_COLUMNS[group_by] if group_by is not None else ()
    selected = "".join(f", {_COLUMN_SQL[c]} AS {c}" for c in columns)
    where = "".join(f" AND {_FILTERS[name]} = :f_{name}" for name in sorted(filters))
    grouped = "".join(f"{c}, " for c in columns)
    group_clause = (
        f"GROUP BY {grouped[:-2]} ORDER BY requested DESC, {grouped[:-2]} LIMIT :limit" if columns else ""
    )
    sql = (
        f"WITH m AS (SELECT l.message_id, l.state{selected} FROM send_ledger l "
        f"WHERE l.created_at >= :start AND l.created_at < :end{where}), "
        "e AS (SELECT e.message_id, bool_or(e.kind = 'opened') AS opened, "
        "bool_or(e.kind = 'clicked') AS clicked, bool_or(e.kind = 'unsubscribed') AS unsubscribed, "
        "bool_or(e.kind = 'complained') AS complained, "
        "bool_or(e.kind = 'provider_report' AND e.detail = 'delivered') AS reported_delivered, "
        "bool_or(e.kind = 'provider_report' AND e.detail IN ('bounced', 'failed')) AS reported_bounced "
        "FROM engagements e JOIN m USING (message_id) GROUP BY e.message_id) "
        f"SELECT {grouped}count(*) AS requested, "
        "count(*) FILTER (WHERE m.state IN ('sent', 'delivered', 'bounced')) AS sent, "
        "count(*) FILTER (WHERE (m.state = 'delivered' OR e.reported_delivered) "
        "AND NOT coalesce(e.reported_bounced, false)) AS delivered, "
        "count(*) FILTER (WHERE m.state = 'bounced' OR e.reported_bounced) AS bounced, "
        "count(*) FILTER (WHERE m.state IN ('failed', 'unknown')) AS failed, "
        "count(*) FILTER (WHERE m.state = 'suppressed') AS suppressed, "
        "count(*) FILTER (WHERE m.state IN ('pending', 'claimed', 'sending')) AS pending, "
        "count(*) FILTER (WHERE e.opened) AS opened, count(*) FILTER (WHERE e.clicked) AS clicked, "
        "count(*) FILTER (WHERE e.unsubscribed) AS unsubscribed, "
        "count(*) FILTER (WHERE e.complained) AS complained "
        f"FROM m LEFT JOIN e USING (message_id) {group_clause}"
    )
    params = {"start": start, "end": end, "limit": limit, **{f"f_{k}": v for k, v in filters.items()}}
    rows = (await session.execute(text(sql), params)).mappings().all()
    return [
        Performance({c: row[c] for c in columns}, {name: int(row[name]) for name in COUNTS}) for row in rows
    ]

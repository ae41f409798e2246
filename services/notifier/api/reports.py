"""Message performance for marketers (admin token): `GET /v1/reports/messages`, per template, journey,
journey node, channel or category (see `domain/performance.py` for what each count means)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Query

from services.notifier.api.dependencies import NotifierDep
from services.notifier.domain.performance import GroupBy
from services.notifier.store import performance_repo
from shared.contracts import Channel
from shared.http import day_range


def router(admin: Any) -> APIRouter:
    api = APIRouter(prefix="/v1/reports", tags=["reports"], dependencies=[Depends(admin)])

    @api.get("/messages")
    async def message_performance(
        notifier: NotifierDep,
        group_by: GroupBy = Query(
            default="template", description="template | journey | node | channel | category"
        ),
        from_: date | None = Query(
            default=None, alias="from", description="first day (ISO date, UTC), inclusive"
        ),
        to: date | None = Query(default=None, description="last day, inclusive; default today"),
        template_id: str | None = Query(default=None, max_length=200),
        journey_id: str | None = Query(default=None, max_length=200),
        channel: Channel | None = None,
        limit: int = Query(default=100, ge=1, le=1000, description="groups at most, the busiest first"),
    ) -> dict[str, Any]:
        start, end = day_range(from_, to, notifier.clock.now().astimezone(UTC).date(), 30)
        filters = {
            k: v
            for k, v in (("template_id", template_id), ("journey_id", journey_id), ("channel", channel))
            if v is not None
        }
        since = datetime.combine(start, time(), UTC)
        until = datetime.combine(end, time(), UTC) + timedelta(days=1)
        given = {k: str(v) for k, v in filters.items()}
        async with notifier.platform.unit_of_work() as uow:
            rows = await performance_repo.performance(uow.session, group_by, since, until, given, limit)
            (total,) = await performance_repo.performance(uow.session, None, since, until, given)
        return {
            "from": start.isoformat(),
            "to": end.isoformat(),
            "group_by": group_by,
            "filters": {k: str(v) for k, v in filters.items()},
            "groups": [r.as_json() for r in rows],
            "total": total.as_json(),  # every group, also past `limit`
        }

    return api

"""The KPI API (admin token): JSON a chart library can draw directly.

Every endpoint takes `from` / `to` (ISO dates, inclusive; default: the last 365 days up to today),
`period` (`month` or `week`, weeks start on Monday) and `segment_id` (only the segment's current members).
The definitions are in each endpoint's description (OpenAPI) and in docs/lifecycle.md section 7.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query

from services.segmenter.domain.lifecycle import kpis
from services.segmenter.domain.lifecycle.tracking import csat_over_time, period_starts
from services.segmenter.domain.lifecycle.voice import csat, nps
from services.segmenter.runtime import Segmenter
from services.segmenter.store import lifecycle as lifecycle_store
from shared.http import ApiError, admin_guard, day_range, field_error

MAX_PERIODS = 520
Period = Literal["month", "week"]


class KpiRange:
    def __init__(self, start: date, end: date, period: Period, segment_id: str | None) -> None:
        self.start, self.end, self.period, self.segment_id = start, end, period, segment_id

    @property
    def start_at(self) -> datetime:
        return datetime(self.start.year, self.start.month, self.start.day, tzinfo=UTC)

    @property
    def end_at(self) -> datetime:
        """The end of the `to` day (exclusive bound)."""
        return datetime(self.end.year, self.end.month, self.end.day, tzinfo=UTC) + timedelta(days=1)

    def starts(self) -> list[datetime]:
        return period_starts(self.start_at, self.end_at - timedelta(microseconds=1), self.period)

    def as_json(self) -> dict[str, Any]:
        return {
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "period": self.period,
            "segment_id": self.segment_id,
        }


def kpis_router(seg: Segmenter) -> APIRouter:
    router = APIRouter(prefix="/v1/kpis", tags=["kpis"], dependencies=[Depends(admin_guard(seg.settings))])
    platform = seg.platform

    async def kpi_range(
        from_: date | None = Query(default=None, alias="from", description="first day (ISO date), inclusive"),
        to: date | None = Query(default=None, description="last day (ISO date), inclusive; default today"),
        period: Period = Query(default="month", description="month | week (ISO weeks, Monday first)"),
        segment_id: str | None = Query(default=None, description="only the segment's current members"),
    ) -> KpiRange:
        start, end = day_range(from_, to, seg.clock.now().astimezone(UTC).date(), 365)
        r = KpiRange(start, end, period, segment_id)
        if len(r.starts()) > MAX_PERIODS:
            raise ApiError(
                400,
                "invalid_request",
                "too many periods",
                errors=[field_error("from", "max_periods", f"at most {MAX_PERIODS} periods per request")],
            )
        if segment_id is not None:
            async with platform.unit_of_work() as uow:
                if not await lifecycle_store.segment_exists(uow.session, segment_id):
                    raise ApiError(
                        400,
                        "invalid_request",
                        f"no segment {segment_id!r}",
                        errors=[field_error("segment_id", "exists", "not an existing segment")],
                    )
        return r

    async def purchase_log(r: KpiRange) -> kpis.PurchaseLog:
        async with platform.unit_of_work() as uow:
            customers, times = await lifecycle_store.purchases(uow.session, r.end_at, r.segment_id)
        return kpis.PurchaseLog.from_arrays(
            np.asarray(customers, dtype=object), np.asarray(times, dtype=object)
        )

    @router.get(
        "/retention",
        description=(
            "Retention and churn per period. A *customer at day t* has an order in (t - active_window_days, "
            "t]. "
            "For a period [start, end]: S = customers at start, E = customers at end, N = customers whose "
            "first "
            "order ever is in (start, end] and who are customers at end. retention_rate = (E - N) / S; "
            "churn_rate = (S - |S and E|) / S; both null when S = 0. Also `retained` = |S and E|, "
            "`reactivated`, "
            "`new_customers`. A period runs from its first day to its last (the first starts at `from`, the "
            "last ends at `to`): S is counted at the end of the day before it, E at the end of its last day."
        ),
    )
    async def retention(
        r: KpiRange = Depends(kpi_range),
        active_window_days: int = Query(default=kpis.DEFAULT_ACTIVE_WINDOW_DAYS, ge=1, le=3650),
    ) -> dict[str, Any]:
        firsts = [max(s.date(), r.start) for s in r.starts()]
        periods = kpis.retention_periods(
            await purchase_log(r), firsts, r.end, active_window_days=active_window_days
        )
        return {**r.as_json(), "active_window_days": active_window_days, "periods": periods}

    @router.get(
        "/cohorts",
        description=(
            "Cohort retention table. Cohort = calendar month of a customer's first order (cohorts from the "
            "month "
            "of `from` to the month of `to`); cell k = share of the cohort's customers with an order in "
            "month "
            "cohort + k (month 0 = 1.0); months after `to`'s month are null (not observed yet)."
        ),
    )
    async def cohorts(r: KpiRange = Depends(kpi_range)) -> dict[str, Any]:
        table = kpis.cohort_retention(await purchase_log(r), r.end, since=r.start)
        return {**r.as_json(), **table}

    @router.get(
        "/nps",
        description=(
            "Net Promoter Score per period: 100 x (promoters (9-10) - detractors (0-6)) / answers, from "
            "`Survey Responded` events with survey_type nps; every answer counts; null for a period without "
            "answers. `overall` is the whole range; with `segment_id` only the segment's current members."
        ),
    )
    async def nps_kpi(r: KpiRange = Depends(kpi_range)) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            answered, scores = await lifecycle_store.survey_answers(
                uow.session, "nps", r.start_at, r.end_at, r.segment_id
            )
        series = kpis.nps_over_time(np.asarray(answered, dtype=object), scores, r.start, r.end, r.period)
        return {**r.as_json(), "overall": nps(scores).as_json(), "series": series}

    @router.get(
        "/csat",
        description=(
            "Customer satisfaction per period: 100 x answers of 4 or 5 / answers on the 1-5 scale, from "
            "`Survey Responded` events with survey_type csat; null for a period without answers."
        ),
    )
    async def csat_kpi(r: KpiRange = Depends(kpi_range)) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            answered, scores = await lifecycle_store.survey_answers(
                uow.session, "csat", r.start_at, r.end_at, r.segment_id
            )
        starts = r.starts()
        starts[0] = max(starts[0], r.start_at)
        series = csat_over_time(answered, scores, starts, r.end_at, r.period)
        return {**r.as_json(), "overall": csat(scores).as_json(), "series": series}

    @router.get(
        "/clv",
        description=(
            "Average customer lifetime value now, per lifecycle stage and per segment: historical = revenue "
            "to "
            "date (every customer); predicted = the model's CLV over the next 12 months (customers with a "
            "prediction: buyers, once a model is fitted). `count` = customers averaged. "
            "`from`/`to`/`period` are "
            "not used (a current snapshot)."
        ),
    )
    async def clv(r: KpiRange = Depends(kpi_range)) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            rows = await lifecycle_store.clv_rows(uow.session, r.segment_id)
        stage = np.asarray([x.lifecycle_stage or "none" for x in rows], dtype=object)
        hist = np.asarray([float(x.revenue) for x in rows], dtype=np.float64)
        pred = np.asarray([np.nan if x.predicted_clv is None else float(x.predicted_clv) for x in rows])
        seg_labels = [s for x in rows for s in x.segments]
        seg_rows = [i for i, x in enumerate(rows) for _ in x.segments]
        return {
            "segment_id": r.segment_id,
            "overall": {
                "customers": len(rows),
                "historical": _mean(hist),
                "predicted": _mean(pred),
            },
            "by_stage": {
                "historical": kpis.average_by_group(stage, hist),
                "predicted": kpis.average_by_group(stage, pred),
            },
            "by_segment": {
                "historical": kpis.average_by_group(np.asarray(seg_labels, dtype=object), hist[seg_rows]),
                "predicted": kpis.average_by_group(np.asarray(seg_labels, dtype=object), pred[seg_rows]),
            },
        }

    @router.get(
        "/stages",
        description=(
            "Stage distribution over time and stage-to-stage transitions, from the stage history. "
            "`distribution`: customers per stage at the end of each period (a customer's stage at t is the "
            "target of their last stage change at or before t). `transitions`: stage at `from` -> stage at "
            "the "
            "end of `to` for customers with a stage at both moments (`none` = no stage yet at `from`). "
            "`changes`: every stored stage change inside the range (from -> to -> count)."
        ),
    )
    async def stages(r: KpiRange = Depends(kpi_range)) -> dict[str, Any]:
        ends = [*r.starts()[1:], r.end_at]
        series = []
        async with platform.unit_of_work() as uow:
            for start, end in zip(r.starts(), ends, strict=True):
                at = await lifecycle_store.stages_at(
                    uow.session, end - timedelta(microseconds=1), r.segment_id
                )
                series.append(
                    {
                        "period": _label(start, r.period),
                        "at": end.isoformat(),
                        "counts": kpis.distribution(list(at.values())),
                    }
                )
            before = await lifecycle_store.stages_at(
                uow.session, r.start_at - timedelta(microseconds=1), r.segment_id
            )
            after = await lifecycle_store.stages_at(
                uow.session, r.end_at - timedelta(microseconds=1), r.segment_id
            )
            changes = await lifecycle_store.transitions_between(
                uow.session, r.start_at, r.end_at, r.segment_id
            )
        ids = sorted(after)
        table = kpis.transitions([before.get(c, "none") for c in ids], [after[c] for c in ids]) if ids else {}
        counted: dict[str, dict[str, int]] = {}
        for row in changes:
            counted.setdefault(row.source, {})[row.target] = int(row.n)
        return {**r.as_json(), "distribution": series, "transitions": table, "changes": counted}

    @router.get(
        "/revenue-by-stage",
        description=(
            "Order revenue (and order count) in [from, end of to] by the stage the customer was in when the "
            "order was placed: their last stage change at or before the order's time (`none` before any)."
        ),
    )
    async def revenue_by_stage(r: KpiRange = Depends(kpi_range)) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            rows = await lifecycle_store.revenue_by_stage(uow.session, r.start_at, r.end_at, r.segment_id)
        return {
            **r.as_json(),
            "stages": [
                {"stage": x.stage, "orders": int(x.orders), "revenue": float(x.revenue)} for x in rows
            ],
            "total": sum(float(x.revenue) for x in rows),
        }

    return router


def _mean(values: np.ndarray[Any, Any]) -> float | None:
    known = values[~np.isnan(values)]
    return float(known.mean()) if known.size else None


def _label(start: datetime, period: Period) -> str:
    return start.strftime("%Y-%m") if period == "month" else start.date().isoformat()

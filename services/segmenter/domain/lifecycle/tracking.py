"""Keeping lifecycle metrics current in the segmenter (pure, no I/O).

The store hands over per-customer order aggregates (`OrderAggregate`, one SQL statement for a batch's
customers or for a chunk of the base); this module turns them into the `snapshot.BaseHistory` columns,
computes every metric and the stage with the vectorized functions, and scores RFM either over the base
(refit) or against the base's stored quintile cut points (event path, between refits).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from services.segmenter.domain.lifecycle import bgnbd, rfm
from services.segmenter.domain.lifecycle import gamma_gamma as gg
from services.segmenter.domain.lifecycle.snapshot import (
    BaseHistory,
    FittedModels,
    SnapshotSettings,
    base_columns,
)
from services.segmenter.domain.lifecycle.stages import (
    MetricField,
    StagePolicy,
    classify_many,
    default_policy,
    stage_names,
)

SECONDS_PER_DAY = 86_400.0
FloatArray = npt.NDArray[np.float64]

# The lifecycle fields stored on each profile (columns of `customers`), usable in segment rules.
STORED_FIELDS = (
    "lifecycle_stage",
    "lifecycle_stage_since",
    "p_alive",
    "churn_risk",
    "expected_orders",
    "predicted_clv",
    "rfm_r",
    "rfm_f",
    "rfm_m",
    "rfm_score",
    "nps_score",
    "nps_category",
    "nps_at",
    "csat_score",
    "csat_at",
)


def epoch_days(at: datetime) -> float:
    return at.timestamp() / SECONDS_PER_DAY


@dataclass(frozen=True)
class OrderAggregate:
    """One customer's orders up to the computation time, as the store aggregates them.

    Days are UTC day numbers (`*_date`: calendar days; `*_at`: exact times as fractional day numbers).
    """

    order_days: int  # distinct calendar days with an order
    first_date: int
    last_date: int
    first_at: float
    last_at: float
    first_day_amount: float
    total_amount: float
    orders_recent: int  # orders in (now - growth window, now]
    orders_previous: int  # orders in (now - 2 windows, now - window]


class CustomerInputs(NamedTuple):
    """What the metrics of one customer are computed from (besides their orders). A NamedTuple: one
    is built per customer of every event batch."""

    customer_id: str
    orders: int
    revenue: float
    first_seen: datetime | None
    nps_score: int | None
    csat_score: int | None


@dataclass(frozen=True)
class RfmCuts:
    """Quintile cut points of the base at the last refit (20/40/60/80th percentiles of buyers).

    The event path scores a customer against them: exact mid-rank quintiles need the whole base, which
    the next refit recomputes.
    """

    recency_days: tuple[float, ...] = ()
    orders: tuple[float, ...] = ()
    revenue: tuple[float, ...] = ()

    def as_json(self) -> dict[str, list[float]]:
        return {
            "recency_days": list(self.recency_days),
            "orders": list(self.orders),
            "revenue": list(self.revenue),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> RfmCuts:
        data = data or {}
        return cls(
            tuple(float(x) for x in data.get("recency_days", ())),
            tuple(float(x) for x in data.get("orders", ())),
            tuple(float(x) for x in data.get("revenue", ())),
        )

    @classmethod
    def of_base(cls, scores: rfm.RfmScores) -> RfmCuts:
        buyer = scores.frequency > 0
        if not buyer.any():
            return cls()
        q = [20, 40, 60, 80]

        def cuts(values: FloatArray) -> tuple[float, ...]:
            return tuple(float(x) for x in np.percentile(values, q))

        return cls(
            cuts(scores.recency_days[buyer]),
            cuts(scores.frequency[buyer].astype(np.float64)),
            cuts(scores.monetary[buyer]),
        )

    def score(
        self, recency_days: FloatArray, orders: FloatArray, revenue: FloatArray
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """1..5 scores against the cut points (0 = never ordered); without cuts every buyer scores 3."""
        buyer = orders > 0

        def one(values: FloatArray, cuts: tuple[float, ...], inverse: bool) -> npt.NDArray[np.int64]:
            if not cuts:
                raw = np.full(values.shape, 3, dtype=np.int64)
            else:
                # A value equal to several cut points (most buyers with one order: cuts 1, 1, 1, 1) is
                # in the middle of their bins, as the refit's mid-rank puts it (the lowest bin scored
                # F 1 where the refit scored 3, so any event dropped a customer's RFM).
                edges = np.asarray(cuts)
                lo = np.searchsorted(edges, values, side="left").astype(np.int64)
                hi = np.searchsorted(edges, values, side="right").astype(np.int64)
                position = (lo + hi) // 2
                raw = 5 - position if inverse else 1 + position
            out: npt.NDArray[np.int64] = np.where(buyer, np.clip(raw, 1, 5), 0).astype(np.int64)
            return out

        return (
            one(np.nan_to_num(recency_days, nan=0.0), self.recency_days, True),
            one(orders, self.orders, False),
            one(revenue, self.revenue, False),
        )


@dataclass(frozen=True)
class LifecycleModel:
    """The latest fit: parameters (None when the base could not be fitted yet) and RFM cut points."""

    model_id: int | None
    models: FittedModels | None
    cuts: RfmCuts


def models_from_json(
    transactions: Mapping[str, Any] | None, spend: Mapping[str, Any] | None
) -> FittedModels | None:
    if not transactions:
        return None
    tp = transactions["params"]
    spend_params = gg.GammaGammaParams(**spend["params"]) if spend else None
    return FittedModels(bgnbd.BgNbdParams(**tp), spend_params)


def build_history(
    inputs: Sequence[CustomerInputs],
    orders: Mapping[str, OrderAggregate],
    as_of: datetime,
    settings: SnapshotSettings,
) -> BaseHistory:
    """The BaseHistory columns of these customers (aligned with `inputs`) as of `as_of`."""
    n = len(inputs)
    as_of_date = math.floor(epoch_days(as_of))
    unit = settings.model_time_unit_days

    # Filled as lists, made arrays once: numpy's per-element assignment costs ~0.1 us each.
    nan = math.nan
    h: dict[str, list[float]] = {name: [nan] * n for name in BaseHistory.__dataclass_fields__}
    orders_col, revenue, signup, nps, csat = (
        h["orders"],
        h["revenue"],
        h["signup_day"],
        h["nps_score"],
        h["csat_score"],
    )
    first_day, last_day, recent, previous = (
        h["first_order_day"],
        h["last_order_day"],
        h["orders_recent"],
        h["orders_previous"],
    )
    frequency, recency, age, repeat_mean = h["frequency"], h["recency"], h["T"], h["repeat_mean_value"]
    h["referrals_given"] = [0.0] * n
    for i, c in enumerate(inputs):
        orders_col[i] = c.orders
        revenue[i] = c.revenue
        signup[i] = epoch_days(c.first_seen) if c.first_seen is not None else nan
        nps[i] = nan if c.nps_score is None else c.nps_score
        csat[i] = nan if c.csat_score is None else c.csat_score
        o = orders.get(c.customer_id)
        if o is None:
            recent[i] = previous[i] = 0.0
            frequency[i] = recency[i] = age[i] = repeat_mean[i] = 0.0
            if c.orders > 0:
                # Counted but timestamped after `as_of` (a client clock ahead, an import): ordered just
                # now, not never (no days since made a brand-new buyer `retention`, not `onboarding`).
                first_day[i] = last_day[i] = epoch_days(as_of)
                recent[i] = float(c.orders)
            continue
        x = o.order_days - 1
        first_day[i] = o.first_at
        last_day[i] = o.last_at
        recent[i] = o.orders_recent
        previous[i] = o.orders_previous
        frequency[i] = x
        recency[i] = (o.last_date - o.first_date) / unit
        repeat_mean[i] = (o.total_amount - o.first_day_amount) / x if x > 0 else 0.0
        # The customer's age from the first order day to the as-of day, in the model's unit.
        age[i] = max(as_of_date - o.first_date, o.last_date - o.first_date) / unit
    return BaseHistory(**{name: np.array(values, dtype=float) for name, values in h.items()})


@dataclass
class Computed:
    """Metrics and stage per customer, aligned with the inputs."""

    columns: dict[str, Any]
    stages: npt.NDArray[np.str_]
    rfm_scores: rfm.RfmScores


def compute(
    history: BaseHistory,
    as_of: datetime,
    model: LifecycleModel,
    policy: StagePolicy,
    settings: SnapshotSettings,
    *,
    whole_base: bool,
) -> Computed:
    """Every metric and the stage, vectorized. `whole_base`: score RFM over these customers (a refit);
    otherwise against the model's stored cut points (the event path's few customers)."""
    as_of_day = epoch_days(as_of)
    columns, scores = base_columns(history, as_of_day, model.models, settings)
    if not whole_base:
        r, f, m = model.cuts.score(
            np.asarray(columns[MetricField.DAYS_SINCE_LAST_ORDER.value], dtype=np.float64),
            history.orders,
            history.revenue,
        )
        (
            columns[MetricField.RFM_R.value],
            columns[MetricField.RFM_F.value],
            columns[MetricField.RFM_M.value],
        ) = (
            r,
            f,
            m,
        )
    stages = stage_names(classify_many(columns, policy))
    return Computed(columns, stages, scores)


def stored_rows(computed: Computed, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
    """The stored lifecycle columns of customers `start` to `stop` (None for unknown). Each column is
    read out of its array once (`tolist`): element by element, numpy indexing and float conversion
    cost a batch's event path ~3 us a customer."""
    c = computed.columns
    stop = len(computed.stages) if stop is None else stop

    def nums(name: str) -> list[float | None]:
        return [None if v != v else v for v in np.asarray(c[name][start:stop], dtype=float).tolist()]

    def ints(name: str) -> list[int]:
        return [0 if v != v else int(v) for v in np.asarray(c[name][start:stop], dtype=float).tolist()]

    columns = zip(
        computed.stages[start:stop].tolist(),
        nums("p_alive"),
        nums("churn_risk"),
        nums("expected_orders"),
        nums("predicted_clv"),
        ints("rfm_r"),
        ints("rfm_f"),
        ints("rfm_m"),
        strict=True,
    )
    return [
        {
            "lifecycle_stage": str(stage),
            "p_alive": p_alive,
            "churn_risk": churn,
            "expected_orders": expected,
            "predicted_clv": clv,
            "rfm_r": r,
            "rfm_f": f,
            "rfm_m": m,
            "rfm_score": r * 100 + f * 10 + m,
        }
        for stage, p_alive, churn, expected, clv, r, f, m in columns
    ]


def fit_models(history: BaseHistory) -> tuple[bgnbd.BgNbdFit | None, gg.GammaGammaFit | None]:
    """BG/NBD on the buyers, Gamma-Gamma on the repeat buyers; None where the base cannot support a fit."""
    bought = history.orders > 0
    if int(bought.sum()) < 2 or float(history.frequency[bought].sum()) <= 0:
        return None, None
    try:
        transactions = bgnbd.fit(history.frequency[bought], history.recency[bought], history.T[bought])
    except (ValueError, FloatingPointError, ArithmeticError):
        return None, None
    # Repeat buyers whose repeat orders came to nothing (free orders, refunds) have no spend to fit:
    # left out, so that one of them does not switch predicted CLV off for everyone.
    spenders = bought & ((history.frequency == 0) | (history.repeat_mean_value > 0))
    try:
        spend = gg.fit(history.frequency[spenders], history.repeat_mean_value[spenders])
    except (ValueError, FloatingPointError, ArithmeticError):
        spend = None
    return transactions, spend


def default_stage_policy() -> StagePolicy:
    return default_policy()


def csat_over_time(
    answered: Sequence[datetime],
    scores: Sequence[int],
    starts: Sequence[datetime],
    end: datetime,
    period: str = "month",
) -> list[dict[str, Any]]:
    """CSAT (share of 4-5 answers, %) per period [starts[i], starts[i+1]) with the last ending at `end`."""
    bounds = [*starts, end]
    out: list[dict[str, Any]] = []
    for lo, hi in itertools.pairwise(bounds):
        inside = [s for t, s in zip(answered, scores, strict=True) if lo <= t < hi]
        satisfied = sum(1 for s in inside if s >= 4)
        out.append(
            {
                "period": lo.strftime("%Y-%m") if period == "month" else lo.date().isoformat(),
                "responses": len(inside),
                "satisfied": satisfied,
                "csat": 100.0 * satisfied / len(inside) if inside else None,
            }
        )
    return out


def period_starts(start: datetime, end: datetime, period: str) -> list[datetime]:
    """Period starts (UTC midnight) from the period containing `start` up to `end`: months or ISO weeks."""
    d = start.astimezone(UTC).date()
    d = d.fromordinal(d.toordinal() - d.weekday()) if period == "week" else d.replace(day=1)
    out: list[datetime] = []
    while True:
        at = datetime(d.year, d.month, d.day, tzinfo=UTC)
        if at > end:
            break
        out.append(at)
        if period == "week":
            d = d.fromordinal(d.toordinal() + 7)
        else:
            d = d.replace(year=d.year + (d.month == 12), month=d.month % 12 + 1)
    return out

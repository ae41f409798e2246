"""One customer's metrics snapshot: the inputs of the stage rules, from their history and the fitted models.

This is the per-customer path (an event arrives, the profile's metrics are recomputed). RFM scores are
quintiles over the whole base, so they are passed in from the last base-wide scoring rather than
recomputed per event.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from services.segmenter.domain.lifecycle import bgnbd, rfm
from services.segmenter.domain.lifecycle import gamma_gamma as gg
from services.segmenter.domain.lifecycle.stages import MetricField, MetricValue
from services.segmenter.domain.lifecycle.voice import nps_category

SECONDS_PER_DAY = 86_400.0
FloatArray = npt.NDArray[np.float64]


class SnapshotSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    growth_window_days: int = Field(
        90, ge=1, description="order_trend compares this window with the one before"
    )
    model_time_unit_days: float = Field(7.0, gt=0, description="the time unit the BG/NBD model was fitted in")
    prediction_horizon_days: int = Field(90, ge=1, description="horizon of expected_orders")
    clv_months: int = Field(12, ge=1, description="horizon of predicted_clv")
    monthly_discount_rate: float = Field(0.01, ge=0, description="discount rate of predicted_clv")


@dataclass(frozen=True)
class Order:
    at: datetime
    amount: float


@dataclass(frozen=True)
class FittedModels:
    transactions: bgnbd.BgNbdParams
    spend: gg.GammaGammaParams | None = None


def _days(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds() / SECONDS_PER_DAY


def customer_metrics(
    *,
    as_of: datetime,
    orders: Sequence[Order],
    signed_up_at: datetime | None = None,
    models: FittedModels | None = None,
    latest_nps: int | None = None,
    latest_csat: int | None = None,
    referrals_given: int = 0,
    rfm_scores: tuple[int, int, int] | None = None,
    settings: SnapshotSettings | None = None,
) -> dict[str, MetricValue]:
    """The metrics keyed by `MetricField` values; unknown metrics are None.

    Orders after `as_of` are ignored. BG/NBD inputs use the lifetimes definitions on calendar days (UTC):
    frequency = distinct order days - 1, recency and T from the first order day, in the model's time unit.
    """
    cfg = settings or SnapshotSettings()
    known = sorted((o for o in orders if o.at <= as_of), key=lambda o: o.at)
    metrics: dict[str, MetricValue] = {field.value: None for field in MetricField}
    metrics[MetricField.ORDERS] = len(known)
    metrics[MetricField.REVENUE] = math.fsum(o.amount for o in known)
    metrics[MetricField.REFERRALS_GIVEN] = referrals_given
    if signed_up_at is not None:
        metrics[MetricField.DAYS_SINCE_SIGNUP] = max(0.0, _days(as_of, signed_up_at))
    if latest_nps is not None:
        metrics[MetricField.NPS_SCORE] = latest_nps
        metrics[MetricField.NPS_CATEGORY] = nps_category(latest_nps).value
    if latest_csat is not None:
        metrics[MetricField.CSAT_SCORE] = latest_csat
    if rfm_scores is not None:
        metrics[MetricField.RFM_R], metrics[MetricField.RFM_F], metrics[MetricField.RFM_M] = rfm_scores
    if not known:
        metrics[MetricField.ORDER_TREND] = 0
        return metrics

    ages = [_days(as_of, o.at) for o in known]
    metrics[MetricField.DAYS_SINCE_FIRST_ORDER] = ages[0]
    metrics[MetricField.DAYS_SINCE_LAST_ORDER] = ages[-1]
    window = cfg.growth_window_days
    recent = sum(1 for age in ages if age < window)
    previous = sum(1 for age in ages if window <= age < 2 * window)
    metrics[MetricField.ORDER_TREND] = recent - previous

    if models is not None:
        order_days = sorted({o.at.date() for o in known})
        unit = cfg.model_time_unit_days
        x = float(len(order_days) - 1)
        t_x = (order_days[-1] - order_days[0]).days / unit
        T = (as_of.date() - order_days[0]).days / unit
        p_alive = float(bgnbd.probability_alive(models.transactions, [x], [t_x], [T])[0])
        metrics[MetricField.P_ALIVE] = p_alive
        metrics[MetricField.CHURN_RISK] = 1.0 - p_alive
        horizon = cfg.prediction_horizon_days / unit
        metrics[MetricField.EXPECTED_ORDERS] = float(
            bgnbd.expected_purchases(models.transactions, horizon, [x], [t_x], [T])[0]
        )
        if models.spend is not None:
            # Mean value of the repeat order days, as the Gamma-Gamma model is fitted on.
            by_day: dict[object, float] = {}
            for o in known:
                by_day[o.at.date()] = by_day.get(o.at.date(), 0.0) + o.amount
            repeat_values = [by_day[day] for day in order_days[1:]]
            zbar = math.fsum(repeat_values) / len(repeat_values) if repeat_values else 0.0
            clv = gg.customer_lifetime_value(
                models.transactions,
                models.spend,
                [x],
                [t_x],
                [T],
                [zbar],
                months=cfg.clv_months,
                monthly_discount_rate=cfg.monthly_discount_rate,
                periods_per_month=(365.25 / 12) / unit,
            )
            metrics[MetricField.PREDICTED_CLV] = float(clv[0])
    return metrics


# --------------------------------------------------------------------------- the whole base at once


@dataclass(frozen=True)
class BaseHistory:
    """Per-customer aggregates of a whole base as aligned float arrays (NaN = unknown / none).

    Days are UTC day numbers; `frequency`, `recency`, `T` and `repeat_mean_value` are the BG/NBD and
    Gamma-Gamma inputs (section 1 of docs/lifecycle.md) in the model's time unit.
    """

    orders: FloatArray
    revenue: FloatArray
    first_order_day: FloatArray
    last_order_day: FloatArray
    signup_day: FloatArray
    orders_recent: FloatArray  # orders in the last growth window
    orders_previous: FloatArray  # orders in the window before
    frequency: FloatArray
    recency: FloatArray
    T: FloatArray
    repeat_mean_value: FloatArray
    nps_score: FloatArray
    csat_score: FloatArray
    referrals_given: FloatArray


def base_columns(
    history: BaseHistory,
    as_of_day: float,
    models: FittedModels | None = None,
    settings: SnapshotSettings | None = None,
) -> tuple[dict[str, FloatArray | npt.NDArray[np.str_] | npt.NDArray[np.int64]], rfm.RfmScores]:
    """The metric columns of every customer (for `stages.classify_many`), and the base's RFM scores.

    Same definitions as `customer_metrics`, vectorized; RFM quintiles are computed over this base.
    """
    cfg = settings or SnapshotSettings()
    bought = history.orders > 0
    unknown = np.full(history.orders.shape, np.nan)
    since_last = np.where(bought, as_of_day - history.last_order_day, np.nan)
    scores = rfm.score(since_last, history.orders.astype(np.int64), history.revenue)
    category = np.select(
        [history.nps_score >= 9, history.nps_score >= 7, history.nps_score >= 0],
        ["promoter", "passive", "detractor"],
        default="",
    )
    columns: dict[str, FloatArray | npt.NDArray[np.str_] | npt.NDArray[np.int64]] = {
        MetricField.ORDERS.value: history.orders,
        MetricField.REVENUE.value: history.revenue,
        MetricField.DAYS_SINCE_SIGNUP.value: np.maximum(as_of_day - history.signup_day, 0.0),
        MetricField.DAYS_SINCE_FIRST_ORDER.value: np.where(
            bought, as_of_day - history.first_order_day, np.nan
        ),
        MetricField.DAYS_SINCE_LAST_ORDER.value: since_last,
        MetricField.ORDER_TREND.value: history.orders_recent - history.orders_previous,
        MetricField.NPS_SCORE.value: history.nps_score,
        MetricField.NPS_CATEGORY.value: category,
        MetricField.CSAT_SCORE.value: history.csat_score,
        MetricField.REFERRALS_GIVEN.value: history.referrals_given,
        MetricField.RFM_R.value: scores.r_score,
        MetricField.RFM_F.value: scores.f_score,
        MetricField.RFM_M.value: scores.m_score,
        MetricField.P_ALIVE.value: unknown,
        MetricField.CHURN_RISK.value: unknown,
        MetricField.EXPECTED_ORDERS.value: unknown,
        MetricField.PREDICTED_CLV.value: unknown,
    }
    if models is not None:
        # Predictions only for buyers: leads have no purchase history to condition on.
        x, t_x, T = history.frequency[bought], history.recency[bought], history.T[bought]
        p_alive = unknown.copy()
        p_alive[bought] = bgnbd.probability_alive(models.transactions, x, t_x, T)
        columns[MetricField.P_ALIVE.value] = p_alive
        columns[MetricField.CHURN_RISK.value] = 1.0 - p_alive
        horizon = cfg.prediction_horizon_days / cfg.model_time_unit_days
        expected = unknown.copy()
        expected[bought] = bgnbd.expected_purchases(models.transactions, horizon, x, t_x, T)
        columns[MetricField.EXPECTED_ORDERS.value] = expected
        if models.spend is not None:
            clv = unknown.copy()
            clv[bought] = gg.customer_lifetime_value(
                models.transactions,
                models.spend,
                x,
                t_x,
                T,
                history.repeat_mean_value[bought],
                months=cfg.clv_months,
                monthly_discount_rate=cfg.monthly_discount_rate,
                periods_per_month=(365.25 / 12) / cfg.model_time_unit_days,
            )
            columns[MetricField.PREDICTED_CLV.value] = clv
    return columns, scores

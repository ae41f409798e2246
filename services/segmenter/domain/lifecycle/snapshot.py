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

from pydantic import BaseModel, ConfigDict, Field

from services.segmenter.domain.lifecycle import bgnbd
from services.segmenter.domain.lifecycle import gamma_gamma as gg
from services.segmenter.domain.lifecycle.stages import MetricField, MetricValue
from services.segmenter.domain.lifecycle.voice import nps_category

SECONDS_PER_DAY = 86_400.0


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

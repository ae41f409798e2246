"""A customer's metrics snapshot from their orders and the fitted models."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.segmenter.domain.lifecycle import bgnbd
from services.segmenter.domain.lifecycle import gamma_gamma as gg
from services.segmenter.domain.lifecycle.snapshot import (
    FittedModels,
    Order,
    SnapshotSettings,
    customer_metrics,
)
from services.segmenter.domain.lifecycle.stages import Stage, classify, default_policy

AS_OF = datetime(2026, 6, 30, 12, 0, tzinfo=UTC)
MODELS = FittedModels(
    transactions=bgnbd.BgNbdParams(r=0.243, alpha=4.414, a=0.793, b=2.426),
    spend=gg.GammaGammaParams(p=6.25, q=3.74, v=15.44),
)


def days_ago(days: float) -> datetime:
    return AS_OF - timedelta(days=days)


def test_a_lead_without_orders() -> None:
    metrics = customer_metrics(as_of=AS_OF, orders=[], signed_up_at=days_ago(400), models=MODELS)

    assert metrics["orders"] == 0
    assert metrics["revenue"] == 0.0
    assert metrics["days_since_signup"] == pytest.approx(400)
    assert metrics["days_since_last_order"] is None
    assert metrics["p_alive"] is None
    assert classify(metrics, default_policy()).stage is Stage.ACQUISITION


def test_a_repeat_customer_by_hand() -> None:
    orders = [
        Order(days_ago(200), 20.0),
        Order(days_ago(100), 30.0),
        Order(days_ago(100) + timedelta(hours=1), 10.0),  # same day: one purchase day worth 40
        Order(days_ago(50), 60.0),
        Order(days_ago(10), 50.0),
        Order(AS_OF + timedelta(days=1), 999.0),  # not known yet
    ]

    metrics = customer_metrics(
        as_of=AS_OF,
        orders=orders,
        models=MODELS,
        latest_nps=9,
        latest_csat=4,
        referrals_given=1,
        rfm_scores=(5, 4, 3),
    )

    assert metrics["orders"] == 5
    assert metrics["revenue"] == pytest.approx(170.0)
    assert metrics["days_since_first_order"] == pytest.approx(200)
    assert metrics["days_since_last_order"] == pytest.approx(10)
    # Last 90 days: 50 and 10 days ago (2); the 90 before: 100 days ago twice (2).
    assert metrics["order_trend"] == 0
    assert (metrics["nps_score"], metrics["nps_category"], metrics["csat_score"]) == (9, "promoter", 4)
    assert (metrics["rfm_r"], metrics["rfm_f"], metrics["rfm_m"]) == (5, 4, 3)
    # BG/NBD inputs in weeks: 4 purchase days -> x = 3, t_x = 190 / 7, T = 200 / 7.
    x, t_x, T = 3.0, 190 / 7, 200 / 7
    p_alive = bgnbd.probability_alive(MODELS.transactions, [x], [t_x], [T])[0]
    assert metrics["p_alive"] == pytest.approx(p_alive)
    assert metrics["churn_risk"] == pytest.approx(1 - p_alive)
    assert metrics["expected_orders"] == pytest.approx(
        bgnbd.expected_purchases(MODELS.transactions, 90 / 7, [x], [t_x], [T])[0]
    )
    # Repeat purchase days are worth 40, 60 and 50.
    assert MODELS.spend is not None
    clv = gg.customer_lifetime_value(
        MODELS.transactions,
        MODELS.spend,
        [x],
        [t_x],
        [T],
        [50.0],
        months=12,
        periods_per_month=365.25 / 12 / 7,
    )
    assert metrics["predicted_clv"] == pytest.approx(clv[0])
    assert classify(metrics, default_policy()).stage is Stage.ADVOCACY


def test_without_fitted_models_the_predictions_are_unknown() -> None:
    metrics = customer_metrics(as_of=AS_OF, orders=[Order(days_ago(5), 12.0)], signed_up_at=days_ago(6))

    assert metrics["p_alive"] is None
    assert metrics["predicted_clv"] is None
    assert metrics["order_trend"] == 1
    assert classify(metrics, default_policy()).stage is Stage.ONBOARDING


def test_rising_orders_and_a_shorter_growth_window() -> None:
    orders = [Order(days_ago(d), 10.0) for d in (300, 200, 25, 20, 15, 5)]
    assert customer_metrics(as_of=AS_OF, orders=orders)["order_trend"] == 4
    narrow = SnapshotSettings(growth_window_days=10)
    # Last 10 days: 5 (1); the 10 before: 15 (1).
    assert customer_metrics(as_of=AS_OF, orders=orders, settings=narrow)["order_trend"] == 0
    metrics = customer_metrics(as_of=AS_OF, orders=orders, models=FittedModels(MODELS.transactions))
    assert metrics["predicted_clv"] is None
    assert metrics["p_alive"] is not None

"""Retention, churn, cohorts, NPS over time and group averages on hand-computed cases."""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest

from services.segmenter.domain.lifecycle import kpis
from services.segmenter.domain.lifecycle.kpis import PurchaseLog


def log_of(purchases: list[tuple[str, str]]) -> PurchaseLog:
    customers = np.array([c for c, _ in purchases])
    days = np.array([d for _, d in purchases], dtype="datetime64[D]")
    return PurchaseLog.from_arrays(customers, days)


RETENTION_LOG = log_of(
    [
        ("a", "2024-01-10"),
        ("a", "2024-02-20"),
        ("b", "2024-01-20"),  # lapses
        ("c", "2024-02-15"),  # new in the period
        ("d", "2023-10-01"),  # lapsed before the period...
        ("d", "2024-02-25"),  # ...and came back
    ]
)


def test_retention_by_hand() -> None:
    # 30-day window. At 01-31: a, b. At 02-29: a, c, d. New: c. Retained: a. Reactivated: d.
    period = kpis.retention(RETENTION_LOG, date(2024, 1, 31), date(2024, 2, 29), active_window_days=30)

    assert (period.customers_at_start, period.customers_at_end, period.new_customers) == (2, 3, 1)
    assert (period.retained, period.reactivated) == (1, 1)
    assert period.retention_rate == pytest.approx((3 - 1) / 2)
    assert period.churn_rate == pytest.approx((2 - 1) / 2)
    assert period.start == "2024-01-31"
    assert period.end == "2024-02-29"


def test_retention_with_nobody_at_start_is_none_not_an_error() -> None:
    period = kpis.retention(RETENTION_LOG, date(2023, 6, 1), date(2023, 12, 31), active_window_days=30)
    assert period.customers_at_start == 0
    assert period.retention_rate is None
    assert period.churn_rate is None
    assert period.new_customers == 1  # d's first purchase


def test_retention_on_an_empty_log() -> None:
    empty = PurchaseLog.from_arrays(np.array([], dtype=str), np.array([], dtype="datetime64[D]"))
    period = kpis.retention(empty, date(2024, 1, 1), date(2024, 2, 1))
    assert period.as_json() == {
        "start": "2024-01-01",
        "end": "2024-02-01",
        "customers_at_start": 0,
        "customers_at_end": 0,
        "new_customers": 0,
        "retained": 0,
        "reactivated": 0,
        "retention_rate": None,
        "churn_rate": None,
    }


def test_everyone_retained() -> None:
    log = log_of([("a", "2024-01-01"), ("a", "2024-01-20"), ("b", "2024-01-02"), ("b", "2024-01-25")])
    period = kpis.retention(log, date(2024, 1, 10), date(2024, 1, 30), active_window_days=15)
    assert period.retention_rate == 1.0
    assert period.churn_rate == 0.0


def test_retention_series_over_month_boundaries() -> None:
    series = kpis.retention_series(
        RETENTION_LOG, [date(2024, 1, 31), date(2024, 2, 29), date(2024, 3, 31)], active_window_days=30
    )
    assert [p["end"] for p in series] == ["2024-02-29", "2024-03-31"]
    # Nobody bought in March: all three February customers churned.
    assert series[1]["customers_at_start"] == 3
    assert series[1]["churn_rate"] == 1.0
    assert series[1]["retention_rate"] == 0.0


def test_invalid_periods() -> None:
    with pytest.raises(ValueError):
        kpis.retention(RETENTION_LOG, date(2024, 2, 1), date(2024, 1, 1))
    with pytest.raises(ValueError):
        kpis.retention(RETENTION_LOG, date(2024, 1, 1), date(2024, 2, 1), active_window_days=0)


def test_cohort_retention_table_by_hand() -> None:
    log = log_of(
        [
            ("a", "2024-01-05"),
            ("a", "2024-02-10"),
            ("a", "2024-02-11"),  # twice in a month is still one active month
            ("b", "2024-01-31"),
            ("e", "2024-01-15"),
            ("e", "2024-03-01"),
            ("c", "2024-02-03"),
            ("c", "2024-03-14"),
            ("c", "2024-04-02"),  # after as_of: ignored
        ]
    )

    table = kpis.cohort_retention(log, date(2024, 3, 15))

    assert table["months_since"] == [0, 1, 2]
    january, february = table["cohorts"]
    assert january == {
        "cohort": "2024-01",
        "size": 3,
        "active": [3, 1, 1],
        "retention": [1.0, pytest.approx(1 / 3), pytest.approx(1 / 3)],
    }
    # February's month 2 (April) is not observed yet.
    assert february == {"cohort": "2024-02", "size": 1, "active": [1, 1, None], "retention": [1.0, 1.0, None]}


def test_cohort_retention_of_nothing() -> None:
    assert kpis.cohort_retention(RETENTION_LOG, date(2020, 1, 1)) == {"months_since": [], "cohorts": []}


def test_nps_over_time_by_month_with_an_empty_month() -> None:
    answered = np.array(["2024-01-03", "2024-01-20", "2024-01-31", "2024-03-02"], dtype="datetime64[D]")
    series = kpis.nps_over_time(answered, [10, 9, 3, 7], date(2024, 1, 1), date(2024, 3, 31), "month")

    assert [p["period"] for p in series] == ["2024-01", "2024-02", "2024-03"]
    assert series[0]["nps"] == pytest.approx(100 * (2 - 1) / 3)
    assert series[1] == {
        "period": "2024-02",
        "responses": 0,
        "promoters": 0,
        "passives": 0,
        "detractors": 0,
        "nps": None,
    }
    assert series[2]["nps"] == 0.0


def test_nps_over_time_by_week_starts_on_monday() -> None:
    # 2024-01-01 was a Monday; 01-07 is the Sunday of the same week.
    answered = np.array(["2024-01-01", "2024-01-07", "2024-01-08"], dtype="datetime64[D]")
    series = kpis.nps_over_time(answered, [10, 0, 9], date(2024, 1, 3), date(2024, 1, 9), "week")
    assert [(p["period"], p["responses"]) for p in series] == [("2024-01-01", 1), ("2024-01-08", 1)]


def test_nps_over_time_by_day_and_range_filter() -> None:
    answered = np.array(["2024-01-01", "2024-01-02", "2024-01-05"], dtype="datetime64[D]")
    series = kpis.nps_over_time(answered, [10, 0, 9], date(2024, 1, 2), date(2024, 1, 3), "day")
    assert [(p["period"], p["nps"]) for p in series] == [("2024-01-02", -100.0), ("2024-01-03", None)]


def test_average_by_group() -> None:
    result = kpis.average_by_group(["growth", "growth", "churned", "at_risk"], [100.0, 50.0, 10.0, np.nan])
    assert result == {
        "at_risk": {"count": 0, "mean": None},
        "churned": {"count": 1, "mean": 10.0},
        "growth": {"count": 2, "mean": 75.0},
    }


def test_distribution_and_transitions() -> None:
    before = ["onboarding", "onboarding", "growth", "growth"]
    after = ["growth", "onboarding", "at_risk", "growth"]
    assert kpis.distribution(after) == {"at_risk": 1, "growth": 2, "onboarding": 1}
    assert kpis.transitions(before, after) == {
        "growth": {"at_risk": 1, "growth": 1},
        "onboarding": {"growth": 1, "onboarding": 1},
    }
    assert kpis.transitions([], []) == {}


def test_new_customers_who_lapse_within_the_period_are_not_subtracted() -> None:
    log = log_of(
        [
            ("a", "2023-12-20"),
            ("a", "2024-03-20"),  # retained
            ("b", "2023-12-25"),  # lapses
            ("n", "2024-01-05"),  # new, lapsed again by the end of March (30-day window)
            ("m", "2024-03-25"),  # new and active at the end
        ]
    )
    period = kpis.retention(log, date(2023, 12, 31), date(2024, 3, 31), active_window_days=30)
    assert (period.customers_at_start, period.customers_at_end, period.new_customers) == (2, 2, 2)
    # (E - new customers counted in E) / S = (2 - 1) / 2.
    assert period.retention_rate == pytest.approx(0.5)
    assert period.churn_rate == pytest.approx(0.5)

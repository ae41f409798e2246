"""Frequency / recency / T / monetary value from a transaction log, against the published CDNOW summary."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import numpy as np
import pytest

from services.segmenter.domain.lifecycle.summary import summarize_transactions, to_day_numbers
from tests.segmenter.domain.lifecycle import cdnow

# The published file rounds to 2 decimals.
ROUNDING = 0.005 + 1e-9


def test_cdnow_transaction_log_reproduces_the_published_calibration_summary() -> None:
    log, published = cdnow.transactions(), cdnow.summary()

    got = summarize_transactions(log.customer, log.day, log.amount, cdnow.CALIBRATION_END, time_unit_days=7)

    assert len(got) == 2357
    np.testing.assert_array_equal(got.customer, published.customer)
    np.testing.assert_array_equal(got.frequency, published.x)
    assert np.max(np.abs(got.recency - published.t_x)) <= ROUNDING
    assert np.max(np.abs(got.T - published.T)) <= ROUNDING
    assert np.max(np.abs(got.monetary_value - published.zbar)) <= ROUNDING
    assert int(np.sum(got.frequency > 0)) == 946


def test_first_customer_by_hand() -> None:
    # CDNOW customer 1: purchases 1997-01-01, 01-18, 08-02 in the window (12-12 is after it).
    log = cdnow.transactions()
    got = summarize_transactions(log.customer, log.day, log.amount, cdnow.CALIBRATION_END, time_unit_days=7)
    assert got.frequency[0] == 2
    assert got.recency[0] == pytest.approx(213 / 7)
    assert got.T[0] == pytest.approx(272 / 7)
    assert got.monetary_value[0] == pytest.approx((29.73 + 14.96) / 2)
    assert got.revenue[0] == pytest.approx(29.33 + 29.73 + 14.96)


def test_same_day_orders_are_one_purchase_and_later_orders_are_ignored() -> None:
    customer = np.array(["a", "a", "a", "b", "c"])
    day = np.array(
        ["2024-01-01", "2024-01-01", "2024-01-11", "2024-01-05", "2024-02-01"], dtype="datetime64[D]"
    )
    amount = np.array([10.0, 5.0, 30.0, 8.0, 99.0])

    got = summarize_transactions(customer, day, amount, np.datetime64("2024-01-21"))

    # "c" only bought after the window: not a customer yet.
    assert list(got.customer) == ["a", "b"]
    assert list(got.frequency) == [1, 0]
    assert list(got.recency) == [10.0, 0.0]
    assert list(got.T) == [20.0, 16.0]
    # The first purchase period (10 + 5) is not a repeat; b has no repeat at all.
    assert list(got.monetary_value) == [30.0, 0.0]
    assert list(got.revenue) == [45.0, 8.0]


def test_empty_log() -> None:
    got = summarize_transactions(
        np.array([], dtype=np.int64), np.array([], dtype="datetime64[D]"), None, np.datetime64("2024-01-01")
    )
    assert len(got) == 0


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError):
        summarize_transactions(np.array([1, 2]), np.array([1]), None, 10)


def test_python_datetimes_are_utc_days() -> None:
    paris_evening = datetime(2024, 1, 1, 23, 30, tzinfo=timezone(timedelta(hours=1)))  # 22:30 UTC, Jan 1st
    tokyo_morning = datetime(2024, 1, 2, 8, 0, tzinfo=timezone(timedelta(hours=9)))  # 23:00 UTC, Jan 1st
    got = to_day_numbers(
        np.array(
            [paris_evening, tokyo_morning, datetime(2024, 1, 2, tzinfo=UTC), date(2024, 1, 3)], dtype=object
        )
    )
    jan_1 = (date(2024, 1, 1) - date(1970, 1, 1)).days
    assert list(got) == [jan_1, jan_1, jan_1 + 1, jan_1 + 2]
    with pytest.raises(ValueError):
        to_day_numbers(np.array(["yesterday"], dtype=object))

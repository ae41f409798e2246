"""RFM raw values and quintile scores on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from services.segmenter.domain.lifecycle import rfm


def test_ten_distinct_values_fill_each_quintile_twice() -> None:
    scores = rfm.quintile_scores([10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    assert list(scores) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_order_of_input_does_not_matter() -> None:
    scores = rfm.quintile_scores([50, 10, 30, 20, 40])
    assert list(scores) == [5, 1, 3, 2, 4]


def test_ties_share_the_score_of_their_mid_rank() -> None:
    # 1,1 -> percentile (0 + 2) / 10 = 0.2 -> 1; 2,2,2 -> (2 + 5) / 10 = 0.7 -> 4.
    assert list(rfm.quintile_scores([1, 1, 2, 2, 2])) == [1, 1, 4, 4, 4]


def test_all_equal_values_score_the_middle() -> None:
    assert list(rfm.quintile_scores([7.0] * 6)) == [3] * 6


def test_single_customer_scores_the_middle() -> None:
    assert list(rfm.quintile_scores([42.0])) == [3]


def test_no_customers() -> None:
    assert rfm.quintile_scores([]).size == 0
    result = rfm.score([], [], [])
    assert result.r_score.size == 0


def test_score_a_small_base_by_hand() -> None:
    # Five buyers and one lead who never ordered.
    recency = [1.0, 5.0, 10.0, 30.0, 90.0, np.nan]
    frequency = [10, 4, 4, 2, 1, 0]
    monetary = [500.0, 200.0, 220.0, 50.0, 20.0, 0.0]

    result = rfm.score(recency, frequency, monetary)

    # Recency is inverted: 1 day ago is the best.
    assert list(result.r_score) == [5, 4, 3, 2, 1, 0]
    # Over {1, 2, 4, 4, 10} the tied 4s have percentile (2 below + 4 at or below) / 10 = 0.6 -> 3.
    assert list(result.f_score) == [5, 3, 3, 2, 1, 0]
    assert list(result.m_score) == [5, 3, 4, 2, 1, 0]
    assert list(result.cell) == [555, 433, 334, 222, 111, 0]
    assert np.isnan(result.recency_days[5])


def test_only_leads_means_no_scores() -> None:
    result = rfm.score([np.nan, np.nan], [0, 0], [0.0, 0.0])
    assert list(result.r_score) == [0, 0]
    assert list(result.f_score) == [0, 0]
    assert list(result.m_score) == [0, 0]


def test_raw_values_no_purchase() -> None:
    assert rfm.raw_values([], [], as_of_day=100) == rfm.RawRfm(recency_days=None, frequency=0, monetary=0.0)


def test_raw_values_one_purchase() -> None:
    assert rfm.raw_values([90], [25.5], as_of_day=100) == rfm.RawRfm(
        recency_days=10.0, frequency=1, monetary=25.5
    )


def test_raw_values_ignore_future_orders() -> None:
    got = rfm.raw_values([10, 40, 120], [1.0, 2.0, 4.0], as_of_day=100)
    assert got == rfm.RawRfm(recency_days=60.0, frequency=2, monetary=3.0)


def test_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        rfm.score([1.0], [1, 2], [1.0])
    with pytest.raises(ValueError):
        rfm.raw_values([1], [], as_of_day=2)


@pytest.mark.parametrize("ones, twos", [(90, 5), (70, 20)])
def test_between_refits_a_tied_value_scores_as_the_refit_scored_it(ones: int, twos: int) -> None:
    """Most buyers ordered once: the frequency cut points are all 1. Scored against them on the event
    path, such a buyer got F 1 where the refit's mid-rank gave 3 (or 2), so any event dropped it."""
    from services.segmenter.domain.lifecycle.tracking import RfmCuts

    frequency = np.array([1.0] * ones + [2.0] * twos + [5.0] * (100 - ones - twos))
    recency = np.linspace(1, 300, 100)
    monetary = np.linspace(10, 500, 100)
    base = rfm.score(recency, frequency, monetary)
    cuts = RfmCuts.of_base(base)
    _, f, _ = cuts.score(recency, frequency, monetary)
    assert f[0] == base.f_score[0]  # the refit's score of a one-order buyer
    assert np.array_equal(f[frequency == 1.0], base.f_score[frequency == 1.0])

"""BG/NBD against Fader, Hardie & Lee (2005) on CDNOW, and its predictions against independent checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, special, stats

from services.segmenter.domain.lifecycle import bgnbd
from services.segmenter.domain.lifecycle.summary import summarize_transactions
from tests.segmenter.domain.lifecycle import cdnow

PAPER = bgnbd.BgNbdParams(r=0.243, alpha=4.414, a=0.793, b=2.426)
PAPER_LOG_LIKELIHOOD = -9582.4


def assert_close_to_paper(params: bgnbd.BgNbdParams) -> None:
    for name in ("r", "alpha", "a", "b"):
        assert getattr(params, name) == pytest.approx(getattr(PAPER, name), rel=0.01), name


def test_fit_on_the_published_cdnow_summary_reproduces_the_paper() -> None:
    data = cdnow.summary()

    fit = bgnbd.fit(data.x, data.t_x, data.T)

    assert fit.converged
    assert fit.n_customers == 2357
    assert_close_to_paper(fit.params)
    assert fit.log_likelihood == pytest.approx(PAPER_LOG_LIKELIHOOD, abs=0.05)
    assert fit.iterations > 0


def test_fit_on_the_raw_cdnow_transactions_reproduces_the_paper() -> None:
    log = cdnow.transactions()
    summary = summarize_transactions(
        log.customer, log.day, log.amount, cdnow.CALIBRATION_END, time_unit_days=7
    )

    fit = bgnbd.fit(summary.frequency, summary.recency, summary.T)

    assert fit.converged
    assert_close_to_paper(fit.params)
    assert fit.log_likelihood == pytest.approx(PAPER_LOG_LIKELIHOOD, abs=0.05)


def test_log_likelihood_matches_the_paper_formula_evaluated_directly() -> None:
    # FHL (2005) eq. 6 with plain gamma / beta functions, no logs: fine for small x.
    r, alpha, a, b = 0.243, 4.414, 0.793, 2.426
    customers = [(0, 0.0, 38.86), (1, 1.71, 38.86), (2, 30.43, 38.86), (5, 20.0, 30.0)]

    def beta(p: float, q: float) -> float:
        return math.gamma(p) * math.gamma(q) / math.gamma(p + q)

    for x, t_x, T in customers:
        head = math.gamma(r + x) * alpha**r / math.gamma(r)
        value = beta(a, b + x) / beta(a, b) * head / (alpha + T) ** (r + x)
        if x > 0:
            value += beta(a + 1, b + x - 1) / beta(a, b) * head / (alpha + t_x) ** (r + x)
        got = bgnbd.log_likelihood_per_customer(PAPER, [x], [t_x], [T])[0]
        assert got == pytest.approx(math.log(value), rel=1e-10)


def test_log_likelihood_stays_finite_for_very_frequent_buyers() -> None:
    got = bgnbd.log_likelihood_per_customer(PAPER, [5000, 20000], [51.9, 52.0], [52.0, 52.0])
    assert np.all(np.isfinite(got))
    assert np.all(np.isfinite(bgnbd.probability_alive(PAPER, [5000], [51.9], [52.0])))


def test_p_alive_and_churn_risk() -> None:
    alive = bgnbd.probability_alive(
        PAPER, [0, 2, 2, 2], [0.0, 30.43, 30.43, 10.0], [38.86, 38.86, 60.0, 38.86]
    )

    # Without a repeat purchase the model cannot have seen a drop-out.
    assert alive[0] == 1.0
    # The longer since the last purchase, the less likely alive.
    assert alive[1] > alive[2]
    assert alive[1] > alive[3]
    # FHL eq. 11 by hand for (2, 30.43, 38.86).
    r, alpha, a, b = 0.243, 4.414, 0.793, 2.426
    by_hand = 1 / (1 + a / (b + 2 - 1) * ((alpha + 38.86) / (alpha + 30.43)) ** (r + 2))
    assert alive[1] == pytest.approx(by_hand, rel=1e-12)
    risk = bgnbd.churn_risk(PAPER, [2], [30.43], [38.86])
    assert risk[0] == pytest.approx(1 - by_hand, rel=1e-12)


def test_expected_purchases_of_a_brand_new_customer_is_the_unconditional_expectation() -> None:
    for t in (1.0, 13.0, 39.0, 78.0):
        conditional = bgnbd.expected_purchases(PAPER, t, [0], [0.0], [0.0])[0]
        assert conditional == pytest.approx(float(bgnbd.expected_purchases_new_customer(PAPER, t)), rel=1e-10)


def _expected_by_quadrature(x: int, t_x: float, T: float, t: float, n: int = 1500) -> float:
    """E[Y(t) | x, t_x, T] by integrating over the posterior of (lambda, p) on a quantile grid.

    Independent of the closed form: posterior weight = likelihood given (lambda, p); a customer alive
    at T buys (1 - exp(-lambda p t)) / p more times in expectation (FHL 2005, eq. 8).
    """
    u = (np.arange(n) + 0.5) / n
    lam = stats.gamma.ppf(u, PAPER.r, scale=1 / PAPER.alpha)[:, None]
    p = stats.beta.ppf(u, PAPER.a, PAPER.b)[None, :]
    alive = (1 - p) ** x * lam**x * np.exp(-lam * T)
    dead = (p * (1 - p) ** (x - 1) * lam**x * np.exp(-lam * t_x)) if x > 0 else 0.0
    future = (1 - np.exp(-lam * p * t)) / p
    return float(np.sum(alive * future) / np.sum(alive + dead))


@pytest.mark.parametrize(("x", "t_x", "T"), [(0, 0.0, 38.86), (2, 30.43, 38.86), (4, 12.0, 38.86)])
def test_conditional_expectation_matches_numerical_integration(x: int, t_x: float, T: float) -> None:
    closed_form = bgnbd.expected_purchases(PAPER, 39.0, [x], [t_x], [T])[0]
    assert closed_form == pytest.approx(_expected_by_quadrature(x, t_x, T, 39.0), rel=1e-4)


def test_fit_recovers_the_parameters_of_simulated_customers() -> None:
    rng = np.random.default_rng(7)
    T = rng.uniform(26.0, 39.0, size=30_000)
    x, t_x = bgnbd.simulate(PAPER, T, rng)

    fit = bgnbd.fit(x, t_x, T)

    assert fit.converged
    assert fit.params.r == pytest.approx(PAPER.r, rel=0.1)
    assert fit.params.alpha == pytest.approx(PAPER.alpha, rel=0.15)
    assert fit.params.a == pytest.approx(PAPER.a, rel=0.2)
    assert fit.params.b == pytest.approx(PAPER.b, rel=0.25)


def test_weights_count_identical_customers() -> None:
    data = cdnow.summary()
    rows = np.stack([data.x, data.t_x, data.T], axis=1)
    unique, counts = np.unique(rows, axis=0, return_counts=True)

    grouped = bgnbd.fit(unique[:, 0], unique[:, 1], unique[:, 2], weights=counts)

    assert grouped.n_customers == 2357
    assert_close_to_paper(grouped.params)


@pytest.mark.parametrize(
    ("x", "t_x", "T"),
    [([-1], [0.0], [1.0]), ([1], [2.0], [1.0]), ([0], [1.0], [2.0]), ([1, 2], [0.5], [1.0])],
)
def test_impossible_inputs_are_rejected(x: list[float], t_x: list[float], T: list[float]) -> None:
    with pytest.raises(ValueError):
        bgnbd.probability_alive(PAPER, x, t_x, T)


def test_fit_needs_customers() -> None:
    with pytest.raises(ValueError):
        bgnbd.fit([], [], [])


@pytest.mark.parametrize("start", [(0.243, 4.414, 0.793, 2.426), (1.0, 2.0, 1.5, 0.7), (3.0, 20.0, 0.2, 9.0)])
def test_analytic_gradient_matches_finite_differences(start: tuple[float, float, float, float]) -> None:
    data = cdnow.summary()
    sample = bgnbd._Sample(data.x, data.t_x, data.T)
    point = np.log(np.array(start))

    error = optimize.check_grad(
        lambda p: sample.negative_mean_and_gradient(p)[0],
        lambda p: sample.negative_mean_and_gradient(p)[1],
        point,
    )

    assert error < 1e-5 * max(1.0, float(np.linalg.norm(sample.negative_mean_and_gradient(point)[1])))


def test_expected_purchases_of_heavy_buyers_over_long_horizons_stay_finite() -> None:
    # The untransformed closed form gives 0 * inf = NaN here (FHL's #NUM! problem).
    horizons = [52.0, 104.0, 520.0]
    expected = [bgnbd.expected_purchases(PAPER, t, [2000], [51.9], [52.0])[0] for t in horizons]
    assert all(np.isfinite(expected))
    assert 0 < expected[0] < expected[1] < expected[2]
    # Alive and buying ~38 a week: the first year should bring roughly a year's purchases.
    assert 1000 < expected[0] < 2000 * 1.1


def test_expected_purchases_match_the_untransformed_closed_form_where_it_is_stable() -> None:
    r, alpha, a, b = PAPER.r, PAPER.alpha, PAPER.a, PAPER.b
    for x, t_x, T, t in [(1, 5.0, 38.0, 10.0), (7, 30.0, 35.0, 52.0), (20, 20.0, 39.0, 39.0)]:
        hyp = special.hyp2f1(r + x, b + x, a + b + x - 1, t / (alpha + T + t))
        head = (a + b + x - 1) / (a - 1) * (1 - ((alpha + T) / (alpha + T + t)) ** (r + x) * hyp)
        direct = head / (1 + a / (b + x - 1) * ((alpha + T) / (alpha + t_x)) ** (r + x))
        assert bgnbd.expected_purchases(PAPER, t, [x], [t_x], [T])[0] == pytest.approx(direct, rel=1e-9)

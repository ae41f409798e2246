"""Gamma-Gamma model of spend per transaction, and predicted CLV.

Fader & Hardie (2013), "The Gamma-Gamma Model of Monetary Value" (after Colombo & Jiang 1999):
a customer's transaction values are Gamma(p, rate nu) around a personal mean p/nu, with
nu ~ Gamma(q, rate v) across customers. Fitted on customers with at least one repeat purchase,
using x = frequency (repeat purchases) and zbar = mean value of those repeat purchases.
Spend is assumed independent of the purchase process, which is what lets it be combined with BG/NBD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import optimize, special

from services.segmenter.domain.lifecycle import bgnbd
from services.segmenter.domain.lifecycle.fit import ModelFit

FloatArray = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike

# lifetimes' `customer_lifetime_value` month lengths, kept so results are comparable with it.
PERIODS_PER_MONTH = {"days": 30.0, "weeks": 4.345, "months": 1.0}


@dataclass(frozen=True)
class GammaGammaParams:
    p: float
    q: float
    v: float

    def as_array(self) -> FloatArray:
        return np.array([self.p, self.q, self.v], dtype=np.float64)

    @property
    def population_mean_spend(self) -> float:
        """E[Z] = p v / (q - 1) over all customers (infinite when q <= 1)."""
        return self.p * self.v / (self.q - 1.0) if self.q > 1.0 else float("inf")


# Parameters plus log-likelihood, iterations, convergence: shared with the other lifecycle model.
GammaGammaFit = ModelFit[GammaGammaParams]


def _repeat_buyers(frequency: ArrayLike, monetary_value: ArrayLike) -> tuple[FloatArray, FloatArray]:
    x = np.asarray(frequency, dtype=np.float64)
    zbar = np.asarray(monetary_value, dtype=np.float64)
    if x.shape != zbar.shape:
        raise ValueError("frequency and monetary_value must have the same shape")
    keep = x > 0
    x, zbar = x[keep], zbar[keep]
    if np.any(zbar <= 0):
        raise ValueError("monetary_value must be > 0 for customers with repeat purchases")
    return x, zbar


def _log_likelihood(p: float, q: float, v: float, x: FloatArray, zbar: FloatArray) -> FloatArray:
    # Density of the mean zbar of x transactions: Gamma(px, rate x nu) mixed over nu ~ Gamma(q, rate v).
    px = p * x
    result: FloatArray = (
        special.gammaln(px + q)
        - special.gammaln(px)
        - special.gammaln(q)
        + q * np.log(v)
        + (px - 1.0) * np.log(zbar)
        + px * np.log(x)
        - (px + q) * np.log(v + x * zbar)
    )
    return result


def log_likelihood(params: GammaGammaParams, frequency: ArrayLike, monetary_value: ArrayLike) -> float:
    """Sum over customers with frequency > 0 (others carry no spend information)."""
    x, zbar = _repeat_buyers(frequency, monetary_value)
    return float(np.sum(_log_likelihood(params.p, params.q, params.v, x, zbar)))


def fit(
    frequency: ArrayLike,
    monetary_value: ArrayLike,
    *,
    initial: GammaGammaParams | None = None,
    max_iterations: int = 2000,
) -> GammaGammaFit:
    """Maximum likelihood over log-parameters (L-BFGS-B, analytic gradient); frequency 0 is ignored."""
    x, zbar = _repeat_buyers(frequency, monetary_value)
    if x.size == 0:
        raise ValueError("cannot fit Gamma-Gamma without customers with repeat purchases")
    n = x.size
    log_x, log_zbar = np.log(x), np.log(zbar)

    def negative_mean_and_gradient(log_params: FloatArray) -> tuple[float, FloatArray]:
        p, q, v = (float(val) for val in np.exp(log_params))
        px = p * x
        log_spend = np.log(v + x * zbar)
        ll = (
            special.gammaln(px + q)
            - special.gammaln(px)
            - special.gammaln(q)
            + q * np.log(v)
            + (px - 1.0) * log_zbar
            + px * log_x
            - (px + q) * log_spend
        )
        digamma_pxq = special.digamma(px + q)
        d_p = x * (digamma_pxq - special.digamma(px) + log_zbar + log_x - log_spend)
        d_q = digamma_pxq - special.digamma(q) + np.log(v) - log_spend
        d_v = q / v - (px + q) / (v + x * zbar)
        value = -float(np.sum(ll)) / n
        gradient = -np.array([p * np.sum(d_p), q * np.sum(d_q), v * np.sum(d_v)]) / n
        if not np.isfinite(value) or not np.all(np.isfinite(gradient)):
            return 1e300, np.zeros(3)
        return value, gradient

    if initial is not None:
        start = np.log(initial.as_array())
    else:
        # p = q = 2 puts the mean spend p v / (q - 1) at 2 v: match the observed mean.
        start = np.log(np.array([2.0, 2.0, max(float(np.mean(zbar)) / 2.0, 1e-6)]))
    bounds = [(-15.0, 15.0)] * 3
    result = optimize.minimize(
        negative_mean_and_gradient,
        start,
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": max_iterations},
    )
    method = "L-BFGS-B"
    iterations, evaluations = int(result.nit), int(result.nfev)
    if not result.success:
        polish = optimize.minimize(
            lambda params: negative_mean_and_gradient(params)[0],
            result.x,
            method="Nelder-Mead",
            options={"maxiter": max_iterations, "xatol": 1e-8, "fatol": 1e-12},
        )
        if polish.fun <= result.fun:
            result = polish
        method = "L-BFGS-B+Nelder-Mead"
        iterations += int(polish.nit)
        evaluations += int(polish.nfev)
    p, q, v = (float(val) for val in np.exp(result.x))
    if q <= 1.0:
        # The fitted spend has no mean (heavy-tailed): p v / (q - 1) would make one-time buyers'
        # expected spend, and so their CLV, negative or unbounded. No spend model beats a wrong one.
        raise ValueError(f"spend too heavy-tailed for Gamma-Gamma (q = {q:.3f} <= 1): no mean spend")
    return GammaGammaFit(
        params=GammaGammaParams(p=p, q=q, v=v),
        log_likelihood=-float(result.fun) * n,
        iterations=iterations,
        function_evaluations=evaluations,
        converged=bool(result.success),
        message=str(result.message),
        n_customers=n,
        method=method,
    )


def expected_average_profit(
    params: GammaGammaParams, frequency: ArrayLike, monetary_value: ArrayLike
) -> FloatArray:
    """E[Z | x, zbar] = p (v + x zbar) / (p x + q - 1): a weighted mean of the population mean and zbar.

    With x = 0 this is the population mean p v / (q - 1), so new customers get a sensible value.
    """
    x = np.asarray(frequency, dtype=np.float64)
    zbar = np.where(x > 0, np.asarray(monetary_value, dtype=np.float64), 0.0)
    expected: FloatArray = params.p * (params.v + x * zbar) / (params.p * x + params.q - 1.0)
    return expected


def customer_lifetime_value(
    transactions: bgnbd.BgNbdParams,
    spend: GammaGammaParams,
    frequency: ArrayLike,
    recency: ArrayLike,
    T: ArrayLike,
    monetary_value: ArrayLike,
    *,
    months: int = 12,
    monthly_discount_rate: float = 0.01,
    periods_per_month: float = PERIODS_PER_MONTH["weeks"],
) -> FloatArray:
    """Discounted expected revenue over the next `months` (lifetimes' DCF method).

    CLV = sum_{m=1..months} E[Z] * (E[Y(m M)] - E[Y((m-1) M)]) / (1 + d)^m, with M periods per month
    in the BG/NBD time unit (4.345 for weeks, 30 for days) and d the monthly discount rate.
    """
    if months < 0 or monthly_discount_rate <= -1.0 or periods_per_month <= 0:
        raise ValueError("need months >= 0, discount rate > -1 and periods_per_month > 0")
    profit = expected_average_profit(spend, frequency, monetary_value)
    x = np.asarray(frequency, dtype=np.float64)
    horizons = [month * periods_per_month for month in range(1, months + 1)]
    cumulative = bgnbd.expected_purchases_at(transactions, horizons, x, recency, T)
    clv = np.zeros_like(x)
    previous = np.zeros_like(x)
    for month, purchases in enumerate(cumulative, start=1):
        clv += profit * (purchases - previous) / (1.0 + monthly_discount_rate) ** month
        previous = purchases
    return clv

"""BG/NBD model of repeat purchasing (Fader, Hardie & Lee 2005, "Counting your customers the easy way").

While alive a customer buys as a Poisson process with rate lambda ~ Gamma(shape r, rate alpha); after
each purchase they drop out with probability p ~ Beta(a, b). Inputs per customer are `frequency` x
(repeat purchases), `recency` t_x and age `T`, all in one time unit (weeks in the paper).
Everything is vectorized over customers and computed in log space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import optimize, special

from services.segmenter.domain.lifecycle.fit import ModelFit

FloatArray = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike


@dataclass(frozen=True)
class BgNbdParams:
    r: float
    alpha: float
    a: float
    b: float

    def as_array(self) -> FloatArray:
        return np.array([self.r, self.alpha, self.a, self.b], dtype=np.float64)


# Parameters plus log-likelihood, iterations, convergence: shared with the other lifecycle model.
BgNbdFit = ModelFit[BgNbdParams]


def _arrays(
    frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    x = np.asarray(frequency, dtype=np.float64)
    t_x = np.asarray(recency, dtype=np.float64)
    age = np.asarray(T, dtype=np.float64)
    if x.shape != t_x.shape or x.shape != age.shape:
        raise ValueError("frequency, recency and T must have the same shape")
    if np.any(x < 0) or np.any(t_x < 0) or np.any(t_x > age + 1e-9):
        raise ValueError("need frequency >= 0 and 0 <= recency <= T")
    if np.any((x == 0) & (t_x != 0)):
        raise ValueError("recency must be 0 when frequency is 0")
    return x, t_x, age


def log_likelihood_per_customer(
    params: BgNbdParams, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
) -> FloatArray:
    """ln L_i of FHL (2005) eq. 6, with ln(A + B) done as a log-sum-exp (no overflow for large x)."""
    sample = _Sample(*_arrays(frequency, recency, T))
    return sample.log_likelihood(params.r, params.alpha, params.a, params.b)


def log_likelihood(params: BgNbdParams, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike) -> float:
    return float(np.sum(log_likelihood_per_customer(params, frequency, recency, T)))


class _Sample:
    """Customers prepared once for many likelihood evaluations.

    Frequencies are small integers repeated across customers, so the gamma-function terms are computed
    once per distinct frequency and gathered, which is most of the speed of a refit.
    """

    def __init__(
        self, x: FloatArray, t_x: FloatArray, age: FloatArray, weights: FloatArray | None = None
    ) -> None:
        self.x, self.t_x, self.age = x, t_x, age
        self.weights = np.ones_like(x) if weights is None else weights
        self.distinct_x, self.x_index = np.unique(x, return_inverse=True)
        self.repeat = x > 0
        # Never used where x = 0 (the dropped-out term is -inf there); 1 avoids log(0) warnings.
        self.t_x_safe = np.where(self.repeat, t_x, 1.0)

    def _terms(self, r: float, alpha: float, a: float, b: float) -> tuple[FloatArray, FloatArray, FloatArray]:
        ux = self.distinct_x
        common_u = (
            special.gammaln(r + ux)
            - special.gammaln(r)
            + r * np.log(alpha)
            + special.gammaln(a + b)
            + special.gammaln(b + ux)
            - special.gammaln(b)
            - special.gammaln(a + b + ux)
        )
        still_alive = -(r + self.x) * np.log(alpha + self.age)
        # Dropped out right after the last purchase: B(a+1, b+x-1)/B(a, b+x) = a / (b+x-1).
        with np.errstate(divide="ignore", invalid="ignore"):
            dropped_u = np.where(ux > 0, np.log(a) - np.log(b + ux - 1), -np.inf)
        dropped = dropped_u[self.x_index] - (r + self.x) * np.log(alpha + self.t_x_safe)
        return common_u[self.x_index], still_alive, dropped

    def log_likelihood(self, r: float, alpha: float, a: float, b: float) -> FloatArray:
        common, still_alive, dropped = self._terms(r, alpha, a, b)
        result: FloatArray = common + np.logaddexp(still_alive, dropped)
        return result

    def negative_mean_and_gradient(self, log_params: FloatArray) -> tuple[float, FloatArray]:
        """-mean ln L and its gradient with respect to the log-parameters (analytic)."""
        r, alpha, a, b = (float(v) for v in np.exp(log_params))
        common, still_alive, dropped = self._terms(r, alpha, a, b)
        total_ll = common + np.logaddexp(still_alive, dropped)
        w, n = self.weights, float(np.sum(self.weights))
        # Share of each customer's likelihood carried by the "dropped out" branch.
        share_dropped = special.expit(dropped - still_alive)
        share_alive = 1.0 - share_dropped
        ux = self.distinct_x
        x = self.x
        digamma_r = (special.digamma(r + ux) - special.digamma(r))[self.x_index]
        d_r = digamma_r + np.log(alpha) - share_alive * np.log(alpha + self.age)
        d_r -= share_dropped * np.log(alpha + self.t_x_safe)
        d_alpha = r / alpha - (r + x) * (
            share_alive / (alpha + self.age) + share_dropped / (alpha + self.t_x_safe)
        )
        digamma_ab = special.digamma(a + b) - special.digamma(a + b + ux)
        d_a = digamma_ab[self.x_index] + share_dropped / a
        with np.errstate(divide="ignore"):
            inverse_b = np.where(ux > 0, 1.0 / (b + ux - 1), 0.0)
        d_b = (digamma_ab + special.digamma(b + ux) - special.digamma(b))[self.x_index]
        d_b -= share_dropped * inverse_b[self.x_index]
        # Elementwise products rather than np.dot: BLAS threads stall on a busy machine, for no gain here.
        value = -float(np.sum(w * total_ll)) / n
        sums = [np.sum(w * d_r), np.sum(w * d_alpha), np.sum(w * d_a), np.sum(w * d_b)]
        gradient = -np.array([r, alpha, a, b]) * np.array(sums) / n
        if not np.isfinite(value) or not np.all(np.isfinite(gradient)):
            return 1e300, np.zeros(4)
        return value, gradient


def _starting_values(x: FloatArray, age: FloatArray) -> FloatArray:
    # r = 1 makes lambda exponential with mean 1/alpha: match the observed purchase rate.
    rate = max(float(np.sum(x)) / max(float(np.sum(age)), 1e-12), 1e-6)
    start: FloatArray = np.log(np.array([1.0, 1.0 / rate, 1.0, 1.0]))
    return start


def fit(
    frequency: ArrayLike,
    recency: ArrayLike,
    T: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    initial: BgNbdParams | None = None,
    max_iterations: int = 2000,
) -> BgNbdFit:
    """Maximum-likelihood fit over log-parameters.

    L-BFGS-B with the analytic gradient; if it does not report convergence, Nelder-Mead polishes from
    where it stopped. `weights` counts identical customers (e.g. after grouping equal (x, t_x, T) rows).
    """
    x, t_x, age = _arrays(frequency, recency, T)
    if x.size == 0:
        raise ValueError("cannot fit BG/NBD on zero customers")
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if w is not None and (w.shape != x.shape or np.any(w < 0)):
        raise ValueError("weights must be >= 0 and aligned with the customers")
    sample = _Sample(x, t_x, age, w)
    total = float(np.sum(sample.weights))

    start = np.log(initial.as_array()) if initial is not None else _starting_values(x, age)
    # Log-parameters in [-15, 15] keep the optimizer away from overflow without binding at a sane optimum.
    bounds = [(-15.0, 15.0)] * 4
    result = optimize.minimize(
        sample.negative_mean_and_gradient,
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
            lambda p: sample.negative_mean_and_gradient(p)[0],
            result.x,
            method="Nelder-Mead",
            options={"maxiter": max_iterations, "xatol": 1e-8, "fatol": 1e-12},
        )
        if polish.fun <= result.fun:
            result = polish
        method = "L-BFGS-B+Nelder-Mead"
        iterations += int(polish.nit)
        evaluations += int(polish.nfev)
    r, alpha, a, b = (float(v) for v in np.exp(result.x))
    return BgNbdFit(
        params=BgNbdParams(r=r, alpha=alpha, a=a, b=b),
        log_likelihood=-float(result.fun) * total,
        iterations=iterations,
        function_evaluations=evaluations,
        converged=bool(result.success),
        message=str(result.message),
        n_customers=round(total),
        method=method,
    )


def probability_alive(
    params: BgNbdParams, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
) -> FloatArray:
    """P(alive at T | x, t_x, T) (FHL 2005 eq. 11 ); 1 for customers without repeat purchases."""
    x, t_x, age = _arrays(frequency, recency, T)
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    log_odds_dead = np.full_like(x, -np.inf)
    repeat = x > 0
    xr = x[repeat]
    log_age_ratio = np.log(alpha + age[repeat]) - np.log(alpha + t_x[repeat])
    log_odds_dead[repeat] = np.log(a) - np.log(b + xr - 1) + (r + xr) * log_age_ratio
    alive: FloatArray = special.expit(-log_odds_dead)
    return alive


def churn_risk(params: BgNbdParams, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike) -> FloatArray:
    """1 - P(alive)."""
    risk: FloatArray = 1.0 - probability_alive(params, frequency, recency, T)
    return risk


def expected_purchases(
    params: BgNbdParams, t: float | ArrayLike, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
) -> FloatArray:
    """E[Y(t) | x, t_x, T]: expected purchases in the next `t` time units (FHL 2005 eq. 10)."""
    x, t_x, age = _arrays(frequency, recency, T)
    horizon = np.broadcast_to(np.asarray(t, dtype=np.float64), x.shape)
    if np.any(horizon < 0):
        raise ValueError("t must be >= 0")
    return _expected_purchases(params, horizon, x, age, probability_alive(params, x, t_x, age))


def expected_purchases_at(
    params: BgNbdParams, horizons: Sequence[float], frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
) -> list[FloatArray]:
    """`expected_purchases` at several horizons, sharing P(alive) and the input checks (used by CLV)."""
    x, t_x, age = _arrays(frequency, recency, T)
    if any(h < 0 for h in horizons):
        raise ValueError("horizons must be >= 0")
    alive = probability_alive(params, x, t_x, age)
    return [_expected_purchases(params, np.full(x.shape, float(h)), x, age, alive) for h in horizons]


def _expected_purchases(
    params: BgNbdParams, horizon: FloatArray, x: FloatArray, age: FloatArray, alive: FloatArray
) -> FloatArray:
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    if abs(a - 1.0) < 1e-9:
        a = 1.0 + 1e-9  # the closed form has a removable singularity at a = 1
    z = horizon / (alpha + age + horizon)
    # Euler's transformation 2F1(A, B; C; z) = (1-z)^(C-A-B) 2F1(C-A, C-B; C; z) turns
    # ((alpha+T)/(alpha+T+t))^(r+x) 2F1(r+x, b+x; a+b+x-1; z) into a form whose parameters do not grow
    # with x: the direct one is 0 * inf for heavy buyers over long horizons.
    ratio = np.exp((a - 1) * (np.log(alpha + age) - np.log(alpha + age + horizon)))
    hyp = special.hyp2f1(a + b - 1 - r, a - 1, a + b + x - 1, z)
    numerator = (a + b + x - 1) / (a - 1) * (1.0 - ratio * hyp)
    # P(alive) = 1 / (1 + delta * ...): the denominator of eq. 10 is 1 / P(alive).
    expected: FloatArray = numerator * alive
    return expected


def expected_purchases_new_customer(params: BgNbdParams, t: float | ArrayLike) -> FloatArray:
    """E[X(t)] for a customer just acquired (FHL 2005 eq. 9)."""
    horizon = np.asarray(t, dtype=np.float64)
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    if abs(a - 1.0) < 1e-9:
        a = 1.0 + 1e-9
    hyp = special.hyp2f1(r, b, a + b - 1, horizon / (alpha + horizon))
    expected: FloatArray = (a + b - 1) / (a - 1) * (1.0 - (alpha / (alpha + horizon)) ** r * hyp)
    return expected


def simulate(params: BgNbdParams, T: ArrayLike, rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
    """Draw (frequency, recency) for customers of ages `T` from the BG/NBD generative process."""
    age = np.asarray(T, dtype=np.float64)
    n = age.shape[0]
    rate = np.asarray(rng.gamma(params.r, 1.0 / params.alpha, size=n), dtype=np.float64)
    dropout = np.asarray(rng.beta(params.a, params.b, size=n), dtype=np.float64)
    x = np.zeros(n, dtype=np.float64)
    t_x = np.zeros(n, dtype=np.float64)
    clock = np.zeros(n, dtype=np.float64)
    active = np.arange(n)
    while active.size:
        clock[active] += rng.exponential(1.0, size=active.size) / np.maximum(rate[active], 1e-300)
        bought = clock[active] <= age[active]
        active = active[bought]
        x[active] += 1
        t_x[active] = clock[active]
        # Drop out right after a purchase with probability p.
        active = active[rng.random(active.size) >= dropout[active]]
    return x, t_x

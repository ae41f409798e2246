"""Lifecycle science benchmark: model refit on 100k customers, RFM + stage recomputation on 1M profiles.

Pure computation (no broker or database needed). Run: `python -m bench.lifecycle`.

1. Refit of BG/NBD + Gamma-Gamma on 100,000 synthetic customers drawn from the CDNOW-fitted parameters
   (goal < 10 s); the recovered parameters are printed next to the true ones as a check.
   Baseline: one log-likelihood evaluation as a per-customer pure-Python loop vs the vectorized one.
2. Recomputation over 1,000,000 profiles held in memory: P(alive) / churn risk / expected orders, RFM
   scores, lifecycle stage (goal < 60 s). Baseline: the per-profile pure-Python path on a 100,000-profile
   sample, extrapolated linearly to 1,000,000 (stated as such).

3. Overhead of keeping lifecycle metrics current on the segmenter's event path (needs Kafka and PostgreSQL:
   KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL): events/s from `clm.events.v1` to committed profiles with the
   lifecycle work (surveys, order aggregates, model-based metrics from a stored model, stage, history,
   announcements) and without it (the same segmenter with the lifecycle hook removed), on the same events
   and 20 segments, alternating the two over BENCH_LIFECYCLE_ROUNDS rounds (default 2) in the same run;
   goal ratio >= 0.8. BENCH_LIFECYCLE_EVENTS (default 30000), BENCH_LIFECYCLE_CUSTOMERS (5000).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import os
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np

from bench.report import last_line, line, ratio
from services.segmenter.domain.lifecycle import bgnbd, snapshot, stages
from services.segmenter.domain.lifecycle import gamma_gamma as gg

TRUE_BGNBD = bgnbd.BgNbdParams(r=0.243, alpha=4.414, a=0.793, b=2.426)
TRUE_GG = gg.GammaGammaParams(p=6.25, q=3.74, v=15.44)
REFIT_CUSTOMERS = 100_000
PROFILES = 1_000_000
BASELINE_PROFILES = 100_000


def synthetic_customers(n: int, rng: np.random.Generator) -> tuple[np.ndarray[Any, Any], ...]:
    """CDNOW-like cohort: first purchases spread over 12 weeks, observed for 39 weeks (T in weeks)."""
    T = rng.uniform(27.0, 39.0, size=n)
    x, t_x = bgnbd.simulate(TRUE_BGNBD, T, rng)
    # Gamma-Gamma: nu ~ Gamma(q, rate v); mean of x repeat spends ~ Gamma(p x, rate x nu).
    nu = rng.gamma(TRUE_GG.q, 1.0 / TRUE_GG.v, size=n)
    zbar = np.zeros(n)
    repeat = x > 0
    zbar[repeat] = rng.gamma(TRUE_GG.p * x[repeat], 1.0 / (x[repeat] * nu[repeat]))
    return x, t_x, T, zbar


def python_log_likelihood(
    params: bgnbd.BgNbdParams, x: list[float], t_x: list[float], T: list[float]
) -> float:
    """The same BG/NBD log-likelihood, one customer at a time with the math module (the baseline)."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    lbeta_ab = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    total = 0.0
    for xi, ti, Ti in zip(x, t_x, T, strict=True):
        common = (
            math.lgamma(r + xi)
            - math.lgamma(r)
            + r * math.log(alpha)
            + math.lgamma(a)
            + math.lgamma(b + xi)
            - math.lgamma(a + b + xi)
            - lbeta_ab
        )
        alive = -(r + xi) * math.log(alpha + Ti)
        if xi > 0:
            dropped = math.log(a) - math.log(b + xi - 1) - (r + xi) * math.log(alpha + ti)
            top = max(alive, dropped)
            total += common + top + math.log(math.exp(alive - top) + math.exp(dropped - top))
        else:
            total += common + alive
    return total


def bench_refit(rng: np.random.Generator) -> float:
    print(
        f"# 1. Refit on {REFIT_CUSTOMERS:,} synthetic customers (true = CDNOW-fitted parameters)", flush=True
    )
    x, t_x, T, zbar = synthetic_customers(REFIT_CUSTOMERS, rng)
    line("customers with repeat purchases", float(np.sum(x > 0)))

    started = time.perf_counter()
    transactions = bgnbd.fit(x, t_x, T)
    bgnbd_s = time.perf_counter() - started
    spend = gg.fit(x, zbar)
    refit_s = time.perf_counter() - started

    line("BG/NBD fit", bgnbd_s, "s")
    line("Gamma-Gamma fit", refit_s - bgnbd_s, "s")
    line("BG/NBD + Gamma-Gamma refit (goal < 10 s)", refit_s, "s")
    print(
        f"  BG/NBD  converged={transactions.converged} iterations={transactions.iterations} "
        f"evaluations={transactions.function_evaluations} LL={transactions.log_likelihood:.1f}",
        flush=True,
    )
    for name in ("r", "alpha", "a", "b"):
        true, got = getattr(TRUE_BGNBD, name), getattr(transactions.params, name)
        print(
            f"  {name:<6} true {true:>8.3f}  recovered {got:>8.3f}  ({100 * (got / true - 1):+.1f}%)",
            flush=True,
        )
    print(
        f"  Gamma-Gamma converged={spend.converged} iterations={spend.iterations} n={spend.n_customers}",
        flush=True,
    )
    for name in ("p", "q", "v"):
        true, got = getattr(TRUE_GG, name), getattr(spend.params, name)
        print(
            f"  {name:<6} true {true:>8.3f}  recovered {got:>8.3f}  ({100 * (got / true - 1):+.1f}%)",
            flush=True,
        )

    started = time.perf_counter()
    bgnbd.probability_alive(transactions.params, x, t_x, T)
    gg.customer_lifetime_value(transactions.params, spend.params, x, t_x, T, zbar, months=12)
    line("P(alive) + 12-month CLV for all customers", time.perf_counter() - started, "s")

    # Baseline: the per-customer loop every optimizer iteration would pay without vectorization.
    xs, ts, Ts = x.tolist(), t_x.tolist(), T.tolist()
    started = time.perf_counter()
    slow = python_log_likelihood(TRUE_BGNBD, xs, ts, Ts)
    python_s = time.perf_counter() - started
    started = time.perf_counter()
    fast = bgnbd.log_likelihood(TRUE_BGNBD, x, t_x, T)
    numpy_s = time.perf_counter() - started
    assert abs(slow - fast) < 1e-6 * abs(fast), (slow, fast)
    line("one log-likelihood evaluation, Python loop", python_s * 1000, "ms")
    line("one log-likelihood evaluation, numpy", numpy_s * 1000, "ms")
    ratio(
        "log-likelihood customers/s, numpy vs Python loop",
        REFIT_CUSTOMERS / numpy_s,
        REFIT_CUSTOMERS / python_s,
    )
    # A lower bound for a pure-Python refit: the same number of evaluations, without a gradient.
    line(
        "Python-loop refit, lower bound (same evaluations)", python_s * transactions.function_evaluations, "s"
    )
    return refit_s


AS_OF_DAY = 20_000.0  # a UTC day number (2024-10-04); only differences matter


def synthetic_history(n: int, rng: np.random.Generator) -> snapshot.BaseHistory:
    """A shop with 30% leads; buyers follow BG/NBD (CDNOW parameters), first order up to three years ago."""
    age_days = rng.uniform(0.0, 1095.0, size=n)
    lead = rng.random(n) < 0.3
    x, t_x = bgnbd.simulate(TRUE_BGNBD, age_days / 7.0, rng)
    x, t_x = np.where(lead, 0.0, x), np.where(lead, 0.0, t_x)
    first_day = np.where(lead, np.nan, AS_OF_DAY - age_days)
    orders = np.where(lead, 0.0, x + 1.0)
    recent = np.minimum(orders, rng.integers(0, 3, size=n))
    return snapshot.BaseHistory(
        orders=orders,
        revenue=np.where(lead, 0.0, orders * rng.gamma(6.25, 5.0, size=n)),
        first_order_day=first_day,
        last_order_day=first_day + t_x * 7.0,
        signup_day=AS_OF_DAY - age_days - rng.integers(0, 30, size=n),
        orders_recent=recent.astype(np.float64),
        orders_previous=np.minimum(orders - recent, rng.integers(0, 3, size=n)).astype(np.float64),
        frequency=x,
        recency=t_x,
        T=np.where(lead, 0.0, age_days / 7.0),
        repeat_mean_value=np.where(x > 0, rng.gamma(6.25, 5.0, size=n), 0.0),
        nps_score=np.where(rng.random(n) < 0.3, rng.integers(0, 11, size=n).astype(np.float64), np.nan),
        csat_score=np.full(n, np.nan),
        referrals_given=(rng.random(n) < 0.05).astype(np.float64),
    )


def recompute_vectorized(
    history: snapshot.BaseHistory, policy: stages.StagePolicy, models: snapshot.FittedModels
) -> tuple[np.ndarray[Any, Any], dict[str, Any]]:
    columns, _ = snapshot.base_columns(history, AS_OF_DAY, models)
    return stages.classify_many(columns, policy), columns


def recompute_python(history: snapshot.BaseHistory, policy: stages.StagePolicy) -> list[str]:
    """The per-profile path: scalar P(alive), RFM score by bisect over sorted values, rule walk."""
    r, alpha, a, b = TRUE_BGNBD.r, TRUE_BGNBD.alpha, TRUE_BGNBD.a, TRUE_BGNBD.b
    fields = list(snapshot.BaseHistory.__dataclass_fields__)
    rows = [
        dict(zip(fields, values, strict=True))
        for values in zip(*(getattr(history, f).tolist() for f in fields), strict=True)
    ]
    buyers = [row for row in rows if row["orders"] > 0]
    sorted_recency = sorted(row["last_order_day"] for row in buyers)  # later last order = more recent
    sorted_orders = sorted(row["orders"] for row in buyers)
    sorted_revenue = sorted(row["revenue"] for row in buyers)
    n = len(buyers)

    def quintile(ordered: list[float], value: float) -> int:
        below = bisect.bisect_left(ordered, value)
        at_or_below = bisect.bisect_right(ordered, value)
        return min(5, max(1, math.ceil(5 * (below + at_or_below) / (2 * n) - 1e-9)))

    result = []
    for row in rows:
        nps = row["nps_score"]
        metrics: dict[str, stages.MetricValue] = {
            "orders": row["orders"],
            "revenue": row["revenue"],
            "days_since_signup": max(AS_OF_DAY - row["signup_day"], 0.0),
            "order_trend": row["orders_recent"] - row["orders_previous"],
            "referrals_given": row["referrals_given"],
            "rfm_r": 0,
            "rfm_f": 0,
            "rfm_m": 0,
        }
        if not math.isnan(nps):
            metrics["nps_score"] = nps
            metrics["nps_category"] = "promoter" if nps >= 9 else "passive" if nps >= 7 else "detractor"
        if row["orders"] > 0:
            x, t_x, T = row["frequency"], row["recency"], row["T"]
            if x > 0:
                odds = a / (b + x - 1) * ((alpha + T) / (alpha + t_x)) ** (r + x)
                p_alive = 1.0 / (1.0 + odds)
            else:
                p_alive = 1.0
            metrics["p_alive"], metrics["churn_risk"] = p_alive, 1.0 - p_alive
            metrics["days_since_first_order"] = AS_OF_DAY - row["first_order_day"]
            metrics["days_since_last_order"] = AS_OF_DAY - row["last_order_day"]
            metrics["rfm_r"] = quintile(sorted_recency, row["last_order_day"])
            metrics["rfm_f"] = quintile(sorted_orders, row["orders"])
            metrics["rfm_m"] = quintile(sorted_revenue, row["revenue"])
        result.append(stages.classify(metrics, policy).stage.value)
    return result


def bench_recompute(rng: np.random.Generator) -> None:
    print(f"# 2. RFM + stage recomputation over {PROFILES:,} profiles in memory", flush=True)
    policy = stages.default_policy()
    history = synthetic_history(PROFILES, rng)

    started = time.perf_counter()
    codes, _ = recompute_vectorized(history, policy, snapshot.FittedModels(TRUE_BGNBD, TRUE_GG))
    full_s = time.perf_counter() - started
    line("all metrics (P(alive), expected orders, CLV, RFM) + stage", full_s, "s")
    line("  (goal < 60 s) profiles per second", PROFILES / full_s)
    distribution = np.bincount(codes, minlength=len(stages.STAGE_ORDER))
    print(
        "  stages: "
        + ", ".join(f"{s.value}={int(c)}" for s, c in zip(stages.STAGE_ORDER, distribution, strict=True)),
        flush=True,
    )

    # Baseline on a sample: P(alive) + RFM + stage one profile at a time. The vectorized side of the
    # comparison computes the same metrics plus expected orders (no CLV), i.e. slightly more work.
    sample = snapshot.BaseHistory(
        **{f: getattr(history, f)[:BASELINE_PROFILES] for f in snapshot.BaseHistory.__dataclass_fields__}
    )
    started = time.perf_counter()
    slow = recompute_python(sample, policy)
    python_s = time.perf_counter() - started
    started = time.perf_counter()
    sample_codes, _ = recompute_vectorized(sample, policy, snapshot.FittedModels(TRUE_BGNBD))
    sample_s = time.perf_counter() - started
    agree = float(np.mean(stages.stage_names(sample_codes) == np.asarray(slow)))
    line(f"per-profile Python path, {BASELINE_PROFILES:,} profiles", python_s, "s")
    line("  extrapolated to 1,000,000 (linear)", python_s * PROFILES / BASELINE_PROFILES, "s")
    line(f"vectorized path, same {BASELINE_PROFILES:,} profiles", sample_s, "s")
    line("  stages agreeing between the two paths", 100 * agree, "%")
    ratio("profiles/s, vectorized vs Python loop", BASELINE_PROFILES / sample_s, BASELINE_PROFILES / python_s)


# --------------------------------------------------------------------------- 3. event-path overhead

EVENT_PATH_EVENTS = int(os.environ.get("BENCH_LIFECYCLE_EVENTS", "30000"))
EVENT_PATH_CUSTOMERS = int(os.environ.get("BENCH_LIFECYCLE_CUSTOMERS", "5000"))
EVENT_PATH_ROUNDS = int(os.environ.get("BENCH_LIFECYCLE_ROUNDS", "2"))


def event_path_events() -> list[Any]:
    """The segmenter benchmark's event mix plus NPS/CSAT survey answers (about 3 %)."""
    from bench.segmenter import make_events
    from shared.contracts.events import CustomerEvent

    events = make_events(EVENT_PATH_EVENTS, EVENT_PATH_CUSTOMERS, "u")
    rnd = random.Random(7)
    out = []
    for e in events:
        if rnd.random() < 0.03 and e.user_id:
            kind = rnd.choice(["nps", "csat"])
            score = rnd.randint(0, 10) if kind == "nps" else rnd.randint(1, 5)
            e = CustomerEvent.model_validate(
                {
                    "message_id": e.message_id,
                    "type": "track",
                    "user_id": e.user_id,
                    "event": "Survey Responded",
                    "properties": {"survey_type": kind, "score": score},
                    "timestamp": e.timestamp,
                    "received_at": e.received_at,
                }
            )
        out.append(e)
    return out


async def event_path_rate(events: list[Any], with_lifecycle: bool) -> float:
    from bench.segmenter import SEGMENTS, create_segments, produce
    from services.segmenter.app import create_app
    from services.segmenter.settings import SegmenterSettings
    from services.segmenter.store import lifecycle as lifecycle_store
    from shared.db.engine import drop_schema
    from shared.kafka.admin import ensure_topics

    run = uuid.uuid4().hex[:6]
    settings = SegmenterSettings(
        topic_prefix=f"benchlc{run}.",
        db_schema=f"segmenter_benchlc_{run}",
        db_pool_size=10,
        log_level="WARNING",
        run_background_loops=False,
    )
    await ensure_topics(settings)
    try:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            await create_segments(app, SEGMENTS[:20])
            async with app.state.platform.unit_of_work() as uow:  # a fitted model, as after a refit
                await lifecycle_store.insert_model(
                    uow.session,
                    datetime.now(UTC),
                    {"params": dict(TRUE_BGNBD.__dict__)},
                    {"params": dict(TRUE_GG.__dict__)},
                    {"recency_days": [5, 10, 20, 30], "orders": [1, 1, 2, 3], "revenue": [20, 80, 150, 300]},
                    0,
                    0,
                    0.0,
                )
        await produce(settings, events)
        app = create_app(settings)
        if not with_lifecycle:
            app.state.segmenter.events.lifecycle = None
        async with app.router.lifespan_context(app):
            runner = app.state.platform.consumers[0]
            started = time.perf_counter()
            while runner.processed < len(events):  # noqa: ASYNC110 - polling the counter is the measurement
                await asyncio.sleep(0.01)
            return len(events) / (time.perf_counter() - started)
    finally:
        await drop_schema(settings.database_url, settings.db_schema)


async def bench_event_path() -> None:
    print(
        f"# 3. Segmenter event path with and without lifecycle work ({EVENT_PATH_EVENTS:,} events, "
        f"{EVENT_PATH_CUSTOMERS:,} customers, 20 segments, {EVENT_PATH_ROUNDS} alternating rounds)",
        flush=True,
    )
    events = event_path_events()
    without: list[float] = []
    with_: list[float] = []
    for _ in range(EVENT_PATH_ROUNDS):
        without.append(await event_path_rate(events, with_lifecycle=False))
        with_.append(await event_path_rate(events, with_lifecycle=True))
    for i, (a, b) in enumerate(zip(without, with_, strict=True), 1):
        line(f"  round {i}: without / with lifecycle", a, f"/ {b:.0f} events/s (ratio {b / a:.3f})")
    best_without, best_with = max(without), max(with_)
    line("segmenter without lifecycle (best round)", best_without, "events/s")
    line("segmenter with lifecycle (best round)", best_with, "events/s")
    ratio("  best with / best without", best_with, best_without)
    # The shared host's load drifts between runs: the paired ratio of each round (adjacent runs) is the
    # fairer figure; its median is the headline.
    paired = sorted(b / a for a, b in zip(without, with_, strict=True))
    line("ratio with / without lifecycle, median of rounds (goal >= 0.8)", paired[len(paired) // 2])


def main() -> None:
    rng = np.random.default_rng(20050401)
    refit_s = bench_refit(rng)
    bench_recompute(rng)
    if os.environ.get("DATABASE_URL") and os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        asyncio.run(bench_event_path())
    else:
        print("# 3. Event-path overhead: skipped (set KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL)", flush=True)
    last_line("lifecycle_refit_s", refit_s)


if __name__ == "__main__":
    main()

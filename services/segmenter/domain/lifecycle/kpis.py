"""Lifecycle KPIs over a purchase log: retention, churn, cohort retention, NPS over time, group averages.

A *customer at day t* is someone with at least one purchase in the active window (t - W, t], W =
`active_window_days` (default 90). Day boundaries are UTC calendar days; a period [start, end] means
"from the end of day `start` to the end of day `end`".

- customers at start S = customers at `start`; customers at end E = customers at `end`;
- new customers N = customers whose first purchase ever falls in (start, end];
- retention rate = (|E| - |N n E|) / |S| (the classic (E - N) / S, counting only the new customers who are
  still customers at the end). Customers who lapsed before `start` and came back during the period count
  as retained by it, so it can exceed the exact share; `retained` = |S n E| is reported next to it;
- churn rate = (|S| - |S n E|) / |S|, the share of the start base no longer a customer at the end;
- with |S| = 0 both rates are None, never a division error.

All outputs are JSON-ready (dates as ISO strings, None for "no data").
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from services.segmenter.domain.lifecycle.summary import to_day_numbers
from services.segmenter.domain.lifecycle.voice import nps

DEFAULT_ACTIVE_WINDOW_DAYS = 90
Bucket = Literal["day", "week", "month"]


def day_number(value: date | np.datetime64[Any]) -> int:
    return int(np.asarray(value, dtype="datetime64[D]").astype(np.int64))


def iso_day(day: int) -> str:
    return str(np.datetime64(day, "D"))


@dataclass(frozen=True)
class PurchaseLog:
    """Purchases as aligned arrays: customer codes (0..n-1) and UTC day numbers; sorted by day."""

    customer: npt.NDArray[np.int64]
    day: npt.NDArray[np.int64]
    customer_ids: npt.NDArray[np.generic]

    @classmethod
    def from_arrays(cls, customer: npt.ArrayLike, when: npt.ArrayLike) -> PurchaseLog:
        ids = np.asarray(customer)
        days = to_day_numbers(when)
        if ids.shape != days.shape or ids.ndim != 1:
            raise ValueError("customer and when must be 1-d arrays of the same length")
        uniq, code = np.unique(ids, return_inverse=True)
        order = np.argsort(days, kind="stable")
        return cls(customer=code[order].astype(np.int64), day=days[order], customer_ids=uniq)

    @property
    def n_customers(self) -> int:
        return int(self.customer_ids.shape[0])

    def first_purchase_day(self) -> npt.NDArray[np.int64]:
        first = np.full(self.n_customers, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, self.customer, self.day)
        return first

    def active_at(self, day: int, window_days: int) -> npt.NDArray[np.bool_]:
        """Boolean mask over customers: a purchase in (day - window_days, day]."""
        lo = np.searchsorted(self.day, day - window_days, side="right")
        hi = np.searchsorted(self.day, day, side="right")
        mask = np.zeros(self.n_customers, dtype=bool)
        mask[self.customer[lo:hi]] = True
        return mask


@dataclass(frozen=True)
class RetentionPeriod:
    start: str
    end: str
    customers_at_start: int
    customers_at_end: int
    new_customers: int
    retained: int
    reactivated: int
    retention_rate: float | None
    churn_rate: float | None

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def retention(
    log: PurchaseLog, start: date, end: date, *, active_window_days: int = DEFAULT_ACTIVE_WINDOW_DAYS
) -> RetentionPeriod:
    start_day, end_day = day_number(start), day_number(end)
    if end_day < start_day:
        raise ValueError("end must not be before start")
    if active_window_days < 1:
        raise ValueError("active_window_days must be >= 1")
    at_start = log.active_at(start_day, active_window_days)
    at_end = log.active_at(end_day, active_window_days)
    first = log.first_purchase_day()
    new = (first > start_day) & (first <= end_day)
    s, e, n = int(at_start.sum()), int(at_end.sum()), int(new.sum())
    retained = int((at_start & at_end).sum())
    reactivated = int((at_end & ~at_start & ~new).sum())
    return RetentionPeriod(
        start=iso_day(start_day),
        end=iso_day(end_day),
        customers_at_start=s,
        customers_at_end=e,
        new_customers=n,
        retained=retained,
        reactivated=reactivated,
        # The classic formula's N is the new customers *counted in E*: with an active window shorter than
        # the period, a customer can be acquired and lapse again before the end.
        retention_rate=(e - int((new & at_end).sum())) / s if s else None,
        churn_rate=(s - retained) / s if s else None,
    )


def retention_series(
    log: PurchaseLog, boundaries: Sequence[date], *, active_window_days: int = DEFAULT_ACTIVE_WINDOW_DAYS
) -> list[dict[str, Any]]:
    """Retention for each consecutive pair of boundaries (e.g. month starts), ready for a chart."""
    return [
        retention(log, a, b, active_window_days=active_window_days).as_json()
        for a, b in itertools.pairwise(boundaries)
    ]


def retention_periods(
    log: PurchaseLog,
    firsts: Sequence[date],
    end: date,
    *,
    active_window_days: int = DEFAULT_ACTIVE_WINDOW_DAYS,
) -> list[dict[str, Any]]:
    """Retention of consecutive periods, each its own days: from each of `firsts` to the day before
    the next (the last to `end`). S is counted at the end of the day before a period, E at the end of
    its last day, N over its days (January is Jan 1-31, not Jan 1 to Feb 1)."""
    lasts = [d - timedelta(days=1) for d in firsts[1:]] + [end]
    periods = retention_series(
        log, [firsts[0] - timedelta(days=1), *lasts], active_window_days=active_window_days
    )
    for period, first in zip(periods, firsts, strict=True):
        period["start"] = first.isoformat()
    return periods


def cohort_retention(log: PurchaseLog, as_of: date, since: date | None = None) -> dict[str, Any]:
    """Cohort table by calendar month of first purchase (from `since`'s month, if given).

    Cell (cohort c, k months since) = share of c's customers with a purchase in month c + k; month 0 is
    1.0 by construction. Months after `as_of`'s month are None (not observed yet); `as_of`'s own month
    is included although it may be partial. Purchases after `as_of` are ignored. The table is as wide
    as its oldest cohort needs.
    """
    as_of_day = day_number(as_of)
    keep = log.day <= as_of_day
    customer, day = log.customer[keep], log.day[keep]
    if customer.size == 0:
        return {"months_since": [], "cohorts": []}
    month = day.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)
    first_month = np.full(log.n_customers, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_month, customer, month)
    if since is not None:
        shown = first_month[customer] >= int(np.datetime64(since, "M").astype(np.int64))
        customer, month = customer[shown], month[shown]
        if customer.size == 0:
            return {"months_since": [], "cohorts": []}
    last_month = int(np.datetime64(as_of, "M").astype(np.int64))
    cohorts = np.unique(first_month[customer])
    width = last_month - int(cohorts.min()) + 1

    # Distinct (customer, month) pairs, counted per (cohort, offset).
    pair_key = np.unique(customer * (width + 1) + (month - first_month[customer]))
    pair_customer = pair_key // (width + 1)
    pair_offset = pair_key % (width + 1)
    pair_cohort = first_month[pair_customer]
    rows = []
    for cohort in cohorts:
        in_cohort = pair_cohort == cohort
        size = int(np.sum(in_cohort & (pair_offset == 0)))
        observed = last_month - int(cohort) + 1
        counts = np.bincount(pair_offset[in_cohort], minlength=observed)[:observed]
        active: list[int | None] = [int(c) for c in counts] + [None] * (width - observed)
        rates: list[float | None] = [int(c) / size for c in counts] + [None] * (width - observed)
        rows.append(
            {
                "cohort": str(np.datetime64(int(cohort), "M")),
                "size": size,
                "active": active,
                "retention": rates,
            }
        )
    return {"months_since": list(range(width)), "cohorts": rows}


def _bucket_start(days: npt.NDArray[np.int64], bucket: Bucket) -> npt.NDArray[np.int64]:
    if bucket == "day":
        return days
    if bucket == "week":
        # Weeks start on Monday (ISO); day 0 (1970-01-01) was a Thursday.
        return days - (days + 3) % 7
    months = days.astype("datetime64[D]").astype("datetime64[M]")
    starts: npt.NDArray[np.int64] = months.astype("datetime64[D]").astype(np.int64)
    return starts


def _next_bucket(day: int, bucket: Bucket) -> int:
    if bucket == "day":
        return day + 1
    if bucket == "week":
        return day + 7
    month = np.datetime64(day, "D").astype("datetime64[M]") + 1
    return int(month.astype("datetime64[D]").astype(np.int64))


def nps_over_time(
    answered: npt.ArrayLike, scores: npt.ArrayLike, start: date, end: date, bucket: Bucket = "month"
) -> list[dict[str, Any]]:
    """NPS per time bucket covering [start, end] (inclusive days); empty buckets have nps None.

    Pass one answer per customer per bucket (e.g. each customer's latest) if a customer answering
    twice should count once; this function counts every answer it is given.
    """
    days = to_day_numbers(answered)
    points = np.asarray(scores, dtype=np.int64)
    start_day, end_day = day_number(start), day_number(end)
    if end_day < start_day:
        raise ValueError("end must not be before start")
    keep = (days >= start_day) & (days <= end_day)
    days, points = days[keep], points[keep]
    starts = _bucket_start(days, bucket)
    series = []
    bucket_day = int(_bucket_start(np.array([start_day], dtype=np.int64), bucket)[0])
    while bucket_day <= end_day:
        summary = nps(int(s) for s in points[starts == bucket_day])
        series.append({"period": _label(bucket_day, bucket), **summary.as_json()})
        bucket_day = _next_bucket(bucket_day, bucket)
    return series


def _label(day: int, bucket: Bucket) -> str:
    value = np.datetime64(day, "D")
    return str(value.astype("datetime64[M]")) if bucket == "month" else str(value)


def average_by_group(
    groups: npt.ArrayLike, values: npt.ArrayLike
) -> dict[str, dict[str, float | int | None]]:
    """Mean and count of `values` per group label (NaN values ignored; a group of only NaN has mean None)."""
    labels = np.asarray(groups)
    data = np.asarray(values, dtype=np.float64)
    if labels.shape != data.shape:
        raise ValueError("groups and values must have the same shape")
    uniq, code = np.unique(labels.astype(str), return_inverse=True)
    valid = ~np.isnan(data)
    counts = np.bincount(code[valid], minlength=uniq.size)
    sums = np.bincount(code[valid], weights=data[valid], minlength=uniq.size)
    return {
        str(label): {"count": int(count), "mean": float(total / count) if count else None}
        for label, count, total in zip(uniq, counts, sums, strict=True)
    }


def distribution(labels: npt.ArrayLike) -> dict[str, int]:
    """Count per label (e.g. customers per lifecycle stage)."""
    uniq, counts = np.unique(np.asarray(labels).astype(str), return_counts=True)
    return {str(label): int(count) for label, count in zip(uniq, counts, strict=True)}


def transitions(before: npt.ArrayLike, after: npt.ArrayLike) -> dict[str, dict[str, int]]:
    """Stage-to-stage transition counts between two snapshots of the same customers."""
    old = np.asarray(before).astype(str)
    new = np.asarray(after).astype(str)
    if old.shape != new.shape:
        raise ValueError("before and after must have the same shape")
    pairs, counts = np.unique(np.stack([old, new], axis=1), axis=0, return_counts=True)
    table: dict[str, dict[str, int]] = {}
    for (source, target), count in zip(pairs, counts, strict=True):
        table.setdefault(str(source), {})[str(target)] = int(count)
    return table

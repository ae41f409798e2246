"""Per-customer frequency / recency / T / monetary value from a transaction log.

The definitions are those of the BTYD literature (Fader, Hardie & Lee 2005) as implemented by
`lifetimes.utils.summary_data_from_transaction_data`:

- transactions are first grouped into *purchase periods* (calendar days by default): several orders
  on the same day count as one purchase whose amount is their sum;
- `frequency` = number of distinct purchase periods - 1 (repeat purchases; the first is the
  customer's "birth" and is not a repeat);
- `recency` = time from the first to the last purchase period (0 when frequency is 0);
- `T` = time from the first purchase period to the end of the observation window (the age);
- `monetary_value` = mean amount of the *repeat* purchase periods (the first is excluded, as the
  Gamma-Gamma model requires), 0 when frequency is 0;
- `revenue` = total amount to date including the first purchase (historical CLV).

Times are returned in a chosen unit (`time_unit_days`, e.g. 7 for weeks as in the paper).
Transactions after `observation_end` are ignored: the summary describes a calibration window.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
_EPOCH = date(1970, 1, 1)


@dataclass(frozen=True)
class TransactionSummary:
    """One row per customer with at least one purchase in the window; arrays aligned on `customer`."""

    customer: npt.NDArray[np.generic]
    frequency: IntArray
    recency: FloatArray
    T: FloatArray
    monetary_value: FloatArray
    revenue: FloatArray
    first_purchase_day: IntArray
    last_purchase_day: IntArray

    def __len__(self) -> int:
        return int(self.customer.shape[0])


def to_day_numbers(when: npt.ArrayLike) -> IntArray:
    """UTC days since 1970-01-01 of datetime64 values, Python datetimes / dates, or day numbers as given.

    Aware datetimes are converted to UTC first; naive ones are taken as UTC.
    """
    values = np.asarray(when)
    if values.dtype == object:
        values = np.asarray([_utc_day(v) for v in values.ravel()], dtype=np.int64).reshape(values.shape)
        return values
    if np.issubdtype(values.dtype, np.datetime64):
        return values.astype("datetime64[D]").astype(np.int64)
    return np.floor(values.astype(np.float64)).astype(np.int64)


def _utc_day(value: object) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return (value.date() - _EPOCH).days
    if isinstance(value, date):
        return (value - _EPOCH).days
    raise ValueError(f"not a date: {value!r}")


def summarize_transactions(
    customer: npt.ArrayLike,
    when: npt.ArrayLike,
    amount: npt.ArrayLike | None,
    observation_end: npt.ArrayLike,
    *,
    time_unit_days: float = 1.0,
    period_days: int = 1,
) -> TransactionSummary:
    """Summarize a transaction log (vectorized; O(n log n)).

    `customer` holds any sortable ids, `when` datetime64 values or day numbers, `amount` the order
    values (None: all zero), `observation_end` the last day of the window (inclusive).
    `period_days` sets the purchase-period granularity (1 = several orders on a day are one purchase).
    """
    if time_unit_days <= 0 or period_days < 1:
        raise ValueError("time_unit_days must be > 0 and period_days >= 1")
    ids = np.asarray(customer)
    days = to_day_numbers(when)
    values = np.zeros(days.shape, dtype=np.float64) if amount is None else np.asarray(amount, np.float64)
    if not (ids.shape == days.shape == values.shape) or ids.ndim != 1:
        raise ValueError("customer, when and amount must be 1-d arrays of the same length")
    end_period = int(to_day_numbers(np.asarray([observation_end]))[0]) // period_days

    periods = days // period_days
    keep = periods <= end_period
    ids, periods, values = ids[keep], periods[keep], values[keep]

    uniq_ids, code = np.unique(ids, return_inverse=True)
    # Sort by (customer, period) and collapse equal pairs into one purchase period.
    order = np.lexsort((periods, code))
    code, periods, values = code[order], periods[order], values[order]
    new_pair = np.ones(code.shape[0], dtype=bool)
    new_pair[1:] = (code[1:] != code[:-1]) | (periods[1:] != periods[:-1])
    starts = np.flatnonzero(new_pair)
    pair_code = code[starts]
    pair_period = periods[starts]
    pair_amount = np.add.reduceat(values, starts) if starts.size else np.zeros(0)

    n = uniq_ids.shape[0]
    n_periods = np.bincount(pair_code, minlength=n).astype(np.int64)
    first_idx = np.searchsorted(pair_code, np.arange(n), side="left")
    last_idx = np.searchsorted(pair_code, np.arange(n), side="right") - 1
    first_period = pair_period[first_idx] if n else np.zeros(0, np.int64)
    last_period = pair_period[last_idx] if n else np.zeros(0, np.int64)
    revenue: FloatArray = np.bincount(pair_code, weights=pair_amount, minlength=n).astype(np.float64)
    first_amount = pair_amount[first_idx] if n else np.zeros(0)

    frequency = n_periods - 1
    repeat_revenue = revenue - first_amount
    monetary = np.divide(repeat_revenue, frequency, out=np.zeros(n, dtype=np.float64), where=frequency > 0)
    scale = period_days / time_unit_days
    recency: FloatArray = ((last_period - first_period) * scale).astype(np.float64)
    age: FloatArray = ((end_period - first_period) * scale).astype(np.float64)
    return TransactionSummary(
        customer=uniq_ids,
        frequency=frequency,
        recency=recency,
        T=age,
        monetary_value=monetary,
        revenue=revenue,
        first_purchase_day=first_period * period_days,
        last_purchase_day=last_period * period_days,
    )

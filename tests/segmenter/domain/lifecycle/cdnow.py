"""The vendored CDNOW reference data (see tests/data/README.md), loaded as numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

DATA = Path(__file__).resolve().parents[3] / "data"
CALIBRATION_END = np.datetime64("1997-09-30")


@dataclass(frozen=True)
class CdnowTransactions:
    customer: npt.NDArray[np.int64]
    day: npt.NDArray[np.datetime64]
    amount: npt.NDArray[np.float64]


@dataclass(frozen=True)
class CdnowSummary:
    """Published calibration-period summary (weeks), one row per customer 1..2357."""

    customer: npt.NDArray[np.int64]
    x: npt.NDArray[np.float64]
    t_x: npt.NDArray[np.float64]
    T: npt.NDArray[np.float64]
    zbar: npt.NDArray[np.float64]


@cache
def transactions() -> CdnowTransactions:
    raw = np.loadtxt(DATA / "CDNOW_sample.txt", dtype=str)
    days = np.array([f"{d[:4]}-{d[4:6]}-{d[6:]}" for d in raw[:, 2]], dtype="datetime64[D]")
    return CdnowTransactions(
        customer=raw[:, 1].astype(np.int64), day=days, amount=raw[:, 4].astype(np.float64)
    )


@cache
def summary() -> CdnowSummary:
    table = np.loadtxt(DATA / "cdnow_customers_summary_with_transactions.csv", delimiter=",", skiprows=1)
    return CdnowSummary(
        customer=table[:, 0].astype(np.int64), x=table[:, 1], t_x=table[:, 2], T=table[:, 3], zbar=table[:, 4]
    )

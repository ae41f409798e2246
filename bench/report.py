"""Small helpers every benchmark uses to print comparable figures."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def line(label: str, value: float, unit: str = "") -> None:
    print(f"{label:<48} {value:>12.2f} {unit}", flush=True)


def ratio(label: str, ours: float, baseline: float) -> float:
    r = ours / baseline if baseline else math.nan
    print(f"{label:<48} {r:>12.3f} (CLM {ours:.1f} / baseline {baseline:.1f})", flush=True)
    return r


def last_line(name: str, value: float) -> None:
    print(f"{name}={value:.3f}", flush=True)

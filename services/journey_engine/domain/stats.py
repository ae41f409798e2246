"""A/B arm comparison for marketers: conversion rates and a two-proportion z-test against the holdout."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import norm


@dataclass(frozen=True)
class ZTest:
    z: float
    p_value: float


def two_proportion_z_test(conv_a: int, n_a: int, conv_b: int, n_b: int) -> ZTest | None:
    """Two-sided test that arm A converts at a different rate than arm B (pooled variance)."""
    if n_a == 0 or n_b == 0:
        return None
    pooled = (conv_a + conv_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return None
    z = (conv_a / n_a - conv_b / n_b) / se
    return ZTest(z=z, p_value=float(2 * norm.sf(abs(z))))

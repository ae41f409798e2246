"""Lifecycle stages as an ordered list of rules over a customer's metrics snapshot.

The first rule whose condition matches decides the stage; `otherwise` applies when none does.
Conditions are a small tree: a leaf `{"field", "op", "value"}` over a metric, or a group
`{"all": [...]}` / `{"any": [...]}`. It is deliberately the shape of a segment rule so a policy can be
translated to the segment rule language one node at a time.

Null semantics: a metric that is unknown (None; NaN in the vectorized path) matches no comparison,
not even `ne` / `not_in`; only `not_exists` matches it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Union

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Stage(StrEnum):
    ACQUISITION = "acquisition"
    ONBOARDING = "onboarding"
    GROWTH = "growth"
    RETENTION = "retention"
    ADVOCACY = "advocacy"
    AT_RISK = "at_risk"
    CHURNED = "churned"


STAGE_ORDER = list(Stage)


class MetricField(StrEnum):
    """The metrics a stage rule may look at (all computed by the segmenter per customer)."""

    ORDERS = "orders"  # lifetime orders
    REVENUE = "revenue"  # historical CLV, revenue to date
    DAYS_SINCE_SIGNUP = "days_since_signup"  # since the profile was first seen / signed up
    DAYS_SINCE_FIRST_ORDER = "days_since_first_order"
    DAYS_SINCE_LAST_ORDER = "days_since_last_order"
    ORDER_TREND = "order_trend"  # orders in the last growth window minus orders in the window before
    P_ALIVE = "p_alive"  # BG/NBD
    CHURN_RISK = "churn_risk"  # 1 - p_alive
    EXPECTED_ORDERS = "expected_orders"  # BG/NBD expected orders over the prediction horizon
    PREDICTED_CLV = "predicted_clv"
    NPS_SCORE = "nps_score"  # latest NPS answer 0-10
    NPS_CATEGORY = "nps_category"  # promoter | passive | detractor
    CSAT_SCORE = "csat_score"  # latest CSAT answer 1-5
    REFERRALS_GIVEN = "referrals_given"
    RFM_R = "rfm_r"
    RFM_F = "rfm_f"
    RFM_M = "rfm_m"


CATEGORICAL_FIELDS = frozenset({MetricField.NPS_CATEGORY})


class Op(StrEnum):
    EQ = "eq"
    NE = "ne"
    GT = "gt"
    GTE = "gte"
    LT = "lt"
    LTE = "lte"
    IN = "in"
    NOT_IN = "not_in"
    EXISTS = "exists"
    NOT_EXISTS = "not_exists"


ORDERING_OPS = frozenset({Op.GT, Op.GTE, Op.LT, Op.LTE})
Scalar = float | str


class Condition(BaseModel):
    """A leaf: `field op value`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    field: MetricField
    op: Op
    value: Scalar | list[Scalar] | None = None

    @model_validator(mode="after")
    def _value_fits_op(self) -> Condition:
        categorical = self.field in CATEGORICAL_FIELDS
        if self.op in (Op.EXISTS, Op.NOT_EXISTS):
            if self.value is not None:
                raise ValueError(f"{self.op.value} takes no value")
            return self
        if self.op in (Op.IN, Op.NOT_IN):
            if not isinstance(self.value, list) or not self.value:
                raise ValueError(f"{self.op.value} needs a non-empty list value")
            items = self.value
        else:
            if self.value is None or isinstance(self.value, list):
                raise ValueError(f"{self.op.value} needs a single value")
            items = [self.value]
        if categorical and self.op in ORDERING_OPS:
            raise ValueError(f"{self.field.value} is categorical: use eq, ne, in or not_in")
        for item in items:
            if categorical != isinstance(item, str):
                kind = "a string" if categorical else "a number"
                raise ValueError(f"{self.field.value} compares with {kind}")
            # Stored as JSON, which has no NaN or infinity: `1e400` read back as null and made the
            # saved policy unreadable for every later event batch.
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{self.field.value} compares with a finite number")
        return self


class AllOf(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    all: list[RuleNode] = Field(min_length=1)


class AnyOf(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    any: list[RuleNode] = Field(min_length=1)


RuleNode = Annotated[Union[Condition, AllOf, AnyOf], Field(union_mode="left_to_right")]  # noqa: UP007
AllOf.model_rebuild()
AnyOf.model_rebuild()


class StageRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    stage: Stage
    when: RuleNode
    description: str = ""


class StagePolicy(BaseModel):
    """Ordered rules: the first match wins."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rules: list[StageRule] = Field(min_length=1)
    otherwise: Stage = Stage.RETENTION


class StageThresholds(BaseModel):
    """The knobs of the default policy a marketer is most likely to turn."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    onboarding_days: int = Field(30, ge=0, description="first order or sign-up within this many days")
    growth_min_orders: int = Field(2, ge=1, description="growth needs at least this many orders")
    at_risk_churn_risk: float = Field(0.5, gt=0, le=1, description="at-risk when churn risk is above")
    at_risk_inactive_days: int = Field(120, ge=1, description="or when the last order is older than this")
    churned_p_alive: float = Field(0.1, ge=0, lt=1, description="churned when P(alive) is below")
    churned_inactive_days: int = Field(365, ge=1, description="or when the last order is older than this")
    advocacy_min_referrals: int = Field(1, ge=1, description="advocacy with this many referrals given")

    @model_validator(mode="after")
    def _churned_after_at_risk(self) -> StageThresholds:
        if self.churned_inactive_days <= self.at_risk_inactive_days:
            raise ValueError("churned_inactive_days must be greater than at_risk_inactive_days")
        return self


def _leaf(field: MetricField, op: Op, value: Scalar | list[Scalar] | None = None) -> Condition:
    return Condition(field=field, op=op, value=value)


def default_policy(thresholds: StageThresholds | None = None) -> StagePolicy:
    t = thresholds or StageThresholds()
    has_ordered = _leaf(MetricField.ORDERS, Op.GTE, 1)
    return StagePolicy(
        rules=[
            StageRule(
                stage=Stage.CHURNED,
                description="probably no longer alive: P(alive) very low or no order for a long time",
                when=AllOf(
                    all=[
                        has_ordered,
                        AnyOf(
                            any=[
                                _leaf(MetricField.P_ALIVE, Op.LT, t.churned_p_alive),
                                _leaf(MetricField.DAYS_SINCE_LAST_ORDER, Op.GT, t.churned_inactive_days),
                            ]
                        ),
                    ]
                ),
            ),
            StageRule(
                stage=Stage.AT_RISK,
                description="churn risk above the threshold or no order for a while",
                when=AllOf(
                    all=[
                        has_ordered,
                        AnyOf(
                            any=[
                                _leaf(MetricField.CHURN_RISK, Op.GT, t.at_risk_churn_risk),
                                _leaf(MetricField.DAYS_SINCE_LAST_ORDER, Op.GT, t.at_risk_inactive_days),
                            ]
                        ),
                    ]
                ),
            ),
            StageRule(
                stage=Stage.ADVOCACY,
                description="a buying customer who is an NPS promoter or has referred someone",
                when=AllOf(
                    all=[
                        has_ordered,
                        AnyOf(
                            any=[
                                _leaf(MetricField.NPS_CATEGORY, Op.EQ, "promoter"),
                                _leaf(MetricField.REFERRALS_GIVEN, Op.GTE, t.advocacy_min_referrals),
                            ]
                        ),
                    ]
                ),
            ),
            StageRule(
                stage=Stage.ONBOARDING,
                description="first order, or sign-up without an order, within the onboarding window",
                when=AnyOf(
                    any=[
                        AllOf(
                            all=[
                                has_ordered,
                                _leaf(MetricField.DAYS_SINCE_FIRST_ORDER, Op.LTE, t.onboarding_days),
                            ]
                        ),
                        AllOf(
                            all=[
                                _leaf(MetricField.ORDERS, Op.EQ, 0),
                                _leaf(MetricField.DAYS_SINCE_SIGNUP, Op.LTE, t.onboarding_days),
                            ]
                        ),
                    ]
                ),
            ),
            StageRule(
                stage=Stage.ACQUISITION,
                description="known but never ordered",
                when=_leaf(MetricField.ORDERS, Op.EQ, 0),
            ),
            StageRule(
                stage=Stage.GROWTH,
                description="repeat customer whose orders are rising (this window vs the previous one)",
                when=AllOf(
                    all=[
                        _leaf(MetricField.ORDERS, Op.GTE, t.growth_min_orders),
                        _leaf(MetricField.ORDER_TREND, Op.GT, 0),
                    ]
                ),
            ),
            StageRule(stage=Stage.RETENTION, description="established customer", when=has_ordered),
        ],
        otherwise=Stage.RETENTION,
    )


# --------------------------------------------------------------------------- one customer

MetricValue = float | int | str | None


def _matches_leaf(condition: Condition, metrics: Mapping[str, MetricValue]) -> bool:
    actual = metrics.get(condition.field.value)
    if isinstance(actual, float) and np.isnan(actual):
        actual = None
    if condition.op is Op.EXISTS:
        return actual is not None
    if condition.op is Op.NOT_EXISTS:
        return actual is None
    if actual is None:
        return False
    value = condition.value
    if condition.op is Op.IN:
        return isinstance(value, list) and actual in value
    if condition.op is Op.NOT_IN:
        return isinstance(value, list) and actual not in value
    if condition.op is Op.EQ:
        return actual == value
    if condition.op is Op.NE:
        return actual != value
    if isinstance(actual, str) or not isinstance(value, int | float):
        return False
    if condition.op is Op.GT:
        return actual > value
    if condition.op is Op.GTE:
        return actual >= value
    if condition.op is Op.LT:
        return actual < value
    return actual <= value


def matches(node: Condition | AllOf | AnyOf, metrics: Mapping[str, MetricValue]) -> bool:
    if isinstance(node, AllOf):
        return all(matches(child, metrics) for child in node.all)
    if isinstance(node, AnyOf):
        return any(matches(child, metrics) for child in node.any)
    return _matches_leaf(node, metrics)


@dataclass(frozen=True)
class StageDecision:
    stage: Stage
    rule_index: int | None  # which rule matched; None: `otherwise`


def classify(metrics: Mapping[str, MetricValue], policy: StagePolicy) -> StageDecision:
    """The stage of one customer (metrics keyed by MetricField values; missing = unknown)."""
    for index, rule in enumerate(policy.rules):
        if matches(rule.when, metrics):
            return StageDecision(rule.stage, index)
    return StageDecision(policy.otherwise, None)


# --------------------------------------------------------------------------- a whole base at once

Column = npt.NDArray[Any]


def _null_mask(column: Column) -> npt.NDArray[np.bool_]:
    if column.dtype.kind == "f":
        nan: npt.NDArray[np.bool_] = np.isnan(column)
        return nan
    if column.dtype.kind in "iub":
        return np.zeros(column.shape, dtype=bool)
    if column.dtype.kind == "U":
        empty: npt.NDArray[np.bool_] = np.asarray(column == "", dtype=bool)
        return empty
    return np.asarray([v is None or v == "" for v in column], dtype=bool)


def _leaf_mask(condition: Condition, columns: Mapping[str, Column], n: int) -> npt.NDArray[np.bool_]:
    column = columns.get(condition.field.value)
    if column is None:
        return np.full(n, condition.op is Op.NOT_EXISTS)
    null = _null_mask(column)
    if condition.op is Op.EXISTS:
        return ~null
    if condition.op is Op.NOT_EXISTS:
        return null
    value = condition.value
    with np.errstate(invalid="ignore"):
        if condition.op in (Op.IN, Op.NOT_IN):
            found = np.isin(column, np.asarray(value))
            result = found if condition.op is Op.IN else ~found
        elif condition.op is Op.EQ:
            result = column == value
        elif condition.op is Op.NE:
            result = column != value
        elif condition.op is Op.GT:
            result = column > value
        elif condition.op is Op.GTE:
            result = column >= value
        elif condition.op is Op.LT:
            result = column < value
        else:
            result = column <= value
    mask: npt.NDArray[np.bool_] = np.asarray(result, dtype=bool) & ~null
    return mask


def _mask(node: Condition | AllOf | AnyOf, columns: Mapping[str, Column], n: int) -> npt.NDArray[np.bool_]:
    if isinstance(node, AllOf):
        result = _mask(node.all[0], columns, n)
        for child in node.all[1:]:
            result = result & _mask(child, columns, n)
        return result
    if isinstance(node, AnyOf):
        result = _mask(node.any[0], columns, n)
        for child in node.any[1:]:
            result = result | _mask(child, columns, n)
        return result
    return _leaf_mask(node, columns, n)


def classify_many(columns: Mapping[str, Column], policy: StagePolicy) -> npt.NDArray[np.int8]:
    """Stage codes (indexes into STAGE_ORDER) for a base given as aligned metric columns.

    Numeric columns use NaN for unknown; categorical columns use "" or None. Same semantics as
    `classify`, evaluated rule by rule over whole columns; `np.select` keeps the first match.
    """
    lengths = {len(column) for column in columns.values()}
    if len(lengths) > 1:
        raise ValueError("all metric columns must have the same length")
    n = lengths.pop() if lengths else 0
    masks = [_mask(rule.when, columns, n) for rule in policy.rules]
    codes = [STAGE_ORDER.index(rule.stage) for rule in policy.rules]
    fallback = STAGE_ORDER.index(policy.otherwise)
    stages: npt.NDArray[np.int8] = np.select(masks, codes, default=fallback).astype(np.int8)
    return stages


def stage_names(codes: npt.NDArray[np.int8]) -> npt.NDArray[np.str_]:
    names: npt.NDArray[np.str_] = np.asarray([s.value for s in STAGE_ORDER])[codes]
    return names


# --------------------------------------------------------------------------- translation to segment rules

_SEGMENT_OPS = {Op.EQ: "equals", Op.GT: "gt", Op.GTE: "gte", Op.LT: "lt", Op.LTE: "lte"}


def to_segment_rule(node: Condition | AllOf | AnyOf) -> dict[str, Any]:
    """The same condition in the segment rule language (`profile` conditions over the metric fields).

    Semantics are preserved: the segment language's `not_equals` and `not in` match a missing value while
    ours never match an unknown metric, so those two get an explicit `exists` guard.
    """
    if isinstance(node, AllOf):
        return {"and": [to_segment_rule(child) for child in node.all]}
    if isinstance(node, AnyOf):
        return {"or": [to_segment_rule(child) for child in node.any]}
    field = node.field.value
    exists = {"profile": field, "op": "exists"}
    if node.op is Op.EXISTS:
        return exists
    if node.op is Op.NOT_EXISTS:
        return {"profile": field, "op": "not_exists"}
    if node.op is Op.IN:
        return {"profile": field, "op": "in", "values": node.value}
    if node.op is Op.NOT_IN:
        return {"and": [exists, {"not": {"profile": field, "op": "in", "values": node.value}}]}
    if node.op is Op.NE:
        return {"and": [exists, {"profile": field, "op": "not_equals", "value": node.value}]}
    return {"profile": field, "op": _SEGMENT_OPS[node.op], "value": node.value}


def policy_as_segment_rules(policy: StagePolicy) -> list[dict[str, Any]]:
    """Each rule of a policy as `{"stage", "definition"}`, in order (first match wins)."""
    return [{"stage": rule.stage.value, "definition": to_segment_rule(rule.when)} for rule in policy.rules]

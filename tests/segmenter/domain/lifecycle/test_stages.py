"""Lifecycle stage policy: one test per stage of the default policy, rule validation, vectorized parity."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from services.segmenter.domain import rules as segment_rules
from services.segmenter.domain.lifecycle.stages import (
    CATEGORICAL_FIELDS,
    STAGE_ORDER,
    AllOf,
    AnyOf,
    Condition,
    MetricField,
    MetricValue,
    Stage,
    StagePolicy,
    StageRule,
    StageThresholds,
    classify,
    classify_many,
    default_policy,
    policy_as_segment_rules,
    stage_names,
    to_segment_rule,
)

POLICY = default_policy()

# A healthy established customer; each test changes what makes its stage.
ESTABLISHED: dict[str, MetricValue] = {
    "orders": 5,
    "revenue": 250.0,
    "days_since_signup": 400.0,
    "days_since_first_order": 380.0,
    "days_since_last_order": 20.0,
    "order_trend": 0.0,
    "p_alive": 0.9,
    "churn_risk": 0.1,
    "referrals_given": 0,
}


def stage_of(**changes: MetricValue) -> Stage:
    return classify({**ESTABLISHED, **changes}, POLICY).stage


def test_acquisition_known_but_never_ordered() -> None:
    lead = {"orders": 0, "days_since_signup": 200.0}
    assert classify(lead, POLICY).stage is Stage.ACQUISITION
    # Sign-up date unknown (e.g. an anonymous visitor identified later): still acquisition.
    assert classify({"orders": 0}, POLICY).stage is Stage.ACQUISITION


def test_onboarding_after_sign_up_or_first_order() -> None:
    assert classify({"orders": 0, "days_since_signup": 3.0}, POLICY).stage is Stage.ONBOARDING
    first_order = {
        "orders": 1,
        "days_since_signup": 10.0,
        "days_since_first_order": 10.0,
        "days_since_last_order": 10.0,
    }
    assert classify(first_order, POLICY).stage is Stage.ONBOARDING
    # The window is the marketer's to change.
    longer = default_policy(StageThresholds(onboarding_days=5))
    assert classify(first_order, longer).stage is Stage.RETENTION


def test_growth_when_orders_are_rising() -> None:
    assert stage_of(order_trend=2.0) is Stage.GROWTH
    assert stage_of(order_trend=-1.0) is Stage.RETENTION
    # One order cannot be "repeat purchases rising".
    assert stage_of(orders=1, order_trend=1.0) is Stage.RETENTION


def test_retention_is_the_established_default() -> None:
    decision = classify(ESTABLISHED, POLICY)
    assert decision.stage is Stage.RETENTION
    assert decision.rule_index == len(POLICY.rules) - 1


def test_advocacy_for_promoters_and_referrers() -> None:
    assert stage_of(nps_category="promoter", nps_score=10) is Stage.ADVOCACY
    assert stage_of(referrals_given=2) is Stage.ADVOCACY
    assert stage_of(nps_category="passive") is Stage.RETENTION
    # A promoter who never bought is not an advocate customer yet.
    assert classify({"orders": 0, "nps_category": "promoter"}, POLICY).stage is Stage.ACQUISITION


def test_at_risk_on_churn_risk_or_inactivity() -> None:
    assert stage_of(churn_risk=0.6, p_alive=0.4) is Stage.AT_RISK
    # One-time buyers always have P(alive) = 1 under BG/NBD: inactivity catches them.
    assert stage_of(
        orders=1, p_alive=1.0, churn_risk=0.0, days_since_first_order=200.0, days_since_last_order=200.0
    ) is (Stage.AT_RISK)
    # At risk beats advocacy: a promoter about to leave needs a win-back first.
    assert stage_of(churn_risk=0.6, p_alive=0.4, nps_category="promoter") is Stage.AT_RISK


def test_churned_when_probably_no_longer_alive() -> None:
    assert stage_of(p_alive=0.05, churn_risk=0.95) is Stage.CHURNED
    assert stage_of(days_since_last_order=400.0) is Stage.CHURNED
    # Thresholds are the marketer's.
    lenient = default_policy(StageThresholds(churned_p_alive=0.01))
    assert classify({**ESTABLISHED, "p_alive": 0.05, "churn_risk": 0.95}, lenient).stage is Stage.AT_RISK


def test_unknown_metrics_match_nothing_but_not_exists() -> None:
    # Model not fitted yet: no p_alive / churn_risk; the inactivity rules still apply.
    unknown_model = {k: v for k, v in ESTABLISHED.items() if k not in ("p_alive", "churn_risk")}
    assert classify(unknown_model, POLICY).stage is Stage.RETENTION
    assert classify({**unknown_model, "p_alive": float("nan")}, POLICY).stage is Stage.RETENTION
    rule = Condition(field="p_alive", op="ne", value=0.5)
    policy = StagePolicy(rules=[StageRule(stage=Stage.CHURNED, when=rule)], otherwise=Stage.ACQUISITION)
    assert classify({}, policy).stage is Stage.ACQUISITION
    missing = StagePolicy(
        rules=[StageRule(stage=Stage.CHURNED, when=Condition(field="p_alive", op="not_exists"))]
    )
    assert classify({}, missing).stage is Stage.CHURNED


def test_first_matching_rule_wins() -> None:
    both = Condition(field="orders", op="gte", value=1)
    policy = StagePolicy(
        rules=[StageRule(stage=Stage.GROWTH, when=both), StageRule(stage=Stage.CHURNED, when=both)]
    )
    assert classify({"orders": 3}, policy).stage is Stage.GROWTH
    assert classify({"orders": 0}, policy).rule_index is None


def test_a_policy_round_trips_through_json() -> None:
    dumped = POLICY.model_dump(mode="json")
    assert dumped["rules"][0]["stage"] == "churned"
    assert dumped["rules"][4]["when"] == {"field": "orders", "op": "eq", "value": 0.0}
    assert StagePolicy.model_validate(dumped) == POLICY


@pytest.mark.parametrize(
    "condition",
    [
        {"field": "orders", "op": "gt"},  # no value
        {"field": "orders", "op": "gt", "value": "many"},  # wrong type
        {"field": "orders", "op": "in", "value": 3},  # in needs a list
        {"field": "orders", "op": "in", "value": []},
        {"field": "orders", "op": "exists", "value": 1},
        {"field": "nps_category", "op": "gt", "value": "passive"},  # categorical order
        {"field": "nps_category", "op": "eq", "value": 9},
        {"field": "shoe_size", "op": "eq", "value": 9},  # unknown metric
        {"field": "orders", "op": "like", "value": 9},  # unknown op
        {"field": "orders", "op": "eq", "value": 1, "extra": True},
        # JSON stores neither: saved, the policy read back as null and failed every event batch.
        {"field": "days_since_last_order", "op": "gt", "value": float("inf")},
        {"field": "orders", "op": "in", "value": [1, float("nan")]},
    ],
)
def test_invalid_conditions_are_rejected(condition: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        StagePolicy.model_validate({"rules": [{"stage": "growth", "when": condition}]})


def test_invalid_policies_are_rejected() -> None:
    with pytest.raises(ValidationError):
        StagePolicy.model_validate({"rules": []})
    with pytest.raises(ValidationError):
        StagePolicy.model_validate(
            {"rules": [{"stage": "vip", "when": {"field": "orders", "op": "gte", "value": 1}}]}
        )
    with pytest.raises(ValidationError):
        StagePolicy.model_validate({"rules": [{"stage": "growth", "when": {"all": []}}]})
    with pytest.raises(ValidationError):
        StageThresholds(at_risk_inactive_days=400, churned_inactive_days=365)


def test_groups_and_membership_operators() -> None:
    when = AnyOf(
        any=[
            AllOf(
                all=[
                    Condition(field="rfm_r", op="in", value=[4, 5]),
                    Condition(field="rfm_f", op="gte", value=4),
                ]
            ),
            Condition(field="nps_category", op="not_in", value=["detractor", "passive"]),
        ]
    )
    policy = StagePolicy(rules=[StageRule(stage=Stage.ADVOCACY, when=when)], otherwise=Stage.RETENTION)
    assert classify({"rfm_r": 5, "rfm_f": 4}, policy).stage is Stage.ADVOCACY
    assert classify({"rfm_r": 3, "rfm_f": 5}, policy).stage is Stage.RETENTION
    assert classify({"nps_category": "promoter"}, policy).stage is Stage.ADVOCACY
    assert classify({"nps_category": "passive"}, policy).stage is Stage.RETENTION
    assert classify({}, policy).stage is Stage.RETENTION


def test_vectorized_classification_agrees_with_the_per_customer_one() -> None:
    rng = np.random.default_rng(3)
    n = 5_000
    orders = rng.integers(0, 6, size=n).astype(np.float64)
    bought = orders > 0
    first = np.where(bought, rng.uniform(0, 800, size=n), np.nan)
    last = np.where(bought, first * rng.uniform(0, 1, size=n), np.nan)
    p_alive = np.where(rng.random(n) < 0.2, np.nan, rng.uniform(0, 1, size=n))
    columns: dict[str, np.ndarray[Any, Any]] = {
        "orders": orders,
        "days_since_signup": np.where(rng.random(n) < 0.3, np.nan, rng.uniform(0, 900, size=n)),
        "days_since_first_order": first,
        "days_since_last_order": last,
        "order_trend": rng.integers(-2, 3, size=n).astype(np.float64),
        "p_alive": p_alive,
        "churn_risk": 1 - p_alive,
        "referrals_given": rng.integers(0, 2, size=n).astype(np.float64) * (rng.random(n) < 0.1),
        "nps_category": rng.choice(np.array(["", "promoter", "passive", "detractor"]), size=n),
    }

    codes = classify_many(columns, POLICY)

    names = stage_names(codes)
    for i in range(n):
        row: dict[str, MetricValue] = {
            k: (None if (isinstance(v[i], float) and np.isnan(v[i])) or v[i] == "" else v[i].item())
            for k, v in columns.items()
        }
        assert names[i] == classify(row, POLICY).stage.value, row
    # Every stage occurs in this mix, so the comparison covers each rule.
    assert set(names) == {s.value for s in STAGE_ORDER}


def test_vectorized_classification_of_nothing() -> None:
    assert classify_many({"orders": np.array([], dtype=np.float64)}, POLICY).size == 0
    with pytest.raises(ValueError):
        classify_many({"orders": np.zeros(2), "p_alive": np.zeros(3)}, POLICY)


def test_translation_to_segment_rules() -> None:
    when = AllOf(
        all=[
            Condition(field="orders", op="gte", value=1),
            AnyOf(
                any=[
                    Condition(field="nps_category", op="ne", value="detractor"),
                    Condition(field="rfm_r", op="not_in", value=[1, 2]),
                    Condition(field="p_alive", op="not_exists"),
                ]
            ),
        ]
    )

    assert to_segment_rule(when) == {
        "and": [
            {"profile": "orders", "op": "gte", "value": 1.0},
            {
                "or": [
                    {
                        "and": [
                            {"profile": "nps_category", "op": "exists"},
                            {"profile": "nps_category", "op": "not_equals", "value": "detractor"},
                        ]
                    },
                    {
                        "and": [
                            {"profile": "rfm_r", "op": "exists"},
                            {"not": {"profile": "rfm_r", "op": "in", "values": [1.0, 2.0]}},
                        ]
                    },
                    {"profile": "p_alive", "op": "not_exists"},
                ]
            },
        ]
    }


def test_translated_default_policy_parses_as_segment_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    # Declare the lifecycle metrics as profile fields, as the integration into the segmenter will.
    for field in MetricField:
        kind = "string" if field in CATEGORICAL_FIELDS else "number"
        monkeypatch.setitem(segment_rules.PROFILE_FIELDS, field.value, kind)
    translated = policy_as_segment_rules(POLICY)

    assert [r["stage"] for r in translated] == [rule.stage.value for rule in POLICY.rules]
    for rule in translated:
        segment_rules.parse_rule(rule["definition"])  # raises InvalidRule naming any bad node

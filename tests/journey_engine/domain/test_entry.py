"""Entry triggers, re-entry policies, goals and exit criteria."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from services.journey_engine.domain.conditions import Facts, holds
from services.journey_engine.domain.definition import JourneyDefinition, Predicate
from services.journey_engine.domain.entry import (
    EventTrigger,
    SegmentTrigger,
    StageTrigger,
    correlation_value,
    entry_stopped_holding,
    goal_reached,
    may_reenter,
    triggers,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NODES = {
    "nodes": [{"id": "s", "type": "entry"}, {"id": "x", "type": "exit"}],
    "edges": [{"from": "s", "to": "x"}],
}


def journey(entry: dict[str, Any], **extra: Any) -> JourneyDefinition:
    return JourneyDefinition.model_validate({"name": "t", "entry": entry, **NODES, **extra})


def event(name: str, **props: Any) -> EventTrigger:
    return EventTrigger(name, {"event": name, "properties": props})


def test_event_entry_with_property_filters() -> None:
    j = journey(
        {
            "type": "event",
            "event": "Product Added",
            "where": [{"field": "event.properties.price", "op": "gte", "value": 100}],
        }
    )
    big, small = event("Product Added", price=150), event("Product Added", price=5)
    assert triggers(j, big, Facts(event=big.event))
    assert not triggers(j, small, Facts(event=small.event))
    assert not triggers(j, event("Other", price=500), Facts(event={"properties": {"price": 500}}))


def test_segment_and_stage_entries_and_exit_criteria() -> None:
    seg = journey({"type": "segment", "segment_id": "vip"}, exit_when_entry_false=True)
    assert triggers(seg, SegmentTrigger("vip", "entered"), Facts())
    assert not triggers(seg, SegmentTrigger("vip", "exited"), Facts())
    assert entry_stopped_holding(seg, SegmentTrigger("vip", "exited"))
    assert not entry_stopped_holding(seg, SegmentTrigger("other", "exited"))
    future_off = journey({"type": "segment", "segment_id": "vip", "enrol_future": False})
    assert not triggers(future_off, SegmentTrigger("vip", "entered"), Facts())
    stage = journey({"type": "lifecycle_stage", "to_stage": "at_risk", "from_stage": "active"})
    assert triggers(stage, StageTrigger("at_risk", "active"), Facts())
    assert not triggers(stage, StageTrigger("at_risk", "new"), Facts())


def test_reentry_policies() -> None:
    once = journey({"type": "event", "event": "E"})
    after = journey({"type": "event", "event": "E"}, reentry={"policy": "after", "days": 7})
    always = journey({"type": "event", "event": "E"}, reentry={"policy": "always"})
    assert may_reenter(once, None, NOW)[0]
    assert not may_reenter(once, NOW - timedelta(days=300), NOW)[0]
    assert not may_reenter(after, NOW - timedelta(days=6), NOW)[0]
    assert may_reenter(after, NOW - timedelta(days=7), NOW)[0]
    assert may_reenter(always, NOW, NOW)[0]


def test_goal_window_and_correlation() -> None:
    j = journey(
        {"type": "event", "event": "Product Added"},
        correlation_key="cart_id",
        goal={"event": "Order Completed", "within": "P1D", "match_correlation": True},
    )
    order = event("Order Completed", cart_id="c1")
    assert correlation_value(j, order) == "c1"
    assert goal_reached(j, order, Facts(event=order.event), NOW - timedelta(hours=2), "c1", NOW)
    assert not goal_reached(j, order, Facts(event=order.event), NOW - timedelta(days=2), "c1", NOW)
    assert not goal_reached(j, order, Facts(event=order.event), NOW, "c2", NOW)


def test_predicates() -> None:
    facts = Facts(
        traits={"plan": "gold", "tags": ["a"], "age": 30, "nested": {"x": 1}},
        event={"properties": {"total": 12.5}},
        segments=frozenset({"vip"}),
    )
    cases = [
        ({"field": "traits.plan", "op": "eq", "value": "gold"}, True),
        ({"field": "plan", "op": "in", "value": ["gold", "silver"]}, True),
        ({"field": "traits.nested.x", "op": "gt", "value": 0}, True),
        ({"field": "traits.tags", "op": "contains", "value": "a"}, True),
        ({"field": "traits.missing", "op": "exists"}, False),
        ({"field": "traits.missing", "op": "neq", "value": 1}, True),
        ({"field": "traits.plan", "op": "lt", "value": 3}, False),  # incomparable types: false, no error
        ({"field": "event.properties.total", "op": "lte", "value": 12.5}, True),
        ({"field": "segment", "op": "member", "value": "vip"}, True),
        ({"field": "segment", "op": "not_member", "value": "vip"}, False),
    ]
    for raw, expected in cases:
        assert holds(Predicate.model_validate(raw), facts) is expected, raw

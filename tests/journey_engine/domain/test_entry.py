"""Entry triggers, re-entry policies, goals and exit criteria."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from services.journey_engine.domain.conditions import Facts, holds
from services.journey_engine.domain.definition import JourneyDefinition, Predicate
from services.journey_engine.domain.entry import (
    EventTrigger,
    SegmentTrigger,
    StageTrigger,
    correlation_key,
    correlation_keys,
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
    # A long value converts its own entry like a short one (compared by its key), and an entry that
    # the release before stored as the value itself as well.
    long_cart = event("Order Completed", cart_id="k" * 5000)
    facts = Facts(event=long_cart.event)
    assert goal_reached(j, long_cart, facts, NOW, correlation_key("k" * 5000), NOW)
    assert goal_reached(j, long_cart, facts, NOW, "k" * 5000, NOW)
    assert not goal_reached(j, long_cart, facts, NOW, correlation_key("k" * 4999), NOW)
    assert not goal_reached(j, long_cart, facts, NOW, "c1", NOW)


def test_a_correlation_value_is_its_own_key_while_short_and_its_digest_once_long() -> None:
    # Short values (up to 1,024 bytes in UTF-8) are stored as the release before stored them.
    for short in ("", "c1", "C1 ", "é" * 512, "x" * 1024, "cart sha256:x"):
        assert correlation_key(short) == short and correlation_keys(short) == (short,)
    # Longer: `sha256:` and the SHA-256 of the UTF-8 bytes in hex, 71 characters however long.
    assert correlation_key("é" * 513) == "sha256:" + hashlib.sha256(("é" * 513).encode()).hexdigest()
    keys = {correlation_key(v) for v in ("x" * 1025, "x" * 1026, "y" * 100_000, "\U0001f6d2" * 300)}
    assert len(keys) == 4 and {len(k) for k in keys} == {71}
    # A long value's entries may be stored as itself too (the release before stored every value so).
    assert correlation_keys("x" * 1025) == (correlation_key("x" * 1025), "x" * 1025)


def test_a_value_that_looks_like_a_digest_is_hashed_and_collides_with_no_other() -> None:
    long = "z" * 3000
    digest = correlation_key(long)
    # Sent as it is, a long value's digest is another value: hashed again, never the long one's key.
    assert correlation_key(digest) not in (digest, long)
    assert correlation_key(digest).startswith("sha256:") and correlation_keys(digest) == (
        correlation_key(digest),
    )
    assert correlation_key("sha256:") != "sha256:" and correlation_key("sha256:") != correlation_key("")
    j = journey(
        {"type": "event", "event": "Product Added"},
        correlation_key="cart_id",
        goal={"event": "Order Completed", "match_correlation": True},
    )
    posing = event("Order Completed", cart_id=digest)
    assert not goal_reached(j, posing, Facts(event=posing.event), NOW, digest, NOW)
    assert goal_reached(j, posing, Facts(event=posing.event), NOW, correlation_key(digest), NOW)


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

"""Evaluating predicates against what is known about a customer and the event at hand."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.journey_engine.domain.definition import Predicate

_MISSING = object()


@dataclass(frozen=True)
class Facts:
    """What a predicate may look at: `traits.*`, `event.*`, `customer.*`, `stage`, segment membership."""

    traits: Mapping[str, Any] = field(default_factory=dict)
    event: Mapping[str, Any] = field(default_factory=dict)
    customer: Mapping[str, Any] = field(default_factory=dict)
    segments: frozenset[str] = frozenset()

    def lookup(self, path: str) -> Any:
        head, _, rest = path.partition(".")
        root: Any
        if head == "traits":
            root = self.traits
        elif head == "event":
            root = self.event
        elif head == "customer":
            root = self.customer
        elif head == "stage":
            return self.customer.get("stage", _MISSING)
        else:
            # A bare name means a trait.
            root, rest = self.traits, path
        for part in rest.split(".") if rest else []:
            if isinstance(root, Mapping) and part in root:
                root = root[part]
            else:
                return _MISSING
        return root


def _compare(op: str, actual: Any, expected: Any) -> bool:
    try:
        if op == "gt":
            return bool(actual > expected)
        if op == "gte":
            return bool(actual >= expected)
        if op == "lt":
            return bool(actual < expected)
        return bool(actual <= expected)
    except TypeError:
        return False


def holds(predicate: Predicate, facts: Facts) -> bool:
    op = predicate.op
    if op == "member":
        return predicate.value in facts.segments
    if op == "not_member":
        return predicate.value not in facts.segments
    actual = facts.lookup(predicate.field)
    if op == "exists":
        return actual is not _MISSING and actual is not None
    if op == "not_exists":
        return actual is _MISSING or actual is None
    if actual is _MISSING:
        return op == "neq"
    if op == "eq":
        return bool(actual == predicate.value)
    if op == "neq":
        return bool(actual != predicate.value)
    if op == "in":
        return actual in predicate.value
    if op == "contains":
        if isinstance(actual, str) and isinstance(predicate.value, str):
            return predicate.value in actual
        return isinstance(actual, list) and predicate.value in actual
    return _compare(op, actual, predicate.value)


def all_hold(predicates: Sequence[Predicate], facts: Facts) -> bool:
    return all(holds(p, facts) for p in predicates)


def describe(predicate: Predicate) -> str:
    return (
        f"{predicate.field} {predicate.op} {predicate.value!r}"
        if predicate.value is not None
        else (f"{predicate.field} {predicate.op}")
    )

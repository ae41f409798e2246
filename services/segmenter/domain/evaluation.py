"""Evaluating a rule tree over one profile snapshot at an injected `now` (pure, no I/O).

The SQL compiler in `store/sql_rules.py` implements the same semantics for back-fill and preview;
`tests/segmenter/test_sql_rules_agree.py` checks both agree on the same profiles. The real-time path
runs `domain/compiled.py`'s closures, checked against this interpreter by `test_compiled.py`.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from services.segmenter.domain.profile import Occurrence, ProfileSnapshot
from services.segmenter.domain.rules import (
    AndRule,
    Comparison,
    LastPerformedCondition,
    MemberOfCondition,
    NotPerformedCondition,
    NotRule,
    OrRule,
    PerformedCondition,
    ProfileCondition,
    RandomBucketCondition,
    RecommendationCondition,
    Rule,
    TraitCondition,
    as_datetime,
    parse_duration,
)
from shared.contracts import storable

_MISSING: Any = object()


# Up to here every integer is a double: an int and a float compare the same exactly and as decimals.
_EXACT = 2**53


def json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON (and PostgreSQL's jsonb) sees it: true is not 1, 1 is 1.0, and a number is the
    decimal its JSON text writes (a float's shortest text, which orjson and `repr` write alike). So
    past 2**53 an int equals a float whose text is that int: 1152921504606847000 equals
    1.152921504606847e18 (whose double is ...6976), as in jsonb; and such a float trait read back from
    jsonb is that int."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if type(a) is type(b) or (-_EXACT <= a <= _EXACT and -_EXACT <= b <= _EXACT):
            return a == b
        return _decimal(a) == _decimal(b)
    if type(a) is not type(b):
        return False
    return bool(a == b)


def _decimal(n: int | float) -> Decimal:
    return Decimal(repr(n)) if isinstance(n, float) else Decimal(n)


def as_double(n: int | float) -> float:
    """A number as gt/gte/lt/lte compare it: the nearest double, as SQL's float8 cast reads jsonb and
    numeric columns (both round correctly). See `compare`."""
    try:
        return float(n)
    except OverflowError:  # an integer past any double (no trait stores one: orjson refuses it)
        return math.inf if n > 0 else -math.inf


# A path part that indexes an array (`products.0.category`), as PostgreSQL's `#>` reads it. Only
# plain non-negative numbers: `#>` would also read `-1` (from the end), `01`, `+1` or ` 1`, which
# store/sql_rules.py therefore looks up as object keys only. Nine digits: no index goes beyond.
ARRAY_INDEX = re.compile(r"(0|[1-9][0-9]{0,8})\Z")


def lookup_path(data: dict[str, Any], path: str) -> Any:
    """`account.plan` -> data["account"]["plan"], `products.0.sku` -> data["products"][0]["sku"];
    _MISSING if absent."""
    current: Any = data
    for part in path.split("."):
        if isinstance(current, dict):
            if part not in current:
                return _MISSING
            current = current[part]
        elif isinstance(current, list) and ARRAY_INDEX.match(part) and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def compare(c: Comparison, value: Any, now: datetime) -> bool:
    """One comparison on a value (_MISSING when the trait/property is absent)."""
    op = c.op
    present = value is not _MISSING and value is not None
    if op == "exists":
        return present
    if op == "not_exists":
        return not present
    if op == "equals":
        return value is not _MISSING and json_equal(value, c.value)
    if op == "not_equals":
        return value is _MISSING or not json_equal(value, c.value)
    if op == "in":
        return value is not _MISSING and any(json_equal(value, v) for v in c.values or ())
    if op == "contains":
        if isinstance(value, str):
            return isinstance(c.value, str) and c.value in value
        if isinstance(value, list):
            return any(json_equal(e, c.value) for e in value)
        return False
    if op in ("gt", "gte", "lt", "lte"):
        # As doubles, here as in SQL (float8): real time, back-fill and preview must agree. The float8
        # columns (revenue, lifecycle scores) cannot be compared exactly in SQL (PostgreSQL's float8 ->
        # numeric keeps 15 digits), and comparing jsonb as numeric would need decimal arithmetic here
        # for every float trait to agree (the double 0.1 is not the decimal 0.1); this leaves the
        # back-fill statement as it was. Integers past 2**53 round to the nearest double:
        # 9007199254740993 is not gt 9007199254740992, whichever path evaluates it.
        if not _is_number(value) or not _is_number(c.value):
            return False
        x, y = as_double(value), as_double(c.value)
        return {"gt": x > y, "gte": x >= y, "lt": x < y, "lte": x <= y}[op]
    t = as_datetime(value)
    if t is None:
        return False
    if op == "within":
        assert c.duration is not None
        return now - parse_duration(c.duration) < t <= now
    ref = _reference_time(c.value, c.ago, now)
    return t <= ref if op == "before" else t > ref


def _reference_time(value: Any, ago: str | int | None, now: datetime) -> datetime:
    if ago is not None:
        return now - parse_duration(ago)
    ref = as_datetime(value)
    assert ref is not None, "validated"
    return ref


def bucket_of(customer_id: str, salt: str, buckets: int) -> int:
    """A stable bucket from the customer id (md5, first 32 bits), identical in SQL."""
    digest = hashlib.md5(f"{salt}{customer_id}".encode()).hexdigest()
    return int(digest[:8], 16) % buckets


def _occurrences(rule: PerformedCondition, p: ProfileSnapshot, now: datetime) -> list[Occurrence]:
    out = []
    start, end = _window(rule, now)
    for occ in p.timeline.get(rule.performed, ()):
        if start is not None and (
            occ.timestamp <= start if rule.within is not None else occ.timestamp < start
        ):
            continue
        if end is not None and occ.timestamp > end:
            continue
        if all(compare(f, lookup_path(occ.properties, f.property), now) for f in rule.where):
            out.append(occ)
    return out


def _window(rule: PerformedCondition, now: datetime) -> tuple[datetime | None, datetime | None]:
    if rule.within is not None:
        return now - parse_duration(rule.within), now
    if rule.between is not None:
        return rule.between.start, rule.between.end
    return None, None


def performed_count(rule: PerformedCondition, p: ProfileSnapshot, now: datetime) -> int:
    if not rule.where and rule.within is None and rule.between is None:
        agg = p.events.get(rule.performed)
        return agg.count if agg else 0
    return len(_occurrences(rule, p, now))


def evaluate(rule: Rule, p: ProfileSnapshot, now: datetime) -> bool:
    if isinstance(rule, AndRule):
        return all(evaluate(r, p, now) for r in rule.and_)
    if isinstance(rule, OrRule):
        return any(evaluate(r, p, now) for r in rule.or_)
    if isinstance(rule, NotRule):
        return not evaluate(rule.not_, p, now)
    if isinstance(rule, TraitCondition):
        return compare(rule, lookup_path(p.traits, rule.trait), now)
    if isinstance(rule, ProfileCondition):
        return compare(rule, p.fields.get(rule.profile, _MISSING), now)
    if isinstance(rule, PerformedCondition):
        n = performed_count(rule, p, now)
        want = rule.count.value
        return {"at_least": n >= want, "at_most": n <= want, "exactly": n == want}[rule.count.op]
    if isinstance(rule, NotPerformedCondition):
        agg = p.events.get(rule.not_performed)
        return agg is None or agg.last_at <= now - parse_duration(rule.since)
    if isinstance(rule, LastPerformedCondition):
        agg = p.events.get(rule.last_performed)
        if agg is None:
            return False
        ref = _reference_time(rule.value, rule.ago, now)
        return agg.last_at <= ref if rule.op == "before" else agg.last_at > ref
    if isinstance(rule, MemberOfCondition):
        return rule.member_of in p.memberships
    if isinstance(rule, RandomBucketCondition):
        b = rule.random_bucket
        return bucket_of(p.customer_id, b.salt, b.buckets) < b.below
    if isinstance(rule, RecommendationCondition):
        return (rule.category or "*") in p.recommendations.get(rule.recommendation, set())
    raise TypeError(f"unknown rule node {type(rule).__name__}")


# --------------------------------------------------------------------------- explain


@dataclass
class Explanation:
    path: str
    kind: str
    holds: bool
    detail: dict[str, Any] = field(default_factory=dict)
    children: list[Explanation] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "kind": self.kind, "holds": self.holds}
        if self.detail:
            out["detail"] = self.detail
        if self.children:
            out["children"] = [c.as_json() for c in self.children]
        return out


def explain(rule: Rule, p: ProfileSnapshot, now: datetime, path: str = "definition") -> Explanation:
    """Which conditions hold for this customer, node by node (with the values they looked at)."""
    if isinstance(rule, AndRule):
        kids = [explain(r, p, now, f"{path}.and[{i}]") for i, r in enumerate(rule.and_)]
        return Explanation(path, "and", all(k.holds for k in kids), children=kids)
    if isinstance(rule, OrRule):
        kids = [explain(r, p, now, f"{path}.or[{i}]") for i, r in enumerate(rule.or_)]
        return Explanation(path, "or", any(k.holds for k in kids), children=kids)
    if isinstance(rule, NotRule):
        kid = explain(rule.not_, p, now, f"{path}.not")
        return Explanation(path, "not", not kid.holds, children=[kid])
    holds = evaluate(rule, p, now)
    detail: dict[str, Any] = {}
    kind = type(rule).__name__
    if isinstance(rule, TraitCondition):
        kind, v = "trait", lookup_path(p.traits, rule.trait)
        detail = {"trait": rule.trait, "op": rule.op, "actual": None if v is _MISSING else v}
    elif isinstance(rule, ProfileCondition):
        kind, v = "profile", p.fields.get(rule.profile)
        detail = {
            "field": rule.profile,
            "op": rule.op,
            "actual": v.isoformat() if isinstance(v, datetime) else v,
        }
    elif isinstance(rule, PerformedCondition):
        kind = "performed"
        detail = {
            "event": rule.performed,
            "count": performed_count(rule, p, now),
            "want": rule.count.model_dump(),
        }
    elif isinstance(rule, (NotPerformedCondition, LastPerformedCondition)):
        name = rule.not_performed if isinstance(rule, NotPerformedCondition) else rule.last_performed
        kind = "not_performed" if isinstance(rule, NotPerformedCondition) else "last_performed"
        agg = p.events.get(name)
        detail = {"event": name, "last_at": agg.last_at.isoformat() if agg else None}
    elif isinstance(rule, MemberOfCondition):
        kind, detail = "member_of", {"segment_id": rule.member_of}
    elif isinstance(rule, RandomBucketCondition):
        b = rule.random_bucket
        kind, detail = (
            "random_bucket",
            {"bucket": bucket_of(p.customer_id, b.salt, b.buckets), "below": b.below},
        )
    elif isinstance(rule, RecommendationCondition):
        kind = "recommendation"
        detail = {
            "list": rule.recommendation,
            "category": rule.category,
            "categories": sorted(p.recommendations.get(rule.recommendation, set()) - {"*"}),
        }
    return Explanation(path, kind, holds, detail)


# --------------------------------------------------------------------------- when can it change


# Moments from this one on are never scheduled: a trait such as "9999-12-31" would overflow the
# arithmetic (see `shared.contracts.storable`). `store.sql_rules` applies the same horizon.
HORIZON = storable.LATEST_TIME


def next_change_at(rule: Rule, p: ProfileSnapshot, now: datetime) -> datetime | None:
    """The earliest moment after `now` (and before `HORIZON`) when a time-based condition in `rule`
    can change for this profile without any new event (None if none can). Re-evaluating then is
    enough: values only change at these moments, so nobody is ever scanned periodically."""
    moments = [m for m in _moments(rule, p, now) if m is not None and now < m < HORIZON]
    return min(moments) if moments else None


def _later(t: datetime, span: timedelta = timedelta(0)) -> datetime | None:
    """`t + span` in UTC, or None past what a datetime can hold."""
    try:
        return (t + span).astimezone(UTC)
    except OverflowError:
        return None


def _moments(rule: Rule, p: ProfileSnapshot, now: datetime) -> list[datetime | None]:
    if isinstance(rule, AndRule):
        return [m for r in rule.and_ for m in _moments(r, p, now)]
    if isinstance(rule, OrRule):
        return [m for r in rule.or_ for m in _moments(r, p, now)]
    if isinstance(rule, NotRule):
        return _moments(rule.not_, p, now)
    if isinstance(rule, (TraitCondition, ProfileCondition)):
        if rule.op == "within" or rule.ago is not None:
            raw = (
                lookup_path(p.traits, rule.trait)
                if isinstance(rule, TraitCondition)
                else p.fields.get(rule.profile, _MISSING)
            )
            t = as_datetime(raw)
            if t is None:
                return []
            span = parse_duration(rule.duration if rule.op == "within" else rule.ago)
            return [_later(t, span), _later(t)] if rule.op == "within" else [_later(t, span)]
        return []
    if isinstance(rule, PerformedCondition):
        if rule.within is None:
            return []
        span = parse_duration(rule.within)
        matching = [
            o.timestamp
            for o in p.timeline.get(rule.performed, ())
            if all(compare(f, lookup_path(o.properties, f.property), now) for f in rule.where)
        ]
        # An occurrence leaves the window at t + span; one stamped in the future enters it at t.
        return [_later(t, span) for t in matching] + [t for t in matching if t > now]
    if isinstance(rule, NotPerformedCondition):
        agg = p.events.get(rule.not_performed)
        return [_later(agg.last_at, parse_duration(rule.since))] if agg else []
    if isinstance(rule, LastPerformedCondition):
        agg = p.events.get(rule.last_performed)
        if agg is None or rule.ago is None:
            return []
        return [_later(agg.last_at, parse_duration(rule.ago))]
    return []

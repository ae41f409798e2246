"""Rule trees compiled into Python closures, for the real-time path (pure, no I/O).

`evaluation.evaluate` and `evaluation.next_change_at` walk a rule tree node by node, testing each
node's type and operator on every call; the real-time path asks them ~10 times per event (every
segment an event can affect, for each of its customers). A compiled rule decides all of that once,
when the segment is loaded: what is left per call is the comparisons themselves. The interpreter
stays the reference (explanations, preview, tests): `tests/segmenter/domain/test_compiled.py`
checks both agree on generated rules and profiles.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from datetime import datetime
from typing import Any

from services.segmenter.domain.evaluation import (
    _MISSING,
    HORIZON,
    _is_number,
    _later,
    _reference_time,
    as_double,
    bucket_of,
    compare,
    json_equal,
    lookup_path,
)
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

Predicate = Callable[[ProfileSnapshot, datetime], bool]
ValueTest = Callable[[Any, datetime], bool]
Moments = Callable[[ProfileSnapshot, datetime], list[datetime | None]]
Getter = Callable[[ProfileSnapshot], Any]

_ORDER = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}
_COUNT = {"at_least": operator.ge, "at_most": operator.le, "exactly": operator.eq}


def _path_getter(path: str, source: Callable[[ProfileSnapshot], dict[str, Any]]) -> Getter:
    if "." not in path:
        # `lookup_path` on a dict with a one-part path is a plain get.
        return lambda p: source(p).get(path, _MISSING)
    return lambda p: lookup_path(source(p), path)


def _traits(p: ProfileSnapshot) -> dict[str, Any]:
    return p.traits


def compile_comparison(c: Comparison) -> ValueTest:
    """`compare(c, value, now)` with the operator and its operand decided once."""
    op, target = c.op, c.value
    if op == "exists":
        return lambda v, now: v is not _MISSING and v is not None
    if op == "not_exists":
        return lambda v, now: v is _MISSING or v is None
    if op == "equals":
        if type(target) is str:
            # json_equal with a string: only a string of the same text (never a number or a bool).
            return lambda v, now: type(v) is str and v == target
        return lambda v, now: v is not _MISSING and json_equal(v, target)
    if op == "not_equals":
        if type(target) is str:
            return lambda v, now: not (type(v) is str and v == target)
        return lambda v, now: v is _MISSING or not json_equal(v, target)
    if op == "in":
        values = list(c.values or ())
        if values and all(type(x) is str for x in values):
            texts = frozenset(values)
            return lambda v, now: type(v) is str and v in texts
        return lambda v, now: v is not _MISSING and any(json_equal(v, x) for x in values)
    if op in _ORDER:
        if not _is_number(target):
            return lambda v, now: False
        order, bound = _ORDER[op], as_double(target)  # as doubles, as SQL does (`compare`)
        return lambda v, now: _is_number(v) and bool(order(as_double(v), bound))
    if op == "within":
        assert c.duration is not None
        span = parse_duration(c.duration)

        def within(v: Any, now: datetime) -> bool:
            t = as_datetime(v)
            return t is not None and now - span < t <= now

        return within
    if op in ("before", "after"):
        before = op == "before"
        if c.ago is not None:
            ago = parse_duration(c.ago)

            def relative(v: Any, now: datetime) -> bool:
                t = as_datetime(v)
                if t is None:
                    return False
                ref = now - ago
                return t <= ref if before else t > ref

            return relative
        fixed = _reference_time(c.value, None, datetime.min)

        def absolute(v: Any, now: datetime) -> bool:
            t = as_datetime(v)
            if t is None:
                return False
            return t <= fixed if before else t > fixed

        return absolute
    # Anything else is what the interpreter does with it (`contains`).
    return lambda v, now: compare(c, v, now)


def _occurrence_filter(rule: PerformedCondition) -> Callable[[Occurrence, datetime], bool] | None:
    tests = [(f.property, compile_comparison(f)) for f in rule.where]
    if not tests:
        return None

    def matches(o: Occurrence, now: datetime) -> bool:
        props = o.properties
        for path, test in tests:
            value = props.get(path, _MISSING) if "." not in path else lookup_path(props, path)
            if not test(value, now):
                return False
        return True

    return matches


def _performed(rule: PerformedCondition) -> Predicate:
    name, want, count_ok = rule.performed, rule.count.value, _COUNT[rule.count.op]
    matches = _occurrence_filter(rule)
    if matches is None and rule.within is None and rule.between is None:

        def by_count(p: ProfileSnapshot, now: datetime) -> bool:
            agg = p.events.get(name)
            return bool(count_ok(agg.count if agg else 0, want))

        return by_count
    span = parse_duration(rule.within) if rule.within is not None else None
    start = rule.between.start if rule.between is not None and span is None else None
    end = rule.between.end if rule.between is not None and span is None else None

    def by_occurrences(p: ProfileSnapshot, now: datetime) -> bool:
        n = 0
        low = now - span if span is not None else start
        high = now if span is not None else end
        for occ in p.timeline.get(name, ()):
            ts = occ.timestamp
            if low is not None and (ts <= low if span is not None else ts < low):
                continue
            if high is not None and ts > high:
                continue
            if matches is None or matches(occ, now):
                n += 1
        return bool(count_ok(n, want))

    return by_occurrences


def compile_predicate(rule: Rule) -> Predicate:
    """`lambda p, now: evaluate(rule, p, now)`, compiled."""
    if isinstance(rule, AndRule):
        parts = tuple(compile_predicate(r) for r in rule.and_)
        if len(parts) == 1:
            return parts[0]
        return lambda p, now: all(f(p, now) for f in parts)
    if isinstance(rule, OrRule):
        parts = tuple(compile_predicate(r) for r in rule.or_)
        if len(parts) == 1:
            return parts[0]
        return lambda p, now: any(f(p, now) for f in parts)
    if isinstance(rule, NotRule):
        inner = compile_predicate(rule.not_)
        return lambda p, now: not inner(p, now)
    if isinstance(rule, TraitCondition):
        get = _path_getter(rule.trait, _traits)
        test = compile_comparison(rule)
        return lambda p, now: test(get(p), now)
    if isinstance(rule, ProfileCondition):
        field_name, test = rule.profile, compile_comparison(rule)
        return lambda p, now: test(p.fields.get(field_name, _MISSING), now)
    if isinstance(rule, PerformedCondition):
        return _performed(rule)
    if isinstance(rule, NotPerformedCondition):
        name, since = rule.not_performed, parse_duration(rule.since)

        def not_performed(p: ProfileSnapshot, now: datetime) -> bool:
            agg = p.events.get(name)
            return agg is None or agg.last_at <= now - since

        return not_performed
    if isinstance(rule, LastPerformedCondition):
        return _last_performed(rule)
    if isinstance(rule, MemberOfCondition):
        sid = rule.member_of
        return lambda p, now: sid in p.memberships
    if isinstance(rule, RandomBucketCondition):
        b = rule.random_bucket
        salt, buckets, below = b.salt, b.buckets, b.below
        return lambda p, now: bucket_of(p.customer_id, salt, buckets) < below
    if isinstance(rule, RecommendationCondition):
        listed, category = rule.recommendation, rule.category or "*"
        return lambda p, now: category in p.recommendations.get(listed, set())
    raise TypeError(f"unknown rule node {type(rule).__name__}")


def _last_performed(rule: LastPerformedCondition) -> Predicate:
    name, before = rule.last_performed, rule.op == "before"
    if rule.ago is not None:
        ago = parse_duration(rule.ago)

        def relative(p: ProfileSnapshot, now: datetime) -> bool:
            agg = p.events.get(name)
            if agg is None:
                return False
            ref = now - ago
            return agg.last_at <= ref if before else agg.last_at > ref

        return relative
    fixed = _reference_time(rule.value, None, datetime.min)

    def absolute(p: ProfileSnapshot, now: datetime) -> bool:
        agg = p.events.get(name)
        if agg is None:
            return False
        return agg.last_at <= fixed if before else agg.last_at > fixed

    return absolute


# --------------------------------------------------------------------------- when can it change


def _compile_moments(rule: Rule) -> Moments | None:
    """`evaluation._moments(rule, ...)`, compiled; None where a rule has no time-based part."""
    if isinstance(rule, (AndRule, OrRule)):
        kids = rule.and_ if isinstance(rule, AndRule) else rule.or_
        parts = [m for m in (_compile_moments(r) for r in kids) if m is not None]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return lambda p, now: [m for f in parts for m in f(p, now)]
    if isinstance(rule, NotRule):
        return _compile_moments(rule.not_)
    if isinstance(rule, (TraitCondition, ProfileCondition)):
        if not (rule.op == "within" or rule.ago is not None):
            return None
        get = (
            _path_getter(rule.trait, _traits)
            if isinstance(rule, TraitCondition)
            else _field_getter(rule.profile)
        )
        within = rule.op == "within"
        span = parse_duration(rule.duration if within else rule.ago)

        def value_moments(p: ProfileSnapshot, now: datetime) -> list[datetime | None]:
            t = as_datetime(get(p))
            if t is None:
                return []
            return [_later(t, span), _later(t)] if within else [_later(t, span)]

        return value_moments
    if isinstance(rule, PerformedCondition):
        if rule.within is None:
            return None
        name, window = rule.performed, parse_duration(rule.within)
        matches = _occurrence_filter(rule)

        def occurrence_moments(p: ProfileSnapshot, now: datetime) -> list[datetime | None]:
            matching = [o.timestamp for o in p.timeline.get(name, ()) if matches is None or matches(o, now)]
            # An occurrence leaves the window at t + span; one stamped in the future enters it at t.
            return [_later(t, window) for t in matching] + [t for t in matching if t > now]

        return occurrence_moments
    if isinstance(rule, NotPerformedCondition):
        name, since = rule.not_performed, parse_duration(rule.since)

        def quiet_moments(p: ProfileSnapshot, now: datetime) -> list[datetime | None]:
            agg = p.events.get(name)
            return [_later(agg.last_at, since)] if agg else []

        return quiet_moments
    if isinstance(rule, LastPerformedCondition):
        if rule.ago is None:
            return None
        name, ago = rule.last_performed, parse_duration(rule.ago)

        def last_moments(p: ProfileSnapshot, now: datetime) -> list[datetime | None]:
            agg = p.events.get(name)
            return [_later(agg.last_at, ago)] if agg else []

        return last_moments
    return None


def _field_getter(name: str) -> Getter:
    return lambda p: p.fields.get(name, _MISSING)


NextChange = Callable[[ProfileSnapshot, datetime], datetime | None]


def compile_next_change(rule: Rule) -> NextChange:
    """`lambda p, now: evaluation.next_change_at(rule, p, now)`, compiled."""
    moments = _compile_moments(rule)
    if moments is None:
        return lambda p, now: None

    def next_change(p: ProfileSnapshot, now: datetime) -> datetime | None:
        soonest: datetime | None = None
        for m in moments(p, now):
            if m is not None and now < m < HORIZON and (soonest is None or m < soonest):
                soonest = m
        return soonest

    return next_change

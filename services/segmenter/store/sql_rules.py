"""The rule tree compiled to SQL over `customers c`, for back-fill and preview (set-based, no Python
per customer). Same semantics as `domain/evaluation.py`, checked by tests on the same profiles.

`now` is fixed at compile time, so relative times become plain timestamp parameters.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import orjson

from services.segmenter.domain.evaluation import ARRAY_INDEX, HORIZON
from services.segmenter.domain.rules import (
    PROFILE_FIELDS,
    AndRule,
    Comparison,
    LastPerformedCondition,
    MemberOfCondition,
    NotPerformedCondition,
    NotRule,
    OrRule,
    PerformedCondition,
    ProfileCondition,
    PropertyFilter,
    RandomBucketCondition,
    RecommendationCondition,
    Rule,
    TraitCondition,
    as_datetime,
    in_utc,
    parse_duration,
)

_COUNT_OPS = {"at_least": ">=", "at_most": "<=", "exactly": "="}
_NUM_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


class _Subject:
    """How to read one value as jsonb, as a timestamp and as a number."""

    def __init__(self, jsonb: str, ts: str, num: str, typed: bool) -> None:
        self.jsonb, self.ts, self.num, self.typed = jsonb, ts, num, typed


class RuleSql:
    def __init__(self, now: datetime) -> None:
        self.now = now
        self.params: dict[str, Any] = {"now": now}

    def _p(self, value: Any) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f":{name}"

    def _time(self, value: datetime) -> str:
        """A date written in a rule, as text PostgreSQL reads: asyncpg sends 0001-01-01T00:00:00Z and
        9999-12-31T23:59:59.999999Z (datetime.min and .max) as -infinity and infinity, so a trait on
        that very moment compared otherwise than in Python (`after 0001-01-01` held for it)."""
        utc = in_utc(value)
        assert utc is not None, "validated"
        return f"CAST(CAST({self._p(utc.isoformat())} AS text) AS timestamptz)"

    def _json(self, value: Any) -> str:
        return f"CAST({self._p(orjson.dumps(value).decode())} AS jsonb)"

    # ----------------------------------------------------------------- subjects

    def _json_path(self, base: str, path: str) -> _Subject:
        """One step per part, as `evaluation.lookup_path` walks: a plain number is an object key or an
        array index (`#>`), anything else an object key only (`->`: `#>` reads `-1`, `01`, `+1` as
        array indexes too)."""
        *parents, last = path.split(".")
        for part in parents:
            base = (
                f"({base} #> CAST({self._p([part])} AS text[]))"
                if ARRAY_INDEX.match(part)
                else f"({base} -> {self._p(part)})"
            )
        if ARRAY_INDEX.match(last):
            key = f"CAST({self._p([last])} AS text[])"
            j, t = f"({base} #> {key})", f"try_timestamptz({base} #>> {key})"
        else:
            key = self._p(last)
            j, t = f"({base} -> {key})", f"try_timestamptz({base} ->> {key})"
        return _Subject(j, t, f"({j})::float8", typed=False)

    def _field(self, name: str) -> _Subject:
        col = f"c.{name}"  # a fixed whitelist (PROFILE_FIELDS), never user text
        assert name in PROFILE_FIELDS
        return _Subject(f"to_jsonb({col})", col, f"{col}::float8", typed=True)

    # ----------------------------------------------------------------- comparisons

    def _compare(self, c: Comparison, s: _Subject) -> str:
        op = c.op
        if op in ("exists", "not_exists"):
            present = (
                f"{s.ts} IS NOT NULL" if s.typed else f"coalesce(jsonb_typeof({s.jsonb}), 'null') <> 'null'"
            )
            return present if op == "exists" else f"NOT ({present})"
        if op == "equals":
            return f"coalesce({s.jsonb} = {self._json(c.value)}, false)"
        if op == "not_equals":
            return f"({s.jsonb} IS DISTINCT FROM {self._json(c.value)})"
        if op == "in":
            return f"coalesce({s.jsonb} IN (SELECT jsonb_array_elements({self._json(c.values)})), false)"
        if op == "contains":
            in_array = f"{s.jsonb} @> jsonb_build_array({self._json(c.value)})"
            in_string = (
                f"strpos({s.jsonb} #>> '{{}}', {self._p(c.value)}) > 0"
                if isinstance(c.value, str)
                else "false"
            )
            return (
                f"(CASE jsonb_typeof({s.jsonb}) WHEN 'string' THEN {in_string} "
                f"WHEN 'array' THEN {in_array} ELSE false END)"
            )
        if op in _NUM_OPS:
            # As doubles, as `evaluation.compare` does (why there).
            cmp = f"{s.num} {_NUM_OPS[op]} CAST({self._p(float(c.value))} AS float8)"
            if s.typed:
                return f"coalesce({cmp}, false)"
            return f"(CASE WHEN jsonb_typeof({s.jsonb}) = 'number' THEN {cmp} ELSE false END)"
        if op == "within":
            assert c.duration is not None
            start = self._p(self.now - parse_duration(c.duration))
            return f"coalesce({s.ts} > {start} AND {s.ts} <= :now, false)"
        ref = self._reference(c.value, c.ago)
        return f"coalesce({s.ts} {'<=' if op == 'before' else '>'} {ref}, false)"

    def _reference(self, value: Any, ago: str | int | None) -> str:
        if ago is not None:
            return self._p(self.now - parse_duration(ago))
        ref = as_datetime(value)
        assert ref is not None
        return self._time(ref)

    def _filters(self, where: list[PropertyFilter]) -> str:
        return "".join(f" AND {self._compare(f, self._json_path('e.properties', f.property))}" for f in where)

    def _window(self, rule: PerformedCondition) -> str:
        if rule.within is not None:
            start = self._p(self.now - parse_duration(rule.within))
            return f" AND e.timestamp > {start} AND e.timestamp <= :now"
        out = ""
        if rule.between is not None:
            if rule.between.start is not None:
                out += f" AND e.timestamp >= {self._time(rule.between.start)}"
            if rule.between.end is not None:
                out += f" AND e.timestamp <= {self._time(rule.between.end)}"
        return out

    # ----------------------------------------------------------------- predicate

    def predicate(self, rule: Rule) -> str:
        if isinstance(rule, AndRule):
            return "(" + " AND ".join(self.predicate(r) for r in rule.and_) + ")"
        if isinstance(rule, OrRule):
            return "(" + " OR ".join(self.predicate(r) for r in rule.or_) + ")"
        if isinstance(rule, NotRule):
            return f"(NOT {self.predicate(rule.not_)})"
        if isinstance(rule, TraitCondition):
            return self._compare(rule, self._json_path("c.traits", rule.trait))
        if isinstance(rule, ProfileCondition):
            return self._compare(rule, self._field(rule.profile))
        if isinstance(rule, PerformedCondition):
            name = self._p(rule.performed)
            want = f"{_COUNT_OPS[rule.count.op]} {self._p(rule.count.value)}"
            if not rule.where and rule.within is None and rule.between is None:
                return (
                    "(coalesce((SELECT ec.count FROM event_counts ec WHERE ec.customer_id = c.customer_id "
                    f"AND ec.event = {name}), 0) {want})"
                )
            return (
                f"((SELECT count(*) FROM events e WHERE e.customer_id = c.customer_id AND e.event = {name}"
                f"{self._window(rule)}{self._filters(rule.where)}) {want})"
            )
        if isinstance(rule, NotPerformedCondition):
            ref = self._p(self.now - parse_duration(rule.since))
            return (
                "(NOT EXISTS (SELECT 1 FROM event_counts ec WHERE ec.customer_id = c.customer_id "
                f"AND ec.event = {self._p(rule.not_performed)} AND ec.last_at > {ref}))"
            )
        if isinstance(rule, LastPerformedCondition):
            ref = self._reference(rule.value, rule.ago)
            cmp = "<=" if rule.op == "before" else ">"
            return (
                "(EXISTS (SELECT 1 FROM event_counts ec WHERE ec.customer_id = c.customer_id "
                f"AND ec.event = {self._p(rule.last_performed)} AND ec.last_at {cmp} {ref}))"
            )
        if isinstance(rule, MemberOfCondition):
            return (
                "(EXISTS (SELECT 1 FROM memberships m WHERE m.customer_id = c.customer_id "
                f"AND m.segment_id = {self._p(rule.member_of)} AND m.is_member))"
            )
        if isinstance(rule, RandomBucketCondition):
            b = rule.random_bucket
            return (
                f"((('x' || substr(md5({self._p(b.salt)} || c.customer_id), 1, 8))::bit(32)::bigint "
                f"% {self._p(b.buckets)}) < {self._p(b.below)})"
            )
        if isinstance(rule, RecommendationCondition):
            # The stored lists (issue 9); a fixed whitelist of column names, never user text.
            column = f"r.{rule.recommendation}"
            match = (
                f"{self._p(rule.category)} = ANY({column}_categories)"
                if rule.category is not None
                else f"jsonb_array_length({column}) > 0"
            )
            return (
                "(EXISTS (SELECT 1 FROM customer_recommendations r WHERE r.customer_id = c.customer_id "
                f"AND {match}))"
            )
        raise TypeError(f"unknown rule node {type(rule).__name__}")

    # ----------------------------------------------------------------- next change

    def next_change(self, rule: Rule) -> str:
        """SQL for `domain.evaluation.next_change_at`: the earliest future moment, else NULL."""
        moments = self._moments(rule)
        if not moments:
            return "CAST(NULL AS timestamptz)"
        horizon = self._p(HORIZON)
        return (
            "LEAST("
            + ", ".join(f"(CASE WHEN {m} > :now AND {m} < {horizon} THEN {m} END)" for m in moments)
            + ")"
        )

    def _moments(self, rule: Rule) -> list[str]:
        if isinstance(rule, AndRule):
            return [m for r in rule.and_ for m in self._moments(r)]
        if isinstance(rule, OrRule):
            return [m for r in rule.or_ for m in self._moments(r)]
        if isinstance(rule, NotRule):
            return self._moments(rule.not_)
        if isinstance(rule, (TraitCondition, ProfileCondition)):
            if rule.op != "within" and rule.ago is None:
                return []
            s = (
                self._json_path("c.traits", rule.trait)
                if isinstance(rule, TraitCondition)
                else self._field(rule.profile)
            )
            span = self._interval(rule.duration if rule.op == "within" else rule.ago)
            return [f"({s.ts} + {span})", s.ts] if rule.op == "within" else [f"({s.ts} + {span})"]
        if isinstance(rule, PerformedCondition):
            if rule.within is None:
                return []
            d = parse_duration(rule.within)
            base = (
                f"FROM events e WHERE e.customer_id = c.customer_id AND e.event = {self._p(rule.performed)}"
                f"{self._filters(rule.where)}"
            )
            return [
                f"((SELECT min(e.timestamp) {base} AND e.timestamp > {self._p(self.now - d)}) "
                f"+ {self._interval_of(d)})",
                f"(SELECT min(e.timestamp) {base} AND e.timestamp > :now)",
            ]
        if isinstance(rule, NotPerformedCondition):
            return [self._last_at_plus(rule.not_performed, parse_duration(rule.since))]
        if isinstance(rule, LastPerformedCondition) and rule.ago is not None:
            return [self._last_at_plus(rule.last_performed, parse_duration(rule.ago))]
        return []

    def _last_at_plus(self, event: str, span: timedelta) -> str:
        return (
            f"((SELECT ec.last_at FROM event_counts ec WHERE ec.customer_id = c.customer_id "
            f"AND ec.event = {self._p(event)}) + {self._interval_of(span)})"
        )

    def _interval(self, text: str | int | None) -> str:
        assert text is not None
        return self._interval_of(parse_duration(text))

    def _interval_of(self, span: timedelta) -> str:
        return f"CAST({self._p(span)} AS interval)"

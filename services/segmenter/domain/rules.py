"""The segment rule language: a JSON rule tree parsed by pydantic, then checked node by node.

    {"and": [
        {"trait": "plan", "op": "equals", "value": "pro"},
        {"performed": "Order Completed", "where": [{"property": "total", "op": "gte", "value": 50}],
         "count": {"op": "at_least", "value": 2}, "within": "30d"},
        {"not": {"member_of": "seg_vip"}}
    ]}

Every node kind is recognised by its leading key (`and`, `or`, `not`, `trait`, `profile`, `performed`,
`not_performed`, `last_performed`, `member_of`, `random_bucket`), so error paths read like the JSON
(`definition.and[1].value`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
)

Scalar = str | int | float | bool

COMPARISON_OPS = (
    "equals",
    "not_equals",
    "in",
    "contains",
    "exists",
    "not_exists",
    "gt",
    "gte",
    "lt",
    "lte",
    "before",
    "after",
    "within",
)
ComparisonOp = Literal[
    "equals",
    "not_equals",
    "in",
    "contains",
    "exists",
    "not_exists",
    "gt",
    "gte",
    "lt",
    "lte",
    "before",
    "after",
    "within",
]
NUMERIC_OPS = {"gt", "gte", "lt", "lte"}
TIME_OPS = {"before", "after", "within"}

# Profile fields a `profile` condition may name (issue 7 adds lifecycle fields here).
PROFILE_FIELDS: dict[str, Literal["number", "time", "text"]] = {
    "orders_count": "number",
    "revenue": "number",
    "first_order_at": "time",
    "last_order_at": "time",
    "first_seen": "time",
    "last_seen": "time",
    "event_count": "number",
}
# Lifecycle fields (issue 7), kept current by services/segmenter/lifecycle.py on every event.
LIFECYCLE_FIELDS: dict[str, Literal["number", "time", "text"]] = {
    "lifecycle_stage": "text",
    "lifecycle_stage_since": "time",
    "churn_risk": "number",
    "p_alive": "number",
    "expected_orders": "number",
    "predicted_clv": "number",
    "rfm_r": "number",
    "rfm_f": "number",
    "rfm_m": "number",
    "rfm_score": "number",
    "nps_score": "number",
    "nps_category": "text",
    "csat_score": "number",
}
PROFILE_FIELDS.update(LIFECYCLE_FIELDS)
ORDER_EVENT = "Order Completed"
# Which events change a profile field (for the real-time index); "*" = every event.
PROFILE_FIELD_EVENTS: dict[str, str] = {
    "orders_count": ORDER_EVENT,
    "revenue": ORDER_EVENT,
    "first_order_at": ORDER_EVENT,
    "last_order_at": ORDER_EVENT,
    "first_seen": "*",
    "last_seen": "*",
    "event_count": "*",
}
PROFILE_FIELD_EVENTS.update(dict.fromkeys(LIFECYCLE_FIELDS, "*"))

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# ISO 8601 durations as journeys write them (`P30D`, `PT12H`, `P2W`, `P1DT6H`); no months or years,
# whose length depends on the date.
_ISO_DURATION = re.compile(r"^P(?:(\d+)W)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")


# Longer windows mean nothing for a customer, and `now - duration` must stay a date (year 1..9999)
# wherever a rule is evaluated: in Python, in SQL and when scheduling the moment a condition flips.
MAX_DURATION = timedelta(days=36_500)


@functools.lru_cache(maxsize=4096)
def parse_duration(text: str | int) -> timedelta:
    """`"30d"`, `"12h"`, `"15m"`, `"90s"`, `"2w"`, ISO 8601 (`"P30D"`, `"PT12H"`) or seconds; at most
    MAX_DURATION (100 years)."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError("a duration cannot be negative")
        seconds = text
    elif m := _DURATION.match(text):
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
    elif (iso := _ISO_DURATION.match(text.strip())) and (
        text.strip() not in ("P", "PT") and not text.strip().endswith("T")
    ):
        weeks, days, hours, minutes, seconds = (int(g) if g else 0 for g in iso.groups())
        seconds += minutes * 60 + hours * 3600 + days * 86400 + weeks * 604800
    else:
        raise ValueError(f"{text!r} is not a duration (e.g. 30d, 12h, 15m, 90s, 2w, or P30D, PT12H)")
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"{text!r} is longer than {MAX_DURATION.days} days (100 years)")
    return timedelta(seconds=seconds)


Duration = str | int


def _utc_if_naive(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# An absolute time in a rule (`between`, `last_performed`'s value): without a zone it is UTC, as a
# date in a trait is. Read so when the rule is parsed (stored definitions too), so no naive datetime
# reaches an evaluator: compared with an aware event time, one raised in every batch and timer pass.
AbsoluteTime = Annotated[datetime, AfterValidator(_utc_if_naive)]


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Comparison(Node):
    """The part shared by trait, profile and property conditions: an operator and its operand."""

    op: ComparisonOp
    value: Any = None
    values: list[Scalar] | None = None
    ago: Duration | None = None
    duration: Duration | None = None


class TraitCondition(Comparison):
    trait: str = Field(min_length=1)


class ProfileCondition(Comparison):
    profile: str


class PropertyFilter(Comparison):
    property: str = Field(min_length=1)


class CountClause(Node):
    op: Literal["at_least", "at_most", "exactly"] = "at_least"
    value: int = Field(default=1, ge=0, le=2**31 - 1)  # compared with a bigint count in SQL


class Between(Node):
    start: AbsoluteTime | None = Field(default=None, alias="from")
    end: AbsoluteTime | None = Field(default=None, alias="to")


class PerformedCondition(Node):
    performed: str = Field(min_length=1)
    where: list[PropertyFilter] = Field(default_factory=list)
    count: CountClause = Field(default_factory=CountClause)
    within: Duration | None = None
    between: Between | None = None


class NotPerformedCondition(Node):
    not_performed: str = Field(min_length=1)
    since: Duration


class LastPerformedCondition(Node):
    last_performed: str = Field(min_length=1)
    op: Literal["before", "after"]
    value: AbsoluteTime | None = None
    ago: Duration | None = None


class MemberOfCondition(Node):
    member_of: str = Field(min_length=1)


class RandomBucket(Node):
    buckets: int = Field(default=100, ge=1, le=1_000_000)
    below: int = Field(ge=0)
    salt: str = ""


class RandomBucketCondition(Node):
    random_bucket: RandomBucket


class RecommendationCondition(Node):
    """The customer's current recommendation list (`cross_sell` or `upsell`) has a product in
    `category` (any product when no category is given). Issue 9."""

    recommendation: Literal["cross_sell", "upsell"]
    category: str | None = Field(default=None, min_length=1)


class AndRule(Node):
    and_: list[Rule] = Field(alias="and", min_length=1)


class OrRule(Node):
    or_: list[Rule] = Field(alias="or", min_length=1)


class NotRule(Node):
    not_: Rule = Field(alias="not")


_KINDS = (
    "and",
    "or",
    "not",
    "trait",
    "profile",
    "performed",
    "not_performed",
    "last_performed",
    "member_of",
    "random_bucket",
    "recommendation",
)


def _rule_kind(raw: Any) -> str | None:
    if isinstance(raw, dict):
        for kind in _KINDS:
            if kind in raw:
                return f"rule:{kind}"
        return None
    if isinstance(raw, BaseModel):
        return f"rule:{_KIND_OF_CLASS[type(raw).__name__]}"
    return None


Rule = Annotated[
    Annotated[AndRule, Tag("rule:and")]
    | Annotated[OrRule, Tag("rule:or")]
    | Annotated[NotRule, Tag("rule:not")]
    | Annotated[TraitCondition, Tag("rule:trait")]
    | Annotated[ProfileCondition, Tag("rule:profile")]
    | Annotated[PerformedCondition, Tag("rule:performed")]
    | Annotated[NotPerformedCondition, Tag("rule:not_performed")]
    | Annotated[LastPerformedCondition, Tag("rule:last_performed")]
    | Annotated[MemberOfCondition, Tag("rule:member_of")]
    | Annotated[RandomBucketCondition, Tag("rule:random_bucket")]
    | Annotated[RecommendationCondition, Tag("rule:recommendation")],
    Discriminator(
        _rule_kind,
        custom_error_type="unknown_rule",
        custom_error_message=f"a rule node must have one of the keys: {', '.join(_KINDS)}",
    ),
]
_KIND_OF_CLASS = {
    "AndRule": "and",
    "OrRule": "or",
    "NotRule": "not",
    "TraitCondition": "trait",
    "ProfileCondition": "profile",
    "PerformedCondition": "performed",
    "NotPerformedCondition": "not_performed",
    "LastPerformedCondition": "last_performed",
    "MemberOfCondition": "member_of",
    "RandomBucketCondition": "random_bucket",
    "RecommendationCondition": "recommendation",
}
AndRule.model_rebuild()
OrRule.model_rebuild()
NotRule.model_rebuild()
_RULE_ADAPTER: TypeAdapter[Rule] = TypeAdapter(Rule)


@dataclass(frozen=True)
class RuleError:
    path: str
    rule: str
    message: str


class InvalidRule(Exception):
    def __init__(self, errors: list[RuleError]) -> None:
        super().__init__("; ".join(f"{e.path}: {e.message}" for e in errors))
        self.errors = errors


def format_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("rule:"):
            continue
        else:
            out += f".{part}" if out else part
    return out


def parse_rule(raw: Any, prefix: str = "definition") -> Rule:
    """Parse and check a definition; raises InvalidRule naming every offending node."""
    try:
        rule = _RULE_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise InvalidRule(
            [RuleError(format_path(prefix, tuple(e["loc"])), e["type"], e["msg"]) for e in exc.errors()]
        ) from None
    errors = list(check_rule(rule, prefix))
    if errors:
        raise InvalidRule(errors)
    return rule


def rule_to_json(rule: Rule) -> Any:
    return _RULE_ADAPTER.dump_python(
        rule, mode="json", by_alias=True, exclude_none=True, exclude_defaults=True
    )


def _check_duration(value: Duration | None, path: str, required: bool) -> list[RuleError]:
    if value is None:
        return [RuleError(path, "required", "a duration is required (e.g. 30d)")] if required else []
    try:
        parse_duration(value)
    except ValueError as exc:
        return [RuleError(path, "duration", str(exc))]
    return []


# A date in a condition may be any time a datetime holds once in UTC (years 1 to 9999): rule dates
# are compared, never computed with (`within`, `ago` and the scheduled moments count from `now` or
# from a trait), and SQL takes them as text (`store.sql_rules`), so `valid_until before 9999-12-31`
# (a common "never expires") or `founded before 1850-01-01` mean what they say everywhere.
TIME_RULE = "range"
TIME_MESSAGE = "must be from 0001-01-01 to 9999-12-31 in UTC"


def in_utc(value: datetime) -> datetime | None:
    """`value` in UTC (a naive one read as UTC), or None if that is year 0 or 10000."""
    try:
        return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    except OverflowError:  # 9999-12-31 west of UTC, 0001-01-01 east of it
        return None


def _check_time(value: datetime | None, path: str) -> list[RuleError]:
    """An absolute time must be one every evaluator can compute with: in UTC, year 10000 or year 0
    (`9999-12-31T23:59:59-01:00`) cannot be represented (preview answered 500, a back-fill failed
    chunk after chunk)."""
    if value is None or in_utc(value) is not None:
        return []
    return [RuleError(path, TIME_RULE, TIME_MESSAGE)]


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, bool)) or _is_number(v)


# Comparisons run in SQL too (float8 / bigint): a number beyond them must be refused here, not fail
# every back-fill and preview (or compare wrongly) later.
_NUMBER_LIMIT = 1e300


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):  # stored and compiled as JSON, whose writer (orjson) takes 64 bits
        return -(2**63) <= v < 2**64
    return isinstance(v, float) and -_NUMBER_LIMIT < v < _NUMBER_LIMIT


def _check_comparison(c: Comparison, path: str, *, allow_relative: bool, kind: str | None) -> list[RuleError]:
    errs: list[RuleError] = []
    op = c.op
    used = {name for name in ("value", "values", "ago", "duration") if getattr(c, name) is not None}
    allowed: set[str]
    if op in ("equals", "not_equals", "contains"):
        allowed = {"value"}
        if not _is_scalar(c.value):
            errs.append(
                RuleError(f"{path}.value", "scalar", f"`{op}` needs a string, number or boolean value")
            )
    elif op == "in":
        allowed = {"values"}
        if not c.values:
            errs.append(RuleError(f"{path}.values", "required", "`in` needs a non-empty list of values"))
        errs += [
            RuleError(f"{path}.values[{i}]", "scalar", "a string, boolean or finite number")
            for i, v in enumerate(c.values or ())
            if not _is_scalar(v)
        ]
    elif op in ("exists", "not_exists"):
        allowed = set()
    elif op in NUMERIC_OPS:
        allowed = {"value"}
        if not _is_number(c.value):
            errs.append(RuleError(f"{path}.value", "number", f"`{op}` needs a number"))
    elif op in ("before", "after"):
        allowed = {"value", "ago"}
        if (c.value is None) == (c.ago is None):
            errs.append(
                RuleError(f"{path}.value", "one_of", f"`{op}` needs exactly one of `value` (a date) or `ago`")
            )
        elif c.value is not None:
            moment = as_datetime(c.value)
            if moment is None:
                errs.append(RuleError(f"{path}.value", "datetime", "not an ISO-8601 date or datetime"))
            else:
                errs += _check_time(moment, f"{path}.value")
        elif c.ago is not None:
            errs += _check_duration(c.ago, f"{path}.ago", True)
            if not allow_relative:
                errs.append(
                    RuleError(f"{path}.ago", "relative", "relative times are not allowed in property filters")
                )
    else:  # within
        allowed = {"duration"}
        errs += _check_duration(c.duration, f"{path}.duration", True)
        if not allow_relative:
            errs.append(RuleError(f"{path}.op", "relative", "`within` is not allowed in property filters"))
    if op in TIME_OPS and kind == "number":
        errs.append(RuleError(f"{path}.op", "number_field", "use gt/gte/lt/lte/equals on a number field"))
    if kind == "text" and op in TIME_OPS | NUMERIC_OPS:
        errs.append(
            RuleError(f"{path}.op", "text_field", "use equals/not_equals/in/contains/exists on a text field")
        )
    if kind == "time" and op not in TIME_OPS | {"exists", "not_exists"}:
        errs.append(RuleError(f"{path}.op", "time_field", "use before/after/within/exists on a time field"))
    for extra in sorted(used - allowed):
        errs.append(RuleError(f"{path}.{extra}", "unexpected", f"`{extra}` is not used by `{op}`"))
    return errs


def check_rule(rule: Rule, path: str) -> list[RuleError]:
    """Checks pydantic's structure cannot express (each operator's operand), with the node's path."""
    if isinstance(rule, AndRule):
        return [e for i, r in enumerate(rule.and_) for e in check_rule(r, f"{path}.and[{i}]")]
    if isinstance(rule, OrRule):
        return [e for i, r in enumerate(rule.or_) for e in check_rule(r, f"{path}.or[{i}]")]
    if isinstance(rule, NotRule):
        return check_rule(rule.not_, f"{path}.not")
    if isinstance(rule, TraitCondition):
        return _check_comparison(rule, path, allow_relative=True, kind=None)
    if isinstance(rule, ProfileCondition):
        kind = PROFILE_FIELDS.get(rule.profile)
        if kind is None:
            return [
                RuleError(
                    f"{path}.profile", "unknown_field", f"profile fields are: {', '.join(PROFILE_FIELDS)}"
                )
            ]
        return _check_comparison(rule, path, allow_relative=True, kind=kind)
    if isinstance(rule, PerformedCondition):
        errs: list[RuleError] = []
        for i, f in enumerate(rule.where):
            errs += _check_comparison(f, f"{path}.where[{i}]", allow_relative=False, kind=None)
        if rule.within is not None and rule.between is not None:
            errs.append(RuleError(f"{path}.between", "one_of", "use `within` or `between`, not both"))
        errs += _check_duration(rule.within, f"{path}.within", False)
        if rule.between is not None:
            start, end = rule.between.start, rule.between.end
            if start is None and end is None:
                errs.append(RuleError(f"{path}.between", "required", "`between` needs `from` and/or `to`"))
            errs += _check_time(start, f"{path}.between.from") + _check_time(end, f"{path}.between.to")
            if start is not None and end is not None and start > end:
                errs.append(RuleError(f"{path}.between.to", "order", "`to` is before `from`"))
        return errs
    if isinstance(rule, NotPerformedCondition):
        return _check_duration(rule.since, f"{path}.since", True)
    if isinstance(rule, LastPerformedCondition):
        if (rule.value is None) == (rule.ago is None):
            return [RuleError(f"{path}.value", "one_of", "needs exactly one of `value` (a date) or `ago`")]
        return _check_time(rule.value, f"{path}.value") + _check_duration(rule.ago, f"{path}.ago", False)
    if isinstance(rule, RandomBucketCondition):
        if rule.random_bucket.below > rule.random_bucket.buckets:
            return [RuleError(f"{path}.random_bucket.below", "range", "`below` cannot exceed `buckets`")]
        return []
    return []


# --------------------------------------------------------------------------- what a rule refers to


def stored_member_of(definition: Any) -> set[str]:
    """The segments a stored definition names in `member_of`, read from its JSON as it is, valid or not
    (one saved by an earlier release that no longer validates still depends on them)."""
    found: set[str] = set()
    todo = [definition]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            if isinstance(node.get("member_of"), str):
                found.add(node["member_of"])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return found


def member_of_nodes(rule: Rule, path: str = "definition") -> list[tuple[str, str]]:
    """Every `member_of` node as (the path of its `member_of` key, the segment it names), in tree
    order, with the paths `check_rule` gives (`definition.and[1].member_of`)."""
    if isinstance(rule, AndRule):
        return [n for i, r in enumerate(rule.and_) for n in member_of_nodes(r, f"{path}.and[{i}]")]
    if isinstance(rule, OrRule):
        return [n for i, r in enumerate(rule.or_) for n in member_of_nodes(r, f"{path}.or[{i}]")]
    if isinstance(rule, NotRule):
        return member_of_nodes(rule.not_, f"{path}.not")
    if isinstance(rule, MemberOfCondition):
        return [(f"{path}.member_of", rule.member_of)]
    return []


@dataclass
class References:
    """What can change a rule's value: the real-time index of a segment."""

    traits: set[str] = field(default_factory=set)
    events: set[str] = field(default_factory=set)  # "*" = any event
    segments: set[str] = field(default_factory=set)
    timeline_events: set[str] = field(default_factory=set)  # need individual occurrences, not just counts
    timeline_conditions: list[PerformedCondition] = field(default_factory=list)
    time_dependent: bool = False
    recommendations: bool = False  # reads the stored recommendation lists


# Events that change a customer's recommendation lists (what they bought and viewed).
RECOMMENDATION_EVENTS = ("Order Completed", "Product Viewed", "Product Added")


def references(rule: Rule, refs: References | None = None) -> References:
    refs = refs if refs is not None else References()
    if isinstance(rule, AndRule):
        for r in rule.and_:
            references(r, refs)
    elif isinstance(rule, OrRule):
        for r in rule.or_:
            references(r, refs)
    elif isinstance(rule, NotRule):
        references(rule.not_, refs)
    elif isinstance(rule, TraitCondition):
        refs.traits.add(rule.trait.split(".")[0])
        if rule.ago is not None or rule.op == "within":
            refs.time_dependent = True
    elif isinstance(rule, ProfileCondition):
        refs.events.add(PROFILE_FIELD_EVENTS[rule.profile])
        if rule.ago is not None or rule.op == "within":
            refs.time_dependent = True
    elif isinstance(rule, PerformedCondition):
        refs.events.add(rule.performed)
        if rule.where or rule.within is not None or rule.between is not None:
            refs.timeline_events.add(rule.performed)
            refs.timeline_conditions.append(rule)
        if rule.within is not None:
            refs.time_dependent = True
    elif isinstance(rule, NotPerformedCondition):
        refs.events.add(rule.not_performed)
        refs.time_dependent = True
    elif isinstance(rule, LastPerformedCondition):
        refs.events.add(rule.last_performed)
        if rule.ago is not None:
            refs.time_dependent = True
    elif isinstance(rule, MemberOfCondition):
        refs.segments.add(rule.member_of)
    elif isinstance(rule, RecommendationCondition):
        refs.events.update(RECOMMENDATION_EVENTS)
        refs.recommendations = True
    return refs


# --------------------------------------------------------------------------- dates inside traits

_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?)?$")
# The same pattern in PostgreSQL's regex dialect (store/sql_rules.py's try_timestamptz uses it).
ISO_PATTERN_SQL = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?)?$"


def as_datetime(value: Any) -> datetime | None:
    """A trait's value as an aware datetime (naive = UTC), or None if it is not one."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not _ISO.match(value):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

"""The journey definition language: a JSON graph of nodes and edges, and its validation rules.

Parsing (pydantic) checks each node's own fields; `graph_errors` checks the graph as a whole:
one entry, no dangling edge, every node reachable, every branch wired exactly once, and loops
only through a node that waits (so walking the graph always stops).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from shared.contracts import storable
from shared.contracts.events import Channel, MessageCategory, MessageStatusKind, message_data_problems

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Durations as segments write them (`30d`, `12h`, `15m`, `90s`, `2w`) besides ISO 8601 (`P30D`,
# `PT12H`) and seconds, so one habit serves both languages.
_SHORTHAND = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _shorthand(value: Any) -> Any:
    if isinstance(value, str) and (m := _SHORTHAND.match(value)):
        return timedelta(seconds=int(m.group(1)) * _UNIT_S[m.group(2)])
    return value


# The longest wait a definition may ask for: longer ones are typos, and near datetime's limits
# (year 9999) adding them to a time overflows.
MAX_DURATION = timedelta(days=3650)


def _stored(info: ValidationInfo) -> bool:
    """Reading a definition saved before a rule existed (`context={"stored": True}`): it is read as the
    engine used it rather than made unreadable (its customers stuck)."""
    return isinstance(info.context, dict) and bool(info.context.get("stored"))


def _within_range(value: timedelta, info: ValidationInfo) -> timedelta:
    if abs(value) <= MAX_DURATION:
        return value
    if _stored(info):
        return MAX_DURATION if value > timedelta(0) else -MAX_DURATION
    raise PydanticCustomError("duration_range", "must be at most 3650 days (either way)")


def _positive(value: timedelta, info: ValidationInfo) -> timedelta:
    if timedelta(0) < value <= MAX_DURATION or _stored(info):
        return min(value, MAX_DURATION)
    raise PydanticCustomError("duration_range", "must be longer than zero and at most 3650 days")


# A signed offset (`until_trait` + offset: "3 days before the renewal date").
Duration = Annotated[timedelta, BeforeValidator(_shorthand), AfterValidator(_within_range)]
# How long something waits: a wait of zero or less would pass at once (a loop through it spins until
# the walk's step limit), and one of P9999999D overflowed the time it was added to.
WaitDuration = Annotated[timedelta, BeforeValidator(_shorthand), AfterValidator(_positive)]


def _time_of_day(value: time, info: ValidationInfo) -> time:
    """Times of day (quiet hours, `until_time`, `local_time`) are in each customer's own timezone, so
    a UTC offset means nothing there (and compared with a local time it raised TypeError). Refused on
    save; a definition stored before is read without it, as the engine then used it."""
    if value.tzinfo is None:
        return value
    if _stored(info):
        return value.replace(tzinfo=None)
    raise PydanticCustomError(
        "time_of_day",
        "a time of day in the customer's timezone takes no UTC offset: write {local}",
        {"local": value.replace(tzinfo=None).isoformat("minutes")},
    )


TimeOfDay = Annotated[time, AfterValidator(_time_of_day)]
# The largest journey a marketer may save: the walker's step limit and the API's answers are sized for it.
MAX_NODES = 500
MAX_EDGES = 2000


def _at_most(limit: int) -> Callable[[list[Any], ValidationInfo], list[Any]]:
    def check(value: list[Any], info: ValidationInfo) -> list[Any]:
        if len(value) > limit and not _stored(info):  # a journey saved before the limit still runs
            raise PydanticCustomError(
                "too_long", "at most {limit} items, not {n}", {"limit": limit, "n": len(value)}
            )
        return value

    return check


# What orjson (every store and topic writes JSON with) can write: 64-bit integers, signed or not.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


# JSON text may escape half a surrogate pair alone ("\ud800"), which is no character: orjson refuses
# to write it (TypeError: a journey holding one in a trait value, a message's data or a predicate's
# value answered 500 on save).
UNICODE_RULE = "unpaired_surrogate"
UNICODE_MESSAGE = "must not contain an unpaired surrogate (\\ud800-\\udfff alone), which is not a character"


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(key: Any) -> str:
    """A key as a path names it: an unpaired surrogate spelled `\\ud800`, as the error answering it
    could not be written otherwise."""
    text = str(key)
    return text if _utf8(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def surrogate_path(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (key or value, at any depth) holding an unpaired surrogate,
    `path` itself for such a string, else None: for the text fields the schema does not check."""
    if isinstance(value, str):
        return None if _utf8(value) else path
    if isinstance(value, dict | list):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            child = f"{path}.{_printable(key)}" if path else _printable(key)
            if isinstance(key, str) and not _utf8(key):
                return child
            found = surrogate_path(item, child)
            if found is not None:
                return found
    return None


def json_problem(value: Any, path: str = "", depth: int = 0) -> tuple[str, str, str] | None:
    """(path, rule, message) for the first value in a JSON document that cannot be stored and sent as
    JSON (an integer past 64 bits, NaN or infinity, the NUL character, an unpaired surrogate,
    nesting past `storable.MAX_DEPTH`), else None. Such a value made saving a journey answer 500."""
    here = path or "value"
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        if _INT_MIN <= value <= _INT_MAX:
            return None
        return here, "json_integer_range", "integers must fit in 64 bits (-2**63 to 2**64-1)"
    if isinstance(value, float):
        return None if math.isfinite(value) else (here, "json_finite_number", "NaN and infinity are not JSON")
    if isinstance(value, str):
        if storable.NUL in value:
            return here, storable.RULE, storable.MESSAGE
        return None if _utf8(value) else (here, UNICODE_RULE, UNICODE_MESSAGE)
    if isinstance(value, dict | list):
        if depth >= storable.MAX_DEPTH:
            return here, storable.DEPTH_RULE, storable.DEPTH_MESSAGE
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            child = f"{path}.{_printable(key)}" if path else _printable(key)
            if isinstance(key, str) and storable.NUL in key:
                return child, storable.RULE, storable.MESSAGE
            if isinstance(key, str) and not _utf8(key):
                return child, UNICODE_RULE, UNICODE_MESSAGE
            found = json_problem(item, child, depth + 1)
            if found is not None:
                return found
        return None
    return here, "json_type", f"{type(value).__name__} is not a JSON value"


def _json_safe(value: Any, info: ValidationInfo) -> Any:
    problem = None if _stored(info) else json_problem(value)
    if problem is not None:
        where, rule, message = problem
        raise PydanticCustomError(rule, "{where}: {message}", {"where": where, "message": message})
    return value


JsonValue = Annotated[Any, AfterValidator(_json_safe)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_json_safe)]


def _template_data(value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    """A message's data is merged over `{"traits": ..., "journey": ...}`: data the message request
    contract says cannot be merged would fail every message, so it is refused here."""
    if _stored(info):
        return value
    for field, problem in message_data_problems(value):
        raise PydanticCustomError("object", "{field} {problem}", {"field": field, "problem": problem})
    return value


MessageData = Annotated[JsonObject, AfterValidator(_template_data)]


def _max_bytes(limit: int) -> Callable[[str, ValidationInfo], str]:
    def check(value: str, info: ValidationInfo) -> str:
        # At most 4 bytes a character: a short one needs no encoding.
        if len(value) * 4 > limit and not _stored(info):
            size = len(value.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise PydanticCustomError(
                    "max_bytes",
                    "must be at most {limit} bytes in UTF-8 (it is {size})",
                    {"limit": limit, "size": size},
                )
        return value

    return check


def _notifier_name(value: str, info: ValidationInfo) -> str:
    if not _stored(info) and NOTIFIER_NAME.fullmatch(value) is None:
        raise PydanticCustomError(
            "string_pattern_mismatch",
            "String should match pattern '{pattern}'",
            {"pattern": NOTIFIER_NAME.pattern},
        )
    return value


# Limits in UTF-8 bytes (rule `max_bytes`, as ingest's), for the text a definition names things by.
# A node id goes into every message id of its node (`walker.message_id`: the key of the message log
# and of the notifier's send ledger; a trait update's event id): a 2,900-byte one was saved, then
# every step at that node failed in the database ("index row size exceeds btree maximum"), and its
# timer, claimed first again and again, held back every journey's timers. 1,024 bytes leave a message
# id (~1,150 bytes with the journey and instance ids) far within a btree entry (2,704). Node ids,
# edges' ends, labels (branches, arms), event names (as ingest bounds them: a longer one never
# arrives) and the correlation key (a property name): 1,024. Segment ids and stage names: 128 (the
# segmenter makes `seg_` and 16 hex digits, and its stages are names of at most 11 characters).
# Template ids and subscription topics as the notifier takes them (`NOTIFIER_NAME`): no template or
# topic of another form exists, so a send naming one could only fail. A definition stored before is
# read as it was.
MAX_NAME_BYTES = 1024
MAX_ID_BYTES = 128
NOTIFIER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # notifier's api/templates, api/consent
NameText = Annotated[str, AfterValidator(_max_bytes(MAX_NAME_BYTES))]
IdText = Annotated[str, AfterValidator(_max_bytes(MAX_ID_BYTES))]
NotifierName = Annotated[str, AfterValidator(_notifier_name)]
# Comparison names as segments write them, for the journey's own.
_OP_ALIASES = {"equals": "eq", "not_equals": "neq"}


# --------------------------------------------------------------------------- conditions


class Predicate(Strict):
    """`field` is a path: `traits.plan`, `event.properties.total`, `customer.timezone`, `stage`;
    or `segment` with op `member`/`not_member` and the segment id as value."""

    field: str = Field(min_length=1)
    op: Literal[
        "eq",
        "neq",
        "gt",
        "gte",
        "lt",
        "lte",
        "exists",
        "not_exists",
        "in",
        "contains",
        "member",
        "not_member",
    ]
    value: JsonValue = None

    @field_validator("op", mode="before")
    @classmethod
    def _segment_names(cls, op: Any) -> Any:
        return _OP_ALIASES.get(op, op) if isinstance(op, str) else op

    @model_validator(mode="after")
    def _membership_needs_segment(self) -> Predicate:
        if self.op in ("member", "not_member") and (
            self.field != "segment" or not isinstance(self.value, str)
        ):
            raise ValueError("member/not_member need field 'segment' and the segment id as value")
        if self.op == "in" and not isinstance(self.value, list):
            raise ValueError("op 'in' needs a list value")
        return self


# --------------------------------------------------------------------------- entry rules


class EventEntry(Strict):
    type: Literal["event"]
    event: NameText = Field(min_length=1)
    where: list[Predicate] = Field(default_factory=list)


class SegmentEntry(Strict):
    type: Literal["segment"]
    segment_id: IdText = Field(min_length=1)
    change: Literal["entered", "exited"] = "entered"
    enrol_current: bool = False
    enrol_future: bool = True

    @field_validator("enrol_current")
    @classmethod
    def _current_members_entered(cls, value: bool, info: ValidationInfo) -> bool:
        """The current members are those who entered: for a journey on leaving (a win-back), enrolling
        them reached the opposite audience. Stored before the rule: the engine enrols no one for it."""
        if value and info.data.get("change") == "exited" and not _stored(info):
            raise PydanticCustomError(
                "enrol_current_exited",
                "enrol_current enrols the segment's current members, who have not left it: a journey "
                "on change 'exited' cannot take it (drop enrol_current)",
            )
        return value


class StageEntry(Strict):
    type: Literal["lifecycle_stage"]
    to_stage: IdText = Field(min_length=1)
    from_stage: IdText | None = None


class ScheduleEntry(Strict):
    """A broadcast to a segment's members (as this engine knows them) at `at`, then every `every`."""

    type: Literal["schedule"]
    segment_id: IdText = Field(min_length=1)
    at: datetime
    every: WaitDuration | None = None
    # Deliver at this time of day in each customer's timezone, on the broadcast's (UTC) date.
    local_time: TimeOfDay | None = None

    @model_validator(mode="after")
    def _aware(self, info: ValidationInfo) -> ScheduleEntry:
        if self.at.tzinfo is None:
            raise ValueError("'at' needs a timezone (e.g. 2026-01-05T09:00:00Z)")
        if _stored(info):
            return self  # saved before the range rule: read as the engine used it
        if not storable.time_in_range(self.at):
            raise ValueError(f"'at' {storable.TIME_MESSAGE}")
        if self.every is not None and self.every < timedelta(minutes=1):
            raise ValueError("'every' must be at least one minute")
        return self


EntryRule = Annotated[EventEntry | SegmentEntry | StageEntry | ScheduleEntry, Field(discriminator="type")]


def _reentry_days(value: float, info: ValidationInfo) -> float:
    if value <= MAX_DURATION.days:
        return value
    if _stored(info):
        return MAX_DURATION.days
    raise PydanticCustomError("duration_range", "must be at most {days} days", {"days": MAX_DURATION.days})


class ReentryPolicy(Strict):
    policy: Literal["once", "after", "always"] = "once"
    days: Annotated[float, AfterValidator(_reentry_days)] | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _days_for_after(self) -> ReentryPolicy:
        if self.policy == "after" and self.days is None:
            raise ValueError("policy 'after' needs 'days'")
        return self


class Goal(Strict):
    event: NameText = Field(min_length=1)
    where: list[Predicate] = Field(default_factory=list)
    within: WaitDuration | None = None
    match_correlation: bool = False


# --------------------------------------------------------------------------- nodes


class EntryNode(Strict):
    id: NameText = Field(min_length=1)
    type: Literal["entry"]


class DelayNode(Strict):
    """Exactly one of: `duration`; `until_time` (+ `weekdays`) in the customer's timezone;
    `until_trait` (a date or datetime trait) + `offset`."""

    id: NameText = Field(min_length=1)
    type: Literal["delay"]
    duration: WaitDuration | None = None
    until_time: TimeOfDay | None = None
    weekdays: list[Weekday] | None = None
    until_trait: str | None = None
    offset: Duration = timedelta(0)

    @model_validator(mode="after")
    def _one_mode(self) -> DelayNode:
        modes = [self.duration is not None, self.until_time is not None, self.until_trait is not None]
        if sum(modes) != 1:
            raise ValueError("a delay needs exactly one of duration, until_time, until_trait")
        if self.weekdays is not None and self.until_time is None:
            raise ValueError("weekdays only apply to until_time")
        if self.weekdays is not None and not self.weekdays:
            raise ValueError("weekdays must not be empty")
        return self


class WaitEventNode(Strict):
    id: NameText = Field(min_length=1)
    type: Literal["wait_event"]
    event: NameText = Field(min_length=1)
    where: list[Predicate] = Field(default_factory=list)
    match_correlation: bool = False
    timeout: WaitDuration


class WaitSegmentNode(Strict):
    id: NameText = Field(min_length=1)
    type: Literal["wait_segment"]
    segment_id: IdText = Field(min_length=1)
    change: Literal["entered", "exited"] = "entered"
    timeout: WaitDuration


class WaitMessageNode(Strict):
    id: NameText = Field(min_length=1)
    type: Literal["wait_message"]
    send_node: NameText = Field(min_length=1)
    statuses: list[MessageStatusKind] = Field(
        default_factory=lambda: [MessageStatusKind.OPENED], min_length=1
    )
    timeout: WaitDuration


class ConditionBranch(Strict):
    name: NameText = Field(min_length=1)
    where: list[Predicate] = Field(min_length=1)


class ConditionNode(Strict):
    """Multi-way: the first branch whose predicates all hold, else `else`."""

    id: NameText = Field(min_length=1)
    type: Literal["condition"]
    branches: list[ConditionBranch] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ConditionNode:
        names = [b.name for b in self.branches]
        if len(set(names)) != len(names) or "else" in names:
            raise ValueError("branch names must be unique and not 'else'")
        return self


class SplitArm(Strict):
    name: NameText = Field(min_length=1)
    percent: float = Field(gt=0, le=100)
    holdout: bool = False


class SplitNode(Strict):
    """A/B/n: a stable hash of (journey, node, customer) picks the arm; one arm may be the holdout."""

    id: NameText = Field(min_length=1)
    type: Literal["split"]
    arms: list[SplitArm] = Field(min_length=2)

    @model_validator(mode="after")
    def _sums_to_100(self) -> SplitNode:
        if abs(sum(a.percent for a in self.arms) - 100) > 1e-6:
            raise ValueError("arm percentages must add up to 100")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError("arm names must be unique")
        if sum(a.holdout for a in self.arms) > 1:
            raise ValueError("at most one arm is the holdout")
        return self


class SendNode(Strict):
    id: NameText = Field(min_length=1)
    type: Literal["send"]
    channel: Channel
    template_id: NotifierName = Field(min_length=1)
    subscription_topic: NotifierName | None = None
    data: MessageData = Field(default_factory=dict)

    @model_validator(mode="after")
    def _not_webhook(self) -> SendNode:
        if self.channel == Channel.WEBHOOK:
            raise ValueError("use a 'webhook' node to call a webhook")
        return self


class UpdateTraitNode(Strict):
    id: NameText = Field(min_length=1)
    type: Literal["update_trait"]
    traits: JsonObject = Field(min_length=1)


class WebhookNode(Strict):
    id: NameText = Field(min_length=1)
    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://")
    template_id: NotifierName = "webhook"
    data: MessageData = Field(default_factory=dict)


class ExitNode(Strict):
    id: NameText = Field(min_length=1)
    type: Literal["exit"]


Node = Annotated[
    EntryNode
    | DelayNode
    | WaitEventNode
    | WaitSegmentNode
    | WaitMessageNode
    | ConditionNode
    | SplitNode
    | SendNode
    | UpdateTraitNode
    | WebhookNode
    | ExitNode,
    Field(discriminator="type"),
]
WAITING_TYPES = frozenset({"delay", "wait_event", "wait_segment", "wait_message"})


class Edge(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source: NameText = Field(alias="from", min_length=1)
    target: NameText = Field(alias="to", min_length=1)
    branch: NameText | None = None


class QuietWindow(Strict):
    """Daily hours in the customer's local time when this journey's marketing messages wait (`hold`,
    until the window ends) or are skipped (`skip`)."""

    start: TimeOfDay
    end: TimeOfDay
    mode: Literal["hold", "skip"] = "hold"

    @model_validator(mode="after")
    def _a_window(self) -> QuietWindow:
        if self.start == self.end:
            raise ValueError("start and end must differ")
        return self


def _window_or_off(value: Any) -> str:
    return "off" if isinstance(value, str) else "window"


# Tagged, so an error names `quiet_hours.window.start` rather than every member of the union.
QuietHoursRule = Annotated[
    Annotated[QuietWindow, Tag("window")] | Annotated[Literal["off"], Tag("off")],
    Discriminator(_window_or_off),
]


class JourneyMessaging(Strict):
    """This journey's own rules over the platform's (`CLM_QUIET_HOURS_*`, `CLM_FREQUENCY_CAPS`):
    `quiet_hours` its own window, or `"off"` to send at any hour (None: the platform's);
    `frequency_caps` `"ignore"` to send past the platform's caps (a reminder the customer asked for)."""

    quiet_hours: QuietHoursRule | None = None
    frequency_caps: Literal["platform", "ignore"] = "platform"


# The journeys table's `entry_cap` column is a 32-bit integer: a larger cap failed the save (500).
MAX_ENTRY_CAP = 2**31 - 1


class JourneyDefinition(Strict):
    name: str = Field(min_length=1, max_length=200)
    category: MessageCategory = MessageCategory.MARKETING
    entry: EntryRule
    reentry: ReentryPolicy = Field(default_factory=ReentryPolicy)
    # Total entries allowed over the journey's life (all versions); None = unlimited.
    entry_cap: int | None = Field(default=None, gt=0, le=MAX_ENTRY_CAP)
    # An event property (e.g. `cart_id`): one active instance per customer per value.
    correlation_key: NameText | None = None
    goal: Goal | None = None
    # Leave when the entry condition stops holding (segment entries: the customer left the segment).
    exit_when_entry_false: bool = False
    # Marketing journeys only (transactional ones bypass quiet hours and caps anyway).
    messaging: JourneyMessaging | None = None
    nodes: Annotated[list[Node], AfterValidator(_at_most(MAX_NODES))] = Field(min_length=1)
    edges: Annotated[list[Edge], AfterValidator(_at_most(MAX_EDGES))] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _recurring_broadcasts_reenter(cls, data: Any) -> Any:
        """A recurring broadcast (a weekly newsletter) is meant to reach its members every run: without
        a `reentry`, it re-enters them (`always`), where the usual `once` reached each member once ever.
        Members still inside from the last run are skipped either way."""
        if isinstance(data, dict) and "reentry" not in data:
            entry = data.get("entry")
            if isinstance(entry, dict) and entry.get("type") == "schedule" and entry.get("every") is not None:
                return {**data, "reentry": {"policy": "always"}}
        return data


def _human(duration: timedelta) -> str:
    days, seconds = duration.days, duration.seconds
    if seconds == 0:
        return f"{days} day(s)"
    return (
        f"{days * 24 + seconds // 3600} hour(s)" if seconds % 3600 == 0 else f"{duration.total_seconds():g} s"
    )


def definition_warnings(definition: JourneyDefinition) -> list[GraphError]:
    """Valid but probably not what the marketer meant: saved, and reported with the answer."""
    warnings = []
    entry = definition.entry
    if isinstance(entry, ScheduleEntry) and entry.every is not None and definition.reentry.policy == "once":
        warnings.append(
            GraphError(
                "reentry",
                "recurring_once",
                f"this broadcast runs every {_human(entry.every)} but re-entry is 'once': each member "
                "gets it only the first time. "
                'Use {"policy": "always"} (the default for recurring broadcasts) or "after"',
            )
        )
    warnings.extend(_holdout_sends(definition))
    return warnings


def _holdout_sends(definition: JourneyDefinition) -> list[GraphError]:
    """A holdout arm from which a send or webhook step can be reached: its customers get messages,
    and the comparison against the holdout measures nothing. Through the other nodes' every branch;
    back at the same split, only the holdout arm again (the arm is a stable hash of the customer)."""
    nodes = {n.id: n for n in definition.nodes}
    out: dict[str, list[tuple[str | None, str]]] = {}
    for e in definition.edges:
        out.setdefault(e.source, []).append((e.branch, e.target))
    found = []
    for split in definition.nodes:
        if not isinstance(split, SplitNode):
            continue
        for arm in (a for a in split.arms if a.holdout):
            seen: set[str] = set()
            todo = [t for b, t in out.get(split.id, []) if b == arm.name]
            sending: list[str] = []
            while todo:
                node_id = todo.pop()
                if node_id in seen or node_id not in nodes:
                    continue
                seen.add(node_id)
                node = nodes[node_id]
                if isinstance(node, (SendNode, WebhookNode)):
                    sending.append(node_id)
                todo.extend(t for b, t in out.get(node_id, []) if node_id != split.id or b == arm.name)
            if sending:
                named = ", ".join(f"'{n}'" for n in sorted(sending)[:5])
                found.append(
                    GraphError(
                        f"nodes.{split.id}",
                        "holdout_sends",
                        f"customers in the holdout arm '{arm.name}' can reach the send step(s) {named}: "
                        "they get messages, so the arms' comparison against the holdout measures "
                        "nothing. Wire the holdout arm to a path without a send or webhook step "
                        "(e.g. straight to an exit)",
                    )
                )
    return found


# --------------------------------------------------------------------------- graph


def required_branches(node: Node) -> list[str | None]:
    """The outgoing branch labels a node must have, each exactly once (None = the single next edge)."""
    match node:
        case ExitNode():
            return []
        case WaitEventNode() | WaitSegmentNode() | WaitMessageNode():
            return ["matched", "timeout"]
        case ConditionNode():
            return [*(b.name for b in node.branches), "else"]
        case SplitNode():
            return [*(a.name for a in node.arms)]
        case _:
            return [None]


@dataclass(frozen=True)
class GraphError:
    field: str
    rule: str
    message: str


class Graph:
    """A validated definition, indexed for walking."""

    def __init__(self, definition: JourneyDefinition) -> None:
        self.definition = definition
        self.nodes: dict[str, Node] = {n.id: n for n in definition.nodes}
        self.next: dict[tuple[str, str | None], str] = {
            (e.source, e.branch): e.target for e in definition.edges
        }
        self.entry_id = next(n.id for n in definition.nodes if isinstance(n, EntryNode))

    def follow(self, node_id: str, branch: str | None = None) -> str:
        return self.next[(node_id, branch)]


def _instant_cycle(successors: dict[str, list[str]]) -> str | None:
    """A node on a cycle of `successors`, or None: a depth-first search with an explicit stack (a
    recursive one overflowed Python's stack on a chain of ~1,000 nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in successors:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(successors.get(root, [])))]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state.get(child) == 1:
                return child
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(successors.get(child, []))))
    return None


def graph_errors(definition: JourneyDefinition) -> list[GraphError]:
    errors: list[GraphError] = []
    ids = [n.id for n in definition.nodes]
    by_id = {n.id: n for n in definition.nodes}
    for dup in sorted(i for i, n in Counter(ids).items() if n > 1):
        errors.append(GraphError(f"nodes.{dup}", "unique_id", f"node id '{dup}' is used more than once"))
    entries = [n.id for n in definition.nodes if isinstance(n, EntryNode)]
    if len(entries) != 1:
        errors.append(
            GraphError("nodes", "one_entry", f"a journey needs exactly one entry node, found {len(entries)}")
        )

    out: dict[str, list[Edge]] = defaultdict(list)
    for i, e in enumerate(definition.edges):
        for end, label in ((e.source, "from"), (e.target, "to")):
            if end not in by_id:
                errors.append(
                    GraphError(
                        f"edges.{i}.{label}", "dangling_edge", f"edge {i} points to unknown node '{end}'"
                    )
                )
        if e.source in by_id:
            out[e.source].append(e)
        if e.target in by_id and isinstance(by_id[e.target], EntryNode):
            errors.append(
                GraphError(f"edges.{i}.to", "entry_has_no_inputs", "no edge may lead into the entry node")
            )

    for node in definition.nodes:
        required = required_branches(node)
        have = [e.branch for e in out[node.id]]
        for b in required:
            if b not in have:
                label = "the next edge" if b is None else f"branch '{b}'"
                errors.append(
                    GraphError(f"nodes.{node.id}", "branch_complete", f"node '{node.id}' is missing {label}")
                )
        for b in set(have):
            if b not in required:
                label = "an unlabeled edge" if b is None else f"branch '{b}'"
                errors.append(
                    GraphError(f"nodes.{node.id}", "unknown_branch", f"node '{node.id}' has no {label}")
                )
            elif have.count(b) > 1:
                errors.append(
                    GraphError(f"nodes.{node.id}", "branch_once", f"node '{node.id}' wires '{b}' twice")
                )
        if isinstance(node, WaitMessageNode):
            target = by_id.get(node.send_node)
            if not isinstance(target, (SendNode, WebhookNode)):
                errors.append(
                    GraphError(
                        f"nodes.{node.id}", "send_node", f"'{node.send_node}' is not a send or webhook node"
                    )
                )

    if len(entries) == 1:
        seen = {entries[0]}
        stack = [entries[0]]
        while stack:
            for e in out[stack.pop()]:
                if e.target in by_id and e.target not in seen:
                    seen.add(e.target)
                    stack.append(e.target)
        for node in definition.nodes:
            if node.id not in seen:
                errors.append(
                    GraphError(
                        f"nodes.{node.id}", "reachable", f"node '{node.id}' is not reachable from the entry"
                    )
                )

    # A cycle must pass through a waiting node: without the waiting nodes' out-edges the graph is acyclic.
    instant = {
        i: [e.target for e in out[i] if e.target in by_id]
        for i in by_id
        if by_id[i].type not in WAITING_TYPES
    }
    looped = _instant_cycle(instant)
    if looped is not None:
        errors.append(
            GraphError(
                f"nodes.{looped}",
                "loop_through_wait",
                f"a loop through '{looped}' has no delay or wait node",
            )
        )
    return errors

"""Who enters a journey, when they may enter again, and when they leave early (goal, exit criteria)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from services.journey_engine.domain.conditions import Facts, all_hold
from services.journey_engine.domain.definition import (
    EventEntry,
    JourneyDefinition,
    SegmentEntry,
    StageEntry,
)


@dataclass(frozen=True)
class EventTrigger:
    name: str
    event: Mapping[str, Any]


@dataclass(frozen=True)
class SegmentTrigger:
    segment_id: str
    change: str


@dataclass(frozen=True)
class StageTrigger:
    stage: str
    previous: str | None


Trigger = EventTrigger | SegmentTrigger | StageTrigger


def triggers(definition: JourneyDefinition, trigger: Trigger, facts: Facts) -> bool:
    entry = definition.entry
    if isinstance(entry, EventEntry) and isinstance(trigger, EventTrigger):
        return trigger.name == entry.event and all_hold(entry.where, facts)
    if isinstance(entry, SegmentEntry) and isinstance(trigger, SegmentTrigger):
        return (
            entry.enrol_future and trigger.segment_id == entry.segment_id and trigger.change == entry.change
        )
    if isinstance(entry, StageEntry) and isinstance(trigger, StageTrigger):
        return trigger.stage == entry.to_stage and (
            entry.from_stage is None or entry.from_stage == trigger.previous
        )
    return False


def correlation_value(definition: JourneyDefinition, trigger: Trigger) -> str:
    key = definition.correlation_key
    if not key or not isinstance(trigger, EventTrigger):
        return ""
    props = trigger.event.get("properties")
    value = props.get(key) if isinstance(props, Mapping) else None
    return "" if value is None else str(value)


# A correlation value is stored, indexed and compared as itself while it is short, and by its digest
# when it is long: events may carry a value of any length, and one past PostgreSQL's btree entry limit
# (2,704 bytes, with the journey and customer ids) failed its whole batch, so the event went to the
# dead-letter topic and the customer's other journeys never saw it. 1,024 bytes, as ingest bounds event
# names, leave room for a 512-byte customer id. A short value is stored as code before this wrote it
# (no row is rewritten, and a replica of either release reads the other's rows alike), except one
# that starts with the digest's prefix: hashed too, so a digest only ever comes from hashing and no
# value sent can pass for another's digest.
CORRELATION_MAX_BYTES = 1024
DIGEST_PREFIX = "sha256:"


def _long(value: str) -> bool:
    # At most 4 bytes a character: a short one needs no encoding.
    return len(value) * 4 > CORRELATION_MAX_BYTES and (
        len(value.encode("utf-8", "surrogatepass")) > CORRELATION_MAX_BYTES
    )


def correlation_key(value: str) -> str:
    """What a correlation value is stored, indexed and compared by (enrolments, goal windows, the one
    active instance per value): the value itself when at most `CORRELATION_MAX_BYTES` in UTF-8, else
    (or when it starts with `DIGEST_PREFIX`) `sha256:` and the SHA-256 of its UTF-8 bytes in hex."""
    if not value.startswith(DIGEST_PREFIX) and not _long(value):
        return value
    return DIGEST_PREFIX + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def correlation_keys(value: str) -> tuple[str, ...]:
    """Every form an entry for `value` may be stored in: its key, and a long value as itself too.
    Code before the keys stored every value as it was, and a long one fitted a btree entry up to
    ~2,700 bytes (more when it compressed well): such an entry still counts. (Not a short value that
    starts with the prefix: it would match the digest of another value.)"""
    key = correlation_key(value)
    return (key, value) if key != value and _long(value) else (key,)


def may_reenter(
    definition: JourneyDefinition, last_entered_at: datetime | None, now: datetime
) -> tuple[bool, str]:
    """Whether a customer who entered before (for this correlation value) may enter again now."""
    if last_entered_at is None:
        return True, "first entry"
    policy = definition.reentry
    if policy.policy == "always":
        return True, "re-entry always allowed"
    if policy.policy == "once":
        return False, "already entered once"
    assert policy.days is not None
    if now - last_entered_at >= timedelta(days=policy.days):
        return True, f"last entry over {policy.days:g} days ago"
    return False, f"entered within the last {policy.days:g} days"


def goal_reached(
    definition: JourneyDefinition,
    event: EventTrigger,
    facts: Facts,
    entered_at: datetime,
    stored: str,
    now: datetime,
) -> bool:
    """`stored`: the entry's correlation as stored (`correlation_key`, or a long value as code before
    the keys stored it), which `match_correlation` compares the event's value with."""
    goal = definition.goal
    if goal is None or event.name != goal.event or not all_hold(goal.where, facts):
        return False
    if goal.within is not None and now - entered_at > goal.within:
        return False
    return not goal.match_correlation or stored in correlation_keys(correlation_value(definition, event))


def entry_stopped_holding(definition: JourneyDefinition, trigger: Trigger) -> bool:
    """True when `trigger` undoes the journey's entry condition (e.g. left the segment it entered)."""
    entry = definition.entry
    if not definition.exit_when_entry_false:
        return False
    if isinstance(entry, SegmentEntry) and isinstance(trigger, SegmentTrigger):
        return trigger.segment_id == entry.segment_id and trigger.change != entry.change
    if isinstance(entry, StageEntry) and isinstance(trigger, StageTrigger):
        return trigger.stage != entry.to_stage
    return False

"""Who enters a journey, when they may enter again, and when they leave early (goal, exit criteria)."""

from __future__ import annotations

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
    correlation: str,
    now: datetime,
) -> bool:
    goal = definition.goal
    if goal is None or event.name != goal.event or not all_hold(goal.where, facts):
        return False
    if goal.within is not None and now - entered_at > goal.within:
        return False
    return not goal.match_correlation or correlation_value(definition, event) == correlation


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

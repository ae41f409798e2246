"""The Segment calls ingest accepts, as pydantic v2 models: one per call type, Segment's field names.

Types are checked by pydantic; the rules a call type adds (`track` needs `event`, every call needs
`userId` or `anonymousId`, ...) are checked in `validation.py`, so every error names its field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from shared.contracts.events import EventType

JsonObject = dict[str, Any]


# Segment accepts numeric ids (and its SDKs stringify them): kept, as strings.
Identifier = Annotated[str, Field(coerce_numbers_to_str=True), StringConstraints(max_length=512)]
Name = Annotated[str, StringConstraints(max_length=1024)]
# `null` is accepted for an object (as Segment does) and read as {} when normalized.
Object = JsonObject | None


class SegmentCall(BaseModel):
    """Fields common to every call (Segment's common fields)."""

    # Unknown fields (`writeKey`, `channel`, `version`, ...) are tolerated, as Segment does.
    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=False, frozen=True)

    message_id: Identifier | None = None
    user_id: Identifier | None = None
    anonymous_id: Identifier | None = None
    timestamp: datetime | None = None
    original_timestamp: datetime | None = None
    sent_at: datetime | None = None
    context: Object = None
    integrations: Object = None


class IdentifyCall(SegmentCall):
    traits: Object = None


class TrackCall(SegmentCall):
    event: Name | None = None
    properties: Object = None


class PageCall(SegmentCall):
    name: Name | None = None
    category: Name | None = None
    properties: Object = None


class ScreenCall(PageCall):
    pass


class GroupCall(SegmentCall):
    group_id: Identifier | None = None
    traits: Object = None


class AliasCall(SegmentCall):
    previous_id: Identifier | None = None


CALL_MODELS: dict[EventType, type[SegmentCall]] = {
    EventType.IDENTIFY: IdentifyCall,
    EventType.TRACK: TrackCall,
    EventType.PAGE: PageCall,
    EventType.SCREEN: ScreenCall,
    EventType.GROUP: GroupCall,
    EventType.ALIAS: AliasCall,
}

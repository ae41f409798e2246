"""The Segment calls ingest accepts, as pydantic v2 models: one per call type, Segment's field names.

Types are checked by pydantic; the rules a call type adds (`track` needs `event`, every call needs
`userId` or `anonymousId`, ...) are checked in `validation.py`, so every error names its field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from shared.contracts.events import EventType

JsonObject = dict[str, Any]


def _number_to_string(value: object) -> object:
    # Segment accepts numeric ids (and its SDKs stringify them): keep them, as strings.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _null_to_empty(value: object) -> object:
    return {} if value is None else value


Identifier = Annotated[str, BeforeValidator(_number_to_string), StringConstraints(max_length=512)]
Name = Annotated[str, StringConstraints(max_length=1024)]
Object = Annotated[JsonObject, BeforeValidator(_null_to_empty)]


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
    context: Object = Field(default_factory=dict)
    integrations: Object = Field(default_factory=dict)


class IdentifyCall(SegmentCall):
    traits: Object = Field(default_factory=dict)


class TrackCall(SegmentCall):
    event: Name | None = None
    properties: Object = Field(default_factory=dict)


class PageCall(SegmentCall):
    name: Name | None = None
    category: Name | None = None
    properties: Object = Field(default_factory=dict)


class ScreenCall(PageCall):
    pass


class GroupCall(SegmentCall):
    group_id: Identifier | None = None
    traits: Object = Field(default_factory=dict)


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

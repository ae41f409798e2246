"""The Segment calls ingest accepts, as pydantic v2 models: one per call type, Segment's field names.

Types are checked by pydantic; the rules a call type adds (`track` needs `event`, every call needs
`userId` or `anonymousId`, ...) are checked in `validation.py`, so every error names its field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from shared.contracts.events import EventType

JsonObject = dict[str, Any]


# Segment accepts numeric ids (and its SDKs stringify them): kept, as strings.
Identifier = Annotated[str, Field(coerce_numbers_to_str=True)]

# Limits in UTF-8 bytes, not characters (checked in `validation.py`): ids and event names are keys of
# the consumers' btree indexes (the segmenter's events by customer, event and time), whose entries
# PostgreSQL caps at 2,704 bytes. 1,024 CJK characters are ~3 KB: such an event was accepted and then
# dead-lettered. Two ids and a name, 512 + 512 + 1,024 bytes with the entry's overhead, fit.
MAX_ID_BYTES = 512
MAX_NAME_BYTES = 1024
# attribute -> (Segment's field name, limit in bytes)
BYTE_LIMITS: dict[str, tuple[str, int]] = {
    "message_id": ("messageId", MAX_ID_BYTES),
    "user_id": ("userId", MAX_ID_BYTES),
    "anonymous_id": ("anonymousId", MAX_ID_BYTES),
    "group_id": ("groupId", MAX_ID_BYTES),
    "previous_id": ("previousId", MAX_ID_BYTES),
    "event": ("event", MAX_NAME_BYTES),
    "name": ("name", MAX_NAME_BYTES),
    "category": ("category", MAX_NAME_BYTES),
}

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
    event: str | None = None
    properties: Object = None


class PageCall(SegmentCall):
    name: str | None = None
    category: str | None = None
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

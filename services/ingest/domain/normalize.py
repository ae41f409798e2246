"""From a validated Segment call to the `CustomerEvent` published on clm.events.v1.

Timestamps the Segment way:
- `receivedAt` is the server clock when ingest accepted the call;
- `originalTimestamp` is the client's time of the event (`originalTimestamp`, else `timestamp`);
- `timestamp` corrects the client's clock skew: `receivedAt - (sentAt - originalTimestamp)` when the
  client said when it sent the call (`sentAt`, per event or per batch), else the call's `timestamp`
  as given (else its `originalTimestamp`), else `receivedAt`. Historical imports keep the time as
  given (no skew correction). A corrected time outside the times every service stores (1900-2999)
  is `receivedAt` too: its `sentAt` and
  `originalTimestamp` lie centuries apart, so the correction is meaningless, and the event is kept
  (an SDK would drop a refused event, and Segment never refuses one for its time).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from services.ingest.domain.calls import AliasCall, GroupCall, IdentifyCall, PageCall, SegmentCall, TrackCall
from services.ingest.domain.validation import ValidCall
from shared.contracts import storable
from shared.contracts.events import CustomerEvent

BACKFILL_SOURCE = "backfill"


def new_message_id() -> str:
    return str(uuid.uuid4())


def content_message_id(raw_line: bytes) -> str:
    """A stable id for an imported line without a messageId: importing the same file twice is harmless."""
    return "import-" + hashlib.sha256(raw_line).hexdigest()[:32]


def as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def event_time(
    call: SegmentCall, received_at: datetime, sent_at: datetime | None, *, correct_skew: bool = True
) -> tuple[datetime, datetime | None]:
    """(timestamp, originalTimestamp) for a call received at `received_at`."""
    original = call.original_timestamp or call.timestamp
    if original is None:
        return received_at, None
    original = as_utc(original)
    if correct_skew and sent_at is not None:
        try:
            corrected = received_at - (as_utc(sent_at) - original)
        except OverflowError:
            return received_at, original
        return (corrected if storable.time_in_range(corrected) else received_at), original
    # Nothing to correct: a `timestamp` set by the caller is the event's time (a replayed archive's
    # lines carry the corrected time there, and the device's clock in `originalTimestamp`).
    return (as_utc(call.timestamp) if call.timestamp is not None else original), original


def apply_batch_defaults(item: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
    """Batch-level `context` and `integrations` apply to every item; the item's own keys win."""
    merged = item
    for name in ("context", "integrations"):
        shared = batch.get(name)
        if isinstance(shared, dict) and shared:
            own = item.get(name)
            if merged is item:
                merged = dict(item)
            merged[name] = {**shared, **own} if isinstance(own, dict) else shared if own is None else own
    return merged


def to_customer_event(
    valid: ValidCall,
    *,
    received_at: datetime,
    source: str | None,
    batch_sent_at: datetime | None = None,
    correct_skew: bool = True,
    message_id: Callable[[], str] = new_message_id,
) -> CustomerEvent:
    call = valid.call
    sent_at = call.sent_at or batch_sent_at
    timestamp, original = event_time(call, received_at, sent_at, correct_skew=correct_skew)
    fields: dict[str, Any] = {
        "message_id": call.message_id or message_id(),
        "type": valid.type,
        "user_id": call.user_id or None,
        "anonymous_id": call.anonymous_id or None,
        "context": call.context or {},
        "integrations": call.integrations or {},
        "timestamp": timestamp,
        "original_timestamp": original,
        "sent_at": as_utc(sent_at) if sent_at is not None else None,
        "received_at": received_at,
        "source": source,
    }
    if isinstance(call, TrackCall):
        fields.update(event=call.event, properties=call.properties or {})
    elif isinstance(call, PageCall):  # and ScreenCall
        fields.update(name=call.name, category=call.category, properties=call.properties or {})
    elif isinstance(call, IdentifyCall):
        fields.update(traits=call.traits or {})
    elif isinstance(call, GroupCall):
        fields.update(group_id=call.group_id, traits=call.traits or {})
    elif isinstance(call, AliasCall):
        fields.update(previous_id=call.previous_id)
    return CustomerEvent(**fields)

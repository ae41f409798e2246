"""Validation rules of each call type, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.ingest.domain.calls import TrackCall
from services.ingest.domain.normalize import to_customer_event
from services.ingest.domain.validation import FieldError, ValidCall, validate_call
from shared.contracts.events import EventType


def rules(result: ValidCall | list[FieldError]) -> set[tuple[str, str]]:
    assert isinstance(result, list), result
    return {(e.field, e.rule) for e in result}


@pytest.mark.parametrize(
    ("call_type", "body", "expected"),
    [
        (EventType.IDENTIFY, {}, {("userId", "required_one_of")}),
        (EventType.TRACK, {"anonymousId": "a"}, {("event", "required")}),
        (EventType.ALIAS, {"userId": "u"}, {("previousId", "required")}),
        (EventType.GROUP, {"anonymousId": "a"}, {("groupId", "required")}),
        (EventType.TRACK, {"userId": True, "event": "E"}, {("userId", "string_type")}),
        (EventType.TRACK, {"userId": "u" * 513, "event": "E"}, {("userId", "string_too_long")}),
        (EventType.PAGE, {"userId": "u", "properties": "x"}, {("properties", "dict_type")}),
        (EventType.SCREEN, {"userId": "u", "sentAt": "later"}, {("sentAt", "datetime_from_date_parsing")}),
        (EventType.TRACK, {"event": ""}, {("userId", "required_one_of"), ("event", "required")}),
    ],
)
def test_rules_name_the_field(
    call_type: EventType, body: dict[str, object], expected: set[tuple[str, str]]
) -> None:
    assert rules(validate_call(body, call_type)) == expected


def test_batch_items_name_their_position_and_need_a_type() -> None:
    assert rules(validate_call({"userId": "u"}, None, prefix="batch.3")) == {("batch.3.type", "missing")}
    assert rules(validate_call({"type": "Track", "userId": "u"}, None, prefix="batch.0")) == {
        ("batch.0.type", "enum")
    }
    assert rules(validate_call(["x"], None, prefix="batch.1")) == {("batch.1", "object_type")}
    assert rules(validate_call({"type": "track", "userId": "u", "event": 1}, None, prefix="batch.2")) == {
        ("batch.2.event", "string_type")
    }


def test_valid_calls_keep_segment_fields_and_tolerate_unknown_ones() -> None:
    result = validate_call(
        {"userId": 42, "event": "E", "properties": None, "writeKey": "k", "channel": "server", "version": 2},
        EventType.TRACK,
    )
    assert isinstance(result, ValidCall)
    assert (
        result.call.user_id == "42" and isinstance(result.call, TrackCall) and result.call.properties is None
    )
    event = to_customer_event(result, received_at=datetime(2026, 1, 1, tzinfo=UTC), source=None)
    assert event.properties == {} and event.user_id == "42"
    # snake_case is not Segment's spelling: it is ignored, not taken for userId.
    assert rules(validate_call({"user_id": "u", "event": "E"}, EventType.TRACK)) == {
        ("userId", "required_one_of")
    }

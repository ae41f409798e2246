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
        (EventType.TRACK, {"userId": "u" * 513, "event": "E"}, {("userId", "max_bytes")}),
        # Limits in UTF-8 bytes (index entries): 1,024 CJK characters are 3,072 bytes.
        (EventType.TRACK, {"userId": "u", "event": "界" * 342}, {("event", "max_bytes")}),
        (EventType.TRACK, {"anonymousId": "é" * 257, "event": "E"}, {("anonymousId", "max_bytes")}),
        (
            EventType.TRACK,
            {"userId": "u", "event": "E", "messageId": "界" * 171},
            {("messageId", "max_bytes")},
        ),
        (EventType.GROUP, {"userId": "u", "groupId": "🙂" * 129}, {("groupId", "max_bytes")}),
        (EventType.ALIAS, {"userId": "u", "previousId": "界" * 171}, {("previousId", "max_bytes")}),
        (EventType.PAGE, {"userId": "u", "name": "界" * 342}, {("name", "max_bytes")}),
        (EventType.SCREEN, {"userId": "u", "category": "é" * 513}, {("category", "max_bytes")}),
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


def test_byte_limits_allow_their_maximum_and_name_the_position_in_a_batch() -> None:
    at_limit = {"userId": "界" * 170 + "uu", "anonymousId": "🙂" * 128, "event": "界" * 341 + "e"}
    assert isinstance(validate_call(at_limit, EventType.TRACK), ValidCall)  # 512, 512, 1,024 bytes
    item = {"type": "track", "userId": "u" * 512, "event": "界" * 1024}
    errors = validate_call(item, None, prefix="batch.4")
    assert isinstance(errors, list)
    assert [(e.field, e.rule) for e in errors] == [("batch.4.event", "max_bytes")]
    assert "at most 1024 bytes in UTF-8 (it is 3072)" in errors[0].message

"""Segment timestamp normalization and the CustomerEvent built from a call, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.ingest.domain.normalize import apply_batch_defaults, content_message_id, to_customer_event
from services.ingest.domain.validation import ValidCall, validate_call
from services.ingest.domain.write_keys import key_from_authorization, shown_prefix
from shared.contracts.events import EventType

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def valid(body: dict[str, object], call_type: EventType = EventType.TRACK) -> ValidCall:
    result = validate_call({"userId": "u", "event": "E", **body}, call_type)
    assert isinstance(result, ValidCall)
    return result


def test_skew_is_corrected_from_sent_at() -> None:
    # Client clock 2 min behind; event recorded 5 s before the client sent it.
    event = to_customer_event(
        valid({"timestamp": "2026-03-01T11:57:55Z", "sentAt": "2026-03-01T11:58:00Z"}),
        received_at=NOW,
        source="k",
    )
    assert event.timestamp == NOW - timedelta(seconds=5)
    assert event.original_timestamp == datetime(2026, 3, 1, 11, 57, 55, tzinfo=UTC)
    assert event.received_at == NOW and event.source == "k"


def test_batch_sent_at_applies_and_naive_times_are_utc() -> None:
    event = to_customer_event(
        valid({"originalTimestamp": "2026-03-01T13:00:00"}),
        received_at=NOW,
        source=None,
        batch_sent_at=datetime(2026, 3, 1, 13, 0, 1, tzinfo=UTC),
    )
    assert event.timestamp == NOW - timedelta(seconds=1)


def test_a_corrected_time_outside_1900_2999_falls_back_to_the_server_time() -> None:
    """sentAt and originalTimestamp are each in range, but centuries apart: the correction gave year
    ~3125 (or ~927), which no consumer stores. The event is kept, at the time it was received."""
    future = to_customer_event(
        valid({"originalTimestamp": "2999-06-01T00:00:00Z", "sentAt": "1900-01-02T00:00:00Z"}),
        received_at=NOW,
        source=None,
    )
    assert future.timestamp == NOW
    assert future.original_timestamp == datetime(2999, 6, 1, tzinfo=UTC)
    assert future.sent_at == datetime(1900, 1, 2, tzinfo=UTC)
    past = to_customer_event(
        valid({"timestamp": "1900-01-02T00:00:00Z"}),
        received_at=NOW,
        source=None,
        batch_sent_at=datetime(2999, 6, 1, tzinfo=UTC),
    )
    assert past.timestamp == NOW
    # A large but storable correction is still applied (a device clock years off).
    years_off = to_customer_event(
        valid({"timestamp": "2126-03-01T11:00:00Z", "sentAt": "2126-03-01T12:00:00Z"}),
        received_at=NOW,
        source=None,
    )
    assert years_off.timestamp == NOW - timedelta(hours=1)


def test_without_client_times_the_server_time_is_used_and_an_id_generated() -> None:
    first = to_customer_event(valid({}), received_at=NOW, source=None)
    second = to_customer_event(valid({}), received_at=NOW, source=None)
    assert first.timestamp == NOW and first.original_timestamp is None
    assert first.message_id != second.message_id


def test_historical_imports_keep_their_time() -> None:
    event = to_customer_event(
        valid({"timestamp": "2020-01-01T00:00:00Z", "sentAt": "2026-03-01T12:00:00Z"}),
        received_at=NOW,
        source="backfill",
        correct_skew=False,
        message_id=lambda: content_message_id(b"line"),
    )
    assert event.timestamp == datetime(2020, 1, 1, tzinfo=UTC)
    assert event.message_id == content_message_id(b"line") != content_message_id(b"other line")


def test_an_explicit_timestamp_wins_when_there_is_no_skew_to_correct() -> None:
    """A replayed Segment archive line carries the corrected time in `timestamp` and the device's
    clock (here an hour fast) in `originalTimestamp`: the event happened at `timestamp`."""
    archived = {"timestamp": "2025-03-01T12:00:00Z", "originalTimestamp": "2025-03-01T13:00:00Z"}
    imported = to_customer_event(valid(archived), received_at=NOW, source="backfill", correct_skew=False)
    assert imported.timestamp == datetime(2025, 3, 1, 12, tzinfo=UTC)
    assert imported.original_timestamp == datetime(2025, 3, 1, 13, tzinfo=UTC)
    # A tracking call without sentAt: the same.
    tracked = to_customer_event(valid(archived), received_at=NOW, source="k")
    assert tracked.timestamp == datetime(2025, 3, 1, 12, tzinfo=UTC)
    # With sentAt, Segment's correction starts from originalTimestamp, as before.
    corrected = to_customer_event(
        valid({**archived, "sentAt": "2025-03-01T13:00:05Z"}), received_at=NOW, source="k"
    )
    assert corrected.timestamp == NOW - timedelta(seconds=5)
    # Only originalTimestamp: it is the time.
    only_original = to_customer_event(
        valid({"originalTimestamp": "2025-03-01T13:00:00Z"}), received_at=NOW, source="k", correct_skew=False
    )
    assert only_original.timestamp == datetime(2025, 3, 1, 13, tzinfo=UTC)


def test_fields_by_call_type() -> None:
    group = to_customer_event(
        valid({"groupId": "g", "traits": {"n": 1}}, EventType.GROUP), received_at=NOW, source=None
    )
    assert (group.group_id, group.traits, group.event) == ("g", {"n": 1}, None)
    page = to_customer_event(
        valid({"name": "Home", "category": "C"}, EventType.PAGE), received_at=NOW, source=None
    )
    assert (page.name, page.category) == ("Home", "C")
    alias = to_customer_event(valid({"previousId": "p"}, EventType.ALIAS), received_at=NOW, source=None)
    assert alias.previous_id == "p" and alias.customer_key == "u"


def test_batch_context_is_merged_under_the_items_own() -> None:
    batch = {"context": {"ip": "1", "library": "x"}, "integrations": {"All": False}}
    assert apply_batch_defaults({"context": {"ip": "2"}}, batch) == {
        "context": {"ip": "2", "library": "x"},
        "integrations": {"All": False},
    }
    item = {"context": "bad"}
    assert apply_batch_defaults(item, batch)["context"] == "bad"  # left for validation to refuse


def test_write_key_from_authorization() -> None:
    assert key_from_authorization("Basic d2tfYWJjOg==") == "wk_abc"  # "wk_abc:"
    assert key_from_authorization("bearer wk_abc") == "wk_abc"
    assert key_from_authorization("Basic Og==") is None  # ":" (empty user)
    assert key_from_authorization("Digest x") is None
    assert key_from_authorization(None) is None
    assert shown_prefix("wk_" + "a" * 40) == "wk_aaaaaaa" and shown_prefix("short") == "s"

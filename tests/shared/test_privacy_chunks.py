"""Export answers too large for one Kafka message go as chunks (`shared.privacy.answers`): each under
the byte budget, with distinct deterministic event ids, and merged back into exactly the part."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pydantic_core

from shared.contracts.events import PrivacyAction, PrivacyRequest
from shared.privacy import MAX_MESSAGE_BYTES, OMITTED, answers, merge_chunks, split_part

NOW = datetime(2026, 3, 1, tzinfo=UTC)
REQUEST = PrivacyRequest(
    event_id="export-1:segmenter:export_requested",
    request_id="export-1",
    action=PrivacyAction.EXPORT_REQUESTED,
    customer_id="c1",
    identities=["c1", "ann@example.com"],
    service="segmenter",
    occurred_at=NOW,
)


def ledger(n: int, pad: int = 200) -> list[dict[str, Any]]:
    return [
        {"message_id": f"m{i:06}", "state": "sent", "reason": "x" * pad, "created_at": NOW} for i in range(n)
    ]


def size(value: Any) -> int:
    return len(pydantic_core.to_json(value))


def test_a_small_part_is_one_message_with_the_id_and_fields_it_always_had() -> None:
    data = {"contacts": [{"email": "ann@example.com"}], "messages": ledger(3), "note": "hi", "empty": []}
    [only] = answers(REQUEST, "notifier", PrivacyAction.EXPORT_PART, NOW, data)
    assert only.event_id == "export-1:notifier:export_part"
    assert (only.chunk, only.chunks) == (0, 1)
    assert only.data == data
    assert only.service == "notifier" and only.customer_id == "c1" and only.occurred_at == NOW


def test_a_large_part_is_split_under_the_budget_and_merges_back_in_order() -> None:
    data = {
        "contacts": [{"email": "ann@example.com"}],
        "messages": ledger(20_000),  # ~5 MB of JSON: five times Kafka's limit
        "note": "kept whole",
        "empty": [],
        "instances": ledger(3_000, pad=50),
    }
    assert size(data) > 4 * MAX_MESSAGE_BYTES
    budget = 256 * 1024
    chunks = split_part(data, budget)
    assert len(chunks) > 16
    assert all(size(c) <= budget for c in chunks)
    assert merge_chunks(chunks) == data
    assert list(merge_chunks(chunks)) == list(data)  # the tables in the part's order


def test_chunks_have_distinct_deterministic_ids_and_each_fits_a_kafka_message() -> None:
    data = {"messages": ledger(20_000)}
    first = answers(REQUEST, "notifier", PrivacyAction.EXPORT_PART, NOW, data)
    again = answers(REQUEST, "notifier", PrivacyAction.EXPORT_PART, NOW, data)
    n = len(first)
    assert n > 1
    assert [m.event_id for m in first] == [m.event_id for m in again]  # redelivery: the same ids
    assert len({m.event_id for m in first}) == n
    assert [m.event_id for m in first] == [f"export-1:notifier:export_part:{i}of{n}" for i in range(n)]
    assert [(m.chunk, m.chunks) for m in first] == [(i, n) for i in range(n)]
    assert {m.occurred_at for m in first} == {NOW}
    assert all(len(m.__pydantic_serializer__.to_json(m)) <= 256 * 1024 for m in first)
    # Through the wire format and back, the part is whole again.
    wire = [PrivacyRequest.model_validate_json(m.__pydantic_serializer__.to_json(m)) for m in first]
    assert [r["message_id"] for r in merge_chunks([m.data for m in wire])["messages"]] == [
        f"m{i:06}" for i in range(20_000)
    ]


def test_a_row_over_the_budget_goes_alone_and_one_over_any_message_has_its_large_fields_omitted() -> None:
    big = {"message_id": "big", "body": "b" * 400_000}
    huge = {"message_id": "huge", "body": "h" * 3_000_000, "subject": "s" * 10, "attachment": "a" * 2_000_000}
    data = {"messages": [*ledger(10), big, *ledger(10), huge, *ledger(2)]}
    msgs = answers(REQUEST, "notifier", PrivacyAction.EXPORT_PART, NOW, data)
    assert all(len(m.__pydantic_serializer__.to_json(m)) < MAX_MESSAGE_BYTES - 16 * 1024 for m in msgs)
    # The big row is alone in its chunk; the huge one, once cut down, is small and travels with others.
    [alone] = [m.data["messages"] for m in msgs if any(r["message_id"] == "big" for r in m.data["messages"])]
    assert alone == [big]
    merged = merge_chunks([m.data for m in msgs])["messages"]
    assert [r["message_id"] for r in merged] == [r["message_id"] for r in data["messages"]]
    assert merged[10] == big  # under the message limit: whole
    cut = merged[21]
    assert cut["subject"] == "s" * 10  # small fields stay
    assert cut["body"] == {OMITTED: {"bytes": 3_000_002, "reason": "too large for a Kafka message"}}
    assert cut["attachment"] == {OMITTED: {"bytes": 2_000_002, "reason": "too large for a Kafka message"}}


def test_empty_and_odd_parts() -> None:
    assert split_part({}, 1024) == [{}]
    assert merge_chunks(split_part({"a": [], "b": {"x": 1}}, 1024)) == {"a": [], "b": {"x": 1}}
    # A non-list value too large for any message is replaced by the marker, never dropped silently.
    [chunk] = split_part({"note": "n" * 5000}, 1024)
    assert chunk == {"note": {OMITTED: {"bytes": 5002, "reason": "too large for a Kafka message"}}}


def test_chunks_stay_under_a_message_limit_set_below_the_budget() -> None:
    # A topic limited to 100 kB (kafka_max_message_bytes lowered to match): 256 kB chunks were parked.
    data = {"messages": ledger(3000)}
    replies = answers(REQUEST, "notifier", PrivacyAction.EXPORT_PART, NOW, data, max_message_bytes=100_000)
    assert len(replies) > 1
    assert all(size(r.model_dump(mode="json")) < 100_000 for r in replies)
    assert merge_chunks([r.data for r in replies]) == data

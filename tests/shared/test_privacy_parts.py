"""Requests naming more identifiers than one Kafka message may carry go in parts
(`shared.privacy.requests`); each part is answered on its own, and the answers merge into one
(`merge_parts`): erasure counts summed, export rows without repeats."""

from __future__ import annotations

from datetime import UTC, datetime

import pydantic_core
import pytest
from pydantic import ValidationError

from shared.contracts.events import PrivacyAction, PrivacyRequest
from shared.privacy import (
    MAX_MESSAGE_BYTES,
    REQUEST_IDENTITIES_BYTES,
    answer,
    answers,
    merge_parts,
    requests,
)

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def test_a_customer_with_few_identifiers_is_asked_about_in_one_message_as_before() -> None:
    [only] = requests(
        "erase-1", PrivacyAction.ERASE_REQUESTED, "c1", ["c1", "u1", "a@x.io"], "segmenter", NOW
    )
    assert only.event_id == "erase-1:segmenter:erase_requested"
    assert (only.part, only.parts) == (0, 1)
    assert only.identities == ["c1", "u1", "a@x.io"] and only.customer_id == "c1"
    reply = answer(only, "notifier", PrivacyAction.ERASE_COMPLETED, NOW)
    assert reply.event_id == "erase-1:notifier:erase_completed"
    assert (reply.part, reply.parts) == (0, 1) and reply.identities == []


def test_thousands_of_long_identifiers_go_in_parts_each_fitting_a_kafka_message() -> None:
    ids = ["c1", *(f"anon-{i:05}-" + "x" * 400 for i in range(6_000))]  # ~2.5 MB of JSON
    parts = requests("export-1", PrivacyAction.EXPORT_REQUESTED, "c1", ids, "segmenter", NOW)
    n = len(parts)
    assert n >= 9
    assert [(p.part, p.parts) for p in parts] == [(i, n) for i in range(n)]
    assert [i for p in parts for i in p.identities] == ids  # every identifier once, in order
    assert all(p.customer_id == "c1" and p.action is PrivacyAction.EXPORT_REQUESTED for p in parts)
    assert [p.event_id for p in parts] == [
        f"export-1:segmenter:export_requested:part{i}of{n}" for i in range(n)
    ]
    for p in parts:
        assert len(pydantic_core.to_json(p.identities)) <= REQUEST_IDENTITIES_BYTES
        assert len(p.model_dump_json()) < MAX_MESSAGE_BYTES // 2
    # Deterministic: the same request (e.g. rebuilt after a crash) has the same ids.
    again = requests("export-1", PrivacyAction.EXPORT_REQUESTED, "c1", ids, "segmenter", NOW)
    assert [p.event_id for p in again] == [p.event_id for p in parts]

    # Each part's answer names its part, in its id too, and carries none of the identifiers.
    replies = [
        r for p in parts for r in answers(p, "notifier", PrivacyAction.EXPORT_PART, NOW, {"contacts": []})
    ]
    assert [r.event_id for r in replies] == [f"export-1:notifier:export_part:part{i}of{n}" for i in range(n)]
    assert [(r.part, r.parts, r.chunks) for r in replies] == [(i, n, 1) for i in range(n)]
    assert all(r.identities == [] for r in replies)


def test_an_identifier_larger_than_the_budget_still_goes_alone_in_its_part() -> None:
    ids = ["u1", "y" * 5_000, "u2"]
    parts = requests("erase-2", PrivacyAction.ERASE_REQUESTED, "c1", ids, "segmenter", NOW, budget=1_000)
    assert [p.identities for p in parts] == [["u1"], ["y" * 5_000], ["u2"]]


def test_a_chunked_answer_to_a_part_has_ids_distinct_from_every_other_parts() -> None:
    parts = requests(
        "export-3", PrivacyAction.EXPORT_REQUESTED, "c1", ["a" * 300] * 20, "segmenter", NOW, budget=2_000
    )
    assert len(parts) > 2
    rows = [{"message_id": f"m{i:05}", "reason": "r" * 200} for i in range(5_000)]
    ids = [
        r.event_id
        for p in parts
        for r in answers(p, "notifier", PrivacyAction.EXPORT_PART, NOW, {"messages": rows})
    ]
    assert len(ids) > 3 * len(parts) and len(set(ids)) == len(ids)
    assert ids[0] == f"export-3:notifier:export_part:part0of{len(parts)}:0of{len(ids) // len(parts)}"


def test_the_answers_to_the_parts_of_an_erasure_add_up() -> None:
    merged = merge_parts(
        PrivacyAction.ERASE_COMPLETED,
        [{"deleted": {"instances": 2, "timers": 1}}, {"deleted": {"instances": 1, "message_log": 4}}, {}],
    )
    assert merged == {"deleted": {"instances": 3, "timers": 1, "message_log": 4}}
    assert merge_parts(PrivacyAction.ERASE_COMPLETED, [{}, {}]) == {}


def test_the_answers_to_the_parts_of_an_export_hold_each_row_once() -> None:
    # The rows under the customer id are found by every part (each names it), others by one part.
    common = [{"message_id": "m1", "state": "sent"}, {"message_id": "m2", "state": "sent"}]
    merged = merge_parts(
        PrivacyAction.EXPORT_PART,
        [
            {"messages": common, "contacts": [{"email": "a@x.io"}], "note": "first"},
            {
                "messages": [*common, {"message_id": "m3", "state": "failed"}],
                "contacts": [],
                "note": "second",
            },
            {"messages": common, "contacts": [{"email": "a@x.io"}], "preferences": []},
        ],
    )
    assert merged == {
        "messages": [*common, {"message_id": "m3", "state": "failed"}],
        "contacts": [{"email": "a@x.io"}],
        "note": "first",
        "preferences": [],
    }


def test_a_part_number_out_of_range_is_refused() -> None:
    with pytest.raises(ValidationError, match="part 2 out of range: the request has 2 parts"):
        PrivacyRequest(
            event_id="x",
            request_id="x",
            action=PrivacyAction.ERASE_REQUESTED,
            customer_id="c1",
            occurred_at=NOW,
            part=2,
            parts=2,
        )

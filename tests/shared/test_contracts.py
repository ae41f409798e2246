"""Topic contracts: the published AsyncAPI document matches the models; models round-trip."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson

from shared.contracts import TOPICS, CustomerEvent
from shared.contracts.asyncapi import render
from shared.contracts.events import message_data_problems

ROOT = Path(__file__).resolve().parents[2]


def test_committed_asyncapi_document_is_current() -> None:
    committed = (ROOT / "docs" / "asyncapi.json").read_text()
    assert committed == render(), "run: python -m shared.contracts.asyncapi > docs/asyncapi.json"


def test_every_topic_is_versioned_and_documented() -> None:
    names = [t.name for t in TOPICS]
    assert len(names) == len(set(names))
    for spec in TOPICS:
        assert spec.name.startswith("clm.") and spec.name.endswith(".v1")
        assert spec.key and spec.owner and spec.description
        assert spec.dead_letter == f"{spec.name}.dlq"


def test_customer_event_uses_segment_field_names_and_ignores_unknown_fields() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    event = CustomerEvent(
        message_id="m1", type="track", user_id="u1", event="Order Completed", timestamp=now, received_at=now
    )
    wire = orjson.loads(orjson.dumps(event.model_dump(mode="json")))
    assert wire["messageId"] == "m1" and wire["userId"] == "u1" and "user_id" not in wire
    wire["someFutureField"] = 1
    again = CustomerEvent.model_validate(wire)
    assert again == event
    assert again.customer_key == "u1"


def test_message_data_traits_and_journey_must_be_objects() -> None:
    assert message_data_problems({"traits": {"a": 1}, "journey": None, "event": "x"}) == []
    assert message_data_problems({"traits": ["a"], "journey": "j-2"}) == [
        ("data.traits", "must be an object (or null), not an array"),
        ("data.journey", "must be an object (or null), not a string"),
    ]
    assert message_data_problems({"traits": False, "journey": 3}) == [
        ("data.traits", "must be an object (or null), not a boolean"),
        ("data.journey", "must be an object (or null), not a number"),
    ]

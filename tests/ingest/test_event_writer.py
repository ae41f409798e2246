"""The writer's fast message encoding is exactly the shared `encode_message` (plus the origin time)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from services.ingest.event_writer import EventWriter
from services.ingest.settings import IngestSettings
from shared.clock import ManualClock
from shared.contracts import CUSTOMER_EVENTS, CustomerEvent, Headers
from shared.db.engine import create_engine
from shared.kafka.producer import encode_message


def test_prepare_matches_encode_message() -> None:
    settings = IngestSettings(topic_prefix="t.")
    writer = EventWriter(create_engine(settings.database_url, "unused"), settings, ManualClock())
    now = datetime(2026, 1, 5, 9, 0, 0, 123456, tzinfo=UTC)
    event = CustomerEvent(
        message_id="m-1",
        type="track",
        anonymous_id="a-1",
        event="Viewed",
        properties={"p": [1, 2.5, "x"]},
        context={"ip": "1.2.3.4"},
        timestamp=now,
        original_timestamp=now,
        received_at=now,
        source="k",
    )
    prepared = writer.prepare(event)
    reference = encode_message(
        settings.topic(CUSTOMER_EVENTS.name), "a-1", event, producer="ingest", correlation_id="m-1"
    )
    assert prepared.message_id == "m-1"
    assert prepared.message.topic == reference.topic == "t.clm.events.v1"
    assert prepared.message.key == reference.key == b"a-1"
    assert orjson.loads(prepared.message.value) == orjson.loads(reference.value)
    assert CustomerEvent.model_validate_json(prepared.message.value) == event
    ours, theirs = dict(prepared.message.headers), dict(reference.headers)
    assert ours.pop(Headers.ORIGIN_AT_MS) == str(int(now.timestamp() * 1000)).encode()
    assert ours.keys() == theirs.keys()
    for name in (
        Headers.EVENT_ID,
        Headers.EVENT_TYPE,
        Headers.SCHEMA_VERSION,
        Headers.CORRELATION_ID,
        Headers.PRODUCER,
    ):
        assert ours[name] == theirs[name]

"""Segment calls over HTTP land on clm.events.v1 with the right key and normalized fields."""

from __future__ import annotations

import base64
import gzip
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson

from services.ingest.settings import IngestSettings
from shared.clock import ManualClock
from shared.contracts import CustomerEvent, Headers
from shared.kafka.producer import OutgoingMessage
from tests.ingest.conftest import AUTH, WRITE_KEY, events_on_topic

CALLS: dict[str, dict[str, Any]] = {
    "identify": {"userId": "u-1", "traits": {"email": "a@example.com", "plan": "pro"}},
    "track": {"anonymousId": "anon-2", "event": "Order Completed", "properties": {"revenue": 42.5}},
    "page": {"userId": "u-3", "name": "Pricing", "category": "Docs", "properties": {"path": "/pricing"}},
    "screen": {"userId": 4, "name": "Home"},
    "group": {"userId": "u-5", "groupId": "acme", "traits": {"employees": 12}},
    "alias": {"userId": "u-6", "previousId": "anon-6"},
}


async def test_each_call_type_lands_keyed_by_user_else_anonymous_id(
    client: httpx.AsyncClient, settings: IngestSettings, clock: ManualClock
) -> None:
    for call_type, body in CALLS.items():
        response = await client.post(
            f"/v1/{call_type}", json={**body, "messageId": f"m-{call_type}"}, auth=AUTH
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"success": True}

    messages = await events_on_topic(settings, count=len(CALLS))
    by_id = {m["value"]["messageId"]: m for m in messages}
    assert set(by_id) == {f"m-{t}" for t in CALLS}
    for call_type, body in CALLS.items():
        message = by_id[f"m-{call_type}"]
        event = CustomerEvent.model_validate(message["value"])
        assert event.type == call_type
        assert message["key"] == str(body.get("userId") or body.get("anonymousId"))
        assert event.received_at == clock.now() == event.timestamp  # no client time given
        assert event.source is not None and WRITE_KEY not in event.source
        assert message["headers"][Headers.EVENT_ID] == f"m-{call_type}"
        assert message["headers"][Headers.ORIGIN_AT_MS] == str(int(clock.now().timestamp() * 1000))
    assert by_id["m-identify"]["value"]["traits"] == {"email": "a@example.com", "plan": "pro"}
    assert by_id["m-track"]["value"]["event"] == "Order Completed"
    assert by_id["m-track"]["value"]["properties"] == {"revenue": 42.5}
    assert by_id["m-track"]["value"]["userId"] is None
    assert by_id["m-page"]["value"]["name"] == "Pricing" and by_id["m-page"]["value"]["category"] == "Docs"
    assert by_id["m-screen"]["value"]["userId"] == "4"  # numeric ids are kept as strings, as Segment does
    assert by_id["m-group"]["value"]["groupId"] == "acme"
    assert by_id["m-alias"]["value"]["previousId"] == "anon-6"


async def test_timestamps_are_corrected_for_client_clock_skew(
    client: httpx.AsyncClient, settings: IngestSettings, clock: ManualClock
) -> None:
    received = clock.now()
    # The client's clock is 1 h ahead; it recorded the event 10 s before sending it.
    client_sent = received + timedelta(hours=1)
    client_event_time = client_sent - timedelta(seconds=10)
    body = {
        "userId": "u1",
        "event": "Clicked",
        "messageId": "skewed",
        "originalTimestamp": client_event_time.isoformat(),
        "sentAt": client_sent.isoformat(),
    }
    assert (await client.post("/v1/track", json=body, auth=AUTH)).status_code == 200
    # A server-side library's explicit timestamp without sentAt is kept as given.
    past = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    body = {"userId": "u1", "event": "Imported", "messageId": "as-given", "timestamp": past.isoformat()}
    assert (await client.post("/v1/track", json=body, auth=AUTH)).status_code == 200
    # No messageId: one is generated.
    assert (
        await client.post("/v1/track", json={"userId": "u1", "event": "Anon"}, auth=AUTH)
    ).status_code == 200

    events = {
        m["value"]["event"]: CustomerEvent.model_validate(m["value"])
        for m in await events_on_topic(settings, count=3)
    }
    skewed = events["Clicked"]
    assert skewed.received_at == received
    assert skewed.timestamp == received - timedelta(seconds=10)
    assert skewed.original_timestamp == client_event_time and skewed.sent_at == client_sent
    assert events["Imported"].timestamp == past
    assert events["Anon"].message_id and events["Anon"].message_id not in {"skewed", "as-given"}


async def test_batch_applies_batch_fields_and_accepts_only_valid_items(
    client: httpx.AsyncClient, settings: IngestSettings, clock: ManualClock
) -> None:
    sent = clock.now() + timedelta(minutes=5)  # client clock 5 min ahead
    batch = {
        "sentAt": sent.isoformat(),
        "context": {"library": {"name": "analytics-test"}, "ip": "10.0.0.1"},
        "batch": [
            {
                "type": "identify",
                "userId": "u1",
                "messageId": "b0",
                "traits": {"plan": "free"},
                "timestamp": (sent - timedelta(seconds=30)).isoformat(),
            },
            {"type": "track", "userId": "u1", "messageId": "b1"},  # no event
            {
                "type": "track",
                "anonymousId": "a2",
                "messageId": "b2",
                "event": "Viewed",
                "context": {"ip": "1.2.3.4"},
            },
            {"type": "nonsense", "userId": "u1", "messageId": "b3"},
            "not an object",
        ],
    }
    response = await client.post("/v1/batch", json=batch, auth=AUTH)
    assert response.status_code == 207, response.text
    answer = response.json()
    assert answer["acceptedIndexes"] == [0, 2] and answer["accepted"] == 2
    rejected = {r["index"]: r["errors"] for r in answer["rejected"]}
    assert rejected[1] == [
        {"field": "batch.1.event", "rule": "required", "message": "track needs a non-empty event"}
    ]
    assert rejected[3][0]["field"] == "batch.3.type" and rejected[3][0]["rule"] == "enum"
    assert rejected[4][0] == {
        "field": "batch.4",
        "rule": "object_type",
        "message": "an event must be a JSON object",
    }

    events = {m["value"]["messageId"]: m for m in await events_on_topic(settings)}
    assert set(events) == {"b0", "b2"}
    identify = CustomerEvent.model_validate(events["b0"]["value"])
    assert identify.timestamp == clock.now() - timedelta(seconds=30)  # skew corrected with the batch sentAt
    assert identify.context == {"library": {"name": "analytics-test"}, "ip": "10.0.0.1"}
    assert events["b2"]["value"]["context"] == {"library": {"name": "analytics-test"}, "ip": "1.2.3.4"}
    assert events["b2"]["key"] == "a2"


async def test_batch_of_valid_calls_answers_success(
    client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    items = [
        {"type": "track", "userId": f"u{n % 3}", "event": "E", "properties": {"n": n}} for n in range(100)
    ]
    response = await client.post("/v1/batch", json={"batch": items}, auth=AUTH)
    assert response.status_code == 200
    assert response.json() == {"success": True, "accepted": 100, "duplicates": 0}
    messages = await events_on_topic(settings, count=100)
    assert len(messages) == 100
    # Per customer, the batch's order is kept on the customer's partition.
    for user in ("u0", "u1", "u2"):
        ns = [m["value"]["properties"]["n"] for m in messages if m["key"] == user]
        assert ns == sorted(ns) and len({m["partition"] for m in messages if m["key"] == user}) == 1


async def test_gzip_bodies_and_every_way_to_send_the_write_key(
    client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    def gz(body: Any) -> bytes:
        return gzip.compress(orjson.dumps(body))

    basic = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    gzip_headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    track = {"userId": "u1", "event": "Zipped", "messageId": "gz-1"}
    r = await client.post("/v1/track", content=gz(track), headers={**gzip_headers, "Authorization": basic})
    assert r.status_code == 200, r.text
    batch = {"batch": [{"type": "page", "userId": "u1", "name": "Zipped", "messageId": "gz-2"}]}
    r = await client.post(
        "/v1/batch", content=gz(batch), headers={**gzip_headers, "Authorization": f"Bearer {WRITE_KEY}"}
    )
    assert r.status_code == 200, r.text
    # Segment's SDKs also put the key in the body.
    body = {"writeKey": WRITE_KEY, "userId": "u1", "traits": {}, "messageId": "in-body"}
    assert (await client.post("/v1/identify", json=body)).status_code == 200

    ids = {m["value"]["messageId"] for m in await events_on_topic(settings, count=3)}
    assert ids == {"gz-1", "gz-2", "in-body"}


async def test_events_land_on_the_partition_kafka_clients_choose_for_their_key(
    client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    # Ingest builds record batches per partition itself: it must pick the partition any producer keyed
    # the same way picks (other services publish identify events for the same customers).
    from shared.contracts import CUSTOMER_EVENTS
    from shared.kafka import EventProducer

    users = [f"user-{n}" for n in range(12)]
    items = [{"type": "track", "userId": u, "event": "E", "messageId": f"p-{u}"} for u in users]
    assert (await client.post("/v1/batch", json={"batch": items}, auth=AUTH)).status_code == 200
    producer = EventProducer(settings)
    await producer.start()
    try:
        for u in users:
            await producer.send(OutgoingMessage(settings.topic(CUSTOMER_EVENTS.name), u.encode(), b"{}", ()))
    finally:
        await producer.stop()
    messages = await events_on_topic(settings, count=2 * len(users))
    partitions: dict[str, set[int]] = {}
    for m in messages:
        partitions.setdefault(m["key"], set()).add(m["partition"])
    assert set(partitions) == set(users)
    assert all(len(p) == 1 for p in partitions.values()), partitions
    assert len({next(iter(p)) for p in partitions.values()}) > 1  # spread over partitions, not one


async def test_a_gzip_body_is_read_whole_or_refused(
    client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    """Concatenated members are one body (as gzip reads them): only the first was read, so a batch
    split over two members lost its end. Cut short or followed by junk: 400, nothing published."""
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    raw = orjson.dumps(
        {"batch": [{"type": "track", "userId": "u9", "event": "E", "messageId": "two-members"}]}
    )
    two = gzip.compress(raw[:20]) + gzip.compress(raw[20:])
    r = await client.post("/v1/batch", content=two, headers=headers, auth=AUTH)
    assert r.status_code == 200, r.text
    whole = gzip.compress(orjson.dumps({"userId": "u9", "event": "E", "messageId": "never"}))
    for body in (whole[:-6], whole + b"junk"):
        r = await client.post("/v1/track", content=body, headers=headers, auth=AUTH)
        assert r.status_code == 400, r.text
        assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [("body", "gzip_invalid")]
    ids = {m["value"]["messageId"] for m in await events_on_topic(settings, count=1)}
    assert ids == {"two-members"}

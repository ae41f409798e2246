"""An event is limited as it will be written: with its batch's shared context, and as the Kafka
message it becomes. One that would pass the broker's limit is refused alone, with a 4xx naming it,
never failing the other requests it would have been written with."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import orjson
import pytest
from fastapi import FastAPI

from services.ingest.app import create_app
from services.ingest.settings import IngestSettings
from shared.clock import ManualClock
from shared.contracts import CUSTOMER_EVENTS
from shared.kafka import ensure_topics
from tests.ingest.conftest import AUTH, WRITE_KEY, events_on_topic
from tests.support import running, set_topic_configs

JSON = {"Content-Type": "application/json"}


def numbers(count: int) -> bytes:
    # `1e15` is 4 bytes read and `1000000000000000.0` (18) written: 4.5x.
    return b"[" + b",".join([b"1e15"] * count) + b"]"


async def test_a_batchs_shared_context_counts_toward_each_events_limit(
    client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    shared = {"blob": "x" * (settings.max_event_bytes + 100)}
    items = [{"type": "track", "userId": f"u{i}", "event": "E", "messageId": f"m{i}"} for i in range(3)]
    response = await client.post("/v1/batch", json={"context": shared, "batch": items}, auth=AUTH)
    assert response.status_code == 400, response.text
    answer = response.json()
    refused = [(e["field"], e["rule"]) for e in answer["errors"]]
    assert refused == [(f"batch.{i}", "max_size") for i in range(3)]
    assert [r["messageId"] for r in answer["rejected"]] == ["m0", "m1", "m2"]
    # A small shared context still goes into every event.
    small = {"library": {"name": "analytics-python"}}
    response = await client.post("/v1/batch", json={"context": small, "batch": items}, auth=AUTH)
    assert response.status_code == 200, response.text
    published = await events_on_topic(settings, count=3)
    assert sorted(m["value"]["messageId"] for m in published) == ["m0", "m1", "m2"]
    assert all(m["value"]["context"] == small for m in published)


@pytest.fixture
async def roomy_client(
    make_settings: Callable[..., IngestSettings],
) -> AsyncIterator[tuple[httpx.AsyncClient, IngestSettings]]:
    """An operator who raised the per-event limit to 400 KB: a call within it can be written past
    Kafka's 1 MB."""
    settings = make_settings(
        IngestSettings, write_keys=[WRITE_KEY], produce_timeout_s=2.0, max_event_bytes=400_000
    )
    app: FastAPI = create_app(settings, ManualClock())
    async with running(app) as client:
        yield client, settings


async def test_an_event_too_large_as_a_kafka_message_is_refused_alone(
    roomy_client: tuple[httpx.AsyncClient, IngestSettings],
) -> None:
    client, settings = roomy_client
    inflating = b'{"userId":"u","event":"Big","messageId":"big","properties":{"n":' + numbers(70_000) + b"}}"
    assert len(inflating) < settings.max_event_bytes
    single = await client.post("/v1/track", content=inflating, headers=JSON, auth=AUTH)
    assert single.status_code == 400, single.text
    assert [(e["field"], e["rule"]) for e in single.json()["errors"]] == [("body", "max_size")]

    # In a batch, beside requests written at the same moment: only the large item is refused.
    batch = b'{"batch":[{"type":"track","userId":"u","event":"Big","messageId":"big2","properties":{"n":'
    batch += numbers(70_000) + b'}},{"type":"track","userId":"u","event":"Small","messageId":"ok"}]}'
    others = [
        {"batch": [{"type": "track", "userId": f"v{i}", "event": "E", "messageId": f"other{i}"}]}
        for i in range(4)
    ]
    responses = await asyncio.gather(
        client.post("/v1/batch", content=batch, headers=JSON, auth=AUTH),
        *[client.post("/v1/batch", json=o, auth=AUTH) for o in others],
    )
    mixed, *rest = responses
    assert mixed.status_code == 207, mixed.text
    answer = mixed.json()
    assert answer["acceptedIndexes"] == [1]
    assert [(e["field"], e["rule"]) for e in answer["errors"]] == [("batch.0", "max_size")]
    assert [r.status_code for r in rest] == [200] * 4
    published = await events_on_topic(settings, count=5)
    assert sorted(m["value"]["messageId"] for m in published) == ["ok", *(f"other{i}" for i in range(4))]

    # An import line too: rejected and counted, the others published.
    lines = [
        orjson.dumps({"type": "track", "userId": "w", "event": "Old", "timestamp": "2025-01-01T00:00:00Z"}),
        b'{"type":"track","userId":"w","event":"Big","timestamp":"2025-01-01T00:00:00Z","properties":{"n":'
        + numbers(70_000)
        + b"}}",
    ]
    response = await client.post(
        "/v1/import", content=b"\n".join(lines), headers={"Content-Type": "application/x-ndjson"}, auth=AUTH
    )
    assert response.status_code == 200, response.text
    summary = orjson.loads(response.content.strip().splitlines()[-1])
    assert summary["complete"] is True
    assert [(e["line"], e["field"], e["rule"]) for e in summary["errors"]] == [(2, "line", "max_size")]


async def test_a_rejected_calls_message_id_is_echoed_only_when_it_is_one(client: httpx.AsyncClient) -> None:
    # orjson reads 1,024 levels (writing such a value is what failed: the answer's JSON recursed).
    deep = b"[" * 1000 + b'"x"' + b"]" * 1000
    body = (
        b'{"batch":[{"type":"track","userId":"u","event":"E","messageId":' + deep + b"},"
        b'{"type":"track","event":"No user","messageId":"kept"},'
        b'{"type":"track","event":"No user","messageId":7}]}'
    )
    response = await client.post("/v1/batch", content=body, headers=JSON, auth=AUTH)
    assert response.status_code == 400, response.text
    assert [r["messageId"] for r in response.json()["rejected"]] == [None, "kept", 7]


async def test_a_batch_of_events_within_a_lowered_limit_is_accepted(
    make_settings: Callable[..., IngestSettings],
) -> None:
    """`CLM_KAFKA_MAX_MESSAGE_BYTES` lowered to a topic's max.message.bytes (as its docs ask): every
    event is within it, and so must be the record batch they are written in. Ingest built batches of
    up to 256 KB: a 170 KB call of 1 KB events was refused by the broker as too large (503), on every
    retry."""
    limit = 100_000
    settings = make_settings(IngestSettings, write_keys=[WRITE_KEY], kafka_max_message_bytes=limit)
    await ensure_topics(settings)
    await set_topic_configs(settings.topic(CUSTOMER_EVENTS.name), {"max.message.bytes": str(limit)})
    items = [
        {
            "type": "track",
            "userId": "u1",
            "event": "E",
            "messageId": f"m{i}",
            "properties": {"note": "x" * 1000},
        }
        for i in range(150)
    ]
    async with running(create_app(settings, ManualClock())) as client:
        response = await client.post("/v1/batch", json={"batch": items}, auth=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 150
    published = await events_on_topic(settings, count=150)
    assert [m["value"]["messageId"] for m in published] == [f"m{i}" for i in range(150)]

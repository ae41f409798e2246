"""A running segmenter per test (own schema and topics), a manual clock, and helpers to send events."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import text

from services.segmenter.app import create_app
from services.segmenter.runtime import Segmenter
from services.segmenter.settings import SegmenterSettings
from shared.clock import ManualClock
from shared.contracts.events import CustomerEvent
from shared.contracts.topics import CUSTOMER_EVENTS, SEGMENT_MEMBERSHIP
from tests.support import eventually, infra, running

START = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
ADMIN = {"Authorization": "Bearer test-admin-token"}


def make_event(message_id: str, type: str = "track", **fields: Any) -> CustomerEvent:
    ts = fields.pop("timestamp", START)
    return CustomerEvent.model_validate(
        {"message_id": message_id, "type": type, "timestamp": ts, "received_at": ts, **fields}
    )


async def read_all(topic: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Every message in `topic` up to its end offsets at call time (no idle-time guessing: after
    the relay has published, this is exactly what is there), ordered per partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=infra()[0], enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps):
                break
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    out.append(
                        {
                            "key": r.key.decode() if r.key else None,
                            "value": orjson.loads(r.value),
                            "headers": {k: v.decode() for k, v in (r.headers or ())},
                        }
                    )
        else:
            raise AssertionError(f"could not read {topic} to its end within {timeout}s")
        return out
    finally:
        await consumer.stop()


@dataclass
class Harness:
    client: httpx.AsyncClient
    segmenter: Segmenter
    settings: SegmenterSettings
    clock: ManualClock

    async def send(self, *events: CustomerEvent) -> None:
        for e in events:
            await self.segmenter.platform.producer.publish(CUSTOMER_EVENTS.name, e.customer_key, e)

    async def processed(self, n: int) -> None:
        """Wait until the consumer has handled at least n records."""
        runner = self.segmenter.platform.consumers[0]
        await eventually(lambda: runner.processed >= n, timeout=30)

    async def relay(self) -> None:
        """Until the outbox is empty. The service's own relay runs too: while it holds the relay lock
        a pass of ours takes nothing, and the rows it took stay visible until the broker has
        acknowledged them, so an empty outbox means everything is on the topics."""
        platform = self.segmenter.platform

        async def drained() -> bool:
            while await platform.relay.run_once():
                pass
            async with platform.engine.connect() as conn:
                return (await conn.scalar(text("SELECT count(*) FROM outbox"))) == 0

        await eventually(drained, timeout=30)

    async def memberships(self) -> list[dict[str, Any]]:
        await self.relay()
        msgs = await read_all(self.settings.topic(SEGMENT_MEMBERSHIP.name))
        for m in msgs:  # every announcement, however written, is keyed and identified the same way
            assert m["key"] == m["value"]["customer_id"]
            assert m["headers"]["clm-event-id"] == m["value"]["event_id"]
            assert m["headers"]["clm-event-type"] == "segment_membership_changed"
        return [m["value"] for m in msgs]

    async def create_segment(self, definition: Any, name: str = "s") -> str:
        r = await self.client.post(
            "/v1/segments", json={"name": name, "definition": definition}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        sid: str = r.json()["id"]
        await self.segmenter.backfill.run_until_idle()
        return sid

    async def customer(self, ref: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/customers/{ref}", headers=ADMIN)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


@contextlib.asynccontextmanager
async def segmenter_running(
    make_settings: Callable[..., SegmenterSettings], **overrides: Any
) -> AsyncIterator[Harness]:
    """A segmenter under test (loops driven by hand, a ManualClock at START), with settings overrides."""
    settings = make_settings(
        SegmenterSettings, **({"run_background_loops": False, "consumer_max_batch": 500} | overrides)
    )
    clock = ManualClock(START)
    app = create_app(settings, clock)
    async with running(app) as client:
        yield Harness(client, app.state.segmenter, settings, clock)


@pytest.fixture
async def harness(make_settings: Callable[..., SegmenterSettings]) -> AsyncIterator[Harness]:
    async with segmenter_running(make_settings) as h:
        yield h

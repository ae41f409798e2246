"""A running segmenter per test (own schema and topics), a manual clock, and helpers to send events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from services.segmenter.app import create_app
from services.segmenter.runtime import Segmenter
from services.segmenter.settings import SegmenterSettings
from shared.clock import ManualClock
from shared.contracts.events import CustomerEvent
from shared.contracts.topics import CUSTOMER_EVENTS, SEGMENT_MEMBERSHIP
from tests.support import eventually, read_topic, running

START = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
ADMIN = {"Authorization": "Bearer test-admin-token"}


def make_event(message_id: str, type: str = "track", **fields: Any) -> CustomerEvent:
    ts = fields.pop("timestamp", START)
    return CustomerEvent.model_validate(
        {"message_id": message_id, "type": type, "timestamp": ts, "received_at": ts, **fields}
    )


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
        await eventually(lambda: runner.processed >= n, timeout=15)

    async def relay(self) -> None:
        while await self.segmenter.platform.relay.run_once():
            pass

    async def memberships(self, idle: float = 0.5) -> list[dict[str, Any]]:
        await self.relay()
        msgs = await read_topic(self.settings.topic(SEGMENT_MEMBERSHIP.name), idle=idle, timeout=8)
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


@pytest.fixture
async def harness(make_settings: Callable[..., SegmenterSettings]) -> AsyncIterator[Harness]:
    settings = make_settings(SegmenterSettings, run_background_loops=False, consumer_max_batch=500)
    clock = ManualClock(START)
    app = create_app(settings, clock)
    async with running(app) as client:
        yield Harness(client, app.state.segmenter, settings, clock)

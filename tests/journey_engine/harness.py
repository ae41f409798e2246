"""A journey engine under test: real broker and database, a ManualClock, the timer loop driven by hand."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import text

from services.journey_engine.app import create_app
from services.journey_engine.execution.engine import JourneyEngine
from services.journey_engine.settings import JourneyEngineSettings
from shared.clock import ManualClock
from shared.contracts.events import CustomerEvent, MessageStatus, ProfileChanged, SegmentMembershipChanged
from shared.contracts.topics import (
    CUSTOMER_EVENTS,
    MESSAGE_REQUESTS,
    MESSAGE_STATUS,
    PROFILES,
    SEGMENT_MEMBERSHIP,
)
from shared.runtime import Platform
from tests.support import eventually, read_topic, running

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)  # Monday 09:00 UTC
ADMIN = {"Authorization": "Bearer test-admin-token"}


class Harness:
    def __init__(
        self,
        client: httpx.AsyncClient,
        settings: JourneyEngineSettings,
        clock: ManualClock,
        platform: Platform,
        engine: JourneyEngine,
    ) -> None:
        self.client = client
        self.settings = settings
        self.clock = clock
        self.platform = platform
        self.engine = engine
        self.published: dict[str, int] = {"events": 0, "segments": 0, "profiles": 0, "statuses": 0}

    # ---- journeys

    async def journey(
        self, definition: dict[str, Any], journey_id: str | None = None, activate: bool = True
    ) -> str:
        journey_id = journey_id or uuid.uuid4().hex[:8]
        r = await self.client.post(
            "/v1/journeys", json={"id": journey_id, "definition": definition}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        if activate:
            r = await self.client.post(f"/v1/journeys/{journey_id}/activate", headers=ADMIN)
            assert r.status_code == 200, r.text
        return journey_id

    # ---- inputs

    async def track(
        self, user: str, name: str, properties: dict[str, Any] | None = None, *, wait: bool = True
    ) -> str:
        now = self.clock.now()
        mid = uuid.uuid4().hex
        event = CustomerEvent(
            message_id=mid,
            type="track",
            user_id=user,
            event=name,
            properties=properties or {},
            timestamp=now,
            received_at=now,
        )
        await self.platform.producer.publish(CUSTOMER_EVENTS.name, user, event)
        self.published["events"] += 1
        if wait:
            await self.processed("events")
        return mid

    async def profile(
        self,
        customer_id: str,
        traits: dict[str, Any],
        *,
        kind: str = "traits_changed",
        stage: str | None = None,
        previous: str | None = None,
        identities: dict[str, list[str]] | None = None,
        merged_ids: list[str] | None = None,
        occurred_at: datetime | None = None,
    ) -> None:
        msg = ProfileChanged(
            event_id=uuid.uuid4().hex,
            customer_id=customer_id,
            kind=kind,
            occurred_at=occurred_at or self.clock.now(),
            traits=traits,
            identities=identities or {},
            merged_ids=merged_ids or [],
            lifecycle_stage=stage,
            previous_stage=previous,
        )
        await self.platform.producer.publish(PROFILES.name, customer_id, msg)
        self.published["profiles"] += 1
        await self.processed("profiles")

    async def membership(
        self, customer_id: str, segment_id: str, change: str = "entered", cause: str = "test"
    ) -> None:
        msg = SegmentMembershipChanged(
            event_id=uuid.uuid4().hex,
            customer_id=customer_id,
            segment_id=segment_id,
            segment_name=segment_id,
            change=change,
            occurred_at=self.clock.now(),
            cause=cause,
        )
        await self.platform.producer.publish(SEGMENT_MEMBERSHIP.name, customer_id, msg)
        self.published["segments"] += 1
        await self.processed("segments")

    async def message_status(
        self,
        customer_id: str,
        message_id: str,
        status: str,
        channel: str = "email",
        *,
        instance_id: str | None = None,
    ) -> None:
        """As the notifier reports it: with the request's journey instance (from the engine's
        message log, unless given; none for a message the engine did not request)."""
        if instance_id is None:
            instance_id = await self.scalar(
                "SELECT instance_id FROM message_log WHERE message_id = :m", m=message_id
            )
        msg = MessageStatus(
            status_id=uuid.uuid4().hex,
            message_id=message_id,
            customer_id=customer_id,
            status=status,
            channel=channel,
            occurred_at=self.clock.now(),
            instance_id=instance_id,
        )
        await self.platform.producer.publish(MESSAGE_STATUS.name, customer_id, msg)
        self.published["statuses"] += 1
        await self.processed("statuses")

    async def processed(self, consumer: str) -> None:
        """Wait until the engine's inbox holds every message published to that consumer so far."""
        want = self.published[consumer]

        async def done() -> bool:
            return await self.scalar("SELECT count(*) FROM inbox WHERE consumer = :c", c=consumer) >= want

        await eventually(done, timeout=20)

    # ---- time

    async def advance(self, delta: timedelta) -> int:
        """Move the clock and fire every timer that came due; the number of timers claimed."""
        self.clock.advance(delta)
        return await self.fire_due()

    async def fire_due(self) -> int:
        """Fire due timers and run due broadcasts until neither has anything left to do now."""
        total = 0
        while (n := await self.engine.run_once()) > 0 or self.engine.broadcasts_pending:
            total += n
        return total

    # ---- observations

    async def scalar(self, sql: str, **params: Any) -> Any:
        async with self.platform.engine.connect() as conn:
            return await conn.scalar(text(sql), params)

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        async with self.platform.engine.connect() as conn:
            return list(await conn.execute(text(sql), params))

    async def instances(self, journey_id: str) -> list[Any]:
        return await self.rows(
            "SELECT customer_id, status, node_id, exit_reason, correlation, version FROM instances "
            "WHERE journey_id = :j ORDER BY customer_id, entered_at",
            j=journey_id,
        )

    async def requests(
        self, until: Callable[[list[dict[str, Any]]], bool] | None = None, idle: float = 1.0
    ) -> list[dict[str, Any]]:
        """Every MessageRequested the engine published (waits until the outbox drained)."""
        await self.outbox_drained()
        msgs = await read_topic(
            self.settings.topic(MESSAGE_REQUESTS.name), until=until, idle=idle, timeout=15
        )
        return [m["value"] for m in msgs]

    async def statuses(self, idle: float = 1.0) -> list[dict[str, Any]]:
        await self.outbox_drained()
        msgs = await read_topic(self.settings.topic(MESSAGE_STATUS.name), idle=idle, timeout=15)
        return [m["value"] for m in msgs]

    async def outbox_drained(self) -> None:
        async def empty() -> bool:
            return await self.scalar("SELECT count(*) FROM outbox") == 0

        await eventually(empty, timeout=20)


@contextlib.asynccontextmanager
async def engine_running(
    make_settings: Callable[..., Any], clock: ManualClock | None = None, **overrides: Any
) -> AsyncIterator[Harness]:
    clock = clock or ManualClock(START)
    settings = make_settings(JourneyEngineSettings, **({"run_timer_loop": False} | overrides))
    app = create_app(settings, clock)
    async with running(app) as client:
        yield Harness(client, settings, clock, app.state.platform, app.state.engine)

"""Segment's own Python SDK (segment-analytics-python), pointed at CLM, delivers to clm.events.v1."""

from __future__ import annotations

import asyncio
from typing import Any

from segment.analytics import Client  # type: ignore[import-untyped]

from services.ingest.app import create_app
from services.ingest.settings import IngestSettings
from shared.contracts import CustomerEvent
from tests.ingest.conftest import WRITE_KEY, events_on_topic
from tests.ingest.served import served


async def test_segment_sdk_identify_track_page_batch(make_settings: Any) -> None:
    settings: IngestSettings = make_settings(IngestSettings, write_keys=[WRITE_KEY])
    errors: list[Exception] = []

    def use_the_sdk(url: str, gzip: bool) -> None:
        analytics = Client(
            WRITE_KEY, host=url, gzip=gzip, max_retries=1, on_error=lambda e, _batch: errors.append(e)
        )
        analytics.identify("user-1", {"email": "ada@example.com", "plan": "pro"})
        analytics.track("user-1", "Order Completed", {"revenue": 99.5})
        analytics.page("user-1", "Docs", "Pricing", {"path": "/pricing"})
        analytics.track(anonymous_id="anon-9", event="Signed Up")
        analytics.flush()
        analytics.join()

    async with served(create_app(settings)) as url:
        await asyncio.to_thread(use_the_sdk, url, False)
        await asyncio.to_thread(use_the_sdk, url, True)
    assert errors == []

    events = [CustomerEvent.model_validate(m["value"]) for m in await events_on_topic(settings, count=8)]
    assert len(events) == 8
    for event in events:
        assert event.context["library"]["name"] == "analytics-python"
        assert event.sent_at is not None and event.original_timestamp is not None
        assert abs((event.timestamp - event.received_at).total_seconds()) < 30
    identify = next(e for e in events if e.type == "identify")
    assert identify.user_id == "user-1" and identify.traits == {"email": "ada@example.com", "plan": "pro"}
    assert {(e.type.value, e.event or e.name) for e in events} == {
        ("identify", None),
        ("track", "Order Completed"),
        ("page", "Pricing"),
        ("track", "Signed Up"),
    }
    assert next(e for e in events if e.event == "Signed Up").anonymous_id == "anon-9"

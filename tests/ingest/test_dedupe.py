"""The same messageId within the dedupe window is answered as a success and published once,
across restarts and replicas; past the window it is a new event; old ids are pruned."""

from __future__ import annotations

from datetime import timedelta

import httpx
from sqlalchemy import text

from services.ingest.app import create_app
from services.ingest.event_writer import EventWriter
from services.ingest.settings import IngestSettings
from shared.clock import ManualClock
from tests.ingest.conftest import AUTH, events_on_topic
from tests.support import running


async def test_duplicate_message_id_is_published_once(
    client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    body = {"userId": "u1", "event": "Paid", "messageId": "dup-1"}
    for _ in range(3):
        response = await client.post("/v1/track", json=body, auth=AUTH)
        assert response.status_code == 200 and response.json() == {"success": True}
    batch = {
        "batch": [
            {"type": "track", **body},
            {"type": "track", **body, "messageId": "dup-2"},
            {"type": "track", **body, "messageId": "dup-2"},
        ]
    }
    response = await client.post("/v1/batch", json=batch, auth=AUTH)
    assert response.json() == {"success": True, "accepted": 3, "duplicates": 2}

    messages = await events_on_topic(settings)
    assert sorted(m["value"]["messageId"] for m in messages) == ["dup-1", "dup-2"]


async def test_dedupe_holds_across_restarts_and_replicas_then_the_window_ends(
    settings: IngestSettings, clock: ManualClock
) -> None:
    body = {"userId": "u1", "event": "Paid", "messageId": "once"}
    async with running(create_app(settings, clock)) as first:
        assert (await first.post("/v1/track", json=body, auth=AUTH)).status_code == 200
    # A new process (empty in-memory cache) and a second replica on the same database.
    async with (
        running(create_app(settings, clock)) as restarted,
        running(create_app(settings, clock)) as replica,
    ):
        assert (await restarted.post("/v1/track", json=body, auth=AUTH)).status_code == 200
        assert (
            await replica.post("/v1/batch", json={"batch": [{"type": "track", **body}]}, auth=AUTH)
        ).json()["duplicates"] == 1
        assert len(await events_on_topic(settings)) == 1

        clock.advance(timedelta(seconds=settings.dedupe_window_s + 1))
        assert (await replica.post("/v1/track", json=body, auth=AUTH)).status_code == 200
        assert len(await events_on_topic(settings, count=2)) == 2


async def test_ids_past_the_window_are_pruned(settings: IngestSettings, clock: ManualClock) -> None:
    app = create_app(settings, clock)
    async with running(app) as client:
        for n in range(3):
            assert (
                await client.post(
                    "/v1/track", json={"userId": "u", "event": "E", "messageId": f"p{n}"}, auth=AUTH
                )
            ).status_code == 200
            clock.advance(timedelta(hours=10))
        writer: EventWriter = app.state.writer
        assert await writer.prune() == 1  # p0 is 30 h old; p1 (20 h) and p2 (10 h) stay
        async with app.state.platform.engine.connect() as conn:
            left = sorted(r[0] for r in await conn.execute(text("SELECT message_id FROM dedupe")))
        assert left == ["p1", "p2"]

"""Timeline retention: the oldest events go in batches, the profile's counts stay; one replica a round."""

from __future__ import annotations

from datetime import timedelta

from services.segmenter.app import create_app
from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import profiles as profile_store
from shared.db.locks import try_exclusive
from shared.db.retention import Retention, audit_log_rule
from tests.segmenter.conftest import ADMIN, START, Harness, make_event


async def test_old_events_leave_the_timeline_but_not_the_counts(harness: Harness) -> None:
    old = [
        make_event(
            f"old-{i}", "track", user_id="u1", event="Signed In", timestamp=START - timedelta(days=60 + i)
        )
        for i in range(3)
    ]
    recent = [
        make_event(f"new-{i}", "track", user_id="u1", event="Signed In", timestamp=START - timedelta(days=i))
        for i in range(2)
    ]
    await harness.send(*old, *recent)
    await harness.processed(5)
    platform = harness.segmenter.platform
    rules = [profile_store.timeline_rule(30), audit_log_rule(0)]
    retention = Retention(
        platform.engine, harness.settings.db_schema, harness.clock, rules, interval_s=60, batch=2
    )
    other_replica = Retention(
        platform.engine, harness.settings.db_schema, harness.clock, rules, interval_s=60
    )
    assert [r.name for r in retention.rules] == ["events"]  # a 0-day rule keeps everything

    assert await retention.run_once() == {"events": 3}  # in batches of 2, until one came back short
    timeline = (await harness.client.get("/v1/customers/u1/events", headers=ADMIN)).json()["events"]
    assert sorted(e["message_id"] for e in timeline) == ["new-0", "new-1"]
    profile = await harness.customer("u1")
    assert profile["aggregates"]["event_count"] == 5
    assert profile["aggregates"]["events"]["Signed In"]["count"] == 5
    assert await retention.run_once() == {"events": 0}

    # One replica a round: while one holds it, another does nothing.
    async with try_exclusive(platform.engine, retention.lock) as mine:
        assert mine and await other_replica.run_once() == {}


def test_the_settings_turn_the_rules_on(make_settings) -> None:  # type: ignore[no-untyped-def]
    off = create_app(make_settings(SegmenterSettings)).state.platform.retention
    assert off is not None and not off.enabled
    on = create_app(
        make_settings(SegmenterSettings, timeline_retention_days=400, audit_retention_days=730)
    ).state.platform.retention
    assert sorted((r.name, r.days) for r in on.rules) == [("audit_log", 730), ("events", 400)]

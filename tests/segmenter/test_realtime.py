"""Real-time membership through the real broker: enter and exit announced once each, time-based
conditions flipping on schedule without events, redelivery changing nothing."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import orjson
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import segments as segment_store
from shared.contracts.topics import PROFILES, SEGMENT_MEMBERSHIP
from tests.segmenter.conftest import ADMIN, START, Harness, make_event, read_all, segmenter_running


async def test_an_event_enters_and_a_later_one_exits_each_announced_once(harness: Harness) -> None:
    pro = await harness.create_segment({"trait": "plan", "op": "equals", "value": "pro"}, name="Pro")
    buyers = await harness.create_segment(
        {"performed": "Order Completed", "count": {"op": "at_least", "value": 2}}, name="Repeat buyers"
    )
    await harness.send(make_event("m1", "identify", user_id="u1", traits={"plan": "pro"}))
    await harness.processed(1)
    await harness.send(
        make_event("m2", "track", user_id="u1", event="Order Completed", properties={"total": 5})
    )
    await harness.processed(2)
    await harness.send(
        make_event("m3", "track", user_id="u1", event="Order Completed", properties={"total": 7})
    )
    await harness.processed(3)
    await harness.send(
        make_event(
            "m4", "identify", user_id="u1", traits={"plan": "free"}, timestamp=START + timedelta(minutes=1)
        )
    )
    await harness.processed(4)
    # An event no segment refers to changes nothing and is not even evaluated.
    await harness.send(make_event("m5", "track", user_id="u1", event="Page Scrolled"))
    await harness.processed(5)
    msgs = await harness.memberships()
    got = [(m["segment_id"], m["change"], m["cause"], m["event_id"]) for m in msgs]
    assert got == [
        (pro, "entered", "m1", f"u1:{pro}:1"),
        (buyers, "entered", "m3", f"u1:{buyers}:1"),
        (pro, "exited", "m4", f"u1:{pro}:2"),
    ]
    assert all(m["customer_id"] == "u1" for m in msgs)
    assert msgs[0]["segment_name"] == "Pro" and msgs[0]["traits"] == {"plan": "pro"}
    # each announcement passes on the correlation id of the event that caused it
    raw = await read_all(harness.settings.topic(SEGMENT_MEMBERSHIP.name))
    assert [m["headers"]["clm-correlation-id"] for m in raw] == ["m1", "m3", "m4"]
    segs = (await harness.customer("u1"))["segments"]
    assert [s["segment_id"] for s in segs] == [buyers]


async def test_a_time_based_condition_flips_on_schedule_without_any_event(harness: Harness) -> None:
    lapsed = await harness.create_segment(
        {"and": [{"performed": "Order Completed"}, {"not_performed": "Order Completed", "since": "30d"}]},
        name="Lapsed buyers",
    )
    await harness.send(make_event("m1", "track", user_id="u1", event="Order Completed"))
    await harness.processed(1)
    async with harness.segmenter.platform.engine.connect() as conn:
        due = (await conn.execute(text("SELECT customer_id, segment_id, due_at FROM segment_timers"))).all()
    assert [(d.customer_id, d.segment_id, d.due_at) for d in due] == [
        ("u1", lapsed, START + timedelta(days=30))
    ]

    harness.clock.advance(timedelta(days=29, hours=23))
    assert await harness.segmenter.timers.run_once() == 0  # not due yet: nothing is scanned
    harness.clock.advance(timedelta(hours=1))
    assert await harness.segmenter.timers.run_once() == 1
    assert await harness.segmenter.timers.run_once() == 0  # the timer is consumed
    msgs = await harness.memberships()
    assert [(m["segment_id"], m["change"], m["cause"]) for m in msgs] == [(lapsed, "entered", "schedule")]

    # A new order takes them out again, and schedules the next flip 30 days after it.
    await harness.send(
        make_event("m2", "track", user_id="u1", event="Order Completed", timestamp=harness.clock.now())
    )
    await harness.processed(2)
    msgs = await harness.memberships()
    assert [(m["change"], m["cause"]) for m in msgs] == [("entered", "schedule"), ("exited", "m2")]
    async with harness.segmenter.platform.engine.connect() as conn:
        due_at = await conn.scalar(text("SELECT due_at FROM segment_timers"))
    assert due_at == harness.clock.now() + timedelta(days=30)


async def test_redelivered_and_duplicate_events_change_nothing(harness: Harness) -> None:
    seg = await harness.create_segment({"performed": "Order Completed"}, name="Buyers")
    order = make_event("m1", "track", user_id="u1", event="Order Completed", properties={"revenue": 10})
    await harness.send(order, order)  # a duplicate on the topic
    await harness.processed(2)
    # ...and a redelivery of a batch already handled (as after a crash before the offset commit).
    async with harness.segmenter.platform.unit_of_work() as uow:
        await harness.segmenter.events.handle(uow, [order, order])
    p = await harness.customer("u1")
    assert p["aggregates"]["event_count"] == 1
    assert p["commerce"] == {**p["commerce"], "orders_count": 1, "revenue": 10.0}
    timeline = await harness.client.get(
        "/v1/customers/u1/events", headers={"Authorization": "Bearer test-admin-token"}
    )
    assert len(timeline.json()["events"]) == 1
    msgs = await harness.memberships()
    assert [(m["segment_id"], m["change"]) for m in msgs] == [(seg, "entered")]


async def test_a_merge_moves_memberships_to_the_survivor(harness: Harness) -> None:
    seg = await harness.create_segment({"performed": "Product Viewed"}, name="Browsers")
    await harness.send(make_event("m1", "track", anonymous_id="a1", event="Product Viewed"))
    await harness.send(make_event("m2", "identify", user_id="u1", traits={"plan": "pro"}))
    await harness.processed(2)
    await harness.send(make_event("m3", "identify", user_id="u1", anonymous_id="a1"))
    await harness.processed(3)
    msgs = await harness.memberships()
    # Keyed by customer: order holds per customer (partitions interleave the two).
    assert [(m["change"], m["cause"]) for m in msgs if m["customer_id"] == "a1"] == [
        ("entered", "m1"),
        ("exited", "merge"),
    ]
    assert [(m["change"], m["cause"]) for m in msgs if m["customer_id"] == "u1"] == [("entered", "merge")]
    assert all(m["segment_id"] == seg for m in msgs)


async def test_a_rolling_window_lets_a_customer_go_when_their_last_event_leaves_it(harness: Harness) -> None:
    active = await harness.create_segment(
        {"performed": "Signed In", "within": "7d", "count": {"op": "at_least", "value": 2}}, name="Active"
    )
    await harness.send(make_event("m1", "track", user_id="u1", event="Signed In"))
    await harness.processed(1)
    harness.clock.advance(timedelta(days=2))
    await harness.send(
        make_event("m2", "track", user_id="u1", event="Signed In", timestamp=harness.clock.now())
    )
    await harness.processed(2)
    harness.clock.advance(timedelta(days=4))
    assert await harness.segmenter.timers.run_once() == 0
    harness.clock.advance(timedelta(days=1))  # the first sign-in (START) leaves the 7-day window now
    assert await harness.segmenter.timers.run_once() == 1
    msgs = await harness.memberships()
    assert [(m["segment_id"], m["change"], m["cause"]) for m in msgs] == [
        (active, "entered", "m2"),
        (active, "exited", "schedule"),
    ]
    harness.clock.advance(timedelta(days=30))
    assert await harness.segmenter.timers.run_once() == 1  # the second sign-in left too: no change, no news
    harness.clock.advance(timedelta(days=30))
    assert await harness.segmenter.timers.run_once() == 0  # nothing can change any more: no timer left
    assert len(await harness.memberships()) == 2


async def test_a_new_customer_enters_segments_their_events_do_not_name(harness: Harness) -> None:
    """A new profile is evaluated against every segment: these hold for a newcomer whose first event
    names none of them (back-fill and preview already counted such customers in)."""
    no_email = await harness.create_segment({"trait": "email", "op": "not_exists"}, name="No email")
    holdout = await harness.create_segment({"random_bucket": {"buckets": 1, "below": 1}}, name="Everyone")
    not_buyers = await harness.create_segment(
        {"not_performed": "Order Completed", "since": "30d"}, name="No recent order"
    )
    outsiders = await harness.create_segment({"not": {"member_of": holdout}}, name="Outside the bucket")
    await harness.send(make_event("m1", "track", anonymous_id="a1", event="Page Scrolled"))
    await harness.processed(1)
    entered = {(m["segment_id"], m["change"]) for m in await harness.memberships()}
    assert entered == {(no_email, "entered"), (holdout, "entered"), (not_buyers, "entered")}
    assert outsiders not in {s for s, _ in entered}
    # Evaluated once: a second event of the same kind announces nothing more.
    await harness.send(make_event("m2", "track", anonymous_id="a1", event="Page Scrolled"))
    await harness.processed(2)
    assert len(await harness.memberships()) == 3


async def test_a_window_written_without_a_zone_is_utc_and_fails_no_batch_or_timer_pass(
    harness: Harness,
) -> None:
    """`between` dates without a zone are UTC. Kept naive, comparing them with event times raised:
    every batch evaluating the segment failed and its events were dead-lettered; with a `within`
    segment on the same event, so did every batch and due-timer pass (`Catalog.timeline_since`)."""
    march = await harness.create_segment(
        {"performed": "Order Completed", "between": {"from": "2026-03-01", "to": "2026-03-31"}}, name="March"
    )
    mixed = await harness.create_segment(  # one end with a zone, one without: was a 500
        {
            "performed": "Order Completed",
            "between": {"from": "2026-03-02T11:00:00", "to": "2026-03-02T13:00:00Z"},
        },
        name="Around noon",
    )
    recent = await harness.create_segment({"performed": "Order Completed", "within": "1d"}, name="Recent")
    pro = await harness.create_segment({"trait": "plan", "op": "equals", "value": "pro"}, name="Pro")
    shown = (await harness.client.get(f"/v1/segments/{march}", headers=ADMIN)).json()["definition"]
    assert shown["between"] == {"from": "2026-03-01T00:00:00Z", "to": "2026-03-31T00:00:00Z"}

    await harness.send(make_event("m1", "track", user_id="u1", event="Order Completed"))  # a new customer
    await harness.send(
        make_event(
            "m2", "identify", user_id="u1", traits={"plan": "pro"}, timestamp=START + timedelta(minutes=1)
        )
    )
    await harness.processed(2)
    runner = harness.segmenter.platform.consumers[0]
    assert runner.last_error is None  # no batch failed: nothing retried or dead-lettered
    msgs = await harness.memberships()
    assert sorted((m["segment_id"], m["change"]) for m in msgs) == sorted(
        [(march, "entered"), (mixed, "entered"), (recent, "entered"), (pro, "entered")]
    )
    harness.clock.advance(timedelta(days=1))  # the order leaves the 1-day window
    assert await harness.segmenter.timers.run_once() == 1
    msgs = await harness.memberships()
    assert [(m["segment_id"], m["change"], m["cause"]) for m in msgs[4:]] == [(recent, "exited", "schedule")]


async def test_a_window_stored_without_a_zone_before_it_was_read_as_utc_works(harness: Harness) -> None:
    """Definitions saved before then hold such times as written (`2026-03-01T00:00:00`): the catalogue
    loads them as UTC, so their segments work without being saved again."""
    stored = {
        "performed": "Order Completed",
        "between": {"from": "2026-03-01T00:00:00", "to": "2026-03-31T00:00:00"},
    }
    async with harness.segmenter.platform.unit_of_work() as uow:
        await segment_store.insert_segment(uow.session, "seg_march", "March", "", stored, START)
    await harness.segmenter.backfill.run_until_idle()
    await harness.send(make_event("m1", "track", user_id="u1", event="Order Completed"))
    await harness.processed(1)
    assert harness.segmenter.platform.consumers[0].last_error is None
    msgs = await harness.memberships()
    assert [(m["segment_id"], m["change"], m["cause"]) for m in msgs] == [("seg_march", "entered", "m1")]


TRAIT_BYTES = 4096


@pytest.fixture
async def bounded(make_settings: Callable[..., SegmenterSettings]) -> AsyncIterator[Harness]:
    """A segmenter whose profiles hold at most 4 KB of traits."""
    async with segmenter_running(make_settings, profile_max_trait_bytes=TRAIT_BYTES) as h:
        yield h


async def test_identifies_that_would_grow_a_profile_past_its_bound_are_refused_and_the_events_still_count(
    bounded: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream adding a 1 KB trait per identify: the profile stops at the bound, every later
    message carrying its traits stays under it, the refused events still count, and updates that
    shrink the traits (or fit again afterwards) apply."""
    h = bounded
    pro = await h.create_segment({"trait": "plan", "op": "equals", "value": "pro"}, name="Pro")

    def refused() -> float:
        labels = {"reason": "size", "source": "identify"}
        return REGISTRY.get_sample_value("clm_segmenter_trait_changes_refused_total", labels) or 0.0

    before = refused()
    base = START - timedelta(hours=1)
    # In order (in one unit of work or several): the first three blobs fit (about 3.6 KB with `plan`),
    # each of the other five would take the traits past 4 KB.
    with caplog.at_level(logging.WARNING, logger="services.segmenter.consumers.customer_events"):
        await h.send(
            make_event("b0", "identify", user_id="u1", traits={"plan": "pro"}, timestamp=base),
            *(
                make_event(
                    f"b{i}",
                    "identify",
                    user_id="u1",
                    traits={f"blob_{i}": "x" * 1200},
                    timestamp=base + timedelta(minutes=i),
                )
                for i in range(1, 9)
            ),
        )
        await h.processed(9)
    profile = await h.customer("u1")
    traits = profile["traits"]
    assert set(traits) == {"plan", "blob_1", "blob_2", "blob_3"}
    assert len(orjson.dumps(traits)) <= TRAIT_BYTES
    assert set(profile["trait_updated_at"]) == set(traits)
    # Every event counted: count, last seen (the last, refused, identify's time), timeline.
    assert profile["aggregates"]["event_count"] == 9
    assert profile["aggregates"]["last_seen"].startswith(
        (base + timedelta(minutes=8)).strftime("%Y-%m-%dT%H:%M")
    )
    r = await h.client.get("/v1/customers/u1/events?limit=50", headers=ADMIN)
    assert len(r.json()["events"]) == 9
    assert refused() - before == 5
    logged = [rec for rec in caplog.records if "bound" in rec.getMessage()]
    assert len(logged) == 5 and all(getattr(rec, "customer_id", None) == "u1" for rec in logged)
    assert sorted(getattr(rec, "message_id", "") for rec in logged) == [f"b{i}" for i in range(4, 9)]

    # Shrinking updates apply (in another unit of work, measured afresh), then a new trait fits again.
    await h.send(
        make_event(
            "s1", "identify", user_id="u1", traits={"blob_1": None}, timestamp=base + timedelta(minutes=20)
        ),
        make_event(
            "s2", "identify", user_id="u1", traits={"plan": "free"}, timestamp=base + timedelta(minutes=21)
        ),
    )
    await h.processed(11)
    await h.send(
        make_event(
            "s3",
            "identify",
            user_id="u1",
            traits={"blob_9": "y" * 900},
            timestamp=base + timedelta(minutes=22),
        )
    )
    await h.processed(12)
    traits = (await h.customer("u1"))["traits"]
    assert traits["blob_1"] is None and traits["plan"] == "free" and traits["blob_9"] == "y" * 900
    assert len(orjson.dumps(traits)) <= TRAIT_BYTES
    assert refused() - before == 5

    # Every message that went out carries traits under the bound.
    await h.relay()
    changes = [m["value"] for m in await read_all(h.settings.topic(PROFILES.name))]
    trait_changes = [c for c in changes if c["kind"] == "traits_changed"]
    assert trait_changes and all(len(orjson.dumps(c["traits"])) <= TRAIT_BYTES for c in changes)
    assert trait_changes[-1]["traits"] == traits
    announcements = await h.memberships()
    assert [(m["segment_id"], m["change"]) for m in announcements] == [(pro, "entered"), (pro, "exited")]
    assert all(len(orjson.dumps(m["traits"])) <= TRAIT_BYTES for m in announcements)


async def test_a_merge_keeps_the_survivor_within_the_bound_taking_the_newest_traits_that_fit(
    bounded: Harness,
) -> None:
    h = bounded

    def dropped() -> float:
        labels = {"reason": "size", "source": "merge"}
        return REGISTRY.get_sample_value("clm_segmenter_trait_changes_refused_total", labels) or 0.0

    before = dropped()
    base = START - timedelta(hours=1)
    await h.send(
        make_event("u", "identify", user_id="u1", traits={"u_1": "u" * 1200}, timestamp=base),
        *(
            make_event(
                f"a{i}",
                "identify",
                anonymous_id="a1",
                traits={f"a_{i}": "a" * 1200},
                timestamp=base + timedelta(minutes=i),
            )
            for i in range(1, 4)
        ),
    )
    await h.processed(4)
    # The device logs in: its anonymous profile merges into u1's, which has room for two of its three.
    await h.send(
        make_event(
            "m",
            "track",
            user_id="u1",
            anonymous_id="a1",
            event="Signed In",
            timestamp=base + timedelta(minutes=9),
        )
    )
    await h.processed(5)
    profile = await h.customer("u1")
    assert set(profile["traits"]) == {"u_1", "a_3", "a_2"}
    assert len(orjson.dumps(profile["traits"])) <= TRAIT_BYTES
    assert profile["aggregates"]["event_count"] == 5
    assert dropped() - before == 1

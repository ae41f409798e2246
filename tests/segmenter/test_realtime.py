"""Real-time membership through the real broker: enter and exit announced once each, time-based
conditions flipping on schedule without events, redelivery changing nothing."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text

from shared.contracts.topics import SEGMENT_MEMBERSHIP
from tests.segmenter.conftest import START, Harness, make_event, read_all


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

"""Goals: a conversion within the goal's window counts once per instance, even after the path ended."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

from shared.contracts.events import CustomerEvent
from shared.contracts.topics import CUSTOMER_EVENTS
from tests.journey_engine.harness import ADMIN, START, Harness, engine_running
from tests.journey_engine.test_timing_and_rules import linear


async def publish(
    h: Harness, events: list[tuple[str, str]], *, message_id: str | None = None, count: bool = True
) -> None:
    """(customer, event name) pairs, all at once; `count=False` for a redelivery (no new inbox row)."""
    now = h.clock.now()
    await asyncio.gather(
        *(
            h.platform.producer.publish(
                CUSTOMER_EVENTS.name,
                user,
                CustomerEvent(
                    message_id=message_id or uuid.uuid4().hex,
                    type="track",
                    user_id=user,
                    event=name,
                    timestamp=now,
                    received_at=now,
                ),
            )
            for user, name in events
        )
    )
    if count:
        h.published["events"] += len(events)
        await h.processed("events")


def converted(stats: dict[str, Any], node_id: str) -> int:
    [version] = stats["versions"]
    return next(n["converted"] for n in version["nodes"] if n["node_id"] == node_id)


async def test_a_goal_reached_after_the_path_ended_counts_within_the_window_once(make_settings: Any) -> None:
    journey = linear(
        "Trial nudge",
        "Signed Up",
        [
            {"id": "hello", "type": "send", "channel": "email", "template_id": "hello"},
            {"id": "day", "type": "delay", "duration": "P1D"},
        ],
        goal={"event": "Subscribed", "within": "P3D"},
    )
    async with engine_running(make_settings) as h:
        jid = await h.journey(journey)
        await publish(h, [("a", "Signed Up"), ("b", "Signed Up")])
        await h.advance(timedelta(days=1, minutes=1))
        assert {r.customer_id: r.status for r in await h.instances(jid)} == {"a": "exited", "b": "exited"}

        # Day 2: a subscribes (twice, and the first event is redelivered): one conversion.
        h.clock.advance(timedelta(days=1))
        redelivered = uuid.uuid4().hex
        await publish(h, [("a", "Subscribed")], message_id=redelivered)
        await publish(h, [("a", "Subscribed")], message_id=redelivered, count=False)
        await publish(h, [("a", "Subscribed")])  # handled after the redelivery (same key, in order)
        # Day 4: b subscribes, past the window.
        h.clock.advance(timedelta(days=2))
        await publish(h, [("b", "Subscribed")])

        stats = (await h.client.get(f"/v1/journeys/{jid}/stats", headers=ADMIN)).json()
        assert converted(stats, "done") == 1
        listed = (await h.client.get(f"/v1/journeys/{jid}/instances", headers=ADMIN)).json()["instances"]
        by_customer = {i["customer_id"]: i for i in listed}
        assert by_customer["a"]["status"] == "exited" and by_customer["a"]["converted_at"] is not None
        assert by_customer["b"]["converted_at"] is None
        assert await h.scalar("SELECT count(*) FROM goal_windows") == 1  # b's, expired: pruned later
        await h.engine.compact_counts()
        assert await h.scalar("SELECT count(*) FROM goal_windows") == 0


AB_JOURNEY: dict[str, Any] = {
    "name": "A/B",
    "entry": {"type": "event", "event": "Joined"},
    "goal": {"event": "Purchased", "within": "P14D"},
    "nodes": [
        {"id": "start", "type": "entry"},
        {
            "id": "ab",
            "type": "split",
            "arms": [
                {"name": "mail", "percent": 50},
                {"name": "holdout", "percent": 50, "holdout": True},
            ],
        },
        {"id": "offer", "type": "send", "channel": "email", "template_id": "offer"},
        {"id": "week", "type": "delay", "duration": "P7D"},
        {"id": "done", "type": "exit"},
        {"id": "skip", "type": "exit"},
    ],
    "edges": [
        {"from": "start", "to": "ab"},
        {"from": "ab", "to": "offer", "branch": "mail"},
        {"from": "ab", "to": "skip", "branch": "holdout"},
        {"from": "offer", "to": "week"},
        {"from": "week", "to": "done"},
    ],
}


async def test_a_holdout_arm_that_exits_at_once_shows_its_conversions(make_settings: Any) -> None:
    journey = AB_JOURNEY
    customers = [f"u{i}" for i in range(60)]
    async with engine_running(make_settings) as h:
        jid = await h.journey(journey)
        await publish(h, [(c, "Joined") for c in customers])
        arms = {
            r.customer_id: r.arm
            for r in await h.rows(
                "SELECT customer_id, context->'arms'->>'ab' AS arm FROM instances WHERE journey_id = :j",
                j=jid,
            )
        }
        held_out = sorted(c for c, arm in arms.items() if arm == "holdout")
        mailed = sorted(c for c, arm in arms.items() if arm == "mail")
        assert held_out and mailed
        # Day 1: every held-out customer buys (they left at once), and half of those mailed (still inside).
        h.clock.advance(timedelta(days=1))
        await publish(h, [(c, "Purchased") for c in held_out + mailed[: len(mailed) // 2]])
        stats = (await h.client.get(f"/v1/journeys/{jid}/stats", headers=ADMIN)).json()
        by_arm = {a["arm"]: a for a in stats["splits"][0]["arms"]}
        assert by_arm["holdout"]["converted"] == len(held_out)
        assert by_arm["holdout"]["conversion_rate"] == 1.0
        assert by_arm["mail"]["converted"] == len(mailed) // 2
        assert by_arm["mail"]["vs_holdout"] is not None and by_arm["mail"]["vs_holdout"]["z"] < 0
        assert converted(stats, "skip") == len(held_out)
        assert converted(stats, "week") == len(mailed) // 2


async def test_a_goal_in_the_same_batch_as_the_exit_counts(make_settings: Any) -> None:
    """An SDK flushes `Joined` and `Purchased` together: one consumer batch enters the customer, the
    holdout arm finishes them at once, and the purchase converts them (the window opened by the
    batch's first event was invisible to its second, so the holdout lost exactly these)."""
    async with engine_running(make_settings) as h:
        jid = await h.journey(AB_JOURNEY)
        now = h.clock.now()

        def event(user: str, name: str) -> tuple[str, CustomerEvent]:
            mid = uuid.uuid4().hex
            return mid, CustomerEvent(
                message_id=mid, type="track", user_id=user, event=name, timestamp=now, received_at=now
            )

        customers = [f"b{i}" for i in range(40)]
        async with h.platform.unit_of_work() as uow:
            await h.engine.on_events(
                uow, [event(c, "Joined") for c in customers] + [event(c, "Purchased") for c in customers]
            )
        stats = (await h.client.get(f"/v1/journeys/{jid}/stats", headers=ADMIN)).json()
        by_arm = {a["arm"]: a for a in stats["splits"][0]["arms"]}
        assert by_arm["holdout"]["customers"] > 0
        assert by_arm["holdout"]["converted"] == by_arm["holdout"]["customers"]
        assert by_arm["mail"]["converted"] == by_arm["mail"]["customers"]
        converted_rows = await h.scalar(
            "SELECT count(*) FROM instances WHERE journey_id = :j AND converted_at IS NOT NULL", j=jid
        )
        assert converted_rows == len(customers)


async def test_the_newest_instance_owns_the_goal(make_settings: Any) -> None:
    """Each run of a re-entering journey finishes with its goal open (no `within`: until archived).
    A later purchase converts the last run only; the earlier runs' windows closed when it entered."""
    journey = linear(
        "Weekly digest",
        "Digest Due",
        [{"id": "digest", "type": "send", "channel": "email", "template_id": "digest"}],
        goal={"event": "Purchased"},
        reentry={"policy": "always"},
    )
    async with engine_running(make_settings) as h:
        jid = await h.journey(journey)
        for _ in range(3):
            await publish(h, [("w", "Digest Due")])
            h.clock.advance(timedelta(days=7))
        assert await h.scalar("SELECT count(*) FROM goal_windows WHERE journey_id = :j", j=jid) == 1
        await publish(h, [("w", "Purchased")])
        stats = (await h.client.get(f"/v1/journeys/{jid}/stats", headers=ADMIN)).json()
        assert converted(stats, "done") == 1
        assert (
            await h.scalar(
                "SELECT count(*) FROM instances WHERE journey_id = :j AND converted_at IS NOT NULL", j=jid
            )
            == 1
        )


WEEKLY_AB: dict[str, Any] = {
    "name": "Weekly AB",
    "entry": {
        "type": "schedule",
        "segment_id": "subs",
        "at": (START + timedelta(hours=1)).isoformat(),
        "every": "P7D",
    },
    "goal": {"event": "Purchased", "within": "P7D"},
    "nodes": [
        {"id": "start", "type": "entry"},
        {
            "id": "ab",
            "type": "split",
            "arms": [{"name": "mail", "percent": 50}, {"name": "control", "percent": 50, "holdout": True}],
        },
        {"id": "hi", "type": "send", "channel": "email", "template_id": "hi"},
        {"id": "done", "type": "exit"},
    ],
    "edges": [
        {"from": "start", "to": "ab"},
        {"from": "ab", "to": "hi", "branch": "mail"},
        {"from": "ab", "to": "done", "branch": "control"},
        {"from": "hi", "to": "done"},
    ],
}


async def test_ab_results_count_customers_not_runs(make_settings: Any) -> None:
    """A weekly split broadcast to 4 members, 3 runs: the arms hold 4 customers (12 entries), and a
    customer who bought converts once however many runs reached them; the z-test compares customers."""
    async with engine_running(make_settings) as h:
        jid = await h.journey(WEEKLY_AB)
        members = ["c1", "c2", "c3", "c4"]
        for c in members:
            await h.membership(c, "subs")
        for _ in range(3):
            await h.advance(timedelta(days=7))
        assert await h.scalar("SELECT count(*) FROM instances WHERE journey_id = :j", j=jid) == 12
        await publish(h, [(c, "Purchased") for c in members])
        stats = (await h.client.get(f"/v1/journeys/{jid}/stats", headers=ADMIN)).json()
        arms = stats["splits"][0]["arms"]
        assert sum(a["customers"] for a in arms) == 4
        assert sum(a["entries"] for a in arms) == 12
        for a in arms:
            assert a["converted"] == a["customers"]
            assert a["conversion_rate"] in (1.0, None)
            assert a["entries"] == 3 * a["customers"]


async def test_a_holdout_arm_wired_to_a_send_is_saved_with_a_warning(make_settings: Any) -> None:
    """Its customers would get the message: the create, edit and dry-run answers say so."""
    async with engine_running(make_settings) as h:
        d = WEEKLY_AB | {
            "edges": [e if e.get("branch") != "control" else e | {"to": "hi"} for e in WEEKLY_AB["edges"]]
        }
        r = await h.client.post("/v1/journeys", json={"definition": d}, headers=ADMIN)
        assert r.status_code == 201, r.text
        [warning] = r.json()["warnings"]
        assert (warning["field"], warning["rule"]) == ("definition.nodes.ab", "holdout_sends")
        jid = r.json()["id"]
        r = await h.client.put(f"/v1/journeys/{jid}", json={"definition": d}, headers=ADMIN)
        assert [w["rule"] for w in r.json()["warnings"]] == ["holdout_sends"]
        dry = await h.client.post(
            "/v1/journeys/dry-run",
            json={"definition": d, "journey_id": jid, "customer_id": "x"},
            headers=ADMIN,
        )
        assert [w["rule"] for w in dry.json()["warnings"]] == ["holdout_sends"]
        fixed = await h.client.put(f"/v1/journeys/{jid}", json={"definition": WEEKLY_AB}, headers=ADMIN)
        assert fixed.status_code == 200 and fixed.json()["warnings"] == []

"""Abandoned cart: Product Added -> wait 1 h for Order Completed (same cart id) -> reminder, else exit."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from tests.journey_engine.harness import engine_running

CART_JOURNEY: dict[str, Any] = {
    "name": "Abandoned cart",
    "entry": {
        "type": "event",
        "event": "Product Added",
        "where": [{"field": "event.properties.cart_id", "op": "exists"}],
    },
    "correlation_key": "cart_id",
    "reentry": {"policy": "always"},
    "nodes": [
        {"id": "start", "type": "entry"},
        {
            "id": "wait_order",
            "type": "wait_event",
            "event": "Order Completed",
            "match_correlation": True,
            "timeout": "PT1H",
        },
        {"id": "reminder", "type": "send", "channel": "email", "template_id": "cart-reminder"},
        {"id": "done", "type": "exit"},
    ],
    "edges": [
        {"from": "start", "to": "wait_order"},
        {"from": "wait_order", "to": "done", "branch": "matched"},
        {"from": "wait_order", "to": "reminder", "branch": "timeout"},
        {"from": "reminder", "to": "done"},
    ],
}


async def test_abandoned_cart_both_branches(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        await h.profile(
            "alice", {"email": "alice@example.com", "timezone": "Europe/Paris", "first_name": "Alice"}
        )
        jid = await h.journey(CART_JOURNEY)
        # Alice abandons cart c1; Bob buys his cart c2 (an order for another cart does not count).
        await h.track("alice", "Product Added", {"cart_id": "c1", "sku": "tea"})
        await h.track("bob", "Product Added", {"cart_id": "c2"})
        await h.track("bob", "Order Completed", {"cart_id": "other"})
        await h.advance(timedelta(minutes=30))
        await h.track("bob", "Order Completed", {"cart_id": "c2"})
        rows = {r.customer_id: r for r in await h.instances(jid)}
        assert rows["alice"].status == "active" and rows["alice"].node_id == "wait_order"
        assert rows["bob"].status == "exited" and rows["bob"].node_id == "done"

        assert await h.advance(timedelta(minutes=29)) == 0  # not due yet
        assert await h.advance(timedelta(minutes=1)) == 2  # alice's timeout; bob's stale timer is a no-op
        rows = {r.customer_id: r for r in await h.instances(jid)}
        assert rows["alice"].status == "exited" and rows["alice"].node_id == "done"

        [request] = await h.requests(until=lambda m: len(m) >= 1)
        assert request["customer_id"] == "alice" and request["template_id"] == "cart-reminder"
        assert request["recipient"]["email"] == "alice@example.com"
        assert request["recipient"]["timezone"] == "Europe/Paris"
        assert request["data"]["event"]["properties"]["cart_id"] == "c1"
        assert request["data"]["traits"]["first_name"] == "Alice"
        assert request["journey_id"] == jid and request["node_id"] == "reminder"
        assert request["message_id"] == f"jm:{jid}:v1:{request['instance_id']}:reminder"

        # The same customer with a second cart gets a second, separate instance (once per cart id).
        await h.track("alice", "Product Added", {"cart_id": "c3"})
        await h.track("alice", "Product Added", {"cart_id": "c3"})  # same cart again: still one instance
        active = [r for r in await h.instances(jid) if r.status == "active"]
        assert [(r.customer_id, r.correlation) for r in active] == [("alice", "c3")]

        stats = (
            await h.client.get(
                f"/v1/journeys/{jid}/stats", headers={"Authorization": "Bearer test-admin-token"}
            )
        ).json()
        nodes = {n["node_id"]: n for n in stats["versions"][0]["nodes"]}
        assert nodes["start"]["entered"] == 3
        assert nodes["wait_order"]["waiting"] == 1 and nodes["wait_order"]["passed"] == 2
        assert nodes["reminder"]["passed"] == 1 and nodes["done"]["exited"] == 2

        # The counters are a row per unit of work; compaction rolls them up, the stats do not move.
        count_rows = "SELECT count(*) FROM node_counts WHERE journey_id = :j"
        before = await h.scalar(count_rows, j=jid)
        totals = "SELECT count(DISTINCT (version, node_id, metric)) FROM node_counts WHERE journey_id = :j"
        distinct = await h.scalar(totals, j=jid)
        assert before > distinct
        h.engine.settings.counts_rows_per_total = 1
        assert await h.engine.compact_counts() == 1
        assert await h.scalar(count_rows, j=jid) == distinct
        again = await h.client.get(
            f"/v1/journeys/{jid}/stats", headers={"Authorization": "Bearer test-admin-token"}
        )
        assert again.json() == stats
        assert await h.engine.compact_counts() == 0  # nothing crowded any more

"""Recommendations in journeys (issue 9): the engine keeps the segmenter's lists from ProfileChanged
and puts the lists current at send time in MessageRequested.data["recommendations"]."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from shared.contracts.events import ProfileChanged
from shared.contracts.topics import PROFILES
from tests.journey_engine.harness import Harness, engine_running

FIRST_ORDER_CROSS_SELL: dict[str, Any] = {
    "name": "Cross-sell a week after the first order",
    "entry": {"type": "event", "event": "Order Completed"},
    "nodes": [
        {"id": "start", "type": "entry"},
        {"id": "week", "type": "delay", "duration": "P7D"},
        {"id": "offer", "type": "send", "channel": "email", "template_id": "cross-sell"},
        {"id": "done", "type": "exit"},
    ],
    "edges": [
        {"from": "start", "to": "week"},
        {"from": "week", "to": "offer"},
        {"from": "offer", "to": "done"},
    ],
}


def lists(*names: str) -> dict[str, Any]:
    return {
        "cross_sell": [
            {"product_id": n.lower(), "name": n, "price": "10", "reason": "bought with Camera by 3 customers"}
            for n in names
        ],
        "upsell": [],
    }


async def profile_with_recommendations(h: Harness, cid: str, recommendations: dict[str, Any] | None) -> None:
    msg = ProfileChanged(
        event_id=uuid.uuid4().hex,
        customer_id=cid,
        kind="traits_changed",
        occurred_at=h.clock.now(),
        traits={"email": f"{cid}@example.com"},
        recommendations=recommendations,
    )
    await h.platform.producer.publish(PROFILES.name, cid, msg)
    h.published["profiles"] += 1
    await h.processed("profiles")


async def test_send_after_first_order_carries_current_recommendations(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        jid = await h.journey(FIRST_ORDER_CROSS_SELL)
        await profile_with_recommendations(h, "ann", lists("Card", "Bag"))
        await profile_with_recommendations(h, "bob", None)  # no lists known yet
        await h.track("ann", "Order Completed", {"order_id": "o1"})
        await h.track("bob", "Order Completed", {"order_id": "o2"})
        await h.advance(timedelta(days=3))
        # Ann's lists change while she waits (a later purchase); a profile change without lists
        # (None = unchanged) keeps them.
        await profile_with_recommendations(h, "ann", lists("Tripod", "Card", "Bag", "Lens"))
        await profile_with_recommendations(h, "ann", None)
        assert await h.advance(timedelta(days=4)) >= 2

        requests = await h.requests(until=lambda msgs: len(msgs) >= 2)
        by_customer = {r["customer_id"]: r for r in requests}
        ann = by_customer["ann"]["data"]["recommendations"]
        assert [p["name"] for p in ann["cross_sell"]] == ["Tripod", "Card", "Bag", "Lens"]
        assert ann["cross_sell"][0]["reason"] == "bought with Camera by 3 customers"
        assert by_customer["bob"]["data"]["recommendations"] == {"cross_sell": [], "upsell": []}
        assert {r["template_id"] for r in requests} == {"cross-sell"}
        assert [i[1] for i in await h.instances(jid)] == ["exited", "exited"]  # reached the exit node

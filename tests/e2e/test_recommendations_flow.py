"""Recommendations end to end (issue 9): orders posted to ingest feed the segmenter's catalogue and
counts; the segmenter announces the customer's lists on clm.profiles.v1; the journey engine keeps
them and puts them in the request; the notifier renders `recommendations.cross_sell` in the mail."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.e2e.conftest import WRITE_KEY, Platform
from tests.support import eventually


def order(user: str, cohort: str, *products: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": user,
        "event": "Order Completed",
        "properties": {"cohort": cohort, "products": list(products)},
    }


async def test_order_then_mail_with_top_cross_sell_items(platform: Platform) -> None:
    s = uuid.uuid4().hex[:6]
    camera = {"product_id": f"cam-{s}", "name": "Camera", "category": f"Cameras-{s}", "price": 300}
    card = {"product_id": f"card-{s}", "name": "Memory card", "category": f"Acc-{s}", "price": 20}
    bag = {"product_id": f"bag-{s}", "name": "Camera bag", "category": f"Acc-{s}", "price": 45}
    user, address = f"ann-{s}", f"ann-{s}@example.com"
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.put(
            f"{platform.url('notifier')}/v1/subscription-topics/picks",
            headers=platform.admin,
            json={"name": "Picks for you", "channels": ["email"], "default_subscribed": True},
        )
        assert r.status_code == 200, r.text
        r = await c.post(
            f"{platform.url('notifier')}/v1/templates",
            headers=platform.admin,
            json={
                "id": f"picks-{s}",
                "name": "Picks",
                "channel": "email",
                "variants": {
                    "en": {
                        "subject": "Picks for {{ traits.first_name }}",
                        "html": "<ul>{% for p in recommendations.cross_sell limit: 3 %}<li>{{ p.name }}</li>"
                        '{% endfor %}</ul><a href="{% unsubscribe_link %}">Unsubscribe</a>',
                        "text": "{% for p in recommendations.cross_sell limit: 3 %}[{{ p.name }}]"
                        "{% endfor %} {% unsubscribe_link %}",
                    }
                },
            },
        )
        assert r.status_code in (200, 201), r.text
        journey = {
            "id": f"picks-{s}",
            "definition": {
                "name": "Cross-sell after the first order",
                "entry": {
                    "type": "event",
                    "event": "Order Completed",
                    "where": [{"field": "event.properties.cohort", "op": "eq", "value": s}],
                },
                "nodes": [
                    {"id": "start", "type": "entry"},
                    # The lists travel on clm.profiles.v1, the order on clm.events.v1: a short wait
                    # (7 days in real life) lets the projection catch up.
                    {"id": "later", "type": "delay", "duration": "PT3S"},
                    {
                        "id": "offer",
                        "type": "send",
                        "channel": "email",
                        "template_id": f"picks-{s}",
                        "subscription_topic": "picks",
                    },
                    {"id": "done", "type": "exit"},
                ],
                "edges": [
                    {"from": "start", "to": "later"},
                    {"from": "later", "to": "offer"},
                    {"from": "offer", "to": "done"},
                ],
            },
        }
        r = await c.post(
            f"{platform.url('journey_engine')}/v1/journeys", headers=platform.admin, json=journey
        )
        assert r.status_code in (200, 201), r.text
        r = await c.post(
            f"{platform.url('journey_engine')}/v1/journeys/picks-{s}/activate", headers=platform.admin
        )
        assert r.status_code == 200, r.text

        seed = {"batch": [order(f"b{i}-{s}", "seed", camera, card, bag) for i in range(3)]}
        r = await c.post(f"{platform.url('ingest')}/v1/batch", json=seed, auth=(WRITE_KEY, ""))
        assert r.status_code == 200, r.text

        async def seeded() -> bool:
            got = await c.get(
                f"{platform.url('segmenter')}/v1/catalogue/items/{card['product_id']}", headers=platform.admin
            )
            return got.status_code == 200

        await eventually(seeded, timeout=30, interval=0.3)
        batch = {
            "batch": [
                {"type": "identify", "userId": user, "traits": {"email": address, "first_name": "Ann"}},
                order(user, s, camera),
            ]
        }
        r = await c.post(f"{platform.url('ingest')}/v1/batch", json=batch, auth=(WRITE_KEY, ""))
        assert r.status_code == 200, r.text

        mails = await eventually(lambda: platform.mails_to(address), timeout=40, interval=0.3)
        assert len(mails) == 1 and mails[0]["Subject"] == "Picks for Ann"
        text = mails[0].get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
        # Both accessories were bought with the camera by 3 customers; the camera itself is owned.
        assert "[Camera bag][Memory card]" in text, text
        assert "[Camera]" not in text

        r = await c.get(
            f"{platform.url('segmenter')}/v1/customers/{user}/recommendations", headers=platform.admin
        )
        assert r.status_code == 200, r.text
        assert r.json()["cross_sell"][0]["reason"] == "bought with Camera by 3 customers"

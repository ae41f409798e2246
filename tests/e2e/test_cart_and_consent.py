"""Abandoned cart across services, and consent: unsubscribing stops marketing, not transactional."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import orjson

from tests.e2e.conftest import WRITE_KEY, Platform, activate, email_template, identify, track
from tests.support import eventually, read_topic


async def test_abandoned_cart_reminds_once_unless_the_same_cart_is_ordered(platform: Platform) -> None:
    s = uuid.uuid4().hex[:6]
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.put(
            f"{platform.url('notifier')}/v1/subscription-topics/cart",
            headers=platform.admin,
            json={"name": "Cart reminders", "channels": ["email"], "default_subscribed": True},
        )
        assert r.status_code == 200, r.text
        await email_template(c, platform, f"cart-{s}", "You left something in your cart")
        await activate(
            c,
            platform,
            f"cart-{s}",
            {
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
                        "timeout": "PT3S",
                    },
                    {
                        "id": "remind",
                        "type": "send",
                        "channel": "email",
                        "template_id": f"cart-{s}",
                        "subscription_topic": "cart",
                    },
                    {"id": "done", "type": "exit"},
                ],
                "edges": [
                    {"from": "start", "to": "wait_order"},
                    {"from": "wait_order", "to": "done", "branch": "matched"},
                    {"from": "wait_order", "to": "remind", "branch": "timeout"},
                    {"from": "remind", "to": "done"},
                ],
            },
        )
        forgetful, buyer = f"forgetful-{s}", f"buyer-{s}"
        for user in (forgetful, buyer):
            await identify(c, platform, user, email=f"{user}@example.com", first_name=user)
        await track(c, platform, forgetful, "Product Added", cart_id=f"c1-{s}", product_id="p1", price=20)
        await track(c, platform, buyer, "Product Added", cart_id=f"c2-{s}", product_id="p1", price=20)
        # an order for ANOTHER cart does not count; the same cart does
        await track(c, platform, forgetful, "Order Completed", cart_id=f"other-{s}", revenue=5)
        await track(c, platform, buyer, "Order Completed", cart_id=f"c2-{s}", revenue=20)

        reminders = await eventually(lambda: platform.mails_to(f"{forgetful}@example.com"), timeout=30)
        assert [m["Subject"] for m in reminders] == ["You left something in your cart"]
        # well past the buyer's timeout too: still nothing for them, and still one for the other
        await asyncio.sleep(3)
        assert platform.mails_to(f"{buyer}@example.com") == []
        assert len(platform.mails_to(f"{forgetful}@example.com")) == 1


async def test_unsubscribe_link_stops_marketing_but_not_transactional(platform: Platform) -> None:
    s = uuid.uuid4().hex[:6]
    user, address = f"optout-{s}", f"optout-{s}@example.com"
    async with httpx.AsyncClient(timeout=10) as c:
        await marketing_on_demand(
            c, platform, f"promo-{s}", "promotions", f"Promo Wanted {s}", "A deal for you"
        )
        await email_template(c, platform, f"receipt-{s}", "Your receipt")
        await identify(c, platform, user, email=address, first_name="Olive")
        await track(c, platform, user, f"Promo Wanted {s}")
        first = await eventually(lambda: platform.mails_to(address), timeout=30)
        assert len(first) == 1

        # the RFC 8058 one-click unsubscribe a mailbox provider would POST
        link = str(first[0]["List-Unsubscribe"]).strip("<>")
        r = await c.post(
            link,
            content=b"List-Unsubscribe=One-Click",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 200, r.text

        await track(c, platform, user, f"Promo Wanted {s}")

        def suppressed(messages: list[dict[str, Any]]) -> bool:
            return any(
                m["value"]["customer_id"] == user and m["value"]["status"] == "suppressed" for m in messages
            )

        statuses = await read_topic(platform.status_topic(), until=suppressed, timeout=30)
        assert suppressed(statuses)
        assert len(platform.mails_to(address)) == 1, "no marketing mail after opting out"

        # a transactional message still goes
        r = await c.post(
            f"{platform.url('notifier')}/v1/messages",
            headers={**platform.admin, "Idempotency-Key": f"receipt-{s}"},
            json={
                "customer_id": user,
                "channel": "email",
                "template_id": f"receipt-{s}",
                "category": "transactional",
                "recipient": {"email": address},
            },
        )
        assert r.status_code == 202, r.text
        mails = await eventually(
            lambda: [m for m in platform.mails_to(address) if m["Subject"] == "Your receipt"]
        )
        assert len(mails) == 1
        assert mails[0]["List-Unsubscribe"] is None, "transactional mail carries no unsubscribe header"


async def test_a_browser_visitor_opted_out_by_user_id_gets_no_marketing(platform: Platform) -> None:
    """analytics.js browses anonymously, then identifies: the customer keeps the anonymousId as its id.
    The shop's backend opts the user out with its own userId; marketing to the customer is suppressed,
    and a transactional mail asked for with the userId still finds the customer's address."""
    s = uuid.uuid4().hex[:6]
    anon, user, address = f"anon-{s}", f"shopper-{s}", f"shopper-{s}@example.com"
    browser = {"Content-Type": "text/plain", "Origin": "https://shop.example.com"}

    async def from_browser(c: httpx.AsyncClient, path: str, **call: Any) -> None:
        body = {"anonymousId": anon, "writeKey": WRITE_KEY, "messageId": f"ajs-{uuid.uuid4()}", **call}
        r = await c.post(f"{platform.url('ingest')}/v1/{path}", content=orjson.dumps(body), headers=browser)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "*"

    async with httpx.AsyncClient(timeout=10) as c:
        await marketing_on_demand(c, platform, f"offer-{s}", "offers", f"Offer Wanted {s}", "An offer")
        await email_template(c, platform, f"invoice-{s}", "Your invoice")
        await from_browser(c, "p", type="page", name="Home")

        async def seen() -> bool:
            r = await c.get(f"{platform.url('segmenter')}/v1/customers/{anon}", headers=platform.admin)
            return r.status_code == 200

        # The identify goes by userId, so on another partition: it could otherwise be first, and the
        # customer's id the userId.
        await eventually(seen, timeout=30)
        await from_browser(c, "i", type="identify", userId=user, traits={"email": address})

        async def linked() -> bool:
            r = await c.get(
                f"{platform.url('notifier')}/v1/customers/{user}/preferences", headers=platform.admin
            )
            return bool(r.json()["customer_id"] == anon)

        await eventually(linked, timeout=30)
        r = await c.put(
            f"{platform.url('notifier')}/v1/customers/{user}/preferences",
            headers=platform.admin,
            json={
                "source": "shop backend",
                "preferences": [{"topic": "*", "channel": "email", "subscribed": False}],
            },
        )
        assert r.status_code == 200 and r.json()["customer_id"] == anon, r.text

        await track(c, platform, user, f"Offer Wanted {s}")

        # The journey engine asks for the customer by its id, or by the userId while its own view of
        # the link is a moment behind: the notifier resolves both to the customer who opted out.
        def suppressed(messages: list[dict[str, Any]]) -> bool:
            return any(
                m["value"]["customer_id"] in (anon, user)
                and m["value"]["status"] == "suppressed"
                and m["value"]["message_id"].startswith(f"jm:offer-{s}:")
                for m in messages
            )

        assert suppressed(await read_topic(platform.status_topic(), until=suppressed, timeout=30))
        r = await c.post(
            f"{platform.url('notifier')}/v1/messages",
            headers={**platform.admin, "Idempotency-Key": f"invoice-{s}"},
            json={
                "customer_id": user,
                "channel": "email",
                "template_id": f"invoice-{s}",
                "category": "transactional",
            },
        )
        assert r.status_code == 202, r.text
        mails = await eventually(lambda: platform.mails_to(address), timeout=30)
        assert [m["Subject"] for m in mails] == ["Your invoice"], "no marketing mail after opting out"


async def marketing_on_demand(
    c: httpx.AsyncClient, p: Platform, journey_id: str, topic: str, event: str, subject: str
) -> None:
    """A journey mailing `subject` (marketing, subscription topic `topic`, offered by default) each
    time a customer tracks `event`; its template has the journey's id."""
    r = await c.put(
        f"{p.url('notifier')}/v1/subscription-topics/{topic}",
        headers=p.admin,
        json={"name": topic.title(), "channels": ["email"], "default_subscribed": True},
    )
    assert r.status_code == 200, r.text
    await email_template(c, p, journey_id, subject)
    send = {
        "id": "send",
        "type": "send",
        "channel": "email",
        "template_id": journey_id,
        "subscription_topic": topic,
    }
    await activate(
        c,
        p,
        journey_id,
        {
            "name": f"{subject} on demand",
            "entry": {"type": "event", "event": event},
            "reentry": {"policy": "always"},
            "nodes": [{"id": "start", "type": "entry"}, send, {"id": "done", "type": "exit"}],
            "edges": [{"from": "start", "to": "send"}, {"from": "send", "to": "done"}],
        },
    )

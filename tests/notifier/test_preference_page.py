"""The hosted preference page (`GET /u/<token>`, its form `POST /u/<token>/preferences`): an opt-out
made there is an `unsubscribed` status of the message whose link opened the page, as the one-click
link's is (the journey engine's waits on a message and the segmenter's engagement read it), and the
message performance report counts it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from tests.notifier.conftest import ADMIN, Harness, request
from tests.notifier.test_email import email_request, setup

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def sent_email(h: Harness, message_id: str, customer: str) -> str:
    """Send a newsletter email to `customer`; the path of its unsubscribe link (the page)."""
    await h.publish(
        email_request(
            message_id,
            customer,
            recipient={"email": f"{customer}@example.com"},
            data={"traits": {"first_name": "Pat"}, "event": {"properties": {"total": 1}}},
        )
    )
    await h.wait_status(message_id, "delivered")
    mail = next(m for m in h.sink.messages if m.envelope_to == [f"{customer}@example.com"]).message
    return urlsplit(str(mail["List-Unsubscribe"]).strip("<>")).path


async def save(h: Harness, page: str, form: bytes) -> None:
    saved = await h.client.post(page + "/preferences", content=form, headers=FORM)
    assert saved.status_code == 200, saved.text


async def unsubscribed(h: Harness, message_id: str) -> list[dict[str, Any]]:
    """Every `unsubscribed` status of the message on the topic, once the notifier has gone quiet."""
    values = await h.statuses(idle=1.5, timeout=10)
    return [v for v in values if v["message_id"] == message_id and v["status"] == "unsubscribed"]


async def test_a_preference_page_opt_out_is_an_unsubscribed_status_of_the_message(
    start_notifier: Callable[..., Any],
) -> None:
    async with start_notifier() as h:
        await setup(h)  # `newsletter`: email and sms, subscribed by default
        await h.create_topic("tips", ["email"], default_subscribed=True)
        await h.create_topic("offers", ["email"], default_subscribed=False)  # opt-in, never joined
        page = await sent_email(h, "m-page-1", "pp1")
        shown = await h.client.get(page)
        assert shown.status_code == 200 and "Newsletter" in shown.text and "Offers" in shown.text

        # Untick the newsletter, keep tips: one opt-out (offers, never joined, was not received).
        await save(h, page, b"topic=tips")
        (status,) = await unsubscribed(h, "m-page-1")
        assert status["status_id"] == "m-page-1:unsubscribed:newsletter"
        assert status["reason"] == "preference_page: newsletter on email"
        assert (status["customer_id"], status["template_id"], status["journey_id"]) == (
            "pp1",
            "welcome",
            "j-welcome",
        )
        history = (await h.client.get("/v1/customers/pp1/consent-history", headers=ADMIN)).json()
        assert {(e["topic"], e["subscribed"], e["source"], e["message_id"]) for e in history["history"]} >= {
            ("newsletter", False, "preference_page", "m-page-1")
        }

        # Saved again as it is: nothing new. Re-subscribing: nothing (the contract has no such status).
        await save(h, page, b"topic=tips")
        await save(h, page, b"topic=tips&topic=newsletter")
        assert len(await unsubscribed(h, "m-page-1")) == 1

        # Everything off: tips is a second opt-out through this message, another status (its own id,
        # not one consumers' inboxes would drop as a duplicate); the newsletter was already counted.
        await save(h, page, b"")
        statuses = await unsubscribed(h, "m-page-1")
        assert sorted(s["status_id"] for s in statuses) == [
            "m-page-1:unsubscribed:newsletter",
            "m-page-1:unsubscribed:tips",
        ]

        # The report counts the message as unsubscribed once, as it does for the one-click link.
        report = await h.client.get("/v1/reports/messages", params={"group_by": "template"}, headers=ADMIN)
        (welcome,) = report.json()["groups"]
        assert (welcome["delivered"], welcome["unsubscribed"]) == (1, 1)
        assert welcome["rates"]["unsubscribe"] == 1.0


async def test_one_click_and_the_page_on_the_same_topic_make_one_status(
    start_notifier: Callable[..., Any],
) -> None:
    async with start_notifier() as h:
        await setup(h)
        page = await sent_email(h, "m-page-2", "pp2")
        assert (await h.client.post(page, data={"List-Unsubscribe": "One-Click"})).status_code == 200
        await save(h, page, b"")  # the newsletter is already off: nothing more
        # "Unsubscribe from all" on the page: all marketing on email is left, another status.
        assert (await h.client.post(page + "/all")).status_code == 200
        statuses = await unsubscribed(h, "m-page-2")
        assert sorted((s["status_id"], s["reason"]) for s in statuses) == [
            ("m-page-2:unsubscribed:*", "preference_page: all marketing on email"),
            ("m-page-2:unsubscribed:newsletter", "one_click: newsletter on email"),
        ]


async def test_ticking_only_a_topic_the_page_does_not_offer_keeps_unsubscribe_from_all(
    start_notifier: Callable[..., Any],
) -> None:
    """A form naming only topics not offered on the channel (a page left open while the topic was
    deleted, a hand-made form) re-subscribed to all marketing on it: a message without a topic was
    then sent after "unsubscribe from all"."""
    async with start_notifier() as h:
        await setup(h)
        await h.create_topic("sms-only", ["sms"])
        page = await sent_email(h, "m-page-3", "pp3")
        assert (await h.client.post(page + "/all")).status_code == 200
        await save(h, page, b"topic=deleted-meanwhile&topic=sms-only")
        prefs = (await h.client.get("/v1/customers/pp3/preferences", headers=ADMIN)).json()["preferences"]
        assert {(p["topic"], p["channel"], p["subscribed"]) for p in prefs} == {
            ("*", "email", False),
            ("newsletter", "email", False),
        }
        await h.publish(
            request(
                "m-page-4",
                "pp3",
                "email",
                "welcome",
                recipient={"email": "pp3@example.com"},
                data={"traits": {"first_name": "Pat"}, "event": {"properties": {"total": 1}}},
            )
        )
        statuses = await h.wait_status("m-page-4", "suppressed")
        assert statuses[-1]["reason"] == "unsubscribed from all email marketing"

"""Email end to end: request on Kafka -> rendered, personalized mail in the SMTP sink with RFC 8058
headers; redelivery sends nothing more; one-click unsubscribe -> `unsubscribed`, then `suppressed`;
open pixel and click redirect -> `opened` and `clicked`."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import text

from shared.clock import ManualClock
from shared.contracts import MESSAGE_STATUS, Headers
from tests.notifier.conftest import ADMIN, Harness, request
from tests.support import eventually, read_topic

WELCOME = {
    "id": "welcome",
    "name": "Welcome",
    "channel": "email",
    "default_locale": "en",
    "variants": {
        "en": {
            "subject": "Welcome, {{ traits.first_name }}!",
            "html": "<html><body><p>Hi {{ traits.first_name }}, "
            "your plan is {{ traits.plan | default: 'free' }}."
            '</p><a href="https://shop.example.com/start?x=1&amp;y=2">Start</a>'
            '<a href="{% unsubscribe_link %}">Unsubscribe</a></body></html>',
            "text": "Hi {{ traits.first_name }}, total {{ event.properties.total | money: 'USD' }}.",
        },
        "fr": {
            "subject": "Bienvenue, {{ traits.first_name }} !",
            "html": "<html><body><p>Bonjour {{ traits.first_name }}</p>"
            '<a href="https://shop.example.com/fr">Commencer</a></body></html>',
            "text": "Bonjour {{ traits.first_name }}, "
            "total {{ event.properties.total | money: 'EUR', 'fr' }}.",
        },
    },
}


async def setup(h: Harness) -> None:
    await h.create_template(WELCOME)
    await h.create_topic("newsletter", ["email", "sms"], default_subscribed=True)


def email_request(message_id: str, customer: str, **fields: Any) -> Any:
    fields.setdefault("data", {"event": {"properties": {"total": 1234.5}}})
    return request(message_id, customer, "email", "welcome", subscription_topic="newsletter", **fields)


async def test_request_becomes_one_personalized_email_even_when_redelivered(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await setup(h)
        await h.profile("c1", {"email": "ada@example.com", "first_name": "Ada", "locale": "fr-CA"})
        await h.wait_contact("c1")
        req = email_request("m-email-1", "c1")
        await h.publish(req)
        statuses = await h.wait_status("m-email-1", "delivered")
        assert [s["status"] for s in statuses] == ["queued", "sent", "delivered"]
        delivered = statuses[-1]
        assert (delivered["journey_id"], delivered["node_id"], delivered["customer_id"]) == (
            "j-welcome",
            "n-email",
            "c1",
        )

        assert len(h.sink.messages) == 1
        mail = h.sink.messages[0].message
        assert mail["To"] == "ada@example.com"
        assert mail["Subject"] == "Bienvenue, Ada !"  # locale fr-CA -> the fr variant
        assert re.fullmatch(r"<http://testserver/u/[\w\-.]+>", mail["List-Unsubscribe"])
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        text = mail.get_body(preferencelist=("plain",)).get_content()
        html = mail.get_body(preferencelist=("html",)).get_content()
        assert "Bonjour Ada, total 1.234,50 €." in text
        assert "Bonjour Ada" in html and "https://shop.example.com/fr" not in html  # link rewritten

        # Redelivered: the same event again (inbox), and the same message id under a new event id (ledger).
        await h.publish(req)
        await h.publish(req, **{Headers.EVENT_ID: "another-event-id"})
        await h.statuses(idle=1.5, timeout=5)
        assert len(h.sink.messages) == 1
        ledger = (await h.client.get("/v1/messages/m-email-1", headers=ADMIN)).json()
        assert ledger["state"] == "delivered" and ledger["attempts"] == 1


async def test_one_click_unsubscribe_then_marketing_is_suppressed(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await setup(h)
        req = email_request(
            "m-unsub-1",
            "c2",
            recipient={"email": "bob@example.com"},
            data={"traits": {"first_name": "Bob"}, "event": {"properties": {"total": 5}}},
        )
        await h.publish(req)
        await h.wait_status("m-unsub-1", "delivered")
        mail = h.sink.messages[0].message
        assert mail["Subject"] == "Welcome, Bob!"
        unsubscribe = mail["List-Unsubscribe"].strip("<>")
        html = mail.get_body(preferencelist=("html",)).get_content()
        assert f'href="{unsubscribe}"' in html.replace("&amp;", "&")  # the Liquid tag writes the same link

        page = await h.client.get(urlsplit(unsubscribe).path)
        assert page.status_code == 200 and "Newsletter" in page.text
        one_click = await h.client.post(urlsplit(unsubscribe).path, data={"List-Unsubscribe": "One-Click"})
        assert one_click.status_code == 200
        await h.wait_status("m-unsub-1", "unsubscribed")
        prefs = (await h.client.get("/v1/customers/c2/preferences", headers=ADMIN)).json()["preferences"]
        assert prefs == [{**prefs[0], "topic": "newsletter", "channel": "email", "subscribed": False}]
        history = (await h.client.get("/v1/customers/c2/consent-history", headers=ADMIN)).json()["history"]
        assert history[0]["source"] == "one_click" and history[0]["message_id"] == "m-unsub-1"

        # After "unsubscribe from all", the page shows nothing checked: saved as shown, it changes
        # nothing (it showed the topics checked, and saving that re-subscribed to everything).
        await h.create_topic("tips", ["email"], default_subscribed=True)  # never chosen: on by default
        all_off = await h.client.post(urlsplit(unsubscribe).path + "/all")
        assert all_off.status_code == 200
        page = await h.client.get(urlsplit(unsubscribe).path)
        assert "checked" not in page.text and "unsubscribed from all marketing" in page.text
        saved = await h.client.post(
            urlsplit(unsubscribe).path + "/preferences",
            content=b"",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert saved.status_code == 200
        prefs = (await h.client.get("/v1/customers/c2/preferences", headers=ADMIN)).json()["preferences"]
        assert [(p["topic"], p["subscribed"]) for p in prefs] == [
            ("*", False),
            ("newsletter", False),
            ("tips", False),
        ]

        # The hosted preference page's form re-subscribes, and that is in the ledger too.
        saved = await h.client.post(
            urlsplit(unsubscribe).path + "/preferences",
            content=b"topic=newsletter",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert saved.status_code == 200
        prefs = (await h.client.get("/v1/customers/c2/preferences", headers=ADMIN)).json()["preferences"]
        assert [(p["topic"], p["subscribed"]) for p in prefs] == [
            ("*", True),
            ("newsletter", True),
            ("tips", False),
        ]
        one_click = await h.client.post(urlsplit(unsubscribe).path, data={"List-Unsubscribe": "One-Click"})
        assert one_click.status_code == 200

        tampered = await h.client.post(urlsplit(unsubscribe).path[:-3] + "abc")
        assert tampered.status_code == 400

        await h.publish(
            email_request(
                "m-unsub-2",
                "c2",
                recipient={"email": "bob@example.com"},
                data={"traits": {"first_name": "Bob"}},
            )
        )
        statuses = await h.wait_status("m-unsub-2", "suppressed")
        assert "unsubscribed from 'newsletter'" in statuses[-1]["reason"]
        # A transactional message still goes out.
        await h.publish(
            email_request(
                "m-unsub-3",
                "c2",
                category="transactional",
                recipient={"email": "bob@example.com"},
                data={"traits": {"first_name": "Bob"}, "event": {"properties": {"total": 1}}},
            )
        )
        await h.wait_status("m-unsub-3", "delivered")
        assert len(h.sink.messages) == 2
        assert h.sink.messages[1].message["List-Unsubscribe"] is None  # transactional: no unsubscribe header


async def test_open_pixel_and_click_redirect_emit_statuses(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await setup(h)
        await h.publish(
            email_request(
                "m-track-1",
                "c3",
                recipient={"email": "cy@example.com"},
                data={"traits": {"first_name": "Cy"}, "event": {"properties": {"total": 2}}},
            ),
            **{Headers.CORRELATION_ID: "corr-track-1"},
        )
        await h.wait_status("m-track-1", "delivered")
        html = h.sink.messages[0].message.get_body(preferencelist=("html",)).get_content()
        pixel = re.search(r'<img src="(http://testserver/t/o/[^"]+)"', html)
        click = re.search(r'href="(http://testserver/t/c/[^"]+)"', html)
        assert pixel and click
        got = await h.client.get(urlsplit(pixel.group(1)).path)
        assert got.status_code == 200 and got.headers["content-type"] == "image/gif"
        await h.client.get(urlsplit(pixel.group(1)).path)  # a second open emits nothing more
        redirect = await h.client.get(urlsplit(click.group(1)).path)
        assert redirect.status_code == 302
        assert redirect.headers["location"] == "https://shop.example.com/start?x=1&y=2"
        statuses = await h.wait_status("m-track-1", "clicked")
        await h.wait_status("m-track-1", "opened")
        statuses = await h.statuses(idle=1.0, timeout=5)
        opened = [s for s in statuses if s["status"] == "opened"]
        clicked = [s for s in statuses if s["status"] == "clicked"]
        assert len(opened) == 1 and len(clicked) == 1
        assert clicked[0]["url"] == "https://shop.example.com/start?x=1&y=2"
        assert clicked[0]["journey_id"] == "j-welcome"
        # Opens and clicks pass on the request's correlation id, as its delivery statuses do.
        raw = await read_topic(h.settings.topic(MESSAGE_STATUS.name), idle=1.0, timeout=5)
        chain = {m["value"]["status"]: m["headers"][Headers.CORRELATION_ID] for m in raw}
        assert chain == dict.fromkeys(["queued", "sent", "delivered", "opened", "clicked"], "corr-track-1")


async def test_rejected_recipient_bounces_and_a_smtp_451_is_retried(start_notifier) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        await setup(h)
        h.sink.reject.add("nobody@example.com")
        await h.publish(
            email_request(
                "m-bounce",
                "c4",
                category="transactional",
                recipient={"email": "nobody@example.com"},
                data={"traits": {"first_name": "N"}, "event": {"properties": {"total": 1}}},
            )
        )
        statuses = await h.wait_status("m-bounce", "bounced")
        assert "550" in statuses[-1]["reason"]
        h.sink.fail_next = 1
        await h.publish(
            email_request(
                "m-451",
                "c4",
                category="transactional",
                recipient={"email": "x@example.com"},
                data={"traits": {"first_name": "X"}, "event": {"properties": {"total": 1}}},
            )
        )
        await eventually(lambda: h.ledger_entry("m-451", "pending"))
        assert h.sink.messages == []
        clock.advance(timedelta(minutes=5))
        h.app.state.notifier.worker.wake()
        await h.wait_status("m-451", "delivered")
        assert len(h.sink.messages) == 1


async def test_a_request_that_overtakes_the_profile_is_retried_not_failed(start_notifier) -> None:  # type: ignore[no-untyped-def]
    # An event-triggered journey can request a message before the customer's profile (with the
    # email) reaches the notifier on clm.profiles.v1: the send waits for it instead of failing.
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        await setup(h)
        await h.publish(
            email_request(
                "m-early",
                "c-new",
                data={"traits": {"first_name": "E"}, "event": {"properties": {"total": 1}}},
            )
        )
        await eventually(lambda: h.ledger_entry("m-early", "pending"))
        assert h.sink.messages == []
        await h.profile("c-new", {"email": "early@example.com", "first_name": "E"})

        await h.wait_contact("c-new")
        clock.advance(timedelta(minutes=5))
        h.app.state.notifier.worker.wake()
        await h.wait_status("m-early", "delivered")
        assert [m.envelope_to for m in h.sink.messages] == [["early@example.com"]]


async def test_a_known_customer_without_an_address_fails_once_the_wait_is_over(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier(address_wait_s=0) as h:
        await setup(h)
        await h.profile("c-nomail", {"first_name": "N"})
        await h.wait_contact("c-nomail")
        await h.publish(email_request("m-nomail", "c-nomail"))
        statuses = await h.wait_status("m-nomail", "failed")
        assert "no email address" in statuses[-1]["reason"]


async def test_a_request_that_overtakes_the_profiles_address_waits_for_it(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """A sign-up's welcome mail is asked for while the notifier knows the customer only from an
    earlier profile change without the email: it waits (retried) until the email arrives."""
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        await setup(h)
        await h.profile("c-late", {"first_name": "Lat"})
        await h.wait_contact("c-late")
        await h.publish(email_request("m-late", "c-late", requested_at=clock.now()))
        await eventually(lambda: h.ledger_entry("m-late", "pending", attempts=1))
        await h.profile("c-late", {"first_name": "Lat", "email": "late@example.com"})

        async def has_email() -> bool:
            async with h.platform.engine.connect() as conn:
                email = await conn.scalar(text("SELECT email FROM contacts WHERE customer_id = 'c-late'"))
            return email == "late@example.com"

        await eventually(has_email, timeout=15)
        clock.advance(timedelta(seconds=60))  # past the retry (at most 60 s here), within the wait
        h.app.state.notifier.worker.wake()
        await h.wait_status("m-late", "delivered")
        assert [m.message["To"] for m in h.sink.messages] == ["late@example.com"]


async def test_a_test_send_goes_to_the_address_given_and_needs_one(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await setup(h)
        await h.profile("real-1", {"email": "real@example.com", "first_name": "Real"})
        await h.wait_contact("real-1")
        # Without an address it would have mailed the customer: refused, naming the field.
        refused = await h.client.post(
            "/v1/templates/welcome/test-send", json={"customer_id": "real-1"}, headers=ADMIN
        )
        assert refused.status_code == 400
        assert refused.json()["errors"][0]["field"] == "recipient.email"
        sent = await h.client.post(
            "/v1/templates/welcome/test-send",
            json={
                "customer_id": "real-1",
                "recipient": {"email": "me@example.com"},
                "data": {"traits": {"first_name": "Me"}, "event": {"properties": {"total": 1}}},
            },
            headers=ADMIN,
        )
        assert sent.status_code == 202, sent.text
        await h.wait_status(sent.json()["message_id"], "delivered")
        assert [m.envelope_to for m in h.sink.messages] == [["me@example.com"]]
        assert h.sink.messages[0].message["Subject"] == "Welcome, Me!"


async def test_a_preview_shows_the_marketing_footer_with_a_link_that_unsubscribes_no_one(
    start_notifier,
) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await setup(h)
        await h.profile("c-prev", {"email": "prev@example.com", "first_name": "Prev"})
        await h.wait_contact("c-prev")
        data = {"event": {"properties": {"total": 1}}}
        marketing = await h.client.post(
            "/v1/templates/welcome/preview", json={"customer_id": "c-prev", "data": data}, headers=ADMIN
        )
        assert marketing.status_code == 200, marketing.text
        html = marketing.json()["parts"]["html"]
        assert 'href="http://testserver/u/preview"' in html and "Hi Prev" in html
        transactional = await h.client.post(
            "/v1/templates/welcome/preview",
            json={"customer_id": "c-prev", "data": data, "category": "transactional"},
            headers=ADMIN,
        )
        assert 'href=""' in transactional.json()["parts"]["html"]
        # Clicked, or one-click POSTed by a mail client: a page, and nobody's choices change.
        page = await h.client.get("/u/preview")
        assert page.status_code == 200 and "preview" in page.text
        assert (await h.client.post("/u/preview")).status_code == 200
        prefs = (await h.client.get("/v1/customers/c-prev/preferences", headers=ADMIN)).json()
        assert prefs["preferences"] == []

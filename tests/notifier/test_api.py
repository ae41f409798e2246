"""The HTTP API: template CRUD and validation, preview with a real customer, transactional sends with
Idempotency-Key, the in-app inbox, consent topics and preferences, and inbound SMS STOP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.notifier.api.inbound import twilio_signature
from shared.clock import ManualClock
from shared.contracts import PRIVACY, PrivacyRequest
from tests.notifier.conftest import ADMIN, Harness, request
from tests.support import eventually, read_topic

INAPP = {
    "id": "inapp",
    "name": "In-app",
    "channel": "in_app",
    "default_locale": "en",
    "variants": {"en": {"title": "Hi {{ traits.first_name }}", "body": "Order {{ order.id }} shipped"}},
}
SMS = {
    "id": "promo-sms",
    "name": "Promo",
    "channel": "sms",
    "default_locale": "en",
    "variants": {"en": {"body": "Sale! Reply STOP to opt out"}},
}


async def test_template_validation_crud_and_preview_with_a_real_customer(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        bad = await h.client.post(
            "/v1/templates",
            headers=ADMIN,
            json={
                "id": "broken",
                "name": "B",
                "channel": "email",
                "default_locale": "en",
                "variants": {"en": {"subject": "{% if %}", "html": "x"}},
            },
        )
        assert bad.status_code == 400
        fields = {e["field"] for e in bad.json()["errors"]}
        assert fields == {"variants.en.subject", "variants.en.text"}
        assert (await h.client.post("/v1/templates", json=INAPP)).status_code == 401
        await h.create_template(INAPP)
        again = await h.client.post("/v1/templates", json=INAPP, headers=ADMIN)
        assert again.status_code == 409

        await h.profile("c7", {"first_name": "Grace", "email": "grace@example.com"})

        async def preview() -> dict[str, object] | None:
            r = await h.client.post(
                "/v1/templates/inapp/preview",
                headers=ADMIN,
                json={"customer_id": "c7", "data": {"order": {"id": "A-1"}}},
            )
            return r.json() if r.status_code == 200 else None

        shown = await eventually(preview, timeout=15)
        assert shown["parts"] == {"title": "Hi Grace", "body": "Order A-1 shipped"}
        missing = await h.client.post("/v1/templates/inapp/preview", headers=ADMIN, json={"data": {}})
        assert missing.status_code == 422 and "undefined" in missing.json()["message"]

        updated = {k: v for k, v in INAPP.items() if k != "id"}
        updated["variants"] = {"en": {"title": "Hello {{ traits.first_name }}", "body": "b"}}
        put = await h.client.put("/v1/templates/inapp", json=updated, headers=ADMIN)
        assert put.status_code == 200 and put.json()["version"] == 2
        listed = (await h.client.get("/v1/templates", headers=ADMIN)).json()["templates"]
        assert [t["id"] for t in listed] == ["inapp"]
        assert (await h.client.delete("/v1/templates/inapp", headers=ADMIN)).status_code == 204
        assert (await h.client.get("/v1/templates/inapp", headers=ADMIN)).status_code == 404


async def test_transactional_api_send_is_idempotent_and_lands_in_the_inbox(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(INAPP)
        body = {
            "customer_id": "c8",
            "channel": "in_app",
            "template_id": "inapp",
            "data": {"traits": {"first_name": "Lin"}, "order": {"id": "B-2"}},
        }
        no_key = await h.client.post("/v1/messages", json=body, headers=ADMIN)
        assert no_key.status_code == 400 and no_key.json()["errors"][0]["field"] == "Idempotency-Key"
        unknown = await h.client.post(
            "/v1/messages", json={**body, "template_id": "nope"}, headers={**ADMIN, "Idempotency-Key": "k-0"}
        )
        assert unknown.status_code == 400 and unknown.json()["errors"][0]["field"] == "template_id"
        first = await h.client.post("/v1/messages", json=body, headers={**ADMIN, "Idempotency-Key": "k-1"})
        assert first.status_code == 202
        replay = await h.client.post("/v1/messages", json=body, headers={**ADMIN, "Idempotency-Key": "k-1"})
        assert replay.status_code == 200 and replay.json()["message_id"] == first.json()["message_id"]
        conflict = await h.client.post(
            "/v1/messages", json={**body, "customer_id": "other"}, headers={**ADMIN, "Idempotency-Key": "k-1"}
        )
        assert conflict.status_code == 409
        await h.wait_status(first.json()["message_id"], "delivered")

        assert (await h.client.get("/v1/inbox/c8")).status_code == 401
        token = (await h.client.get("/v1/inbox/c8/token", headers=ADMIN)).json()["token"]
        inbox = (await h.client.get("/v1/inbox/c8", params={"token": token})).json()["messages"]
        assert [(m["title"], m["body"], m["read_at"]) for m in inbox] == [
            ("Hi Lin", "Order B-2 shipped", None)
        ]
        read = await h.client.post(f"/v1/inbox/c8/{inbox[0]['id']}/read", headers={"X-Inbox-Token": token})
        assert read.status_code == 200
        unread = (await h.client.get("/v1/inbox/c8", params={"token": token, "unread": True})).json()
        assert unread["messages"] == []
        other = await h.client.get("/v1/inbox/c9", params={"token": token})
        assert other.status_code == 401


async def test_a_send_whose_template_needs_the_unseen_profile_waits_for_it(start_notifier) -> None:  # type: ignore[no-untyped-def]
    # The template names a trait only the profile carries; sent before the profile reaches the
    # notifier, the message is retried on the usual schedule, not failed for a missing variable.
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        await h.create_template(INAPP)
        message_id = await _send_inbox_message(h, "c10")
        entry = await eventually(lambda: h.ledger_entry(message_id, "pending", attempts=1))
        assert "undefined" in str(entry["reason"])

        await h.profile("c10", {"first_name": "Ines"})
        await h.wait_contact("c10")
        clock.advance(timedelta(minutes=5))
        h.app.state.notifier.worker.wake()
        await h.wait_status(message_id, "delivered")
        inbox = (await h.client.get("/v1/inbox/c10", headers=ADMIN)).json()["messages"]
        assert [m["title"] for m in inbox] == ["Hi Ines"]
        # The admin token is read as every admin route reads it: the scheme in any case.
        lower = {"Authorization": ADMIN["Authorization"].replace("Bearer", "bearer")}
        assert (await h.client.get("/v1/inbox/c10", headers=lower)).json()["messages"] == inbox
        wrong = await h.client.get("/v1/inbox/c10", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401


async def test_opt_in_topics_preferences_and_sms_stop(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(SMS)
        await h.create_topic("promotions", ["sms"], default_subscribed=False)
        await h.profile("c5", {"phone": "+15550001111"})
        sms = {"category": "marketing", "subscription_topic": "promotions"}
        await h.publish(
            request("m-optin-1", "c5", "sms", "promo-sms", recipient={"phone": "+15550001111"}, **sms)
        )
        statuses = await h.wait_status("m-optin-1", "suppressed")
        assert "not opted in" in statuses[-1]["reason"]

        bad = await h.client.put(
            "/v1/customers/c5/preferences",
            headers=ADMIN,
            json={"source": "crm", "preferences": [{"topic": "nope", "channel": "sms", "subscribed": True}]},
        )
        assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "preferences.0.topic"
        ok = await h.client.put(
            "/v1/customers/c5/preferences",
            headers=ADMIN,
            json={
                "source": "signup-form",
                "preferences": [{"topic": "promotions", "channel": "sms", "subscribed": True}],
            },
        )
        assert ok.status_code == 200 and ok.json()["changed"] == 1
        await h.publish(
            request("m-optin-2", "c5", "sms", "promo-sms", recipient={"phone": "+15550001111"}, **sms)
        )
        await h.wait_status("m-optin-2", "sent")

        # Inbound "STOP" (Twilio's form shape, signed) unsubscribes the number from all SMS marketing.
        form = {
            "From": "+15550001111",
            "To": h.settings.twilio_from_number,
            "Body": " stop ",
            "MessageSid": "SM1",
        }
        await eventually(lambda: _contact_has_phone(h))
        unsigned = await h.client.post("/v1/inbound/twilio/sms", data=form)
        assert unsigned.status_code == 403
        forged = await h.client.post(
            "/v1/inbound/twilio/sms",
            data=form,
            headers={"X-Twilio-Signature": "sïgné".encode()},
        )
        assert forged.status_code == 403
        signature = twilio_signature(
            h.settings.twilio_auth_token.get_secret_value(), "http://testserver/v1/inbound/twilio/sms", form
        )
        stop = await h.client.post(
            "/v1/inbound/twilio/sms", data=form, headers={"X-Twilio-Signature": signature}
        )
        assert stop.status_code == 200 and "<Response>" in stop.text
        await h.wait_status("m-optin-2", "unsubscribed")
        await h.publish(
            request("m-optin-3", "c5", "sms", "promo-sms", recipient={"phone": "+15550001111"}, **sms)
        )
        statuses = await h.wait_status("m-optin-3", "suppressed")
        assert "all sms marketing" in statuses[-1]["reason"]
        assert len(h.twilio.requests) == 1
        history = (await h.client.get("/v1/customers/c5/consent-history", headers=ADMIN)).json()["history"]
        assert [(e["topic"], e["subscribed"], e["source"]) for e in history] == [
            ("promotions", True, "signup-form"),
            ("*", False, "sms_stop"),
        ]


async def _contact_has_phone(h: Harness) -> bool:
    from services.notifier.store import contacts_repo

    async with h.platform.unit_of_work() as uow:
        return bool(await contacts_repo.find_by_phone(uow.session, "+15550001111"))


async def test_privacy_export_and_erasure(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(INAPP)
        await h.create_topic("news", ["email"])
        await h.profile("c6", {"first_name": "Kim", "email": "kim@example.com"})
        await h.wait_contact("c6")
        await _send_inbox_message(h, "c6")
        await eventually(lambda: _inbox_has(h, "c6", 0), timeout=15)
        await h.client.put(
            "/v1/customers/c6/preferences",
            headers=ADMIN,
            json={
                "source": "crm",
                "preferences": [{"topic": "news", "channel": "email", "subscribed": False}],
            },
        )

        def privacy(action: str, n: int) -> PrivacyRequest:
            return PrivacyRequest(
                event_id=f"pr-{n}",
                request_id=f"req-{n}",
                action=action,
                customer_id="c6",
                identities=["kim@example.com"],
                occurred_at=datetime.now(UTC),
            )

        await h.platform.producer.publish(PRIVACY.name, "c6", privacy("export_requested", 1))
        answers = await read_topic(
            h.settings.topic(PRIVACY.name),
            timeout=15,
            until=lambda ms: any(m["value"]["action"] == "export_part" for m in ms),
        )
        part = next(m["value"] for m in answers if m["value"]["action"] == "export_part")
        assert part["service"] == "notifier" and part["request_id"] == "req-1"
        assert part["data"]["contacts"][0]["email"] == "kim@example.com"
        assert part["data"]["preferences"][0]["subscribed"] is False
        assert part["data"]["in_app_messages"][0]["title"] == "Hi Kim"

        await h.platform.producer.publish(PRIVACY.name, "c6", privacy("erase_requested", 2))
        await read_topic(
            h.settings.topic(PRIVACY.name),
            timeout=15,
            until=lambda ms: any(m["value"]["action"] == "erase_completed" for m in ms),
        )
        assert (await h.client.get("/v1/inbox/c6", headers=ADMIN)).json()["messages"] == []
        assert (await h.client.get("/v1/customers/c6/preferences", headers=ADMIN)).json()["preferences"] == []
        assert (await h.client.get("/v1/customers/c6/consent-history", headers=ADMIN)).json()["history"] == []
        preview = await h.client.post(
            "/v1/templates/inapp/preview", headers=ADMIN, json={"customer_id": "c6"}
        )
        assert preview.status_code == 404


async def _send_inbox_message(h: Harness, customer: str) -> str:
    response = await h.client.post(
        "/v1/messages",
        headers={**ADMIN, "Idempotency-Key": f"inbox-{customer}"},
        json={
            "customer_id": customer,
            "channel": "in_app",
            "template_id": "inapp",
            "data": {"order": {"id": "1"}},
        },
    )
    assert response.status_code in (200, 202), response.text
    return str(response.json()["message_id"])


async def _inbox_has(h: Harness, customer: str, at_least: int) -> bool:
    items = (await h.client.get(f"/v1/inbox/{customer}", headers=ADMIN)).json()["messages"]
    return len(items) > at_least


async def test_hostile_input_is_a_clear_4xx_never_a_500(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """Found by fuzzing the OpenAPI document: tokens with non-ASCII text (hmac.compare_digest refuses
    to compare such str), ids past 64 bits, text PostgreSQL cannot store."""
    async with start_notifier() as h:
        await h.create_template(INAPP)
        for method, path in [
            ("GET", "/u/G%27M.%F3%81%81%8A%C3%8C%2B"),
            ("POST", "/u/%C3%A9t%C3%A9.%C3%A9"),
            ("POST", "/u/%C3%A9t%C3%A9.%C3%A9/all"),
            ("GET", "/t/c/%C2%99V%C3%B8.%C2%80"),
        ]:
            r = await h.client.request(method, path)
            assert r.status_code == 400 and r.json()["error"] == "invalid_link", (path, r.text)
        pixel = await h.client.get("/t/o/%29.%C3%BE.gif")  # a pixel always answers with the image
        assert pixel.status_code == 200 and pixel.headers["content-type"] == "image/gif"

        r = await h.client.get("/v1/inbox/c1", params={"token": "jeton-é"})
        assert r.status_code == 401, r.text
        r = await h.client.post("/v1/inbox/c1/86380948036332274304458142815092736/read", headers=ADMIN)
        assert r.status_code == 400 and r.json()["errors"][0]["field"] == "item_id", r.text

        send = {"customer_id": "c9", "channel": "in_app", "template_id": "inapp"}
        r = await h.client.post(
            "/v1/messages",
            json={**send, "data": {"n": 326003646359757979648}},
            headers={**ADMIN, "Idempotency-Key": "big"},
        )
        assert r.status_code == 400 and r.json()["errors"][0]["field"] == "data", r.text
        deep: dict[str, object] = {"leaf": 1}
        for _ in range(300):
            deep = {"a": deep}
        r = await h.client.post(
            "/v1/messages", json={**send, "data": deep}, headers={**ADMIN, "Idempotency-Key": "deep"}
        )
        assert r.status_code == 400 and "levels deep" in r.json()["errors"][0]["message"], r.text
        r = await h.client.post(
            "/v1/messages",
            json={**send, "customer_id": "c\x009"},
            headers={**ADMIN, "Idempotency-Key": "nul"},
        )
        assert r.status_code == 400, r.text
        assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [
            ("body.customer_id", "no_nul_character")
        ]
        # Nothing was queued by either.
        for key in ("big", "nul", "deep"):
            again = await h.client.post("/v1/messages", json=send, headers={**ADMIN, "Idempotency-Key": key})
            assert again.status_code == 202, again.text

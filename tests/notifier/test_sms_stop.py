"""An SMS STOP stops marketing SMS to the number itself, whoever CLM thinks owns it: a request's
override recipient (a number that is no customer's profile phone) included. Transactional SMS still
go; START from the number lifts it."""

from __future__ import annotations

import sqlalchemy as sa

from services.notifier.api.inbound import twilio_signature
from services.notifier.store import contacts_repo
from tests.notifier.conftest import ADMIN, Harness, request
from tests.support import eventually

SMS = {
    "id": "promo-sms",
    "name": "Promo",
    "channel": "sms",
    "default_locale": "en",
    "variants": {"en": {"body": "Sale! Reply STOP to opt out"}},
}
MARKETING = {"category": "marketing", "subscription_topic": "promotions"}
OVERRIDE = "+15550003333"


async def _inbound(h: Harness, phone: str, body: str) -> None:
    form = {"From": phone, "To": h.settings.twilio_from_number, "Body": body, "MessageSid": f"SM-{body}"}
    url = "http://testserver/v1/inbound/twilio/sms"
    signature = twilio_signature(h.settings.twilio_auth_token.get_secret_value(), url, form)
    r = await h.client.post("/v1/inbound/twilio/sms", data=form, headers={"X-Twilio-Signature": signature})
    assert r.status_code == 200, r.text


def _sent_to(h: Harness) -> list[str]:
    return [r.form()["To"] for r in h.twilio.requests]


async def test_stop_from_an_override_number_suppresses_marketing_sms_to_that_number(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(SMS)
        await h.create_topic("promotions", ["sms"])
        # The profile's phone is another number: the override's owner is no customer CLM knows of.
        await h.profile("c20", {"phone": "+15550002222"})
        await h.wait_contact("c20")
        await h.publish(
            request("m-ov-1", "c20", "sms", "promo-sms", recipient={"phone": OVERRIDE}, **MARKETING)
        )
        await h.wait_status("m-ov-1", "sent")

        await _inbound(h, OVERRIDE, "Stop")

        # Written as clients send numbers: the same number, so suppressed.
        later = request(
            "m-ov-2", "c20", "sms", "promo-sms", recipient={"phone": "+1 (555) 000-3333"}, **MARKETING
        )
        await h.publish(later)
        statuses = await h.wait_status("m-ov-2", "suppressed")
        assert statuses[-1]["reason"] == "the number opted out of sms marketing (STOP)"
        # Whichever customer the request names.
        await h.publish(
            request("m-ov-3", "c21", "sms", "promo-sms", recipient={"phone": OVERRIDE}, **MARKETING)
        )
        await h.wait_status("m-ov-3", "suppressed")
        # Transactional SMS to the number still go; marketing to the customer's own number too (the
        # STOP came from another number, and c20 has not opted out).
        await h.publish(
            request(
                "m-ov-4", "c20", "sms", "promo-sms", recipient={"phone": OVERRIDE}, category="transactional"
            )
        )
        await h.wait_status("m-ov-4", "sent")
        await h.publish(request("m-ov-5", "c20", "sms", "promo-sms", **MARKETING))
        await h.wait_status("m-ov-5", "sent")
        assert _sent_to(h) == [OVERRIDE, OVERRIDE, "+15550002222"]
        history = (await h.client.get("/v1/customers/c20/consent-history", headers=ADMIN)).json()["history"]
        assert history == []

        # Only a salted hash of the number is kept, never the number.
        async with h.platform.unit_of_work() as uow:
            rows = (
                await uow.session.execute(sa.text("SELECT phone_hash, source FROM sms_address_optouts"))
            ).all()
        assert len(rows) == 1 and rows[0].source == "sms_stop" and "5550003333" not in rows[0].phone_hash

        await _inbound(h, OVERRIDE, "START")
        await h.publish(
            request("m-ov-6", "c20", "sms", "promo-sms", recipient={"phone": OVERRIDE}, **MARKETING)
        )
        await h.wait_status("m-ov-6", "sent")
        assert _sent_to(h)[-1] == OVERRIDE


async def test_stop_still_follows_a_number_the_profile_no_longer_has(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(SMS)
        await h.create_topic("promotions", ["sms"])
        await h.profile("c22", {"phone": "+15550004444"})
        await h.wait_contact("c22")
        # A request queued with the number while the profile already moved on (or never had it).
        await h.profile("c22", {"phone": "+15550005555"})
        await eventually(lambda: _has_phone(h, "+15550005555"))
        await _inbound(h, "+15550004444", "STOP")
        await h.publish(
            request("m-ch-1", "c22", "sms", "promo-sms", recipient={"phone": "+15550004444"}, **MARKETING)
        )
        statuses = await h.wait_status("m-ch-1", "suppressed")
        assert "number opted out" in statuses[-1]["reason"]
        assert h.twilio.requests == []
        history = (await h.client.get("/v1/customers/c22/consent-history", headers=ADMIN)).json()["history"]
        assert history == []


async def _has_phone(h: Harness, phone: str) -> bool:
    async with h.platform.unit_of_work() as uow:
        return bool(await contacts_repo.find_by_phone(uow.session, phone))


async def test_a_stop_matches_the_profile_phone_however_it_was_written(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """The profile wrote the number without its country code; Twilio delivers to, and reports the
    STOP from, its E.164 form. With digits-only matching the STOP opted nobody out and marketing SMS
    kept going to the number."""
    async with start_notifier(sms_default_region="US") as h:
        await h.create_template(SMS)
        await h.create_topic("promotions", ["sms"])
        await h.profile("c23", {"phone": "(555) 000-6666"})
        await h.wait_contact("c23")
        await h.publish(request("m-nat-1", "c23", "sms", "promo-sms", **MARKETING))
        await h.wait_status("m-nat-1", "sent")
        assert _sent_to(h) == ["+15550006666"]  # the provider is given the number the STOP check used

        await _inbound(h, "+15550006666", "STOP")

        await h.publish(request("m-nat-2", "c23", "sms", "promo-sms", **MARKETING))
        statuses = await h.wait_status("m-nat-2", "suppressed")
        # The customer is opted out (found by the number), and the number is.
        assert statuses[-1]["reason"] == "unsubscribed from all sms marketing"
        history = (await h.client.get("/v1/customers/c23/consent-history", headers=ADMIN)).json()["history"]
        assert [(e["topic"], e["subscribed"], e["source"]) for e in history] == [("*", False, "sms_stop")]
        # Another customer's request to the same number, written yet another way.
        await h.publish(
            request("m-nat-3", "c24", "sms", "promo-sms", recipient={"phone": "555.000.6666"}, **MARKETING)
        )
        statuses = await h.wait_status("m-nat-3", "suppressed")
        assert statuses[-1]["reason"] == "the number opted out of sms marketing (STOP)"
        assert _sent_to(h) == ["+15550006666"]


async def test_a_number_without_its_country_code_fails_without_a_default_region(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """Sent as written, the provider would guess the country: the message could reach someone else,
    and a STOP from that number would not match the one CLM checked."""
    async with start_notifier() as h:
        await h.create_template(SMS)
        await h.profile("c25", {"phone": "555 000 7777"})
        await h.wait_contact("c25")
        await h.publish(request("m-nor-1", "c25", "sms", "promo-sms", category="transactional"))
        statuses = await h.wait_status("m-nor-1", "failed")
        assert statuses[-1]["reason"] == (
            "no sms address for the customer: the phone number has no country code (+...) and no "
            "default region is set (CLM_SMS_DEFAULT_REGION)"
        )
        await h.publish(
            request(
                "m-nor-2", "c25", "sms", "promo-sms", recipient={"phone": "+1 555"}, category="transactional"
            )
        )
        statuses = await h.wait_status("m-nor-2", "failed")
        assert (
            statuses[-1]["reason"]
            == "no sms address for the customer: the phone number is too short for its country"
        )
        assert h.twilio.requests == []


async def test_a_stop_is_credited_to_the_latest_marketing_sms_not_a_code_sent_after_it(
    start_notifier,
) -> None:  # type: ignore[no-untyped-def]
    """The unsubscribe counts against the campaign the customer answered (reports, journeys waiting on
    it), not a one-time code that happened to come later; a second STOP emits nothing more."""
    async with start_notifier() as h:
        await h.create_template(SMS)
        await h.create_topic("promotions", ["sms"])
        await h.profile("c30", {"phone": "+15550007777"})
        await h.wait_contact("c30")
        await h.publish(request("m-promo", "c30", "sms", "promo-sms", **MARKETING))
        await h.wait_status("m-promo", "sent")
        await h.publish(request("m-code", "c30", "sms", "promo-sms", category="transactional"))
        await h.wait_status("m-code", "sent")
        await _inbound(h, "+15550007777", "STOP")
        await h.wait_status("m-promo", "unsubscribed")
        await _inbound(h, "+15550007777", "STOP")
        statuses = await h.statuses(idle=1.0)
        assert [s["message_id"] for s in statuses if s["status"] == "unsubscribed"] == ["m-promo"]

"""Addresses a provider said do not exist get no message, whoever the message is for, until an
operator removes them: email (SMTP 5.1.1), SMS (a Twilio API error or delivery report), push (FCM
UNREGISTERED)."""

from __future__ import annotations

from typing import Any

import orjson

from services.notifier.api.inbound import twilio_signature
from services.notifier.store import contacts_repo
from tests.notifier.conftest import ADMIN, Harness, request
from tests.support import eventually

EMAIL = {
    "id": "note",
    "name": "Note",
    "channel": "email",
    "default_locale": "en",
    "variants": {"en": {"subject": "Hello", "html": "<p>Hi</p>", "text": "Hi"}},
}
SMS = {
    "id": "sms-note",
    "name": "SMS",
    "channel": "sms",
    "default_locale": "en",
    "variants": {"en": {"body": "Hi"}},
}
PUSH = {
    "id": "push-note",
    "name": "Push",
    "channel": "push",
    "default_locale": "en",
    "variants": {"en": {"title": "Hi", "body": "There"}},
}
GONE = "the {} address is suppressed: a provider refused it before ({}; see /v1/suppressions)"


def _email(message_id: str, customer: str, **fields: Any) -> Any:
    return request(message_id, customer, "email", "note", category="transactional", **fields)


async def _push_token_is(h: Harness, customer_id: str, token: str) -> bool:
    async with h.platform.unit_of_work() as uow:
        contact = await contacts_repo.get(uow.session, customer_id)
    return contact is not None and contact.push_token == token


async def _lookup(h: Harness, channel: str, address: str) -> Any:
    return await h.client.get(
        "/v1/suppressions", params={"channel": channel, "address": address}, headers=ADMIN
    )


async def test_an_email_address_that_does_not_exist_gets_no_message_until_removed(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(EMAIL)
        await h.create_topic("news", ["email"])
        h.sink.reject.add("gone@example.com")  # 550 5.1.1
        await h.profile("c1", {"email": "Gone@Example.com"})
        await h.wait_contact("c1")
        assert (await _lookup(h, "email", "gone@example.com")).status_code == 404

        await h.publish(_email("m-1", "c1"))
        statuses = await h.wait_status("m-1", "bounced")
        assert "550 5.1.1" in statuses[-1]["reason"]
        found = await _lookup(h, "email", " GONE@example.COM ")
        assert found.status_code == 200, found.text
        body = found.json()
        assert body["channel"] == "email" and body["message_id"] == "m-1" and body["provider"] == "smtp"
        # The provider's codes, never its words (a server's refusal often quotes the address).
        assert body["reason"] == "SMTP 550 5.1.1"

        # Marketing or transactional, the customer's own address or another request's override.
        await h.publish(
            request("m-2", "c1", "email", "note", category="marketing", subscription_topic="news")
        )
        await h.publish(_email("m-3", "c2", recipient={"email": "gone@EXAMPLE.com"}))
        await h.publish(_email("m-4", "c2", recipient={"email": "here@example.com"}))
        for message_id in ("m-2", "m-3"):
            statuses = await h.wait_status(message_id, "suppressed")
            assert statuses[-1]["reason"] == GONE.format("email", "SMTP 550 5.1.1")
        await h.wait_status("m-4", "delivered")
        assert [m.envelope_to for m in h.sink.messages] == [["here@example.com"]]

        # The mailbox is set up again: removed, mail goes to it.
        h.sink.reject.clear()
        # By the entry's id: the audit log keeps each change's path and query, never an address.
        removed = await h.client.delete(f"/v1/suppressions/{body['id']}", headers=ADMIN)
        assert removed.status_code == 204
        assert (await _lookup(h, "email", "gone@example.com")).status_code == 404
        again = await h.client.delete(f"/v1/suppressions/{body['id']}", headers=ADMIN)
        assert again.status_code == 404
        audit = (await h.client.get("/v1/audit", headers=ADMIN)).json()
        assert "gone" not in str(audit).lower() and body["id"] in str(audit)
        await h.publish(_email("m-5", "c1"))
        await h.wait_status("m-5", "delivered")
        assert h.sink.messages[-1].envelope_to == ["Gone@Example.com"]


async def test_sms_numbers_a_twilio_error_or_report_says_do_not_exist_are_suppressed(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier(sms_default_region="US") as h:
        await h.create_template(SMS)
        # The API refuses the number at once (21211: invalid 'To').
        h.twilio.fail_next(
            (400, orjson.dumps({"code": 21211, "message": "The 'To' number +15550100001 is not valid."}), {})
        )
        await h.publish(
            request(
                "s-1",
                "c1",
                "sms",
                "sms-note",
                category="transactional",
                recipient={"phone": "+1 555 010 0001"},
            )
        )
        statuses = await h.wait_status("s-1", "failed")
        assert "21211" in statuses[-1]["reason"]
        await h.publish(
            request(
                "s-2",
                "c2",
                "sms",
                "sms-note",
                category="transactional",
                recipient={"phone": "(555) 010-0001"},
            )
        )
        statuses = await h.wait_status("s-2", "suppressed")
        assert statuses[-1]["reason"] == GONE.format("sms", "twilio error 21211")

        # A delivery report: 30005 (unknown handset) suppresses the number it names; 30003 (handset
        # off) does not.
        for message_id, number in (("s-3", "+15550100003"), ("s-4", "+15550100004")):
            await h.publish(
                request(
                    message_id, "c3", "sms", "sms-note", category="transactional", recipient={"phone": number}
                )
            )
            await h.wait_status(message_id, "sent")
        for message_id, number, code in (("s-3", "+15550100003", "30005"), ("s-4", "+15550100004", "30003")):
            sid = (await h.client.get(f"/v1/messages/{message_id}", headers=ADMIN)).json()[
                "provider_message_id"
            ]
            report = {
                "MessageSid": sid,
                "MessageStatus": "undelivered",
                "ErrorCode": code,
                "To": number,
                "AccountSid": h.settings.twilio_account_sid,
            }
            url = "http://testserver/v1/inbound/twilio/status"
            signature = twilio_signature(h.settings.twilio_auth_token.get_secret_value(), url, report)
            got = await h.client.post(
                "/v1/inbound/twilio/status", data=report, headers={"X-Twilio-Signature": signature}
            )
            assert got.status_code == 204
            await h.wait_status(message_id, "bounced")
        found = (await _lookup(h, "sms", "555-010-0003")).json()
        assert (found["message_id"], found["reason"]) == ("s-3", "twilio error 30005")
        assert (await _lookup(h, "sms", "+15550100001")).json()["reason"] == "twilio error 21211"
        assert (await _lookup(h, "sms", "+15550100004")).status_code == 404
        await h.publish(
            request(
                "s-5", "c3", "sms", "sms-note", category="transactional", recipient={"phone": "+15550100003"}
            )
        )
        await h.publish(
            request(
                "s-6", "c3", "sms", "sms-note", category="transactional", recipient={"phone": "+15550100004"}
            )
        )
        await h.wait_status("s-5", "suppressed")
        await h.wait_status("s-6", "sent")
        assert [r.form()["To"] for r in h.twilio.requests] == [
            "+15550100001",
            "+15550100003",
            "+15550100004",
            "+15550100004",
        ]


async def test_a_push_token_fcm_no_longer_knows_is_suppressed(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(PUSH)
        await h.profile("c1", {"push_token": "tok-old"})
        await h.wait_contact("c1")
        unregistered = {
            "error": {
                "code": 404,
                "message": "Requested entity was not found.",
                "status": "NOT_FOUND",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                        "errorCode": "UNREGISTERED",
                    }
                ],
            }
        }
        h.fcm.fail_next((404, orjson.dumps(unregistered), {}))
        await h.publish(request("p-1", "c1", "push", "push-note", category="transactional"))
        await h.wait_status("p-1", "failed")
        await h.publish(request("p-2", "c1", "push", "push-note", category="transactional"))
        statuses = await h.wait_status("p-2", "suppressed")
        assert statuses[-1]["reason"] == GONE.format("push", "fcm UNREGISTERED")
        # The app registered a new token: it gets messages.
        await h.profile("c1", {"push_token": "tok-new", "v": 2})
        await eventually(lambda: _push_token_is(h, "c1", "tok-new"))
        await h.publish(request("p-3", "c1", "push", "push-note", category="transactional"))
        await h.wait_status("p-3", "sent")
        assert len(h.fcm.requests) == 2


async def test_bad_lookups_are_refused_naming_the_field(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        got = await _lookup(h, "webhook", "https://example.com/hook")
        assert got.status_code == 400
        assert got.json()["errors"][0]["field"] == "channel"
        got = await _lookup(h, "sms", "call me")
        assert got.status_code == 400
        assert got.json()["errors"][0]["field"] == "address"
        got = await _lookup(h, "pigeon", "x")
        assert got.status_code in (400, 422)
        assert "channel" in got.text
        got = await h.client.get("/v1/suppressions", params={"channel": "email"}, headers=ADMIN)
        assert got.status_code in (400, 422) and "address" in got.text
        assert (
            await h.client.get("/v1/suppressions", params={"channel": "email", "address": "a@b.c"})
        ).status_code == 401


async def test_a_number_twilio_refuses_as_stopped_is_suppressed_until_it_replies_start(
    start_notifier,
) -> None:  # type: ignore[no-untyped-def]
    """21610: the number replied STOP to our sender before (perhaps before CLM knew it); Twilio
    refuses every message to it, transactional too, until it replies START."""
    async with start_notifier() as h:
        await h.create_template(SMS)
        number = "+15550100007"
        h.twilio.fail_next((400, orjson.dumps({"code": 21610, "message": "unsubscribed recipient"}), {}))
        await h.publish(
            request("u-1", "c1", "sms", "sms-note", category="transactional", recipient={"phone": number})
        )
        await h.wait_status("u-1", "failed")
        assert (await _lookup(h, "sms", number)).json()["reason"] == "twilio error 21610"
        await h.publish(
            request("u-2", "c1", "sms", "sms-note", category="transactional", recipient={"phone": number})
        )
        await h.wait_status("u-2", "suppressed")

        form = {
            "From": number,
            "To": h.settings.twilio_from_number,
            "Body": "START",
            "MessageSid": "SM-start",
        }
        url = "http://testserver/v1/inbound/twilio/sms"
        signature = twilio_signature(h.settings.twilio_auth_token.get_secret_value(), url, form)
        got = await h.client.post(
            "/v1/inbound/twilio/sms", data=form, headers={"X-Twilio-Signature": signature}
        )
        assert got.status_code == 200
        assert (await _lookup(h, "sms", number)).status_code == 404
        await h.publish(
            request("u-3", "c1", "sms", "sms-note", category="transactional", recipient={"phone": number})
        )
        await h.wait_status("u-3", "sent")
        assert len(h.twilio.requests) == 2


async def _import(h: Harness, body: Any) -> Any:
    return await h.client.post("/v1/suppressions", json=body, headers=ADMIN)


async def test_an_imported_list_of_addresses_is_suppressed_all_or_none(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """Another sender's hard bounces (an ESP's list, a platform CLM replaces): suppressed from now
    on, by the same one form of each address, and a bad entry refuses the whole list, naming it."""
    async with start_notifier(sms_default_region="US") as h:
        await h.create_template(EMAIL)
        await h.create_template(SMS)
        h.sink.reject.add("gone@example.com")  # 550 5.1.1: suppressed by a bounce first
        await h.publish(_email("m-1", "c1", recipient={"email": "gone@example.com"}))
        await h.wait_status("m-1", "bounced")

        entries = [
            {"channel": "email", "address": "Old@Example.com"},
            {"channel": "sms", "address": "(555) 010-0009"},
            {"channel": "email", "address": "GONE@example.com"},
        ]
        refused = await _import(
            h, {"source": "ses", "suppressions": [*entries, {"channel": "sms", "address": "call me"}]}
        )
        assert refused.status_code == 400, refused.text
        assert [e["field"] for e in refused.json()["errors"]] == ["suppressions.3.address"]
        assert (await _lookup(h, "email", "old@example.com")).status_code == 404  # none of them

        got = await _import(h, {"source": "ses", "suppressions": entries})
        assert got.status_code == 200, got.text
        body = got.json()
        assert (body["added"], body["already_suppressed"]) == (2, 1)
        assert [(e["channel"], e["added"]) for e in body["suppressions"]] == [
            ("email", True),
            ("sms", True),
            ("email", False),
        ]
        found = (await _lookup(h, "email", "old@EXAMPLE.com")).json()
        assert (found["id"], found["reason"], found["provider"]) == (
            body["suppressions"][0]["id"],
            "imported from ses",
            "ses",
        )
        assert found["message_id"] is None
        # The first bounce is kept.
        assert (await _lookup(h, "email", "gone@example.com")).json()["reason"] == "SMTP 550 5.1.1"
        assert (await _lookup(h, "sms", "+15550100009")).json()["reason"] == "imported from ses"

        await h.publish(_email("m-2", "c2", recipient={"email": "old@example.com"}))
        await h.publish(
            request(
                "s-1", "c2", "sms", "sms-note", category="transactional", recipient={"phone": "+15550100009"}
            )
        )
        for message_id, channel in (("m-2", "email"), ("s-1", "sms")):
            statuses = await h.wait_status(message_id, "suppressed")
            assert statuses[-1]["reason"] == GONE.format(channel, "imported from ses")
        assert h.twilio.requests == []
        # Imported again: nothing added, nothing changed.
        again = (await _import(h, {"source": "manual", "suppressions": entries[:1]})).json()
        assert (again["added"], again["already_suppressed"]) == (0, 1)
        assert (await _lookup(h, "email", "old@example.com")).json()["provider"] == "ses"
        audit = (await h.client.get("/v1/audit", headers=ADMIN)).json()
        assert "example" not in str(audit).lower() and "0100009" not in str(audit)


async def test_bad_imports_are_refused_naming_the_field(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        one = [{"channel": "email", "address": "a@example.com"}]
        cases = [
            ({"source": "My ESP", "suppressions": one}, "source"),  # a name, never words
            ({"source": "ses", "suppressions": []}, "suppressions"),
            ({"source": "ses", "suppressions": one * 1001}, "suppressions"),
            (
                {"source": "ses", "suppressions": [{"channel": "webhook", "address": "x"}]},
                "suppressions.0.channel",
            ),
            (
                {"source": "ses", "suppressions": [{"channel": "email", "address": ""}]},
                "suppressions.0.address",
            ),
            (
                {"source": "ses", "suppressions": [{"channel": "email", "address": "not an address"}]},
                "suppressions.0.address",
            ),
            (
                {"source": "ses", "suppressions": [{"channel": "email", "address": "a@b.c", "note": 1}]},
                "note",
            ),
        ]
        for body, field in cases:
            got = await _import(h, body)
            assert got.status_code in (400, 422), (body, got.text)
            assert any(field in e["field"] for e in got.json()["errors"]), (field, got.json())
        assert (
            await h.client.post("/v1/suppressions", json={"source": "ses", "suppressions": one})
        ).status_code == 401
        assert (await _lookup(h, "email", "a@example.com")).status_code == 404

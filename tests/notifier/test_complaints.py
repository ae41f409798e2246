"""A spam complaint (a provider's feedback loop) stops marketing email to the address itself,
whoever CLM thinks owns it, and opts the customers whose profile email it is out of email marketing,
with an `unsubscribed` status of their latest email. Transactional email still goes."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from tests.notifier.conftest import ADMIN, Harness, request

EMAIL = {
    "id": "promo",
    "name": "Promo",
    "channel": "email",
    "default_locale": "en",
    "variants": {"en": {"subject": "Sale", "html": "<p>Sale</p>", "text": "Sale"}},
}
MARKETING = {"category": "marketing", "subscription_topic": "news"}
OPTED_OUT = "the address opted out of email marketing (a spam complaint)"


async def test_a_complaint_is_not_credited_to_a_transactional_email_and_a_second_one_emits_nothing(
    start_notifier,
) -> None:  # type: ignore[no-untyped-def]
    """The `unsubscribed` status goes to the latest marketing email that went out, once."""
    async with start_notifier() as h:
        await h.create_template(EMAIL)
        await h.create_topic("news", ["email"])
        await h.profile("c9", {"email": "cy@example.com"})
        await h.wait_contact("c9")
        await h.publish(request("m-91", "c9", "email", "promo", **MARKETING))
        await h.wait_status("m-91", "delivered")
        await h.publish(request("m-92", "c9", "email", "promo", category="transactional"))
        await h.wait_status("m-92", "delivered")
        assert (await _complain(h, ["cy@example.com"])).status_code == 200
        await h.wait_status("m-91", "unsubscribed")
        assert (await _complain(h, ["CY@example.com"])).json()["added"] == 0
        statuses = await h.statuses(idle=1.0)
        assert [s["message_id"] for s in statuses if s["status"] == "unsubscribed"] == ["m-91"]
        # The complaint rate per template: mailbox providers judge a sender by it.
        got = await h.client.get("/v1/reports/messages", params={"group_by": "category"}, headers=ADMIN)
        assert got.status_code == 200, got.text
        rows = {r["category"]: r for r in got.json()["groups"]}
        assert (rows["marketing"]["complained"], rows["marketing"]["rates"]["complaint"]) == (1, 1.0)
        assert rows["transactional"]["complained"] == 0


async def _complain(h: Harness, addresses: list[str], source: str = "ses") -> Any:
    return await h.client.post(
        "/v1/complaints", json={"source": source, "addresses": addresses}, headers=ADMIN
    )


async def test_a_complaint_stops_marketing_email_to_the_address_and_opts_its_customers_out(
    start_notifier,
) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(EMAIL)
        await h.create_topic("news", ["email"])
        await h.profile("c1", {"email": "Ann Example <Ann@Example.com>"})  # a display name, as SDKs may send
        await h.profile("c2", {"email": "bob@example.com"})
        await h.wait_contact("c1")
        await h.wait_contact("c2")
        await h.publish(request("m-1", "c1", "email", "promo", **MARKETING))
        await h.wait_status("m-1", "delivered")

        got = await _complain(h, ["ANN@example.com ", "nobody-yet@example.com", "<ann@EXAMPLE.com>"])
        assert got.status_code == 200, got.text
        body = got.json()
        assert (body["added"], body["already_opted_out"]) == (2, 0)
        # One entry per address given, in order: the same mailbox twice is one id.
        ids = [c["id"] for c in body["complaints"]]
        assert len(ids) == 3 and ids[0] == ids[2] != ids[1]
        assert [c["added"] for c in body["complaints"]] == [True, True, False]
        # The customer's latest email gets its `unsubscribed`, as an unsubscribe link would.
        statuses = await h.wait_status("m-1", "unsubscribed")
        assert statuses[-1]["reason"] == "complaint (ses): all marketing on email"
        history = (await h.client.get("/v1/customers/c1/consent-history", headers=ADMIN)).json()["history"]
        assert [(e["topic"], e["channel"], e["subscribed"], e["source"]) for e in history] == [
            ("*", "email", False, "complaint (ses)")
        ]

        # Marketing to the address stops: the profile's, another customer's override, a customer
        # whose profile gets the address only later. Transactional mail and other addresses still go.
        await h.publish(request("m-2", "c1", "email", "promo", **MARKETING))
        await h.publish(
            request("m-3", "c2", "email", "promo", recipient={"email": "Ann <ann@EXAMPLE.com>"}, **MARKETING)
        )
        await h.publish(request("m-4", "c1", "email", "promo", category="transactional"))
        await h.publish(request("m-5", "c2", "email", "promo", **MARKETING))
        await h.profile("c3", {"email": "Nobody-Yet@example.com"})
        await h.wait_contact("c3")
        await h.publish(request("m-6", "c3", "email", "promo", **MARKETING))
        statuses = await h.wait_status("m-2", "suppressed")
        assert statuses[-1]["reason"] == "unsubscribed from all email marketing"  # c1's own choice now
        for message_id in ("m-3", "m-6"):
            statuses = await h.wait_status(message_id, "suppressed")
            assert statuses[-1]["reason"] == OPTED_OUT, statuses
        for message_id in ("m-4", "m-5"):
            await h.wait_status(message_id, "delivered")

        # Kept as a salted hash, never the address; looked up and lifted by it.
        async with h.platform.unit_of_work() as uow:
            rows = (
                await uow.session.execute(sa.text("SELECT address_hash, source FROM email_address_optouts"))
            ).all()
        assert len(rows) == 2 and all("example" not in r.address_hash and r.source == "ses" for r in rows)
        found = await h.client.get("/v1/complaints", params={"address": "ann@example.com"}, headers=ADMIN)
        assert found.status_code == 200 and found.json()["source"] == "ses"

        # Again: nothing new, no second ledger entry.
        again = (await _complain(h, ["ann@example.com"], source="gmail-fbl")).json()
        assert (again["added"], again["already_opted_out"]) == (0, 1)
        history = (await h.client.get("/v1/customers/c1/consent-history", headers=ADMIN)).json()["history"]
        assert len(history) == 1

        # Lifted (reported by mistake): the address gets marketing again from customers who want it;
        # c1's own choice stays until they opt in again.
        assert (
            await h.client.delete(f"/v1/complaints/{found.json()['id']}", headers=ADMIN)
        ).status_code == 204
        assert (
            await h.client.delete(f"/v1/complaints/{found.json()['id']}", headers=ADMIN)
        ).status_code == 404
        await h.publish(
            request("m-7", "c2", "email", "promo", recipient={"email": "ann@example.com"}, **MARKETING)
        )
        await h.publish(request("m-8", "c1", "email", "promo", **MARKETING))
        await h.wait_status("m-7", "delivered")
        statuses = await h.wait_status("m-8", "suppressed")
        assert statuses[-1]["reason"] == "unsubscribed from all email marketing"
        audit = (await h.client.get("/v1/audit", headers=ADMIN)).json()
        assert "example" not in str(audit).lower()


async def test_bad_complaints_are_refused_naming_the_field(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        cases = [
            ({"source": "SES feedback", "addresses": ["a@example.com"]}, "source"),
            ({"source": "ses", "addresses": []}, "addresses"),
            ({"source": "ses", "addresses": ["a@example.com"] * 1001}, "addresses"),
            ({"source": "ses", "addresses": ["a@example.com", "not an address"]}, "addresses.1"),
            ({"source": "ses", "addresses": ["x" * 400 + "@example.com"]}, "addresses.0"),
            ({"source": "ses", "addresses": ["a@example.com"], "extra": True}, "extra"),
        ]
        for body, field in cases:
            got = await h.client.post("/v1/complaints", json=body, headers=ADMIN)
            assert got.status_code in (400, 422), (body, got.text)
            assert any(field in e["field"] for e in got.json()["errors"]), (field, got.json())
        assert (
            await h.client.post("/v1/complaints", json={"source": "ses", "addresses": ["a@b.c"]})
        ).status_code == 401
        missing = await h.client.get("/v1/complaints", params={"address": "a@example.com"}, headers=ADMIN)
        assert missing.status_code == 404


async def test_an_email_to_text_that_is_no_mailbox_fails_instead_of_going_out_unchecked(
    start_notifier,
) -> None:  # type: ignore[no-untyped-def]
    """Bounces, complaints and erasures key an address by its mailbox; the SMTP client would send to
    `bob` or `ann@` as written, past every one of those checks."""
    async with start_notifier() as h:
        await h.create_template(EMAIL)
        for n, written in enumerate(("bob", "ann@", "a@b@c.example")):
            await h.publish(
                request(
                    f"m-x{n}", "c1", "email", "promo", category="transactional", recipient={"email": written}
                )
            )
            statuses = await h.wait_status(f"m-x{n}", "failed")
            assert statuses[-1]["reason"].startswith("no email address for the customer: not a mailbox")
        assert h.sink.messages == []

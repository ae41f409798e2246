"""Erasure in the notifier: the ledger keeps no personal data, the contact is gone, later requests
for the customer (by id or by address) are suppressed `erased`, and admin changes are audited."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from shared.contracts import PRIVACY, PROFILES, PrivacyAction, PrivacyRequest, ProfileChanged
from tests.notifier.conftest import ADMIN, Harness, request
from tests.notifier.test_email import WELCOME
from tests.support import eventually, read_topic


async def ledger_request(h: Harness, message_id: str) -> dict[str, Any]:
    async with h.platform.unit_of_work() as uow:
        row = await uow.session.execute(
            text("SELECT request FROM send_ledger WHERE message_id = :m"), {"m": message_id}
        )
        value: dict[str, Any] = row.scalar_one()
        return value


async def test_erased_customer_keeps_no_personal_data_and_gets_no_more_messages(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        r = await h.client.post("/v1/templates", json=WELCOME, headers={**ADMIN, "X-CLM-Actor": "Ann"})
        assert r.status_code == 201, r.text
        await h.profile("c1", {"email": "eve@example.com", "first_name": "Eve"})
        await h.wait_contact("c1")
        await h.publish(request("m1", "c1", "email", "welcome", data={"event": {"properties": {"total": 5}}}))
        await h.wait_status("m1", "delivered")
        assert len(h.sink.messages) == 1
        # A provider's answer that quotes the address (a bounce): personal data in the ledger too.
        async with h.platform.unit_of_work() as uow:
            await uow.session.execute(
                text("UPDATE send_ledger SET reason = :r WHERE message_id = 'm1'"),
                {"r": "SMTP 550: 5.1.1 <eve@example.com>: no such user (call +1 555 010 9999) id 42"},
            )
            # Addresses suppressed by bounces of m1 and of someone else's message.
            await uow.session.execute(
                text(
                    "INSERT INTO address_suppressions (address_hash, channel, reason, message_id, "
                    "suppressed_at) VALUES ('h-eve', 'email', 'SMTP 550 5.1.1', 'm1', now()), "
                    "('h-other', 'email', 'SMTP 550 5.1.1', 'm-other', now())"
                )
            )
        await h.publish(request("m0", "c1", "email", "no-such-template"))
        await h.wait_status("m0", "failed")

        erase = PrivacyRequest(
            event_id="r1:segmenter:erase_requested",
            request_id="r1",
            action=PrivacyAction.ERASE_REQUESTED,
            customer_id="c1",
            identities=["c1", "user-1", "eve@example.com"],
            service="segmenter",
            occurred_at=datetime.now(UTC),
        )
        await h.platform.producer.publish(PRIVACY.name, "c1", erase)
        await h.platform.producer.publish(PRIVACY.name, "c1", erase)  # redelivered: one answer
        await read_topic(
            h.settings.topic(PRIVACY.name),
            until=lambda ms: any(m["value"]["action"] == "erase_completed" for m in ms),
            timeout=15,
        )
        answers = await read_topic(h.settings.topic(PRIVACY.name), idle=0.5, timeout=8)
        completed = [m["value"] for m in answers if m["value"]["action"] == "erase_completed"]
        assert [(a["service"], a["event_id"]) for a in completed] == [
            ("notifier", "r1:notifier:erase_completed")
        ]

        assert not await h.contact_known("c1")
        scrubbed = await ledger_request(h, "m1")
        assert scrubbed["recipient"] == {} and scrubbed["data"] == {}
        async with h.platform.unit_of_work() as uow:
            reason = (
                await uow.session.execute(text("SELECT reason FROM send_ledger WHERE message_id = 'm1'"))
            ).scalar_one()
            # The address stays suppressed, no longer tied to their message.
            suppressions = dict(
                (
                    await uow.session.execute(
                        text("SELECT address_hash, message_id FROM address_suppressions")
                    )
                ).all()
            )
        assert reason == "SMTP 550: 5.1.1 <[erased]>: no such user (call [erased]) id 42"
        assert suppressions == {"h-eve": None, "h-other": "m-other"}
        # Their failed message is never sent again, whatever an operator retries.
        retried = await h.client.post("/v1/messages/retry-failed", json={}, headers=ADMIN)
        assert retried.json() == {"requeued": 0, "message_ids": []}

        # Later requests: by customer id, and under another id with the erased address.
        await h.publish(request("m2", "c1", "email", "welcome"))
        await h.publish(request("m3", "c9", "email", "welcome", recipient={"email": "eve@example.com"}))
        for message_id in ("m2", "m3"):
            statuses = await h.wait_status(message_id, "suppressed")
            assert [(s["status"], s["reason"]) for s in statuses] == [("suppressed", "erased")]
        assert (await ledger_request(h, "m3"))["recipient"] == {}
        assert len(h.sink.messages) == 1

        audit = (await h.client.get("/v1/audit", headers=ADMIN)).json()["entries"]
        assert [(e["method"], e["path"], e["status"], e["actor_name"]) for e in audit] == [
            ("POST", "/v1/messages/retry-failed", 200, None),
            ("POST", "/v1/templates", 201, "Ann"),
        ]


async def test_a_request_being_queued_during_an_erasure_is_scrubbed_too(  # type: ignore[no-untyped-def]
    start_notifier, monkeypatch
) -> None:
    """The request's transaction has written its ledger row and found no tombstone, not yet
    committed, when the erasure runs: the erasure's scrub could not see the row, the request then
    committed, and the row kept the customer's address and data for good (and was sent). The
    erasure now waits for it."""
    import asyncio

    from services.notifier.store import ledger_repo
    from shared.contracts import MESSAGE_REQUESTS

    async with start_notifier() as h:
        assert (await h.client.post("/v1/templates", json=WELCOME, headers=ADMIN)).status_code == 201
        await h.profile("c2", {"email": "zoe@example.com", "first_name": "Zoe"})
        await h.wait_contact("c2")
        reached, release = asyncio.Event(), asyncio.Event()
        check = ledger_repo.insert_new_reading_tombstones  # the ledger row written, no tombstone found

        async def paused(*args: Any, **kwargs: Any) -> Any:
            result = await check(*args, **kwargs)
            if not reached.is_set():
                reached.set()
                await release.wait()
            return result

        monkeypatch.setattr(ledger_repo, "insert_new_reading_tombstones", paused)
        await h.platform.producer.publish(
            MESSAGE_REQUESTS.name, "c2", request("m9", "c2", "email", "welcome")
        )
        await asyncio.wait_for(reached.wait(), 15)
        erase = PrivacyRequest(
            event_id="r2:segmenter:erase_requested",
            request_id="r2",
            action=PrivacyAction.ERASE_REQUESTED,
            customer_id="c2",
            identities=["c2", "zoe@example.com"],
            service="segmenter",
            occurred_at=datetime.now(UTC),
        )
        await h.platform.producer.publish(PRIVACY.name, "c2", erase)
        await asyncio.sleep(1.5)  # time for the erasure to run, if nothing holds it back
        release.set()
        await read_topic(
            h.settings.topic(PRIVACY.name),
            until=lambda ms: any(m["value"]["action"] == "erase_completed" for m in ms),
            timeout=15,
        )
        scrubbed = await ledger_request(h, "m9")
        assert scrubbed["recipient"] == {} and scrubbed["data"] == {}


async def test_an_erased_customers_addresses_are_recognized_however_a_request_writes_them(
    start_notifier,
) -> None:  # type: ignore[no-untyped-def]
    """The tombstones held the addresses as the segmenter sent them (the email trait as written,
    no phone at all): a request under another customer id to `eve@example.com` or to the erased
    phone number in another form was sent."""
    async with start_notifier(sms_default_region="US") as h:
        r = await h.client.post("/v1/templates", json=WELCOME, headers=ADMIN)
        assert r.status_code == 201, r.text
        sms = {
            "id": "sms-hi",
            "name": "SMS",
            "channel": "sms",
            "default_locale": "en",
            "variants": {"en": {"body": "Hi"}},
        }
        assert (await h.client.post("/v1/templates", json=sms, headers=ADMIN)).status_code == 201
        await h.profile("c7", {"email": "Eve@Example.com", "phone": "(555) 010-9999"})
        await h.wait_contact("c7")
        # The segmenter's erasure announces the profile `erased` too, on another topic: handled
        # first, it deletes the contact before the privacy request is read, and still tombstones.
        gone = ProfileChanged(
            event_id="p-c7-erased", customer_id="c7", kind="erased", occurred_at=datetime.now(UTC)
        )
        await h.platform.producer.publish(PROFILES.name, "c7", gone)
        await eventually(lambda: _no_contact(h, "c7"))
        erase = PrivacyRequest(
            event_id="r7:segmenter:erase_requested",
            request_id="r7",
            action=PrivacyAction.ERASE_REQUESTED,
            customer_id="c7",
            identities=["c7", "Eve@Example.com"],
            service="segmenter",
            occurred_at=datetime.now(UTC),
        )
        await h.platform.producer.publish(PRIVACY.name, "c7", erase)
        await read_topic(
            h.settings.topic(PRIVACY.name),
            until=lambda ms: any(m["value"]["action"] == "erase_completed" for m in ms),
            timeout=15,
        )
        await h.publish(
            request(
                "m-e1",
                "c8",
                "email",
                "welcome",
                recipient={"email": " eve@EXAMPLE.com"},
                category="transactional",
            )
        )
        await h.publish(
            request(
                "m-e2",
                "c8",
                "sms",
                "sms-hi",
                recipient={"phone": "+1 555-010-9999"},
                category="transactional",
            )
        )
        await h.publish(
            request(
                "m-e3",
                "c8",
                "sms",
                "sms-hi",
                recipient={"phone": "+1 555-010-0000"},
                category="transactional",
            )
        )
        for message_id in ("m-e1", "m-e2"):
            statuses = await h.wait_status(message_id, "suppressed")
            assert [(s["status"], s["reason"]) for s in statuses] == [("suppressed", "erased")]
        # Only the address the channel goes to counts: a phone shared with the erased customer does
        # not stop another customer's email.
        await h.publish(
            request(
                "m-e4",
                "c9",
                "email",
                "welcome",
                recipient={"email": "carl@example.com", "phone": "+15550109999"},
                category="transactional",
                data={"traits": {"first_name": "Carl"}, "event": {"properties": {"total": 1}}},
            )
        )
        await h.wait_status("m-e3", "sent")
        await h.wait_status("m-e4", "delivered")
        assert [m.envelope_to for m in h.sink.messages] == [["carl@example.com"]]
        assert [r.form()["To"] for r in h.twilio.requests] == ["+15550100000"]


async def _no_contact(h: Harness, customer_id: str) -> bool:
    return not await h.contact_known(customer_id)


async def test_an_address_written_with_a_no_break_space_around_it_is_erased_as_its_mailbox(
    start_notifier,
) -> None:  # type: ignore[no-untyped-def]
    """A profile email pasted with a no-break space (`Eve@Example.com` + U+00A0) was no mailbox, so
    its erasure tombstoned no `eve@example.com`: a request to it under another customer id went out.
    Whitespace around an address (a no-break space included) is the writing; inside, it is none."""
    async with start_notifier() as h:
        r = await h.client.post("/v1/templates", json=WELCOME, headers=ADMIN)
        assert r.status_code == 201, r.text
        await h.profile("c9", {"email": "Eve@Example.com\u00a0"})
        await h.wait_contact("c9")
        erase = PrivacyRequest(
            event_id="r9:segmenter:erase_requested",
            request_id="r9",
            action=PrivacyAction.ERASE_REQUESTED,
            customer_id="c9",
            identities=["c9"],  # the address only from the notifier's contact
            service="segmenter",
            occurred_at=datetime.now(UTC),
        )
        await h.platform.producer.publish(PRIVACY.name, "c9", erase)
        await read_topic(
            h.settings.topic(PRIVACY.name),
            until=lambda ms: any(
                m["value"]["action"] == "erase_completed" and m["value"]["request_id"] == "r9" for m in ms
            ),
            timeout=15,
        )
        await h.publish(
            request(
                "m-n1",
                "c10",
                "email",
                "welcome",
                recipient={"email": "eve@example.com"},
                category="transactional",
            )
        )
        statuses = await h.wait_status("m-n1", "suppressed")
        assert [(s["status"], s["reason"]) for s in statuses] == [("suppressed", "erased")]

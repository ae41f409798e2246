"""A provider's delivery report that comes while an erasure holds (or waits for) the erasure gate is
kept and applied once the erasure is done. Before, it was answered 503, which Twilio does not retry
by default: the report was lost (the message never `delivered`/`bounced`, a gone number never
suppressed). Kept, it names no one: the provider's message id, the outcome, its codes, the gone number
as a salted hash. For a customer erased meanwhile it writes nothing and is deleted; a repeat changes
nothing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from services.notifier.api.inbound import twilio_signature
from services.notifier.service import DEFERRED_REPORTS_SETTLED, REPORTS_DEFERRED
from shared.clock import ManualClock
from shared.contracts import MessageStatusKind
from shared.privacy import add_tombstones, erasure_gate
from tests.notifier.conftest import ADMIN, Harness, request
from tests.notifier.test_links_after_erasure import erase, waiting_for_the_gate
from tests.support import eventually

STATUS_URL = "http://testserver/v1/inbound/twilio/status"


async def sent_sms(h: Harness, message_id: str, customer_id: str, phone: str) -> str:
    """A transactional SMS to `phone`, sent; its Twilio message id."""
    if (await h.client.get("/v1/templates/note", headers=ADMIN)).status_code == 404:
        await h.create_template(
            {
                "id": "note",
                "name": "Note",
                "channel": "sms",
                "default_locale": "en",
                "variants": {"en": {"body": "Hi"}},
            }
        )
    await h.publish(
        request(message_id, customer_id, "sms", "note", category="transactional", recipient={"phone": phone})
    )
    await h.wait_status(message_id, "sent")
    sid = (await h.client.get(f"/v1/messages/{message_id}", headers=ADMIN)).json()["provider_message_id"]
    assert sid
    return str(sid)


async def report(h: Harness, form: dict[str, str]) -> int:
    """Twilio's signed status callback; the answer's status code. Called while the test holds the
    erasure gate, its answering at all proves it did not wait for the gate: the timeout only stops a
    test that would hang (generous: a loaded host may take seconds for any request)."""
    signature = twilio_signature(h.settings.twilio_auth_token.get_secret_value(), STATUS_URL, form)
    answered = await asyncio.wait_for(
        h.client.post("/v1/inbound/twilio/status", data=form, headers={"X-Twilio-Signature": signature}), 30
    )
    return answered.status_code


async def kept(h: Harness) -> list[tuple[Any, ...]]:
    async with h.platform.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT provider_message_id, kind, reason, gone_address_hash, gone_reason "
                "FROM deferred_provider_reports ORDER BY id"
            )
        )
        return [tuple(r) for r in rows]


async def reported(h: Harness, message_id: str) -> list[str]:
    async with h.platform.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT detail FROM engagements WHERE message_id = :m AND kind = 'provider_report'"),
            {"m": message_id},
        )
        return [r[0] for r in rows]


async def settle(h: Harness) -> None:
    """Until the app's own loop (`run_deferred_reports`, woken by the report kept and waiting for the
    gate) has settled every kept report."""
    await eventually(lambda: _none_kept(h), timeout=20)


async def _none_kept(h: Harness) -> bool:
    return await kept(h) == []


def at(status: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(status["occurred_at"]).replace("Z", "+00:00"))


async def test_a_report_during_an_erasure_is_answered_at_once_and_applied_after_it(start_notifier) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        sid = await sent_sms(h, "m-d1", "xena", "+15550100021")
        form = {"MessageSid": sid, "MessageStatus": "delivered", "To": "+15550100021"}
        came_at = clock.now()
        deferred = REPORTS_DEFERRED._value.get()
        async with h.platform.unit_of_work() as erasing:
            await erasure_gate(erasing.session, exclusive=True)  # an erasure (of someone else) holds it
            # Answered at once, a 2xx (Twilio would not retry a 5xx), however many come: none waits
            # for the gate with a pooled connection held. Twilio sending it again is the same report:
            # not kept again once one is (sent together, a few copies may be: applied once below).
            answers = await asyncio.gather(*(report(h, form) for _ in range(10)))
            assert answers == [204] * 10
            copies = await kept(h)
            assert set(copies) == {(sid, "delivered", None, None, None)}
            assert await report(h, form) == 204
            assert len(await kept(h)) == len(copies)
            # Counted once per row kept, not per copy answered.
            assert REPORTS_DEFERRED._value.get() == deferred + len(copies)
            assert await reported(h, "m-d1") == []
            clock.advance(timedelta(minutes=5))  # the erasure takes a while
        await settle(h)

        statuses = await h.wait_status("m-d1", "delivered")
        delivered = [s for s in statuses if s["status"] == "delivered"]
        assert len(delivered) == 1
        assert at(delivered[0]) == came_at  # when Twilio reported it, not when it was applied
        assert await reported(h, "m-d1") == ["delivered"]
        values = await h.statuses(idle=1.0)
        assert [v["status"] for v in values if v["message_id"] == "m-d1"] == ["queued", "sent", "delivered"]


async def test_a_report_kept_for_a_customer_erased_meanwhile_writes_nothing(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """Not even the gone number's suppression (it would name the erased customer's message)."""
    async with start_notifier() as h:
        sid = await sent_sms(h, "m-d2", "una", "+15550100022")
        form = {"MessageSid": sid, "MessageStatus": "undelivered", "ErrorCode": "30005", "To": "+15550100022"}
        before = DEFERRED_REPORTS_SETTLED.labels("erased")._value.get()
        async with h.platform.unit_of_work() as erasing:
            await erasure_gate(erasing.session, exclusive=True)
            assert await report(h, form) == 204
            [(pmid, kind, reason, gone_hash, gone_reason)] = await kept(h)
            # Only what applying it needs: no number, only its suppression's salted hash.
            assert (pmid, kind, reason, gone_reason) == (
                sid,
                "bounced",
                "twilio undelivered (error 30005)",
                "twilio error 30005",
            )
            assert gone_hash and "5550100022" not in gone_hash
            # The erasure of its customer commits after the report was kept.
            salt = h.settings.privacy_salt.get_secret_value()
            await add_tombstones(erasing.session, salt, ["una"], "erase-una", datetime.now(UTC))
        await settle(h)

        assert DEFERRED_REPORTS_SETTLED.labels("erased")._value.get() >= before + 1
        assert await reported(h, "m-d2") == []
        gone = await h.client.get(
            "/v1/suppressions", params={"channel": "sms", "address": "+15550100022"}, headers=ADMIN
        )
        assert gone.status_code == 404
        values = await h.statuses(idle=1.0)
        assert [v["status"] for v in values if v["message_id"] == "m-d2"] == ["queued", "sent"]


async def test_the_erasure_deletes_reports_kept_on_its_customers_messages(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """The real erasure (clm.privacy.v1), waiting for a batch, when the report comes: the report is
    kept, and the erasure deletes it with the customer's other data."""
    async with start_notifier() as h:
        sid = await sent_sms(h, "m-d3", "vera", "+15550100023")
        form = {"MessageSid": sid, "MessageStatus": "delivered", "To": "+15550100023"}
        settled = [DEFERRED_REPORTS_SETTLED.labels(o)._value.get() for o in ("erased", "applied")]
        async with h.platform.unit_of_work() as batch:
            await erasure_gate(batch.session, exclusive=False)
            erasing = asyncio.create_task(erase(h, "vera", ["vera"]))
            await eventually(lambda: waiting_for_the_gate(h), timeout=15)
            assert await report(h, form) == 204
            assert await kept(h) == [(sid, "delivered", None, None, None)]
        await asyncio.wait_for(erasing, 20)
        # The loop, woken by the report, queued for the gate behind the erasure: it finds nothing.
        assert await kept(h) == []
        assert await h.app.state.notifier.apply_deferred_reports() == 0
        assert [DEFERRED_REPORTS_SETTLED.labels(o)._value.get() for o in ("erased", "applied")] == settled
        assert await reported(h, "m-d3") == []
        values = await h.statuses(idle=1.0)
        assert [v["status"] for v in values if v["message_id"] == "m-d3"] == ["queued", "sent"]


async def test_a_repeated_report_changes_nothing_whether_applied_at_once_or_kept(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        sid = await sent_sms(h, "m-d4", "yves", "+15550100024")
        form = {"MessageSid": sid, "MessageStatus": "undelivered", "ErrorCode": "30005", "To": "+15550100024"}
        notifier = h.app.state.notifier
        before = DEFERRED_REPORTS_SETTLED.labels("duplicate")._value.get()
        assert await report(h, form) == 204  # the gate free: applied at once
        await h.wait_status("m-d4", "bounced")
        assert await report(h, form) == 204
        assert (
            await notifier.record_provider_report(
                sid,
                MessageStatusKind.BOUNCED,
                "twilio undelivered (error 30005)",
                gone_address=("+15550100024", "twilio error 30005"),
            )
            == "duplicate"
        )
        # Again during an erasure: kept, then found applied before.
        async with h.platform.unit_of_work() as erasing:
            await erasure_gate(erasing.session, exclusive=True)
            assert await report(h, form) == 204
            assert len(await kept(h)) == 1
        await settle(h)

        assert DEFERRED_REPORTS_SETTLED.labels("duplicate")._value.get() >= before + 1
        assert await reported(h, "m-d4") == ["bounced"]
        suppressed = await h.client.get(
            "/v1/suppressions", params={"channel": "sms", "address": "+15550100024"}, headers=ADMIN
        )
        assert suppressed.status_code == 200 and suppressed.json()["message_id"] == "m-d4"
        values = await h.statuses(idle=1.0)
        assert [v["status"] for v in values if v["message_id"] == "m-d4"] == ["queued", "sent", "bounced"]

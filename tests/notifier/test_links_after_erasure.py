"""A message outlives its customer's erasure in their mailbox: its unsubscribe link, one-click or the
preference page, used afterwards answers as ever and writes nothing (it recreated the preferences
and consent ledger entries the erasure deleted, and emitted `unsubscribed` statuses for the erased
id); so do its open pixel, its tracked links and its provider's late delivery report. A link used
while an erasure runs is ordered against it by the erasure gate."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from shared.contracts import PRIVACY, PrivacyAction, PrivacyRequest
from shared.privacy import add_tombstones, erasure_gate
from tests.notifier.conftest import ADMIN, Harness
from tests.notifier.test_email import setup
from tests.notifier.test_preference_page import FORM, sent_email
from tests.support import eventually, read_topic

NOTHING: dict[str, list[Any]] = {"preferences": [], "consent_ledger": [], "engagements": []}


async def erase(h: Harness, customer_id: str, identities: list[str]) -> None:
    request_id = f"erase-{customer_id}"
    await h.platform.producer.publish(
        PRIVACY.name,
        customer_id,
        PrivacyRequest(
            event_id=f"{request_id}:segmenter:erase_requested",
            request_id=request_id,
            action=PrivacyAction.ERASE_REQUESTED,
            customer_id=customer_id,
            identities=identities,
            service="segmenter",
            occurred_at=datetime.now(UTC),
        ),
    )
    await read_topic(
        h.settings.topic(PRIVACY.name),
        until=lambda ms: any(
            m["value"]["action"] == "erase_completed" and m["value"]["request_id"] == request_id for m in ms
        ),
        timeout=15,
    )


async def rows_of(h: Harness, ids: list[str], message_ids: list[str]) -> dict[str, list[Any]]:
    async with h.platform.unit_of_work() as uow:
        found = {}
        for table in ("preferences", "consent_ledger"):
            found[table] = list(
                (
                    await uow.session.execute(
                        text(f"SELECT topic, channel, source FROM {table} WHERE customer_id = ANY(:ids)"),
                        {"ids": ids},
                    )
                ).all()
            )
        found["engagements"] = list(
            (
                await uow.session.execute(
                    text("SELECT message_id, kind FROM engagements WHERE message_id = ANY(:m)"),
                    {"m": message_ids},
                )
            ).all()
        )
    return found


async def waiting_for_the_gate(h: Harness) -> bool:
    """Whether a transaction waits for this schema's erasure gate (`shared.privacy.erasure_gate`)."""
    async with h.platform.engine.connect() as conn:
        found = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND objid::bigint = (hashtext('clm.erasure.' || current_schema())::bigint & 4294967295)"
            )
        )
    return bool(found)


async def test_unsubscribe_links_used_after_the_erasure_answer_and_write_nothing(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await setup(h)  # `newsletter` on email, subscribed by default
        page = await sent_email(h, "m-e1", "eve")
        kept = await sent_email(h, "m-k1", "kim")  # someone not erased: the control
        # A link signed for another identifier of the customer (a message requested under a userId).
        alias_page = "/u/" + h.app.state.notifier.links.unsubscribe_token("user-eve", "email", None, "m-e1")
        await erase(h, "eve", ["eve", "user-eve", "eve@example.com"])

        # Answered as for anyone: the same pages, a 2xx for the mailbox provider's one-click (RFC 8058).
        one_click = await h.client.post(page)
        assert one_click.status_code == 200 and "You are unsubscribed" in one_click.text
        shown = await h.client.get(page)
        assert shown.status_code == 200 and "Newsletter" in shown.text
        saved = await h.client.post(page + "/preferences", content=b"", headers=FORM)
        assert saved.status_code == 200 and "Preferences saved" in saved.text
        for path in (page + "/all", alias_page, alias_page + "/all"):
            answered = await h.client.post(path)
            assert answered.status_code == 200 and "You are unsubscribed" in answered.text, path

        control = await h.client.post(kept)
        assert control.status_code == 200
        await h.wait_status("m-k1", "unsubscribed")
        values = await h.statuses(idle=1.0)
        assert [v["status"] for v in values if v["message_id"] == "m-e1"] == ["queued", "sent", "delivered"]
        assert await rows_of(h, ["eve", "user-eve"], ["m-e1"]) == NOTHING
        history = await h.client.get("/v1/customers/eve/consent-history", headers=ADMIN)
        assert history.json()["history"] == []
        # The control's link did write: the links work, only the erased customer's write nothing.
        kim = await rows_of(h, ["kim"], ["m-k1"])
        assert kim["preferences"] == [("newsletter", "email", "one_click")]
        assert kim["engagements"] == [("m-k1", "unsubscribed")]


async def test_a_link_used_while_the_erasure_commits_waits_for_it(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """The erasure holds its gate from before it reads anything to its commit: a one-click arriving
    meanwhile waits, then finds the tombstones (before, it could write between the erasure's delete
    and its commit, or right after the delete, and its rows outlived the erasure)."""
    async with start_notifier() as h:
        await setup(h)
        page = await sent_email(h, "m-e2", "ivy")
        salt = h.settings.privacy_salt.get_secret_value()
        async with h.platform.unit_of_work() as erasure:
            await erasure_gate(erasure.session, exclusive=True)
            clicked = asyncio.create_task(h.client.post(page))
            await eventually(lambda: waiting_for_the_gate(h))
            assert not clicked.done()
            await add_tombstones(erasure.session, salt, ["ivy"], "erase-ivy", datetime.now(UTC))
        answered = await asyncio.wait_for(clicked, 10)
        assert answered.status_code == 200
        assert await rows_of(h, ["ivy"], ["m-e2"]) == {
            "preferences": [],
            "consent_ledger": [],
            "engagements": [],
        }


async def test_opens_clicks_and_delivery_reports_after_the_erasure_record_nothing(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """They recreated the engagements the erasure deleted and emitted `opened`/`clicked`/`bounced`
    statuses under the erased id."""
    from services.notifier.api.inbound import twilio_signature
    from tests.notifier.conftest import request

    async with start_notifier() as h:
        await setup(h)
        await h.create_template(
            {
                "id": "note",
                "name": "Note",
                "channel": "sms",
                "default_locale": "en",
                "variants": {"en": {"body": "Hi"}},
            }
        )
        await sent_email(h, "m-e3", "una")
        await h.publish(
            request(
                "m-e4", "una", "sms", "note", category="transactional", recipient={"phone": "+15550100009"}
            )
        )
        await h.wait_status("m-e4", "sent")
        sid = (await h.client.get("/v1/messages/m-e4", headers=ADMIN)).json()["provider_message_id"]
        await erase(h, "una", ["una"])

        links = h.app.state.notifier.links
        pixel = await h.client.get(links.open_pixel_url("m-e3").removeprefix("http://testserver"))
        assert pixel.status_code == 200 and pixel.headers["content-type"] == "image/gif"
        target = "https://shop.example.com/sale"
        clicked = await h.client.get(links.click_url("m-e3", target).removeprefix("http://testserver"))
        assert (clicked.status_code, clicked.headers["location"]) == (302, target)
        report = {
            "MessageSid": sid,
            "MessageStatus": "undelivered",
            "ErrorCode": "30005",
            "To": "+15550100009",
        }
        url = "http://testserver/v1/inbound/twilio/status"
        signature = twilio_signature(h.settings.twilio_auth_token.get_secret_value(), url, report)
        reported = await h.client.post(
            "/v1/inbound/twilio/status", data=report, headers={"X-Twilio-Signature": signature}
        )
        assert reported.status_code == 204

        await sent_email(h, "m-k3", "kai")  # the control: someone not erased
        assert (
            await h.client.get(links.open_pixel_url("m-k3").removeprefix("http://testserver"))
        ).status_code == 200
        await h.wait_status("m-k3", "opened")
        values = await h.statuses(idle=1.0)
        assert [v["status"] for v in values if v["message_id"] == "m-e3"] == ["queued", "sent", "delivered"]
        assert [v["status"] for v in values if v["message_id"] == "m-e4"] == ["queued", "sent"]
        assert (await rows_of(h, ["una"], ["m-e3", "m-e4"]))["engagements"] == []
        gone = await h.client.get(
            "/v1/suppressions", params={"channel": "sms", "address": "+15550100009"}, headers=ADMIN
        )
        assert gone.status_code == 404


async def test_opens_clicks_and_reports_answer_at_once_during_an_erasure(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """A new shared request of the gate queues behind a waiting exclusive one: taken blocking, every
    pixel, click and delivery report, for any customer, waited for the erasure (and for the batches
    ahead of it) with a pooled connection held. They try the gate instead: not free at once, the
    pixel and the click record nothing (the image and the redirect as ever), and the report is kept
    and applied once the erasure is done (`test_deferred_reports`): answered 204 at once either way."""
    from services.notifier.api.inbound import twilio_signature
    from tests.notifier.conftest import request

    async with start_notifier() as h:
        await setup(h)
        await h.create_template(
            {
                "id": "note",
                "name": "Note",
                "channel": "sms",
                "default_locale": "en",
                "variants": {"en": {"body": "Hi"}},
            }
        )
        await sent_email(h, "m-x1", "xena")  # nobody erases her
        await h.publish(
            request(
                "m-x2", "xena", "sms", "note", category="transactional", recipient={"phone": "+15550100010"}
            )
        )
        await h.wait_status("m-x2", "sent")
        sid = (await h.client.get("/v1/messages/m-x2", headers=ADMIN)).json()["provider_message_id"]
        links = h.app.state.notifier.links
        pixel_url = links.open_pixel_url("m-x1").removeprefix("http://testserver")
        target = "https://shop.example.com/sale"
        click_url = links.click_url("m-x1", target).removeprefix("http://testserver")
        report = {"MessageSid": sid, "MessageStatus": "delivered", "To": "+15550100010"}
        signature = twilio_signature(
            h.settings.twilio_auth_token.get_secret_value(),
            "http://testserver/v1/inbound/twilio/status",
            report,
        )

        async def telemetry() -> tuple[int, int, int]:
            pixel, clicked, reported = await asyncio.wait_for(
                asyncio.gather(
                    h.client.get(pixel_url),
                    h.client.get(click_url),
                    h.client.post(
                        "/v1/inbound/twilio/status", data=report, headers={"X-Twilio-Signature": signature}
                    ),
                ),
                # Called while the test holds the gate: answered at all, none waited for it. Generous,
                # only to stop a hang (a loaded host may take seconds for any request).
                30,
            )
            assert pixel.headers["content-type"] == "image/gif"
            assert clicked.headers["location"] == target
            return pixel.status_code, clicked.status_code, reported.status_code

        async def kept() -> int:
            async with h.platform.engine.connect() as conn:
                return int(await conn.scalar(text("SELECT count(*) FROM deferred_provider_reports")) or 0)

        # A batch holds the gate shared and an erasure waits for it (the review's case) ...
        async with h.platform.unit_of_work() as batch:
            await erasure_gate(batch.session, exclusive=False)

            async def erasure() -> None:
                async with h.platform.unit_of_work() as e:
                    await erasure_gate(e.session, exclusive=True)
                    await asyncio.sleep(0.5)

            erasing = asyncio.create_task(erasure())
            await eventually(lambda: waiting_for_the_gate(h))
            assert await telemetry() == (200, 302, 204)
            assert await kept() == 1
        await asyncio.wait_for(erasing, 10)
        # ... or the erasure holds it.
        async with h.platform.unit_of_work() as erasing_now:
            await erasure_gate(erasing_now.session, exclusive=True)
            assert await telemetry() == (200, 302, 204)
            assert (await rows_of(h, ["xena"], ["m-x1"]))["engagements"] == []
        # The report kept is applied once the erasure is done; the pixel and the click were not kept.
        await h.wait_status("m-x2", "delivered")
        await eventually(lambda: _equals(kept(), 0))
        assert (await rows_of(h, ["xena"], ["m-x1"]))["engagements"] == []

        # The gate free again: recorded as ever.
        assert await telemetry() == (200, 302, 204)
        await h.wait_status("m-x1", "opened")
        await h.wait_status("m-x1", "clicked")
        assert await kept() == 0
        values = await h.statuses(idle=1.0)
        assert [v["status"] for v in values if v["message_id"] == "m-x2"].count("delivered") == 1


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)

"""SMS, push, webhook and in-app through their providers: retries on a durable schedule, no retry on
4xx, dead-lettering when attempts run out, failover, webhook signatures and the SSRF guard."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import text

from services.notifier.api.inbound import twilio_signature
from services.notifier.domain import standard_webhooks
from services.notifier.store import ledger_repo
from shared.clock import ManualClock
from shared.contracts import MESSAGE_REQUESTS, Headers, MessageRequested
from tests.notifier.conftest import ADMIN, Harness, request
from tests.notifier.provider_servers import error
from tests.support import eventually, read_topic

SMS = {
    "id": "sms-hello",
    "name": "SMS",
    "channel": "sms",
    "default_locale": "en",
    "variants": {"en": {"body": "Hi {{ traits.first_name | default: 'there' }}, code {{ event.code }}"}},
}
PUSH = {
    "id": "push-hello",
    "name": "Push",
    "channel": "push",
    "default_locale": "en",
    "variants": {"en": {"title": "Hello {{ traits.first_name }}", "body": "Your order shipped"}},
}
HOOK = {
    "id": "hook",
    "name": "Hook",
    "channel": "webhook",
    "default_locale": "en",
    "variants": {
        "en": {"payload": '{"customer": {{ customer.id | json }}, "plan": {{ traits.plan | json }}}'}
    },
}


def sms_request(message_id: str, phone: str, code: str) -> MessageRequested:
    """A transactional SMS for customer c1 with the `sms-hello` template."""
    return request(
        message_id,
        "c1",
        "sms",
        "sms-hello",
        category="transactional",
        recipient={"phone": phone},
        data={"event": {"code": code}},
    )


async def ledger(h: Harness, message_id: str) -> dict[str, object]:
    response = await h.client.get(f"/v1/messages/{message_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_provider_500_then_200_delivers_once_after_a_scheduled_retry(start_notifier) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        await h.create_template(SMS)
        h.twilio.fail_next(error(500, "upstream"))
        await h.publish(sms_request("m-sms-1", "+15551230001", "4711"))
        # First attempt fails; the retry waits in the ledger (backoff up to 60 s), not in the partition.
        state = await eventually(lambda: h.ledger_entry("m-sms-1", "pending", attempts=1))
        assert state["next_attempt_at"] is not None
        assert len(h.twilio.requests) == 1
        clock.advance(timedelta(minutes=2))
        h.app.state.notifier.worker.wake()
        statuses = await h.wait_status("m-sms-1", "sent")
        assert [s["status"] for s in statuses] == ["queued", "sent"]
        assert len(h.twilio.requests) == 2
        sent = h.twilio.requests[-1]
        assert sent.path == f"/2010-04-01/Accounts/{h.settings.twilio_account_sid}/Messages.json"
        assert sent.form() == {
            "To": "+15551230001",
            "From": h.settings.twilio_from_number,
            "Body": "Hi there, code 4711",
            "StatusCallback": "http://testserver/v1/inbound/twilio/status",
        }
        assert sent.headers["authorization"].startswith("Basic ")
        assert sent.headers["i-twilio-idempotency-token"] == "m-sms-1"
        assert (await ledger(h, "m-sms-1"))["attempts"] == 2

        # Twilio's status callback (signed) reports the handset delivery: `delivered`, once.
        sid = (await ledger(h, "m-sms-1"))["provider_message_id"]
        report = {
            "MessageSid": str(sid),
            "MessageStatus": "delivered",
            "AccountSid": h.settings.twilio_account_sid,
        }
        signature = twilio_signature(
            h.settings.twilio_auth_token.get_secret_value(),
            "http://testserver/v1/inbound/twilio/status",
            report,
        )
        for _ in range(2):
            got = await h.client.post(
                "/v1/inbound/twilio/status", data=report, headers={"X-Twilio-Signature": signature}
            )
            assert got.status_code == 204
        statuses = await h.wait_status("m-sms-1", "delivered")
        await h.statuses(idle=0.5, timeout=3)
        assert [s["status"] for s in statuses].count("delivered") == 1


async def test_provider_400_fails_without_retry(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(SMS)
        h.twilio.fail_next(error(400, "The 'To' number is not a valid phone number."))
        await h.publish(sms_request("m-sms-400", "+15550100400", "1"))
        statuses = await h.wait_status("m-sms-400", "failed")
        assert "HTTP 400" in statuses[-1]["reason"] and "not a valid phone number" in statuses[-1]["reason"]
        await h.statuses(idle=1.0, timeout=3)
        assert len(h.twilio.requests) == 1
        assert (await ledger(h, "m-sms-400"))["attempts"] == 1


async def test_exhausted_retries_go_to_the_dead_letter_topic(start_notifier) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    async with start_notifier(clock=clock, send_max_attempts=2) as h:
        await h.create_template(SMS)
        h.twilio.fail_next(error(503), error(429))
        await h.publish(sms_request("m-sms-dlq", "+15551230002", "2"))
        await eventually(lambda: h.ledger_entry("m-sms-dlq", "pending", attempts=1))
        clock.advance(timedelta(minutes=5))
        h.app.state.notifier.worker.wake()
        statuses = await h.wait_status("m-sms-dlq", "failed")
        assert "gave up after 2 attempts" in statuses[-1]["reason"] and "HTTP 429" in statuses[-1]["reason"]
        dlq = await read_topic(h.settings.topic(MESSAGE_REQUESTS.dead_letter), count=1, timeout=10)
        assert dlq[0]["value"]["message_id"] == "m-sms-dlq"
        assert "gave up" in dlq[0]["headers"][Headers.DLQ_ERROR]
        assert len(h.twilio.requests) == 2
        # Counted in the dead-letter metric operators alert on, as the consumers count theirs.
        metrics = (await h.client.get("/metrics")).text
        topic = h.settings.topic(MESSAGE_REQUESTS.name)
        assert f'clm_dlq_messages_total{{service="notifier",topic="{topic}"}} 1.0' in metrics


async def test_failover_to_the_secondary_push_provider(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(PUSH)
        h.fcm.fail_next(error(503, "unavailable"))
        await h.publish(
            request(
                "m-push-1",
                "c1",
                "push",
                "push-hello",
                category="transactional",
                recipient={"push_token": "tok-1"},
                data={"traits": {"first_name": "Ada"}},
            )
        )
        statuses = await h.wait_status("m-push-1", "sent")
        assert statuses[-1]["provider"] == "fcm_backup"
        assert len(h.fcm.requests) == 1 and len(h.fcm_backup.requests) == 1
        sent = h.fcm_backup.requests[0]
        assert sent.path == "/v1/projects/clm-dev/messages:send"
        assert sent.headers["authorization"] == "Bearer backup-token"
        assert sent.json() == {
            "message": {
                "token": "tok-1",
                "notification": {"title": "Hello Ada", "body": "Your order shipped"},
                "data": {"clm_message_id": "m-push-1"},
            }
        }
        # After 3 failures the primary's circuit opens: the backup is used without asking the primary.
        h.fcm.fail_next(error(503), error(503))
        for i in range(2, 6):
            await h.publish(
                request(
                    f"m-push-{i}",
                    "c1",
                    "push",
                    "push-hello",
                    category="transactional",
                    recipient={"push_token": "tok-1"},
                    data={"traits": {"first_name": "Ada"}},
                )
            )
            await h.wait_status(f"m-push-{i}", "sent")
        assert len(h.fcm.requests) == 3
        assert len(h.fcm_backup.requests) == 5


async def test_webhook_is_signed_per_standard_webhooks(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(HOOK)
        url = f"{h.webhook.url}/hooks/clm?x=1"
        await h.publish(
            request(
                "m-hook-1",
                "c9",
                "webhook",
                "hook",
                category="transactional",
                recipient={"webhook_url": url},
                data={"traits": {"plan": 'pro "max"'}},
            )
        )
        await h.wait_status("m-hook-1", "delivered")
        got = h.webhook.requests[0]
        assert got.path == "/hooks/clm?x=1"
        assert got.json() == {"customer": "c9", "plan": 'pro "max"'}
        assert got.headers["webhook-id"] == "m-hook-1"
        secret = h.settings.webhook_secret.get_secret_value()
        assert standard_webhooks.verify(secret, got.headers, got.body, now=int(time.time()))
        assert not standard_webhooks.verify(secret, got.headers, got.body + b" ", now=int(time.time()))


async def test_private_address_webhook_is_refused_without_the_allow_list(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier(webhook_allow_list=[]) as h:
        await h.create_template(HOOK)
        for i, url in enumerate(
            [
                f"{h.webhook.url}/hook",
                "http://169.254.169.254/latest/meta-data",
                "http://10.1.2.3/x",
                "file:///etc/passwd",
            ]
        ):
            await h.publish(
                request(
                    f"m-ssrf-{i}",
                    "c9",
                    "webhook",
                    "hook",
                    category="transactional",
                    recipient={"webhook_url": url},
                    data={"traits": {"plan": "pro"}},
                )
            )
        for i, reason in enumerate(["loopback", "link-local", "private", "scheme"]):
            statuses = await h.wait_status(f"m-ssrf-{i}", "failed")
            assert "webhook refused" in statuses[-1]["reason"] and reason in statuses[-1]["reason"]
        assert h.webhook.requests == []


async def test_redirect_to_a_private_address_is_refused(start_notifier) -> None:  # type: ignore[no-untyped-def]
    # The receiver is allow-listed by name; its redirect to the metadata address is checked again.
    async with start_notifier(webhook_allow_list=["localhost"]) as h:
        await h.create_template(HOOK)
        h.webhook.fail_next((307, b"", {"Location": "http://169.254.169.254/latest/meta-data"}))
        await h.publish(
            request(
                "m-redir",
                "c9",
                "webhook",
                "hook",
                category="transactional",
                recipient={"webhook_url": f"http://localhost:{h.webhook.port}/h"},
                data={"traits": {"plan": "pro"}},
            )
        )
        statuses = await h.wait_status("m-redir", "failed")
        assert "169.254.169.254" in statuses[-1]["reason"]
        assert len(h.webhook.requests) == 1


async def test_template_error_fails_the_message_with_the_reason(start_notifier) -> None:  # type: ignore[no-untyped-def]
    # A known customer whose profile lacks the variable: failed at once (an unseen customer's send
    # waits for the profile instead, tests/notifier/test_api.py).
    async with start_notifier() as h:
        await h.create_template(PUSH)
        await h.profile("c1", {"email": "c1@example.com"})
        await h.wait_contact("c1")
        await h.publish(
            request(
                "m-tpl-err",
                "c1",
                "push",
                "push-hello",
                category="transactional",
                recipient={"push_token": "tok-1"},
                data={"traits": {}},
            )
        )
        statuses = await h.wait_status("m-tpl-err", "failed")
        assert (
            "template error" in statuses[-1]["reason"] and "first_name is undefined" in statuses[-1]["reason"]
        )
        assert h.fcm.requests == [] and h.fcm_backup.requests == []


async def test_a_claim_left_by_a_dead_process_is_never_resent(start_notifier) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    async with start_notifier(clock=clock) as h:
        await h.create_template(SMS)
        notifier = h.app.state.notifier
        req = sms_request("m-crash", "+15551230003", "3")
        # What a process does right before calling the provider, then dies: the claim and the move to
        # `sending` are committed. (Due an hour from now, so the live delivery loops leave the row to
        # this simulated process.)
        later = clock.now() + timedelta(hours=1)
        async with h.platform.unit_of_work() as uow:
            await ledger_repo.insert_new(uow.session, [req], later)
        async with h.platform.unit_of_work() as uow:
            claimed = await ledger_repo.claim_due(uow.session, later, 10, "dead-process")
        assert [e.message_id for e in claimed] == ["m-crash"]
        async with h.platform.unit_of_work() as uow:
            assert await ledger_repo.mark_sending(uow.session, [("m-crash", "dead-process")], later) == {
                "m-crash"
            }
        await h.publish(req)  # a redelivery of the request finds the ledger row
        await h.statuses(idle=1.0, timeout=4)
        assert (await ledger(h, "m-crash"))["state"] == "sending"
        clock.advance(timedelta(hours=1, seconds=h.settings.sending_stale_after_s + 1))
        await notifier.worker.resolve_stale(every_s=0)
        statuses = await h.wait_status("m-crash", "failed")
        assert "outcome unknown" in statuses[-1]["reason"]
        assert (await ledger(h, "m-crash"))["state"] == "unknown"
        assert h.twilio.requests == []


async def test_provider_rate_limit_spreads_sends(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier(provider_rate_per_s=20.0, provider_burst=1) as h:
        await h.create_template(SMS)
        for i in range(8):
            await h.publish(sms_request(f"m-rate-{i}", "+15551230004", str(i)))
        await eventually(lambda: len(h.twilio.requests) >= 8, timeout=15)
        times = sorted(r.received_at for r in h.twilio.requests)
        # 8 sends at 20/s with a burst of 1: at least 7 intervals of 50 ms.
        assert times[-1] - times[0] >= 0.3


UNKNOWN, ERASED = "m-retry-2", "m-retry-3"


async def test_failed_messages_are_sent_again_on_request_never_unknown_ones(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """After an outage outlasted the retries (here: a 400 the provider no longer answers), an
    operator sends the failed messages again; an `unknown` one (its call may have gone through) and
    an erased customer's stay as they are."""
    async with start_notifier() as h:
        await h.create_template(SMS)
        h.twilio.fail_next(*[error(400, "temporarily refused")] * 3)
        for message_id in ("m-retry-1", "m-retry-2", "m-retry-3"):
            await h.publish(sms_request(message_id, "+15551230009", "7"))
            await h.wait_status(message_id, "failed")
        async with h.platform.engine.begin() as conn:
            mark = "UPDATE send_ledger SET {} WHERE message_id = :m"
            await conn.execute(text(mark.format("state = 'unknown'")), {"m": UNKNOWN})
            await conn.execute(text(mark.format("reason = 'customer erased'")), {"m": ERASED})

        nothing = await h.client.post(
            "/v1/messages/retry-failed", json={"reason_contains": "no such text"}, headers=ADMIN
        )
        assert nothing.json() == {"requeued": 0, "message_ids": []}
        bad = await h.client.post("/v1/messages/retry-failed", json={"limit": 0}, headers=ADMIN)
        assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "limit"

        again = await h.client.post("/v1/messages/retry-failed", json={"from": "2026-01-01"}, headers=ADMIN)
        assert again.json() == {"requeued": 1, "message_ids": ["m-retry-1"]}
        statuses = await h.wait_status("m-retry-1", "sent")
        assert [s["status"] for s in statuses] == ["queued", "failed", "sent"]
        assert (await ledger(h, "m-retry-1"))["attempts"] == 1
        assert (await ledger(h, UNKNOWN))["state"] == "unknown"
        assert (await ledger(h, ERASED))["state"] == "failed"
        assert len(h.twilio.requests) == 4
        assert (await h.client.post("/v1/messages/retry-failed", json={})).status_code == 401

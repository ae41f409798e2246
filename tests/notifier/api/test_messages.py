"""POST /v1/messages: template data the notifier cannot use is refused before anything is queued."""

from __future__ import annotations

from tests.notifier.conftest import ADMIN, SMS_TEMPLATE


async def test_a_send_with_traits_that_are_not_an_object_is_a_400_and_queues_nothing(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(SMS_TEMPLATE)
        send = {
            "customer_id": "c-data",
            "channel": "sms",
            "template_id": "sms-data",
            "recipient": {"phone": "+4790000002"},
        }
        # Was a 202, then the message failed with "internal error: TypeError".
        r = await h.client.post(
            "/v1/messages",
            json={**send, "data": {"traits": "vip", "journey": [1]}},
            headers={**ADMIN, "Idempotency-Key": "bad-data"},
        )
        assert r.status_code == 400, r.text
        assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [
            ("data.traits", "object"),
            ("data.journey", "object"),
        ]
        # Nothing was queued nor the key taken.
        again = await h.client.post(
            "/v1/messages",
            json={**send, "data": {"traits": {"name": "Ada"}}},
            headers={**ADMIN, "Idempotency-Key": "bad-data"},
        )
        assert again.status_code == 202, again.text
        await h.wait_status(again.json()["message_id"], "sent")


async def test_a_marketing_send_to_a_topic_that_does_not_exist_is_a_400(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """Accepted (202), it was suppressed for every customer later, silently."""
    async with start_notifier() as h:
        await h.create_template(SMS_TEMPLATE)
        await h.create_topic("promotions", ["email"])
        send = {
            "customer_id": "c-topic",
            "channel": "sms",
            "template_id": "sms-data",
            "category": "marketing",
            "recipient": {"phone": "+4790000003"},
        }
        for topic, problem in (("promo", "no such subscription topic"), ("promotions", "not offered on sms")):
            r = await h.client.post(
                "/v1/messages",
                json={**send, "subscription_topic": topic},
                headers={**ADMIN, "Idempotency-Key": f"topic-{topic}"},
            )
            assert r.status_code == 400, r.text
            assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [("subscription_topic", "exists")]
            assert problem in r.json()["message"]
        transactional = {**send, "category": "transactional", "subscription_topic": "promo"}
        r = await h.client.post(
            "/v1/messages", json=transactional, headers={**ADMIN, "Idempotency-Key": "t-1"}
        )
        assert r.status_code == 202, r.text  # a transactional message is sent whatever its topic

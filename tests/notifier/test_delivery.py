"""The delivery worker on requests from other services (Kafka): data or templates that can never
render fail at once with a reason that says why, never retried nor an internal error."""

from __future__ import annotations

from tests.notifier.conftest import ADMIN, request

SMS = {
    "id": "sms-data",
    "name": "SMS",
    "channel": "sms",
    "default_locale": "en",
    "variants": {"en": {"body": "Hi {{ traits.name | default: 'there' }}"}},
}


async def test_a_request_whose_traits_are_not_an_object_fails_with_the_field_named(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(SMS)
        # An unknown customer, whose template errors would be retried: this one fails at once.
        await h.publish(
            request(
                "m-bad-traits",
                "c-unseen",
                "sms",
                "sms-data",
                category="transactional",
                recipient={"phone": "+4790000003"},
                data={"traits": ["vip"]},
            )
        )
        statuses = await h.wait_status("m-bad-traits", "failed")
        reason = statuses[-1]["reason"]
        assert reason == "invalid template data: data.traits must be an object (or null), not an array"
        entry = (await h.client.get("/v1/messages/m-bad-traits", headers=ADMIN)).json()
        assert (entry["state"], entry["attempts"]) == ("failed", 1)
        assert h.twilio.requests == []

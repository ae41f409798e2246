"""The delivery worker on requests from other services (Kafka): data or templates that can never
render fail at once with a reason that says why, never retried nor an internal error."""

from __future__ import annotations

from services.notifier.store import templates_repo
from tests.notifier.conftest import ADMIN, SMS_TEMPLATE, request


async def test_a_request_whose_traits_are_not_an_object_fails_with_the_field_named(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_template(SMS_TEMPLATE)
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


async def test_a_template_with_an_unknown_filter_fails_at_once_for_an_unseen_customer(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        # As saved before validation knew unknown filters.
        async with h.platform.unit_of_work() as uow:
            await templates_repo.create(
                uow.session,
                template_id="sms-upcase2",
                name="SMS_TEMPLATE",
                channel="sms",
                default_locale="en",
                variants={"en": {"body": "Hi {{ traits.name | upcase2 }}"}},
                now=h.app.state.notifier.clock.now(),
            )
        # An unseen customer's template error was retried (the profile may bring the traits it
        # names): 10 attempts over ~18 minutes for an error no profile can fix.
        await h.publish(
            request(
                "m-upcase2",
                "c-unseen-2",
                "sms",
                "sms-upcase2",
                category="transactional",
                recipient={"phone": "+4790000004"},
                data={"traits": {"name": "Ada"}},
            )
        )
        statuses = await h.wait_status("m-upcase2", "failed")
        assert statuses[-1]["reason"] == "template error: body: UnknownFilterError: unknown filter 'upcase2'"
        entry = (await h.client.get("/v1/messages/m-upcase2", headers=ADMIN)).json()
        assert (entry["state"], entry["attempts"]) == ("failed", 1)
        assert h.twilio.requests == []

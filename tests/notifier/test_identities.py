"""Any identifier of a customer means the customer in the notifier, as in the segmenter: an anonymous
visitor who signed up keeps their anonymousId as customer id, yet an opt-out, a preference read, an
inbox or a transactional send made with their userId reaches them; choices kept under an identifier
before it was known to be theirs (or under a merged-away profile) become theirs, the latest winning."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from shared.contracts import PROFILES, ProfileChanged
from tests.notifier.conftest import ADMIN, Harness
from tests.notifier.test_email import email_request, setup
from tests.support import eventually

ANON, USER = "anon-9f3c", "u-1"


async def link(
    h: Harness,
    customer_id: str,
    identities: dict[str, list[str]],
    traits: dict[str, Any],
    *,
    kind: str = "identity_linked",
    merged_ids: list[str] | None = None,
    at: datetime | None = None,
) -> None:
    at = at or datetime.now(UTC)
    change = ProfileChanged(
        event_id=f"p-{customer_id}-{kind}-{at.timestamp()}",
        customer_id=customer_id,
        kind=kind,
        occurred_at=at,
        traits=traits,
        identities=identities,
        merged_ids=merged_ids or [],
    )
    await h.platform.producer.publish(PROFILES.name, customer_id, change)


async def owner_of(h: Harness, identity: str) -> str | None:
    async with h.platform.engine.connect() as conn:
        found = await conn.scalar(
            text("SELECT customer_id FROM customer_identities WHERE identity = :i"), {"i": identity}
        )
    return None if found is None else str(found)


async def choices_of(h: Harness, customer_id: str) -> list[tuple[str, str, bool]]:
    body = (await h.client.get(f"/v1/customers/{customer_id}/preferences", headers=ADMIN)).json()
    return [(p["topic"], p["channel"], p["subscribed"]) for p in body["preferences"]]


async def test_an_opt_out_made_with_the_user_id_suppresses_marketing_to_the_customer(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await setup(h)
        ids = {"anonymous_id": [ANON], "user_id": [USER]}
        await link(h, ANON, ids, {"email": "ada@example.com", "first_name": "Ada"}, kind="traits_changed")
        await eventually(lambda: owner_of(h, USER), timeout=15)
        assert await owner_of(h, USER) == ANON

        put = await h.client.put(
            f"/v1/customers/{USER}/preferences",
            json={
                "source": "api",
                "preferences": [{"topic": "newsletter", "channel": "email", "subscribed": False}],
            },
            headers=ADMIN,
        )
        assert put.status_code == 200, put.text
        assert put.json()["customer_id"] == ANON
        assert await choices_of(h, ANON) == [("newsletter", "email", False)]
        assert (await h.client.get(f"/v1/customers/{USER}/preferences", headers=ADMIN)).json()[
            "customer_id"
        ] == ANON

        # The journey engine asks for the customer by its id: the opt-out holds.
        await h.publish(email_request("m-id-1", ANON))
        statuses = await h.wait_status("m-id-1", "suppressed")
        assert "unsubscribed from 'newsletter'" in statuses[-1]["reason"]
        # A transactional send asked for with the userId reaches the customer's address.
        await h.publish(email_request("m-id-2", USER, category="transactional"))
        await h.wait_status("m-id-2", "delivered")
        assert [m.message["To"] for m in h.sink.messages] == ["ada@example.com"]


async def test_choices_and_inbox_kept_before_the_link_become_the_customers(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await setup(h)
        await h.profile(ANON, {"email": "ada@example.com", "first_name": "Ada"})
        await h.wait_contact(ANON)
        # Not linked yet: the notifier knows nothing of u-1, so the choice is kept under it.
        put = await h.client.put(
            f"/v1/customers/{USER}/preferences",
            json={"source": "api", "preferences": [{"topic": "*", "channel": "email", "subscribed": False}]},
            headers=ADMIN,
        )
        assert put.json()["customer_id"] == USER
        async with h.platform.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO in_app_messages (customer_id, message_id, title, body, created_at) "
                    "VALUES (:c, 'inbox-1', 'Hi', 'Welcome', now())"
                ),
                {"c": USER},
            )

        await link(h, ANON, {"anonymous_id": [ANON], "user_id": [USER]}, {"email": "ada@example.com"})

        async def moved() -> bool:
            return await choices_of(h, ANON) == [("*", "email", False)]

        await eventually(moved, timeout=15)
        assert await choices_of(h, USER) == [("*", "email", False)]  # read by the userId: the customer's
        history = (await h.client.get(f"/v1/customers/{USER}/consent-history", headers=ADMIN)).json()
        assert [(e["source"], e["subscribed"]) for e in history["history"]] == [
            ("api", False),
            ("identity_merge", False),
        ]
        token = (await h.client.get(f"/v1/inbox/{USER}/token", headers=ADMIN)).json()["token"]
        inbox = (await h.client.get(f"/v1/inbox/{USER}", params={"token": token})).json()
        assert [m["message_id"] for m in inbox["messages"]] == ["inbox-1"]

        await h.publish(email_request("m-id-3", ANON))
        await h.wait_status("m-id-3", "suppressed")
        assert h.sink.messages == []


async def test_a_merge_keeps_the_latest_choice_and_a_stale_profile_takes_nothing_back(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await setup(h)
        early = datetime.now(UTC) - timedelta(minutes=5)
        await link(h, "c-old", {"user_id": ["c-old"], "anonymous_id": ["dev-1"]}, {}, at=early)
        await link(h, "c-new", {"user_id": ["c-new"], "anonymous_id": ["dev-2"]}, {}, at=early)
        await eventually(lambda: owner_of(h, "dev-2"), timeout=15)
        # The merged-away profile opted out first, the survivor opted in later: the later choice stands.
        for cid, subscribed in (("c-old", False), ("c-new", True)):
            response = await h.client.put(
                f"/v1/customers/{cid}/preferences",
                json={
                    "source": "api",
                    "preferences": [{"topic": "newsletter", "channel": "email", "subscribed": subscribed}],
                },
                headers=ADMIN,
            )
            assert response.status_code == 200
        await link(
            h,
            "c-new",
            {"user_id": ["c-new"], "anonymous_id": ["dev-1", "dev-2"]},
            {},
            kind="identity_merged",
            merged_ids=["c-old"],
        )

        async def merged() -> bool:
            return await owner_of(h, "c-old") == "c-new" and await owner_of(h, "dev-1") == "c-new"

        await eventually(merged, timeout=15)
        assert await choices_of(h, "c-old") == [("newsletter", "email", True)]
        async with h.platform.engine.connect() as conn:
            left = await conn.scalar(text("SELECT count(*) FROM preferences WHERE customer_id = 'c-old'"))
        assert left == 0

        # An announcement about the merged-away profile from before the merge, arriving late (it is
        # keyed by the old id, so on another partition), takes none of its identifiers back.
        await link(h, "c-old", {"user_id": ["c-old"], "anonymous_id": ["dev-1"]}, {}, at=early)
        await h.profile("marker", {"email": "m@example.com"})  # same topic, after it: wait for this one
        await h.wait_contact("marker")
        assert await owner_of(h, "dev-1") == "c-new"
        # Nor its contact row, which would make `c-old` a customer of its own again.
        assert not await h.contact_known("c-old")
        body = (await h.client.get("/v1/customers/c-old/preferences", headers=ADMIN)).json()
        assert body["customer_id"] == "c-new"


async def test_erasure_forgets_the_identifiers(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await link(h, ANON, {"anonymous_id": [ANON], "user_id": [USER]}, {"email": "ada@example.com"})
        await eventually(lambda: owner_of(h, USER), timeout=15)
        await h.platform.producer.publish(
            PROFILES.name,
            ANON,
            ProfileChanged(
                event_id="erase-1", customer_id=ANON, kind="erased", occurred_at=datetime.now(UTC)
            ),
        )

        async def forgotten() -> bool:
            return await owner_of(h, USER) is None

        await eventually(forgotten, timeout=15)
        body = (await h.client.get(f"/v1/customers/{USER}/preferences", headers=ADMIN)).json()
        assert body["customer_id"] == USER  # no longer anyone's identifier


async def test_a_customers_own_id_wins_over_another_customers_identifier(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """An anonymousId `u9` made customer `u9` before the userId `u9` made `user:u9` (the segmenter's
    name for it): `u9` stays the first customer, whose choices and address are not the other's."""
    async with start_notifier() as h:
        await setup(h)
        await h.profile("u9", {"email": "first@example.com", "first_name": "First"})
        await h.wait_contact("u9")
        opt_out = [{"topic": "*", "channel": "email", "subscribed": False}]
        put = await h.client.put(
            "/v1/customers/u9/preferences", json={"source": "api", "preferences": opt_out}, headers=ADMIN
        )
        assert put.status_code == 200
        await link(h, "user:u9", {"user_id": ["u9"]}, {"email": "second@example.com", "first_name": "Second"})
        await eventually(lambda: owner_of(h, "u9"), timeout=15)
        assert await owner_of(h, "u9") == "user:u9"  # recorded, but the own id wins
        body = (await h.client.get("/v1/customers/u9/preferences", headers=ADMIN)).json()
        assert body["customer_id"] == "u9" and body["preferences"][0]["subscribed"] is False
        assert await choices_of(h, "user:u9") == []  # nothing moved to the other customer
        history = (await h.client.get("/v1/customers/user:u9/consent-history", headers=ADMIN)).json()
        assert history["history"] == []  # nor shown as theirs
        await h.publish(email_request("m-own-1", "u9", category="transactional"))
        await h.wait_status("m-own-1", "delivered")
        assert [m.message["To"] for m in h.sink.messages] == ["first@example.com"]


async def test_a_customers_messages_by_any_of_their_identifiers(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await setup(h)
        ids = {"anonymous_id": [ANON], "user_id": [USER]}
        await link(h, ANON, ids, {"email": "ada@example.com", "first_name": "Ada"}, kind="traits_changed")
        await eventually(lambda: owner_of(h, USER), timeout=15)
        await h.publish(email_request("m-h-1", ANON))  # a journey's, by the customer's id
        await h.wait_status("m-h-1", "delivered")
        await h.publish(email_request("m-h-2", USER, category="transactional"))  # an API send, by userId
        await h.wait_status("m-h-2", "delivered")

        body = (await h.client.get(f"/v1/customers/{USER}/messages", headers=ADMIN)).json()
        assert body["customer_id"] == ANON
        assert {m["message_id"] for m in body["messages"]} == {"m-h-1", "m-h-2"}
        first = next(m for m in body["messages"] if m["message_id"] == "m-h-1")
        assert (first["state"], first["template_id"], first["journey_id"]) == (
            "delivered",
            "welcome",
            "j-welcome",
        )
        assert first["opened"] is False
        page = (await h.client.get(f"/v1/customers/{ANON}/messages?limit=1", headers=ADMIN)).json()
        assert len(page["messages"]) == 1 and page["next_before"] is not None
        rest = await h.client.get(
            f"/v1/customers/{ANON}/messages",
            params={"limit": 1, "before": page["next_before"]},
            headers=ADMIN,
        )
        assert len(rest.json()["messages"]) == 1
        assert rest.json()["messages"][0]["message_id"] != page["messages"][0]["message_id"]
        bad = await h.client.get(
            f"/v1/customers/{ANON}/messages", params={"before": "yesterday"}, headers=ADMIN
        )
        assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "before"
        assert (await h.client.get(f"/v1/customers/{ANON}/messages")).status_code == 401


async def test_an_in_app_message_sent_by_user_id_reaches_the_customers_inbox(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """Stored under the id it was requested by, a message sent with the userId after the link was in
    nobody's inbox: the inbox reads the customer's id."""
    from tests.notifier.conftest import request
    from tests.notifier.test_api import INAPP

    async with start_notifier() as h:
        await h.create_template(INAPP)
        ids = {"anonymous_id": [ANON], "user_id": [USER]}
        await link(h, ANON, ids, {"first_name": "Ada"}, kind="traits_changed")
        await eventually(lambda: owner_of(h, USER), timeout=15)
        await h.publish(
            request("m-in-1", USER, "in_app", "inapp", category="transactional", data={"order": {"id": 7}})
        )
        await h.wait_status("m-in-1", "delivered")
        for ref in (USER, ANON):
            token = (await h.client.get(f"/v1/inbox/{ref}/token", headers=ADMIN)).json()["token"]
            inbox = (await h.client.get(f"/v1/inbox/{ref}", params={"token": token})).json()
            assert [m["message_id"] for m in inbox["messages"]] == ["m-in-1"], ref


PROMO_SMS = {
    "id": "promo-sms",
    "name": "Promo",
    "channel": "sms",
    "default_locale": "en",
    "variants": {"en": {"body": "Sale! Reply STOP to opt out"}},
}


async def test_a_stop_and_a_complaint_answer_messages_asked_for_under_other_ids(
    start_notifier,
) -> None:  # type: ignore[no-untyped-def]
    """The SMS went out under the customer's userId, the email under a merged-away profile's id: both
    reached the customer, whose STOP and spam complaint answer them (an `unsubscribed` status, the
    complaint counted). Before, only messages under the customer's own id were looked at: the
    opt-outs went through, announced to no journey and counted in no report."""
    from tests.notifier.conftest import request
    from tests.notifier.test_sms_stop import _inbound

    async with start_notifier() as h:
        await setup(h)  # `newsletter` on email and sms
        await h.create_template(PROMO_SMS)
        early = datetime.now(UTC) - timedelta(minutes=5)
        await link(h, "c-gone", {"user_id": ["c-gone"]}, {}, at=early)
        traits = {"phone": "+15550004444", "email": "ann@example.com", "first_name": "Ann"}
        await link(h, ANON, {"anonymous_id": [ANON], "user_id": [USER]}, traits, kind="traits_changed")
        await link(h, ANON, {"anonymous_id": [ANON]}, traits, kind="identity_merged", merged_ids=["c-gone"])

        async def linked() -> bool:
            return await owner_of(h, USER) == ANON and await owner_of(h, "c-gone") == ANON

        await eventually(linked, timeout=15)
        marketing: dict[str, Any] = {"category": "marketing", "subscription_topic": "newsletter"}
        await h.publish(request("m-al-1", USER, "sms", "promo-sms", **marketing))
        await h.publish(email_request("m-al-2", "c-gone"))
        await h.wait_status("m-al-1", "sent")
        await h.wait_status("m-al-2", "delivered")

        await _inbound(h, "+15550004444", "STOP")
        complained = await h.client.post(
            "/v1/complaints", json={"source": "ses", "addresses": ["ann@example.com"]}, headers=ADMIN
        )
        assert complained.status_code == 200, complained.text

        await h.wait_status("m-al-2", "unsubscribed")
        statuses = await h.wait_status("m-al-1", "unsubscribed")
        assert statuses[-1]["reason"] == "sms_stop: all marketing on sms"
        assert statuses[-1]["customer_id"] == USER  # as the message's other statuses
        history = (await h.client.get(f"/v1/customers/{ANON}/consent-history", headers=ADMIN)).json()
        assert sorted((e["channel"], e["message_id"]) for e in history["history"]) == [
            ("email", "m-al-2"),
            ("sms", "m-al-1"),
        ]
        got = await h.client.get("/v1/reports/messages", params={"group_by": "channel"}, headers=ADMIN)
        rows = {g["channel"]: g for g in got.json()["groups"]}
        assert (rows["email"]["unsubscribed"], rows["email"]["complained"]) == (1, 1)
        assert rows["sms"]["unsubscribed"] == 1

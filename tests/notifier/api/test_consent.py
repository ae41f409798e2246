"""PUT /v1/customers/{id}/preferences: a list of choices, refused whole when it contradicts itself."""

from __future__ import annotations

from tests.notifier.conftest import ADMIN


async def test_a_topic_and_channel_given_twice_with_different_answers_is_a_400(start_notifier) -> None:  # type: ignore[no-untyped-def]
    async with start_notifier() as h:
        await h.create_topic("promotions", ["sms", "email"])
        # A customer with no choice yet: both rows went into one upsert, which PostgreSQL refused (500).
        r = await h.client.put(
            "/v1/customers/c-dup/preferences",
            headers=ADMIN,
            json={
                "source": "crm",
                "preferences": [
                    {"topic": "promotions", "channel": "sms", "subscribed": False},
                    {"topic": "promotions", "channel": "email", "subscribed": True},
                    {"topic": "promotions", "channel": "sms", "subscribed": True},
                ],
            },
        )
        assert r.status_code == 400, r.text
        [error] = r.json()["errors"]
        assert (error["field"], error["rule"]) == ("preferences.2", "unique")
        assert "preferences.0" in error["message"]
        stored = await h.client.get("/v1/customers/c-dup/preferences", headers=ADMIN)
        assert stored.json()["preferences"] == []
        history = await h.client.get("/v1/customers/c-dup/consent-history", headers=ADMIN)
        assert history.json()["history"] == []

        # The same answer twice is harmless: kept once, one ledger entry.
        same = {"topic": "promotions", "channel": "sms", "subscribed": False}
        r = await h.client.put(
            "/v1/customers/c-dup/preferences",
            headers=ADMIN,
            json={"source": "crm", "preferences": [same, same]},
        )
        assert r.status_code == 200, r.text
        assert r.json()["changed"] == 1
        assert [(p["topic"], p["channel"], p["subscribed"]) for p in r.json()["preferences"]] == [
            ("promotions", "sms", False)
        ]


async def test_a_topic_id_with_a_trailing_newline_is_refused(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """`$` matched before a final newline: `news\n` was stored as a topic id, which the preference
    page's form cannot send back (browsers send a newline in a value as CRLF), so every save opted
    the customer out of it."""
    async with start_notifier() as h:
        body = {"name": "News", "channels": ["email"], "default_subscribed": True}
        for topic_id in ("news%0A", "news%0D%0A", "%0Anews"):
            r = await h.client.put(f"/v1/subscription-topics/{topic_id}", json=body, headers=ADMIN)
            assert r.status_code == 400, (topic_id, r.text)
            assert r.json()["errors"][0]["field"] == "topic_id"
        topics = (await h.client.get("/v1/subscription-topics", headers=ADMIN)).json()["topics"]
        assert topics == []

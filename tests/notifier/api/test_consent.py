"""PUT /v1/customers/{id}/preferences: a list of choices, refused whole when it contradicts itself."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from sqlalchemy import text

from services.notifier.store import identities_repo
from shared.privacy import add_tombstones, erasure_gate
from tests.notifier.conftest import ADMIN
from tests.notifier.test_links_after_erasure import NOTHING, erase, rows_of, waiting_for_the_gate
from tests.support import eventually


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


NEWSLETTER_OFF = {
    "source": "crm",
    "preferences": [{"topic": "newsletter", "channel": "email", "subscribed": False}],
}


async def test_preferences_of_an_erased_customer_are_refused_and_nothing_is_written(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """As the unsubscribe links: an admin PUT under an erased customer's identifier recreated the
    preferences and consent ledger entries the erasure deleted, under the erased id. Now a 410 naming
    the rule, nothing written, nothing audited; another customer's PUT works as ever."""
    async with start_notifier() as h:
        await h.create_topic("newsletter", ["email"])
        before = await h.client.put("/v1/customers/eve/preferences", headers=ADMIN, json=NEWSLETTER_OFF)
        assert before.status_code == 200, before.text  # before the erasure, as for anyone
        await erase(h, "eve", ["eve", "user-eve", "eve@example.com", "eve@bücher.example"])
        assert await rows_of(h, ["eve", "user-eve", "eve@example.com"], []) == NOTHING

        # The email in another case, or its domain as A-labels, is the erased address too (tombstoned
        # as its mailbox).
        for ref in ("eve", "user-eve", "eve@example.com", "Eve@Example.COM", "Eve@XN--BCHER-KVA.example"):
            r = await h.client.put(f"/v1/customers/{ref}/preferences", headers=ADMIN, json=NEWSLETTER_OFF)
            assert r.status_code == 410, (ref, r.text)
            body = r.json()
            assert body["error"] == "erased"
            assert [(e["field"], e["rule"]) for e in body["errors"]] == [("customer_id", "not_erased")]
            # The answer does not repeat the identifier: it may be the erased person's address.
            assert "@" not in r.text and "user-eve" not in r.text
        assert await rows_of(h, ["eve", "user-eve", "eve@example.com"], []) == NOTHING
        async with h.platform.engine.connect() as conn:
            audited = await conn.scalar(
                text("SELECT count(*) FROM audit_log WHERE path = '/v1/customers/user-eve/preferences'")
            )
        assert audited == 0  # refused: no admin action happened

        # The control: a customer not erased is written, and audited.
        kim = await h.client.put("/v1/customers/kim/preferences", headers=ADMIN, json=NEWSLETTER_OFF)
        assert kim.status_code == 200, kim.text
        assert kim.json()["changed"] == 1
        assert (await rows_of(h, ["kim"], []))["preferences"] == [("newsletter", "email", "crm")]


async def test_an_admin_put_during_an_erasure_waits_for_it_and_writes_nothing(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """The erasure holds its gate exclusive from before it reads anything to its commit: a PUT arriving
    meanwhile waits for it, then finds the tombstones (without the gate it could write between the
    erasure's delete and its commit, and its rows outlived the erasure)."""
    async with start_notifier() as h:
        await h.create_topic("newsletter", ["email"])
        salt = h.settings.privacy_salt.get_secret_value()
        async with h.platform.unit_of_work() as erasure:
            await erasure_gate(erasure.session, exclusive=True)
            put = asyncio.create_task(
                h.client.put("/v1/customers/ivy/preferences", headers=ADMIN, json=NEWSLETTER_OFF)
            )
            await eventually(lambda: waiting_for_the_gate(h))
            assert not put.done()
            await add_tombstones(erasure.session, salt, ["ivy"], "erase-ivy", datetime.now(UTC))
        answered = await asyncio.wait_for(put, 10)
        assert answered.status_code == 410, answered.text
        assert await rows_of(h, ["ivy"], []) == NOTHING


async def lock_waiters(h) -> int:  # type: ignore[no-untyped-def]
    """Transactions waiting for an advisory lock (here: an identifier's write lock)."""
    async with h.platform.engine.connect() as conn:
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        return int(await conn.scalar(text(waiting)))


async def test_an_identifier_that_resolves_to_an_erased_customer_is_refused(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """An alias whose own value is not tombstoned, linked to a customer that is (a stale profile event
    after the erasure links it: the profiles consumer does not check tombstones): refused as the
    customer's own id, nothing written under either."""
    async with start_notifier() as h:
        await h.create_topic("newsletter", ["email"])
        salt = h.settings.privacy_salt.get_secret_value()
        async with h.platform.unit_of_work() as uow:
            await add_tombstones(uow.session, salt, ["cust-c"], "erase-c", datetime.now(UTC))
            await identities_repo.link(uow.session, "cust-c", ["alias-1"], datetime.now(UTC))
        r = await h.client.put("/v1/customers/alias-1/preferences", headers=ADMIN, json=NEWSLETTER_OFF)
        assert r.status_code == 410, r.text
        assert r.json()["errors"][0]["rule"] == "not_erased"
        assert await rows_of(h, ["cust-c", "alias-1"], []) == NOTHING


async def test_a_link_committed_during_the_check_sends_no_write_to_an_erased_customer(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """The review's race: the erased check resolved the identifier without its write lock, the write
    resolved it again under the lock; a link committed in between (a stale profile event for the
    erased customer) sent the write to a customer never checked (200, a preferences row under the
    tombstoned id). The check now resolves under the lock: it waits for the link, then sees it."""
    async with start_notifier() as h:
        await h.create_topic("newsletter", ["email"])
        salt = h.settings.privacy_salt.get_secret_value()
        async with h.platform.unit_of_work() as uow:
            await add_tombstones(uow.session, salt, ["cust-c"], "erase-c", datetime.now(UTC))
        # The profiles consumer's link, written and not yet committed.
        async with h.platform.unit_of_work() as link_tx:
            await identities_repo.link(link_tx.session, "cust-c", ["alias-1"], datetime.now(UTC))
            put = asyncio.create_task(
                h.client.put("/v1/customers/alias-1/preferences", headers=ADMIN, json=NEWSLETTER_OFF)
            )
            await eventually(lambda: lock_waiters(h))  # the PUT waits for the identifier's lock
            assert not put.done()
        answered = await asyncio.wait_for(put, 10)
        assert answered.status_code == 410, answered.text
        assert await rows_of(h, ["cust-c", "alias-1"], []) == NOTHING


async def test_an_admin_put_waits_for_an_erasure_a_short_time_then_answers_503(start_notifier) -> None:  # type: ignore[no-untyped-def]
    """Each PUT waiting for the erasure gate holds a pooled connection: without a limit, 20+ PUTs of
    a CRM sync during an erasure ran the pool dry and delivery loops queued behind them. A PUT waits
    `admin_gate_wait_ms` at most (while one of `admin_gate_slots` is free; without one it
    only tries), then answers 503 with Retry-After and writes nothing."""
    async with start_notifier() as h:
        await h.create_topic("newsletter", ["email"])
        notifier = h.app.state.notifier
        notifier.admin_gate_wait_ms = 300  # shorter than the erasure held here
        async with h.platform.unit_of_work() as erasing_now:
            await erasure_gate(erasing_now.session, exclusive=True)
            busy = await asyncio.wait_for(
                h.client.put("/v1/customers/ivy/preferences", headers=ADMIN, json=NEWSLETTER_OFF), 5
            )
            assert busy.status_code == 503, busy.text
            assert busy.headers["Retry-After"] == "2"
            assert busy.json()["error"] == "erasure_under_way"
            # No slot free (reports or other PUTs waiting): not even the short wait.
            notifier.admin_gate_wait_ms = 10_000
            notifier.admin_gate_slots = asyncio.Semaphore(1)
            await notifier.admin_gate_slots.acquire()
            at_once = await asyncio.wait_for(
                h.client.put("/v1/customers/ivy/preferences", headers=ADMIN, json=NEWSLETTER_OFF), 3
            )
            assert at_once.status_code == 503, at_once.text
            notifier.admin_gate_slots.release()
        assert await rows_of(h, ["ivy"], []) == NOTHING
        # The gate free again: written as ever.
        done = await h.client.put("/v1/customers/ivy/preferences", headers=ADMIN, json=NEWSLETTER_OFF)
        assert done.status_code == 200, done.text
        assert (await rows_of(h, ["ivy"], []))["preferences"] == [("newsletter", "email", "crm")]

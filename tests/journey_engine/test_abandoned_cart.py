"""Abandoned cart: Product Added -> wait 1 h for Order Completed (same cart id) -> reminder, else exit."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import text

from services.journey_engine.domain.entry import correlation_key
from tests.journey_engine.harness import ADMIN, engine_running
from tests.journey_engine.test_timing_and_rules import linear

CART_JOURNEY: dict[str, Any] = {
    "name": "Abandoned cart",
    "entry": {
        "type": "event",
        "event": "Product Added",
        "where": [{"field": "event.properties.cart_id", "op": "exists"}],
    },
    "correlation_key": "cart_id",
    "reentry": {"policy": "always"},
    "nodes": [
        {"id": "start", "type": "entry"},
        {
            "id": "wait_order",
            "type": "wait_event",
            "event": "Order Completed",
            "match_correlation": True,
            "timeout": "PT1H",
        },
        {"id": "reminder", "type": "send", "channel": "email", "template_id": "cart-reminder"},
        {"id": "done", "type": "exit"},
    ],
    "edges": [
        {"from": "start", "to": "wait_order"},
        {"from": "wait_order", "to": "done", "branch": "matched"},
        {"from": "wait_order", "to": "reminder", "branch": "timeout"},
        {"from": "reminder", "to": "done"},
    ],
}
# Once per cart, with a goal on the same cart: finishes at once, the goal counts afterwards.
ONCE_PER_CART = linear(
    "Once per cart",
    "Product Added",
    [],
    correlation_key="cart_id",
    goal={"event": "Order Completed", "within": "P1D", "match_correlation": True},
)


async def test_abandoned_cart_both_branches(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        await h.profile(
            "alice", {"email": "alice@example.com", "timezone": "Europe/Paris", "first_name": "Alice"}
        )
        jid = await h.journey(CART_JOURNEY)
        # Alice abandons cart c1; Bob buys his cart c2 (an order for another cart does not count).
        await h.track("alice", "Product Added", {"cart_id": "c1", "sku": "tea"})
        await h.track("bob", "Product Added", {"cart_id": "c2"})
        await h.track("bob", "Order Completed", {"cart_id": "other"})
        await h.advance(timedelta(minutes=30))
        await h.track("bob", "Order Completed", {"cart_id": "c2"})
        rows = {r.customer_id: r for r in await h.instances(jid)}
        assert rows["alice"].status == "active" and rows["alice"].node_id == "wait_order"
        assert rows["bob"].status == "exited" and rows["bob"].node_id == "done"

        assert await h.advance(timedelta(minutes=29)) == 0  # not due yet
        assert await h.advance(timedelta(minutes=1)) == 2  # alice's timeout; bob's stale timer is a no-op
        rows = {r.customer_id: r for r in await h.instances(jid)}
        assert rows["alice"].status == "exited" and rows["alice"].node_id == "done"

        [request] = await h.requests(until=lambda m: len(m) >= 1)
        assert request["customer_id"] == "alice" and request["template_id"] == "cart-reminder"
        assert request["recipient"]["email"] == "alice@example.com"
        assert request["recipient"]["timezone"] == "Europe/Paris"
        assert request["data"]["event"]["properties"]["cart_id"] == "c1"
        assert request["data"]["traits"]["first_name"] == "Alice"
        assert request["journey_id"] == jid and request["node_id"] == "reminder"
        assert request["message_id"] == f"jm:{jid}:v1:{request['instance_id']}:reminder"

        # The same customer with a second cart gets a second, separate instance (once per cart id).
        await h.track("alice", "Product Added", {"cart_id": "c3"})
        await h.track("alice", "Product Added", {"cart_id": "c3"})  # same cart again: still one instance
        active = [r for r in await h.instances(jid) if r.status == "active"]
        assert [(r.customer_id, r.correlation) for r in active] == [("alice", "c3")]

        stats = (
            await h.client.get(
                f"/v1/journeys/{jid}/stats", headers={"Authorization": "Bearer test-admin-token"}
            )
        ).json()
        nodes = {n["node_id"]: n for n in stats["versions"][0]["nodes"]}
        assert nodes["start"]["entered"] == 3
        assert nodes["wait_order"]["waiting"] == 1 and nodes["wait_order"]["passed"] == 2
        assert nodes["reminder"]["passed"] == 1 and nodes["done"]["exited"] == 2

        # The counters are a row per unit of work; compaction rolls them up, the stats do not move.
        count_rows = "SELECT count(*) FROM node_counts WHERE journey_id = :j"
        before = await h.scalar(count_rows, j=jid)
        totals = "SELECT count(DISTINCT (version, node_id, metric)) FROM node_counts WHERE journey_id = :j"
        distinct = await h.scalar(totals, j=jid)
        assert before > distinct
        h.engine.settings.counts_rows_per_total = 1
        assert await h.engine.compact_counts() == 1
        assert await h.scalar(count_rows, j=jid) == distinct
        again = await h.client.get(
            f"/v1/journeys/{jid}/stats", headers={"Authorization": "Bearer test-admin-token"}
        )
        assert again.json() == stats
        assert await h.engine.compact_counts() == 0  # nothing crowded any more


async def test_a_correlation_value_longer_than_an_index_entry_is_processed_like_any_other(
    make_settings: Any,
) -> None:
    async with engine_running(make_settings) as h:
        cart = await h.journey(CART_JOURNEY)
        thanks = await h.journey(
            linear(
                "Thanks",
                "Product Added",
                [{"id": "mail", "type": "send", "channel": "email", "template_id": "t"}],
                reentry={"policy": "always"},
            )
        )
        once = await h.journey(ONCE_PER_CART)
        shared = secrets.token_urlsafe(3000)[:2990]
        first, second = shared + "-first", shared + "-second"  # the same first 2,990 characters
        # Before, PostgreSQL refused the enrolment ("index row size ... exceeds btree version 4
        # maximum 2704"): the event was dead-lettered and "Thanks" never saw it.
        await h.track("a", "Product Added", {"cart_id": first})
        await h.track("a", "Product Added", {"cart_id": first})  # the same cart: still one instance
        await h.track("a", "Product Added", {"cart_id": second})  # another cart: an instance of its own
        keys = sorted([correlation_key(first), correlation_key(second)])
        waiting = [r for r in await h.instances(cart) if r.status == "active"]
        assert sorted(r.correlation for r in waiting) == keys  # indexed by their keys
        assert [r.status for r in await h.instances(thanks)] == ["exited"] * 3
        assert sorted(r.correlation for r in await h.instances(once)) == keys  # not `first` twice
        enrolments = await h.rows("SELECT correlation FROM enrolments WHERE journey_id = :j", j=once)
        assert sorted(k for (k,) in enrolments) == keys

        # The API shows the value as sent.
        listed = (await h.client.get(f"/v1/journeys/{cart}/instances", headers=ADMIN)).json()["instances"]
        assert sorted(i["correlation"] for i in listed) == sorted([first, second])

        # The wait and the goal match the whole value, not a prefix of it.
        await h.track("a", "Order Completed", {"cart_id": second})
        rows = {r.correlation: r for r in await h.instances(cart)}
        assert rows[correlation_key(second)].status == "exited"
        assert rows[correlation_key(second)].node_id == "done"
        assert rows[correlation_key(first)].status == "active"
        assert rows[correlation_key(first)].node_id == "wait_order"
        converted = await h.rows(
            "SELECT correlation FROM instances WHERE journey_id = :j AND converted_at IS NOT NULL", j=once
        )
        assert [c for (c,) in converted] == [correlation_key(second)]
        assert await h.scalar("SELECT count(*) FROM goal_windows WHERE journey_id = :j", j=once) == 1

        # Entered once per value: `first` again does not enter, a third value does.
        await h.track("a", "Product Added", {"cart_id": first})
        await h.track("a", "Product Added", {"cart_id": shared + "-third"})
        assert len(await h.instances(once)) == 3
        assert len([r for r in await h.instances(cart) if r.status == "active"]) == 2

        # Steps later, the message data carries the value as sent.
        await h.advance(timedelta(hours=1))
        reminders = await h.requests(until=lambda m: len(m) >= 7)  # and 5 thanks
        shown = sorted(
            m["data"]["journey"]["correlation"] for m in reminders if m["template_id"] == "cart-reminder"
        )
        assert shown == sorted([first, shared + "-third"])


async def test_a_value_that_looks_like_a_digest_is_not_the_value_it_is_the_digest_of(
    make_settings: Any,
) -> None:
    async with engine_running(make_settings) as h:
        once = await h.journey(ONCE_PER_CART)
        cart = await h.journey(CART_JOURNEY)
        long = secrets.token_urlsafe(3000)[:3000]
        posing = correlation_key(long)  # "sha256:...": what `long` is stored by, sent as a value
        await h.track("a", "Product Added", {"cart_id": long})
        await h.track("a", "Product Added", {"cart_id": posing})
        # Another value: its own entry and instance (it is hashed in turn, so it is no other's key).
        keys = sorted(r.correlation for r in await h.instances(once))
        assert keys == sorted([posing, correlation_key(posing)]) and len(set(keys)) == 2
        assert len([r for r in await h.instances(cart) if r.status == "active"]) == 2
        # Its order converts its own entry, not the long value's; the long value's wait goes on.
        await h.track("a", "Order Completed", {"cart_id": posing})
        converted = await h.rows(
            "SELECT correlation FROM instances WHERE journey_id = :j AND converted_at IS NOT NULL", j=once
        )
        assert [c for (c,) in converted] == [correlation_key(posing)]
        active = [r for r in await h.instances(cart) if r.status == "active"]
        assert [r.correlation for r in active] == [posing]  # the long value's instance, by its key
        listed = (await h.client.get(f"/v1/journeys/{cart}/instances", headers=ADMIN)).json()["instances"]
        assert {i["correlation"]: i["status"] for i in listed} == {long: "active", posing: "exited"}


async def test_entries_stored_by_the_release_before_still_count(make_settings: Any) -> None:
    """Rows as the release before wrote them (every value as itself, up to what a btree entry took):
    read by this one as they are, during a rolling upgrade and after it, without a migration."""
    async with engine_running(make_settings) as h:
        once = await h.journey(ONCE_PER_CART, journey_id="once")
        await h.journey(CART_JOURNEY, journey_id="cart")
        mid = secrets.token_urlsafe(2000)[:2000]  # past this release's 1,024 bytes, within a btree entry
        async with h.platform.engine.begin() as conn:
            insert = text(
                "INSERT INTO instances (id, journey_id, version, customer_id, correlation, status, "
                "node_id, wait, context, seq, entered_at, updated_at) VALUES (:id, :j, 1, :c, :k, :s, :n, "
                "CAST(:w AS jsonb), '{}', 1, :t, :t)"
            )
            wait = '{"kind": "event", "event": "Order Completed"}'
            now = h.clock.now()
            for id_, journey, customer, value, status, node, w in (
                ("old-1", "once", "a", "c1", "exited", "done", None),
                ("old-2", "once", "b", mid, "exited", "done", None),
                ("old-3", "cart", "a", "c1", "active", "wait_order", wait),
                ("old-4", "cart", "b", mid, "active", "wait_order", wait),
            ):
                await conn.execute(
                    insert,
                    {
                        "id": id_,
                        "j": journey,
                        "c": customer,
                        "k": value,
                        "s": status,
                        "n": node,
                        "w": w,
                        "t": now,
                    },
                )
            await conn.execute(
                text(
                    "INSERT INTO enrolments (journey_id, customer_id, correlation, last_entered_at) VALUES "
                    "('once', 'a', 'c1', :t), ('once', 'b', :k, :t), ('cart', 'a', 'c1', :t), "
                    "('cart', 'b', :k, :t)"
                ),
                {"t": now, "k": mid},
            )
            await conn.execute(
                text(
                    "INSERT INTO goal_windows (instance_id, customer_id, journey_id, version, node_id, "
                    "correlation, entered_at) VALUES ('old-1', 'a', 'once', 1, 'done', 'c1', :t), "
                    "('old-2', 'b', 'once', 1, 'done', :k, :t)"
                ),
                {"t": now, "k": mid},
            )
        # Entered before: not again (`once`); still inside (`cart`, one active instance per value).
        for customer, value in (("a", "c1"), ("b", mid)):
            await h.track(customer, "Product Added", {"cart_id": value})
        assert sorted(r.id for r in await h.rows("SELECT id FROM instances")) == [
            "old-1",
            "old-2",
            "old-3",
            "old-4",
        ]
        # Another value is another entry, stored by its key.
        await h.track("a", "Product Added", {"cart_id": "c2"})
        assert sorted(r.correlation for r in await h.instances(once)) == sorted(["c1", "c2", mid])
        # The goal windows and the waits opened before match their values.
        for customer, value in (("a", "c1"), ("b", mid)):
            await h.track(customer, "Order Completed", {"cart_id": value})
        assert await h.scalar("SELECT count(*) FROM instances WHERE converted_at IS NOT NULL") == 2
        assert {
            (r.status, r.node_id)
            for r in await h.rows("SELECT status, node_id FROM instances WHERE id IN ('old-3', 'old-4')")
        } == {("exited", "done")}

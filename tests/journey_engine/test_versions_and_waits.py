"""New versions while customers are inside (and migration); waits on message status; trait updates
and webhooks."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import text

from shared.contracts.topics import CUSTOMER_EVENTS
from tests.journey_engine.harness import ADMIN, engine_running
from tests.journey_engine.test_timing_and_rules import linear
from tests.support import read_topic


def mail_after_an_hour(template: str) -> dict[str, Any]:
    return linear(
        "Versioned",
        "Signed Up",
        [
            {"id": "wait", "type": "delay", "duration": "PT1H"},
            {"id": "mail", "type": "send", "channel": "email", "template_id": template},
        ],
    )


async def test_new_version_while_customers_are_inside(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        jid = await h.journey(mail_after_an_hour("v1-mail"))
        await h.track("a", "Signed Up")
        r = await h.client.put(
            f"/v1/journeys/{jid}", json={"definition": mail_after_an_hour("v2-mail")}, headers=ADMIN
        )
        assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["migrated"] == 0
        await h.track("b", "Signed Up")
        await h.track("c", "Signed Up")
        # Without `migrate`, everyone inside stays on the version they entered.
        r = await h.client.put(
            f"/v1/journeys/{jid}",
            json={"definition": mail_after_an_hour("v3-mail"), "migrate": False},
            headers=ADMIN,
        )
        assert r.json()["version"] == 3
        versions = {row.customer_id: row.version for row in await h.instances(jid)}
        assert versions == {"a": 1, "b": 2, "c": 2}
        await h.advance(timedelta(hours=1))
        sent = {
            m["customer_id"]: (m["template_id"], m["journey_version"])
            for m in await h.requests(until=lambda m: len(m) >= 3)
        }
        assert sent == {"a": ("v1-mail", 1), "b": ("v2-mail", 2), "c": ("v2-mail", 2)}

        await h.track("d", "Signed Up")
        await h.track("e", "Signed Up")  # both on v3
        migrated_def = mail_after_an_hour("v4-mail")
        r = await h.client.put(
            f"/v1/journeys/{jid}", json={"definition": migrated_def, "migrate": True}, headers=ADMIN
        )
        assert r.json()["migrated"] == 2
        await h.advance(timedelta(hours=1))
        sent = {m["customer_id"]: m["template_id"] for m in await h.requests(until=lambda m: len(m) >= 5)}
        assert sent["d"] == "v4-mail" and sent["e"] == "v4-mail"
        body = (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()
        assert body["versions"] == [1, 2, 3, 4] and body["definition"]["nodes"][2]["template_id"] == "v4-mail"


ENGAGEMENT = {
    "name": "Engagement",
    "entry": {"type": "event", "event": "Signed Up"},
    "nodes": [
        {"id": "start", "type": "entry"},
        {
            "id": "mail",
            "type": "send",
            "channel": "email",
            "template_id": "hello",
            "subscription_topic": "news",
        },
        {
            "id": "opened",
            "type": "wait_message",
            "send_node": "mail",
            "statuses": ["opened", "clicked"],
            "timeout": "P2D",
        },
        {"id": "tag", "type": "update_trait", "traits": {"engaged": True}},
        {"id": "sms", "type": "send", "channel": "sms", "template_id": "nudge"},
        {"id": "hook", "type": "webhook", "url": "https://crm.example.test/hooks/unengaged"},
        {"id": "done", "type": "exit"},
    ],
    "edges": [
        {"from": "start", "to": "mail"},
        {"from": "mail", "to": "opened"},
        {"from": "opened", "to": "tag", "branch": "matched"},
        {"from": "opened", "to": "sms", "branch": "timeout"},
        {"from": "tag", "to": "done"},
        {"from": "sms", "to": "hook"},
        {"from": "hook", "to": "done"},
    ],
}


async def test_wait_for_open_else_sms_and_webhook(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        await h.profile("x", {"email": "x@example.com", "phone": "+15550001"})
        await h.profile("y", {"email": "y@example.com", "phone": "+15550002"})
        jid = await h.journey(ENGAGEMENT)
        await h.track("x", "Signed Up")
        await h.track("y", "Signed Up")
        first = {m["customer_id"]: m for m in await h.requests(until=lambda m: len(m) >= 2)}
        assert first["x"]["subscription_topic"] == "news"
        await h.message_status("x", first["x"]["message_id"], "delivered")  # not what the wait wants
        # Another message's status, even one naming this instance, is not what the wait wants.
        await h.message_status("x", "someone-elses-message", "opened", instance_id=first["x"]["instance_id"])
        assert {r.customer_id: r.node_id for r in await h.instances(jid)} == {"x": "opened", "y": "opened"}
        await h.message_status("x", first["x"]["message_id"], "opened")
        await h.advance(timedelta(days=2))
        rows = {r.customer_id: r for r in await h.instances(jid)}
        assert rows["x"].status == "exited" and rows["y"].status == "exited"

        requests = await h.requests(until=lambda m: len(m) >= 4)
        later = [(m["customer_id"], m["channel"], m["template_id"]) for m in requests[2:]]
        assert sorted(later) == [("y", "sms", "nudge"), ("y", "webhook", "webhook")]
        hook = next(m for m in requests if m["channel"] == "webhook")
        assert hook["recipient"]["webhook_url"] == "https://crm.example.test/hooks/unengaged"

        identifies = [
            m["value"]
            for m in await read_topic(h.settings.topic(CUSTOMER_EVENTS.name), idle=1.0)
            if m["value"]["type"] == "identify"
        ]
        # Named by its canonical id (`customerId`), so the segmenter updates that profile.
        assert [(e["customerId"], e["userId"], e["traits"], e["source"]) for e in identifies] == [
            ("x", "x", {"engaged": True}, "journey_engine")
        ]
        assert await h.scalar("SELECT traits->>'engaged' FROM customers WHERE customer_id = 'x'") == "true"


def mail_then_wait_for_click(template: str) -> dict[str, Any]:
    """A mail, an hour's delay, then a wait for its click: an SMS only to those who did not click."""
    return {
        "name": "Click check",
        "entry": {"type": "event", "event": "Signed Up"},
        "nodes": [
            {"id": "start", "type": "entry"},
            {"id": "mail", "type": "send", "channel": "email", "template_id": template},
            {"id": "pause", "type": "delay", "duration": "PT1H"},
            {
                "id": "clicked",
                "type": "wait_message",
                "send_node": "mail",
                "statuses": ["clicked"],
                "timeout": "P1D",
            },
            {"id": "sms", "type": "send", "channel": "sms", "template_id": "nudge"},
            {"id": "done", "type": "exit"},
        ],
        "edges": [
            {"from": "start", "to": "mail"},
            {"from": "mail", "to": "pause"},
            {"from": "pause", "to": "clicked"},
            {"from": "clicked", "to": "done", "branch": "matched"},
            {"from": "clicked", "to": "sms", "branch": "timeout"},
            {"from": "sms", "to": "done"},
        ],
    }


async def test_a_migrated_customer_waits_for_the_message_it_was_sent(make_settings: Any) -> None:
    """The mail went out under version 1's id; migrated to version 2 before reaching the wait, the
    customer waited for an id version 2 would have given it, never requested: their click was ignored
    and the timeout branch texted someone who clicked. `b` stands for an instance that sent its mail
    before message ids were recorded in the context (it waits by the version it left)."""
    async with engine_running(make_settings) as h:
        jid = await h.journey(mail_then_wait_for_click("hello"))
        await h.track("a", "Signed Up")
        await h.track("b", "Signed Up")
        mails = {m["customer_id"]: m for m in await h.requests(until=lambda m: len(m) >= 2)}
        assert {c: m["journey_version"] for c, m in mails.items()} == {"a": 1, "b": 1}
        async with h.platform.engine.begin() as conn:
            await conn.execute(
                text(
                    "UPDATE instances SET context = context - 'message_ids' "
                    "WHERE journey_id = :j AND customer_id = 'b'"
                ),
                {"j": jid},
            )
        r = await h.client.put(
            f"/v1/journeys/{jid}",
            json={"definition": mail_then_wait_for_click("hello-v2"), "migrate": True},
            headers=ADMIN,
        )
        assert r.status_code == 200 and r.json()["migrated"] == 2, r.text
        await h.advance(timedelta(hours=1))
        waits = await h.rows(
            "SELECT customer_id, version, node_id, wait->>'message_id' FROM instances "
            "WHERE journey_id = :j ORDER BY customer_id",
            j=jid,
        )
        assert [tuple(w) for w in waits] == [
            ("a", 2, "clicked", mails["a"]["message_id"]),
            ("b", 2, "clicked", mails["b"]["message_id"]),
        ]
        for customer in ("a", "b"):
            await h.message_status(customer, mails[customer]["message_id"], "clicked")
        rows = await h.instances(jid)
        assert [(r.customer_id, r.status, r.node_id) for r in rows] == [
            ("a", "exited", "done"),
            ("b", "exited", "done"),
        ]
        await h.advance(timedelta(days=1))
        requests = await h.requests(idle=0.5)
        assert sorted((m["customer_id"], m["channel"]) for m in requests) == [("a", "email"), ("b", "email")]


async def test_migrating_customers_to_a_node_of_another_type_is_refused(make_settings: Any) -> None:
    """A customer waiting at delay 'wait' would be stuck (no timer means anything at a condition) if
    v2 reused the id for a condition: the edit is refused, naming the node, and nothing changes."""
    v2 = linear(
        "Versioned",
        "Signed Up",
        [
            {
                "id": "wait",
                "type": "condition",
                "branches": [{"name": "gold", "where": [{"field": "plan", "op": "eq", "value": "gold"}]}],
            },
            {"id": "mail", "type": "send", "channel": "email", "template_id": "v2"},
        ],
    )
    v2["edges"].append({"from": "wait", "to": "mail", "branch": "else"})
    v2["edges"] = [
        e | {"branch": "gold"} if e["from"] == "wait" and "branch" not in e else e for e in v2["edges"]
    ]
    async with engine_running(make_settings) as h:
        jid = await h.journey(mail_after_an_hour("v1-mail"))
        await h.track("a", "Signed Up")
        r = await h.client.put(f"/v1/journeys/{jid}", json={"definition": v2, "migrate": True}, headers=ADMIN)
        assert r.status_code == 409, r.text
        [error] = r.json()["errors"]
        assert error["field"] == "definition.nodes.wait" and error["rule"] == "migrate_same_type"
        assert "1 customer(s)" in error["message"] and "delay" in error["message"]
        body = (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()
        assert body["versions"] == [1]
        # Without migrate the new version is saved and the customer finishes on version 1.
        r = await h.client.put(
            f"/v1/journeys/{jid}", json={"definition": v2, "migrate": False}, headers=ADMIN
        )
        assert r.status_code == 200 and r.json()["migrated"] == 0
        await h.advance(timedelta(hours=1))
        [sent] = await h.requests(until=lambda m: len(m) >= 1)
        assert (sent["template_id"], sent["journey_version"]) == ("v1-mail", 1)

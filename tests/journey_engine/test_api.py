"""The marketer API: auth, validation errors naming node and rule, lifecycle transitions, dry runs."""

from __future__ import annotations

import itertools
import json
from typing import Any

from tests.journey_engine.harness import ADMIN, engine_running
from tests.journey_engine.test_abandoned_cart import CART_JOURNEY


async def test_definitions_api(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        c = h.client
        assert (await c.get("/v1/journeys")).status_code == 401
        assert (await c.get("/v1/journeys", headers={"Authorization": "Bearer wrong"})).status_code == 401

        broken = dict(CART_JOURNEY, edges=[e for e in CART_JOURNEY["edges"] if e.get("branch") != "timeout"])
        r = await c.post("/v1/journeys", json={"id": "cart", "definition": broken}, headers=ADMIN)
        assert r.status_code == 400
        errors = {(e["field"], e["rule"]) for e in r.json()["errors"]}
        assert ("definition.nodes.wait_order", "branch_complete") in errors
        assert ("definition.nodes.reminder", "reachable") in errors

        bad_delay = dict(CART_JOURNEY, nodes=[*CART_JOURNEY["nodes"], {"id": "d", "type": "delay"}])
        r = await c.post("/v1/journeys", json={"definition": bad_delay}, headers=ADMIN)
        assert r.status_code == 400 and any("nodes.4" in e["field"] for e in r.json()["errors"])
        assert (await c.get("/v1/journeys", headers=ADMIN)).json()["journeys"] == []  # nothing was saved

        r = await c.post("/v1/journeys", json={"id": "cart", "definition": CART_JOURNEY}, headers=ADMIN)
        assert r.status_code == 201 and r.json()["status"] == "draft" and r.json()["version"] == 1
        # Past the column's range, or text PostgreSQL cannot store: a 400 naming it, not a 500.
        r = await c.get("/v1/journeys/cart/versions/99999999999", headers=ADMIN)
        assert r.status_code == 400 and r.json()["errors"][0]["field"] == "version", r.text
        r = await c.get("/v1/audit", params={"before": 2**70, "path_prefix": "/v1"}, headers=ADMIN)
        assert r.status_code == 400 and r.json()["errors"][0]["field"] == "before", r.text
        r = await c.get("/v1/audit", params={"path_prefix": "/v1\x00"}, headers=ADMIN)
        assert r.status_code == 400 and r.json()["errors"][0]["field"] == "query.path_prefix", r.text
        assert (
            await c.post("/v1/journeys", json={"id": "cart", "definition": CART_JOURNEY}, headers=ADMIN)
        ).status_code == 409
        assert (await c.post("/v1/journeys/cart/pause", headers=ADMIN)).status_code == 409
        assert (await c.post("/v1/journeys/cart/activate", headers=ADMIN)).json()["status"] == "active"
        assert (await c.post("/v1/journeys/cart/pause", headers=ADMIN)).json()["status"] == "paused"
        await h.track("u1", "Product Added", {"cart_id": "k"})  # paused: no entries
        assert await h.instances("cart") == []
        assert (await c.post("/v1/journeys/cart/activate", headers=ADMIN)).json()["status"] == "active"
        await h.track("u1", "Product Added", {"cart_id": "k"})
        assert len(await h.instances("cart")) == 1
        assert (await c.post("/v1/journeys/cart/archive", headers=ADMIN)).json()["status"] == "archived"
        assert [r.exit_reason for r in await h.instances("cart")] == ["archived"]
        listed_instances = (await c.get("/v1/journeys/cart/instances", headers=ADMIN)).json()["instances"]
        assert [(i["customer_id"], i["status"], i["correlation"]) for i in listed_instances] == [
            ("u1", "exited", "k")
        ]
        assert (
            await c.put("/v1/journeys/cart", json={"definition": CART_JOURNEY}, headers=ADMIN)
        ).status_code == 409
        assert (await c.get("/v1/journeys/nope", headers=ADMIN)).status_code == 404
        listed = (await c.get("/v1/journeys", headers=ADMIN)).json()["journeys"]
        assert [(j["id"], j["status"]) for j in listed] == [("cart", "archived")]
        v1 = (await c.get("/v1/journeys/cart/versions/1", headers=ADMIN)).json()
        assert v1["definition"]["edges"][0] == {"from": "start", "to": "wait_order", "branch": None}


async def test_dry_run_shows_path_and_reasons(make_settings: Any) -> None:
    journey = {
        "name": "Dry",
        "entry": {
            "type": "event",
            "event": "Product Added",
            "where": [{"field": "event.properties.total", "op": "gte", "value": 50}],
        },
        "nodes": [
            {"id": "start", "type": "entry"},
            {
                "id": "vip",
                "type": "condition",
                "branches": [
                    {"name": "gold", "where": [{"field": "traits.plan", "op": "eq", "value": "gold"}]}
                ],
            },
            {"id": "gold_mail", "type": "send", "channel": "email", "template_id": "gold"},
            {"id": "wait", "type": "delay", "until_time": "09:00"},
            {"id": "std_mail", "type": "send", "channel": "email", "template_id": "std"},
            {"id": "done", "type": "exit"},
        ],
        "edges": [
            {"from": "start", "to": "vip"},
            {"from": "vip", "to": "gold_mail", "branch": "gold"},
            {"from": "vip", "to": "wait", "branch": "else"},
            {"from": "gold_mail", "to": "done"},
            {"from": "wait", "to": "std_mail"},
            {"from": "std_mail", "to": "done"},
        ],
    }
    async with engine_running(make_settings) as h:
        r = await h.client.post(
            "/v1/journeys/dry-run",
            headers=ADMIN,
            json={
                "definition": journey,
                "profile": {"traits": {"plan": "gold"}},
                "event": {"event": "Product Added", "properties": {"total": 80}},
            },
        )
        body = r.json()
        assert r.status_code == 200 and body["would_enter"] is True
        assert [s["node_id"] for s in body["path"]] == ["start", "vip", "gold_mail", "done"]
        assert "traits.plan eq 'gold'" in body["path"][1]["why"]
        assert body["messages"] == [
            {
                "node_id": "gold_mail",
                "channel": "email",
                "template_id": "gold",
                "decision": "requested",
                "reason": None,
            }
        ]

        await h.profile("p1", {"plan": "free", "timezone": "Asia/Kolkata"})
        r = await h.client.post(
            "/v1/journeys/dry-run",
            headers=ADMIN,
            json={
                "definition": journey,
                "customer_id": "p1",
                "event": {"event": "Product Added", "properties": {"total": 5}},
            },
        )
        body = r.json()
        assert body["would_enter"] is False
        assert [s["node_id"] for s in body["path"]] == ["start", "vip", "wait", "std_mail", "done"]
        assert "Asia/Kolkata" in body["path"][2]["why"]

        r = await h.client.post("/v1/journeys/dry-run", headers=ADMIN, json={"definition": journey})
        assert r.status_code == 400 and r.json()["errors"][0]["field"] == "customer_id"


async def test_dry_run_entry_filters_see_the_customers_timezone(make_settings: Any) -> None:
    journey = {
        "name": "Paris only",
        "entry": {
            "type": "event",
            "event": "Viewed",
            "where": [{"field": "customer.timezone", "op": "eq", "value": "Europe/Paris"}],
        },
        "nodes": [{"id": "start", "type": "entry"}, {"id": "done", "type": "exit"}],
        "edges": [{"from": "start", "to": "done"}],
    }
    async with engine_running(make_settings) as h:
        for timezone, enters in (("Europe/Paris", True), ("Asia/Tokyo", False)):
            r = await h.client.post(
                "/v1/journeys/dry-run",
                headers=ADMIN,
                json={"definition": journey, "profile": {"timezone": timezone}, "event": {"event": "Viewed"}},
            )
            assert r.status_code == 200 and r.json()["would_enter"] is enters, (timezone, r.text)


async def test_quiet_hours_with_a_utc_offset_are_refused_by_save_and_dry_run(make_settings: Any) -> None:
    journey = {
        "name": "Offset",
        "entry": {"type": "event", "event": "Viewed"},
        "messaging": {"quiet_hours": {"start": "22:00Z", "end": "07:00Z"}},
        "nodes": [
            {"id": "start", "type": "entry"},
            {"id": "mail", "type": "send", "channel": "email", "template_id": "x"},
            {"id": "done", "type": "exit"},
        ],
        "edges": [{"from": "start", "to": "mail"}, {"from": "mail", "to": "done"}],
    }
    async with engine_running(make_settings) as h:
        for path, body in (
            ("/v1/journeys", {"definition": journey}),
            ("/v1/journeys/dry-run", {"definition": journey, "profile": {}}),
        ):
            r = await h.client.post(path, headers=ADMIN, json=body)
            assert r.status_code == 400, r.text
            fields = {(e["field"], e["rule"]) for e in r.json()["errors"]}
            assert fields == {
                ("definition.messaging.quiet_hours.window.start", "time_of_day"),
                ("definition.messaging.quiet_hours.window.end", "time_of_day"),
            }
        assert (await h.client.get("/v1/journeys", headers=ADMIN)).json()["journeys"] == []


async def test_a_delay_of_zero_or_less_or_of_ages_is_refused(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        for duration in (0, "-PT1H", "P9999999D"):
            journey = {
                "name": "Delay",
                "entry": {"type": "event", "event": "Viewed"},
                "nodes": [
                    {"id": "start", "type": "entry"},
                    {"id": "wait", "type": "delay", "duration": duration},
                    {"id": "done", "type": "exit"},
                ],
                "edges": [{"from": "start", "to": "wait"}, {"from": "wait", "to": "done"}],
            }
            r = await h.client.post("/v1/journeys", headers=ADMIN, json={"definition": journey})
            assert r.status_code == 400, r.text
            [error] = r.json()["errors"]
            assert (error["field"], error["rule"]) == ("definition.nodes.1.delay.duration", "duration_range")


def chain(n: int) -> dict[str, Any]:
    """entry -> n trait updates -> exit."""
    steps = [{"id": f"t{i}", "type": "update_trait", "traits": {"step": i}} for i in range(n)]
    nodes = [{"id": "start", "type": "entry"}, *steps, {"id": "done", "type": "exit"}]
    return {
        "name": "Chain",
        "entry": {"type": "event", "event": "Viewed"},
        "nodes": nodes,
        "edges": [{"from": a["id"], "to": b["id"]} for a, b in itertools.pairwise(nodes)],
    }


async def test_unwritable_values_and_oversized_graphs_are_refused_not_500(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        big = chain(1)
        big["nodes"][1]["traits"] = {"balance": 2**64}
        r = await h.client.post("/v1/journeys", headers=ADMIN, json={"definition": big})
        assert r.status_code == 400, r.text
        assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [
            ("definition.nodes.1.update_trait.traits", "json_integer_range")
        ]
        # NaN is not JSON, but Python's parser reads it: refused rather than stored as null.
        raw = json.dumps(
            {
                "definition": chain(1)
                | {"goal": {"event": "x", "where": [{"field": "n", "op": "eq", "value": float("nan")}]}}
            }
        )
        r = await h.client.post(
            "/v1/journeys", headers=ADMIN | {"content-type": "application/json"}, content=raw
        )
        assert r.status_code == 400 and r.json()["errors"][0]["rule"] == "json_finite_number", r.text
        r = await h.client.post("/v1/journeys", headers=ADMIN, json={"definition": chain(1200)})
        assert r.status_code == 400, r.text
        assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [("definition.nodes", "too_long")]
        # The largest journey allowed saves and walks end to end.
        jid = await h.journey(chain(498))
        await h.track("c1", "Viewed")
        [row] = await h.instances(jid)
        assert (row.status, row.exit_reason) == ("exited", "completed")
        assert (await h.client.get("/v1/journeys", headers=ADMIN)).json()["journeys"][0]["id"] == jid


async def test_steps_naming_a_template_the_notifier_lacks_are_warned_about(make_settings: Any) -> None:
    """The notifier announces its templates on clm.templates.v1; a journey whose send step names one it
    does not have (or has for another channel) is saved with a warning on save, read, activation and
    dry run, since every such message would fail. Nothing is said before any template was announced."""
    from datetime import timedelta

    from shared.contracts import TEMPLATES, Channel, TemplateChanged
    from tests.support import eventually

    async with engine_running(make_settings) as h:
        c = h.client
        r = await c.post("/v1/journeys", json={"id": "early", "definition": CART_JOURNEY}, headers=ADMIN)
        assert r.status_code == 201 and r.json()["warnings"] == [], r.text  # no template known yet

        async def announce(template_id: str, channel: Channel, *, deleted: bool = False, at: int = 0) -> None:
            change = TemplateChanged(
                event_id=f"{template_id}:{deleted}:{at}",
                template_id=template_id,
                channel=channel,
                version=1,
                deleted=deleted,
                occurred_at=h.clock.now() + timedelta(seconds=at),
            )
            await h.platform.producer.publish(TEMPLATES.name, template_id, change)

        await announce("cart-reminder", Channel.SMS)
        await announce("welcome", Channel.EMAIL)

        async def known() -> bool:
            return await h.scalar("SELECT count(*) FROM known_templates") == 2

        await eventually(known, timeout=20)
        r = await c.post("/v1/journeys", json={"id": "cart", "definition": CART_JOURNEY}, headers=ADMIN)
        assert r.status_code == 201, r.text
        assert [(w["field"], w["rule"]) for w in r.json()["warnings"]] == [
            ("definition.nodes.reminder.template_id", "template_channel")
        ]
        assert "is for sms" in r.json()["warnings"][0]["message"]

        # The template is made an email one; a later deletion, announced out of order first, wins.
        await announce("cart-reminder", Channel.EMAIL, at=5)
        await announce("cart-reminder", Channel.EMAIL, deleted=True, at=10)
        await announce("cart-reminder", Channel.EMAIL, at=7)

        templates_consumer = h.platform.consumers[-1]
        assert templates_consumer.topic == h.settings.topic(TEMPLATES.name)

        async def all_applied() -> bool:  # the older at=7 too, after the deletion at=10
            return templates_consumer.processed >= 5

        await eventually(all_applied, timeout=20)
        assert await h.scalar("SELECT deleted FROM known_templates WHERE template_id = 'cart-reminder'")
        for r in (
            await c.get("/v1/journeys/cart", headers=ADMIN),
            await c.post("/v1/journeys/cart/activate", headers=ADMIN),
            await c.post(
                "/v1/journeys/dry-run",
                json={"definition": CART_JOURNEY, "profile": {"traits": {}}},
                headers=ADMIN,
            ),
        ):
            assert r.status_code == 200, r.text
            assert [(w["field"], w["rule"]) for w in r.json()["warnings"]] == [
                ("definition.nodes.reminder.template_id", "unknown_template")
            ]
        welcome = dict(
            CART_JOURNEY,
            nodes=[
                n if n["id"] != "reminder" else {**n, "template_id": "welcome"} for n in CART_JOURNEY["nodes"]
            ],
        )
        r = await c.put("/v1/journeys/cart", json={"definition": welcome}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["warnings"] == [], r.text


def named(branch: str, node: str, template: str, event: str, key: str) -> dict[str, Any]:
    """entry -> a condition whose branch `branch` always holds -> `node`, a send of `template` -> exit."""
    return {
        "name": "Names",
        "entry": {"type": "event", "event": event},
        "correlation_key": key,
        "nodes": [
            {"id": "start", "type": "entry"},
            {
                "id": "if",
                "type": "condition",
                "branches": [{"name": branch, "where": [{"field": "customer.id", "op": "exists"}]}],
            },
            {"id": node, "type": "send", "channel": "email", "template_id": template},
            {"id": "done", "type": "exit"},
        ],
        "edges": [
            {"from": "start", "to": "if"},
            {"from": "if", "to": node, "branch": branch},
            {"from": "if", "to": "done", "branch": "else"},
            {"from": node, "to": "done"},
        ],
    }


async def test_names_longer_than_their_keys_allow_are_refused_in_bytes(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        # A node id goes into its messages' ids (the message log's key): a 2,900-byte one was saved
        # with 201, and then failed every step at that node, holding back every journey's timers.
        long_id = "n" * 2900
        r = await h.client.post(
            "/v1/journeys", headers=ADMIN, json={"definition": named("a", long_id, "t", "E", "k")}
        )
        assert r.status_code == 400, r.text
        assert {(e["field"], e["rule"]) for e in r.json()["errors"]} == {
            ("definition.nodes.2.send.id", "max_bytes"),
            ("definition.edges.1.to", "max_bytes"),
            ("definition.edges.3.from", "max_bytes"),
        }
        assert r.json()["errors"][0]["message"] == "must be at most 1024 bytes in UTF-8 (it is 2900)"
        # Bytes, not characters: 513 two-byte characters are 1,026 bytes. Template ids as the
        # notifier takes them (a send naming another could only fail there).
        wide = "é" * 513
        for definition, field, rule in (
            (named(wide, "mail", "t", "E", "k"), "definition.nodes.1.condition.branches.0.name", "max_bytes"),
            (
                named("a", "mail", "a b", "E", "k"),
                "definition.nodes.2.send.template_id",
                "string_pattern_mismatch",
            ),
            (named("a", "mail", "t", "E" * 1025, "k"), "definition.entry.event.event", "max_bytes"),
            (named("a", "mail", "t", "E", "k" * 1025), "definition.correlation_key", "max_bytes"),
        ):
            r = await h.client.post("/v1/journeys", headers=ADMIN, json={"definition": definition})
            assert r.status_code == 400, r.text
            assert (r.json()["errors"][0]["field"], r.json()["errors"][0]["rule"]) == (field, rule)
        assert (await h.client.get("/v1/journeys", headers=ADMIN)).json()["journeys"] == []
        # At the limits: saved, and the long names work end to end (a 60-character Japanese node id,
        # 180 bytes, was refused by a 128-byte limit).
        at_limit, japanese, template = (
            "é" * 512,
            "カート放棄のリマインダー" * 5,
            "T" * 128,
        )  # 1,024, 180 bytes
        jid = await h.journey(named(at_limit, japanese, template, "É" * 512, at_limit))
        await h.track("c1", "É" * 512, {at_limit: "cart"})
        [row] = await h.instances(jid)
        assert (row.status, row.node_id, row.correlation) == ("exited", "done", "cart")
        [request] = await h.requests(until=lambda m: len(m) >= 1)
        assert request["node_id"] == japanese and request["template_id"] == template
        assert await h.scalar("SELECT count(*) FROM message_log WHERE node_id = :n", n=japanese) == 1
        long_node = await h.journey(named(at_limit, at_limit, "t", "E", "k"))
        await h.track("c1", "E")
        assert [(r.status, r.node_id) for r in await h.instances(long_node)] == [("exited", "done")]
        assert await h.scalar("SELECT count(*) FROM message_log WHERE node_id = :n", n=at_limit) == 1

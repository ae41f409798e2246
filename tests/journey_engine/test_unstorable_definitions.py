"""Definitions that pass the schema but cannot be stored or written as JSON: a 400 naming the field and
rule, nothing saved, never a 500."""

from __future__ import annotations

import copy
import json
from typing import Any

from tests.journey_engine.harness import ADMIN, Harness, engine_running
from tests.journey_engine.test_entry import SEND_AND_WAIT
from tests.journey_engine.test_timing_and_rules import linear

BASE = linear("Odd", "Signed Up", SEND_AND_WAIT)


def variant(**extra: Any) -> dict[str, Any]:
    return copy.deepcopy(BASE) | extra


def with_step(node: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    d["nodes"][1] = node | {"id": d["nodes"][1]["id"]}
    return d


async def saved(h: Harness) -> list[Any]:
    journeys: list[Any] = (await h.client.get("/v1/journeys", headers=ADMIN)).json()["journeys"]
    return journeys


async def test_an_entry_cap_past_32_bits_is_refused(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        for cap in (2**31, 3_000_000_000, 2**63):
            r = await h.client.post(
                "/v1/journeys", json={"definition": variant(entry_cap=cap)}, headers=ADMIN
            )
            assert r.status_code == 400, r.text
            assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [
                ("definition.entry_cap", "less_than_equal")
            ]
        assert await saved(h) == []
        jid = await h.journey(variant(entry_cap=2**31 - 1))  # the largest the column holds
        r = await h.client.put(
            f"/v1/journeys/{jid}", json={"definition": variant(entry_cap=2**31)}, headers=ADMIN
        )
        assert r.status_code == 400, r.text
        body = (await h.client.get(f"/v1/journeys/{jid}", headers=ADMIN)).json()
        assert (body["version"], body["definition"]["entry_cap"]) == (1, 2**31 - 1)


JSON = ADMIN | {"content-type": "application/json"}


async def test_a_lone_surrogate_is_refused_naming_the_field(make_settings: Any) -> None:
    """JSON may escape half a surrogate pair alone (`\\ud800`); it is no character, and writing it
    (orjson, asyncpg) raised: a 500 for a trait value, a message's data, a predicate's value, a plain
    text field the schema does not check, a dry run's customer id."""
    traits = with_step({"type": "update_trait", "traits": {"k": "SURR"}})
    data = copy.deepcopy(BASE)
    data["nodes"][1]["data"] = {"k": ["ok", "SURR"]}
    where = [{"field": "traits.x", "op": "eq", "value": "SURR"}]
    rule = "unpaired_surrogate"
    cases = {
        "traits": (traits, "definition.nodes.1.update_trait.traits", rule),
        "data": (data, "definition.nodes.1.send.data", rule),
        "predicate": (
            variant(entry=BASE["entry"] | {"where": where}),
            "definition.entry.event.where.0.value",
            rule,
        ),
        "until_trait": (
            with_step({"type": "delay", "until_trait": "SURR"}),
            "definition.nodes.1.until_trait",
            rule,
        ),
        "correlation_key": (variant(correlation_key="SURR"), "definition.correlation_key", rule),
        "name": (variant(name="SURR"), "definition.name", "string_unicode"),
        "event": (
            variant(entry={"type": "event", "event": "SURR"}),
            "definition.entry.event.event",
            "string_unicode",
        ),
    }
    async with engine_running(make_settings) as h:
        for case, (definition, field, expected) in cases.items():
            raw = json.dumps({"definition": definition}).replace("SURR", "\\ud800")
            for path in ("/v1/journeys", "/v1/journeys/dry-run"):
                r = await h.client.post(path, content=raw, headers=JSON)
                assert r.status_code == 400, (case, path, r.text)
                errors = [(e["field"], e["rule"]) for e in r.json()["errors"]]
                assert errors == [(field, expected)], (case, r.text)
        assert await saved(h) == []
        for body, field in (
            ({"customer_id": "SURR"}, "customer_id"),
            ({"profile": {"traits": {"x": "SURR"}}}, "profile.traits.x"),
            (
                {"profile": {}, "event": {"event": "Signed Up", "properties": {"SURR": 1}}},
                "event.properties.SURR",
            ),
        ):
            raw = json.dumps({"definition": BASE} | body).replace("SURR", "\\ud800")
            r = await h.client.post("/v1/journeys/dry-run", content=raw, headers=JSON)
            assert r.status_code == 400, r.text
            assert [(e["field"], e["rule"]) for e in r.json()["errors"]] == [
                (field.replace("SURR", "\\ud800"), rule)
            ], r.text
        # A pair escaped whole is a character like any other.
        raw = json.dumps({"definition": traits}).replace("SURR", "\\ud83d\\ude00")
        r = await h.client.post("/v1/journeys", content=raw, headers=JSON)
        assert r.status_code == 201, r.text
        assert r.json()["definition"]["nodes"][1]["traits"] == {"k": "\U0001f600"}


def odd_definitions() -> dict[str, dict[str, Any]]:
    """Definitions at the edges of the schema (the read-only hunt's sweep): each is refused with a 400
    or saved, activated and dry-run without a 500."""
    at = "2030-01-01T00:00:00Z"
    node_id = copy.deepcopy(BASE)
    node_id["nodes"][1]["id"] = node_id["edges"][0]["to"] = node_id["edges"][1]["from"] = "he\u0000llo"
    split = copy.deepcopy(BASE)
    split["nodes"].insert(
        1,
        {
            "id": "ab",
            "type": "split",
            "arms": [{"name": "a", "percent": 1e-9}, {"name": "b", "percent": 100 - 1e-9}],
        },
    )
    split["edges"][0]["to"] = "ab"
    split["edges"] += [
        {"from": "ab", "to": "hello", "branch": "a"},
        {"from": "ab", "to": "hello", "branch": "b"},
    ]
    return {
        "entry_cap_2e63": variant(entry_cap=2**63),
        "reentry_days_tiny": variant(reentry={"policy": "after", "days": 1e-300}),
        "local_time_leap": variant(
            entry={"type": "schedule", "segment_id": "s", "at": at, "local_time": "23:59:60"}
        ),
        "at_far_offset": variant(
            entry={"type": "schedule", "segment_id": "s", "at": "2999-12-31T23:59:59-23:59"}
        ),
        "every_longest": variant(entry={"type": "schedule", "segment_id": "s", "at": at, "every": "P3650D"}),
        "duration_float": with_step({"type": "delay", "duration": 1e-7}),
        "duration_negative": with_step({"type": "delay", "duration": "-P1D"}),
        "duration_huge": with_step({"type": "delay", "duration": 1e300}),
        "offset_huge": with_step({"type": "delay", "until_trait": "renewal", "offset": 1e300}),
        "until_trait_empty": with_step({"type": "delay", "until_trait": ""}),
        "until_trait_long": with_step({"type": "delay", "until_trait": "x" * 100_000}),
        "predicate_field_long": variant(
            entry={
                "type": "event",
                "event": "Signed Up",
                "where": [{"field": "x" * 200_000, "op": "eq", "value": 1}],
            }
        ),
        "name_nul": variant(name="a\u0000b"),
        "segment_nul": variant(entry={"type": "segment", "segment_id": "a\u0000b"}),
        "node_id_nul": node_id,
        "traits_key_nul": with_step({"type": "update_trait", "traits": {"a\u0000": 1}}),
        "goal_nul": variant(goal={"event": "a\u0000"}),
        "weekdays_twice": with_step({"type": "delay", "until_time": "10:00", "weekdays": ["mon", "mon"]}),
        "split_tiny_percent": split,
    }


async def test_definitions_at_the_schemas_edges_never_answer_500(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        answers = {}
        for case, definition in odd_definitions().items():
            r = await h.client.post("/v1/journeys", json={"definition": definition}, headers=ADMIN)
            answers[case] = [r.status_code]
            if r.status_code == 201:
                jid = r.json()["id"]
                r = await h.client.post(f"/v1/journeys/{jid}/activate", headers=ADMIN)
                answers[case].append(r.status_code)
            dry = {
                "definition": definition,
                "profile": {"traits": {"renewal": "2026-02-01"}},
                "event": {"event": "Signed Up"},
            }
            r = await h.client.post("/v1/journeys/dry-run", json=dry, headers=ADMIN)
            answers[case].append(r.status_code)
        assert {case: codes for case, codes in answers.items() if max(codes) >= 500} == {}
        assert answers["entry_cap_2e63"] == [400, 400]

"""Every kind of bad input gets its documented 4xx naming the field and the rule; nothing is published."""

from __future__ import annotations

import gzip
from typing import Any

import httpx
import orjson
import pytest

from services.ingest.settings import IngestSettings
from tests.ingest.conftest import AUTH, events_on_topic

JSON = {"Content-Type": "application/json"}


def nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


# (path, body (bytes or JSON), extra headers, status, field, rule)
CASES: list[tuple[str, Any, dict[str, str], int, str, str]] = [
    ("/v1/track", b"{not json", {}, 400, "body", "json_invalid"),
    ("/v1/track", b"", {}, 400, "body", "json_invalid"),
    ("/v1/track", [1, 2], {}, 400, "body", "object_type"),
    ("/v1/track", {"event": "No One"}, {}, 400, "userId", "required_one_of"),
    ("/v1/track", {"userId": "", "event": "Empty Id"}, {}, 400, "userId", "required_one_of"),
    ("/v1/track", {"userId": "u1"}, {}, 400, "event", "required"),
    ("/v1/track", {"userId": "u1", "event": ""}, {}, 400, "event", "required"),
    ("/v1/track", {"userId": "u1", "event": 7}, {}, 400, "event", "string_type"),
    ("/v1/track", {"userId": "u1", "event": "E", "properties": [1]}, {}, 400, "properties", "dict_type"),
    ("/v1/track", {"userId": {"id": 1}, "event": "E"}, {}, 400, "userId", "string_type"),
    (
        "/v1/track",
        {"userId": "u1", "event": "E", "timestamp": "yesterday"},
        {},
        400,
        "timestamp",
        "datetime_from_date_parsing",
    ),
    ("/v1/identify", {"userId": "u1", "traits": "vip"}, {}, 400, "traits", "dict_type"),
    ("/v1/identify", {"userId": "u1", "context": 3}, {}, 400, "context", "dict_type"),
    ("/v1/alias", {"userId": "u1"}, {}, 400, "previousId", "required"),
    ("/v1/group", {"userId": "u1"}, {}, 400, "groupId", "required"),
    ("/v1/page", {"userId": "u1", "name": ["x"]}, {}, 400, "name", "string_type"),
    # Ids and names are index keys downstream (2,704 bytes an entry): limited in UTF-8 bytes.
    ("/v1/track", {"userId": "u" * 512, "event": "界" * 1024}, {}, 400, "event", "max_bytes"),
    ("/v1/identify", {"userId": "界" * 200, "traits": {}}, {}, 400, "userId", "max_bytes"),
    (
        "/v1/batch",
        {"batch": [{"type": "alias", "userId": "u1", "previousId": "é" * 300}]},
        {},
        400,
        "batch.0.previousId",
        "max_bytes",
    ),
    (
        "/v1/track",
        {"userId": "u1", "event": "E", "properties": {"big": "x" * 33_000}},
        {},
        413,
        "body",
        "max_size",
    ),
    (
        "/v1/batch",
        {"batch": [{"type": "track", "userId": "u", "event": "E", "properties": {"p": "x" * 20_000}}] * 26},
        {},
        413,
        "body",
        "max_size",
    ),
    # U+0000 anywhere: PostgreSQL stores it nowhere, so every consumer would dead-letter the event.
    (
        "/v1/track",
        {"userId": "u1", "event": "E", "properties": {"a": ["ok", "b\x00"]}},
        {},
        400,
        "properties.a.1",
        "no_nul_character",
    ),
    ("/v1/identify", {"userId": "u\x00", "traits": {}}, {}, 400, "userId", "no_nul_character"),
    (
        "/v1/track",
        {"userId": "u1", "event": "E", "context": {"k\x00": 1}},
        {},
        400,
        "context.k\x00",
        "no_nul_character",
    ),
    (
        "/v1/batch",
        {"batch": [{"type": "track", "userId": "u1", "event": "E\x00"}]},
        {},
        400,
        "batch.0.event",
        "no_nul_character",
    ),
    (
        "/v1/batch",
        {"batch": [{"type": "track", "userId": "u1", "event": "E"}], "context": {"ip": "1\x00"}},
        {},
        400,
        "batch.0.context.ip",
        "no_nul_character",
    ),
    # Times every consumer can compute with (0001-01-01 and 9999-12-31 overflowed downstream).
    (
        "/v1/track",
        {"userId": "u1", "event": "E", "timestamp": "0001-01-01T00:00:00Z"},
        {},
        400,
        "timestamp",
        "range",
    ),
    (
        "/v1/track",
        {"userId": "u1", "event": "E", "originalTimestamp": "9999-12-31T00:00:00"},
        {},
        400,
        "originalTimestamp",
        "range",
    ),
    (
        "/v1/batch",
        {"batch": [{"type": "track", "userId": "u1", "event": "E", "sentAt": "1899-12-31T23:59:59Z"}]},
        {},
        400,
        "batch.0.sentAt",
        "range",
    ),
    ("/v1/batch", {"batch": [], "sentAt": "3000-01-01T00:00:00Z"}, {}, 400, "sentAt", "range"),
    # Deeper than every consumer can write (orjson stops at 254 levels; this was a 500 from 400 on).
    (
        "/v1/track",
        {"userId": "u1", "event": "E", "properties": nested(64)},
        {},
        400,
        "properties" + ".a" * 63,
        "max_depth",
    ),
    (
        "/v1/batch",
        {"batch": [{"type": "track", "userId": "u1", "event": "E", "properties": nested(200)}]},
        {},
        400,
        "batch.0.properties" + ".a" * 63,
        "max_depth",
    ),
    (  # past orjson's 254 levels: written by hand (this was a 500)
        "/v1/batch",
        b'{"batch": [{"type": "track", "userId": "u1", "event": "E", "properties": '
        + b'{"a": ' * 300
        + b"1"
        + b"}" * 300
        + b"}]}",
        {},
        400,
        "batch.0.properties" + ".a" * 63,
        "max_depth",
    ),
    (
        "/v1/batch",
        {"batch": [{"type": "track", "userId": "u1", "event": "E"}], "context": nested(70)},
        {},
        400,
        "context" + ".a" * 63,
        "max_depth",
    ),
    # Batch-level context and integrations of another type were ignored (200, published without them).
    (
        "/v1/batch",
        {"batch": [{"type": "track", "userId": "u1", "event": "E"}], "context": [1]},
        {},
        400,
        "context",
        "dict_type",
    ),
    (
        "/v1/batch",
        {"batch": [{"type": "track", "userId": "u1", "event": "E"}], "integrations": "x"},
        {},
        400,
        "integrations",
        "dict_type",
    ),
    ("/v1/batch", {"batch": "nope"}, {}, 400, "batch", "list_type"),
    ("/v1/batch", {"events": []}, {}, 400, "batch", "missing"),
    ("/v1/batch", {"batch": [], "sentAt": "soon"}, {}, 400, "sentAt", "datetime_from_date_parsing"),
    ("/v1/batch", {"batch": [{"userId": "u1", "event": "E"}]}, {}, 400, "batch.0.type", "missing"),
    (
        "/v1/batch",
        {"batch": [{"type": "track", "userId": "u1", "event": "E", "properties": {"p": "x" * 33_000}}]},
        {},
        400,
        "batch.0",
        "max_size",
    ),
    ("/v1/track", b"\x1f\x8bnot really gzip", {"Content-Encoding": "gzip"}, 400, "body", "gzip_invalid"),
    (
        "/v1/track",
        gzip.compress(b"{" + b" " * 40_000 + b"}"),
        {"Content-Encoding": "gzip"},
        413,
        "body",
        "max_size",
    ),
    (
        "/v1/track",
        b'{"userId":"u1","event":"E"}',
        {"Content-Encoding": "br"},
        415,
        "Content-Encoding",
        "enum",
    ),
]


async def test_bad_input_is_refused_with_field_and_rule_and_nothing_is_published(
    client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    for path, body, headers, status, field, rule in CASES:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        response = await client.post(path, content=content, headers={**JSON, **headers}, auth=AUTH)
        assert response.status_code == status, (path, body if len(content) < 200 else field, response.text)
        answer = response.json()
        assert {"field": field, "rule": rule} in [
            {"field": e["field"], "rule": e["rule"]} for e in answer["errors"]
        ], (
            path,
            answer,
        )
        assert answer["error"] and answer["message"]
    assert await events_on_topic(settings, idle=1.5) == []


@pytest.mark.parametrize(
    "auth_header",
    [None, "Basic d3Jvbmc6", "Bearer wrong", "Basic !!!notbase64", "Token test-write-key-0123456789"],
)
async def test_missing_or_wrong_write_key_gets_401(
    client: httpx.AsyncClient, settings: IngestSettings, auth_header: str | None
) -> None:
    headers = {"Authorization": auth_header} if auth_header else {}
    ok = {"userId": "u1", "event": "E"}
    assert (await client.post("/v1/track", json=ok, headers=headers)).status_code == 401
    assert (
        await client.post("/v1/batch", json={"batch": [{"type": "track", **ok}]}, headers=headers)
    ).status_code == 401
    assert (await client.post("/v1/import", content=b"", headers=headers)).status_code == 401
    r = await client.post("/v1/track", json={**ok, "writeKey": "also-wrong"}, headers=headers)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert await events_on_topic(settings, idle=0.5) == []

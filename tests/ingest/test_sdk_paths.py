"""The other Segment SDKs' requests, shaped as their sources send them: analytics.js (short paths,
text/plain, the write key in the body, CORS), analytics-kotlin/-swift (`/v1/b`) and
analytics-android v4 (a gzip JSON batch to `/v1/import`)."""

from __future__ import annotations

import gzip
from typing import Any

import httpx
import orjson
import pytest

from services.ingest.app import create_app
from services.ingest.settings import IngestSettings
from shared.clock import ManualClock
from shared.contracts import CustomerEvent
from tests.ingest.conftest import ADMIN, AUTH, WRITE_KEY, events_on_topic
from tests.support import running

ORIGIN = "https://shop.example.com"
TEXT = {"Content-Type": "text/plain", "Origin": ORIGIN}


def browser_call(kind: str, message_id: str, **fields: Any) -> dict[str, Any]:
    """A call as analytics.js's segmentio plugin sends it (after `normalize`)."""
    return {
        "type": kind,
        "messageId": message_id,
        "timestamp": "2026-11-29T21:00:00.000Z",
        "sentAt": "2026-11-29T21:00:00.010Z",
        "anonymousId": "0b2e4c1a-1111-2222-3333-444455556666",
        "userId": None,
        "integrations": {},
        "context": {
            "page": {"path": "/cart", "referrer": "", "search": "", "title": "Cart", "url": f"{ORIGIN}/cart"},
            "userAgent": "Mozilla/5.0",
            "locale": "nb-NO",
            "timezone": "Europe/Oslo",
            "library": {"name": "analytics.js", "version": "next-1.70.0"},
        },
        "writeKey": WRITE_KEY,
        "_metadata": {"bundled": ["Segment.io"], "unbundled": [], "bundledIds": []},
        **fields,
    }


async def test_analytics_js_single_calls_on_short_paths(
    client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    calls = {
        "t": browser_call("track", "ajs-1", event="Product Added", properties={"sku": "A1"}),
        "p": browser_call("page", "ajs-2", name="Cart", properties={"path": "/cart"}),
        "i": browser_call("identify", "ajs-3", userId="u-7", traits={"email": "ada@example.com"}),
        "a": browser_call("alias", "ajs-4", userId="u-7", previousId="0b2e4c1a-1111-2222-3333-444455556666"),
        "g": browser_call("group", "ajs-5", userId="u-7", groupId="acme", traits={"name": "Acme"}),
        "s": browser_call("screen", "ajs-6", name="Home"),
    }
    for path, call in calls.items():
        response = await client.post(f"/v1/{path}", content=orjson.dumps(call), headers=TEXT)
        assert response.status_code == 200, (path, response.text)
        assert response.json() == {"success": True}
        assert response.headers["access-control-allow-origin"] == "*"

    events = {
        e.message_id: e
        for e in (CustomerEvent.model_validate(m["value"]) for m in await events_on_topic(settings, count=6))
    }
    assert {e.type.value for e in events.values()} == {
        "track",
        "page",
        "identify",
        "alias",
        "group",
        "screen",
    }
    track = events["ajs-1"]
    assert track.event == "Product Added" and track.properties == {"sku": "A1"}
    assert track.user_id is None and track.anonymous_id == "0b2e4c1a-1111-2222-3333-444455556666"
    assert track.context["timezone"] == "Europe/Oslo"
    assert events["ajs-3"].traits == {"email": "ada@example.com"}


async def test_a_browser_batch_on_v1_b_and_its_preflight(
    client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    # With custom headers configured, the browser asks first.
    preflight = await client.options(
        "/v1/b",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-tenant",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "x-tenant" in preflight.headers["access-control-allow-headers"].lower()

    # analytics.js's batching dispatcher (and analytics-kotlin/-swift): one body, sentAt once.
    items = [browser_call("track", f"b-{i}", event="Product Viewed") for i in range(3)]
    for item in items:
        del item["sentAt"]
    body = {"writeKey": WRITE_KEY, "batch": items, "sentAt": "2026-11-29T21:00:01.000Z"}
    response = await client.post("/v1/b", content=orjson.dumps(body), headers=TEXT)
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 3
    assert response.headers["access-control-allow-origin"] == "*"
    events = [CustomerEvent.model_validate(m["value"]) for m in await events_on_topic(settings, count=3)]
    assert sorted(e.message_id for e in events) == ["b-0", "b-1", "b-2"]


async def test_refusals_carry_cors_headers_so_the_sdk_can_read_them(client: httpx.AsyncClient) -> None:
    unknown_key = browser_call("track", "ajs-x", event="E", writeKey="not-a-key")
    response = await client.post("/v1/t", content=orjson.dumps(unknown_key), headers=TEXT)
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == "*"
    invalid = browser_call("track", "ajs-y")  # no event name
    response = await client.post("/v1/t", content=orjson.dumps(invalid), headers=TEXT)
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "event"
    assert response.headers["access-control-allow-origin"] == "*"


async def test_admin_routes_answer_no_cross_origin_requests(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin/write-keys", headers={**ADMIN, "Origin": ORIGIN})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    preflight = await client.options(
        "/admin/write-keys", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


async def test_the_audit_log_under_v1_answers_no_cross_origin_requests(client: httpx.AsyncClient) -> None:
    """`GET /v1/audit` is an admin route although its path is under /v1/ like the tracking routes."""
    response = await client.get("/v1/audit", headers={**ADMIN, "Origin": "https://evil.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    preflight = await client.options(
        "/v1/audit",
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert "access-control-allow-origin" not in preflight.headers
    # The tracking routes still do.
    call = orjson.dumps(browser_call("track", "ajs-cors", event="E", writeKey=WRITE_KEY))
    tracked = await client.post("/v1/t", content=call, headers=TEXT)
    assert tracked.status_code == 200 and tracked.headers["access-control-allow-origin"] == "*"


async def test_cors_origins_are_a_setting(make_settings: Any) -> None:
    settings: IngestSettings = make_settings(
        IngestSettings,
        write_keys=[WRITE_KEY],
        cors_allow_origins="https://shop.example.com, https://b.example",
    )
    async with running(create_app(settings, ManualClock())) as client:
        call = orjson.dumps(browser_call("track", "o-1", event="E"))
        allowed = await client.post("/v1/t", content=call, headers=TEXT)
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        other = await client.post("/v1/t", content=call, headers={**TEXT, "Origin": "https://evil.example"})
        assert other.status_code == 200  # the event itself is fine; the browser hides the answer
        assert "access-control-allow-origin" not in other.headers
    off: IngestSettings = make_settings(IngestSettings, write_keys=[WRITE_KEY], cors_allow_origins="")
    assert off.cors_allow_origins == []
    async with running(create_app(off, ManualClock())) as client:
        response = await client.post("/v1/t", content=call, headers=TEXT)
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers


async def test_analytics_android_batches_to_v1_import_are_a_batch_not_lost(
    client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    """analytics-android v4 posts gzip JSON `{"batch": [...]}` with Basic auth to /v1/import and
    drops its queue on a 200: read as an NDJSON import it was refused line by line under a 200."""
    batch = {
        "batch": [
            {
                "type": "track",
                "messageId": f"android-{i}",
                "anonymousId": "device-1",
                "event": "Application Opened",
                "timestamp": "2026-11-29T20:59:00Z",
                "context": {"library": {"name": "analytics-android", "version": "4.11.3"}},
            }
            for i in range(2)
        ],
        "sentAt": "2026-11-29T21:00:00Z",
    }
    response = await client.post(
        "/v1/import",
        content=gzip.compress(orjson.dumps(batch)),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        auth=AUTH,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True, "accepted": 2, "duplicates": 0}
    events = [CustomerEvent.model_validate(m["value"]) for m in await events_on_topic(settings, count=2)]
    assert sorted(e.message_id for e in events) == ["android-0", "android-1"]

    # A batch that is wrong as a whole is a 4xx the SDK keeps its events for, never a 200.
    wrong = await client.post(
        "/v1/import",
        content=orjson.dumps({"calls": []}),
        headers={"Content-Type": "application/json"},
        auth=AUTH,
    )
    assert wrong.status_code == 400
    assert wrong.json()["errors"][0]["field"] == "batch"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
async def test_a_json_import_with_the_admin_token_is_accepted_as_a_backfill(
    client: httpx.AsyncClient, settings: IngestSettings, scheme: str
) -> None:
    """The docs say imports accept the admin token: a JSON body (a Segment batch) too, not only NDJSON
    (it was handled exactly as /v1/batch, which took the admin token for a write key: 401)."""
    token = ADMIN["Authorization"].split(" ", 1)[1]
    batch = {
        "batch": [
            {
                "type": "track",
                "userId": "u1",
                "event": "E",
                "messageId": "adm-1",
                "timestamp": "2020-01-01T00:00:00Z",
            }
        ]
    }
    response = await client.post(
        "/v1/import",
        content=orjson.dumps(batch),
        headers={"Content-Type": "application/json", "Authorization": f"{scheme} {token}"},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True, "accepted": 1, "duplicates": 0}
    (message,) = await events_on_topic(settings, count=1)
    event = CustomerEvent.model_validate(message["value"])
    assert event.message_id == "adm-1" and event.source == "backfill"

    # A wrong token is still no write key.
    wrong = await client.post(
        "/v1/import",
        content=orjson.dumps(batch),
        headers={"Content-Type": "application/json", "Authorization": f"{scheme} not-the-token"},
    )
    assert wrong.status_code == 401

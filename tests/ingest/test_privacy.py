"""Ingest on clm.privacy.v1 (holds no customer data, still confirms and answers), and its audit log."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from fastapi import FastAPI

from services.ingest.settings import IngestSettings
from shared.contracts import PRIVACY, PrivacyAction, PrivacyRequest
from tests.ingest.conftest import ADMIN, AUTH
from tests.support import read_topic


async def test_confirms_erasure_and_answers_export_once_each(
    app: FastAPI, client: httpx.AsyncClient, settings: IngestSettings
) -> None:
    producer = app.state.platform.producer
    for action in (PrivacyAction.ERASE_REQUESTED, PrivacyAction.EXPORT_REQUESTED):
        msg = PrivacyRequest(
            event_id=f"r-{action.value}:segmenter:{action.value}",
            request_id=f"r-{action.value}",
            action=action,
            customer_id="c1",
            identities=["c1", "u1"],
            service="segmenter",
            occurred_at=datetime.now(UTC),
        )
        await producer.publish(PRIVACY.name, "c1", msg)
        await producer.publish(PRIVACY.name, "c1", msg)
    topic = settings.topic(PRIVACY.name)
    await read_topic(
        topic, until=lambda ms: sum(m["value"]["service"] == "ingest" for m in ms) >= 2, timeout=20
    )
    answers = [
        m["value"] for m in await read_topic(topic, idle=0.5, timeout=8) if m["value"]["service"] == "ingest"
    ]
    assert sorted((a["event_id"], a["customer_id"]) for a in answers) == [
        ("r-erase_requested:ingest:erase_completed", "c1"),
        ("r-export_requested:ingest:export_part", "c1"),
    ]
    part = next(a for a in answers if a["action"] == "export_part")
    assert part["data"]["holds"] == [] and "messageIds" in part["data"]["note"]


async def test_admin_mutations_are_audited_tracking_is_not(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/admin/write-keys", json={"name": "web"}, headers={**ADMIN, "X-Request-ID": "req-1"}
    )
    assert r.status_code == 201 and r.headers["x-request-id"] == "req-1"
    key_id = r.json()["id"]
    assert (await client.post("/admin/write-keys", json={"name": ""}, headers=ADMIN)).status_code == 400
    assert (await client.post("/v1/track", json={"userId": "u1", "event": "E"}, auth=AUTH)).status_code == 200
    assert (await client.delete(f"/admin/write-keys/{key_id}", headers=ADMIN)).status_code in (200, 204)

    entries = (await client.get("/v1/audit", headers=ADMIN)).json()["entries"]
    assert [(e["method"], e["path"]) for e in entries] == [
        ("DELETE", f"/admin/write-keys/{key_id}"),
        ("POST", "/admin/write-keys"),
    ]
    assert entries[1]["request_id"] == "req-1" and entries[1]["actor"].startswith("admin:")
    assert "test-admin-token" not in str(entries)
    page = (await client.get("/v1/audit", headers=ADMIN, params={"limit": 1})).json()
    assert len(page["entries"]) == 1
    rest = (await client.get("/v1/audit", headers=ADMIN, params={"before": page["next_before"]})).json()
    assert [e["method"] for e in rest["entries"]] == ["POST"]
    assert (await client.get("/v1/audit")).status_code == 401


async def test_admin_actions_are_audited_however_the_guard_read_their_token(
    client: httpx.AsyncClient,
) -> None:
    """The audit log compared the header byte for byte with `Bearer <token>`, while the admin guard
    reads the scheme in any case (RFC 7235) and the first of several headers: an admin could act
    unrecorded by writing `bearer`, or by adding a second Authorization header."""
    token = ADMIN["Authorization"].split(" ", 1)[1]
    lower = {"Authorization": f"bearer {token}"}
    created = await client.post("/admin/write-keys", json={"name": "quiet"}, headers=lower)
    assert created.status_code == 201, created.text
    key_id = created.json()["id"]
    revoked = await client.delete(
        f"/admin/write-keys/{key_id}",
        headers=[("Authorization", f"BEARER   {token}  "), ("Authorization", "Bearer something-else")],
    )
    assert revoked.status_code == 200, revoked.text
    entries = (await client.get("/v1/audit", headers=ADMIN)).json()["entries"]
    assert [(e["method"], e["path"]) for e in entries] == [
        ("DELETE", f"/admin/write-keys/{key_id}"),
        ("POST", "/admin/write-keys"),
    ]
    # A wrong token gets nothing done, and nothing recorded.
    refused = await client.post(
        "/admin/write-keys", json={"name": "x"}, headers={"Authorization": "bearer no"}
    )
    assert refused.status_code == 401
    assert len((await client.get("/v1/audit", headers=ADMIN)).json()["entries"]) == 2

"""Privacy across the four services: export, erasure with its receipt, no resurrection, audit log."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import httpx

from tests.e2e.conftest import WRITE_KEY, Platform
from tests.support import eventually, infra

SERVICES = ("segmenter", "ingest", "journey_engine", "notifier")


async def rows(platform: Platform, service: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Read a service's own schema directly: what the service keeps, not what its API chooses to show."""
    conn = await asyncpg.connect(infra()[1])
    try:
        schema = f"{service}_{platform.processes.namespace}"
        await conn.execute(f'SET search_path TO "{schema}"')
        return [dict(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def send(c: httpx.AsyncClient, p: Platform, kind: str, body: dict[str, Any]) -> None:
    r = await c.post(f"{p.url('ingest')}/v1/{kind}", json=body, auth=(WRITE_KEY, ""))
    assert r.status_code == 200, r.text


async def test_export_then_erase_everywhere_with_a_receipt_and_an_audit_trail(platform: Platform) -> None:
    s = uuid.uuid4().hex[:6]
    user, address = f"gdpr-{s}", f"gdpr-{s}@example.com"
    actor = {**platform.admin, "X-CLM-Actor": "dpo@example.com"}
    async with httpx.AsyncClient(timeout=30) as c:
        # Admin set-up, each one audited by its service.
        r = await c.post(
            f"{platform.url('ingest')}/admin/write-keys", headers=actor, json={"name": f"web-{s}"}
        )
        assert r.status_code == 201, r.text
        r = await c.post(
            f"{platform.url('segmenter')}/v1/segments",
            headers=actor,
            json={"name": f"signed-up-{s}", "definition": {"performed": "Signed Up"}},
        )
        assert r.status_code == 201, r.text
        r = await c.post(
            f"{platform.url('notifier')}/v1/templates",
            headers=actor,
            json={
                "id": f"welcome-{s}",
                "name": "Welcome",
                "channel": "email",
                "variants": {
                    "en": {
                        "subject": f"Welcome {s}",
                        "html": "<p>Hi</p>",
                        "text": "Hi {{ traits.first_name }}",
                    }
                },
            },
        )
        assert r.status_code in (200, 201), r.text
        journey = f"welcome-{s}"
        r = await c.post(
            f"{platform.url('journey_engine')}/v1/journeys",
            headers=actor,
            json={
                "id": journey,
                "definition": {
                    "name": "Welcome, then wait a day",
                    "entry": {"type": "event", "event": "Signed Up"},
                    "nodes": [
                        {"id": "start", "type": "entry"},
                        {"id": "hello", "type": "send", "channel": "email", "template_id": f"welcome-{s}"},
                        {"id": "later", "type": "delay", "duration": "P1D"},
                        {"id": "done", "type": "exit"},
                    ],
                    "edges": [
                        {"from": "start", "to": "hello"},
                        {"from": "hello", "to": "later"},
                        {"from": "later", "to": "done"},
                    ],
                },
            },
        )
        assert r.status_code in (200, 201), r.text
        r = await c.post(f"{platform.url('journey_engine')}/v1/journeys/{journey}/activate", headers=actor)
        assert r.status_code == 200, r.text

        # A customer with a profile, a journey instance (waiting a day) and a sent message.
        await send(
            c, platform, "identify", {"userId": user, "traits": {"email": address, "first_name": "Eve"}}
        )
        await eventually(
            lambda: _ok(c.get(f"{platform.url('segmenter')}/v1/customers/{user}", headers=platform.admin)),
            timeout=20,
        )
        await send(c, platform, "track", {"userId": user, "event": "Signed Up"})
        await eventually(lambda: platform.mails_to(address), timeout=30)
        await eventually(
            lambda: rows(platform, "journey_engine", "SELECT id FROM instances WHERE customer_id = $1", user)
        )
        # The journey engine can send before the segmenter (it batches its fetches) has the event.
        await eventually(lambda: _timeline_has(c, platform, user, "Signed Up"), timeout=20)

        # Export: one document with every service's part.
        r = await c.get(f"{platform.url('segmenter')}/v1/customers/{address}/export", headers=actor)
        assert r.status_code == 200, r.text
        export = r.json()
        assert sorted(export["services"]) == sorted(SERVICES) and export["missing"] == []
        seg = export["services"]["segmenter"]
        assert seg["customers"][0]["traits"]["first_name"] == "Eve"
        assert {e["event"] for e in seg["events"]} >= {"Signed Up"}
        assert [i["journey_id"] for i in export["services"]["journey_engine"]["instances"]] == [journey]
        assert export["services"]["notifier"]["contacts"][0]["email"] == address
        assert [m["template_id"] for m in export["services"]["notifier"]["messages"]] == [f"welcome-{s}"]
        assert "holds" in export["services"]["ingest"]

        # Erase, by userId.
        r = await c.delete(f"{platform.url('segmenter')}/v1/customers/{user}", headers=actor)
        assert r.status_code == 202, r.text
        request_id = r.json()["request_id"]

        async def receipt() -> dict[str, Any] | None:
            got = await c.get(
                f"{platform.url('segmenter')}/v1/privacy/requests/{request_id}", headers=platform.admin
            )
            body: dict[str, Any] = got.json()
            return body if body["status"] == "completed" else None

        done = await eventually(receipt, timeout=30, interval=0.2)
        assert {k: v["status"] for k, v in done["services"].items()} == dict.fromkeys(SERVICES, "completed")
        assert all(v["completed_at"] for v in done["services"].values())

        # Gone everywhere.
        r = await c.get(f"{platform.url('segmenter')}/v1/customers/{user}", headers=platform.admin)
        assert r.status_code == 404
        assert (
            await rows(platform, "journey_engine", "SELECT id FROM instances WHERE customer_id = $1", user)
            == []
        )
        assert (
            await rows(platform, "journey_engine", "SELECT 1 FROM customers WHERE customer_id = $1", user)
            == []
        )
        assert await rows(platform, "notifier", "SELECT 1 FROM contacts WHERE customer_id = $1", user) == []
        ledger = await rows(
            platform, "notifier", "SELECT request::text AS r FROM send_ledger WHERE customer_id = $1", user
        )
        assert ledger and all(address not in row["r"] and "Eve" not in row["r"] for row in ledger)
        for service in ("segmenter", "journey_engine", "notifier"):
            text_dump = await rows(platform, service, "SELECT identity_hash FROM erasure_tombstones")
            assert text_dump and all(user not in row["identity_hash"] for row in text_dump)

        # Later events with the same userId bring nothing back and send nothing.
        await send(c, platform, "identify", {"userId": user, "traits": {"email": address, "plan": "pro"}})
        await send(c, platform, "track", {"userId": user, "event": "Signed Up"})
        marker = f"marker-{s}"
        await send(c, platform, "identify", {"userId": marker, "traits": {"email": f"{marker}@example.com"}})
        # Processed after the later events (same topic, and the consumers are caught up once this shows).
        await eventually(
            lambda: _ok(c.get(f"{platform.url('segmenter')}/v1/customers/{marker}", headers=platform.admin)),
            timeout=20,
        )
        await asyncio.sleep(2)
        r = await c.get(f"{platform.url('segmenter')}/v1/customers/{user}", headers=platform.admin)
        assert r.status_code == 404
        assert len(platform.mails_to(address)) == 1
        assert (
            await rows(platform, "journey_engine", "SELECT id FROM instances WHERE customer_id = $1", user)
            == []
        )

        # The audit trail: who did what, in each service.
        expected = {
            "ingest": ("POST", "/admin/write-keys"),
            "segmenter": ("POST", "/v1/segments"),
            "notifier": ("POST", "/v1/templates"),
            "journey_engine": ("POST", f"/v1/journeys/{journey}/activate"),
        }
        for service, (method, path) in expected.items():
            r = await c.get(
                f"{platform.url(service)}/v1/audit", headers=platform.admin, params={"path_prefix": path}
            )
            assert r.status_code == 200, r.text
            entries = [e for e in r.json()["entries"] if e["method"] == method and e["path"] == path]
            assert entries, (service, r.json())
            assert entries[0]["actor_name"] == "dpo@example.com" and entries[0]["actor"].startswith("admin:")
            assert 200 <= entries[0]["status"] < 300 and entries[0]["request_id"]
        r = await c.get(
            f"{platform.url('segmenter')}/v1/audit", headers=platform.admin, params={"method": "DELETE"}
        )
        assert [e["path"] for e in r.json()["entries"]] == [f"/v1/customers/{user}"]
        r = await c.get(
            f"{platform.url('segmenter')}/v1/audit",
            headers=platform.admin,
            params={"path_prefix": f"/v1/customers/{address}/export"},
        )
        assert [e["method"] for e in r.json()["entries"]] == ["GET"]


async def _ok(response: Any) -> bool:
    r = await response
    return bool(r.status_code == 200)


async def _timeline_has(c: httpx.AsyncClient, platform: Platform, user: str, event: str) -> bool:
    r = await c.get(f"{platform.url('segmenter')}/v1/customers/{user}/events", headers=platform.admin)
    return r.status_code == 200 and any(e.get("event") == event for e in r.json()["events"])

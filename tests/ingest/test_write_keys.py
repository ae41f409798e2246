"""Write keys: created once (shown once), listed by prefix only, stored hashed, refused once revoked."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import text

from services.ingest.app import create_app
from services.ingest.settings import IngestSettings
from shared.clock import ManualClock
from tests.ingest.conftest import ADMIN, WRITE_KEY, events_on_topic
from tests.support import running

TRACK = {"userId": "u1", "event": "E"}


async def test_create_list_revoke(app: FastAPI, client: httpx.AsyncClient, settings: IngestSettings) -> None:
    assert (await client.post("/admin/write-keys", json={"name": "web"})).status_code == 401
    assert (
        await client.get("/admin/write-keys", headers={"Authorization": "Bearer nope"})
    ).status_code == 401
    assert (await client.post("/admin/write-keys", json={"name": ""}, headers=ADMIN)).status_code == 400

    created = await client.post("/admin/write-keys", json={"name": "web"}, headers=ADMIN)
    assert created.status_code == 201
    key, key_id = created.json()["key"], created.json()["id"]
    assert len(key) >= 40 and key.startswith(created.json()["prefix"])

    listed = (await client.get("/admin/write-keys", headers=ADMIN)).json()
    assert {k["name"] for k in listed} == {"seeded", "web"}
    assert all("key" not in k for k in listed)
    assert not any(WRITE_KEY in str(v) or key in str(v) for k in listed for v in k.values())

    async with app.state.platform.engine.connect() as conn:
        stored = [tuple(r) for r in await conn.execute(text("SELECT * FROM write_keys"))]
    assert not any(key in str(value) or WRITE_KEY in str(value) for row in stored for value in row)

    assert (
        await client.post("/v1/track", json={**TRACK, "messageId": "before"}, auth=(key, ""))
    ).status_code == 200
    revoked = await client.delete(f"/admin/write-keys/{key_id}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revokedAt"] is not None
    for auth in ({"auth": (key, "")}, {"headers": {"Authorization": f"Bearer {key}"}}):
        response = await client.post("/v1/track", json={**TRACK, "messageId": "after"}, **auth)
        assert response.status_code == 401
    assert (await client.delete("/admin/write-keys/unknown", headers=ADMIN)).status_code == 404

    assert [m["value"]["messageId"] for m in await events_on_topic(settings)] == ["before"]


async def test_a_revoke_reaches_other_replicas_within_the_cache_ttl(
    settings: IngestSettings, clock: ManualClock
) -> None:
    async with (
        running(create_app(settings, clock)) as admin_side,
        running(create_app(settings, clock)) as other,
    ):
        key_id = next(k["id"] for k in (await admin_side.get("/admin/write-keys", headers=ADMIN)).json())
        auth = (WRITE_KEY, "")
        assert (await other.post("/v1/track", json=TRACK, auth=auth)).status_code == 200  # now cached there
        assert (await admin_side.delete(f"/admin/write-keys/{key_id}", headers=ADMIN)).status_code == 200
        assert (await admin_side.post("/v1/track", json=TRACK, auth=auth)).status_code == 401  # at once here
        clock.advance(timedelta(seconds=settings.write_key_cache_ttl_s + 0.1))
        assert (
            await other.post("/v1/track", json=TRACK, auth=auth)
        ).status_code == 401  # within the TTL there

    # A seeded key revoked stays revoked when the service restarts with the same seed.
    async with running(create_app(settings, clock)) as restarted:
        assert (await restarted.post("/v1/track", json=TRACK, auth=auth)).status_code == 401


async def test_a_lookup_in_flight_during_a_revoke_does_not_cache_the_key(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """A request whose key lookup read the key before the revoke committed may pass (it was
    concurrent with the revoke), but its answer must not be cached: the next request is refused."""
    write_keys = app.state.write_keys
    repository = write_keys.repository
    read, release = asyncio.Event(), asyncio.Event()
    original = repository.active_id

    async def slow_active_id(digest: str) -> str | None:
        found = await original(digest)  # reads the key as active...
        read.set()
        await release.wait()  # ...and answers after the revoke
        return found

    key_id = next(k["id"] for k in (await client.get("/admin/write-keys", headers=ADMIN)).json())
    repository.active_id = slow_active_id
    in_flight = asyncio.create_task(client.post("/v1/track", json=TRACK, auth=(WRITE_KEY, "")))
    await read.wait()
    repository.active_id = original
    assert (await client.delete(f"/admin/write-keys/{key_id}", headers=ADMIN)).status_code == 200
    release.set()
    assert (await in_flight).status_code == 200
    assert (await client.post("/v1/track", json=TRACK, auth=(WRITE_KEY, ""))).status_code == 401


async def test_production_revokes_the_development_key_a_local_run_stored(make_settings) -> None:  # type: ignore[no-untyped-def]
    """Seeded keys stay until revoked: a database first run with `dev-write-key` (make run,
    docker-compose) must not keep accepting it once the service runs in production."""
    local: IngestSettings = make_settings(IngestSettings, write_keys="dev-write-key")
    async with running(create_app(local, ManualClock())) as client:
        assert (await client.post("/v1/track", json=TRACK, auth=("dev-write-key", ""))).status_code == 200

    strong = "k" * 40
    production = local.model_copy(
        update={
            "environment": "production",
            "write_keys": [strong],
            "admin_token": SecretStr("a" * 32),
            "privacy_salt": SecretStr("s" * 32),
        }
    )
    assert production.insecure_settings() == []
    async with running(create_app(production, ManualClock())) as client:
        refused = await client.post("/v1/track", json=TRACK, auth=("dev-write-key", ""))
        assert refused.status_code == 401
        assert (await client.post("/v1/track", json=TRACK, auth=(strong, ""))).status_code == 200
        keys = (await client.get("/admin/write-keys", headers={"Authorization": f"Bearer {'a' * 32}"})).json()
        assert sorted(k["revokedAt"] is not None for k in keys) == [False, True]

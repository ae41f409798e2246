"""Text PostgreSQL cannot store (U+0000) is a 400 naming where it was, never a 500, and changes nothing;
other database errors stay 500s."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, quote

import httpx
import orjson
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel
from sqlalchemy import text

from shared.contracts import storable
from shared.runtime import Platform, install_common
from shared.settings import BaseServiceSettings
from tests.support import running


class GuardSettings(BaseServiceSettings):
    service_name: str = "guard_test"
    db_schema: str = "guard"


class Note(BaseModel):
    name: str
    details: dict[str, Any] = {}


def guarded_app(platform: Platform) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await platform.start()
        async with platform.unit_of_work() as uow:
            await uow.session.execute(text("CREATE TABLE notes (name text, details jsonb)"))
        yield
        await platform.stop()

    app = FastAPI(lifespan=lifespan)
    install_common(app, platform)

    @app.post("/notes")
    async def add(note: Note) -> dict[str, str]:
        async with platform.unit_of_work() as uow:
            await uow.session.execute(
                text("INSERT INTO notes VALUES (:n, CAST(:d AS jsonb))"),
                {"n": "first of two", "d": "{}"},
            )
            await uow.session.execute(
                text("INSERT INTO notes VALUES (:n, CAST(:d AS jsonb))"),
                {"n": note.name, "d": json.dumps(note.details)},
            )
        return {"ok": "yes"}

    @app.post("/forms")
    async def form(request: Request) -> dict[str, str]:  # read by hand, as the notifier reads forms
        fields = dict(parse_qsl((await request.body()).decode()))
        async with platform.unit_of_work() as uow:
            await uow.session.execute(text("INSERT INTO notes (name) VALUES (:n)"), {"n": fields["name"]})
        return {"ok": "yes"}

    @app.get("/notes/{name}")
    async def find(name: str, q: str = "") -> dict[str, int]:
        async with platform.unit_of_work() as uow:
            found = await uow.session.scalar(
                text("SELECT count(*) FROM notes WHERE name = :n OR name = :q"), {"n": name, "q": q}
            )
        return {"found": int(found or 0)}

    @app.post("/payloads")
    async def payload(body: dict[str, Any]) -> dict[str, str]:  # `Any` values, as rule values are
        async with platform.unit_of_work() as uow:
            await uow.session.execute(text("INSERT INTO notes (name) VALUES ('first of two')"))
            # Written as the services write jsonb: orjson, which refuses a lone surrogate.
            await uow.session.execute(
                text("INSERT INTO notes VALUES ('p', CAST(:d AS jsonb))"),
                {"d": orjson.dumps(body).decode()},
            )
        return {"ok": "yes"}

    @app.post("/texts")
    async def texts(body: dict[str, Any]) -> dict[str, str]:  # a text parameter: asyncpg refuses it
        async with platform.unit_of_work() as uow:
            await uow.session.execute(text("INSERT INTO notes (name) VALUES ('first of two')"))
            await uow.session.execute(text("INSERT INTO notes (name) VALUES (:n)"), {"n": body["name"]})
        return {"ok": "yes"}

    @app.get("/broken")
    async def broken() -> dict[str, int]:
        async with platform.unit_of_work() as uow:
            await uow.session.execute(text("SELECT 1 / 0"))
        return {"never": 1}

    return app


def nul_error(response: Any) -> tuple[str, str]:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "invalid_request" and body["message"]
    (error,) = body["errors"]
    assert "NUL" in error["message"]
    return error["field"], error["rule"]


async def count_notes(platform: Platform) -> int:
    async with platform.unit_of_work() as uow:
        return int(await uow.session.scalar(text("SELECT count(*) FROM notes")) or 0)


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("a\x00b", ""),
        ({"a": ["ok", {"b": "x\x00"}]}, "a.1.b"),
        ({"k\x00": 1}, "k\x00"),
        ({"a": "back\\u0000slash", "b": 3, "c": None}, None),
        ([1, "fine"], None),
    ],
)
def test_nul_path_names_the_first_string_holding_it(value: Any, path: str | None) -> None:
    assert storable.nul_path(value) == path


async def test_nul_in_path_query_or_body_is_a_400_naming_it_and_nothing_is_written(make_settings) -> None:  # type: ignore[no-untyped-def]
    platform = Platform(make_settings(GuardSettings), migrations=None)
    app = guarded_app(platform)
    async with running(app) as client:
        assert nul_error(await client.get("/notes/" + quote("a\x00b"))) == ("path", "no_nul_character")
        assert nul_error(await client.get("/notes/a", params={"q": "x\x00"})) == (
            "query.q",
            "no_nul_character",
        )
        # In a text column (asyncpg refuses it) and in jsonb (PostgreSQL refuses "\u0000"): the
        # statement before it in the same transaction is rolled back too.
        assert nul_error(await client.post("/notes", json={"name": "n\x00"})) == (
            "body.name",
            "no_nul_character",
        )
        assert nul_error(
            await client.post("/notes", json={"name": "ok", "details": {"deep": ["x", "y\x00"]}})
        ) == ("body.details.deep.1", "no_nul_character")
        assert nul_error(await client.post("/forms", data={"name": "f\x00"})) == (
            "body.name",
            "no_nul_character",
        )
        assert await count_notes(platform) == 0

        # Harmless look-alikes pass: an escaped backslash followed by "u0000".
        ok = await client.post("/notes", json={"name": "back\\u0000slash"})
        assert ok.status_code == 200, ok.text
        assert (await client.get("/notes/" + quote("back\\u0000slash"))).json() == {"found": 1}
        assert await count_notes(platform) == 2

        # Any other database error is still a server error (as a server answers it: the app re-raises
        # it after the 500 for the server to log).
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as plain:
            failed = await plain.get("/broken")
        assert failed.status_code == 500 and failed.json()["error"] == "internal_error"

        metrics = (await client.get("/metrics")).text
        assert 'route="/notes/{name}",service="guard_test",status="400"' in metrics


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("a\ud800", ""),
        ({"a": ["ok", {"b": "x\udfff"}]}, "a.1.b"),
        ({"k\ud800": 1}, "k\\ud800"),  # spelled out: the path must be writable in the answer
        ({"pair": "\U0001f600", "b": 3}, None),
    ],
)
def test_surrogate_path_names_the_first_string_holding_a_lone_one(value: Any, path: str | None) -> None:
    assert storable.surrogate_path(value) == path


async def test_a_lone_surrogate_in_a_body_is_a_400_naming_it_and_nothing_is_written(make_settings) -> None:  # type: ignore[no-untyped-def]
    """JSON may escape half a surrogate pair alone; a field typed `Any` takes it, and writing it failed
    (orjson's TypeError, asyncpg's UnicodeEncodeError): a 500 before."""
    platform = Platform(make_settings(GuardSettings), migrations=None)
    app = guarded_app(platform)
    headers = {"content-type": "application/json"}
    async with running(app) as client:
        for path, raw, field in [
            ("/payloads", b'{"rule": {"value": ["ok", "p\\ud800"]}}', "body.rule.value.1"),
            ("/texts", b'{"name": "x\\udc00y"}', "body.name"),
        ]:
            r = await client.post(path, content=raw, headers=headers)
            assert r.status_code == 400, r.text
            (error,) = r.json()["errors"]
            assert (error["field"], error["rule"]) == (field, "unpaired_surrogate")
        assert await count_notes(platform) == 0
        # A pair is a character like any other.
        ok = await client.post("/payloads", content=b'{"v": "\\ud83d\\ude00"}', headers=headers)
        assert ok.status_code == 200, ok.text

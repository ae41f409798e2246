"""The audit log of admin actions: who did what, when, in each service's own `audit_log` table.

`install_audit(app, platform)` adds an ASGI middleware that records every successful (2xx) admin
mutation (POST/PUT/PATCH/DELETE with the admin Bearer token, and GETs of a customer export, which
disclose personal data) and the `GET /v1/audit` endpoint (admin, paged, filters). The row is
written before the response starts, so a client that saw the 2xx can find its entry. The actor is a
short hash of the admin token (which token, never the token) plus the optional `X-CLM-Actor`
header naming the human. Each request gets an `X-Request-ID` (the caller's, or a fresh one).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query
from sqlalchemy import text
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.clock import Clock, SystemClock
from shared.db.unit_of_work import UnitOfWork
from shared.http import admin_guard, is_admin, lower_time_bound, upper_time_bound

log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ACTOR_HEADER = b"x-clm-actor"
REQUEST_ID_HEADER = b"x-request-id"

_INSERT = text(
    "INSERT INTO audit_log (at, actor, actor_name, method, path, status, request_id, detail) "
    "VALUES (:at, :actor, :actor_name, :method, :path, :status, :request_id, CAST(:detail AS jsonb))"
)


def token_identity(token: str) -> str:
    return "admin:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def is_audited(method: str, path: str) -> bool:
    return method in MUTATING or (method == "GET" and (path.endswith("/export") or "/exports/" in path))


class AuditMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        unit_of_work: Callable[[], UnitOfWork],
        admin_token: str,
        clock: Clock | None = None,
    ) -> None:
        self.app = app
        self.unit_of_work = unit_of_work
        self.admin_token = admin_token
        self.actor = token_identity(admin_token)
        self.clock = clock or SystemClock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_audited(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        # Read as the admin guard reads it (`is_admin`, and the first header when there are several,
        # as Starlette's): whatever the guard lets in is recorded.
        headers = Headers(scope=scope)
        if not is_admin(headers.get("authorization"), self.admin_token):
            await self.app(scope, receive, send)  # not an admin call: nothing to audit
            return
        request_id = headers.get(REQUEST_ID_HEADER.decode(), "")[:100] or uuid.uuid4().hex
        actor_name = (
            headers.get(ACTOR_HEADER.decode(), "").encode("latin-1").decode("utf-8", "replace")[:200] or None
        )

        async def send_audited(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if 200 <= status < 300:
                    await self._record(scope, status, request_id, actor_name)
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())],
                }
            await send(message)

        await self.app(scope, receive, send_audited)

    async def _record(self, scope: Scope, status: int, request_id: str, actor_name: str | None) -> None:
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            async with self.unit_of_work() as uow:
                await uow.session.execute(
                    _INSERT,
                    {
                        "at": self.clock.now(),
                        "actor": self.actor,
                        "actor_name": actor_name,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "request_id": request_id,
                        "detail": orjson.dumps({"query": query} if query else {}).decode(),
                    },
                )
        except Exception:
            # The action itself is already committed; losing its audit row must not turn it into a 500.
            log.exception("could not write the audit log entry", extra={"path": scope["path"]})


def audit_router(unit_of_work: Callable[[], UnitOfWork], admin: Any) -> APIRouter:
    router = APIRouter(tags=["audit"], dependencies=[Depends(admin)])

    @router.get("/v1/audit")
    async def list_audit(
        limit: int = Query(default=100, ge=1, le=1000),
        before: int | None = Query(
            default=None, ge=1, le=2**63 - 1, description="the `next_before` of the previous page"
        ),
        actor: str | None = Query(default=None, max_length=200, description="token identity or actor name"),
        method: str | None = Query(default=None, pattern="^(POST|PUT|PATCH|DELETE|GET)$"),
        path_prefix: str | None = Query(default=None, max_length=500),
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> dict[str, Any]:
        where = ["TRUE"]
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            where.append("id < :before")
            params["before"] = before
        if actor is not None:
            where.append("(actor = :actor OR actor_name = :actor)")
            params["actor"] = actor
        if method is not None:
            where.append("method = :method")
            params["method"] = method
        if path_prefix is not None:
            where.append("starts_with(path, :prefix)")
            params["prefix"] = path_prefix
        # Past the storable times (1900-2999) a bound is none, or the range's end: as it worked before
        # (`since=0001-01-01T00:00:00Z`); only a time without UTC is a 400.
        if (since_at := lower_time_bound("since", since)) is not None:
            where.append("at >= :since")
            params["since"] = since_at
        if (until_at := upper_time_bound("until", until)) is not None:
            where.append("at < :until")
            params["until"] = until_at
        sql = text(
            "SELECT id, at, actor, actor_name, method, path, status, request_id, detail FROM audit_log "
            f"WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT :limit"
        )
        async with unit_of_work() as uow:
            rows = [dict(r._mapping) for r in await uow.session.execute(sql, params)]
        return {"entries": rows, "next_before": rows[-1]["id"] if len(rows) == limit else None}

    return router


def install_audit(app: FastAPI, unit_of_work: Callable[[], UnitOfWork], settings: Any) -> None:
    """Record every successful admin mutation of `app` and serve `GET /v1/audit`."""
    app.add_middleware(
        AuditMiddleware,
        unit_of_work=unit_of_work,
        admin_token=settings.admin_token.get_secret_value(),
    )
    app.include_router(audit_router(unit_of_work, admin_guard(settings)))

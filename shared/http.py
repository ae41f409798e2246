"""HTTP conventions shared by the four APIs: JSON errors that name the field and the rule, admin auth,
and no text reaching the database that it cannot store (`StorableTextGuard`)."""

from __future__ import annotations

import hmac
import json
import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.contracts import storable
from shared.settings import BaseServiceSettings

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raise from an endpoint for a clear 4xx: `{"error": code, "message": ..., "errors": [...]}`."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.errors = errors or []
        self.headers = headers


def field_error(field: str, rule: str, message: str) -> dict[str, str]:
    return {"field": field, "rule": rule, "message": message}


# Report ranges: days whose start and end are storable times (see `shared.contracts.storable`).
EARLIEST_DAY = storable.EARLIEST_TIME.date()
LATEST_DAY = storable.LATEST_TIME.date() - timedelta(days=1)


def day_range(first: date | None, last: date | None, today: date, default_days: int) -> tuple[date, date]:
    """A report's `from` / `to` query parameters (ISO dates, both inclusive): `to` defaults to today,
    `from` to `default_days` before it; a 400 naming the parameter when one is out of range or `to` is
    before `from`."""
    for name, day in (("from", first), ("to", last)):
        if day is not None and not EARLIEST_DAY <= day <= LATEST_DAY:
            raise ApiError(
                400,
                "invalid_request",
                f"`{name}` is out of range",
                errors=[field_error(name, "range", f"between {EARLIEST_DAY} and {LATEST_DAY}")],
            )
    end = last or today
    start = first or max(EARLIEST_DAY, end - timedelta(days=default_days))
    if end < start:
        raise ApiError(
            400,
            "invalid_request",
            "`to` is before `from`",
            errors=[field_error("to", "after_from", "`to` must not be before `from`")],
        )
    return start, end


def utc_time(name: str, value: datetime) -> datetime:
    """A time parameter in UTC (a naive one is read as UTC): a 400 naming it when it has none, its
    offset taking it past year 1 or 9999 (`0001-01-01T00:00:00+14:00`, `9999-12-31T23:59:59-14:00`:
    the database driver overflowed on them, a 500)."""
    try:
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except OverflowError:
        raise ApiError(
            400,
            "invalid_request",
            f"`{name}` is out of range",
            errors=[field_error(name, "range", UTC_TIME_MESSAGE)],
        ) from None


UTC_TIME_MESSAGE = "must be a time in UTC between years 1 and 9999"


def lower_time_bound(name: str, value: datetime | None) -> datetime | None:
    """A query's lower time bound (`since`: at or after it), within what is stored: before every
    storable time (`shared.contracts.storable`, 1900-2999) it is no bound (None), past them all it
    is their end (nothing matches). Only a time without UTC (`utc_time`) is a 400."""
    if value is None:
        return None
    at = utc_time(name, value)
    return None if at < storable.EARLIEST_TIME else min(at, storable.LATEST_TIME)


def upper_time_bound(name: str, value: datetime | None) -> datetime | None:
    """A query's upper time bound (`until`: before it), within what is stored: past every storable
    time it is no bound (None), before them all their start (nothing matches)."""
    if value is None:
        return None
    at = utc_time(name, value)
    return None if at >= storable.LATEST_TIME else max(at, storable.EARLIEST_TIME)


def clamped_time(name: str, value: datetime) -> datetime:
    """A time parameter that must stay a time (a page cursor's), moved into the storable range: what
    lies before or past every storable time compares to stored times as its start or end does."""
    return min(max(utc_time(name, value), storable.EARLIEST_TIME), storable.LATEST_TIME)


def validation_errors(errors: Any) -> list[dict[str, str]]:
    out = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        out.append(
            field_error(".".join(loc) or "body", str(err.get("type", "invalid")), str(err.get("msg", "")))
        )
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {
                "error": "invalid_request",
                "message": "the request is invalid",
                "errors": validation_errors(exc.errors()),
            },
            status_code=400,
        )

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        body: dict[str, Any] = {"error": exc.code, "message": exc.message}
        if exc.errors:
            body["errors"] = exc.errors
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            {"error": code, "message": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    async def on_database_error(request: Request, exc: Exception) -> JSONResponse:
        if is_unstorable_text(exc):
            field, rule, message = _nul_field_in_body(request.scope), storable.RULE, storable.MESSAGE
        elif is_unpaired_surrogate(exc):
            field, rule = _surrogate_field_in_body(request.scope), storable.SURROGATE_RULE
            message = storable.SURROGATE_MESSAGE
        else:
            raise exc  # a real server error: the catch-all below answers 500 and logs it
        return JSONResponse(
            {
                "error": "invalid_request",
                "message": "the request holds text that cannot be stored",
                "errors": [field_error(field, rule, message)],
            },
            status_code=400,
        )

    # Nothing was changed: the error aborted the transaction it happened in. A lone surrogate in a
    # body field typed `Any` (a rule's value, a template's data) passes validation and fails where it
    # is written: by orjson (a TypeError) or by asyncpg (UnicodeEncodeError, maybe wrapped).
    error_types: tuple[type[Exception], ...] = (
        DBAPIError,
        *_UNSTORABLE_TEXT_ERRORS,
        UnicodeEncodeError,
        orjson.JSONEncodeError,
    )
    for error_type in error_types:
        app.add_exception_handler(error_type, on_database_error)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse(
            {"error": "internal_error", "message": "unexpected server error"}, status_code=500
        )


_bearer = HTTPBearer(auto_error=False)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None. Read as FastAPI's
    `HTTPBearer` reads it: the scheme in any case (RFC 7235), the token stripped. The admin guard,
    the audit log and ingest's imports all decide with this, so that no request the guard lets in as
    admin escapes the audit log by spelling the header differently."""
    scheme, token = get_authorization_scheme_param(authorization)
    if not token or scheme.lower() != "bearer":
        return None
    return token


def is_admin(authorization: str | None, admin_token: str) -> bool:
    """Whether an `Authorization` header value carries the admin token (`bearer_token`)."""
    token = bearer_token(authorization)
    return token is not None and hmac.compare_digest(token.encode(), admin_token.encode())


def admin_guard(settings: BaseServiceSettings) -> Any:
    """A FastAPI dependency that accepts only `Authorization: Bearer <CLM_ADMIN_TOKEN>`."""
    from fastapi import Depends

    async def require_admin(
        request: Request,
        _: HTTPAuthorizationCredentials | None = Depends(_bearer),  # declares the scheme in OpenAPI
    ) -> str:
        if not is_admin(request.headers.get("authorization"), settings.admin_token.get_secret_value()):
            raise ApiError(
                401,
                "unauthorized",
                "admin token required (Authorization: Bearer <CLM_ADMIN_TOKEN>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return "admin"

    return require_admin


# --------------------------------------------------------------------------- storable text

_UNSTORABLE_TEXT_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.exceptions.CharacterNotInRepertoireError,  # U+0000 in a text parameter
    asyncpg.exceptions.UntranslatableCharacterError,  # "\u0000" in a jsonb parameter
)
_BODY_CHUNKS = "clm.body_chunks"  # the scope key under which the guard keeps what the app read
_BODY_KEPT_BYTES = 1024 * 1024


def is_unstorable_text(exc: BaseException) -> bool:
    """A database error caused by text it cannot store (directly, or wrapped by SQLAlchemy)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _UNSTORABLE_TEXT_ERRORS):
            return True
        seen.add(id(current))
        current = getattr(current, "orig", None) or current.__cause__
    return False


class StorableTextGuard:
    """Refuses (400, naming the parameter) a request whose path or query holds the NUL character,
    which no service can store (`shared.contracts.storable`); and keeps a reference to the body
    chunks the app reads (up to 1 MiB, no copy), so that a body holding one, caught when the database
    refuses it, is answered with a 400 naming the field instead of a 500 (`install_error_handlers`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        field = _nul_field_in_target(scope)
        if field is not None:
            response = JSONResponse(
                {
                    "error": "invalid_request",
                    "message": "the request is invalid",
                    "errors": [field_error(field, storable.RULE, storable.MESSAGE)],
                },
                status_code=400,
            )
            await response(scope, receive, send)
            return
        chunks: list[bytes] = []
        kept = 0
        scope[_BODY_CHUNKS] = chunks

        async def keeping_receive() -> Message:
            nonlocal kept
            message = await receive()
            if message["type"] == "http.request" and kept <= _BODY_KEPT_BYTES:
                chunk = message.get("body", b"")
                chunks.append(chunk)
                kept += len(chunk)
            return message

        await self.app(scope, keeping_receive, send)


def is_unpaired_surrogate(exc: BaseException) -> bool:
    """An error writing a string that holds an unpaired surrogate (directly, or wrapped by
    SQLAlchemy): UTF-8 has no spelling for one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, UnicodeEncodeError) and "surrogate" in current.reason:
            return True
        if isinstance(current, orjson.JSONEncodeError) and "surrogates not allowed" in str(current):
            return True
        seen.add(id(current))
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return False


def _surrogate_field_in_body(scope: Scope) -> str:
    chunks = scope.get(_BODY_CHUNKS)
    body = b"".join(chunks) if isinstance(chunks, list) else b""
    try:
        found = storable.surrogate_path(json.loads(body)) if body else None
    except ValueError:
        found = None
    return f"body.{found}" if found else "body"


def _nul_field_in_target(scope: Scope) -> str | None:
    path: str = scope.get("path", "")
    if storable.NUL in path:
        return "path"
    query: bytes = scope.get("query_string", b"")
    if b"%00" in query or b"\x00" in query:
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if storable.NUL in name or storable.NUL in value:
                return f"query.{name}" if storable.NUL not in name else "query"
    return None


def _nul_field_in_body(scope: Scope) -> str:
    """Where in the request body the NUL character is (`body.<path>`), as far as it can be told."""
    chunks = scope.get(_BODY_CHUNKS)
    body = b"".join(chunks) if isinstance(chunks, list) else b""
    headers = dict(scope.get("headers") or [])
    content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
    found: str | None = None
    if "json" in content_type and storable.NUL_ESCAPE in body:
        try:
            found = storable.nul_path(json.loads(body))
        except ValueError:
            found = None
    elif "x-www-form-urlencoded" in content_type and b"%00" in body:
        for name, value in parse_qsl(body.decode("latin-1"), keep_blank_values=True):
            if storable.NUL in value:
                found = name
                break
    return f"body.{found}" if found else "body"

"""HTTP conventions shared by the four APIs: JSON errors that name the field and the rule, admin auth."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

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

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse(
            {"error": "internal_error", "message": "unexpected server error"}, status_code=500
        )


_bearer = HTTPBearer(auto_error=False)


def admin_guard(settings: BaseServiceSettings) -> Any:
    """A FastAPI dependency that accepts only `Authorization: Bearer <CLM_ADMIN_TOKEN>`."""
    from fastapi import Depends

    async def require_admin(creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> str:
        expected = settings.admin_token.get_secret_value()
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), expected.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "admin token required (Authorization: Bearer <CLM_ADMIN_TOKEN>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return "admin"

    return require_admin

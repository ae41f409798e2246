"""`/healthz` (the process is alive) and `/readyz` (200 only when every dependency answers)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

Check = Callable[[], Awaitable[None]]


def add_health_routes(app: FastAPI, checks: Callable[[], dict[str, Check]], timeout: float = 2.0) -> None:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        named = checks()

        async def run(check: Check) -> str | None:
            try:
                await asyncio.wait_for(check(), timeout)
                return None
            except TimeoutError:
                return f"no answer within {timeout:.0f}s"
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"[:300]

        results = await asyncio.gather(*(run(c) for c in named.values()))
        down = {name: err for name, err in zip(named, results, strict=True) if err is not None}
        if not named:
            down = {"startup": "not started yet"}
        body = {"status": "ready" if not down else "unavailable", "down": down, "checked": sorted(named)}
        return JSONResponse(body, status_code=200 if not down else 503)

    app.include_router(router)

"""CORS for the tracking routes: analytics.js posts events from the pages of any site that loads it.

Only `/v1/...` (tracking, batch, import): the admin routes answer no cross-origin requests. The
default `*` is what Segment's API answers; a browser write key is public anyway, and the calls carry
no cookies (`allow_credentials` stays off).
"""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send


class TrackingCors:
    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app, allow_origins=origins, allow_methods=["POST"], allow_headers=["*"], max_age=86400
        )
        self.enabled = bool(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.enabled and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)

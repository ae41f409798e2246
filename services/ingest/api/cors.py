"""CORS for the tracking routes: analytics.js posts events from the pages of any site that loads it.

Only the tracking, batch and import routes (`TRACKING_PATHS`): the admin routes, `/v1/audit`
included, answer no cross-origin requests. The default `*` is what Segment's API answers; a browser
write key is public anyway, and the calls carry no cookies (`allow_credentials` stays off).
"""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from services.ingest.api.tracking import SHORT_PATHS
from shared.contracts.events import EventType

# A list, not a prefix: an admin route under /v1/ (the audit log) must not answer a page's script.
TRACKING_PATHS = frozenset(
    {f"/v1/{t.value}" for t in EventType}
    | {f"/v1/{short}" for short in SHORT_PATHS.values()}
    | {"/v1/batch", "/v1/b", "/v1/import"}
)


class TrackingCors:
    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app, allow_origins=origins, allow_methods=["POST"], allow_headers=["*"], max_age=86400
        )
        self.enabled = bool(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.enabled and scope["type"] == "http" and scope["path"] in TRACKING_PATHS:
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)

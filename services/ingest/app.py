"""The ingest service: FastAPI app and lifespan.

Segment's tracking API (`api/tracking.py`), bulk backfill (`api/imports.py`) and the write keys admin
API (`api/write_keys.py`); every accepted event goes through `EventWriter` (dedupe + Kafka ack).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from services.ingest.api.cors import TrackingCors
from services.ingest.api.imports import imports_router
from services.ingest.api.intake import Intake
from services.ingest.api.tracking import batch_handler, tracking_router
from services.ingest.api.write_keys import write_keys_router
from services.ingest.consumers.privacy import PrivacyConsumer
from services.ingest.event_writer import EventWriter
from services.ingest.settings import IngestSettings
from services.ingest.store.write_keys import WriteKeyRepository
from services.ingest.write_keys import WriteKeys
from shared.audit import install_audit
from shared.clock import Clock, SystemClock
from shared.contracts import PRIVACY, PrivacyRequest
from shared.runtime import Platform, install_common

MIGRATIONS = Path(__file__).parent / "store" / "migrations"
log = logging.getLogger(__name__)


def create_app(settings: IngestSettings | None = None, clock: Clock | None = None) -> FastAPI:
    settings = settings or IngestSettings()
    clock = clock or SystemClock()
    platform = Platform(settings, migrations=MIGRATIONS)
    platform.keep_for(clock)
    write_keys = WriteKeys(WriteKeyRepository(platform.engine), clock, settings.write_key_cache_ttl_s)
    writer = EventWriter(platform.engine, settings, clock)
    intake = Intake(settings, writer, write_keys, clock)
    platform.consumer(
        PRIVACY.name, PrivacyRequest, "privacy", PrivacyConsumer(platform.unit_of_work, clock).handle
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await platform.start()
        await write_keys.seed(settings.write_keys)
        if settings.environment == "production" and (revoked := await write_keys.revoke_development_key()):
            log.warning("revoked the development write key found active", extra={"key_id": revoked})
        await writer.start()
        await platform.start_consumers()
        try:
            yield
        finally:
            await writer.stop()
            await platform.stop()

    app = FastAPI(
        title="CLM Ingest",
        description="Segment-compatible event API: validates customer events and puts them durably on "
        "clm.events.v1.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.platform = platform
    app.state.writer = writer
    app.state.write_keys = write_keys
    # The tracking routes first: every request is matched against the routes in order.
    # One batch handler: /v1/batch, /v1/b, and /v1/import's JSON batches.
    batch = batch_handler(intake)
    app.include_router(tracking_router(intake, batch))
    install_common(app, platform)
    app.include_router(imports_router(intake))
    app.include_router(write_keys_router(settings, write_keys))
    install_audit(app, platform.unit_of_work, settings)
    # Outermost: refusals (401, 400) carry the CORS headers too, so the browser SDK can read them.
    app.add_middleware(TrackingCors, origins=settings.cors_allow_origins)
    return app

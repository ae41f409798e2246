"""The segmenter service: FastAPI app and lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from services.segmenter.api.catalogue import catalogue_router
from services.segmenter.api.customers import customers_router
from services.segmenter.api.kpis import kpis_router
from services.segmenter.api.lifecycle import lifecycle_router
from services.segmenter.api.privacy import privacy_router
from services.segmenter.api.republish import republish_router
from services.segmenter.api.segments import segments_router
from services.segmenter.consumers.message_status import MessageStatusHandler
from services.segmenter.consumers.privacy_answers import PrivacyAnswersConsumer
from services.segmenter.runtime import Segmenter
from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import profiles as profile_store
from shared.audit import install_audit
from shared.clock import Clock, SystemClock
from shared.contracts.events import CustomerEvent, MessageStatus, PrivacyRequest
from shared.contracts.topics import CUSTOMER_EVENTS, MESSAGE_STATUS, PRIVACY
from shared.kafka.consumer import LONG_POLL
from shared.runtime import Platform, install_common

MIGRATIONS = Path(__file__).parent / "store" / "migrations"


def create_app(settings: SegmenterSettings | None = None, clock: Clock | None = None) -> FastAPI:
    settings = settings or SegmenterSettings()
    platform = Platform(settings, migrations=MIGRATIONS)
    segmenter = Segmenter.build(settings, platform, clock or SystemClock())
    platform.keep_for(segmenter.clock, profile_store.timeline_rule(settings.timeline_retention_days))
    platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "profiles", segmenter.events)
    platform.consumer(PRIVACY.name, PrivacyRequest, "privacy", PrivacyAnswersConsumer(platform), **LONG_POLL)
    platform.consumer(
        MESSAGE_STATUS.name,
        MessageStatus,
        "engagement",
        MessageStatusHandler(platform),
        fetch_max_wait_ms=settings.statuses_fetch_max_wait_ms,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await platform.start()
        await platform.start_consumers()
        if settings.run_background_loops:
            platform.run_in_background("segment-timers", segmenter.timers.run_forever)
            platform.run_in_background("segment-backfill", segmenter.backfill.run_forever)
            if settings.recommendations_recompute_interval_s > 0:
                platform.run_in_background("recommendations-recompute", segmenter.recommendations.run_forever)
            platform.run_in_background("lifecycle-refit", segmenter.lifecycle.run_forever)
        try:
            yield
        finally:
            await platform.stop()

    app = FastAPI(
        title="CLM Segmenter",
        description="Live customer profiles, identity resolution, lifecycle metrics and real-time segments.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.platform = platform
    app.state.segmenter = segmenter
    install_common(app, platform)
    app.include_router(segments_router(segmenter))
    # Before the profile routes: DELETE /v1/customers/{id} and /export live in the privacy router.
    app.include_router(privacy_router(segmenter))
    app.include_router(customers_router(segmenter))
    app.include_router(catalogue_router(segmenter))
    app.include_router(lifecycle_router(segmenter))
    app.include_router(kpis_router(segmenter))
    app.include_router(republish_router(segmenter))
    install_audit(app, platform.unit_of_work, settings)
    return app

"""The journey engine service: FastAPI app and lifespan (platform, consumers, timer workers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from services.journey_engine.api.journeys import build_router
from services.journey_engine.api.parked_timers import build_parked_router
from services.journey_engine.consumers.handlers import register
from services.journey_engine.execution.engine import JourneyEngine
from services.journey_engine.settings import JourneyEngineSettings
from shared.audit import install_audit
from shared.clock import Clock, SystemClock
from shared.runtime import Platform, install_common

MIGRATIONS = Path(__file__).parent / "store" / "migrations"


def create_app(settings: JourneyEngineSettings | None = None, clock: Clock | None = None) -> FastAPI:
    settings = settings or JourneyEngineSettings()
    platform = Platform(settings, migrations=MIGRATIONS)
    engine = JourneyEngine(platform, settings, clock or SystemClock())
    platform.keep_for(engine.clock)
    register(platform, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await platform.start()
        await platform.start_consumers()
        if settings.run_timer_loop:
            # Overdue timers (the engine was down) are simply due: the first batches fire them.
            for n in range(settings.timer_workers):
                platform.run_in_background(f"journey-timers-{n}", engine.run_forever)
            platform.run_in_background("journey-counts-compaction", engine.compact_counts_forever)
            platform.run_in_background("journey-archive-sweeper", engine.finish_archives_forever)
        try:
            yield
        finally:
            await platform.stop()

    app = FastAPI(
        title="CLM Journey engine",
        description="Marketer-defined journeys with durable timers; emits message requests.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.platform = platform
    app.state.engine = engine
    install_common(app, platform)
    app.include_router(build_router(platform, engine))
    app.include_router(build_parked_router(platform, engine))
    install_audit(app, platform.unit_of_work, settings)
    return app

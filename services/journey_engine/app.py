"""The journey engine service: FastAPI app and lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from services.journey_engine.settings import JourneyEngineSettings
from shared.runtime import Platform, install_common

MIGRATIONS = Path(__file__).parent / "store" / "migrations"


def create_app(settings: JourneyEngineSettings | None = None) -> FastAPI:
    settings = settings or JourneyEngineSettings()
    platform = Platform(settings, migrations=MIGRATIONS)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await platform.start()
        await platform.start_consumers()
        try:
            yield
        finally:
            await platform.stop()

    app = FastAPI(title="CLM Journey engine", description="Marketer-defined journeys with durable timers; emits message requests.", version="0.1.0", lifespan=lifespan)
    app.state.platform = platform
    install_common(app, platform)
    return app

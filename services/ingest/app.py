"""The ingest service: FastAPI app and lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from services.ingest.settings import IngestSettings
from shared.runtime import Platform, install_common

MIGRATIONS = Path(__file__).parent / "store" / "migrations"


def create_app(settings: IngestSettings | None = None) -> FastAPI:
    settings = settings or IngestSettings()
    platform = Platform(settings, migrations=MIGRATIONS)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await platform.start()
        await platform.start_consumers()
        try:
            yield
        finally:
            await platform.stop()

    app = FastAPI(title="CLM Ingest", description="Segment-compatible event API: validates customer events and puts them durably on clm.events.v1.", version="0.1.0", lifespan=lifespan)
    app.state.platform = platform
    install_common(app, platform)
    return app

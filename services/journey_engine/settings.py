"""Journey engine settings (env prefix `CLM_`)."""

from __future__ import annotations

from shared.settings import BaseServiceSettings


class JourneyEngineSettings(BaseServiceSettings):
    service_name: str = "journey_engine"
    port: int = 8003
    db_schema: str = "journey_engine"

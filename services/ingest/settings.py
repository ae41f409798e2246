"""Ingest settings (env prefix `CLM_`)."""

from __future__ import annotations

from shared.settings import BaseServiceSettings


class IngestSettings(BaseServiceSettings):
    service_name: str = "ingest"
    port: int = 8001
    db_schema: str = "ingest"

"""Segmenter settings (env prefix `CLM_`)."""

from __future__ import annotations

from shared.settings import BaseServiceSettings


class SegmenterSettings(BaseServiceSettings):
    service_name: str = "segmenter"
    port: int = 8002
    db_schema: str = "segmenter"

"""Notifier settings (env prefix `CLM_`)."""

from __future__ import annotations

from shared.settings import BaseServiceSettings


class NotifierSettings(BaseServiceSettings):
    service_name: str = "notifier"
    port: int = 8004
    db_schema: str = "notifier"

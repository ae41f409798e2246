"""Ingest fixtures: an app with a manual clock and a seeded write key, and helpers to read its topic."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.ingest.app import create_app
from services.ingest.settings import IngestSettings
from shared.clock import ManualClock
from shared.contracts import CUSTOMER_EVENTS
from tests.support import read_topic, running

WRITE_KEY = "test-write-key-0123456789"
AUTH = (WRITE_KEY, "")
ADMIN = {"Authorization": "Bearer test-admin-token"}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def settings(make_settings: Callable[..., IngestSettings]) -> IngestSettings:
    return make_settings(IngestSettings, write_keys=[WRITE_KEY], produce_timeout_s=2.0)


@pytest.fixture
def app(settings: IngestSettings, clock: ManualClock) -> FastAPI:
    return create_app(settings, clock)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with running(app) as c:
        yield c


async def events_on_topic(settings: IngestSettings, **options: Any) -> list[dict[str, Any]]:
    """Every message on this test's clm.events.v1 (`count=` to stop early, else 1 s idle)."""
    options.setdefault("idle", 1.0)
    return await read_topic(settings.topic(CUSTOMER_EVENTS.name), **options)

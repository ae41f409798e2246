"""Fixtures: every test gets settings of its own (topic prefix, database schema), cleaned up after."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest

from shared.db.engine import drop_schema
from shared.settings import BaseServiceSettings
from tests.support import delete_test_topics, infra, isolated_settings

S = TypeVar("S", bound=BaseServiceSettings)


@pytest.fixture
def namespace() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def make_settings(namespace: str) -> AsyncIterator[Callable[..., Any]]:
    """`make_settings(SettingsCls, **overrides)`: isolated settings; schema and topics dropped after."""
    made: list[BaseServiceSettings] = []

    def factory(cls: type[S], **overrides: Any) -> S:
        settings = isolated_settings(cls, namespace, **overrides)
        made.append(settings)
        return settings

    yield factory
    _, url = infra()
    for s in made:
        await drop_schema(url, s.db_schema)
    await delete_test_topics(f"t{namespace}.")

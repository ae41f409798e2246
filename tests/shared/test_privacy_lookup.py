"""`shared.privacy.erased_among` against the real database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from shared.db.privacy_tables import define_tombstones
from shared.privacy import add_tombstones, erased_among
from shared.runtime import Platform
from shared.settings import BaseServiceSettings


class PrivacySettings(BaseServiceSettings):
    service_name: str = "privacy_test"
    db_schema: str = "privacy"


@pytest.fixture
async def platform(make_settings: Callable[..., Any]) -> AsyncIterator[Platform]:
    p = Platform(make_settings(PrivacySettings), migrations=None)
    await p.start()
    async with p.engine.begin() as conn:
        await conn.run_sync(lambda c: define_tombstones(sa.MetaData()).metadata.create_all(c))
    yield p
    await p.stop()


async def test_every_spelling_of_an_erased_identifier_in_one_lookup_is_erased(platform: Platform) -> None:
    # The hash ignores surrounding whitespace: asked together, "alice" and " alice" are both erased
    # (only one of them came back, so an event carrying the other was folded into a profile again).
    salt = "s" * 32
    async with platform.unit_of_work() as uow:
        await add_tombstones(uow.session, salt, ["alice"], "r1", datetime.now(UTC))
    async with platform.unit_of_work() as uow:
        found = await erased_among(uow.session, salt, ["alice", " alice", "alice\t", "bob", ""])
    assert found == {"alice", " alice", "alice\t"}

"""`shared.db.unit_of_work.UnitOfWork.claim_many` with the erasure gate: the inbox claim takes the
schema's erasure gate shared in the same statement, and holds it until the unit commits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.unit_of_work import UnitOfWork, erasure_gate_held
from shared.privacy import erasure_gate, erasure_gate_within
from shared.runtime import Platform
from shared.settings import BaseServiceSettings
from tests.support import messaging_platform


class GateSettings(BaseServiceSettings):
    service_name: str = "gate_test"
    db_schema: str = "gate"


@pytest.fixture
async def platform(make_settings: Callable[..., Any]) -> AsyncIterator[Platform]:
    async with messaging_platform(make_settings(GateSettings)) as p:
        yield p


async def erasure_could_start(platform: Platform) -> bool:
    """Whether an erasure could take the gate exclusive now (tried, released at once)."""
    async with platform.engine.connect() as conn:
        got = await conn.scalar(
            text("SELECT pg_try_advisory_xact_lock(hashtext('clm.erasure.' || current_schema()))")
        )
        await conn.rollback()
        return bool(got)


async def log_statements(uow: UnitOfWork) -> list[str]:
    statements: list[str] = []
    driver = await (await uow.session.connection()).get_raw_connection()
    driver.driver_connection.add_query_logger(lambda q: statements.append(q.query))  # type: ignore[union-attr]
    return statements


async def test_a_gated_claim_holds_the_erasure_gate_until_the_unit_commits(platform: Platform) -> None:
    async with platform.unit_of_work() as uow:
        assert await uow.claim_many("c", ["m1", "m2"], erasure_gate=True) == {"m1", "m2"}
        assert not await erasure_could_start(platform)
        # Held already: the handler's own call to the gate sends nothing more.
        statements = await log_statements(uow)
        await erasure_gate(uow.session, exclusive=False)
        await asyncio.sleep(0.05)  # asyncpg calls query loggers soon after, not during, the query
        assert statements == []
        # A redelivery is still skipped.
        assert await uow.claim_many("c", ["m1", "m3"], erasure_gate=True) == {"m3"}
    assert await erasure_could_start(platform)

    async with platform.unit_of_work() as uow:  # the plain claim leaves the gate alone...
        assert await uow.claim_many("c", ["m4"]) == {"m4"}
        assert await erasure_could_start(platform)
        statements = await log_statements(uow)
        await erasure_gate(uow.session, exclusive=False)  # ...so the gate is a statement of its own
        await asyncio.sleep(0.05)
        assert len(statements) == 1 and "pg_advisory_xact_lock_shared" in statements[0]
        assert not await erasure_could_start(platform)


async def test_the_gate_is_noted_for_one_transaction_not_for_the_session(platform: Platform) -> None:
    async with AsyncSession(platform.engine) as session:
        async with session.begin():
            await erasure_gate(session, exclusive=False)
            assert erasure_gate_held(session)
        async with session.begin():  # the same session, another transaction: not held any more
            assert not erasure_gate_held(session)
            await erasure_gate(session, exclusive=False)
            assert erasure_gate_held(session) and not await erasure_could_start(platform)


async def test_a_bounded_wait_for_the_gate_times_out_and_leaves_the_transaction_usable(
    platform: Platform,
) -> None:
    """`erasure_gate_within`: an erasure holding the gate past the wait answers False, the
    transaction goes on (its work kept), and its lock_timeout is as before; once free, it is taken."""
    async with platform.unit_of_work() as erasing:
        await erasure_gate(erasing.session, exclusive=True)
        async with platform.unit_of_work() as uow:
            await uow.session.execute(text("SET LOCAL lock_timeout = '7s'"))
            assert await uow.session.scalar(text("SELECT 1")) == 1
            assert not await erasure_gate_within(uow.session, 100)
            assert not erasure_gate_held(uow.session)
            assert await uow.session.scalar(text("SHOW lock_timeout")) == "7s"

        async def erasure_done_soon() -> None:
            await asyncio.sleep(0.2)
            await erasing.session.commit()

        done = asyncio.create_task(erasure_done_soon())
        async with platform.unit_of_work() as uow:
            assert await erasure_gate_within(uow.session, 5000)
            assert erasure_gate_held(uow.session) and done.done()
            assert await uow.session.scalar(text("SHOW lock_timeout")) == "0"

"""`store.batch_read`: a batch's reads after its locks. The instance row locks are a statement of
their own, so the reads after a wait see what the lock holder committed: a timer step that holds an
instance's row (not its customer's lock) while it finishes the instance and opens its goal window."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text

from services.journey_engine.store import batch_read
from tests.journey_engine.harness import START, engine_running

_INSTANCE = (
    "INSERT INTO instances (id, journey_id, version, customer_id, status, node_id, entered_at, updated_at) "
    "VALUES ('i1', 'j1', 1, 'c1', 'active', 'day', :t, :t)"
)


async def test_reads_after_waiting_on_an_instance_see_what_its_holder_committed(make_settings: Any) -> None:
    async with engine_running(make_settings) as h:
        engine = h.platform.engine
        async with engine.begin() as conn:
            await conn.execute(text(_INSTANCE), {"t": START})
        holder = await engine.connect()
        try:
            # The timer step: holds the instance's row, finishes it and opens its goal window.
            await holder.execute(text("SELECT 1 FROM instances WHERE id = 'i1' FOR UPDATE"))
            await holder.execute(text("UPDATE instances SET status = 'exited' WHERE id = 'i1'"))
            await holder.execute(
                text(
                    "INSERT INTO goal_windows (instance_id, customer_id, journey_id, version, node_id, "
                    "entered_at, open_until) VALUES ('i1', 'c1', 'j1', 1, 'day', :t, NULL)"
                ),
                {"t": START},
            )

            async def event_batch() -> batch_read.BatchRead:
                async with h.platform.unit_of_work() as uow:
                    return await batch_read.read(uow.session, ["c1"], now=START, sends_since=None, goals=True)

            reading = asyncio.create_task(event_batch())
            await asyncio.sleep(0.3)
            assert not reading.done()  # waiting on the instance's row
            await holder.commit()
            read = await asyncio.wait_for(reading, 10)
        finally:
            await holder.close()
    assert read.active == []  # exited meanwhile
    assert [(w.instance_id, w.customer_id) for w in read.windows] == [("i1", "c1")]

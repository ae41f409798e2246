"""A group of requests written together fails only where it must: an id another transaction holds
too long, or an event Kafka did not take, gets its own request a 503, never the others' (and an
event Kafka took is never refused)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from aiokafka.errors import NotEnoughReplicasError
from aiokafka.partitioner import murmur2

from services.ingest.app import create_app
from services.ingest.event_writer import EventWriter
from services.ingest.settings import IngestSettings
from shared.clock import ManualClock
from shared.db.engine import asyncpg_dsn
from shared.kafka.producer import EventProducer
from tests.ingest.conftest import AUTH, WRITE_KEY, events_on_topic
from tests.support import eventually, running


def track(user: str, message_id: str) -> dict[str, Any]:
    return {"userId": user, "event": "E", "messageId": message_id}


async def claimed(settings: IngestSettings, ids: list[str]) -> list[str]:
    conn = await asyncpg.connect(asyncpg_dsn(settings.database_url))
    try:
        rows = await conn.fetch(
            f'SELECT message_id FROM "{settings.db_schema}".dedupe WHERE message_id = ANY($1::text[])', ids
        )
    finally:
        await conn.close()
    return sorted(r[0] for r in rows)


@pytest.fixture
async def held(make_settings: Callable[..., IngestSettings]) -> AsyncIterator[tuple[IngestSettings, Any]]:
    """Settings, and a transaction that holds the claim of messageId `held` and does not end (what
    another replica holds while it is frozen between its claim and its commit) until the test calls
    the second item."""
    settings = make_settings(
        IngestSettings, write_keys=[WRITE_KEY], produce_timeout_s=1.0, unavailable_retry_after_s=3
    )
    side: asyncpg.Connection | None = None

    async def hold() -> None:
        nonlocal side
        side = await asyncpg.connect(
            asyncpg_dsn(settings.database_url), server_settings={"search_path": settings.db_schema}
        )
        await side.execute("BEGIN")
        await side.execute("INSERT INTO dedupe (message_id, seen_at) VALUES ('held', now())")

    async def release() -> None:
        if side is not None and not side.is_closed():
            await side.execute("ROLLBACK")
            await side.close()

    yield settings, (hold, release)
    await release()


async def test_an_id_held_by_a_stuck_transaction_gets_503_and_its_group_goes_on(
    held: tuple[IngestSettings, Any],
) -> None:
    """The claim waited on the row lock with no bound: the request never got its 503, and every
    request grouped with it (here all of them) hung as long."""
    settings, (hold, release) = held
    async with running(create_app(settings, ManualClock())) as client:
        assert (await client.post("/v1/track", json=track("u", "warm"), auth=AUTH)).status_code == 200
        await hold()
        others = [client.post("/v1/track", json=track(f"v{i}", f"fresh-{i}"), auth=AUTH) for i in range(20)]
        batch = {
            "batch": [{"type": "track", **track("w", "held")}, {"type": "track", **track("w", "beside")}]
        }
        started = time.monotonic()
        stuck, stuck_batch, *rest = await asyncio.wait_for(
            asyncio.gather(
                client.post("/v1/track", json=track("u", "held"), auth=AUTH),
                client.post("/v1/batch", json=batch, auth=AUTH),
                *others,
            ),
            15,
        )
        elapsed = time.monotonic() - started
        assert stuck.status_code == 503, stuck.text
        assert stuck.json()["error"] == "unavailable"
        assert stuck.headers["Retry-After"] == "3"
        assert stuck_batch.status_code == 503, stuck_batch.text
        assert [r.status_code for r in rest] == [200] * 20
        # The lock wait (the produce timeout, 1 s), then the group without the held id.
        assert elapsed < 8, f"answered after {elapsed:.1f} s"
        # The batch's other event was published: its claim stays, so the batch's retry does not
        # publish it again.
        assert await claimed(settings, ["beside", "held"]) == ["beside"]

        await release()
        again = await client.post("/v1/track", json=track("u", "held"), auth=AUTH)
        assert again.status_code == 200, again.text
        retried = await client.post("/v1/batch", json=batch, auth=AUTH)
        assert retried.json() == {"success": True, "accepted": 2, "duplicates": 2}
    ids = [m["value"]["messageId"] for m in await events_on_topic(settings, count=24)]
    assert sorted(ids) == sorted(["warm", "held", "beside", *(f"fresh-{i}" for i in range(20))])


async def test_a_batch_of_held_ids_is_answered_within_a_bound(
    make_settings: Callable[..., IngestSettings],
) -> None:
    """A frozen replica held a whole batch's ids and the SDK resent the batch here: the search for
    the held ids halved the group's ids with a 50 ms lock wait per part and no total limit, about
    2n failed parts (100 held among 200 ids: ~15 s; a 2000-event batch: minutes), holding the writer
    and every request grouped with it. Now it stops after 1 s: what is not sorted out by then is
    refused with the held ids (503, retried), and nothing is lost or published twice."""
    settings = make_settings(
        IngestSettings, write_keys=[WRITE_KEY], produce_timeout_s=1.0, unavailable_retry_after_s=3
    )
    # Interleaved in sorted order with the others' ids: every part of the search holds one.
    held_ids = [f"id-{i:03d}-a" for i in range(100)]
    free_ids = [f"id-{i:03d}-b" for i in range(100)]
    held_batch = {"batch": [{"type": "track", **track("h", m)} for m in held_ids]}
    side = await asyncpg.connect(
        asyncpg_dsn(settings.database_url), server_settings={"search_path": settings.db_schema}
    )
    try:
        async with running(create_app(settings, ManualClock())) as client:
            assert (await client.post("/v1/track", json=track("u", "warm"), auth=AUTH)).status_code == 200
            await side.execute("BEGIN")
            await side.execute(
                "INSERT INTO dedupe (message_id, seen_at) SELECT unnest($1::text[]), now()", held_ids
            )
            started = time.monotonic()
            stuck, *rest = await asyncio.wait_for(
                asyncio.gather(
                    client.post("/v1/batch", json=held_batch, auth=AUTH),
                    *(client.post("/v1/track", json=track(f"v{m}", m), auth=AUTH) for m in free_ids),
                ),
                60,
            )
            elapsed = time.monotonic() - started
            # The lock wait (the produce timeout, 1 s), the search (1 s), the publish and commit.
            assert elapsed < 6, f"answered after {elapsed:.1f} s"
            assert stuck.status_code == 503, stuck.text
            assert stuck.headers["Retry-After"] == "3"
            assert {r.status_code for r in rest} <= {200, 503}
            taken = [m for m, r in zip(free_ids, rest, strict=True) if r.status_code == 200]
            refused = [m for m, r in zip(free_ids, rest, strict=True) if r.status_code == 503]
            # A 2xx has its claim; a 503 left none behind (its retry is published).
            assert await claimed(settings, free_ids) == taken

            await side.execute("ROLLBACK")
            assert (await client.post("/v1/batch", json=held_batch, auth=AUTH)).status_code == 200
            for m in refused:
                again = await client.post("/v1/track", json=track(f"v{m}", m), auth=AUTH)
                assert again.status_code == 200, again.text
    finally:
        await side.close()
    ids = [m["value"]["messageId"] for m in await events_on_topic(settings)]
    assert sorted(ids) == sorted(["warm", *held_ids, *free_ids]), "each event exactly once"


def user_on(partition: int, partitions: int) -> str:
    """A userId whose events go to `partition` (murmur2 of the key, as the producer picks)."""
    return next(
        f"user-{i}"
        for i in range(1000)
        if (murmur2(f"user-{i}".encode()) & 0x7FFFFFFF) % partitions == partition
    )


async def test_a_partition_refusing_fails_only_the_requests_with_an_event_for_it(
    make_settings: Callable[..., IngestSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kafka took one partition's batch and refused the other's (its leader without enough in-sync
    replicas): every request of the group got 503, including one Kafka already held, whose retry
    then put it on the topic twice. (The refusal is made at `_send_closed`, at once: a real
    NotEnoughReplicas is retried by the producer until the produce timeout, then fails the same way.)"""
    settings = make_settings(IngestSettings, write_keys=[WRITE_KEY], writer_concurrency=1, topic_partitions=2)
    good, bad = user_on(0, 2), user_on(1, 2)
    original = EventProducer._send_closed
    gate, blocked = asyncio.Event(), asyncio.Event()
    state = {"down": False, "blocking": False}

    async def send_closed(producer: Any, batch: Any, topic: str, partition: int) -> asyncio.Future[Any]:
        if state["blocking"]:  # the worker is busy: the next requests queue up and are grouped
            state["blocking"] = False
            blocked.set()
            await gate.wait()
        if state["down"] and partition == 1:
            batch.close()
            refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            refused.set_exception(NotEnoughReplicasError())
            return refused
        return await original(producer, batch, topic, partition)

    monkeypatch.setattr(EventProducer, "_send_closed", staticmethod(send_closed))
    app = create_app(settings, ManualClock())
    writer: EventWriter = app.state.writer
    async with running(app) as client:
        assert (await client.post("/v1/track", json=track(good, "warm"), auth=AUTH)).status_code == 200
        state.update(down=True, blocking=True)
        blocker = asyncio.create_task(client.post("/v1/track", json=track(good, "blocker"), auth=AUTH))
        await asyncio.wait_for(blocked.wait(), 10)
        both = {
            "batch": [{"type": "track", **track(good, "good-2")}, {"type": "track", **track(bad, "bad-2")}]
        }
        calls = [
            asyncio.create_task(client.post("/v1/track", json=track(good, "good-1"), auth=AUTH)),
            asyncio.create_task(client.post("/v1/track", json=track(bad, "bad-1"), auth=AUTH)),
            asyncio.create_task(client.post("/v1/batch", json=both, auth=AUTH)),
        ]
        await eventually(lambda: len(writer._pending) == 3)  # all three wait for the worker: one group
        gate.set()
        assert (await blocker).status_code == 200
        one_good, one_bad, mixed = await asyncio.gather(*calls)
        assert one_good.status_code == 200, "its partition took it"
        assert one_bad.status_code == 503
        assert mixed.status_code == 503, "one of its events was not taken"
        assert await claimed(settings, ["bad-1", "bad-2", "good-1", "good-2"]) == ["good-1", "good-2"]

        state["down"] = False  # the partition is back; the clients retry
        assert (await client.post("/v1/track", json=track(good, "good-1"), auth=AUTH)).status_code == 200
        assert (await client.post("/v1/track", json=track(bad, "bad-1"), auth=AUTH)).status_code == 200
        retried = await client.post("/v1/batch", json=both, auth=AUTH)
        assert retried.json() == {"success": True, "accepted": 2, "duplicates": 1}
    ids = [m["value"]["messageId"] for m in await events_on_topic(settings, count=6)]
    assert sorted(ids) == ["bad-1", "bad-2", "blocker", "good-1", "good-2", "warm"]

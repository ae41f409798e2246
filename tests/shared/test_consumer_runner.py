"""The shared consumer runner against a real broker and database: round trip, redelivery, DLQ,
concurrent units of work and hand-over on a rebalance."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import REGISTRY
from sqlalchemy import text

from shared.contracts import CUSTOMER_EVENTS, CustomerEvent, Headers
from shared.kafka import Consumed, EventProducer, ensure_topics
from shared.kafka.producer import OutgoingMessage, encode_message
from shared.runtime import Platform
from shared.settings import BaseServiceSettings
from tests.support import eventually, read_topic


class RunnerSettings(BaseServiceSettings):
    service_name: str = "runner_test"
    db_schema: str = "runner"


def event(n: int, user: str = "u1") -> CustomerEvent:
    now = datetime.now(UTC)
    return CustomerEvent(
        message_id=f"m{n}",
        type="track",
        user_id=user,
        event="Tested",
        properties={"n": n},
        timestamp=now,
        received_at=now,
    )


async def make_effects_table(platform: Platform) -> None:
    async with platform.engine.begin() as conn:
        await conn.execute(text("CREATE TABLE effects (n int NOT NULL, message_id text NOT NULL)"))


async def effects(platform: Platform) -> list[int]:
    async with platform.engine.connect() as conn:
        return [r[0] for r in await conn.execute(text("SELECT n FROM effects ORDER BY n"))]


@pytest.fixture
async def platform(make_settings) -> Platform:  # type: ignore[no-untyped-def]
    settings = make_settings(RunnerSettings)
    p = Platform(settings, migrations=None)
    await p.start()
    import sqlalchemy as sa

    from shared.db import messaging_tables

    async with p.engine.begin() as conn:
        await conn.run_sync(lambda c: messaging_tables.define(sa.MetaData())[0].metadata.create_all(c))
    await make_effects_table(p)
    yield p
    await p.stop()


def idempotent_handler(
    platform: Platform, fail_on: set[int] | None = None, fail_times: dict[int, int] | None = None
):  # type: ignore[no-untyped-def]
    fail_times = fail_times if fail_times is not None else {}

    async def handle(batch: Sequence[Consumed[CustomerEvent]]) -> None:
        async with platform.unit_of_work() as uow:
            for item in batch:
                n = int(item.value.properties["n"])
                if fail_on and n in fail_on:
                    raise ValueError(f"poison {n}")
                if fail_times.get(n, 0) > 0:
                    fail_times[n] -= 1
                    raise RuntimeError(f"transient failure on {n}")
                if not await uow.claim("test", item.event_id):
                    continue
                await uow.session.execute(
                    text("INSERT INTO effects (n, message_id) VALUES (:n, :m)"), {"n": n, "m": item.event_id}
                )

    return handle


async def test_round_trip_through_the_runner(platform: Platform) -> None:
    s = platform.settings
    for i in range(20):
        await platform.producer.publish(CUSTOMER_EVENTS.name, "u1", event(i))
    runner = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "roundtrip", idempotent_handler(platform))
    await runner.start()
    got = await eventually(lambda: _len_is(platform, 20), timeout=20)
    assert got == list(range(20))
    await runner.stop()
    # offsets were committed: a new runner in the same group sees nothing more
    again = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "roundtrip", idempotent_handler(platform))
    await again.start()
    await asyncio.sleep(1.5)
    await again.stop()
    assert again.processed == 0
    assert await effects(platform) == list(range(20))
    assert s.topic_prefix


async def _committed(platform: Platform, group: str) -> int:
    """The sum of a group's committed offsets over the topic's partitions."""
    s = platform.settings
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap_servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(s.consumer_group(group))
        return sum(om.offset for om in offsets.values() if om.offset > 0)
    finally:
        await admin.close()


async def test_handled_offsets_are_committed_on_the_interval_and_on_stop(platform: Platform) -> None:
    for i in range(10):
        await platform.producer.publish(CUSTOMER_EVENTS.name, "u1", event(i))
    # No commit per batch: within the interval the handled offsets wait (effects are committed).
    handler = idempotent_handler(platform)
    runner = platform.consumer(
        CUSTOMER_EVENTS.name, CustomerEvent, "lazy", handler, commit_interval_ms=60_000
    )
    await runner.start()
    await eventually(lambda: _len_is(platform, 10), timeout=20)
    assert await _committed(platform, "lazy") == 0
    await runner.stop()  # ... and are committed on the way out
    assert await _committed(platform, "lazy") == 10

    for i in range(10, 15):
        await platform.producer.publish(CUSTOMER_EVENTS.name, "u1", event(i))
    again = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "lazy", handler, commit_interval_ms=100)
    await again.start()
    try:
        # resumes after the committed offsets, and commits on its interval while running
        await eventually(lambda: _len_is(platform, 15), timeout=20)

        async def all_committed() -> bool | None:
            return await _committed(platform, "lazy") == 15 or None

        await eventually(all_committed, timeout=10)
        assert again.processed == 5
    finally:
        await again.stop()
    assert await effects(platform) == list(range(15))


async def _len_is(platform: Platform, n: int) -> list[int] | None:
    got = await effects(platform)
    return got if len(got) >= n else None


async def test_mid_batch_failure_redelivers_without_loss_or_duplicates(platform: Platform) -> None:
    for i in range(30):
        await platform.producer.publish(CUSTOMER_EVENTS.name, f"u{i % 3}", event(i, f"u{i % 3}"))
    # message 7 fails twice, then succeeds: the batch is retried and nothing is doubled or lost
    runner = platform.consumer(
        CUSTOMER_EVENTS.name,
        CustomerEvent,
        "midbatch",
        idempotent_handler(platform, fail_times={7: 2}),
        max_attempts=3,
    )
    await runner.start()
    await eventually(lambda: _len_is(platform, 30), timeout=20)
    await runner.stop()
    assert await effects(platform) == list(range(30))
    dlq = await read_topic(platform.settings.topic(CUSTOMER_EVENTS.dead_letter), idle=1.0, timeout=3)
    assert dlq == []


async def test_redelivered_batch_changes_nothing(platform: Platform) -> None:
    for i in range(5):
        await platform.producer.publish(CUSTOMER_EVENTS.name, "u1", event(i))
    handler = idempotent_handler(platform)
    first = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "g1", handler)
    await first.start()
    await eventually(lambda: _len_is(platform, 5), timeout=20)
    await first.stop()
    # a different group reads the same messages again: the inbox drops every one
    second = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "g2", handler)
    await second.start()
    await eventually(lambda: second.processed >= 5, timeout=20)
    await second.stop()
    assert await effects(platform) == list(range(5))


async def test_poison_message_goes_to_the_dead_letter_topic_and_the_partition_moves_on(
    platform: Platform,
) -> None:
    s = platform.settings
    await platform.producer.publish(CUSTOMER_EVENTS.name, "u1", event(1))
    await platform.producer.publish(CUSTOMER_EVENTS.name, "u1", event(2))  # always fails
    # not even JSON: cannot be decoded at all
    await platform.producer.send(OutgoingMessage(s.topic(CUSTOMER_EVENTS.name), b"u1", b"{not json", ()))
    await platform.producer.publish(CUSTOMER_EVENTS.name, "u1", event(3))
    runner = platform.consumer(
        CUSTOMER_EVENTS.name,
        CustomerEvent,
        "poison",
        idempotent_handler(platform, fail_on={2}),
        max_attempts=2,
    )
    await runner.start()
    await eventually(lambda: _len_is(platform, 2), timeout=20)
    dlq = await read_topic(s.topic(CUSTOMER_EVENTS.dead_letter), count=2, timeout=10)
    await runner.stop()
    assert await effects(platform) == [1, 3]
    assert len(dlq) == 2
    errors = sorted(m["headers"][Headers.DLQ_ERROR] for m in dlq)
    assert any("poison 2" in e for e in errors)
    assert any(e.startswith("undecodable") for e in errors)
    poisoned = next(m for m in dlq if "poison" in m["headers"][Headers.DLQ_ERROR])
    assert orjson.loads(poisoned["raw"])["messageId"] == "m2"
    assert poisoned["headers"][Headers.DLQ_ATTEMPTS] == "2"
    assert poisoned["headers"][Headers.DLQ_GROUP] == s.consumer_group("poison")


async def test_a_poison_message_in_a_big_batch_is_found_by_halves(platform: Platform) -> None:
    s = platform.settings
    await platform.producer.send_many(
        [encode_message(s.topic(CUSTOMER_EVENTS.name), "u1", event(n), producer="test") for n in range(256)]
    )
    handle = idempotent_handler(platform, fail_on={200})
    calls: list[int] = []

    async def counting(batch: Sequence[Consumed[CustomerEvent]]) -> None:
        calls.append(len(batch))
        await handle(batch)

    runner = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "halves", counting, max_attempts=2)
    await runner.start()
    await eventually(lambda: _len_is(platform, 255), timeout=30)
    dlq = await read_topic(s.topic(CUSTOMER_EVENTS.dead_letter), count=1, timeout=10)
    await runner.stop()
    assert await effects(platform) == [n for n in range(256) if n != 200]
    assert [orjson.loads(m["raw"])["messageId"] for m in dlq] == ["m200"]
    # Units of work (each with its fixed cost): one by one, 257 at least; by halves, the failed batch,
    # two halves per level down to the poison message (log2 256 = 8 levels) and its second attempt.
    assert len(calls) <= 1 + 2 * 8 + 1 + 4, calls  # (+4: the events may arrive in a few fetches)


async def test_ensure_topics_is_idempotent(platform: Platform) -> None:
    assert await ensure_topics(platform.settings) == []
    producer = EventProducer(platform.settings)
    await producer.start()
    await producer.ping()
    await producer.stop()


async def test_topics_are_created_with_their_configs(platform: Platform) -> None:
    """The templates topic is compacted: a consumer replaying it learns every template's state."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from shared.contracts.topics import TEMPLATES

    admin = AIOKafkaAdminClient(bootstrap_servers=platform.settings.kafka_bootstrap_servers)
    await admin.start()
    names = [platform.settings.topic(t) for t in (TEMPLATES.name, CUSTOMER_EVENTS.name)]
    policy: dict[str, str] = {}

    async def described() -> bool:
        # Right after creation a broker may not describe the topic yet (no entries): ask again.
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
        for response in responses:
            for resource in response.resources:
                entries = {entry[0]: entry[1] for entry in resource[4]}
                if "cleanup.policy" in entries:
                    policy[resource[3]] = entries["cleanup.policy"]
        return len(policy) == 2

    try:
        await eventually(described, timeout=15)
    finally:
        await admin.close()
    assert policy == {names[0]: "compact", names[1]: "delete"}


class UnitRecorder:
    """A handler that records each unit of work: its (partition, offset) pairs, and how many units
    (and which partitions) were in hand at once. Each unit takes `hold_s`, as a database would."""

    def __init__(self, hold_s: float = 0.05) -> None:
        self.hold_s = hold_s
        self.handled: list[tuple[int, int]] = []
        self.in_hand: list[set[int]] = []
        self.alongside: list[set[int]] = []  # partitions of each unit started beside another
        self.most_at_once = 0
        self.shared_partition = False
        self.release = asyncio.Event()
        self.release.set()
        self.entered = asyncio.Event()

    async def __call__(self, batch: Sequence[Consumed[CustomerEvent]]) -> None:
        mine = {c.partition for c in batch}
        self.shared_partition |= any(mine & other for other in self.in_hand)
        if self.in_hand:
            self.alongside.append(mine)
        self.in_hand.append(mine)
        self.most_at_once = max(self.most_at_once, len(self.in_hand))
        self.entered.set()
        try:
            await asyncio.sleep(self.hold_s)
            await self.release.wait()
            self.handled += [(c.partition, c.offset) for c in batch]
        finally:
            self.in_hand.remove(mine)


async def _publish(platform: Platform, n: int, users: int, first: int = 0) -> None:
    s = platform.settings
    await platform.producer.send_many(
        [
            encode_message(
                s.topic(CUSTOMER_EVENTS.name), f"u{i % users}", event(i, f"u{i % users}"), producer="t"
            )
            for i in range(first, first + n)
        ]
    )


def _in_order_once(handled: list[tuple[int, int]]) -> bool:
    by_partition: dict[int, list[int]] = {}
    for partition, offset in handled:
        by_partition.setdefault(partition, []).append(offset)
    return all(
        offsets == list(range(offsets[0], offsets[0] + len(offsets))) for offsets in by_partition.values()
    )


async def test_a_backlog_runs_concurrent_units_on_distinct_partitions_each_in_order(
    platform: Platform,
) -> None:
    await _publish(platform, 400, users=40)
    recorder = UnitRecorder()
    runner = platform.consumer(
        CUSTOMER_EVENTS.name, CustomerEvent, "backlog", recorder, max_batch=50, concurrency=3
    )
    await runner.start()
    try:
        await eventually(lambda: len(recorder.handled) >= 400, timeout=30)
    finally:
        await runner.stop()
    assert len(recorder.handled) == 400
    assert _in_order_once(recorder.handled)  # every partition from its first offset, none twice
    labels = {"service": platform.settings.service_name, "topic": runner.topic}
    assert REGISTRY.get_sample_value("clm_consumer_units_in_flight", labels) == 0
    assert REGISTRY.get_sample_value("clm_consumer_buffered", labels) == 0
    assert 2 <= recorder.most_at_once <= 3
    assert not recorder.shared_partition
    assert await _committed(platform, "backlog") == 400


async def test_a_consumer_keeping_up_runs_one_unit_at_a_time(platform: Platform) -> None:
    recorder = UnitRecorder()
    runner = platform.consumer(
        CUSTOMER_EVENTS.name, CustomerEvent, "steady", recorder, concurrency=4, pipeline_after_ms=1000
    )
    await runner.start()
    try:
        for round_ in range(10):
            await _publish(platform, 5, users=5, first=5 * round_)  # far less than a full batch at a time
            await asyncio.sleep(0.02)
        await eventually(lambda: len(recorder.handled) >= 50, timeout=30)
    finally:
        await runner.stop()
    assert recorder.most_at_once == 1
    assert len(recorder.handled) == 50


async def test_slow_units_pipeline_two_at_once_each_on_half_the_partitions(platform: Platform) -> None:
    recorder = UnitRecorder(hold_s=0.05)
    runner = platform.consumer(
        CUSTOMER_EVENTS.name, CustomerEvent, "pipelined", recorder, concurrency=4, pipeline_after_ms=20
    )
    await runner.start()
    try:
        for round_ in range(20):
            await _publish(platform, 10, users=40, first=10 * round_)  # far less than a full batch
            await asyncio.sleep(0.02)
        await eventually(lambda: len(recorder.handled) >= 200, timeout=30)
    finally:
        await runner.stop()
    assert len(recorder.handled) == 200
    assert _in_order_once(recorder.handled)
    assert recorder.most_at_once == 2  # never a third: no full batch was waiting
    assert not recorder.shared_partition
    half = platform.settings.topic_partitions // 2
    assert recorder.alongside and all(len(unit) <= half for unit in recorder.alongside)


async def test_a_rebalance_waits_for_the_units_in_hand_so_nothing_is_handled_twice(
    platform: Platform,
) -> None:
    first = UnitRecorder()
    first.release.clear()  # the first units block until the rebalance is under way
    a = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "handover", first, max_batch=20, concurrency=2)
    await a.start()
    second = UnitRecorder()
    b = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "handover", second, max_batch=20)
    try:
        await eventually(lambda: a.assigned_partitions, timeout=20)
        # Enough that each partition has records left after the two units `a` holds (20 each).
        await _publish(platform, 200, users=40)
        await asyncio.wait_for(first.entered.wait(), 20)
        # `b` joins the group (its start returns once the group has rebalanced): `a` must hand its
        # partitions over with units in hand.
        before = a.hand_overs
        joining = asyncio.create_task(b.start())
        await eventually(lambda: a.hand_overs > before, timeout=20)
        await asyncio.sleep(0.3)
        first.release.set()
        await joining
        await eventually(lambda: len(first.handled) + len(second.handled) >= 200, timeout=30)
        await asyncio.sleep(1.0)  # anything handled twice would show up by now
    finally:
        first.release.set()
        await a.stop()
        await b.stop()
    everything = first.handled + second.handled
    assert len(everything) == 200
    assert len(set(everything)) == 200
    assert second.handled  # the rebalance did hand partitions over

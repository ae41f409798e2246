"""`shared.kafka.consumer.ConsumerRunner` on its error paths, against the real broker and database:
input that is not CLM's and dependencies that fail must neither stop the consumer nor dead-letter
good messages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
import sqlalchemy.exc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.structs import OffsetAndMetadata, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from shared.contracts import CUSTOMER_EVENTS, CustomerEvent, Headers
from shared.db import messaging_tables
from shared.db.engine import session_factory, sqlalchemy_url
from shared.kafka import Consumed, ensure_topics
from shared.kafka.consumer import is_infrastructure_error
from shared.kafka.producer import OutgoingMessage, encode_message
from shared.runtime import Platform
from shared.settings import BaseServiceSettings
from tests.shared.test_consumer_runner import event
from tests.support import eventually, infra, read_topic, set_topic_configs


async def raw_records(topic: str, count: int, timeout: float = 10) -> list[ConsumerRecord[bytes, bytes]]:
    """The first `count` records of `topic`, undecoded (`read_topic` decodes keys as UTF-8)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=infra()[0], group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        async with asyncio.timeout(timeout):
            while len(out) < count:
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    out += records
    finally:
        await consumer.stop()
    return out


class ConsumerSettings(BaseServiceSettings):
    service_name: str = "consumer_test"
    db_schema: str = "consumer"


@pytest.fixture
async def platform(make_settings: Callable[..., Any]) -> AsyncIterator[Platform]:
    p = Platform(make_settings(ConsumerSettings), migrations=None)
    await p.start()
    async with p.engine.begin() as conn:
        await conn.run_sync(lambda c: messaging_tables.define(sa.MetaData())[0].metadata.create_all(c))
        await conn.execute(text("CREATE TABLE effects (n int NOT NULL, message_id text NOT NULL)"))
    yield p
    await p.stop()


async def effects(platform: Platform) -> list[int]:
    async with platform.engine.connect() as conn:
        return [r[0] for r in await conn.execute(text("SELECT n FROM effects ORDER BY n"))]


def recording_handler(platform: Platform) -> Callable[[Sequence[Consumed[CustomerEvent]]], Any]:
    async def handle(batch: Sequence[Consumed[CustomerEvent]]) -> None:
        async with platform.unit_of_work() as uow:
            for item in batch:
                if await uow.claim("test", item.event_id):
                    await uow.session.execute(
                        text("INSERT INTO effects (n, message_id) VALUES (:n, :m)"),
                        {"n": int(item.value.properties["n"]), "m": item.event_id},
                    )

    return handle


async def test_a_record_whose_key_is_not_utf8_is_dead_lettered_and_the_consumer_goes_on(
    platform: Platform,
) -> None:
    s = platform.settings
    topic = s.topic(CUSTOMER_EVENTS.name)
    good = encode_message(topic, "u1", event(1), producer="t")
    # A valid event under a key no CLM producer writes (another client's binary key).
    await platform.producer.send(OutgoingMessage(topic, b"\xff\xfe", good.value, good.headers))
    await platform.producer.send(encode_message(topic, "u1", event(2), producer="t"))
    runner = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "badkey", recording_handler(platform))
    await runner.start()
    try:
        await eventually(lambda: effects(platform), timeout=20)
        dlq = await raw_records(s.topic(CUSTOMER_EVENTS.dead_letter), count=1)
        assert runner.running
    finally:
        await runner.stop()
    assert await effects(platform) == [2]
    assert [r.key for r in dlq] == [b"\xff\xfe"]
    assert dict(dlq[0].headers)[Headers.DLQ_ERROR].startswith(b"undecodable: key is not UTF-8")


async def test_a_database_pool_with_no_connection_free_is_waited_out_not_dead_lettered(
    platform: Platform,
) -> None:
    """A pool timeout says the database is slow or unreachable, not that the message is bad: the
    batch is retried until a connection comes free, and nothing goes to the dead-letter topic."""
    s = platform.settings
    # One connection, given up on quickly: the pool timeout comes within the runner's attempts.
    engine = create_async_engine(
        sqlalchemy_url(s.database_url), pool_size=1, max_overflow=0, pool_timeout=0.2
    )
    held = await engine.connect()  # as if every connection were stuck on a slow database
    sessions = session_factory(engine)

    async def handle(batch: Sequence[Consumed[CustomerEvent]]) -> None:
        async with sessions() as session, session.begin():
            for item in batch:
                await session.execute(
                    text(f'INSERT INTO "{s.db_schema}".effects (n, message_id) VALUES (:n, :m)'),
                    {"n": int(item.value.properties["n"]), "m": item.event_id},
                )

    await platform.producer.publish(CUSTOMER_EVENTS.name, "u1", event(1))
    runner = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "pooltimeout", handle, max_attempts=2)
    await runner.start()
    try:
        await asyncio.sleep(2.0)  # several pool timeouts
        await held.close()
        assert await eventually(lambda: effects(platform), timeout=20) == [1]
    finally:
        await runner.stop()
        await engine.dispose()
    assert await read_topic(s.topic(CUSTOMER_EVENTS.dead_letter), idle=1.0, timeout=3) == []


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.CrashShutdownError(),  # 57P02: another backend crashed, the server restarts
        asyncpg.exceptions.ClientCannotConnectError(),  # 08001
        asyncpg.exceptions.ConnectionRejectionError(),  # 08004
        sqlalchemy.exc.TimeoutError("QueuePool limit of size 10 overflow 10 reached"),
    ],
)
def test_connection_failures_of_every_kind_are_infrastructure_errors(error: Exception) -> None:
    assert is_infrastructure_error(error)


@pytest.mark.parametrize(
    "error",
    [asyncpg.exceptions.UniqueViolationError(), asyncpg.exceptions.QueryCanceledError(), ValueError()],
)
def test_errors_of_the_message_are_not(error: Exception) -> None:
    assert not is_infrastructure_error(error)


async def test_a_dead_letter_topic_unavailable_for_a_while_is_waited_out(platform: Platform) -> None:
    """The dead-letter write fails while its topic cannot be written (here: it is gone, and the
    broker creates no topics): the runner retries it as it does a handler in an outage, then
    dead-letters the message and goes on, instead of stopping the consumer for good."""
    s = platform.settings
    dlq_topic = s.topic(CUSTOMER_EVENTS.dead_letter)
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.delete_topics([dlq_topic])
        await eventually(lambda: _gone(admin, dlq_topic), timeout=20)
    finally:
        await admin.close()
    topic = s.topic(CUSTOMER_EVENTS.name)
    await platform.producer.send(OutgoingMessage(topic, b"u1", b"{not json", ()))
    await platform.producer.publish(CUSTOMER_EVENTS.name, "u1", event(2))
    runner = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "dlqdown", recording_handler(platform))
    await runner.start()
    try:
        # The producer reports the missing topic (UnknownTopicOrPartition, or a timeout).
        await eventually(lambda: runner.last_error, timeout=30)
        assert runner.running and await effects(platform) == []  # the partition waits, in order
        await ensure_topics(s)
        assert await eventually(lambda: effects(platform), timeout=30) == [2]
        dlq = await read_topic(dlq_topic, count=1, timeout=10)
    finally:
        await runner.stop()
    assert [m["raw"] for m in dlq] == [b"{not json"]


async def _gone(admin: AIOKafkaAdminClient, topic: str) -> bool:
    return topic not in await admin.list_topics()


async def test_a_record_too_large_for_its_dead_letter_topic_is_dead_lettered_without_its_value(
    platform: Platform,
) -> None:
    """A record the source topic took (just under the broker's ~1 MB default) that fails: with the
    error headers added, the dead-letter record was over the limit, and its write was retried forever
    (the partition waited for good). It goes without its value, which the source topic still holds."""
    s = platform.settings
    topic = s.topic(CUSTOMER_EVENTS.name)
    big = b"{" + b"x" * 1_048_479  # undecodable, and as large as aiokafka lets another client write it
    raw = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap_servers)
    await raw.start()
    try:
        await raw.send_and_wait(topic, big, key=b"u1")  # the partition of the good event below
    finally:
        await raw.stop()
    await platform.producer.send(
        OutgoingMessage(topic, b"u1", encode_message(topic, "u1", event(2), producer="t").value)
    )
    runner = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "bigdlq", recording_handler(platform))
    await runner.start()
    try:
        assert await eventually(lambda: effects(platform), timeout=30) == [2]
        [dead] = await raw_records(s.topic(CUSTOMER_EVENTS.dead_letter), count=1)
        assert runner.running
    finally:
        await runner.stop()
    headers = dict(dead.headers)
    assert dead.value in (b"", None) and dead.key == b"u1"
    assert headers[Headers.DLQ_VALUE_DROPPED].startswith(f"{len(big)} bytes".encode())
    assert headers[Headers.DLQ_ERROR].startswith(b"undecodable")
    source_topic, partition, offset = headers[Headers.DLQ_SOURCE].decode().rsplit("/", 2)
    # Still readable where it came from.
    source = await raw_records(source_topic, count=2)
    [original] = [r for r in source if (r.partition, r.offset) == (int(partition), int(offset))]
    assert original.value == big


async def test_a_dead_letter_record_the_broker_refuses_as_too_large_goes_without_its_value(
    platform: Platform,
) -> None:
    """The dead-letter topic's max.message.bytes is below `kafka_max_message_bytes`: refused, the
    record goes again without its value, and the consumer goes on."""
    s = platform.settings
    topic, dlq_topic = s.topic(CUSTOMER_EVENTS.name), s.topic(CUSTOMER_EVENTS.dead_letter)
    await set_topic_configs(dlq_topic, {"max.message.bytes": "20000"})
    await platform.producer.send(OutgoingMessage(topic, b"u1", b"{" + b"x" * 30_000, ()))
    await platform.producer.send(OutgoingMessage(topic, b"u1", b"{small", ()))
    await platform.producer.publish(CUSTOMER_EVENTS.name, "u1", event(3))
    runner = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "refuseddlq", recording_handler(platform))
    await runner.start()
    try:
        assert await eventually(lambda: effects(platform), timeout=30) == [3]
        dead = await raw_records(dlq_topic, count=2)
        assert runner.running
    finally:
        await runner.stop()
    assert Headers.DLQ_VALUE_DROPPED in dict(dead[0].headers) and dead[0].value in (b"", None)
    assert b"refused by the broker" in dict(dead[0].headers)[Headers.DLQ_VALUE_DROPPED]
    assert dead[1].value == b"{small" and Headers.DLQ_VALUE_DROPPED not in dict(dead[1].headers)


async def test_a_rebalance_finishing_during_an_offset_commit_does_not_stop_the_consumer(
    platform: Platform,
) -> None:
    """The lag metric read each committed partition's highwater after the commit, which aiokafka
    asserts is still assigned: a rebalance taking it during the commit's await raised AssertionError
    out of the runner's loop."""
    await platform.producer.publish(CUSTOMER_EVENTS.name, "u1", event(1))
    runner = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "rebalance", recording_handler(platform))
    runner.commit_interval_s = 3600.0  # nothing committed behind the test's back
    await runner.start()
    try:
        await eventually(lambda: effects(platform), timeout=20)
        await eventually(lambda: bool(runner._pending), timeout=5)
        consumer = runner._consumer
        assert consumer is not None
        real_commit = consumer.commit

        async def commit_then_lose_the_partitions(offsets: Any = None) -> None:
            await real_commit(offsets)
            consumer.unsubscribe()  # the group took the partitions away meanwhile

        consumer.commit = commit_then_lose_the_partitions  # type: ignore[method-assign]
        await runner.commit_pending()
        assert not runner._pending
    finally:
        await runner.stop()
    assert await effects(platform) == [1]


class _NotUtf8(str):
    """A header name as another client may write it: bytes that are not UTF-8."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff"


def event_message(topic: str, n: int) -> OutgoingMessage:
    """Test event `n` as a record for `topic` (key `u1`)."""
    return encode_message(topic, "u1", event(n), producer="t")


async def _send_batch(topic: str, partition: int, records: Sequence[OutgoingMessage | None]) -> None:
    """`records` as one record batch on `partition`; None: a record aiokafka cannot parse (its
    header name is not UTF-8, and the client decodes header names as it fetches)."""
    await _send_batches(topic, {partition: records})


async def _send_batches(topic: str, batches: dict[int, Sequence[OutgoingMessage | None]]) -> None:
    """One record batch per partition, sent together (one produce request: the broker appends them
    at once)."""
    producer = AIOKafkaProducer(bootstrap_servers=infra()[0])
    await producer.start()
    try:
        sent = []
        for partition, records in batches.items():
            batch = producer.create_batch()
            # The pure-Python builder, which writes a header name as its `encode` gives it.
            batch._builder = _DefaultRecordBatchBuilderPy(
                2,
                0,
                is_transactional=0,
                producer_id=-1,
                producer_epoch=-1,
                base_sequence=0,
                batch_size=1 << 20,
            )
            for m in records:
                if m is None:
                    batch.append(timestamp=None, key=b"u1", value=b"{}", headers=[(_NotUtf8("x"), b"v")])
                else:
                    batch.append(timestamp=None, key=m.key, value=m.value, headers=list(m.headers))
            sent.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def _committed(platform: Platform, group: str, topic: str, partition: int) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=infra()[0], group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        result: int | None = await consumer.committed(TopicPartition(topic, partition))
        return result
    finally:
        await consumer.stop()


async def test_a_record_the_client_cannot_parse_is_dead_lettered_by_position_and_nothing_else_is_lost(
    platform: Platform,
) -> None:
    """aiokafka fails every fetch that reaches such a record (once, it stopped the consumer for good,
    and a fetch over several partitions lost the records it had taken from the others): the record
    is found, dead-lettered as its position and skipped, and so are the records after it in its
    record batch (the client parses the whole batch even to start inside it); the others are handled."""
    s = platform.settings
    topic = s.topic(CUSTOMER_EVENTS.name)
    msg = partial(event_message, topic)

    # When the fetch that fails on partition 0 has taken these already (aiokafka drains partitions
    # in the order of the fetch response: in some runs, not all), they are fetched again.
    await _send_batch(topic, 1, [msg(10), msg(11), msg(12)])
    await _send_batch(topic, 0, [msg(1), msg(2), msg(3), None, msg(4), msg(5)])
    await _send_batch(topic, 0, [msg(6)])
    runner = platform.consumer(
        CUSTOMER_EVENTS.name, CustomerEvent, "unparseable", recording_handler(platform)
    )
    await runner.start()
    try:
        await eventually(lambda: _equals(effects(platform), [1, 2, 3, 6, 10, 11, 12]), timeout=30)
        dlq = await raw_records(s.topic(CUSTOMER_EVENTS.dead_letter), count=3)
        assert runner.running
    finally:
        await runner.stop()
    assert await effects(platform) == [1, 2, 3, 6, 10, 11, 12]
    # The bad record and the two after it in its batch, each once, by position and without a value.
    assert [dict(r.headers)[Headers.DLQ_SOURCE] for r in dlq] == [
        f"{topic}/0/{o}".encode() for o in (3, 4, 5)
    ]
    for r in dlq:
        headers = dict(r.headers)
        assert headers[Headers.DLQ_ERROR].startswith(b"unreadable by the Kafka client")
        assert b"UnicodeDecodeError" in headers[Headers.DLQ_ERROR]
        assert Headers.DLQ_VALUE_DROPPED in headers
        assert r.value == b""
    with pytest.raises(TimeoutError):
        await raw_records(s.topic(CUSTOMER_EVENTS.dead_letter), count=4, timeout=3)
    assert await _committed(platform, runner.group, topic, 0) == 7
    assert await _committed(platform, runner.group, topic, 1) == 3


async def test_the_search_waits_out_a_fetch_the_broker_holds_longer_than_the_runners_timeout(
    platform: Platform,
) -> None:
    """A consumer whose fetches the broker holds longer (`fetch_max_wait_ms`, for a `fetch_min_bytes`
    not reached) than the runner waits for a fetch: the search's empty answers once passed for
    "nothing bad here", and it started over for ever. Rounds of records on both partitions, sent
    together, with an unparseable one on partition 0 each time: every readable record is handled,
    each bad one dead-lettered once."""
    s = platform.settings
    topic = s.topic(CUSTOMER_EVENTS.name)
    msg = partial(event_message, topic)

    runner = platform.consumer(
        CUSTOMER_EVENTS.name,
        CustomerEvent,
        "unparseable-held",
        recording_handler(platform),
        max_batch=4,  # a short search: 4, 2, 1
        fetch_min_bytes=1 << 20,
        fetch_max_wait_ms=300,  # the runner's own fetch timeout is 200 ms
    )
    rounds, handled = 3, []
    await runner.start()
    try:
        for r in range(rounds):
            n = 100 * (r + 1)
            await _send_batches(topic, {0: [msg(n), None], 1: [msg(n + 1), msg(n + 2)]})
            handled += [n, n + 1, n + 2]
            expected = sorted(handled)
            await eventually(lambda: _equals(effects(platform), expected), timeout=30)  # noqa: B023
        assert runner.running
    finally:
        await runner.stop()
    dlq = await raw_records(s.topic(CUSTOMER_EVENTS.dead_letter), count=rounds)
    assert sorted(dict(r.headers)[Headers.DLQ_SOURCE] for r in dlq) == sorted(
        f"{topic}/0/{2 * r + 1}".encode() for r in range(rounds)
    )
    assert await _committed(platform, runner.group, topic, 1) == 2 * rounds


async def test_an_unparseable_last_record_is_committed_past_so_a_restart_skips_it(
    platform: Platform,
) -> None:
    s = platform.settings
    topic = s.topic(CUSTOMER_EVENTS.name)
    await _send_batch(topic, 0, [encode_message(topic, "u1", event(1), producer="t"), None])
    runner = platform.consumer(
        CUSTOMER_EVENTS.name, CustomerEvent, "unparseable-last", recording_handler(platform)
    )
    await runner.start()
    try:
        await eventually(lambda: _equals(effects(platform), [1]), timeout=30)
        # Nothing after it to commit with: the skip is committed on its own.
        await eventually(lambda: _committed_is(platform, runner.group, topic, 2), timeout=30)
    finally:
        await runner.stop()
    dlq = await raw_records(s.topic(CUSTOMER_EVENTS.dead_letter), count=1)
    assert dict(dlq[0].headers)[Headers.DLQ_SOURCE] == f"{topic}/0/1".encode()
    with pytest.raises(TimeoutError):  # dead-lettered once
        await raw_records(s.topic(CUSTOMER_EVENTS.dead_letter), count=2, timeout=3)
    assert await effects(platform) == [1]


async def _equals(values: Any, expected: list[int]) -> bool:
    return bool(await values == expected)


async def _committed_is(platform: Platform, group: str, topic: str, offset: int) -> bool:
    return await _committed(platform, group, topic, 0) == offset


async def test_records_a_failed_fetch_had_taken_from_other_partitions_are_fetched_again(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    """aiokafka moves a partition's position past the records a fetch takes, and a fetch that then
    fails on another partition's record returns none of them. Which partitions a real failing fetch
    drains first depends on the broker's response (0 of 8 tries did so here), so the failure is put
    into the client: a fetch that takes records of both partitions fails instead of returning them.
    Once right after the assignment (the partitions go back to where the group starts) and once
    after records were handled (back to the offset after the last one buffered). Every record is
    handled all the same, once."""
    s = platform.settings
    topic = s.topic(CUSTOMER_EVENTS.name)
    msg = partial(event_message, topic)

    runner = platform.consumer(
        CUSTOMER_EVENTS.name,
        CustomerEvent,
        "refetch",
        recording_handler(platform),
        # The broker holds a fetch until both partitions' records are in.
        fetch_min_bytes=1 << 20,
        fetch_max_wait_ms=300,
    )
    await runner.start()
    consumer = runner._consumer
    assert consumer is not None
    real_getmany = consumer.getmany
    armed, dropped = [True], []

    async def getmany_failing(*partitions: TopicPartition, **kwargs: Any) -> Any:
        got = await real_getmany(*partitions, **kwargs)
        if armed[0] and len([recs for recs in got.values() if recs]) == 2:
            armed[0] = False
            dropped.append({tp.partition: [r.offset for r in recs] for tp, recs in got.items()})
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return got

    consumer.getmany = getmany_failing  # type: ignore[method-assign]
    caplog.set_level("INFO", logger="shared.kafka.consumer")
    try:
        await _send_batches(topic, {0: [msg(1), msg(2)], 1: [msg(10), msg(11)]})
        await eventually(lambda: _equals(effects(platform), [1, 2, 10, 11]), timeout=30)
        armed[0] = True
        await _send_batches(topic, {0: [msg(3)], 1: [msg(12), msg(13)]})
        await eventually(lambda: _equals(effects(platform), [1, 2, 3, 10, 11, 12, 13]), timeout=30)
        assert runner.running
    finally:
        await runner.stop()
    assert dropped == [{0: [0, 1], 1: [0, 1]}, {0: [2], 1: [2, 3]}]
    assert await effects(platform) == [1, 2, 3, 10, 11, 12, 13]  # each once
    refetched = [r for r in caplog.records if r.getMessage().startswith("fetching again")]
    assert sorted((r.__dict__["partition"], r.__dict__["from"], r.__dict__["to"]) for r in refetched) == [
        (0, 2, 3),
        (1, 2, 4),
    ]
    # Nothing was unreadable: nothing dead-lettered.
    with pytest.raises(TimeoutError):
        await raw_records(s.topic(CUSTOMER_EVENTS.dead_letter), count=1, timeout=2)
    assert await _committed(platform, runner.group, topic, 0) == 3
    assert await _committed(platform, runner.group, topic, 1) == 4


async def test_an_offset_of_a_partition_handed_over_fails_no_commit_of_the_others(platform: Platform) -> None:
    """A unit that outlives the hand-over wait finishes after its partition went to another member:
    its offset, pending with the others, made aiokafka refuse the whole commit (IllegalStateError),
    and every other partition's handled offset was dropped from the pending ones uncommitted. A
    commit that fails keeps its offsets for the next one."""
    topic = platform.settings.topic(CUSTOMER_EVENTS.name)
    a = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "stale", recording_handler(platform))
    b = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "stale", recording_handler(platform))
    a.commit_interval_s = b.commit_interval_s = 3600.0  # nothing committed behind the test's back
    await a.start()
    try:
        await b.start()
        everything = set(range(platform.settings.topic_partitions))
        await eventually(
            lambda: (
                a.assigned_partitions
                and b.assigned_partitions
                and a.assigned_partitions | b.assigned_partitions == everything
            ),
            timeout=30,
        )

        async def handled(first: int, count: int) -> dict[TopicPartition, OffsetAndMetadata]:
            """Events `first`.. on keys over every partition, handled; `a`'s pending offsets."""
            for n in range(first, first + count):
                await platform.producer.publish(CUSTOMER_EVENTS.name, f"user-{n}", event(n))
            await eventually(lambda: _equals(effects(platform), list(range(first + count))), timeout=30)
            pending = dict(a._pending)
            assert pending and {tp.partition for tp in pending} <= a.assigned_partitions
            return pending

        own = await handled(0, 40)
        # The late unit's offset, for a partition `b` holds now.
        stale = TopicPartition(topic, min(b.assigned_partitions))
        a._pending[stale] = OffsetAndMetadata(1, "")
        await a.commit_pending()
        assert not a._pending
        for tp, om in own.items():
            assert await _committed(platform, a.group, topic, tp.partition) == om.offset
        # Not ours to commit: its owner's position is untouched.
        assert await _committed(platform, a.group, topic, stale.partition) is None

        own = await handled(40, 40)
        consumer = a._consumer
        assert consumer is not None
        real_commit = consumer.commit
        calls = 0

        async def unavailable_once(offsets: Any = None) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise KafkaError("coordinator not available")
            await real_commit(offsets)

        consumer.commit = unavailable_once  # type: ignore[method-assign]
        await a.commit_pending()
        assert a._pending == own
        await a.commit_pending()
        assert not a._pending
        for tp, om in own.items():
            assert await _committed(platform, a.group, topic, tp.partition) == om.offset
    finally:
        await b.stop()
        await a.stop()
    assert await effects(platform) == list(range(80))

"""`shared.kafka.producer.EventProducer` on messages too large for their topic, against the real broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiokafka.errors import NotEnoughReplicasError
from aiokafka.partitioner import murmur2

from shared.kafka import ensure_topics
from shared.kafka.producer import TOO_LARGE, EventProducer, OutgoingMessage, record_size
from shared.settings import BaseServiceSettings
from tests.support import read_topic, set_topic_configs


class ProducerSettings(BaseServiceSettings):
    service_name: str = "producer_test"


@pytest.fixture
async def producer(make_settings: Callable[..., Any]) -> AsyncIterator[EventProducer]:
    settings = make_settings(ProducerSettings, topic_partitions=1)
    await ensure_topics(settings, extra=["sized"])
    p = EventProducer(settings)
    await p.start()
    yield p
    await p.stop()


async def limit_topic(settings: BaseServiceSettings, topic: str, max_message_bytes: int) -> None:
    await set_topic_configs(topic, {"max.message.bytes": str(max_message_bytes)})


async def test_a_batch_refused_as_too_large_does_not_stop_later_sends_to_its_partition(
    producer: EventProducer,
) -> None:
    """The idempotent producer had numbered the refused batch's records; the broker never took them,
    so it refused every later batch of that partition as out of sequence (OutOfOrderSequenceNumber),
    until a restart. (Only once the partition has a batch of this producer: before its first, the
    broker takes any sequence number.)"""
    topic = producer.settings.topic("sized")
    await limit_topic(producer.settings, topic, 20_000)
    await producer.send_batched([OutgoingMessage(topic, b"k", b"before")])
    with pytest.raises(TOO_LARGE):
        await producer.send_batched([OutgoingMessage(topic, b"k", b"x" * 30_000)])
    with pytest.raises(TOO_LARGE):
        await producer.send(OutgoingMessage(topic, b"k", b"y" * 30_000))
    await asyncio.wait_for(producer.send_batched([OutgoingMessage(topic, b"k", b"after batch")]), 15)
    await asyncio.wait_for(producer.send(OutgoingMessage(topic, b"k", b"after send")), 15)
    got = await read_topic(topic, count=3, timeout=10)
    assert [m["raw"] for m in got] == [b"before", b"after batch", b"after send"]


async def test_a_message_past_the_setting_is_refused_before_it_is_sent(producer: EventProducer) -> None:
    topic = producer.settings.topic("sized")
    limit = producer.settings.kafka_max_message_bytes
    message = OutgoingMessage(topic, b"k", b"x" * limit)
    assert record_size(message) > limit
    with pytest.raises(TOO_LARGE):
        await producer.send(message)
    fits = OutgoingMessage(topic, b"k", b"x" * (limit - 200), (("h", b"v"),))
    assert record_size(fits) <= limit
    await producer.send(fits)
    assert [len(m["raw"]) for m in await read_topic(topic, count=1, timeout=10)] == [limit - 200]


def test_a_null_header_value_is_sized_as_empty() -> None:
    # Kafka allows null header values; dead-lettering such a record sized it with len(None).
    null = OutgoingMessage("t", b"k", b"v", (("trace", None),))  # type: ignore[arg-type]
    assert record_size(null) == record_size(OutgoingMessage("t", b"k", b"v", (("trace", b""),)))


async def test_a_whole_batch_goes_at_once_instead_of_lingering(make_settings: Callable[..., Any]) -> None:
    """`send_batched` hands aiokafka complete batches: they must not wait out `linger_ms` (meant for
    `send()` calls that may still join a batch) on every relay pass and ingest write. With a linger
    of 3 s, ten passes take a small fraction of one linger."""
    settings = make_settings(ProducerSettings, topic_partitions=1)
    await ensure_topics(settings, extra=["sized"])
    topic = settings.topic("sized")
    p = EventProducer(settings, linger_ms=3000)
    await p.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(10):
            await p.send_batched([OutgoingMessage(topic, b"k", f"pass {i}".encode(), ())])
        elapsed = loop.time() - started
    finally:
        await p.stop()
    assert elapsed < 1.5, f"10 passes took {elapsed:.1f} s: batches lingered"
    values = [m["raw"].decode() for m in await read_topic(topic, idle=0.5, timeout=8)]
    assert values == [f"pass {i}" for i in range(10)]


async def test_record_batches_stay_within_the_message_limit(make_settings: Callable[..., Any]) -> None:
    """`kafka_max_message_bytes` set to a topic's max.message.bytes (as its docs ask): each message is
    within it, so their record batch must be too. It was built up to 256 KB whatever the setting,
    and the broker refused the whole batch as too large, on every retry."""
    limit = 20_000
    settings = make_settings(ProducerSettings, topic_partitions=1, kafka_max_message_bytes=limit)
    await ensure_topics(settings, extra=["sized"])
    topic = settings.topic("sized")
    await limit_topic(settings, topic, limit)
    p = EventProducer(settings)
    await p.start()
    try:
        batched = [OutgoingMessage(topic, b"k", b"b%03d" % i + b"x" * 996) for i in range(100)]
        one_by_one = [OutgoingMessage(topic, b"k", b"s%03d" % i + b"x" * 996) for i in range(100)]
        await asyncio.wait_for(p.send_batched(batched), 15)  # ~100 KB: five batches or more
        await asyncio.wait_for(p.send_many(one_by_one), 15)  # aiokafka's own batches of send()
    finally:
        await p.stop()
    got = await read_topic(topic, count=200, timeout=15)
    assert [m["raw"][:4] for m in got] == [m.value[:4] for m in batched + one_by_one]


async def test_send_batched_each_answers_for_each_message(
    make_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One partition's batch refused, another's never answered: each message gets its own outcome,
    and those the broker took are reported taken (ingest answers each request by them)."""
    settings = make_settings(ProducerSettings, topic_partitions=3)
    await ensure_topics(settings, extra=["sized"])
    topic = settings.topic("sized")
    keys = [
        next(f"k{i}".encode() for i in range(1000) if (murmur2(f"k{i}".encode()) & 0x7FFFFFFF) % 3 == p)
        for p in range(3)
    ]
    original = EventProducer._send_closed

    async def send_closed(producer: Any, batch: Any, topic: str, partition: int) -> asyncio.Future[Any]:
        if partition == 0:
            return await original(producer, batch, topic, partition)
        batch.close()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if partition == 1:
            future.set_exception(NotEnoughReplicasError())
        return future  # partition 2: never answered

    monkeypatch.setattr(EventProducer, "_send_closed", staticmethod(send_closed))
    p = EventProducer(settings)
    await p.start()
    try:
        messages = [OutgoingMessage(topic, keys[i % 3], f"m{i}".encode()) for i in range(6)]
        outcomes = await asyncio.wait_for(p.send_batched_each(messages, timeout=0.5), 10)
    finally:
        await p.stop()
    assert [type(o).__name__ for o in outcomes] == ["NoneType", "NotEnoughReplicasError", "TimeoutError"] * 2
    assert [m["raw"] for m in await read_topic(topic, count=2, timeout=10)] == [b"m0", b"m3"]

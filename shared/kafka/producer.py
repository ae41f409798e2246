"""An idempotent producer (`acks=all`, `enable_idempotence=True`) for CLM's contract models."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, OutOfOrderSequenceNumber, RecordListTooLargeError
from aiokafka.partitioner import DefaultPartitioner, murmur2
from aiokafka.producer.message_accumulator import BatchBuilder

from shared.contracts.events import ContractModel
from shared.contracts.headers import Headers
from shared.kafka.connection import client_options
from shared.settings import BaseServiceSettings

log = logging.getLogger(__name__)

_KEY_HASHES_KEPT = 100_000

# What a broker answers for a record batch larger than the topic's max.message.bytes (and what
# aiokafka raises itself for a single message past its max_request_size, or `EventProducer.send` for
# one past `kafka_max_message_bytes`). A property of the message, not an outage: never retried as is.
TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
# What the broker answers once the idempotent producer's numbering of a partition is broken (records
# it numbered were never taken): only a new client (a new producer id) sends to it again.
_BROKEN_SEQUENCE = (*TOO_LARGE, OutOfOrderSequenceNumber)

# A record batch's fixed part (log overhead and batch header, 61 bytes) and a record's varints
# (length, attributes, timestamp and offset deltas: at most 21 bytes), as aiokafka counts them.
_BATCH_OVERHEAD = 61 + 21


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A future's exception is logged as never retrieved unless someone asks for it.
    if not future.cancelled():
        future.exception()


class OutgoingMessage(NamedTuple):
    """A message ready for Kafka: the topic's full name, key, value bytes and headers.

    A named tuple, not a frozen dataclass: every outbox row relayed makes one, and a frozen
    dataclass's constructor costs about three times as much."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def record_size(message: OutgoingMessage) -> int:
    """An upper bound of the bytes the broker counts for `message` alone in a record batch: what a
    topic's max.message.bytes (and the `kafka_max_message_bytes` setting) limits. Uncompressed, as
    CLM produces; lengths as 5-byte varints (the most a length takes), so never an underestimate."""
    size = _BATCH_OVERHEAD + 10 + len(message.value) + (len(message.key) if message.key is not None else 0)
    for name, value in message.headers:
        # Kafka allows a null header value (another client's record, dead-lettered as it came).
        size += 10 + len(name.encode()) + (len(value) if value is not None else 0)
    return size + 5


def message_headers(
    model: ContractModel,
    *,
    producer: str,
    correlation_id: str | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The CLM headers (`shared.contracts.headers`) of a message carrying `model`."""
    event_id = model.contract_id()
    headers: dict[str, str] = {
        Headers.EVENT_ID: event_id,
        Headers.EVENT_TYPE: model.event_type,
        Headers.SCHEMA_VERSION: str(model.schema_version),
        # A message that does not pass on its cause's correlation id starts a chain: its own id.
        Headers.CORRELATION_ID: correlation_id or event_id,
        Headers.PRODUCER: producer,
        Headers.PRODUCED_AT_MS: str(int(time.time() * 1000)),
    }
    if extra_headers:
        headers.update(extra_headers)
    return headers


def outgoing_message(
    topic: str, key: str, model: ContractModel, headers: Mapping[str, str]
) -> OutgoingMessage:
    return OutgoingMessage(
        topic=topic,
        key=key.encode(),
        value=model.__pydantic_serializer__.to_json(model),
        headers=tuple((k, v.encode()) for k, v in headers.items()),
    )


def encode_message(
    topic: str,
    key: str,
    model: ContractModel,
    *,
    producer: str,
    correlation_id: str | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> OutgoingMessage:
    headers = message_headers(
        model, producer=producer, correlation_id=correlation_id, extra_headers=extra_headers
    )
    return outgoing_message(topic, key, model, headers)


class EventProducer:
    """Wraps one AIOKafkaProducer; `send` returns only once the broker has acknowledged (acks=all)."""

    def __init__(
        self, settings: BaseServiceSettings, *, linger_ms: int = 2, request_timeout_ms: int = 10000
    ) -> None:
        self.settings = settings
        self.linger_ms = linger_ms
        self.request_timeout_ms = request_timeout_ms
        self._client: AIOKafkaProducer | None = None
        self._renewing = asyncio.Lock()
        self._partitioner = DefaultPartitioner()
        # murmur2 of a key (aiokafka's is pure Python, ~3 us): the relays send the same customers'
        # keys over and over. Bounded: cleared when full.
        self._key_hashes: dict[bytes, int] = {}

    @property
    def _producer(self) -> AIOKafkaProducer:
        if self._client is None:
            raise RuntimeError("producer not started")
        return self._client

    async def start(self) -> None:
        self._client = await self._new_client()

    async def _new_client(self) -> AIOKafkaProducer:
        # Created here, not in __init__: aiokafka binds to the running event loop.
        client = AIOKafkaProducer(
            **client_options(self.settings),
            client_id=f"clm-{self.settings.service_name}",
            acks="all",
            enable_idempotence=True,
            linger_ms=self.linger_ms,
            request_timeout_ms=self.request_timeout_ms,
            # A record batch is what the broker holds to the topic's max.message.bytes (the whole
            # batch, header included, as aiokafka counts it): never larger than the setting says.
            max_batch_size=min(256 * 1024, self.settings.kafka_max_message_bytes),
            # aiokafka's own check of a single message (its default, 1 MiB), never below ours.
            max_request_size=max(1024 * 1024, self.settings.kafka_max_message_bytes),
        )
        try:
            await client.start()
        except Exception:
            await client.stop()
            raise
        return client

    async def _renew(self, refused: AIOKafkaProducer) -> None:
        """A new client in place of `refused`, after the broker refused one of its batches as too
        large (or as out of sequence, if an earlier renewal failed). The idempotent producer had
        numbered that batch's records: the broker never took them, so it refused every later batch
        of that partition as out of sequence (OUT_OF_ORDER_SEQUENCE_NUMBER), for as long as the
        process ran. A new client is a new producer id, numbered from 0. What others had queued on
        the old one is flushed as it stops (a batch appended while it stops may never settle: the
        outbox relay bounds its wait, `outbox_send_timeout_s`)."""
        old: AIOKafkaProducer = refused
        async with self._renewing:
            if self._client is not refused:
                return  # renewed already, or stopped
            try:
                self._client = await self._new_client()
            except Exception as exc:  # the broker went away meanwhile: the next refusal tries again
                log.warning("producer not renewed after a refused batch", extra={"error": repr(exc)})
                return
        log.warning("producer renewed after the broker refused a batch as too large")
        with contextlib.suppress(Exception):
            await old.stop()

    async def stop(self) -> None:
        async with self._renewing:
            client, self._client = self._client, None
        if client is not None:
            await client.stop()

    async def send(self, message: OutgoingMessage) -> None:
        """Send one message and wait for the broker's acknowledgement. One larger than
        `kafka_max_message_bytes` is refused before it is sent (`MessageSizeTooLargeError`)."""
        size = record_size(message)
        if size > self.settings.kafka_max_message_bytes:
            raise MessageSizeTooLargeError(
                f"{size} bytes: more than kafka_max_message_bytes ({self.settings.kafka_max_message_bytes})"
            )
        client = self._producer
        future = await client.send(
            message.topic, message.value, key=message.key, headers=list(message.headers)
        )
        try:
            await future
        except _BROKEN_SEQUENCE:
            await self._renew(client)
            raise

    async def send_many(self, messages: Sequence[OutgoingMessage]) -> None:
        """Send all, then wait for every acknowledgement; raises if any failed."""
        futures = [
            await self._producer.send(m.topic, m.value, key=m.key, headers=list(m.headers)) for m in messages
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def send_batched(self, messages: Sequence[OutgoingMessage]) -> None:
        """`send_many` through aiokafka's batch API: one record batch per partition instead of one
        `send()` per message (a few µs per message instead of tens). Same partitioner (murmur2 of the
        key, as Kafka's Java clients), same order per partition; raises if any batch failed (one in
        `TOO_LARGE` if the broker refused a batch as too large: sizes are the caller's to check,
        with `record_size`, as the outbox relay does)."""
        producer = self._producer
        sent: list[tuple[asyncio.Future[Any], list[int]]] = []
        await self._hand_over(producer, messages, sent)
        results = await asyncio.gather(*(future for future, _ in sent), return_exceptions=True)
        errors = [result for result in results if isinstance(result, BaseException)]
        if any(isinstance(error, _BROKEN_SEQUENCE) for error in errors):
            await self._renew(producer)
        if refused := [error for error in errors if isinstance(error, TOO_LARGE)]:
            raise refused[0]
        if errors:
            raise errors[0]

    async def send_batched_each(
        self, messages: Sequence[OutgoingMessage], timeout: float
    ) -> list[BaseException | None]:
        """`send_batched`, but each message's outcome, in order: None once the broker acknowledged it,
        else why not (its batch's error; `TimeoutError` if not settled within `timeout` seconds, in
        which case it may still be delivered later). Never raises for a failed send: one partition
        refusing must not make the caller refuse what the others took."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        producer = self._producer
        outcomes: list[BaseException | None] = [None] * len(messages)
        sent: list[tuple[asyncio.Future[Any], list[int]]] = []
        unsent: BaseException | None = None
        try:
            await asyncio.wait_for(self._hand_over(producer, messages, sent), timeout)
        except Exception as exc:  # no metadata, no room in the accumulator: the rest is not sent
            unsent = exc if not isinstance(exc, TimeoutError) else TimeoutError("not sent in time")
        if sent:
            await asyncio.wait([future for future, _ in sent], timeout=max(0.0, deadline - loop.time()))
        handed: set[int] = set()
        errors: list[BaseException] = []
        for future, indexes in sent:
            handed.update(indexes)
            if not future.done():
                future.add_done_callback(_retrieve)  # settled later: nobody awaits it any more
                error: BaseException | None = TimeoutError("not acknowledged in time")
            elif future.cancelled():
                error = asyncio.CancelledError()
            else:
                error = future.exception()
            if error is not None:
                errors.append(error)
                for i in indexes:
                    outcomes[i] = error
        if len(handed) < len(messages):
            missing = unsent or TimeoutError("not sent in time")
            for i in range(len(messages)):
                if i not in handed:
                    outcomes[i] = missing
        if any(isinstance(error, _BROKEN_SEQUENCE) for error in errors):
            await self._renew(producer)
        return outcomes

    async def _hand_over(
        self,
        producer: AIOKafkaProducer,
        messages: Sequence[OutgoingMessage],
        sent: list[tuple[asyncio.Future[Any], list[int]]],
    ) -> None:
        """Record batches of `messages` per partition, handed to aiokafka: appends each batch's future
        and the indexes of its messages to `sent` (as it goes, so a caller that stops waiting knows
        what was handed over)."""
        by_partition: dict[tuple[str, int], list[int]] = {}
        for topic in {m.topic for m in messages}:
            partitions = sorted(await producer.partitions_for(topic))
            available = list(producer.client.cluster.available_partitions_for_topic(topic) or partitions)
            for i, m in enumerate(messages):
                if m.topic == topic:
                    partition = self._partition(m.key, partitions, available)
                    by_partition.setdefault((topic, partition), []).append(i)
        for (topic, partition), indexes in by_partition.items():
            batch = producer.create_batch()
            in_batch: list[int] = []
            for i in indexes:
                m = messages[i]
                headers = list(m.headers)
                if batch.append(timestamp=None, key=m.key, value=m.value, headers=headers) is None:
                    # Full: send it and start the next one (a lone message always fits a new batch:
                    # aiokafka makes a batch as large as its first message).
                    sent.append((await self._send_closed(producer, batch, topic, partition), in_batch))
                    batch = producer.create_batch()
                    in_batch = []
                    batch.append(timestamp=None, key=m.key, value=m.value, headers=headers)
                in_batch.append(i)
            sent.append((await self._send_closed(producer, batch, topic, partition), in_batch))

    @staticmethod
    async def _send_closed(
        producer: AIOKafkaProducer, batch: BatchBuilder, topic: str, partition: int
    ) -> asyncio.Future[Any]:
        # Closed, the batch goes at once. Open, aiokafka holds it for `linger_ms` in case `send()`
        # adds to it, which nothing here does (the caller has the whole pass, and awaits it before
        # the next): measured, 2.8 ms more per batch (p50) with the default 2 ms linger, on every
        # relay hop and every ingest write.
        batch.close()
        future: asyncio.Future[Any] = await producer.send_batch(batch, topic, partition=partition)
        return future

    def _partition(self, key: bytes | None, partitions: list[int], available: list[int]) -> int:
        """The partition aiokafka's `DefaultPartitioner` (and Kafka's Java clients) pick for `key`."""
        if key is None:
            return int(self._partitioner(key, partitions, available))
        h = self._key_hashes.get(key)
        if h is None:
            if len(self._key_hashes) >= _KEY_HASHES_KEPT:
                self._key_hashes.clear()
            h = self._key_hashes[key] = murmur2(key) & 0x7FFFFFFF
        return partitions[h % len(partitions)]

    async def publish(
        self,
        topic_name: str,
        key: str,
        model: ContractModel,
        *,
        correlation_id: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        await self.send(
            encode_message(
                self.settings.topic(topic_name),
                key,
                model,
                producer=self.settings.service_name,
                correlation_id=correlation_id,
                extra_headers=extra_headers,
            )
        )

    async def ping(self, timeout: float = 2.0) -> None:
        """Raise unless a broker answers a metadata request within `timeout` seconds."""
        client = self._producer.client
        await asyncio.wait_for(client.fetch_all_metadata(), timeout)

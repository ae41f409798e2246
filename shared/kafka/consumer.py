"""A batch consumer runner that loses nothing and never blocks a partition on a poison message.

- Fetches batches (`getmany`) into a buffer, decodes each record into the topic's pydantic model, and
  calls the handler with a batch. The handler commits its own effects (one unit of work).
- One unit of work at a time while units are quick (the least fixed cost per event). With
  `consumer_concurrency` > 1: once they take `consumer_pipeline_after_ms`, two at once, each on half
  the partitions; on a backlog up to `consumer_concurrency`. Never two on one partition, so a key's
  records are handled in order. On a rebalance the units in hand finish and their offsets are
  committed before the partitions go (bounded by `revoke_wait_s`).
- Offsets are committed only after the handler returned, so a crash means redelivery, never loss;
  handlers are idempotent (inbox table), so redelivery changes nothing. Handled offsets are committed
  at most every `consumer_commit_interval_ms` (and on stop and when partitions are revoked): a
  commit per single-message batch would cost the broker more than the message. Only the partitions
  still assigned are committed (one handed over meanwhile is its new owner's); a failed commit
  keeps its offsets for the next.
- A failing batch is retried by halves (in order) down to the failing messages; a message that fails after
  `max_attempts` (or cannot be decoded at all) goes to `<topic>.dlq` with the error in its headers,
  and the partition moves on. Infrastructure errors (database or broker unreachable) are retried
  without limit instead: dead-lettering every message during an outage would lose the order. A
  dead-letter record that would be too large for its topic (the original value plus the error) goes
  without the value (`clm-dlq-value-dropped`): `clm-dlq-source` says where to read it while retained.
- A record the client cannot parse at all (a header name that is not UTF-8, which aiokafka decodes
  while fetching) is found by fetching its partition in halving steps, dead-lettered as its position
  (`clm-dlq-source`, no value: read it there while retained) and skipped, as are the records after
  it in the same record batch (the client cannot read them either); the records before it and
  those of the other partitions are handled as usual.
- `stop()` (from the service's lifespan on SIGTERM) finishes the batch in hand, commits, and leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from pydantic import BaseModel, ValidationError

from shared.contracts.headers import Headers
from shared.kafka.connection import client_options
from shared.kafka.producer import TOO_LARGE, EventProducer, OutgoingMessage, record_size
from shared.observability.metrics import (
    CONSUMED,
    CONSUMER_BUFFERED,
    CONSUMER_LAG,
    CONSUMER_UNITS,
    DLQ_MESSAGES,
    HANDLER_ERRORS,
    HANDLER_SECONDS,
)
from shared.settings import BaseServiceSettings

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

# Fetch options for a topic that carries a message now and then (privacy requests, template changes),
# in a service whose other consumers batch (64 KB or 50 ms): the broker answers as soon as one message
# is waiting and otherwise holds the fetch 500 ms, so an idle consumer costs two fetches a second, not
# twenty (each one a wake-up of the client and the broker).
LONG_POLL: dict[str, int] = {"fetch_min_bytes": 1, "fetch_max_wait_ms": 500}


class _Abandon(Exception):
    """Stop processing without committing (only raised while shutting down during an outage)."""


class DecodeError(Exception):
    """The record is not a valid message of the topic's schema: it goes straight to the DLQ."""


@dataclass(frozen=True)
class Consumed(Generic[T]):
    value: T
    key: str | None
    headers: dict[str, str]
    topic: str
    partition: int
    offset: int
    timestamp_ms: int

    @property
    def event_id(self) -> str:
        """The id to dedupe on: the producer's event id, else the record's position."""
        return self.headers.get(Headers.EVENT_ID) or f"{self.topic}/{self.partition}/{self.offset}"

    @property
    def correlation_id(self) -> str | None:
        return self.headers.get(Headers.CORRELATION_ID)


Handler = Callable[[Sequence[Consumed[T]]], Awaitable[None]]


def is_infrastructure_error(exc: BaseException) -> bool:
    """Errors that say a dependency is down rather than that the message is bad."""
    if isinstance(exc, TOO_LARGE):
        return False  # a message too large for its topic: retrying never helps
    if isinstance(exc, (ConnectionError, OSError, TimeoutError, KafkaError)):
        return True
    name = type(exc).__name__
    module = type(exc).__module__
    # TimeoutError: no pooled connection came free in time (the database is slow or unreachable).
    if name in {"OperationalError", "InterfaceError", "TimeoutError"} and module.startswith("sqlalchemy"):
        return True
    # By SQLSTATE, not class name: every connection exception (08xxx: cannot connect, rejected, lost),
    # the server shutting down or restarting (57P01-57P03) and too many connections.
    sqlstate = getattr(exc, "sqlstate", None)
    if (
        module.startswith("asyncpg")
        and isinstance(sqlstate, str)
        and (sqlstate.startswith("08") or sqlstate in {"57P01", "57P02", "57P03", "53300"})
    ):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_infrastructure_error(cause)


def _decode_headers(raw: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in raw or ():
        # try/except, not contextlib.suppress: this runs for every header of every record.
        try:
            out[k] = v.decode() if v is not None else ""
        except UnicodeDecodeError:
            continue
    return out


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hand over partitions with their handled offsets committed, so the next owner starts there."""

    def __init__(self, runner: ConsumerRunner[Any]) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.runner.hand_over(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        pass


class ConsumerRunner(Generic[T]):
    def __init__(
        self,
        settings: BaseServiceSettings,
        *,
        topic: str,
        schema: type[T],
        group: str,
        handler: Handler[T],
        producer: EventProducer,
        max_batch: int | None = None,
        max_attempts: int | None = None,
        retry_backoff_s: float | None = None,
        fetch_timeout_ms: int = 200,
        auto_offset_reset: str = "earliest",
        fetch_min_bytes: int | None = None,
        fetch_max_wait_ms: int | None = None,
        commit_interval_ms: int | None = None,
        concurrency: int | None = None,
        pipeline_after_ms: int | None = None,
        revoke_wait_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.topic = settings.topic(topic)
        self.dlq_topic = settings.topic(f"{topic}.dlq")
        self.schema = schema
        self.group = group
        self.handler = handler
        self.producer = producer
        self.max_batch = max_batch or settings.consumer_max_batch
        self.max_attempts = max_attempts or settings.consumer_max_attempts
        self.retry_backoff_s = (
            settings.consumer_retry_backoff_s if retry_backoff_s is None else retry_backoff_s
        )
        self.fetch_timeout_ms = fetch_timeout_ms
        # Per consumer, so a service can let its off-critical-path topics batch up (see the settings).
        self.fetch_min_bytes = fetch_min_bytes or settings.consumer_fetch_min_bytes
        self.fetch_max_wait_ms = fetch_max_wait_ms or settings.consumer_fetch_max_wait_ms
        self.auto_offset_reset = auto_offset_reset
        self.concurrency = max(1, concurrency or settings.consumer_concurrency)
        self.pipeline_after_s = (
            settings.consumer_pipeline_after_ms if pipeline_after_ms is None else pipeline_after_ms
        ) / 1000
        self._unit_s = 0.0  # a unit of work's handler time, moving average
        # Under the group's rebalance timeout (the session timeout, 10 s), or the wait gets us evicted.
        self.revoke_wait_s = revoke_wait_s
        # Fetched, not yet in a unit of work (per partition, in offset order); partitions in a unit.
        self._buffer: dict[TopicPartition, list[ConsumerRecord[Any, Any]]] = {}
        self._in_flight: set[TopicPartition] = set()
        self._units: set[asyncio.Task[None]] = set()
        self.hand_overs = 0
        self._wake = asyncio.Event()  # the dispatcher has something to look at
        self._room = asyncio.Event()  # a partition's buffer fell below a full batch: fetch again
        self._idle = asyncio.Event()  # no unit of work in hand
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.last_error: str | None = None
        self.processed = 0
        interval_ms = (
            settings.consumer_commit_interval_ms if commit_interval_ms is None else commit_interval_ms
        )
        self.commit_interval_s = interval_ms / 1000
        # Handled but not yet committed: the next offset per partition.
        self._pending: dict[TopicPartition, OffsetAndMetadata] = {}
        # The offset after the last record buffered, per partition (since its assignment): where a
        # fetch that failed on an unparseable record is resumed from.
        self._next_offset: dict[TopicPartition, int] = {}
        # Offsets skipped as unparseable, per partition: skipped offset -> the one after it, for the
        # commit of the unit that ends just before them.
        self._skipped: dict[TopicPartition, dict[int, int]] = {}
        # Per partition, the offset before which every record is handled (or skipped), where known.
        self._handled_to: dict[TopicPartition, int] = {}
        self._last_commit = time.monotonic()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            **client_options(self.settings),
            group_id=self.group,
            client_id=f"clm-{self.settings.service_name}",
            enable_auto_commit=False,
            auto_offset_reset=self.auto_offset_reset,
            isolation_level="read_committed",
            max_poll_records=self.max_batch,
            max_partition_fetch_bytes=self.settings.consumer_max_partition_fetch_bytes,
            fetch_min_bytes=self.fetch_min_bytes,
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            session_timeout_ms=10000,
            heartbeat_interval_ms=1000,
            metadata_max_age_ms=5000,
        )
        self._consumer.subscribe([self.topic], listener=_CommitOnRevoke(self))
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.topic}")

    @property
    def failure(self) -> str | None:
        """Why the consumer stopped on its own (a bug in the client or the runner), else None."""
        task = self._task
        if task is None or not task.done() or task.cancelled() or task.exception() is None:
            return None
        return repr(task.exception())[:300]

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            # A failure was logged when it happened: raising it here would leave the client open and
            # cut the platform's shutdown short (other consumers' commits, the outbox drain).
            with contextlib.suppress(Exception, asyncio.CancelledError):
                try:
                    await asyncio.wait_for(asyncio.shield(self._task), 30)
                except TimeoutError:
                    self._task.cancel()
                    await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None

    async def _run(self) -> None:
        fetching = asyncio.create_task(self._fetch_loop(), name=f"consumer:{self.topic}:fetch")
        # A fetch loop that died (an error it has no answer for) stops the dispatcher too: it
        # would otherwise wait for records forever while the consumer looked alive.
        fetching.add_done_callback(self._fetching_ended)
        try:
            await self._dispatch_loop()
        except Exception:
            log.exception("consumer stopped by an error", extra={"topic": self.topic})
            raise
        finally:
            self._stopping.set()
            self._wake.set()
            # Units in hand finish (their effects are committed, so are their offsets); what is only
            # buffered is left uncommitted and redelivered to the next owner.
            if self._units:
                await asyncio.gather(*self._units, return_exceptions=True)
            await asyncio.gather(fetching, return_exceptions=True)
            self._report()
            await self.commit_pending()
        if not fetching.cancelled() and (error := fetching.exception()) is not None:
            log.error("consumer stopped: fetching failed", extra={"topic": self.topic}, exc_info=error)
            raise error

    def _fetching_ended(self, _: asyncio.Task[None]) -> None:
        self._stopping.set()
        self._wake.set()

    async def _fetch_loop(self) -> None:
        """Keep the buffer topped up while units of work run, so the next one starts at once: every
        assigned partition up to a full batch buffered. (Fetching only those, not all: on a backlog the
        partitions in hand would otherwise fill the buffer and leave nothing for a second unit.)"""
        assert self._consumer is not None
        consumer = self._consumer
        while not self._stopping.is_set():
            assigned = consumer.assignment()
            wanted = [tp for tp in assigned if len(self._buffer.get(tp, ())) < self.max_batch]
            if assigned and not wanted:
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), self.fetch_timeout_ms / 1000)
                continue
            try:
                batches = await consumer.getmany(
                    *wanted, timeout_ms=self.fetch_timeout_ms, max_records=self.max_batch
                )
            except KafkaError as exc:
                log.warning("fetch failed; retrying", extra={"topic": self.topic, "error": str(exc)})
                await asyncio.sleep(1)
                continue
            except UnicodeDecodeError as exc:
                # A record aiokafka cannot parse (a header name that is not UTF-8): every fetch of its
                # partition fails the same way, so it is found and skipped.
                # (With nothing assigned, `getmany()` fetched whatever a rebalance assigned meanwhile;
                # kept, not slept over: aiokafka leaves the group after max_poll_interval_ms without it.)
                await self._skip_unparseable(consumer, wanted or sorted(consumer.assignment()), exc)
                continue
            # Never dropped here: these may be the new assignment's first records. (Ones fetched just
            # before a rebalance are fetched again by their next owner: handlers are idempotent.)
            for tp, recs in batches.items():
                self._accept(tp, recs)
            if self._pending and time.monotonic() - self._last_commit >= self.commit_interval_s:
                await self.commit_pending()

    def _accept(self, tp: TopicPartition, recs: list[ConsumerRecord[Any, Any]]) -> None:
        if recs:
            self._buffer.setdefault(tp, []).extend(recs)
            self._next_offset[tp] = recs[-1].offset + 1
            self._wake.set()

    async def _skip_unparseable(
        self, consumer: AIOKafkaConsumer, wanted: list[TopicPartition], error: UnicodeDecodeError
    ) -> None:
        """After a fetch failed on a record the client cannot parse: find it and skip it.

        The failed fetch may have taken records of other partitions without returning them, so every
        assigned partition goes back to the offset after its last buffered record (or, none buffered
        since its assignment, to its committed offset). Then each partition asked for is fetched
        alone, in halving counts (a count that reaches the bad record fails, fewer succeed and are
        buffered), down to one record that fails: its offset is dead-lettered and skipped, and so are
        the offsets after it that fail alone (the client parses a whole record batch even to start
        inside it, so the records after a bad one in its batch cannot be read: they go to the DLQ by
        position too, readable there with another client). The offset is the fetch position: a
        transaction marker (or an aborted record) just before a bad record would go to the DLQ in its
        place, harmlessly. A rebalance meanwhile ends the search: the fetch loop goes on from the new
        assignment's committed offsets, and finds the record again if it is still there."""
        log.error(
            "fetch failed on a record the client cannot parse; looking for it",
            extra={"topic": self.topic, "error": repr(error)},
        )
        for tp in consumer.assignment():
            # One by one: a partition a rebalance took meanwhile raises, the others still go back.
            with contextlib.suppress(KafkaError):
                if tp not in self._next_offset:
                    await self._from_committed(consumer, tp)
                if (offset := self._next_offset.get(tp)) is not None:
                    if (position := await consumer.position(tp)) > offset:
                        log.info(
                            "fetching again the records the failed fetch had taken",
                            extra={
                                "topic": self.topic,
                                "partition": tp.partition,
                                "from": offset,
                                "to": position,
                            },
                        )
                    consumer.seek(tp, offset)
        with contextlib.suppress(KafkaError, _Abandon):
            # Longer than the broker may hold a fetch: an empty answer must mean nothing is waiting.
            timeout_ms = self.fetch_max_wait_ms + self.fetch_timeout_ms
            for tp in sorted(wanted, key=lambda t: t.partition):
                count = self.max_batch
                while not self._stopping.is_set() and tp in self._next_offset:
                    try:
                        got = await consumer.getmany(tp, timeout_ms=timeout_ms, max_records=count)
                    except UnicodeDecodeError as exc:
                        if (offset := self._next_offset.get(tp)) is None:
                            return  # handed over during the fetch
                        consumer.seek(tp, offset)  # what the failed fetch took, again
                        if count > 1:
                            count //= 2
                        else:
                            # The next one may fail too: the client parses a whole record batch even
                            # to start inside it, so its records after a bad one cannot be read.
                            await self._skip(consumer, tp, offset, exc)
                        continue
                    recs = got.get(tp, [])
                    self._accept(tp, recs)
                    if len(recs) < count:
                        break  # this partition's fetched records parse: look at the next one
                    count = min(count * 2, self.max_batch)

    async def _from_committed(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        """Nothing of `tp` buffered since its assignment: it starts again from its committed offset
        (never committed: where the reset policy puts it), and everything before that is handled."""
        committed = await consumer.committed(tp)
        if committed is None:
            if self.auto_offset_reset == "earliest":
                await consumer.seek_to_beginning(tp)
            # ("latest", which no CLM consumer uses: where it is now.)
            committed = await consumer.position(tp)
        else:
            # Not below the log's start (retention may have deleted what the group had not read).
            committed = max(committed, (await consumer.beginning_offsets([tp]))[tp])
        if tp in consumer.assignment() and tp not in self._next_offset:
            self._next_offset[tp] = self._handled_to[tp] = committed

    async def _skip(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, error: UnicodeDecodeError
    ) -> None:
        # Nothing of it to send: the DLQ record says where it is (while the topic retains it).
        note = (Headers.DLQ_VALUE_DROPPED, b"the record could not be parsed; read it from the source topic")
        unparseable: ConsumerRecord[Any, Any] = ConsumerRecord(
            tp.topic, tp.partition, offset, -1, 0, None, b"", None, -1, -1, (note,)
        )
        error_text = (
            "unreadable by the Kafka client (this record, or one before it in the same record batch, "
            f"cannot be parsed): {error!r}"
        )
        await self._dead_letter(unparseable, error_text, attempts=0)
        if self._next_offset.get(tp) != offset:
            return  # handed over while dead-lettering: the next owner finds it again
        self._next_offset[tp] = offset + 1
        consumer.seek(tp, offset + 1)
        if self._handled_to.get(tp) == offset:
            # Everything before it is handled: committed on its own (it may be the last record).
            self._handled_to[tp] = offset + 1
            self._pending[tp] = OffsetAndMetadata(offset + 1, "")
        else:
            # Committed with the unit that ends just before it, never ahead of an unhandled record
            # (one in a unit, buffered, or in a unit that gave up: then found again after a restart).
            self._skipped.setdefault(tp, {})[offset] = offset + 1

    async def _dispatch_loop(self) -> None:
        """Start units of work from the buffer; a partition is in one unit at a time, so its records
        are handled in order. While units are quick, one at a time takes everything buffered (up to
        `max_batch`): the least fixed cost per record. Once they take `pipeline_after_ms` (and
        `concurrency` allows), units pipeline: two run whenever records are waiting, each on at most
        half the assigned partitions, so the database works on one while Python works on the other
        (a unit's statements wait on each other; alone, the process idles for each round trip, and a
        unit holding every partition leaves nothing to start beside it). More, up to `concurrency`,
        start only for a full batch waiting: on a backlog, where they are full."""
        while not self._stopping.is_set():
            self._wake.clear()
            for unit in [u for u in self._units if u.done()]:
                self._units.discard(unit)
                unit.result()  # a handler bug stops the consumer, as it always has
            pipelined = self.concurrency > 1 and self._unit_s >= self.pipeline_after_s
            while len(self._units) < self.concurrency:
                taken = self._take(pipelined, full_only=len(self._units) >= (2 if pipelined else 1))
                if not taken:
                    break
                unit = asyncio.create_task(self._unit(taken))
                self._units.add(unit)
                unit.add_done_callback(lambda _: self._wake.set())
            self._report()
            await self._wake.wait()

    def _report(self) -> None:
        labels = (self.settings.service_name, self.topic)
        CONSUMER_UNITS.labels(*labels).set(sum(1 for u in self._units if not u.done()))
        CONSUMER_BUFFERED.labels(*labels).set(sum(map(len, self._buffer.values())))

    @property
    def assigned_partitions(self) -> set[int]:
        """The partitions this consumer holds now (empty before its group assigned any)."""
        return {tp.partition for tp in self._consumer.assignment()} if self._consumer is not None else set()

    def _take(
        self, pipelined: bool, *, full_only: bool
    ) -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]]:
        """Records of partitions not in hand, oldest-buffered partition first, up to `max_batch` (and
        half the assigned partitions when units pipeline)."""
        free = [tp for tp in self._buffer if tp not in self._in_flight]
        if pipelined and self._consumer is not None:
            free = free[: (len(self._consumer.assignment()) + 1) // 2 or 1]
        if full_only and sum(len(self._buffer[tp]) for tp in free) < self.max_batch:
            return {}
        taken: dict[TopicPartition, list[ConsumerRecord[Any, Any]]] = {}
        room = self.max_batch
        for tp in free:
            if room == 0:
                break
            recs = self._buffer[tp]
            taken[tp], rest = recs[:room], recs[room:]
            room -= len(taken[tp])
            del self._buffer[tp]
            if rest:
                self._buffer[tp] = rest  # back of the queue: other partitions go first next time
        self._in_flight.update(taken)
        self._room.set()
        return taken

    async def _unit(self, taken: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        records = [r for tp in sorted(taken, key=lambda t: t.partition) for r in taken[tp]]
        try:
            await self._process(records)
            # Only ever offsets of handled records: committing one, even for a partition handed over
            # meanwhile, can cause a redelivery but never skip a record.
            for tp, recs in taken.items():
                offset = recs[-1].offset + 1
                if skipped := self._skipped.get(tp):
                    while offset in skipped:
                        offset = skipped.pop(offset)
                    for passed in [o for o in skipped if o < offset]:
                        del skipped[passed]
                self._handled_to[tp] = offset
                self._pending[tp] = OffsetAndMetadata(offset, "")
        except _Abandon:
            self._stopping.set()  # shutting down during an outage: leave uncommitted, redelivered
            return
        finally:
            self._in_flight.difference_update(taken)
            if not self._in_flight:
                self._idle.set()
        if self._pending and time.monotonic() - self._last_commit >= self.commit_interval_s:
            await self.commit_pending()

    async def hand_over(self, revoked: set[TopicPartition]) -> None:
        """Before a rebalance: drop what is only buffered (the next assignment starts again from the
        committed offsets), let the units in hand finish so that their offsets are committed with the
        partitions (bounded: one stuck on an outage must not hold the group; the next owner then
        redelivers, which the inbox drops), and commit."""
        self.hand_overs += 1
        log.info(
            "partitions revoked; handing over",
            extra={"topic": self.topic, "partitions": sorted(tp.partition for tp in revoked)},
        )
        self._buffer.clear()
        # The next assignment starts again from the committed offsets (skips not yet committed are
        # found again there).
        self._next_offset.clear()
        self._skipped.clear()
        self._handled_to.clear()
        self._room.set()
        if self._in_flight:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.revoke_wait_s)
        await self.commit_pending(revoked)

    async def _process(self, records: list[ConsumerRecord[Any, Any]]) -> None:
        decoded: list[Consumed[T]] = []
        for record in records:
            try:
                decoded.append(self._decode(record))
            except DecodeError as exc:
                await self._dead_letter(record, f"undecodable: {exc}", attempts=0)
        if not decoded:
            return
        started = time.perf_counter()
        failure = await self._attempt(decoded)
        if failure is not None:
            log.warning(
                "batch failed; isolating the failing messages",
                extra={"topic": self.topic, "size": len(decoded), "error": repr(failure)},
            )
            await self._isolate(decoded, records)
        elapsed = time.perf_counter() - started
        HANDLER_SECONDS.labels(self.settings.service_name, self.topic).observe(elapsed)
        self._unit_s = 0.8 * self._unit_s + 0.2 * elapsed
        CONSUMED.labels(self.settings.service_name, self.topic).inc(len(decoded))
        self.processed += len(decoded)

    async def _isolate(self, items: Sequence[Consumed[T]], records: list[ConsumerRecord[Any, Any]]) -> None:
        """Find the failing messages of a failed batch by halves, in order: a half that succeeds is
        done in one unit of work, a failing one is split again, down to single messages, which get
        their attempts and then the dead-letter topic. One poison message in a 4,000-event batch costs
        ~24 units of work instead of 4,000 (one per message, a stall of seconds for its partitions)."""
        if len(items) == 1:
            await self._process_one(items[0], records)
            return
        middle = len(items) // 2
        for half in (items[:middle], items[middle:]):
            if await self._attempt(half) is not None:
                await self._isolate(half, records)

    async def _process_one(self, item: Consumed[T], records: list[ConsumerRecord[Any, Any]]) -> None:
        error = ""
        for attempt in range(1, self.max_attempts + 1):
            failure = await self._attempt([item])
            if failure is None:
                return
            error = "".join(traceback.format_exception_only(type(failure), failure)).strip()
            self.last_error = error
            if attempt < self.max_attempts:
                await asyncio.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
        record = next(r for r in records if r.partition == item.partition and r.offset == item.offset)
        await self._dead_letter(record, error, attempts=self.max_attempts)

    async def _attempt(self, batch: Sequence[Consumed[T]]) -> Exception | None:
        """The handler on `batch`: None once it succeeded, else its error (counted). A dependency
        outage abandons the unit instead (`_Abandon`): its records stay uncommitted."""
        try:
            await self._call_with_infra_retry(lambda: self.handler(batch))
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise _Abandon() from exc
            HANDLER_ERRORS.labels(self.settings.service_name, self.topic).inc()
            return exc
        return None

    async def _call_with_infra_retry(self, call: Callable[[], Awaitable[None]]) -> None:
        delay = 0.5
        while True:
            try:
                await call()
                return
            except Exception as exc:
                if not is_infrastructure_error(exc) or self._stopping.is_set():
                    raise
                self.last_error = repr(exc)
                log.warning(
                    "dependency unavailable; retrying the batch",
                    extra={"topic": self.topic, "error": repr(exc), "retry_in_s": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _decode(self, record: ConsumerRecord[Any, Any]) -> Consumed[T]:
        try:
            value = self.schema.model_validate_json(record.value)
        except (ValidationError, TypeError) as exc:  # invalid JSON is a ValidationError too
            raise DecodeError(str(exc)[:500]) from exc
        try:
            # Another client's binary key must not escape as an error: it would stop the consumer.
            key = record.key.decode() if isinstance(record.key, bytes) else None
        except UnicodeDecodeError as exc:
            raise DecodeError(f"key is not UTF-8: {exc}") from exc
        return Consumed(
            value=value,
            key=key,
            headers=_decode_headers(record.headers),
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
        )

    async def _dead_letter(self, record: ConsumerRecord[Any, Any], error: str, *, attempts: int) -> None:
        dlq_headers = [
            (Headers.DLQ_ERROR, error[:2000].encode()),
            (Headers.DLQ_SOURCE, f"{record.topic}/{record.partition}/{record.offset}".encode()),
            (Headers.DLQ_GROUP, self.group.encode()),
            (Headers.DLQ_ATTEMPTS, str(attempts).encode()),
        ]
        value = record.value if isinstance(record.value, bytes) else b""
        key = record.key if isinstance(record.key, bytes) else None
        message = OutgoingMessage(self.dlq_topic, key, value, (*(record.headers or ()), *dlq_headers))
        # Too large with the error headers, it was refused (by aiokafka, or the broker) on every try,
        # and the partition waited for good: it goes without its value instead.
        dropped = record_size(message) > self.settings.kafka_max_message_bytes
        if dropped:
            message = self._without_value(record, dlq_headers, "more than kafka_max_message_bytes")
        # Must be acknowledged before the offset moves past it: a DLQ write is never lost either. A
        # broker outage is waited out as for a handler (escaping, it stopped the consumer for good).
        try:
            try:
                await self._call_with_infra_retry(lambda: self.producer.send(message))
            except TOO_LARGE as exc:
                if dropped:
                    raise
                # The dead-letter topic's max.message.bytes is below the setting: without the value.
                dropped = True
                message = self._without_value(record, dlq_headers, f"refused by the broker: {exc!r}")
                await self._call_with_infra_retry(lambda: self.producer.send(message))
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise _Abandon() from exc  # shutting down: redelivered, dead-lettered after restart
            raise
        DLQ_MESSAGES.labels(self.settings.service_name, self.topic).inc()
        log.error(
            "message dead-lettered",
            extra={
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "error": error,
                "value_dropped": dropped,
            },
        )

    def _without_value(
        self, record: ConsumerRecord[Any, Any], dlq_headers: list[tuple[str, bytes]], why: str
    ) -> OutgoingMessage:
        """The dead-letter record of `record` without its value, which stays readable at `clm-dlq-source`
        in the source topic while retained. Its own headers go too if they alone are too large."""
        size = len(record.value) if isinstance(record.value, bytes) else 0
        note = f"{size} bytes, too large for the dead-letter topic ({why}); read it from the source topic"
        headers = [*dlq_headers, (Headers.DLQ_VALUE_DROPPED, note.encode())]
        key = record.key if isinstance(record.key, bytes) else None
        message = OutgoingMessage(self.dlq_topic, key, b"", (*(record.headers or ()), *headers))
        if record_size(message) > self.settings.kafka_max_message_bytes:
            message = OutgoingMessage(self.dlq_topic, None, b"", tuple(headers))
        return message

    async def commit_pending(self, partitions: set[TopicPartition] | None = None) -> None:
        """Commit the handled offsets (of `partitions`, or all) of the partitions still assigned.

        A partition handed over while a unit of it was in hand (`hand_over` waits only so long) is
        not ours to commit: aiokafka refuses the whole commit for it, which dropped the offsets of
        every other partition with it. Its offset is dropped (its new owner redelivers what we
        handled, which the inboxes drop); a commit that fails keeps its offsets pending for the next."""
        consumer = self._consumer
        offsets = {tp: om for tp, om in self._pending.items() if partitions is None or tp in partitions}
        if consumer is None or not offsets:
            return
        assigned = consumer.assignment()
        for tp in offsets:
            del self._pending[tp]
        gone = sorted(tp.partition for tp in offsets if tp not in assigned)
        if gone:
            log.info(
                "offsets of partitions handed over are left to their new owner",
                extra={"topic": self.topic, "partitions": gone},
            )
            offsets = {tp: om for tp, om in offsets.items() if tp in assigned}
            if not offsets:
                return
        self._last_commit = time.monotonic()
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # Pending again (unless a later unit moved a partition on meanwhile): the next commit
            # tries them, or drops those a rebalance took away. Until then a crash only redelivers.
            for tp, om in offsets.items():
                self._pending.setdefault(tp, om)
            log.warning("offset commit failed; will try again", extra={"error": str(exc)})
            return
        # A rebalance may have taken some of them during the commit's await (aiokafka asserts a
        # partition's highwater is read only while assigned): their new owner reports their lag.
        assigned = consumer.assignment()
        for tp, om in offsets.items():
            if tp not in assigned:
                continue
            highwater = consumer.highwater(tp)
            if highwater is not None:
                CONSUMER_LAG.labels(self.settings.service_name, self.topic, str(tp.partition)).set(
                    max(0, highwater - om.offset)
                )

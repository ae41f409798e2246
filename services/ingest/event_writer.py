"""The write path: dedupe by messageId and publish to clm.events.v1, acknowledged by Kafka.

Concurrent requests are grouped (group commit): each worker takes every event waiting, then in ONE
database transaction claims their messageIds (one statement), publishes the new ones, waits for
Kafka's acknowledgement (acks=all, idempotent producer) and only then commits. So:
- a 2xx is only answered once Kafka holds every event of the request;
- each request is answered on its own: if Kafka takes only some of a group's events (a partition
  unavailable, a timeout), the claims of the others are deleted before the commit, and only the
  requests with one of them get 503 (their retry is published, never dropped as a duplicate); the
  events Kafka took keep their claims, so a retry of a whole batch does not repeat them;
- a duplicate arriving while the first copy is in flight waits on the row lock, then is answered as
  a duplicate (or published, if the first one failed). Each lock wait is bounded by the produce
  timeout (lock_timeout, per lock: a claim meeting several holders in turn waits for each): an id
  held longer (a replica frozen between its claim and its commit) gets its request a 503, and the
  rest of the group is claimed again without it, a search itself bounded (`_RECLAIM_BUDGET_S`).
A crash (or a failed dedupe commit) between Kafka's acknowledgement and the commit can publish a
retried event twice (same messageId, which consumers dedupe on): at least once, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.settings import IngestSettings
from services.ingest.store import dedupe
from shared.clock import Clock
from shared.contracts import CUSTOMER_EVENTS, CustomerEvent, Headers
from shared.db.engine import driver_transaction
from shared.kafka.producer import EventProducer, OutgoingMessage, record_size

log = logging.getLogger(__name__)
# How long each part of a group waits for a lock once the group's claim has waited out the produce
# timeout: what still holds an id then is stuck, and each contested id costs about ten such waits.
_PROBE_LOCK_WAIT_MS = 50
# The most that search for the held ids may take (at most the produce timeout): past it the ids not
# sorted out are refused with the held ones (503, retried) rather than holding the writer for minutes
# (every id of a 2000-event batch held: 4000 waits, 200 s).
_RECLAIM_BUDGET_S = 1.0
_SERIALIZER = CustomerEvent.__pydantic_serializer__


class Overloaded(Exception):
    """Too much work in flight: shed this request (429 + Retry-After)."""


class Unavailable(Exception):
    """Kafka (or the dedupe store) could not take the events in time (503 + Retry-After)."""


class EventTooLarge(Exception):
    """The event's Kafka message would pass `kafka_max_message_bytes` (the caller's 4xx): refused
    before it joins a group, where the broker's refusal would fail every request flushed with it."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes as a Kafka message, more than {limit}")
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class PreparedEvent:
    message_id: str
    message: OutgoingMessage


@dataclass(frozen=True)
class WriteOutcome:
    published: list[str]
    duplicates: list[str]


@dataclass
class _Outcome:
    """What a group's write came to: `published` once Kafka answered for every fresh event (each
    taken or `failed`); `contested`: ids another transaction held too long to claim."""

    fresh: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    contested: set[str] = field(default_factory=set)
    published: bool = False


@dataclass
class _Pending:
    events: list[PreparedEvent]
    future: asyncio.Future[set[str]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class RecentIds:
    """messageIds this process published lately (bounded): most duplicates never reach the database."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, datetime] = OrderedDict()

    def seen_since(self, message_id: str, cutoff: datetime) -> bool:
        when = self._seen.get(message_id)
        return when is not None and when >= cutoff

    def add(self, ids: Iterable[str], when: datetime) -> None:
        for message_id in ids:
            self._seen[message_id] = when
            self._seen.move_to_end(message_id)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)


class EventWriter:
    def __init__(self, engine: AsyncEngine, settings: IngestSettings, clock: Clock) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock
        self.topic = settings.topic(CUSTOMER_EVENTS.name)
        self.window = timedelta(seconds=settings.dedupe_window_s)
        # A claim waits for another transaction's claim of the same id at most this long (per lock,
        # so once per holder met in turn): as long as a publish may take, so a healthy holder (a
        # duplicate in flight) is usually waited for.
        self._lock_wait_ms = max(1, int(settings.produce_timeout_s * 1000))
        self._reclaim_budget_s = min(_RECLAIM_BUDGET_S, settings.produce_timeout_s)
        # Producers of its own: a delivery timeout as short as the answer's, so a failed event is not
        # delivered long after the client was told 503. One per writer: aiokafka keeps one request in
        # flight per connection, so the writers' groups would otherwise queue behind each other.
        self.producers = [
            EventProducer(
                settings,
                linger_ms=settings.produce_linger_ms,
                request_timeout_ms=max(1000, int(settings.produce_timeout_s * 1000)),
            )
            for _ in range(settings.writer_concurrency)
        ]
        self.recent = RecentIds(settings.dedupe_cache_size)
        self._constant_headers = (
            (Headers.EVENT_TYPE, CustomerEvent.event_type.encode()),
            (Headers.SCHEMA_VERSION, str(CustomerEvent.schema_version).encode()),
            (Headers.PRODUCER, settings.service_name.encode()),
        )
        self.in_flight_events = 0
        self._pending: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for producer in self.producers:
            await producer.start()
        self._tasks = [
            asyncio.create_task(self._work(producer), name=f"ingest-writer-{n}")
            for n, producer in enumerate(self.producers)
        ]
        self._tasks.append(asyncio.create_task(self._prune_loop(), name="ingest-dedupe-prune"))

    def group_time_bound_s(self) -> float:
        """How long one group takes at worst when its claim waits on a single holder: the lock wait,
        the search for held ids, the publish, and a second for the commit. (A claim that meets
        several in-flight holders in turn waits for each: then longer.)"""
        timeout = self.settings.produce_timeout_s
        return timeout + self._reclaim_budget_s + timeout + 1

    async def stop(self) -> None:
        # Requests still waiting finish first (uvicorn has stopped taking new ones): long enough for
        # the groups in flight to finish, so none is cut between Kafka's answer and its commit.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.group_time_bound_s())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Requests never flushed are refused (503, retried elsewhere): none is left unanswered.
        while self._pending:
            pending = self._pending.popleft()
            if not pending.future.done():
                pending.future.set_exception(Unavailable("ingest is stopping"))
        for producer in self.producers:
            await producer.stop()

    def prepare(self, event: CustomerEvent) -> PreparedEvent:
        """The event's Kafka message: what `encode_message` makes (same value and headers, plus the
        origin time), built for the hot path: pydantic's JSON serializer straight to bytes, and the
        constant headers encoded once (this runs for every event; 3x faster)."""
        event_id = event.message_id.encode()
        headers = (
            (Headers.EVENT_ID, event_id),
            *self._constant_headers,
            (Headers.CORRELATION_ID, event_id),
            (Headers.PRODUCED_AT_MS, str(int(time.time() * 1000)).encode()),
            (Headers.ORIGIN_AT_MS, str(int(event.received_at.timestamp() * 1000)).encode()),
        )
        value = _SERIALIZER.to_json(event)
        message = OutgoingMessage(self.topic, event.customer_key.encode(), value, headers)
        # The JSON written can be larger than the JSON read (`1e15` is written `1000000000000000.0`).
        # (The headers are a few hundred bytes: only a value near the limit is measured exactly.)
        limit = self.settings.kafka_max_message_bytes
        if len(value) + len(message.key or b"") > limit - 4096 and (size := record_size(message)) > limit:
            raise EventTooLarge(size, limit)
        return PreparedEvent(event.message_id, message)

    async def write(self, events: Sequence[PreparedEvent]) -> WriteOutcome:
        """Publish the events not seen within the dedupe window; returns only once Kafka has them."""
        cutoff = self.clock.now() - self.window
        fresh: list[PreparedEvent] = []
        duplicates: list[str] = []
        ids: set[str] = set()
        for event in events:
            if event.message_id in ids or self.recent.seen_since(event.message_id, cutoff):
                duplicates.append(event.message_id)
            else:
                ids.add(event.message_id)
                fresh.append(event)
        if not fresh:
            return WriteOutcome([], duplicates)
        if self.in_flight_events + len(fresh) > self.settings.max_in_flight_events:
            raise Overloaded(f"{self.in_flight_events} events in flight")
        self.in_flight_events += len(fresh)
        self._idle.clear()
        try:
            pending = _Pending(fresh)
            self._pending.append(pending)
            self._wake.set()
            published = await pending.future
        finally:
            self.in_flight_events -= len(fresh)
            if not self.in_flight_events:
                self._idle.set()
        return WriteOutcome(
            [e.message_id for e in fresh if e.message_id in published],
            duplicates + [e.message_id for e in fresh if e.message_id not in published],
        )

    async def _work(self, producer: EventProducer) -> None:
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            group: list[_Pending] = []
            size = 0
            while self._pending and (
                not group or size + len(self._pending[0].events) <= self.settings.writer_max_events
            ):
                pending = self._pending.popleft()
                group.append(pending)
                size += len(pending.events)
            try:
                await self._flush(group, producer)
            except asyncio.CancelledError:
                # Stopped mid-group (past stop()'s wait): answer its requests 503, not never. If
                # Kafka took their events the client's retry publishes them again (same messageId).
                for pending in group:
                    if not pending.future.done():
                        pending.future.set_exception(Unavailable("ingest is stopping"))
                raise

    async def _flush(self, group: list[_Pending], producer: EventProducer) -> None:
        owner: dict[str, _Pending] = {}
        ordered: list[PreparedEvent] = []
        for pending in group:
            for event in pending.events:
                if event.message_id not in owner:  # the same id from two requests at once: the first wins
                    owner[event.message_id] = pending
                    ordered.append(event)
        # Sorted: concurrent groups lock their ids in one order, so they never deadlock.
        ids = sorted(owner)
        now = self.clock.now()
        outcome = _Outcome()
        try:
            try:
                async with driver_transaction(self.engine) as driver:
                    outcome.fresh = await dedupe.claim(
                        driver, ids, now, now - self.window, self._lock_wait_ms
                    )
                    await self._publish(driver, producer, ordered, outcome)
            except asyncpg.LockNotAvailableError:
                if outcome.published:
                    raise
                # A lock was not granted in time: mostly another transaction holding some of these
                # ids longer than a publish may take, one that will not end soon (a replica frozen
                # mid-group); or a table lock (a migration). Only the requests with an id still not
                # claimable are refused; the rest of the group is claimed again and goes on.
                async with driver_transaction(self.engine) as driver:
                    outcome.fresh, outcome.contested = await dedupe.claim_uncontested(
                        driver, ids, now, now - self.window, _PROBE_LOCK_WAIT_MS, self._reclaim_budget_s
                    )
                    await self._publish(driver, producer, ordered, outcome)
                if outcome.contested:
                    log.warning(
                        "events refused: their dedupe claims waited too long for a lock",
                        extra={"events": len(outcome.contested), "of": len(ids)},
                    )
        except Exception as exc:
            if not outcome.published:
                log.warning(
                    "events not accepted: publish failed",
                    extra={"events": len(ordered), "error": repr(exc)},
                )
                for pending in group:
                    if not pending.future.done():
                        pending.future.set_exception(Unavailable(repr(exc)))
                return
            # Kafka answered, then the dedupe commit failed: what it took is answered as taken (a
            # 2xx means Kafka has it, and it does); only a client's retry of one could repeat it.
            log.warning("dedupe claims not committed after publishing", extra={"error": repr(exc)})
        acked = outcome.fresh - outcome.failed
        self.recent.add(acked, now)
        refused = outcome.failed | outcome.contested
        for pending in group:
            if pending.future.done():
                continue
            # A request is answered on its own: 2xx only if Kafka has every event of it (an id it
            # shares with another request in the group is that one's, and shares its fate).
            if refused and any(e.message_id in refused for e in pending.events):
                pending.future.set_exception(Unavailable(f"{len(refused)} events of the group not taken"))
            else:
                pending.future.set_result(
                    {
                        e.message_id
                        for e in pending.events
                        if e.message_id in acked and owner[e.message_id] is pending
                    }
                )

    async def _publish(
        self,
        driver: asyncpg.Connection,
        producer: EventProducer,
        ordered: list[PreparedEvent],
        outcome: _Outcome,
    ) -> None:
        """Publish the fresh events; forget the claims of those Kafka did not take, before the commit
        (so their retry is published), keeping the others'."""
        events = [e for e in ordered if e.message_id in outcome.fresh]
        if not events:
            outcome.published = True
            return
        results = await producer.send_batched_each(
            [e.message for e in events], self.settings.produce_timeout_s
        )
        outcome.failed = {e.message_id for e, error in zip(events, results, strict=True) if error is not None}
        outcome.published = True
        if outcome.failed:
            errors = {repr(error) for error in results if error is not None}
            log.warning(
                "events not accepted: publish failed",
                extra={"events": len(outcome.failed), "of": len(events), "error": "; ".join(sorted(errors))},
            )
            await dedupe.release(driver, sorted(outcome.failed))

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.dedupe_prune_interval_s)
            with contextlib.suppress(Exception):
                await self.prune()

    async def prune(self) -> int:
        return await dedupe.prune(self.engine, self.clock.now() - self.window)

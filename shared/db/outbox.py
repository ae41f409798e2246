"""The outbox relay: publishes committed outbox rows to Kafka in order, then deletes them.

A row is one message, or a packed row: a unit of work's messages in the order emitted
(`shared.db.unit_of_work.pack_outbox_rows`; one row to insert, delete and vacuum instead of one per
message: at ~2 messages an event, the outbox had been the segmenter's most written table).

At-least-once: a crash between the broker's acknowledgement and the delete republishes those rows
with the same event ids, which consumers' inboxes drop. One relay per schema works at a time
(an advisory lock), so per-key order is kept even with several replicas of a service.

A message too large for Kafka (over `kafka_max_message_bytes`, or refused by the broker as too large)
is moved to `outbox_parked` in the same transaction (keyed by its row's id and its place in the row),
with the reason, logged and counted (`clm_outbox_parked_total`): sent, it was refused on every pass
and held back every row behind it. A packed row the relay cannot read is parked whole (part -1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, NamedTuple

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.engine import Statement, driver_transaction, json_text
from shared.db.migrations import advisory_key
from shared.kafka.producer import TOO_LARGE, EventProducer, OutgoingMessage, record_size
from shared.observability.metrics import OUTBOX_PARKED, OUTBOX_PENDING, OUTBOX_RELAYED
from shared.settings import BaseServiceSettings

log = logging.getLogger(__name__)


# A pass takes the oldest rows, about :n messages and :bytes of values: each row whose messages and
# value start within both budgets (so at least one row, however large). `octet_length` reads a
# stored value's size from its header, without fetching it.
_TAKE = Statement(
    "WITH relay_lock AS MATERIALIZED (SELECT pg_try_advisory_xact_lock(:k) AS got) "
    "DELETE FROM outbox WHERE id = ANY(ARRAY(SELECT id FROM (SELECT id, "
    "sum(octet_length(value)) OVER (ORDER BY id) - octet_length(value) AS before, "
    "sum(coalesce(messages, 1)) OVER (ORDER BY id) - coalesce(messages, 1) AS before_n FROM outbox "
    "WHERE (SELECT got FROM relay_lock) ORDER BY id LIMIT :n) AS head "
    "WHERE before < :bytes AND before_n < :n)) "
    "RETURNING id, topic, key, value, headers, created_at, messages"
)
# A chunk of the inbox ids past retention (`ctid = ANY(ARRAY(...))`: the LIMIT subquery runs once).
_PRUNE = Statement(
    "DELETE FROM inbox WHERE ctid = ANY(ARRAY(SELECT ctid FROM inbox "
    "WHERE processed_at < now() - make_interval(days => :days) LIMIT :n))"
)
_PARK = Statement(
    "INSERT INTO outbox_parked (id, part, topic, key, value, headers, created_at, reason) "
    "VALUES (:id, :part, :topic, :key, :value, :headers, :created_at, :reason)"
)


class _Taken(NamedTuple):
    """A message taken from the outbox: its row, its place in the row (0 for a row of one message),
    the message, and its headers as stored (for parking)."""

    row_id: int
    part: int
    created_at: Any
    message: OutgoingMessage
    headers: Any


def _unpack(row: Any) -> list[_Taken]:
    """The messages of an outbox row (`_TAKE`'s columns), in order. Raises on a packed value that is
    not what `pack_outbox_rows` writes."""
    row_id, topic, key, value, headers, created_at, messages = row
    if messages is None:
        return [_Taken(row_id, 0, created_at, OutgoingMessage(topic, key, value, _headers(headers)), headers)]
    items = orjson.loads(value)
    if type(items) is not list:
        raise ValueError(f"a packed row holds a JSON {type(items).__name__}, not an array")
    if len(items) != messages:
        raise ValueError(f"a packed row of {messages} messages holds {len(items)}")
    taken = []
    for part, (t, k, v, h) in enumerate(items):
        if type(t) is not str or type(h) is not dict:
            raise ValueError(f"message {part}: a topic and headers object expected")
        try:  # what `outbox_row` writes: string values (inline: ~1 us a message less than `_headers`)
            pairs = tuple([(name, value.encode()) for name, value in h.items()])
        except AttributeError:
            pairs = _headers(h)
        taken.append(_Taken(row_id, part, created_at, OutgoingMessage(t, k.encode(), v.encode(), pairs), h))
    return taken


class OutboxRelay:
    # The inbox is pruned every `prune_interval_s`, `prune_chunk` rows per turn of the relay's loop (a
    # full chunk: the next turn prunes again), so a backlog never holds the relay for long.
    prune_interval_s = 600.0
    prune_chunk = 5000

    def __init__(self, engine: AsyncEngine, producer: EventProducer, settings: BaseServiceSettings) -> None:
        self.engine = engine
        self.producer = producer
        self.settings = settings
        self._wake = asyncio.Event()
        self._full = False  # the last pass took a full budget (rows or bytes): more may be waiting
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock_key = advisory_key(f"outbox:{settings.db_schema}")
        self.relayed = 0  # messages taken from the outbox: published or parked
        self.parked = 0
        self._last_prune = 0.0
        self._prune_more = False

    def notify(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Publish what is left so a clean shutdown leaves nothing waiting.
        with contextlib.suppress(Exception):
            while await self.run_once():
                pass

    async def run_once(self) -> int:
        # Straight on asyncpg (one pass per commit of the service: SQLAlchemy's per-statement work
        # showed up in profiles).
        async with driver_transaction(self.engine) as driver:
            # Taken and deleted in one statement, under the schema's relay lock (tried once per pass,
            # in the same round trip): the delete commits only after the broker has acknowledged every
            # row (a failed send rolls it back), so nothing is lost. A pass that does not get the lock
            # deletes nothing; one that gets it just after another relay committed may still see that
            # relay's rows in its snapshot, but they are gone, so it takes none of them twice.
            # ARRAY(...) is computed once: with `id IN (SELECT ... LIMIT n)` and stale statistics
            # PostgreSQL once re-ran the LIMIT subquery for every outbox row (32 s with 100k waiting).
            rows = sorted(
                await _TAKE.fetch(
                    driver,
                    {
                        "k": self._lock_key,
                        "n": self.settings.outbox_batch_size,
                        "bytes": self.settings.outbox_batch_bytes,
                    },
                ),
                key=lambda r: r[0],
            )
            # Cut short by the message or the byte budget: rows may be waiting, the next pass goes at once.
            self._full = sum(r[6] or 1 for r in rows) >= self.settings.outbox_batch_size or (
                sum(len(r[3]) for r in rows) >= self.settings.outbox_batch_bytes
            )
            if not rows:
                OUTBOX_PENDING.labels(self.settings.service_name).set(0)
                return 0
            limit = self.settings.kafka_max_message_bytes
            sendable: list[_Taken] = []
            parked: list[tuple[_Taken, str]] = []
            for r in rows:
                try:
                    unpacked = _unpack(r)
                except Exception as exc:
                    # A packed value that is not what `pack_outbox_rows` writes (written by hand?):
                    # kept whole, never sent, never holding back the rows behind it.
                    whole = OutgoingMessage(r[1] or "(packed)", r[2], r[3])
                    parked.append((_Taken(r[0], -1, r[5], whole, r[4] or {}), f"unreadable row: {exc!r}"))
                    continue
                for taken in unpacked:
                    if (size := record_size(taken.message)) > limit:
                        # Sent, the broker would refuse it on every pass (a topic's default limit is
                        # ~1 MB), rolling back the delete of every row taken with it.
                        parked.append((taken, f"{size} bytes: more than kafka_max_message_bytes ({limit})"))
                    else:
                        sendable.append(taken)
            taken_count = len(sendable) + len(parked)
            # Bounded: a send the client never settles (a batch queued as the producer was renewed)
            # would hold this transaction and the schema's relay lock, so every relay, for ever.
            timeout = self.settings.outbox_send_timeout_s
            try:
                await asyncio.wait_for(self.producer.send_batched([t.message for t in sendable]), timeout)
            except TOO_LARGE as exc:
                # A topic's max.message.bytes below the setting: the pass's messages one at a time
                # (those of its batches already acknowledged again too: consumers' inboxes drop
                # them), parking what the broker refuses.
                log.warning(
                    "broker refused a batch as too large; sending the pass's messages one at a time",
                    extra={"messages": len(sendable), "error": repr(exc)},
                )
                for taken in sendable:
                    try:
                        await asyncio.wait_for(self.producer.send(taken.message), timeout)
                    except TOO_LARGE as refused:
                        parked.append((taken, f"refused by the broker: {refused!r}"))
            for taken, reason in parked:
                m = taken.message
                await _PARK.execute(
                    driver,
                    {
                        "id": taken.row_id,
                        "part": taken.part,
                        "topic": m.topic,
                        "key": m.key,
                        "value": m.value,
                        "headers": taken.headers
                        if isinstance(taken.headers, str)
                        else json_text(taken.headers),
                        "created_at": taken.created_at,
                        "reason": reason,
                    },
                )
        # Counted and logged once committed: a pass that rolls back parked nothing.
        for taken, reason in parked:
            m = taken.message
            OUTBOX_PARKED.labels(self.settings.service_name, m.topic).inc()
            log.error(
                "outbox message parked: too large for Kafka (see outbox_parked)",
                extra={
                    "outbox_id": taken.row_id,
                    "part": taken.part,
                    "topic": m.topic,
                    "value_bytes": len(m.value),
                    "reason": reason,
                },
            )
        self.parked += len(parked)
        OUTBOX_RELAYED.labels(self.settings.service_name).inc(taken_count - len(parked))
        OUTBOX_PENDING.labels(self.settings.service_name).set(taken_count)
        self.relayed += taken_count
        return taken_count

    async def _run(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            # Cleared before the pass, not after it: a commit notifying during the pass must start
            # another one at once instead of waiting out the poll interval (a lost wake-up).
            self._wake.clear()
            try:
                n = await self.run_once()
                backoff = 0.2
            except Exception as exc:
                log.warning(
                    "outbox relay pass failed; retrying", extra={"error": repr(exc), "retry_in_s": backoff}
                )
                n = 0
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                await self._prune_inbox()
            if n and self._full:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.outbox_poll_interval_s)
                if self.settings.outbox_relay_delay_ms:
                    # Commits of the next few ms join this pass: one delete and one produce for them all.
                    await asyncio.sleep(self.settings.outbox_relay_delay_ms / 1000)

    async def _prune_inbox(self) -> None:
        """Delete a chunk of inbox ids older than `inbox_retention_days` (kept past the topics'
        retention: any redelivery). Its failure is its own, not the relay's: the pass's rows were
        published, and the prune is tried again at the next interval."""
        if not self._prune_more and time.monotonic() - self._last_prune < self.prune_interval_s:
            return
        self._last_prune = time.monotonic()
        self._prune_more = False
        try:
            async with driver_transaction(self.engine) as driver:
                deleted = await _PRUNE.execute(
                    driver, {"days": self.settings.inbox_retention_days, "n": self.prune_chunk}
                )
        except Exception as exc:
            log.warning("inbox prune failed; trying again later", extra={"error": repr(exc)})
            return
        self._prune_more = deleted >= self.prune_chunk


def _headers(raw: Any) -> tuple[tuple[str, bytes], ...]:
    """A row's headers, encoded for Kafka: a JSON object of strings, or (rows written before
    2026-11-29) a list of pairs."""
    data = orjson.loads(raw) if isinstance(raw, (str, bytes)) else raw
    if isinstance(data, dict):
        # What `outbox_row` writes: string values (a list comprehension, 40% cheaper per row).
        with contextlib.suppress(AttributeError):
            return tuple([(k, v.encode()) for k, v in data.items()])
    pairs = data.items() if isinstance(data, dict) else data
    return tuple((str(k), (v if isinstance(v, str) else str(v)).encode()) for k, v in pairs)

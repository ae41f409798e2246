"""One transaction for a step's state change, its inbox record and its outbox messages.

    async with platform.unit_of_work() as uow:
        if not await uow.claim("segmenter.events", event_id):
            return                      # already processed: redelivery changes nothing
        ...change state through uow.session...
        uow.emit(PROFILES.name, customer_id, ProfileChanged(...))
    # committed together here (the messages packed into one outbox row); the relay then publishes them

Nothing else commits: handlers and API endpoints leave the commit to the unit of work. (A change
that is one statement may commit on its own with its outbox rows inside it: `AnnouncedChanges`.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.contracts.events import ContractModel
from shared.db.engine import Statement, json_list, json_rows
from shared.kafka.consumer import Consumed
from shared.kafka.producer import message_headers
from shared.settings import BaseServiceSettings

# Straight to asyncpg (`Statement`): these run in every batch of every consumer.
# A unit of work's messages, packed (`pack_outbox_rows`), in the order emitted: the ids the relay
# publishes by follow it, so a key's messages stay in order. Values as bytea in binary: no JSON for
# the database to parse.
_INSERT_PACKED = Statement(
    "INSERT INTO outbox (value, messages) SELECT r.v, r.m FROM unnest(CAST(:values AS bytea[]), "
    "CAST(:counts AS int[])) WITH ORDINALITY AS r(v, m, n) ORDER BY r.n"
)
# Outbox rows of one message each (`AnnouncedChanges`; a unit of work with `outbox_pack_bytes` 0), as
# `outbox_json_rows` gives them.
_OUTBOX_COLUMNS = (
    "r.v->>0 AS topic, convert_to(r.v->>1, 'UTF8') AS key, convert_to(r.v->>2, 'UTF8') AS value, "
    "r.v->3 AS headers"
)
_INSERT_SINGLE = Statement(
    f"INSERT INTO outbox (topic, key, value, headers) SELECT {_OUTBOX_COLUMNS} "
    "FROM jsonb_array_elements(CAST(:rows AS jsonb)) WITH ORDINALITY AS r(v, n) ORDER BY r.n"
)
_CLAIM = Statement(
    "INSERT INTO inbox (consumer, message_id) SELECT :consumer, jsonb_array_elements_text(CAST(:ids AS "
    "jsonb)) ON CONFLICT DO NOTHING RETURNING message_id"
)
# The same claim, taking the schema's erasure gate shared in the same round trip (`shared.privacy.
# erasure_gate`): handlers that check tombstones next save a statement per unit of work. The lock is
# held before the statement ends, so the tombstone read that follows (a new snapshot) sees every
# erasure that committed before it.
_CLAIM_GATED = Statement(
    "WITH gate AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared(hashtext('clm.erasure.' || "
    "current_schema()))) INSERT INTO inbox (consumer, message_id) "
    "SELECT :consumer, jsonb_array_elements_text(CAST(:ids AS jsonb)) FROM gate ON CONFLICT DO NOTHING "
    "RETURNING message_id"
)
# A session's `info` key: the transaction that holds the erasure gate shared.
_ERASURE_GATE_HELD = "clm.erasure_gate_held"


def erasure_gate_held(session: AsyncSession) -> bool:
    """Whether the session's current transaction holds the erasure gate shared (`note_erasure_gate`)."""
    held = session.info.get(_ERASURE_GATE_HELD)
    return held is not None and held is session.sync_session.get_transaction()


def note_erasure_gate(session: AsyncSession) -> None:
    """Record that the session's current transaction holds the erasure gate shared: for this
    transaction only (a session used for another one afterwards takes it again)."""
    session.info[_ERASURE_GATE_HELD] = session.sync_session.get_transaction()


class OutboxRow(NamedTuple):
    """One outbox row: what the relay publishes (its headers as the JSON object the column holds)."""

    topic: str
    key: bytes
    value: bytes
    headers: str


def outbox_row(
    settings: BaseServiceSettings,
    topic_name: str,
    key: str,
    model: ContractModel,
    correlation_id: str | None,
    extra_headers: Mapping[str, str] | None,
) -> OutboxRow:
    """The outbox row of one message (the relay reads the headers back as Kafka's (name, bytes))."""
    headers = message_headers(
        model, producer=settings.service_name, correlation_id=correlation_id, extra_headers=extra_headers
    )
    return OutboxRow(
        settings.topic(topic_name),
        key.encode(),
        model.__pydantic_serializer__.to_json(model),
        orjson.dumps(headers).decode(),
    )


def pack_outbox_rows(rows: Sequence[OutboxRow], limit: int) -> list[tuple[bytes, int]]:
    """`rows` as packed outbox rows (value, number of messages), in order, each about `limit` bytes at
    most (a larger message alone): a JSON array of `[topic, key, value, headers]`, key and value as
    text (UTF-8, as `outbox_row` made them), headers the JSON object they are. The relay unpacks it
    (`shared.db.outbox`)."""
    packs: list[tuple[bytes, int]] = []
    chunk: list[OutboxRow] = []
    size = 0
    for r in rows:
        # Key and value as JSON strings: their quotes and backslashes escaped (orjson writes the rest
        # as is: a value's control characters are escaped in it already).
        value = len(r.value) + r.value.count(b'"') + r.value.count(b"\\")
        key = len(r.key) + r.key.count(b'"') + r.key.count(b"\\")
        n = len(r.topic) + key + value + len(r.headers) + 16
        if chunk and size + n > limit:
            packs.append(_pack(chunk))
            chunk, size = [], 0
        chunk.append(r)
        size += n
    if chunk:
        packs.append(_pack(chunk))
    return packs


def _pack(rows: list[OutboxRow]) -> tuple[bytes, int]:
    return (
        orjson.dumps([(r.topic, r.key.decode(), r.value.decode(), orjson.Fragment(r.headers)) for r in rows]),
        len(rows),
    )


# The outbox rows of `AnnouncedChanges` whose owner is among the rows a statement changed, in the
# order they were emitted: a sub-statement of that statement, `{changed}` (a CTE) naming those rows'
# keys in its column `{column}`.
OUTBOX_OF_CHANGED = (
    "INSERT INTO outbox (topic, key, value, headers) SELECT o.topic, o.key, o.value, o.headers "
    f"FROM (SELECT r.v->>4 AS owner, {_OUTBOX_COLUMNS}, r.n FROM jsonb_array_elements(CAST(:ob_rows AS "
    "jsonb)) WITH ORDINALITY AS r(v, n)) AS o JOIN {changed} AS c ON c.{column} = o.owner ORDER BY o.n"
)


def outbox_json_rows(rows: Iterable[OutboxRow], owners: Sequence[str] | None = None) -> str:
    """Outbox rows as one jsonb parameter (see `shared.db.engine.json_rows`): key and value as text
    (UTF-8, as `outbox_row` made them; written back as the same bytes), headers as the JSON object
    they are; each row's owner last when given (`AnnouncedChanges`)."""
    if owners is None:
        return json_rows(
            (r.topic, r.key.decode(), r.value.decode(), orjson.Fragment(r.headers)) for r in rows
        )
    return json_rows(
        (r.topic, r.key.decode(), r.value.decode(), orjson.Fragment(r.headers), owner)
        for r, owner in zip(rows, owners, strict=True)
    )


class AnnouncedChanges:
    """A state change written by one statement on a connection outside any transaction, and the
    messages announcing it, inserted into the outbox by that same statement (`OUTBOX_OF_CHANGED`):
    one round trip where a unit of work takes four (BEGIN, the change, the outbox, COMMIT), as
    atomic. Each message is emitted for the key of the row it announces (its owner) and inserted only
    if the statement changed that row. The caller notifies the relay after the statement."""

    def __init__(self, settings: BaseServiceSettings) -> None:
        self._settings = settings
        self._owners: list[str] = []
        self._rows: list[OutboxRow] = []

    def __len__(self) -> int:
        return len(self._rows)

    def emit(
        self,
        owner: str,
        topic_name: str,
        key: str,
        model: ContractModel,
        *,
        correlation_id: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        self._owners.append(owner)
        self._rows.append(outbox_row(self._settings, topic_name, key, model, correlation_id, extra_headers))

    def params(self) -> dict[str, str]:
        """`OUTBOX_OF_CHANGED`'s parameters."""
        return {"ob_rows": outbox_json_rows(self._rows, self._owners)}


class UnitOfWork:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: BaseServiceSettings,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._on_commit = on_commit
        self._outgoing: list[OutboxRow] = []
        self._session: AsyncSession | None = None
        # Cause id (the consumed message's event id) -> its correlation id, noted by the handler
        # (`note_correlations`), so what it emits because of that message passes the chain's id on.
        self.correlations: dict[str, str] = {}

    @property
    def session(self) -> AsyncSession:
        assert self._session is not None, "use the unit of work inside `async with`"
        return self._session

    async def __aenter__(self) -> UnitOfWork:
        self._session = self._sessions()
        await self._session.begin()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        session = self.session
        try:
            if exc_type is None:
                await self._flush_outbox()
                await session.commit()
                if self._outgoing and self._on_commit is not None:
                    self._on_commit()
            else:
                await session.rollback()
        finally:
            await session.close()
            self._session = None

    async def claim(self, consumer: str, message_id: str) -> bool:
        """Record `message_id` as processed by `consumer`; False if it already was (skip it)."""
        return bool(await self.claim_many(consumer, [message_id]))

    async def claim_many(
        self, consumer: str, message_ids: Iterable[str], *, erasure_gate: bool = False
    ) -> set[str]:
        """The subset of ids not processed before, now recorded. Waits on a concurrent duplicate.
        `erasure_gate`: also take the erasure gate shared (then `shared.privacy.erasure_gate(...,
        exclusive=False)` in this transaction costs nothing)."""
        ids = list(dict.fromkeys(message_ids))
        if not ids:
            return set()
        session = self.session
        if erasure_gate and not erasure_gate_held(session):
            rows = await _CLAIM_GATED.fetch(session, {"consumer": consumer, "ids": json_list(ids)})
            note_erasure_gate(session)
        else:
            rows = await _CLAIM.fetch(session, {"consumer": consumer, "ids": json_list(ids)})
        return {r[0] for r in rows}

    def note_correlations(self, consumed: Iterable[Consumed[Any]]) -> None:
        """Remember each consumed message's correlation id under its event id (see `emit`'s `cause`)."""
        for c in consumed:
            if c.correlation_id:
                self.correlations[c.event_id] = c.correlation_id

    def emit(
        self,
        topic_name: str,
        key: str,
        model: ContractModel,
        *,
        correlation_id: str | None = None,
        cause: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        """Queue `model` for the outbox. Its correlation id is `correlation_id`, else that of the
        consumed message `cause` (an event id noted with `note_correlations`), else its own id."""
        if correlation_id is None and cause is not None:
            correlation_id = self.correlations.get(cause)
        self._outgoing.append(
            outbox_row(self._settings, topic_name, key, model, correlation_id, extra_headers)
        )

    async def _flush_outbox(self) -> None:
        if not self._outgoing:
            return
        limit = self._settings.outbox_pack_bytes
        if not limit:
            await _INSERT_SINGLE.execute(self.session, {"rows": outbox_json_rows(self._outgoing)})
            return
        packs = pack_outbox_rows(self._outgoing, limit)
        await _INSERT_PACKED.execute(
            self.session, {"values": [v for v, _ in packs], "counts": [n for _, n in packs]}
        )

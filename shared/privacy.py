"""Erasure and export over clm.privacy.v1: the conventions every service follows.

- The segmenter publishes `erase_requested` / `export_requested` (key: canonical customer id) with
  every identifier the customer was known by, in several messages (`parts`) when they are too many
  for one (`requests`). Each service answers once per request message with `erase_completed` /
  `export_part`, its own name in `service`, event id `<request_id>:<service>:<action>` (plus
  `:part<p>of<n>` for a part; so a redelivered request re-answers with the same id), emitted through
  the outbox in the same unit of work as the erasure and the inbox claim. The segmenter records a
  service's answer once every part is answered (`merge_parts`).
- An answer too large for one Kafka message (an export part of a heavy customer: thousands of sent
  messages, journey instances) is split into chunks (`answers`, `split_part`), each a message of at
  most `EXPORT_CHUNK_BYTES` of data with its own deterministic event id; the segmenter puts the part
  together (`merge_chunks`) once every chunk arrived.
- An erased customer's identifiers are remembered only as salted hashes (`erasure_tombstones`), so
  later events or message requests carrying them can be recognized without keeping them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import pydantic_core
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts.events import PrivacyAction, PrivacyRequest
from shared.db.engine import Statement, array_from_json, driver_connection, json_list
from shared.db.unit_of_work import erasure_gate_held, note_erasure_gate

# The services that must confirm an erasure and answer an export.
SERVICES = ("segmenter", "ingest", "journey_engine", "notifier")


def identity_hash(salt: str, identity: str) -> str:
    return hmac.new(salt.encode(), identity.strip().encode(), hashlib.sha256).hexdigest()


def identity_hashes(salt: str, identities: Iterable[str]) -> list[str]:
    return sorted({identity_hash(salt, i) for i in identities if i})


# The JSON bytes of `data` one answer message carries at most (rows permitting): well under Kafka's
# ~1 MB limit, so a chunk never meets it, and small enough that a heavy export is many light messages.
EXPORT_CHUNK_BYTES = 256 * 1024
# Kafka's limit on one message (the `kafka_max_message_bytes` default; the outbox relay parks larger
# rows): a single row is sent whole, alone in its chunk, up to this less the envelope and headers.
MAX_MESSAGE_BYTES = 1_000_000
# Room left for the record's headers, key and batch overhead, and the chunk numbers in the envelope.
_HEADROOM = 16 * 1024
# The least data budget a chunk gets, however large the envelope.
_MIN_DATA_BUDGET = 16 * 1024
# What replaces a value too large for any message: its size, and why it is not there.
OMITTED = "_clm_omitted"
# The JSON bytes of identifiers one request message names at most: a customer known under more (an
# upstream minting a long anonymousId per visit) is asked about in several messages (`requests`).
REQUEST_IDENTITIES_BYTES = 256 * 1024


def requests(
    request_id: str,
    action: PrivacyAction,
    customer_id: str,
    identities: Sequence[str],
    service: str,
    now: datetime,
    *,
    budget: int = REQUEST_IDENTITIES_BYTES,
) -> list[PrivacyRequest]:
    """The request as one message or, when its identifiers pass `budget` bytes of JSON, as `parts`
    messages (`part` 0..parts-1), each naming a share of them (in order, at least one each) and the
    customer id. Event ids: `<request_id>:<service>:<action>`, `...:<action>:part<p>of<n>` for parts."""
    shares: list[list[str]] = [[]]
    size = 2  # []
    for identity in identities:
        identity_bytes = len(_json(identity)) + 1
        if shares[-1] and size + identity_bytes > budget:
            shares.append([])
            size = 2
        shares[-1].append(identity)
        size += identity_bytes
    event_id = f"{request_id}:{service}:{action.value}"
    n = len(shares)
    return [
        PrivacyRequest(
            event_id=event_id if n == 1 else f"{event_id}:part{i}of{n}",
            request_id=request_id,
            action=action,
            customer_id=customer_id,
            identities=share,
            service=service,
            occurred_at=now,
            part=i,
            parts=n,
        )
        for i, share in enumerate(shares)
    ]


def answer(
    request: PrivacyRequest,
    service: str,
    action: PrivacyAction,
    now: datetime,
    data: dict[str, Any] | None = None,
) -> PrivacyRequest:
    """One answer message holding all of `data`: for answers that are small by nature (an erasure's row
    counts). An export part goes through `answers`. The answer to a request sent in parts answers that
    part (`...:<action>:part<p>of<n>`); it does not repeat the request's identifiers."""
    event_id = f"{request.request_id}:{service}:{action.value}"
    if request.parts > 1:
        event_id += f":part{request.part}of{request.parts}"
    return PrivacyRequest(
        event_id=event_id,
        request_id=request.request_id,
        action=action,
        customer_id=request.customer_id,
        service=service,
        occurred_at=now,
        data=data or {},
        part=request.part,
        parts=request.parts,
    )


def answers(
    request: PrivacyRequest,
    service: str,
    action: PrivacyAction,
    now: datetime,
    data: Mapping[str, Any] | None = None,
    *,
    budget: int = EXPORT_CHUNK_BYTES,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> list[PrivacyRequest]:
    """The answer to `request` as one message or, when `data` is larger than `budget` bytes of JSON,
    as several (`chunk` 0..`chunks`-1, see `split_part`), to emit in order in one unit of work.

    Event ids are deterministic: `<request_id>:<service>:<action>` for a single message (as before
    chunking), `...:<action>:<chunk>of<chunks>` for chunks, so a redelivered request answers with the
    same ids and no chunk is taken for a duplicate of another. Every chunk carries the same
    `occurred_at`, which tells the segmenter which chunks belong together."""
    whole = answer(request, service, action, now)
    envelope = len(whole.__pydantic_serializer__.to_json(whole)) + 64  # the chunk numbers and id suffix
    # Never more than a message may carry (a `kafka_max_message_bytes` set below the budget).
    row_limit = max(max_message_bytes - envelope - _HEADROOM, _MIN_DATA_BUDGET)
    data_budget = min(max(budget - envelope, _MIN_DATA_BUDGET), row_limit)
    parts = split_part(data or {}, data_budget, row_limit)
    if len(parts) == 1:
        return [whole.model_copy(update={"data": parts[0]})]
    n = len(parts)
    return [
        whole.model_copy(
            update={"event_id": f"{whole.event_id}:{i}of{n}", "data": part, "chunk": i, "chunks": n}
        )
        for i, part in enumerate(parts)
    ]


def split_part(data: Mapping[str, Any], budget: int, row_limit: int | None = None) -> list[dict[str, Any]]:
    """Split an answer's data (table name -> list of rows; other values kept whole) into chunks of at
    most `budget` bytes of JSON each, in order: a table's rows keep their order and run on from one
    chunk into the next; every key appears in the first chunk that has room for it (an empty table
    too, so the merged part names it); values that are not lists go whole, as one row would.

    A row larger than `budget` goes alone in its chunk. A row larger than `row_limit` (default:
    `budget`), which no message could carry, has its largest fields replaced, one by one, with
    `{"_clm_omitted": {"bytes": n, "reason": ...}}` until it fits (the whole row if that is not
    enough): the export then completes, saying what it left out, instead of never completing.
    `merge_chunks` puts the chunks back together. Always at least one chunk."""
    limit = budget if row_limit is None else max(row_limit, budget)
    chunks: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    size = 2  # {}

    def close() -> None:
        nonlocal current, size
        chunks.append(current)
        current, size = {}, 2

    for key, value in data.items():
        key_bytes = len(_json(key)) + 1 + (1 if current else 0)  # "key": and the comma before it
        if not isinstance(value, list):
            value, value_bytes = _fit(value, limit)
            if current and size + key_bytes + value_bytes > budget:
                close()
                key_bytes -= 1
            current[key] = value
            size += key_bytes + value_bytes
            continue
        if current and size + key_bytes + 2 > budget:
            close()
            key_bytes -= 1
        rows: list[Any] = []
        current[key] = rows
        size += key_bytes + 2  # []
        for row in value:
            row, row_bytes = _fit(row, limit)
            if size + row_bytes + (1 if rows else 0) > budget and (rows or len(current) > 1):
                if not rows:
                    del current[key]  # the table starts in the next chunk
                close()
                rows = []
                current[key] = rows
                size += len(_json(key)) + 1 + 2
            size += row_bytes + (1 if rows else 0)
            rows.append(row)
    if current or not chunks:
        chunks.append(current)
    return chunks


def merge_parts(action: PrivacyAction, parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One service's answer to a request sent in parts, from its answers to each part (in part order).
    Erasures: `deleted` row counts summed per table. Exports: each table's rows concatenated without
    repeats (a row found by identifiers of two parts, or by the customer id every part names, is
    exported once), any other value taken from the first part that has it."""
    if action is PrivacyAction.ERASE_COMPLETED:
        merged: dict[str, Any] = {}
        deleted: dict[str, int] = {}
        for part in parts:
            for key, value in part.items():
                if key == "deleted" and isinstance(value, Mapping):
                    for table, n in value.items():
                        deleted[table] = deleted.get(table, 0) + int(n)
                else:
                    merged.setdefault(key, value)
        if deleted or any("deleted" in part for part in parts):
            merged["deleted"] = deleted
        return merged
    merged = merge_chunks(parts)
    for key, value in merged.items():
        if isinstance(value, list):
            seen: set[bytes] = set()
            unique = []
            for row in value:
                encoded = _json(row)
                if encoded not in seen:
                    seen.add(encoded)
                    unique.append(row)
            merged[key] = unique
    return merged


def merge_chunks(chunks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The answer's data from its chunks (in chunk order): each table's rows concatenated, any other
    value taken from the first chunk that has it."""
    merged: dict[str, Any] = {}
    for chunk in chunks:
        for key, value in chunk.items():
            if key not in merged:
                merged[key] = list(value) if isinstance(value, list) else value
            elif isinstance(value, list) and isinstance(merged[key], list):
                merged[key].extend(value)
    return merged


def _json(value: Any) -> bytes:
    # As the contract's serializer writes it (datetimes, decimals, UUIDs included).
    return pydantic_core.to_json(value)


def _omitted(size: int) -> dict[str, Any]:
    return {OMITTED: {"bytes": size, "reason": "too large for a Kafka message"}}


def _fit(value: Any, limit: int) -> tuple[Any, int]:
    """`value` and its JSON size, with its largest fields omitted (marked) if it is over `limit`."""
    size = len(_json(value))
    if size <= limit:
        return value, size
    if isinstance(value, dict):
        fitted = dict(value)
        sizes = sorted(((len(_json(v)), k) for k, v in value.items()), key=lambda kv: kv[0], reverse=True)
        for field_size, field in sizes:
            fitted[field] = _omitted(field_size)
            size = len(_json(fitted))
            if size <= limit:
                return fitted, size
    marker = _omitted(size)
    return marker, len(_json(marker))


# Straight to asyncpg (`Statement`): every event batch runs them.
_GATE = Statement("SELECT pg_advisory_xact_lock_shared(hashtext('clm.erasure.' || current_schema()))")
_GATE_EXCLUSIVE = Statement("SELECT pg_advisory_xact_lock(hashtext('clm.erasure.' || current_schema()))")
_TRY_GATE = Statement("SELECT pg_try_advisory_xact_lock_shared(hashtext('clm.erasure.' || current_schema()))")
_ERASED_AMONG = Statement(
    f"SELECT identity_hash FROM erasure_tombstones WHERE identity_hash = ANY({array_from_json('h')})"
)


async def erasure_gate(session: AsyncSession, *, exclusive: bool) -> None:
    """Order erasures against event processing in one schema, until the transaction ends.

    Event handlers hold it shared (they never wait on each other) from before their tombstone check
    to their commit; an erasure holds it exclusive from before it reads anything. So an event batch
    either committed before the erasure (whose delete then covers what it wrote) or checks the
    tombstones after the erasure committed; none can slip between check and erasure.
    Taken shared already by this transaction's inbox claim (`claim_many(..., erasure_gate=True)`),
    it costs no statement.
    """
    if not exclusive and erasure_gate_held(session):
        return
    await (_GATE_EXCLUSIVE if exclusive else _GATE).execute(session)
    if not exclusive:
        note_erasure_gate(session)


async def try_erasure_gate(session: AsyncSession) -> bool:
    """The erasure gate shared, if it can be had at once: True (held until the transaction ends, as
    `erasure_gate(..., exclusive=False)`), or False while an erasure holds it or waits for it.

    For writes that may be dropped rather than wait (an open pixel, a click), or kept for later (a
    provider's delivery report, which its sender may not retry: the notifier stores it and applies
    it once the gate is free). PostgreSQL queues a new shared request behind a waiting exclusive
    one, so a blocking shared
    request made during an erasure waits for the erasure and for every batch ahead of it, holding
    its pooled connection all along; during an erasure every such request, for every customer,
    would. A try does not queue: it answers at once.
    """
    if erasure_gate_held(session):
        return True
    held = bool((await _TRY_GATE.fetch(session))[0][0])
    if held:
        note_erasure_gate(session)
    return held


async def erasure_gate_within(session: AsyncSession, timeout_ms: int) -> bool:
    """The erasure gate shared, waiting for it at most `timeout_ms`: True (held until the transaction
    ends, as `erasure_gate(..., exclusive=False)`), or False when an erasure still held it or waited
    for it then; the transaction goes on either way (the wait is undone to a savepoint).

    Between `try_erasure_gate` and `erasure_gate`: for writes that a short erasure should not refuse,
    yet must not hold a pooled connection for however long one takes (the notifier's admin
    preferences PUT, answered 503 when the wait runs out). Free at once, it costs what a try does."""
    if await try_erasure_gate(session):
        return True
    connection = await driver_connection(session)
    previous = await connection.fetchval("SELECT current_setting('lock_timeout')")
    # SET LOCAL after the savepoint: rolling back to it undoes the setting too.
    await connection.execute(
        f"SAVEPOINT clm_erasure_gate; SET LOCAL lock_timeout = '{max(1, int(timeout_ms))}ms'"
    )
    try:
        await _GATE.execute(connection)
    except asyncpg.LockNotAvailableError:
        await connection.execute("ROLLBACK TO SAVEPOINT clm_erasure_gate; RELEASE SAVEPOINT clm_erasure_gate")
        return False
    # Held: the transaction's later locks wait as they did before.
    await connection.execute("RELEASE SAVEPOINT clm_erasure_gate")
    await connection.execute("SELECT set_config('lock_timeout', $1, true)", previous)
    note_erasure_gate(session)
    return True


async def add_tombstones(
    session: AsyncSession, salt: str, identities: Iterable[str], request_id: str, now: datetime
) -> None:
    hashes = identity_hashes(salt, identities)
    if hashes:
        await session.execute(
            text(
                "INSERT INTO erasure_tombstones (identity_hash, request_id, erased_at) "
                "SELECT unnest(CAST(:h AS text[])), :r, :now ON CONFLICT DO NOTHING"
            ),
            {"h": hashes, "r": request_id, "now": now},
        )


def hashed_identities(salt: str, identities: Iterable[str]) -> dict[str, set[str]]:
    """Identity hash -> the given identifiers with that hash: several may share one (the hash ignores
    surrounding whitespace), and a tombstone erases them all. For a handler that reads tombstones
    inside one of its own statements (its rows: `erased_identities`)."""
    by_hash: dict[str, set[str]] = {}
    for i in set(identities):
        if i:
            by_hash.setdefault(identity_hash(salt, i), set()).add(i)
    return by_hash


def erased_identities(by_hash: Mapping[str, set[str]], tombstones: Iterable[str]) -> set[str]:
    """The identifiers of `hashed_identities` whose hash is among the tombstones found."""
    return {i for h in tombstones for i in by_hash.get(h, ())}


async def erased_among(session: AsyncSession, salt: str, identities: Iterable[str]) -> set[str]:
    """The given identifiers that belong to an erased customer."""
    by_hash = hashed_identities(salt, identities)
    if not by_hash:
        return set()
    rows = await _ERASED_AMONG.fetch(session, {"h": json_list(by_hash)})
    return erased_identities(by_hash, (r[0] for r in rows))

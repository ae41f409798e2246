"""Write key checks for the hot path, with a short in-memory cache in front of the database.

A lookup (valid or not) is trusted for `write_key_cache_ttl_s` seconds. A revoke drops the key from
this replica's cache at once (and a lookup in flight meanwhile is not cached); other replicas stop
accepting it when their entry expires, so a revoke takes effect everywhere within that TTL (5 s by
default).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.ingest.domain.write_keys import (
    DEVELOPMENT_WRITE_KEY,
    generate_write_key,
    hash_write_key,
    key_id,
    shown_prefix,
)
from services.ingest.store.write_keys import WriteKeyRecord, WriteKeyRepository
from shared.clock import Clock

_MAX_CACHED = 10_000


@dataclass(frozen=True)
class CreatedWriteKey:
    record: WriteKeyRecord
    key: str


class WriteKeys:
    def __init__(self, repository: WriteKeyRepository, clock: Clock, ttl_s: float) -> None:
        self.repository = repository
        self.clock = clock
        self.ttl = timedelta(seconds=ttl_s)
        self._cache: dict[str, tuple[str | None, datetime]] = {}
        self._lookups: dict[str, asyncio.Future[str | None]] = {}
        # Revokes by this replica so far: a lookup that started before one may have read the key as
        # active, and is answered but not cached (it would keep the revoked key for a whole TTL).
        self._revokes = 0

    async def authenticate(self, key: str) -> str | None:
        """The key's id if it is a valid, unrevoked write key; else None."""
        digest = hash_write_key(key)
        now = self.clock.now()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        # One lookup per key at a time: when an entry expires under load, the requests waiting for
        # the same key share it instead of each querying the database.
        revokes = self._revokes
        lookup = self._lookups.get(digest)
        if lookup is None:
            lookup = asyncio.ensure_future(self.repository.active_id(digest))
            self._lookups[digest] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(digest, None))
        found = await asyncio.shield(lookup)
        if self._revokes != revokes:
            return found
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()  # wrong keys in bulk must not grow memory; a refill is cheap
        self._cache[digest] = (found, now + self.ttl)
        return found

    async def seed(self, keys: Sequence[str]) -> None:
        for key in keys:
            digest = hash_write_key(key)
            await self.repository.add(
                id=key_id(digest),
                key_hash=digest,
                prefix=shown_prefix(key),
                name="seeded",
                now=self.clock.now(),
            )

    async def revoke_development_key(self) -> str | None:
        """Production: revoke the development key if a local run stored it in this database (seeded
        keys stay until revoked); its id if it was active."""
        digest = hash_write_key(DEVELOPMENT_WRITE_KEY)
        if await self.repository.active_id(digest) is None:
            return None
        await self.revoke(key_id(digest))
        return key_id(digest)

    async def create(self, name: str) -> CreatedWriteKey:
        key = generate_write_key()
        digest = hash_write_key(key)
        now = self.clock.now()
        await self.repository.add(
            id=key_id(digest), key_hash=digest, prefix=shown_prefix(key), name=name, now=now
        )
        record = WriteKeyRecord(
            id=key_id(digest), name=name, prefix=shown_prefix(key), created_at=now, revoked_at=None
        )
        return CreatedWriteKey(record, key)

    async def list(self) -> Sequence[WriteKeyRecord]:
        return await self.repository.list()

    async def revoke(self, id: str) -> datetime | None:
        """Revoke (idempotent); the revocation time, or None if there is no such key."""
        found = await self.repository.revoke(id, self.clock.now())
        if found is None:
            return None
        digest, revoked_at = found
        self._revokes += 1
        self._cache.pop(digest, None)
        # Requests from now on look again (the revoke is committed): none waits for an older lookup.
        self._lookups.pop(digest, None)
        return revoked_at

"""Every query on `write_keys`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.store.tables import write_keys


@dataclass(frozen=True)
class WriteKeyRecord:
    id: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class WriteKeyRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def add(self, *, id: str, key_hash: str, prefix: str, name: str, now: datetime) -> bool:
        """Insert a key; False if that key (digest) already exists (seeding is idempotent)."""
        stmt = (
            insert(write_keys)
            .values(id=id, key_hash=key_hash, prefix=prefix, name=name, created_at=now)
            .on_conflict_do_nothing()
            .returning(write_keys.c.id)
        )
        async with self.engine.begin() as conn:
            return (await conn.execute(stmt)).first() is not None

    async def active_id(self, key_hash: str) -> str | None:
        """The id of the key with this digest, unless it is unknown or revoked."""
        stmt = sa.select(write_keys.c.id).where(
            write_keys.c.key_hash == key_hash, write_keys.c.revoked_at.is_(None)
        )
        async with self.engine.connect() as conn:
            return (await conn.execute(stmt)).scalar_one_or_none()

    async def list(self) -> Sequence[WriteKeyRecord]:
        stmt = sa.select(
            write_keys.c.id,
            write_keys.c.name,
            write_keys.c.prefix,
            write_keys.c.created_at,
            write_keys.c.revoked_at,
        ).order_by(write_keys.c.created_at, write_keys.c.id)
        async with self.engine.connect() as conn:
            return [WriteKeyRecord(*row) for row in await conn.execute(stmt)]

    async def revoke(self, id: str, now: datetime) -> tuple[str, datetime] | None:
        """Revoke a key (idempotent); (key_hash, revoked_at), or None if there is no such key."""
        stmt = (
            sa.update(write_keys)
            .where(write_keys.c.id == id)
            .values(revoked_at=sa.func.coalesce(write_keys.c.revoked_at, now))
            .returning(write_keys.c.key_hash, write_keys.c.revoked_at)
        )
        async with self.engine.begin() as conn:
            row = (await conn.execute(stmt)).first()
        return None if row is None else (row[0], row[1])

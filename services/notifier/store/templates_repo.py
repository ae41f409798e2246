"""Every query on `templates`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifier.domain.templates import TemplateDefinition
from services.notifier.store.tables import templates
from shared.contracts import Channel
from shared.db.engine import Statement


def _definition(row: Mapping[Any, Any]) -> TemplateDefinition:
    """From a row by column name: an asyncpg record (`Statement`) or a SQLAlchemy row's `_mapping`."""
    return TemplateDefinition(
        id=row["id"],
        channel=Channel(row["channel"]),
        default_locale=row["default_locale"],
        variants=row["variants"],
        version=row["version"],
    )


def as_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "channel": row.channel,
        "default_locale": row.default_locale,
        "variants": row.variants,
        "version": row.version,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


async def get_definition(session: AsyncSession, template_id: str) -> TemplateDefinition | None:
    row = (await session.execute(sa.select(templates).where(templates.c.id == template_id))).first()
    return _definition(row._mapping) if row else None


# Read for every batch of sends (with the rest of its context: `send_context_repo`).
GET_MANY_SQL = (
    "SELECT id, channel, default_locale, variants, version FROM templates "
    "WHERE id = ANY(CAST(:templates AS text[]))"
)
_GET_MANY = Statement(GET_MANY_SQL)


async def get_many(session: AsyncSession, ids: set[str]) -> dict[str, TemplateDefinition]:
    if not ids:
        return {}
    return definitions(await _GET_MANY.fetch(session, {"templates": list(ids)}))


def definitions(rows: Sequence[Mapping[str, Any]]) -> dict[str, TemplateDefinition]:
    """Rows of `GET_MANY_SQL` (by column name), by template id."""
    return {r["id"]: _definition(r) for r in rows}


async def get(session: AsyncSession, template_id: str) -> dict[str, Any] | None:
    row = (await session.execute(sa.select(templates).where(templates.c.id == template_id))).first()
    return as_dict(row) if row else None


async def list_all(session: AsyncSession, *, lock: bool = False) -> list[dict[str, Any]]:
    """Every template; `lock`: held (FOR SHARE) until the transaction ends, so a concurrent change
    or deletion commits, and is announced, after what this transaction announces."""
    query = sa.select(templates).order_by(templates.c.id)
    return [as_dict(r) for r in await session.execute(query.with_for_update(read=True) if lock else query)]


async def create(
    session: AsyncSession,
    *,
    template_id: str,
    name: str,
    channel: str,
    default_locale: str,
    variants: Mapping[str, Mapping[str, str]],
    now: datetime,
) -> dict[str, Any] | None:
    """None if the id is taken."""
    stmt = (
        insert(templates)
        .values(
            id=template_id,
            name=name,
            channel=channel,
            default_locale=default_locale,
            variants=variants,
            version=1,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing()
        .returning(*templates.c)
    )
    row = (await session.execute(stmt)).first()
    return as_dict(row) if row else None


async def update(
    session: AsyncSession,
    template_id: str,
    *,
    name: str,
    channel: str,
    default_locale: str,
    variants: Mapping[str, Mapping[str, str]],
    now: datetime,
) -> dict[str, Any] | None:
    stmt = (
        sa.update(templates)
        .where(templates.c.id == template_id)
        .values(
            name=name,
            channel=channel,
            default_locale=default_locale,
            variants=variants,
            version=templates.c.version + 1,
            updated_at=now,
        )
        .returning(*templates.c)
    )
    row = (await session.execute(stmt)).first()
    return as_dict(row) if row else None


async def delete(session: AsyncSession, template_id: str) -> dict[str, Any] | None:
    """The deleted template (None if there was none)."""
    result = await session.execute(
        sa.delete(templates).where(templates.c.id == template_id).returning(*templates.c)
    )
    row = result.first()
    return as_dict(row) if row else None

"""The engine's projection of the notifier's templates (`clm.templates.v1`): which exist, and for
which channel, so a journey's references to them are checked when it is saved."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts.events import TemplateChanged
from shared.db.engine import Statement

# Newest announcement wins: a consumer batch can hold several states of one template, and the
# topic is compacted (replayed from the start by a new consumer group).
_APPLY = Statement(
    "INSERT INTO known_templates (template_id, channel, version, deleted, changed_at) "
    "SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:channels AS text[]), CAST(:versions AS int[]), "
    "CAST(:deleted AS boolean[]), CAST(:at AS timestamptz[])) "
    "ON CONFLICT (template_id) DO UPDATE SET channel = excluded.channel, version = excluded.version, "
    "deleted = excluded.deleted, changed_at = excluded.changed_at "
    "WHERE known_templates.changed_at <= excluded.changed_at"
)
_CHANNELS = Statement(
    "SELECT template_id, channel FROM known_templates "
    "WHERE template_id = ANY(CAST(:ids AS text[])) AND NOT deleted"
)
_ANY = Statement("SELECT EXISTS (SELECT 1 FROM known_templates)")


async def apply(session: AsyncSession, changes: Sequence[TemplateChanged]) -> None:
    newest: dict[str, TemplateChanged] = {}
    for c in changes:
        seen = newest.get(c.template_id)
        if seen is None or seen.occurred_at <= c.occurred_at:
            newest[c.template_id] = c
    if not newest:
        return
    rows = list(newest.values())
    await _APPLY.execute(
        session,
        {
            "ids": [c.template_id for c in rows],
            "channels": [c.channel.value for c in rows],
            "versions": [c.version for c in rows],
            "deleted": [c.deleted for c in rows],
            "at": [c.occurred_at for c in rows],
        },
    )


async def channels_of(session: AsyncSession, template_ids: Iterable[str]) -> dict[str, str] | None:
    """template id -> channel, for the live templates among `template_ids`; None while the notifier
    has announced no template at all (a fresh platform, or an engine still catching up)."""
    ids = sorted(set(template_ids))
    if not (await _ANY.fetch(session, {}))[0][0]:
        return None
    if not ids:
        return {}
    return {r[0]: r[1] for r in await _CHANNELS.fetch(session, {"ids": ids})}

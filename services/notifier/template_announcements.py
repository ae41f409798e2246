"""Announces each template's state on `clm.templates.v1` (compacted, keyed by template id), in the
same unit of work as the change: the journey engine checks journeys' template references against it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.notifier.store import templates_repo
from shared.contracts import TEMPLATES, Channel, TemplateChanged
from shared.db.unit_of_work import UnitOfWork
from shared.runtime import Platform


def announce_template(uow: UnitOfWork, template: Mapping[str, Any], *, deleted: bool = False) -> None:
    """`template`: a row as `templates_repo.as_dict` gives it (`updated_at` = the change's time)."""
    at = template["updated_at"]
    state = "deleted" if deleted else f"v{template['version']}"
    uow.emit(
        TEMPLATES.name,
        template["id"],
        TemplateChanged(
            event_id=f"template:{template['id']}:{state}:{at.isoformat()}",
            template_id=template["id"],
            channel=Channel(template["channel"]),
            version=template["version"],
            deleted=deleted,
            occurred_at=at,
        ),
    )


async def announce_all(platform: Platform) -> int:
    """Every template as it is, on start: templates saved before their changes were announced (or
    while a consumer's projection was being rebuilt) are announced too. A few rows; compacted topic."""
    async with platform.unit_of_work() as uow:
        # Locked: a deletion committing between this read and this commit would otherwise be followed
        # on the (compacted) topic by this stale "exists", the state a rebuilt consumer keeps.
        rows = await templates_repo.list_all(uow.session, lock=True)
        for row in rows:
            announce_template(uow, row)
    return len(rows)

"""`GET /v1/customers/{customer_id}/messages` (admin token): what a customer was sent, newest first,
by any identifier of the customer (see `store/identities_repo.py`); `before` (a page's
`next_before`) pages back."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query

from services.notifier.api.dependencies import NotifierDep
from services.notifier.store import identities_repo, ledger_repo
from shared.http import ApiError, clamped_time, field_error


def router(admin: Any) -> APIRouter:
    api = APIRouter(tags=["messages"], dependencies=[Depends(admin)])

    @api.get("/v1/customers/{customer_id}/messages")
    async def customer_messages(
        customer_id: str,
        notifier: NotifierDep,
        before: str | None = Query(default=None, max_length=400, description="a page's `next_before`"),
        limit: int = Query(default=50, ge=1, le=500),
    ) -> dict[str, Any]:
        async with notifier.platform.unit_of_work() as uow:
            cid = await identities_repo.canonical(uow.session, customer_id)
            # A message asked for with a userId is kept under it: the customer's other ids count too.
            ids = [cid, *await identities_repo.aliases(uow.session, cid)]
            messages = await ledger_repo.history(uow.session, ids, _cursor(before), limit)
        last = messages[-1] if len(messages) == limit else None
        return {
            "customer_id": cid,
            "messages": messages,
            "next_before": f"{last['created_at'].isoformat()}|{last['message_id']}" if last else None,
        }

    return api


def _cursor(before: str | None) -> tuple[datetime, str] | None:
    """A page's `next_before`: its last message's request time (with its offset, as written) and id."""
    if before is None:
        return None
    at, _, message_id = before.partition("|")
    try:
        parsed: datetime | None = datetime.fromisoformat(at)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        # Without an offset the time could be anyone's: no page gives one.
        raise ApiError(
            400,
            "invalid_request",
            "`before` is not a page cursor",
            errors=[field_error("before", "cursor", "the next_before of a previous page")],
        )
    # Moved into the storable times (1900-2999): one before them pages nothing, one past them all.
    return clamped_time("before", parsed), message_id

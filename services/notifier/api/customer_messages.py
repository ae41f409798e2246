"""`GET /v1/customers/{customer_id}/messages` (admin token): what a customer was sent, newest first,
by any identifier of the customer (see `store/identities_repo.py`); `before` pages back."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query

from services.notifier.api.dependencies import NotifierDep
from services.notifier.store import identities_repo, ledger_repo


def router(admin: Any) -> APIRouter:
    api = APIRouter(tags=["messages"], dependencies=[Depends(admin)])

    @api.get("/v1/customers/{customer_id}/messages")
    async def customer_messages(
        customer_id: str,
        notifier: NotifierDep,
        before: datetime | None = Query(default=None, description="only messages asked for before this"),
        limit: int = Query(default=50, ge=1, le=500),
    ) -> dict[str, Any]:
        async with notifier.platform.unit_of_work() as uow:
            cid = await identities_repo.canonical(uow.session, customer_id)
            # A message asked for with a userId is kept under it: the customer's other ids count too.
            ids = [cid, *await identities_repo.aliases(uow.session, cid)]
            messages = await ledger_repo.history(uow.session, ids, before, limit)
        return {
            "customer_id": cid,
            "messages": messages,
            "next_before": messages[-1]["created_at"] if len(messages) == limit else None,
        }

    return api

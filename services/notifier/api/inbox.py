"""The in-app inbox a client app reads: `GET /v1/inbox/{customer_id}`, mark read.

A client app authenticates with the customer's inbox token (`?token=` or `X-Inbox-Token`), which its
backend obtains from `GET /v1/inbox/{customer_id}/token` with the admin token; admins may use Bearer.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request

from services.notifier.api.dependencies import NotifierDep
from services.notifier.service import Notifier
from services.notifier.store import identities_repo, in_app_repo
from shared.http import ApiError, is_admin


def router(admin: Any) -> APIRouter:
    api = APIRouter(prefix="/v1/inbox", tags=["inbox"])

    def authorize(request: Request, notifier: Notifier, customer_id: str, token: str | None) -> None:
        supplied = token or request.headers.get("X-Inbox-Token")
        if supplied and hmac.compare_digest(
            supplied.encode("utf-8", "surrogatepass"), notifier.links.inbox_token(customer_id).encode()
        ):
            return
        # Read as every admin route reads it (`is_admin`: the scheme in any case), and as the audit
        # log does.
        if is_admin(request.headers.get("Authorization"), notifier.settings.admin_token.get_secret_value()):
            return
        raise ApiError(
            401, "unauthorized", "an inbox token for this customer (or the admin token) is required"
        )

    @api.get("/{customer_id}/token", dependencies=[Depends(admin)])
    async def inbox_token(customer_id: str, notifier: NotifierDep) -> dict[str, str]:
        return {"customer_id": customer_id, "token": notifier.links.inbox_token(customer_id)}

    @api.get("/{customer_id}")
    async def list_inbox(
        customer_id: str,
        request: Request,
        notifier: NotifierDep,
        token: str | None = None,
        unread: bool = False,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> dict[str, Any]:
        authorize(request, notifier, customer_id, token)
        async with notifier.platform.unit_of_work() as uow:
            # The app knows its user by its own id; the inbox is the customer's (`identities_repo`).
            cid = await identities_repo.canonical(uow.session, customer_id)
            items = await in_app_repo.list_for(uow.session, cid, unread_only=unread, limit=limit)
        return {"customer_id": customer_id, "messages": items}

    @api.post("/{customer_id}/{item_id}/read")
    async def mark_read(
        customer_id: str,
        item_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
        request: Request,
        notifier: NotifierDep,
        token: str | None = None,
    ) -> dict[str, Any]:
        authorize(request, notifier, customer_id, token)
        async with notifier.platform.unit_of_work() as uow:
            cid = await identities_repo.canonical(uow.session, customer_id)
            found = await in_app_repo.mark_read(uow.session, cid, item_id, notifier.clock.now())
        if not found:
            raise ApiError(404, "not_found", "no such inbox message")
        return {"id": item_id, "read": True}

    return api

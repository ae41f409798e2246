"""Spam complaints (admin token): an email address whose recipient reported marketing as spam (a
provider's feedback loop: SES, SendGrid, a mailbox provider's FBL) is opted out of marketing email,
the address itself and every customer whose profile email it is. Kept as a salted hash of the
address's mailbox, so looked up and lifted by the address, never listed."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from services.notifier.api.dependencies import NotifierDep
from services.notifier.api.suppressions import first_added
from services.notifier.domain.email_addresses import RULE as MAILBOX_RULE
from services.notifier.domain.email_addresses import mailbox
from services.notifier.domain.suppression import SOURCE_NAME, lookup_keys
from services.notifier.store import consent_repo
from shared.contracts import Channel
from shared.http import ApiError, field_error

_NOT_AN_ADDRESS = f"must be an email address ({MAILBOX_RULE})"


class ComplaintImport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        pattern=SOURCE_NAME,
        description="who reported the complaints, as a short lower-case name (ses, sendgrid, gmail-fbl)",
    )
    addresses: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        min_length=1,
        max_length=1000,
        description="the email addresses complained from, as written (any case; `Ann <ann@example.com>`)",
    )


def router(admin: Any) -> APIRouter:
    api = APIRouter(tags=["complaints"], dependencies=[Depends(admin)])

    @api.post("/v1/complaints")
    async def record_complaints(body: ComplaintImport, notifier: NotifierDep) -> dict[str, Any]:
        """Opt these addresses out of marketing email, all in one transaction (up to 1,000; a bad
        address refuses the request, naming it); each customer whose profile email one is gets an
        `unsubscribed` status of their latest marketing email. An address complained about before
        keeps its first complaint. Answers, for each address given and in order, its `id` (for
        `DELETE /v1/complaints/{id}`) and whether it was new."""
        mailboxes = [mailbox(a) for a in body.addresses]
        errors = [
            field_error(f"addresses.{n}", "format", _NOT_AN_ADDRESS)
            for n, m in enumerate(mailboxes)
            if m is None
        ]
        if errors:
            raise ApiError(400, "invalid_request", "invalid addresses", errors=errors)
        given = [m for m in mailboxes if m is not None]
        found = await notifier.email_complaints(given, body.source)
        new = sum(1 for _, added in found.values() if added)
        return {
            "added": new,
            "already_opted_out": len(found) - new,
            # One entry per address given, in order.
            "complaints": [
                {"id": found[m][0], "added": first}
                for m, first in zip(
                    given, first_added(given, {m for m, (_, new) in found.items() if new}), strict=True
                )
            ],
        }

    @api.get("/v1/complaints")
    async def get_complaint(
        address: Annotated[str, Query(min_length=1, max_length=4096, description="the email address")],
        notifier: NotifierDep,
    ) -> dict[str, Any]:
        if mailbox(address) is None:
            raise ApiError(
                400,
                "invalid_request",
                "invalid address",
                errors=[field_error("address", "format", _NOT_AN_ADDRESS)],
            )
        salt = notifier.settings.privacy_salt.get_secret_value()
        found = None
        async with notifier.platform.unit_of_work() as uow:
            # Its key, and for an address written with A-labels the key such an address had before.
            for key in lookup_keys(salt, Channel.EMAIL, address, None):
                if (found := await consent_repo.get_email_address_optout(uow.session, key)) is not None:
                    break
        if found is None:
            raise ApiError(404, "not_found", "no complaint about that address")
        source, at = found
        return {"id": key, "channel": "email", "opted_out": True, "source": source, "opted_out_at": at}

    # By the entry's id, never the address: the audit log keeps each change's path and query.
    @api.delete("/v1/complaints/{complaint_id}", status_code=204)
    async def lift_complaint(complaint_id: str, notifier: NotifierDep) -> None:
        """Marketing email may go to the address again (it was reported by mistake). The customers'
        own choices stay as recorded: they opt in again through the preference page."""
        async with notifier.platform.unit_of_work() as uow:
            if not await consent_repo.remove_email_address_optout(uow.session, complaint_id):
                raise ApiError(404, "not_found", f"no complaint {complaint_id!r}")

    return api

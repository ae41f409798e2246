"""The suppression list (admin token): addresses a provider said do not exist, looked up and
removed by the address itself (only a salted hash of it is kept, so they cannot be listed)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from services.notifier.api.dependencies import NotifierDep
from services.notifier.domain.suppression import SUPPRESSIBLE, suppression_key
from services.notifier.service import Notifier
from services.notifier.store import suppressions_repo
from shared.contracts import Channel
from shared.http import ApiError, field_error

ChannelQuery = Annotated[Channel, Query(description="email, sms or push")]
AddressQuery = Annotated[
    str,
    Query(
        min_length=1,
        max_length=4096,
        description="the email address, phone number (any form; without a country code read in "
        "CLM_SMS_DEFAULT_REGION) or push token",
    ),
]


def _key(notifier: Notifier, channel: Channel, address: str) -> str:
    if channel not in SUPPRESSIBLE:
        raise ApiError(
            400,
            "invalid_request",
            "invalid channel",
            errors=[field_error("channel", "enum", "addresses are suppressed on email, sms and push only")],
        )
    settings = notifier.settings
    key = suppression_key(
        settings.privacy_salt.get_secret_value(), channel, address, settings.sms_default_region
    )
    if key is None:
        what = "a phone number CLM can send to" if channel is Channel.SMS else "an address"
        raise ApiError(
            400,
            "invalid_request",
            "invalid address",
            errors=[field_error("address", "format", f"must be {what}")],
        )
    return key


def _answer(found: suppressions_repo.Suppression) -> dict[str, Any]:
    return {
        "id": found.address_hash,
        "channel": found.channel,
        "suppressed": True,
        "reason": found.reason,
        "provider": found.provider,
        "message_id": found.message_id,
        "suppressed_at": found.suppressed_at,
    }


def router(admin: Any) -> APIRouter:
    api = APIRouter(tags=["suppressions"], dependencies=[Depends(admin)])

    @api.get("/v1/suppressions")
    async def get_suppression(
        channel: ChannelQuery, address: AddressQuery, notifier: NotifierDep
    ) -> dict[str, Any]:
        """Whether messages to this address are suppressed, since when and why; `id` names the entry
        for `DELETE /v1/suppressions/{id}`."""
        key = _key(notifier, channel, address)
        async with notifier.platform.unit_of_work() as uow:
            found = await suppressions_repo.get(uow.session, key)
        if found is None:
            raise ApiError(404, "not_found", f"the {channel.value} address is not suppressed")
        return _answer(found)

    # By the entry's id (a salted hash), never the address: the audit log keeps the path and query
    # of every change, and an address kept there would outlive the customer's erasure.
    @api.delete("/v1/suppressions/{suppression_id}", status_code=204)
    async def delete_suppression(suppression_id: str, notifier: NotifierDep) -> None:
        """Send to the address again (the mailbox was set up again, the number reassigned): messages
        claimed from now on go to it; those already suppressed stay so."""
        async with notifier.platform.unit_of_work() as uow:
            if not await suppressions_repo.remove(uow.session, suppression_id):
                raise ApiError(404, "not_found", f"no suppression {suppression_id!r}")

    return api

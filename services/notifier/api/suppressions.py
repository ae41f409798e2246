"""The suppression list (admin token): addresses a provider said do not exist, looked up and
removed by the address itself (only a salted hash of it is kept, so they cannot be listed), and
imported from another sender's list (an ESP's bounces, a platform CLM replaces)."""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from services.notifier.api.dependencies import NotifierDep
from services.notifier.delivery import ADDRESSES_SUPPRESSED
from services.notifier.domain.suppression import SOURCE_NAME, SUPPRESSIBLE, lookup_keys, suppression_key
from services.notifier.service import Notifier
from services.notifier.store import suppressions_repo
from services.notifier.store.suppressions_repo import Suppression
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


def _key_or_errors(
    notifier: Notifier, channel: Channel, address: str, at: str = ""
) -> tuple[str | None, list[dict[str, str]]]:
    """The address's key, or the errors naming the fields (under `at`, a list entry's path)."""
    if channel not in SUPPRESSIBLE:
        return None, [
            field_error(f"{at}channel", "enum", "addresses are suppressed on email, sms and push only")
        ]
    settings = notifier.settings
    key = suppression_key(
        settings.privacy_salt.get_secret_value(), channel, address, settings.sms_default_region
    )
    if key is None:
        what = "a phone number CLM can send to" if channel is Channel.SMS else "an address"
        return None, [field_error(f"{at}address", "format", f"must be {what}")]
    return key, []


def _lookup_keys(notifier: Notifier, channel: Channel, address: str) -> list[str]:
    """The keys the address's entry may be kept under (`suppression.lookup_keys`: its key, and for an
    email address written with A-labels the key such an address had before), its key first."""
    key, errors = _key_or_errors(notifier, channel, address)
    if key is None:
        raise ApiError(400, "invalid_request", f"invalid {errors[0]['field']}", errors=errors)
    settings = notifier.settings
    salt = settings.privacy_salt.get_secret_value()
    return lookup_keys(salt, channel, address, settings.sms_default_region)


def first_added(keys: Iterable[str], added: Container[str]) -> list[bool]:
    """For each key of a list: whether the request added it, true only where the list names it first
    (an address given twice is added once)."""
    seen: set[str] = set()
    flags = []
    for key in keys:
        flags.append(key in added and key not in seen)
        seen.add(key)
    return flags


class ImportedAddress(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channel: Channel = Field(description="email, sms or push")
    address: str = Field(
        min_length=1,
        max_length=4096,
        description="the email address, phone number (any form; without a country code read in "
        "CLM_SMS_DEFAULT_REGION) or push token",
    )


class SuppressionImport(BaseModel):
    """Addresses another sender found do not exist (its hard bounces), suppressed from now on."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        pattern=SOURCE_NAME,
        description="where the list comes from, as a short lower-case name (ses, sendgrid, mailchimp, "
        "manual): kept as the entry's provider, its reason `imported from <source>`",
    )
    suppressions: list[ImportedAddress] = Field(min_length=1, max_length=1000)


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
        found = None
        async with notifier.platform.unit_of_work() as uow:
            for key in _lookup_keys(notifier, channel, address):
                if (found := await suppressions_repo.get(uow.session, key)) is not None:
                    break
        if found is None:
            raise ApiError(404, "not_found", f"the {channel.value} address is not suppressed")
        return _answer(found)

    @api.post("/v1/suppressions")
    async def import_suppressions(body: SuppressionImport, notifier: NotifierDep) -> dict[str, Any]:
        """Suppress up to 1,000 addresses at once, all or none (a bad entry refuses the request,
        naming it). An address already suppressed keeps its entry (the first bounce is kept). Answers
        each entry's `id` (for `DELETE /v1/suppressions/{id}`) and whether it was added now."""
        keys: list[str] = []
        errors: list[dict[str, str]] = []
        for n, entry in enumerate(body.suppressions):
            key, wrong = _key_or_errors(notifier, entry.channel, entry.address, f"suppressions.{n}.")
            errors += wrong
            keys.append(key or "")
        if errors:
            raise ApiError(400, "invalid_request", "invalid suppressions", errors=errors)
        now = notifier.clock.now()
        reason = f"imported from {body.source}"
        rows = [
            Suppression(key, entry.channel.value, reason, body.source, None, now)
            for key, entry in zip(keys, body.suppressions, strict=True)
        ]
        async with notifier.platform.unit_of_work() as uow:
            added = await suppressions_repo.add(uow.session, rows)
        for channel in added.values():  # committed
            ADDRESSES_SUPPRESSED.labels(channel).inc()
        return {
            "added": len(added),
            "already_suppressed": len(set(keys)) - len(added),
            "suppressions": [
                {"id": key, "channel": row.channel, "added": first}
                for key, row, first in zip(keys, rows, first_added(keys, added), strict=True)
            ],
        }

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

"""clm.profiles.v1 -> the contact projection (addresses, locale, timezone, traits) and the customer's
identifiers: any of them resolves to the customer in the notifier's APIs, and what was kept under one
before it was known to be this customer's (choices, inbox) becomes the customer's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from services.notifier.domain.composition import ContactView, contact_from_traits
from services.notifier.store import (
    consent_repo,
    contacts_repo,
    erasure_repo,
    identities_repo,
    in_app_repo,
    recommendations_repo,
)
from shared.contracts import ProfileChanged, ProfileChangeKind
from shared.db.unit_of_work import UnitOfWork
from shared.kafka import Consumed

CONSUMER = "notifier.profiles"


class ProfilesConsumer:
    def __init__(
        self,
        unit_of_work: Callable[[], UnitOfWork],
        sms_default_region: str | None = None,
        privacy_salt: str | None = None,
    ) -> None:
        self.unit_of_work = unit_of_work
        self.sms_default_region = sms_default_region
        self.privacy_salt = privacy_salt

    async def handle(self, batch: Sequence[Consumed[ProfileChanged]]) -> None:
        async with self.unit_of_work() as uow:
            fresh = await uow.claim_many(CONSUMER, [item.event_id for item in batch])
            upserts: list[tuple[ContactView, datetime]] = []
            lists: list[tuple[str, dict[str, Any], datetime]] = []  # issue 9: recommendation lists
            for item in batch:
                if item.event_id not in fresh:
                    continue
                change = item.value
                if change.kind is ProfileChangeKind.ERASED:
                    # Write what we have so far, then forget this customer.
                    await contacts_repo.upsert(uow.session, upserts)
                    upserts = []
                    if self.privacy_salt is not None:  # its addresses, before they go (see erasure_repo)
                        await erasure_repo.tombstone_addresses(
                            uow.session,
                            self.privacy_salt,
                            [change.customer_id],
                            self.sms_default_region,
                            change.event_id,
                            change.occurred_at,
                        )
                    await contacts_repo.delete(uow.session, [change.customer_id])
                    await identities_repo.forget(uow.session, [change.customer_id])
                    await in_app_repo.delete_for(uow.session, [change.customer_id])
                    await recommendations_repo.upsert(uow.session, lists)
                    lists = []
                    await recommendations_repo.delete(uow.session, [change.customer_id])
                    continue
                if change.kind is ProfileChangeKind.IDENTITY_MERGED and change.merged_ids:
                    await contacts_repo.delete(uow.session, change.merged_ids)
                    await recommendations_repo.delete(uow.session, change.merged_ids)
                identifiers = [i for ids in change.identities.values() for i in ids] + change.merged_ids
                moved = await identities_repo.link(
                    uow.session, change.customer_id, identifiers, change.occurred_at
                )
                await consent_repo.move_choices(uow.session, moved, change.customer_id, change.occurred_at)
                await in_app_repo.move(uow.session, moved, change.customer_id)
                if change.recommendations is not None:
                    lists.append((change.customer_id, dict(change.recommendations), change.occurred_at))
                contact = contact_from_traits(
                    change.customer_id, dict(change.traits), self.sms_default_region
                )
                upserts.append((contact, change.occurred_at))
            await contacts_repo.upsert(uow.session, upserts)
            await recommendations_repo.upsert(uow.session, lists)

"""clm.privacy.v1: erase or export what the journey engine holds on a customer, and answer.

Erasure deletes the projection (traits, identities, segment memberships), the customer's journey
instances with their timers and enrolments, and the message log; it keeps salted-hash tombstones so
later events carrying the customer's ids start no journey (`drop_erased_events`).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.journey_engine.store import privacy as privacy_store
from services.journey_engine.store import projection
from shared.clock import Clock
from shared.contracts.events import CustomerEvent, PrivacyAction, PrivacyRequest
from shared.contracts.topics import PRIVACY
from shared.db.unit_of_work import UnitOfWork
from shared.kafka.consumer import Consumed
from shared.privacy import (
    add_tombstones,
    answer,
    answers,
    erased_identities,
    erasure_gate,
    hashed_identities,
)
from shared.runtime import Platform

CONSUMER = "journey_engine.privacy"
SERVICE = "journey_engine"


class PrivacyConsumer:
    def __init__(self, platform: Platform, clock: Clock) -> None:
        self.platform = platform
        self.clock = clock
        self.salt = platform.settings.privacy_salt.get_secret_value()

    async def handle(self, batch: Sequence[Consumed[PrivacyRequest]]) -> None:
        async with self.platform.unit_of_work() as uow:
            fresh = await uow.claim_many(CONSUMER, [c.event_id for c in batch])
            now = self.clock.now()
            for c in batch:
                request = c.value
                if c.event_id not in fresh:
                    continue
                fresh.discard(c.event_id)  # a duplicate within the batch is answered once
                identities = [request.customer_id, *request.identities]
                if request.action is PrivacyAction.ERASE_REQUESTED:
                    await erasure_gate(uow.session, exclusive=True)
                    cids = await privacy_store.customer_ids(uow.session, identities)
                    deleted = await privacy_store.erase(uow.session, cids)
                    await add_tombstones(uow.session, self.salt, identities, request.request_id, now)
                    replies = [
                        answer(request, SERVICE, PrivacyAction.ERASE_COMPLETED, now, {"deleted": deleted})
                    ]
                elif request.action is PrivacyAction.EXPORT_REQUESTED:
                    cids = await privacy_store.customer_ids(uow.session, identities)
                    data = await privacy_store.export(uow.session, cids)
                    # Instances and the message log of a heavy customer pass Kafka's ~1 MB: in chunks.
                    replies = answers(
                        request,
                        SERVICE,
                        PrivacyAction.EXPORT_PART,
                        now,
                        data,
                        max_message_bytes=self.platform.settings.kafka_max_message_bytes,
                    )
                else:
                    continue  # answers, ours and other services'
                for reply in replies:
                    uow.emit(PRIVACY.name, request.customer_id, reply, correlation_id=c.correlation_id)


async def drop_erased_events(
    uow: UnitOfWork, salt: str, items: list[tuple[str, CustomerEvent]]
) -> tuple[list[tuple[str, CustomerEvent]], dict[str, str]]:
    """Events of erased customers start no journey (their claims stay: never retried). An alias's
    `previousId` counts too: `alias(previousId=<erased>, userId=<new>)` must not tie the erased
    person to a new id. Returns the events kept and, read in the same round trip, the customer each
    of the events' ids resolves to (`projection.resolve`, for `JourneyEngine.on_events`)."""
    ids = {i for _, e in items for i in _identifiers(e)}
    await erasure_gate(uow.session, exclusive=False)
    by_hash = hashed_identities(salt, ids)
    known, tombstones = await projection.resolve_reading_tombstones(uow.session, ids, list(by_hash))
    erased = erased_identities(by_hash, tombstones)
    if not erased:
        return items, known
    return [(eid, e) for eid, e in items if erased.isdisjoint(_identifiers(e))], known


def _identifiers(event: CustomerEvent) -> set[str]:
    return {i for i in (event.user_id, event.anonymous_id, event.previous_id) if i}

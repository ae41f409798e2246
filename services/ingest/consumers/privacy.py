"""clm.privacy.v1: ingest confirms erasures and answers exports.

Ingest keeps no personal data: events go straight to Kafka, and the dedupe table holds messageIds
(opaque client-chosen ids, not linked to any customer) for the dedupe window only. So an erasure
deletes nothing here, but ingest still confirms it (the receipt lists every service), and an export
part says what ingest holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shared.clock import Clock
from shared.contracts import PRIVACY, PrivacyAction, PrivacyRequest
from shared.db.unit_of_work import UnitOfWork
from shared.kafka import Consumed
from shared.privacy import answer, answers

CONSUMER = "ingest.privacy"
SERVICE = "ingest"
EXPORT_PART = {
    "holds": [],
    "note": "ingest keeps no customer data: events are forwarded to Kafka; only messageIds, not "
    "linked to a customer, are kept for the dedupe window",
}


class PrivacyConsumer:
    def __init__(self, unit_of_work: Callable[[], UnitOfWork], clock: Clock) -> None:
        self.unit_of_work = unit_of_work
        self.clock = clock

    async def handle(self, batch: Sequence[Consumed[PrivacyRequest]]) -> None:
        async with self.unit_of_work() as uow:
            fresh = await uow.claim_many(CONSUMER, [item.event_id for item in batch])
            now = self.clock.now()
            for item in batch:
                request = item.value
                if item.event_id not in fresh:
                    continue
                fresh.discard(item.event_id)  # a duplicate within the batch is answered once
                if request.action is PrivacyAction.ERASE_REQUESTED:
                    replies = [answer(request, SERVICE, PrivacyAction.ERASE_COMPLETED, now, {"deleted": {}})]
                elif request.action is PrivacyAction.EXPORT_REQUESTED:
                    replies = answers(request, SERVICE, PrivacyAction.EXPORT_PART, now, dict(EXPORT_PART))
                else:
                    continue  # answers, ours and other services'
                for reply in replies:
                    uow.emit(PRIVACY.name, request.customer_id, reply, correlation_id=item.correlation_id)

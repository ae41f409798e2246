"""clm.privacy.v1 back into the segmenter: every service's `erase_completed` and `export_part`.

Recorded per (request, service, action), so the receipt and the export endpoint read them from the
table. An answer sent in chunks (too large for one Kafka message), or to a request sent in parts (too
many identifiers for one), is kept piece by piece and recorded, merged, when its last piece arrives:
until then the service is still missing from the receipt or the export.
Requests (ours) are skipped: the segmenter erases and exports its own data in the API call.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.segmenter.store import privacy as privacy_store
from shared.contracts.events import PrivacyAction, PrivacyRequest
from shared.db.unit_of_work import UnitOfWork
from shared.kafka.consumer import Consumed
from shared.runtime import Platform

CONSUMER = "segmenter.privacy"
ANSWERS = frozenset({PrivacyAction.ERASE_COMPLETED, PrivacyAction.EXPORT_PART})


class PrivacyAnswersConsumer:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    async def __call__(self, batch: Sequence[Consumed[PrivacyRequest]]) -> None:
        async with self.platform.unit_of_work() as uow:
            await self.handle(uow, batch)

    async def handle(self, uow: UnitOfWork, batch: Sequence[Consumed[PrivacyRequest]]) -> None:
        fresh = await uow.claim_many(CONSUMER, [c.event_id for c in batch])
        for c in batch:
            msg = c.value
            if c.event_id not in fresh or msg.action not in ANSWERS or not msg.service:
                continue
            if msg.chunks == 1 and msg.parts == 1:
                await privacy_store.record_answer(
                    uow.session, msg.request_id, msg.service, msg.action.value, msg.data, msg.occurred_at
                )
            else:  # one of several messages: recorded once all are here (`shared.privacy`)
                await privacy_store.record_piece(
                    uow.session,
                    msg.request_id,
                    msg.service,
                    msg.action.value,
                    msg.data,
                    msg.occurred_at,
                    chunk=msg.chunk,
                    chunks=msg.chunks,
                    part=msg.part,
                    parts=msg.parts,
                )

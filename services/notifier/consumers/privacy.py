"""clm.privacy.v1: erase or export what the notifier holds on a customer, and answer on the same topic."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from services.notifier.store import erasure_repo, privacy_repo
from shared.clock import Clock
from shared.contracts import PRIVACY, PrivacyAction, PrivacyRequest
from shared.db.unit_of_work import UnitOfWork
from shared.kafka import Consumed
from shared.privacy import MAX_MESSAGE_BYTES, add_tombstones, answer, answers, erasure_gate

CONSUMER = "notifier.privacy"
SERVICE = "notifier"


class PrivacyConsumer:
    def __init__(
        self,
        unit_of_work: Callable[[], UnitOfWork],
        clock: Clock,
        privacy_salt: str | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        sms_default_region: str | None = None,
    ) -> None:
        self.unit_of_work = unit_of_work
        self.clock = clock
        self.privacy_salt = privacy_salt
        self.sms_default_region = sms_default_region
        self.max_message_bytes = max_message_bytes  # `kafka_max_message_bytes`: no chunk is parked

    async def handle(self, batch: Sequence[Consumed[PrivacyRequest]]) -> None:
        async with self.unit_of_work() as uow:
            if any(item.value.action is PrivacyAction.ERASE_REQUESTED for item in batch):
                # Waits for message requests being queued; later ones see the tombstones.
                await erasure_gate(uow.session, exclusive=True)
            fresh = await uow.claim_many(CONSUMER, [item.event_id for item in batch])
            for item in batch:
                request = item.value
                if item.event_id not in fresh:
                    continue
                fresh.discard(item.event_id)  # a duplicate within the batch is answered once
                ids = [request.customer_id, *request.identities]
                now = self.clock.now()
                if request.action is PrivacyAction.ERASE_REQUESTED:
                    if self.privacy_salt is not None:
                        # Later requests for these ids and addresses are suppressed (`erased`).
                        await erasure_repo.tombstone_addresses(
                            uow.session,
                            self.privacy_salt,
                            ids,
                            self.sms_default_region,
                            request.request_id,
                            now,
                        )
                        await add_tombstones(uow.session, self.privacy_salt, ids, request.request_id, now)
                    await privacy_repo.erase(uow.session, ids, now)
                    replies = [answer(request, SERVICE, PrivacyAction.ERASE_COMPLETED, now)]
                elif request.action is PrivacyAction.EXPORT_REQUESTED:
                    data = await privacy_repo.export(uow.session, ids)
                    # A send ledger of thousands of messages passes Kafka's ~1 MB: sent in chunks.
                    replies = answers(
                        request,
                        SERVICE,
                        PrivacyAction.EXPORT_PART,
                        now,
                        data,
                        max_message_bytes=self.max_message_bytes,
                    )
                else:
                    continue  # answers (ours and other services')
                for reply in replies:
                    uow.emit(PRIVACY.name, request.customer_id, reply, correlation_id=item.correlation_id)

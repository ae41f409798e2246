"""clm.privacy.v1: erase or export what the notifier holds on a customer, and answer on the same topic."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from services.notifier.store import contacts_repo, privacy_repo
from services.notifier.store.erasure_repo import address_forms
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
    ) -> None:
        self.unit_of_work = unit_of_work
        self.clock = clock
        self.privacy_salt = privacy_salt
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
                    # Their addresses as the notifier holds them, in the forms requests are checked in
                    # (read before the contacts go).
                    addresses = [
                        form
                        for contact in (await contacts_repo.get_many(uow.session, set(ids))).values()
                        for form in address_forms(contact.email, contact.phone_e164, None)
                    ]
                    await privacy_repo.erase(uow.session, ids, now)
                    if self.privacy_salt is not None:
                        # Later requests for these ids are suppressed (`erased`), never sent.
                        await add_tombstones(
                            uow.session, self.privacy_salt, [*ids, *addresses], request.request_id, now
                        )
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

"""clm.messages.requested.v1 -> the send ledger (and `queued`), then the delivery loop takes over."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from services.notifier.domain.composition import status_of
from services.notifier.store import ledger_repo
from shared.clock import Clock
from shared.contracts import MESSAGE_STATUS, MessageRequested, MessageStatusKind
from shared.db.unit_of_work import UnitOfWork
from shared.kafka import Consumed

CONSUMER = "notifier.message_requests"


async def enqueue(uow: UnitOfWork, requests: Sequence[MessageRequested], clock: Clock) -> set[str]:
    """Ledger rows for requests never seen before, each with a `queued` status. Returns the new ids."""
    now = clock.now()
    new = await ledger_repo.insert_new(uow.session, requests, now)
    for request in requests:
        if request.message_id in new:
            uow.emit(
                MESSAGE_STATUS.name, request.customer_id, status_of(request, MessageStatusKind.QUEUED, now)
            )
    return new


class MessageRequestsConsumer:
    def __init__(
        self, unit_of_work: Callable[[], UnitOfWork], clock: Clock, on_enqueued: Callable[[], None]
    ) -> None:
        self.unit_of_work = unit_of_work
        self.clock = clock
        self.on_enqueued = on_enqueued

    async def handle(self, batch: Sequence[Consumed[MessageRequested]]) -> None:
        async with self.unit_of_work() as uow:
            fresh = await uow.claim_many(CONSUMER, [item.event_id for item in batch])
            # The ledger's primary key dedupes too: the same message id under another event id is no new send.
            new = await enqueue(uow, [item.value for item in batch if item.event_id in fresh], self.clock)
        if new:
            self.on_enqueued()

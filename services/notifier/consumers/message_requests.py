"""clm.messages.requested.v1 -> the send ledger (and `queued`), then the delivery loop takes over."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from services.notifier.delivery import DeliveryWorker
from services.notifier.domain.composition import status_of
from services.notifier.store import erasure_repo, ledger_repo
from shared.clock import Clock
from shared.contracts import MESSAGE_STATUS, MessageRequested, MessageStatusKind
from shared.db.unit_of_work import UnitOfWork
from shared.kafka import Consumed
from shared.privacy import erased_identities, erasure_gate, hashed_identities

CONSUMER = "notifier.message_requests"


async def enqueue(
    uow: UnitOfWork,
    requests: Sequence[MessageRequested],
    clock: Clock,
    privacy_salt: str | None = None,
    correlations: Mapping[str, str] | None = None,
    sms_default_region: str | None = None,
) -> set[str]:
    """Ledger rows for requests never seen before, each with a `queued` status. Returns the new ids.

    With `privacy_salt`, a request for an erased customer is recorded `suppressed` (reason `erased`)
    instead, emptied of personal data, and never sent. `correlations` (message id -> the request's
    correlation id) are kept in the ledger and passed on by every status of the message."""
    now = clock.now()
    correlations = correlations or {}
    erased: set[str] = set()
    if privacy_salt is None:
        new = await ledger_repo.insert_new(uow.session, requests, now, correlations)
    else:
        if requests:
            # Ordered against erasures (which hold it exclusive): either this commits first and the
            # erasure scrubs what it wrote, or it sees the erasure's tombstones. Without it a request
            # queued during an erasure escaped both, and was sent.
            await erasure_gate(uow.session, exclusive=False)
        # The tombstones are read by the insert's own statement, after the gate: one round trip.
        by_hash = hashed_identities(
            privacy_salt,
            {i for r in requests for i in erasure_repo.request_identities(r, sms_default_region)},
        )
        new, tombstones = await ledger_repo.insert_new_reading_tombstones(
            uow.session, requests, now, correlations, list(by_hash)
        )
        fresh = [r for r in requests if r.message_id in new]
        for_erased = erasure_repo.addressed_to_erased(
            fresh, erased_identities(by_hash, tombstones), sms_default_region
        )
        erased = await erasure_repo.suppress(uow.session, [r.message_id for r in for_erased], now)
    for request in requests:
        if request.message_id in erased:
            status = status_of(request, MessageStatusKind.SUPPRESSED, now, reason=erasure_repo.ERASED_REASON)
        elif request.message_id in new:
            status = status_of(request, MessageStatusKind.QUEUED, now)
        else:
            continue
        uow.emit(
            MESSAGE_STATUS.name,
            request.customer_id,
            status,
            correlation_id=correlations.get(request.message_id),
        )
    return new


class MessageRequestsConsumer:
    def __init__(
        self,
        unit_of_work: Callable[[], UnitOfWork],
        clock: Clock,
        worker: DeliveryWorker,
        privacy_salt: str | None = None,
    ) -> None:
        self.unit_of_work = unit_of_work
        self.clock = clock
        self.worker = worker
        self.privacy_salt = privacy_salt

    async def handle(self, batch: Sequence[Consumed[MessageRequested]]) -> None:
        claimed = None
        async with self.unit_of_work() as uow:
            fresh = await uow.claim_many(CONSUMER, [item.event_id for item in batch], erasure_gate=True)
            # The ledger's primary key dedupes too: the same message id under another event id is no new send.
            new = await enqueue(
                uow,
                [item.value for item in batch if item.event_id in fresh],
                self.clock,
                self.privacy_salt,
                {i.value.message_id: i.correlation_id for i in batch if i.correlation_id},
                self.worker.settings.sms_default_region,
            )
            if new:  # claimed in the same commit, sent right after it (the loops do it when busy)
                claimed = await self.worker.claim_within(uow.session, new)
        if claimed is not None:
            self.worker.hand_off(claimed)
        if new and (claimed is None or len(claimed[0]) < len(new)):
            self.worker.wake()  # rows not handed off go with the delivery loops

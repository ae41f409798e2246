"""The `clm.messages.status.v1` handler: per-customer engagement (messages received, opened, clicked).

One unit of work per batch: claim the status ids (duplicates drop out), one upsert of the
(customer, message) rows; offsets are committed by the runner only after that.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.segmenter.store import lifecycle as lifecycle_store
from shared.contracts.events import MessageStatus
from shared.kafka.consumer import Consumed
from shared.privacy import erased_among, erasure_gate
from shared.runtime import Platform

CONSUMER = "segmenter.message-status"


class MessageStatusHandler:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    async def __call__(self, batch: Sequence[Consumed[MessageStatus]]) -> None:
        async with self.platform.unit_of_work() as uow:
            fresh = await uow.claim_many(CONSUMER, [c.value.status_id for c in batch], erasure_gate=True)
            rows = []
            for c in batch:
                s = c.value
                if s.status_id not in fresh:
                    continue
                fresh.discard(s.status_id)  # a duplicate inside the batch counts once
                rows.append(
                    lifecycle_store.MessageStatusRow(
                        s.customer_id,
                        s.message_id,
                        s.channel.value,
                        s.template_id,
                        s.status.value,
                        s.occurred_at,
                    )
                )
            # Statuses of an erased customer (e.g. `suppressed: erased`) must not recreate rows about them.
            await erasure_gate(uow.session, exclusive=False)
            salt = self.platform.settings.privacy_salt.get_secret_value()
            erased = await erased_among(uow.session, salt, {r.customer_id for r in rows})
            rows = [r for r in rows if r.customer_id not in erased]
            await lifecycle_store.save_message_statuses(uow.session, rows)

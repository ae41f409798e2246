"""The in-app inbox "provider": stores the message for the customer's app to fetch."""

from __future__ import annotations

from collections.abc import Callable

from services.notifier.channels.base import Delivery, SendResult
from services.notifier.store import identities_repo, in_app_repo
from shared.clock import Clock
from shared.db.unit_of_work import UnitOfWork


class InAppProvider:
    # A repeated call for the same message stores nothing twice (the inbox row is keyed by the
    # message id): after an unexpected error it may be retried (`router._outcome_unknown`).
    idempotent = True

    def __init__(self, name: str, unit_of_work: Callable[[], UnitOfWork], clock: Clock) -> None:
        self.name = name
        self.unit_of_work = unit_of_work
        self.clock = clock

    async def send(self, delivery: Delivery) -> SendResult:
        async with self.unit_of_work() as uow:
            # Under the customer's id, which the inbox reads: a request may name any of their ids.
            customer_id = await identities_repo.resolve_for_write(uow.session, delivery.customer_id)
            await in_app_repo.store_message(
                uow.session,
                customer_id=customer_id,
                message_id=delivery.message_id,
                title=delivery.parts.get("title", ""),
                body=delivery.parts.get("body", ""),
                now=self.clock.now(),
            )
        return SendResult(True, delivered=True, provider_message_id=delivery.message_id)

    async def close(self) -> None:
        return None

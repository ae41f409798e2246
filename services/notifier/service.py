"""The notifier's parts wired together, and the operations both the API and consumers use."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from services.notifier.channels.router import ProviderRouter
from services.notifier.consumers.message_requests import enqueue
from services.notifier.delivery import DeliveryWorker
from services.notifier.domain.composition import status_of
from services.notifier.domain.consent import ALL_TOPICS
from services.notifier.domain.signing import MessageLinks
from services.notifier.domain.templates import TemplateRenderer
from services.notifier.settings import NotifierSettings
from services.notifier.store import consent_repo, ledger_repo
from shared.clock import Clock
from shared.contracts import MESSAGE_STATUS, MessageRequested, MessageStatusKind
from shared.runtime import Platform


@dataclass
class Notifier:
    settings: NotifierSettings
    platform: Platform
    clock: Clock
    renderer: TemplateRenderer
    links: MessageLinks
    router: ProviderRouter
    worker: DeliveryWorker

    async def submit(self, requests: list[MessageRequested]) -> set[str]:
        """Queue requests made through the API (same ledger path as Kafka requests)."""
        async with self.platform.unit_of_work() as uow:
            new = await enqueue(uow, requests, self.clock, self.settings.privacy_salt.get_secret_value())
        if new:
            self.worker.wake()
        return new

    async def unsubscribe(
        self, customer_id: str, channel: str, topic: str | None, message_id: str | None, *, source: str
    ) -> bool:
        """Opt out of `topic` (or all marketing) on `channel`; one `unsubscribed` status per message."""
        now = self.clock.now()
        async with self.platform.unit_of_work() as uow:
            changed = await consent_repo.record_choices(
                uow.session,
                customer_id,
                [(topic or ALL_TOPICS, channel, False)],
                source=source,
                now=now,
                message_id=message_id,
            )
            if message_id is not None:
                entry = await ledger_repo.get(uow.session, message_id)
                if entry is not None and await ledger_repo.record_engagement(
                    uow.session, message_id, "unsubscribed", topic or ALL_TOPICS, now
                ):
                    uow.emit(
                        MESSAGE_STATUS.name,
                        entry.request.customer_id,
                        status_of(
                            entry.request,
                            MessageStatusKind.UNSUBSCRIBED,
                            now,
                            reason=f"{source}: {topic or 'all marketing'} on {channel}",
                        ),
                    )
        return bool(changed)

    async def record_open(self, message_id: str) -> bool:
        now = self.clock.now()
        async with self.platform.unit_of_work() as uow:
            entry = await ledger_repo.get(uow.session, message_id)
            if entry is None or not await ledger_repo.record_engagement(
                uow.session, message_id, "opened", "", now
            ):
                return False
            uow.emit(
                MESSAGE_STATUS.name,
                entry.request.customer_id,
                status_of(entry.request, MessageStatusKind.OPENED, now),
            )
        return True

    async def record_click(self, message_id: str, url: str) -> bool:
        now = self.clock.now()
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        async with self.platform.unit_of_work() as uow:
            entry = await ledger_repo.get(uow.session, message_id)
            if entry is None or not await ledger_repo.record_engagement(
                uow.session, message_id, "clicked", digest, now
            ):
                return False
            uow.emit(
                MESSAGE_STATUS.name,
                entry.request.customer_id,
                status_of(
                    entry.request,
                    MessageStatusKind.CLICKED,
                    now,
                    url=url,
                    status_id=f"{message_id}:clicked:{digest}",
                ),
            )
        return True

    async def record_provider_report(
        self, provider_message_id: str, kind: MessageStatusKind, reason: str | None
    ) -> bool:
        """A provider's later delivery report (e.g. Twilio status callback): one status per outcome."""
        now = self.clock.now()
        async with self.platform.unit_of_work() as uow:
            entry = await ledger_repo.by_provider_message_id(uow.session, provider_message_id)
            if entry is None or not await ledger_repo.record_engagement(
                uow.session, entry.message_id, "provider_report", kind.value, now
            ):
                return False
            uow.emit(
                MESSAGE_STATUS.name,
                entry.request.customer_id,
                status_of(entry.request, kind, now, reason=reason, provider=entry.provider),
            )
        return True

"""The notifier's parts wired together, and the operations both the API and consumers use."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

from prometheus_client import Counter, Gauge

from services.notifier.channels.http_providers import TWILIO_STOPPED
from services.notifier.channels.router import ProviderRouter
from services.notifier.consumers.message_requests import enqueue
from services.notifier.delivery import ADDRESSES_SUPPRESSED, DeliveryWorker
from services.notifier.domain.composition import status_of
from services.notifier.domain.consent import ALL_TOPICS, opted_out, phone_key
from services.notifier.domain.email_addresses import mailboxes
from services.notifier.domain.phone_numbers import normalized
from services.notifier.domain.signing import MessageLinks
from services.notifier.domain.suppression import address_key, suppression_key
from services.notifier.domain.templates import TemplateRenderer
from services.notifier.settings import NotifierSettings
from services.notifier.store import (
    consent_repo,
    contacts_repo,
    identities_repo,
    ledger_repo,
    provider_reports_repo,
    suppressions_repo,
)
from shared.clock import Clock
from shared.contracts import MESSAGE_STATUS, Channel, MessageRequested, MessageStatus, MessageStatusKind
from shared.db.unit_of_work import UnitOfWork
from shared.privacy import erased_among, erasure_gate, erasure_gate_within, try_erasure_gate
from shared.runtime import Platform

log = logging.getLogger(__name__)


# Not recorded rather than wait for the erasure gate (`Notifier._erased`, wait=False).
ENGAGEMENTS_DROPPED = Counter(
    "clm_notifier_engagements_dropped_total",
    "Opens and clicks not recorded because an erasure held or awaited the gate",
    ["kind"],
)
# A delivery report is never dropped so: kept, and applied once the erasure is done.
REPORTS_DEFERRED = Counter(
    "clm_notifier_provider_reports_deferred_total",
    "Provider delivery reports kept for later because an erasure held or awaited the gate",
)
DEFERRED_REPORTS_SETTLED = Counter(
    "clm_notifier_deferred_reports_settled_total",
    "Kept delivery reports taken by the loop: applied, duplicate (applied before), erased (their "
    "customer's: nothing written), unknown_message (no ledger row has the provider's id any more), "
    "failed (the try raised: kept, tried again later), dropped (given up after the last try: deleted)",
    ["outcome"],
)
# Alert on it: reports a failing loop (or an erasure holding the gate) keeps from being applied.
DEFERRED_REPORTS_OLDEST_AGE = Gauge(
    "clm_notifier_deferred_reports_oldest_age_seconds",
    "Age of the oldest delivery report kept during an erasure and not applied yet (0: none), as of "
    "the loop's last pass",
)
# Kept reports settled per transaction of the loop.
DEFERRED_REPORTS_BATCH = 100
# A kept report's tries that failed wait this long at most before the next.
DEFERRED_REPORTS_RETRY_MAX_S = 900.0

ReportOutcome = Literal["applied", "duplicate", "erased", "unknown_message", "deferred"]
DeferredOutcome = Literal["applied", "duplicate", "erased", "unknown_message", "failed", "dropped"]


@dataclass(frozen=True)
class AppliedReport:
    """A delivery report's engagement written: the status to emit and the gone address's suppression
    to add."""

    status: MessageStatus
    suppression: suppressions_repo.Suppression | None


def _address_forms(identifier: str) -> list[str]:
    """An identifier that is an email address, in the forms erasures tombstone addresses in
    (`erasure_repo.tombstone_addresses`: its mailbox; `mailboxes`: also as keyed before A-labels were
    decoded); nothing for any other."""
    return mailboxes(identifier) if "@" in identifier else []


class ErasureUnderWay(Exception):
    """The erasure gate was not free at once (an erasure holds it or waits for it), or for an admin
    preferences write within its short wait: the write (an open, a click, the admin's choices) was
    not made rather than wait longer. (Delivery reports are kept for later instead.)"""


@dataclass
class Notifier:
    settings: NotifierSettings
    platform: Platform
    clock: Clock
    renderer: TemplateRenderer
    links: MessageLinks
    router: ProviderRouter
    worker: DeliveryWorker
    # How long the admin's preference writes wait for the erasure gate (`customer_erased`), and how
    # many may wait at once, each holding a pooled connection meanwhile: a quarter of the pool
    # (`db_pool_size`), at least one. The others only try it.
    admin_gate_wait_ms: int = 2000
    admin_gate_slots: asyncio.Semaphore = field(init=False, repr=False)
    # Wakes the loop that applies kept delivery reports (`run_deferred_reports`): one token at most.
    _report_wakeups: asyncio.Queue[None] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.admin_gate_slots = asyncio.Semaphore(max(1, self.settings.db_pool_size // 4))
        self._report_wakeups = asyncio.Queue(maxsize=1)

    async def submit(self, requests: list[MessageRequested]) -> set[str]:
        """Queue requests made through the API (same ledger path as Kafka requests)."""
        async with self.platform.unit_of_work() as uow:
            new = await enqueue(
                uow,
                requests,
                self.clock,
                self.settings.privacy_salt.get_secret_value(),
                sms_default_region=self.settings.sms_default_region,
            )
        if new:
            self.worker.wake()
        return new

    async def unsubscribe(
        self, customer_id: str, channel: str, topic: str | None, message_id: str | None, *, source: str
    ) -> bool:
        """Opt out of `topic` (or all marketing) on `channel`; one `unsubscribed` status per message.
        Nothing for an erased customer (`_erased`)."""
        now = self.clock.now()
        async with self.platform.unit_of_work() as uow:
            if await self._erased(uow, customer_id):
                return False
            changed = await consent_repo.record_choices(
                uow.session,
                customer_id,
                [(topic or ALL_TOPICS, channel, False)],
                source=source,
                now=now,
                message_id=message_id,
            )
            if message_id is not None:
                await self._unsubscribed(uow, message_id, topic or ALL_TOPICS, channel, source, now)
        return bool(changed)

    async def sms_keyword(self, phone: str, subscribed: bool, *, source: str) -> None:
        """An inbound SMS STOP (`subscribed` False) or START from `phone`, in one transaction: the
        number itself (`sms_address_optouts`: marketing SMS to it stop, whoever CLM thinks owns it,
        a request's override recipient included) and every customer whose profile phone it is (all
        SMS marketing, with an `unsubscribed` status of their latest marketing SMS on STOP)."""
        now = self.clock.now()
        # Twilio's `From` is E.164 already; read like any number, in case a gateway formats it.
        e164 = normalized(phone, self.settings.sms_default_region)
        if e164 is None:
            log.warning("inbound SMS keyword from a value that is no phone number; ignored")
            return
        salt = self.settings.privacy_salt.get_secret_value()
        key = phone_key(salt, e164)
        async with self.platform.unit_of_work() as uow:
            # Writes under customer ids: an erasure committing meanwhile must not be undone.
            await erasure_gate(uow.session, exclusive=False)
            await consent_repo.set_sms_address_optout(
                uow.session, key, not subscribed, source=source, now=now
            )
            if subscribed:
                # Twilio refused sends to the number as STOPped (21610): the START lifts that too.
                suppressed = suppression_key(salt, Channel.SMS, e164, None)
                if suppressed is not None:
                    await suppressions_repo.remove(
                        uow.session, suppressed, reason=f"twilio error {TWILIO_STOPPED}"
                    )
            for customer_id in sorted(await contacts_repo.find_by_phone(uow.session, e164)):
                if subscribed:
                    await consent_repo.record_choices(
                        uow.session, customer_id, [(ALL_TOPICS, "sms", True)], source=source, now=now
                    )
                else:
                    await self._opt_out_of_all_marketing(uow, customer_id, "sms", source, now)

    async def email_complaints(self, mailboxes: Sequence[str], source: str) -> dict[str, tuple[str, bool]]:
        """Spam complaints about these mailboxes (`domain.email_addresses`; as a provider's feedback
        loop reports them), in one transaction: each address itself (`email_address_optouts`:
        marketing email to it stops, whoever CLM thinks owns it, a request's override recipient
        included) and every customer whose profile email it is (all email marketing, with an
        `unsubscribed` status of their latest marketing email that went out). A repeated complaint
        changes nothing. Returns, by mailbox, its key and whether this complaint was new."""
        now = self.clock.now()
        salt = self.settings.privacy_salt.get_secret_value()
        keys = {m: address_key(salt, Channel.EMAIL, m) for m in dict.fromkeys(mailboxes)}
        reason = f"complaint ({source})"
        async with self.platform.unit_of_work() as uow:
            # Writes under customer ids: an erasure committing meanwhile must not be undone.
            await erasure_gate(uow.session, exclusive=False)
            new = await consent_repo.add_email_address_optouts(
                uow.session, list(keys.values()), source=source, now=now
            )
            owners = await contacts_repo.find_by_emails(uow.session, [m for m, k in keys.items() if k in new])
            for customer_id in sorted({c for found in owners.values() for c in found}):
                latest = await self._opt_out_of_all_marketing(uow, customer_id, "email", reason, now)
                if latest is not None:  # the complaint rate: mailbox providers judge a sender by it
                    await ledger_repo.record_engagement(uow.session, latest, "complained", source, now)
        return {m: (k, k in new) for m, k in keys.items()}

    async def _opt_out_of_all_marketing(
        self, uow: UnitOfWork, customer_id: str, channel: str, source: str, now: datetime
    ) -> str | None:
        """All marketing on `channel` off for the customer (an SMS STOP, a spam complaint): a consent
        ledger entry and, when that changed their choices, an `unsubscribed` status of their latest
        marketing message on the channel that went out (what they answered; never a receipt or a
        one-time code), whichever of their identifiers it was asked for under (a userId, a merged-away
        profile's id: `identities_repo`). Returns that message's id, if any."""
        ids = [customer_id, *await identities_repo.aliases(uow.session, customer_id)]
        latest = await ledger_repo.latest_marketing_delivered(uow.session, ids, channel)
        message_id = latest.message_id if latest else None
        changed = await consent_repo.record_choices(
            uow.session,
            customer_id,
            [(ALL_TOPICS, channel, False)],
            source=source,
            now=now,
            message_id=message_id,
        )
        if changed and message_id is not None:
            await self._unsubscribed(uow, message_id, ALL_TOPICS, channel, source, now)
        return message_id

    async def save_preferences(
        self, customer_id: str, channel: Channel, wanted: set[str], message_id: str | None
    ) -> list[str]:
        """The hosted preference page's form: `wanted` are the topics ticked, every other topic offered
        on `channel` is off. Each topic this opts the customer out of (marketing on it reached them
        before the save and no longer does) is an `unsubscribed` status of the message whose link
        opened the page, in the same transaction as the choices, as the one-click link's; a save that
        changes nothing, or only opts in, emits nothing; nor does one of an erased customer
        (`_erased`). Returns the topics opted out of."""
        now = self.clock.now()
        source = "preference_page"
        async with self.platform.unit_of_work() as uow:
            if await self._erased(uow, customer_id):
                return []
            topics = await consent_repo.offered_on(uow.session, channel.value)
            changes = [(t.id, channel.value, t.id in wanted) for t in topics]
            # A topic ticked lifts "unsubscribe from all" (its marketing could not reach them
            # otherwise); an id the page does not offer (deleted meanwhile, a hand-made form) does not.
            if any(t.id in wanted for t in topics):
                changes.append((ALL_TOPICS, channel.value, True))
            before, changed = await consent_repo.apply_choices(
                uow.session, customer_id, changes, source=source, now=now, message_id=message_id
            )
            after = {**before, **{(t, ch): s for t, ch, s in changed}}
            left = opted_out(topics, channel, before, after)
            if message_id is not None:
                for topic in left:
                    await self._unsubscribed(uow, message_id, topic, channel.value, source, now)
        return left

    async def customer_erased(self, uow: UnitOfWork, customer_id: str) -> bool:
        """For an admin write under a customer (`PUT /v1/customers/{id}/preferences`): whether
        `customer_id` (any identifier of the customer; one that is an email address also as its
        mailbox, the form erasures tombstone addresses in: `Eve@Example.com` is the erased
        `eve@example.com`), or the customer it resolves to, was erased.

        Under the erasure gate until `uow` commits, so a write the caller then makes is either deleted
        by an erasure committing after it or, once that erasure committed, refused here; and then
        under the identifier's write lock (`identities_repo.resolve_for_write`, gate first, as the
        consent writes take them), so the customer checked is the one the write goes to: a link of
        the identifier committed between an unlocked read and the write (a stale profile event
        linking an alias to the erased customer) sent the write to a customer never checked.
        Waits for the gate `admin_gate_wait_ms` at most, if one of `admin_gate_slots` is free (else
        only tries it), and raises `ErasureUnderWay` when it is not had: each waiting write holds a
        pooled connection, and a CRM sync's burst during an erasure ran the pool dry."""
        # No slot free: no wait. (Taking a free one never suspends: nothing queues for a slot.)
        slotted = not self.admin_gate_slots.locked()
        if slotted:
            await self.admin_gate_slots.acquire()
        try:
            held = await (
                erasure_gate_within(uow.session, self.admin_gate_wait_ms)
                if slotted
                else try_erasure_gate(uow.session)
            )
        finally:
            if slotted:
                self.admin_gate_slots.release()
        if not held:
            raise ErasureUnderWay
        canonical = await identities_repo.resolve_for_write(uow.session, customer_id)
        salt = self.settings.privacy_salt.get_secret_value()
        return bool(
            await erased_among(uow.session, salt, [customer_id, canonical, *_address_forms(customer_id)])
        )

    async def _erased(self, uow: UnitOfWork, customer_id: str, *, wait: bool = True) -> bool:
        """Whether `customer_id` (a signed link's, a message's: any identifier of the customer) was
        erased, under the erasure gate until `uow` commits. A message outlives its customer's erasure
        in their mailbox: its links (unsubscribe, the open pixel, clicks) and its provider's late
        reports must write no choices, ledger entries, engagements or statuses under the erased id
        (they recreated what the erasure deleted). An erasure committing meanwhile waits for this
        write, and then deletes it too.

        `wait=False` for telemetry (opens, clicks), frequent and for any customer: raises
        `ErasureUnderWay` unless the gate is free at once (`try_erasure_gate`), instead of queueing
        behind an erasure with a pooled connection held. Consent writes (unsubscribe, the preference
        page) wait: they are rare and must not be lost. (Delivery reports are kept for later
        instead: `record_provider_report`.)"""
        if wait:
            await erasure_gate(uow.session, exclusive=False)
        elif not await try_erasure_gate(uow.session):
            raise ErasureUnderWay
        salt = self.settings.privacy_salt.get_secret_value()
        return bool(await erased_among(uow.session, salt, [customer_id]))

    async def _unsubscribed(
        self, uow: UnitOfWork, message_id: str, topic: str, channel: str, source: str, now: datetime
    ) -> None:
        """One `unsubscribed` status per message and topic (`*`: all marketing on the channel) left
        through its links, whichever way (one-click, the preference page, unsubscribe-all, SMS STOP):
        recorded as an engagement (the reports count it), so a repeat emits nothing. Its id names the
        topic: opting out of a second topic through the same message is another status, not a
        duplicate that consumers' inboxes would drop."""
        entry = await ledger_repo.get(uow.session, message_id)
        if entry is None or not await ledger_repo.record_engagement(
            uow.session, message_id, "unsubscribed", topic, now
        ):
            return
        uow.emit(
            MESSAGE_STATUS.name,
            entry.request.customer_id,
            status_of(
                entry.request,
                MessageStatusKind.UNSUBSCRIBED,
                now,
                reason=f"{source}: {'all marketing' if topic == ALL_TOPICS else topic} on {channel}",
                status_id=f"{message_id}:unsubscribed:{topic}",
            ),
            correlation_id=entry.correlation_id,
        )

    async def record_open(self, message_id: str) -> bool:
        """The open, once per message; not recorded (False) during an erasure (`_erased`, wait=False):
        the pixel answers at once either way."""
        try:
            return await self._record_open(message_id)
        except ErasureUnderWay:
            ENGAGEMENTS_DROPPED.labels("opened").inc()
            return False

    async def _record_open(self, message_id: str) -> bool:
        now = self.clock.now()
        async with self.platform.unit_of_work() as uow:
            entry = await ledger_repo.get(uow.session, message_id)
            if (
                entry is None
                or await self._erased(uow, entry.request.customer_id, wait=False)
                or not await ledger_repo.record_engagement(uow.session, message_id, "opened", "", now)
            ):
                return False
            uow.emit(
                MESSAGE_STATUS.name,
                entry.request.customer_id,
                status_of(entry.request, MessageStatusKind.OPENED, now),
                correlation_id=entry.correlation_id,
            )
        return True

    async def record_click(self, message_id: str, url: str) -> bool:
        """The click, once per message and URL; not recorded (False) during an erasure (`_erased`,
        wait=False): the redirect goes out at once either way."""
        try:
            return await self._record_click(message_id, url)
        except ErasureUnderWay:
            ENGAGEMENTS_DROPPED.labels("clicked").inc()
            return False

    async def _record_click(self, message_id: str, url: str) -> bool:
        now = self.clock.now()
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        async with self.platform.unit_of_work() as uow:
            entry = await ledger_repo.get(uow.session, message_id)
            if (
                entry is None
                or await self._erased(uow, entry.request.customer_id, wait=False)
                or not await ledger_repo.record_engagement(uow.session, message_id, "clicked", digest, now)
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
                correlation_id=entry.correlation_id,
            )
        return True

    async def record_provider_report(
        self,
        provider_message_id: str,
        kind: MessageStatusKind,
        reason: str | None,
        *,
        gone_address: tuple[str, str] | None = None,
    ) -> ReportOutcome:
        """A provider's later delivery report (e.g. Twilio status callback): one status per outcome.
        `gone_address`: the address the report says does not exist (the report's own, which is where
        the message went) and the report's code for it, suppressed in the same transaction.

        Never lost to an erasure, never waited for: Twilio retries a status callback only on a failed
        connection by default, so a report refused during an erasure (a 503) was lost, and one
        waiting for the gate held a pooled connection. When the gate is not free at once (an erasure
        holds it or waits for it), the report is kept (`deferred_provider_reports`, as little as
        applying it needs: the provider's id, the outcome, its codes, the gone address as its
        suppression's salted hash) in this same short transaction, and `run_deferred_reports`
        applies it once the erasure is done, under the gate, with the time it came; or writes
        nothing and deletes it, its customer being erased."""
        now = self.clock.now()
        added: dict[str, str] = {}
        stored = False
        async with self.platform.unit_of_work() as uow:
            entry = await ledger_repo.by_provider_message_id(uow.session, provider_message_id)
            if entry is None:
                return "unknown_message"
            report = provider_reports_repo.ProviderReport(provider_message_id, kind, reason, now)
            if gone_address is not None:
                address, why = gone_address
                key = suppression_key(
                    self.settings.privacy_salt.get_secret_value(),
                    entry.request.channel,
                    address,
                    self.settings.sms_default_region,
                )
                if key is not None:
                    report = replace(report, gone_address_hash=key, gone_reason=why)
            outcome: ReportOutcome
            if not await try_erasure_gate(uow.session):
                # Not under the gate: the row names no customer; the loop checks the tombstones.
                stored = await provider_reports_repo.store(uow.session, report)
                outcome = "deferred"
            elif await self._erased(uow, entry.request.customer_id):
                outcome = "erased"
            else:
                applied = await self._apply_report(uow, entry, report)
                if applied is None:
                    outcome = "duplicate"
                else:
                    if applied.suppression is not None:
                        added = await suppressions_repo.add(uow.session, [applied.suppression])
                    self._emit_report(uow, entry, applied)
                    outcome = "applied"
        if stored:  # not one that was kept already
            REPORTS_DEFERRED.inc()
            with contextlib.suppress(asyncio.QueueFull):
                self._report_wakeups.put_nowait(None)
        for channel in added.values():  # committed
            ADDRESSES_SUPPRESSED.labels(channel).inc()
        return outcome

    async def _apply_report(
        self, uow: UnitOfWork, entry: ledger_repo.LedgerEntry, report: provider_reports_repo.ProviderReport
    ) -> AppliedReport | None:
        """Under the erasure gate, the customer checked not erased: the report's engagement, once per
        message and outcome (None for a repeat: it writes nothing), and the status and the gone
        address's suppression that go with it, for the caller to emit and add (after this
        succeeded: a try that fails leaves nothing behind)."""
        if not await ledger_repo.record_engagement(
            uow.session, entry.message_id, "provider_report", report.kind.value, report.received_at
        ):
            return None
        suppression = None
        if report.gone_address_hash is not None and report.gone_reason is not None:
            suppression = suppressions_repo.Suppression(
                report.gone_address_hash,
                entry.request.channel.value,
                report.gone_reason,
                entry.provider,
                entry.message_id,
                report.received_at,
            )
        status = status_of(
            entry.request, report.kind, report.received_at, reason=report.reason, provider=entry.provider
        )
        return AppliedReport(status, suppression)

    @staticmethod
    def _emit_report(uow: UnitOfWork, entry: ledger_repo.LedgerEntry, applied: AppliedReport) -> None:
        uow.emit(
            MESSAGE_STATUS.name,
            entry.request.customer_id,
            applied.status,
            correlation_id=entry.correlation_id,
        )

    async def apply_deferred_reports(self, limit: int = DEFERRED_REPORTS_BATCH) -> int:
        """One pass over the delivery reports kept during an erasure: the `limit` due first (another
        replica's pass skips them), applied or dropped and deleted in one transaction. Waits for the
        erasure gate (a background loop: one pooled connection waits, not one per report), so an
        erasure under way is done first and its tombstones are seen. Returns the reports taken.

        Each report is applied in a savepoint: one whose try raises (whatever the cause) is rolled
        back alone, left nothing queued (its status is emitted only after its savepoint), and is
        tried again later (`deferred_reports_retry_s`, doubling), so it does not hold back the
        others; after `deferred_reports_max_attempts` tries it is deleted, logged as an error and
        counted (`dropped`). The batch's suppressions are added together at the end, in one
        (sorted) order, and its engagements in message order: added report by report, in the order
        the reports were taken, two replicas' passes could each wait for the other's."""
        now = self.clock.now()
        outcomes: list[DeferredOutcome] = []
        added: dict[str, str] = {}
        async with self.platform.unit_of_work() as uow:
            oldest, due = await provider_reports_repo.waiting(uow.session, now)
            DEFERRED_REPORTS_OLDEST_AGE.set(
                0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
            )
            if not due:
                return 0  # the common case: neither the gate nor a lock taken
            await erasure_gate(uow.session, exclusive=False)
            now = self.clock.now()  # after the erasure it may have waited for
            reports = await provider_reports_repo.take(uow.session, limit, now)
            entries = await ledger_repo.by_provider_message_ids(
                uow.session, {r.provider_message_id for r in reports}
            )
            salt = self.settings.privacy_salt.get_secret_value()
            erased = await erased_among(
                uow.session, salt, sorted({e.request.customer_id for e in entries.values()})
            )
            settled: list[int] = []
            suppressions: list[suppressions_repo.Suppression] = []
            for report in sorted(reports, key=lambda r: (r.provider_message_id, r.kind.value, r.id or 0)):
                if report.id is None:  # taken rows have theirs
                    continue
                entry = entries.get(report.provider_message_id)
                if entry is None:  # pruned from the ledger meanwhile (retention): nothing to report on
                    outcomes.append("unknown_message")
                elif entry.request.customer_id in erased:
                    # Nothing, not even the address's suppression (it would name their message).
                    outcomes.append("erased")
                else:
                    try:
                        async with uow.session.begin_nested():
                            applied = await self._apply_report(uow, entry, report)
                    except Exception:
                        outcomes.append(await self._report_failed(uow, report, now))
                        continue
                    if applied is None:
                        outcomes.append("duplicate")
                    else:
                        if applied.suppression is not None:
                            suppressions.append(applied.suppression)
                        self._emit_report(uow, entry, applied)
                        outcomes.append("applied")
                settled.append(report.id)
            added = await suppressions_repo.add(uow.session, suppressions)
            await provider_reports_repo.delete(uow.session, settled)
        for outcome in outcomes:
            DEFERRED_REPORTS_SETTLED.labels(outcome).inc()
        for channel in added.values():  # committed
            ADDRESSES_SUPPRESSED.labels(channel).inc()
        return len(outcomes)

    async def _report_failed(
        self, uow: UnitOfWork, report: provider_reports_repo.ProviderReport, now: datetime
    ) -> DeferredOutcome:
        """A kept report's try raised (its savepoint rolled back): tried again later, or dropped
        after `deferred_reports_max_attempts` tries. Called from the `except` block: logs the error."""
        assert report.id is not None
        tries = report.attempts + 1
        if tries >= self.settings.deferred_reports_max_attempts:
            log.error(
                "kept delivery report %s (%s on provider message %s) failed %d times: dropped",
                report.id,
                report.kind.value,
                report.provider_message_id,
                tries,
                exc_info=True,
            )
            await provider_reports_repo.delete(uow.session, [report.id])
            return "dropped"
        delay = min(self.settings.deferred_reports_retry_s * 2 ** (tries - 1), DEFERRED_REPORTS_RETRY_MAX_S)
        log.warning(
            "kept delivery report %s (%s on provider message %s) failed (try %d of %d): again in %.0f s",
            report.id,
            report.kind.value,
            report.provider_message_id,
            tries,
            self.settings.deferred_reports_max_attempts,
            delay,
            exc_info=True,
        )
        await provider_reports_repo.failed(uow.session, report.id, now + timedelta(seconds=delay))
        return "failed"

    async def run_deferred_reports(self) -> None:
        """The loop applying kept delivery reports: woken by each one kept here, and every
        `deferred_reports_poll_s` for those another replica or a stopped process kept, and those
        whose try failed once they are due again."""
        while True:
            try:
                while await self.apply_deferred_reports() >= DEFERRED_REPORTS_BATCH:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                # The whole pass (the database, not one report: those fail alone, above).
                log.exception("applying kept delivery reports failed; retrying")
                await asyncio.sleep(1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report_wakeups.get(), self.settings.deferred_reports_poll_s)

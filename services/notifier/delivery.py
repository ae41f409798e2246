"""The delivery loop: claims due rows of the send ledger, decides, sends, records the outcome.

Per row: consent (checked now, at send time) -> template render -> provider (with failover) ->
outcome. A pass claims a batch (`pending` -> `claimed`, with a claim token, committed). Right before
its provider call (after the rate limiter) each row moves `claimed` -> `sending` in a committed write
that only succeeds while the claim is still this worker's; its outcome is committed as soon as the
call returns. So a crash leaves ambiguous only the rows whose provider call was in flight: after
`sending_stale_after_s` they are resolved as `unknown` (status `failed`), never resent blindly (at
most once). Rows only claimed are handed back to `pending` after `claim_stale_after_s` and sent once.
The per-row writes are coalesced (`WriteCoalescer`): what queues up during one commit goes in the next.

Transient failures are rescheduled in the ledger (exponential backoff, full jitter) instead of
holding up the Kafka partition; what exhausts its attempts is dead-lettered with status `failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.notifier.channels.base import Delivery, SendAborted, SendResult
from services.notifier.channels.router import ProviderRouter
from services.notifier.domain import consent
from services.notifier.domain.composition import (
    ContactView,
    compose_email,
    describe,
    locale_of,
    recipient_address,
    status_of,
    template_data,
)
from services.notifier.domain.consent import SubscriptionTopic, phone_key
from services.notifier.domain.email_addresses import RULE as MAILBOX_RULE
from services.notifier.domain.email_addresses import mailbox
from services.notifier.domain.phone_numbers import InvalidPhoneNumber, normalized, to_e164
from services.notifier.domain.retry_policy import Failure, RetryPolicy
from services.notifier.domain.signing import MessageLinks
from services.notifier.domain.suppression import SUPPRESSIBLE, lookup_keys, suppression_key
from services.notifier.domain.templates import RenderError, TemplateDefinition, TemplateRenderer
from services.notifier.settings import NotifierSettings
from services.notifier.store import (
    ledger_repo,
    send_context_repo,
    suppressions_repo,
)
from services.notifier.store.ledger_repo import LedgerEntry, Outcome
from services.notifier.store.suppressions_repo import Suppression
from services.notifier.write_coalescer import WriteCoalescer
from shared.clock import Clock
from shared.contracts import (
    MESSAGE_REQUESTS,
    MESSAGE_STATUS,
    Channel,
    Headers,
    MessageCategory,
    MessageRequested,
    MessageStatus,
    MessageStatusKind,
)
from shared.contracts.events import message_data_problems
from shared.db.engine import driver_autocommit
from shared.db.unit_of_work import AnnouncedChanges, UnitOfWork
from shared.observability.metrics import DLQ_MESSAGES

log = logging.getLogger(__name__)

ADDRESSES_SUPPRESSED = Counter(
    "clm_notifier_addresses_suppressed_total",
    "Addresses suppressed because a provider said they do not exist (hard bounces), by channel",
    ["channel"],
)


@dataclass
class _Context:
    templates: dict[str, TemplateDefinition]
    contacts: dict[str, ContactView]
    topics: dict[str, SubscriptionTopic]
    choices: dict[str, dict[tuple[str, str], bool]]
    # The keys of the addresses these marketing messages go to that opted out: numbers that sent STOP
    # (and no START since; `phone_key`), email addresses a spam complaint named (`address_key`).
    opted_out: set[str] = field(default_factory=set)
    # The `suppression_key`s of the addresses these messages go to that a provider refused for good
    # (`address_suppressions`), with the provider's codes.
    suppressed: dict[str, str] = field(default_factory=dict)


@dataclass
class AttemptResult:
    outcome: Outcome
    statuses: list[MessageStatus] = field(default_factory=list)
    dead_letter_reason: str | None = None
    dead_letter: MessageRequested | None = None
    correlation_id: str | None = None  # the ledger row's: its statuses pass it on
    # The address the provider said does not exist: suppressed with the outcome.
    suppress: Suppression | None = None


class ClaimLost(SendAborted):
    """The row is no longer this worker's claim (handed back as stale, erased...): do not send it."""


@dataclass(frozen=True)
class Prepared:
    """A request ready to send, or the reason it must not be."""

    delivery: Delivery | None
    status: MessageStatusKind | None = None
    reason: str | None = None
    # Worth another try later: the customer's profile (and so their address) may still be on its way.
    retry: bool = False


class DeliveryWorker:
    def __init__(
        self,
        settings: NotifierSettings,
        unit_of_work: Callable[[], UnitOfWork],
        engine: AsyncEngine,
        router: ProviderRouter,
        renderer: TemplateRenderer,
        links: MessageLinks,
        clock: Clock,
        rng: random.Random | None = None,
        notify_relay: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.unit_of_work = unit_of_work
        self.engine = engine
        # Wakes the outbox relay after an outcome's statuses commit outside a unit of work.
        self.notify_relay = notify_relay
        self.router = router
        self.renderer = renderer
        self.links = links
        self.clock = clock
        self.rng = rng or random.Random()
        self.policy = RetryPolicy(settings.send_max_attempts, settings.retry_base_s, settings.retry_max_s)
        # At most one wake-up token waits: each wakes one loop (not all of them to race for the same
        # rows); one arriving while every loop is busy is taken by the first to finish.
        self._wakeups: asyncio.Queue[None] = asyncio.Queue(maxsize=1)
        self._handed_off: set[asyncio.Task[None]] = set()
        self.passes = 0
        self._stale_checked_at = -1e9  # a (re)started process looks for stale rows at once
        self._sending_writes: WriteCoalescer[tuple[str, str], bool] = WriteCoalescer(self._mark_sending)
        self._outcome_writes: WriteCoalescer[AttemptResult, None] = WriteCoalescer(self._record_until_done)
        configs = settings.provider_configs()
        email_route = settings.channel_providers.get("email") or ["smtp"]
        self.email_sender = (
            configs[email_route[0]].sender if email_route[0] in configs else "noreply@clm.local"
        )

    async def claim_within(
        self, session: AsyncSession, message_ids: Collection[str]
    ) -> tuple[list[LedgerEntry], _Context] | None:
        """Inside the transaction that queued new requests: claim those rows and read what their sends
        need, so `hand_off` sends them right after the commit, without a wake-up, a delivery pass and
        its own transaction (at most `delivery_batch_size` of them). None when enough is in flight
        already (or nothing was claimed): the delivery loops take the rows then, as they take other
        due rows (retries)."""
        if len(self._handed_off) >= self.settings.delivery_loops:
            return None
        token = uuid.uuid4().hex
        ids = sorted(message_ids)[: self.settings.delivery_batch_size]
        entries = await ledger_repo.claim_new(session, ids, self.clock.now(), token)
        if not entries:
            return None
        return entries, await self._read_context(session, entries)

    async def _claim(self, session: AsyncSession) -> tuple[list[LedgerEntry], _Context] | None:
        """Claim a batch of due rows under a fresh token and read what their sends need."""
        token = uuid.uuid4().hex
        entries = await ledger_repo.claim_due(
            session, self.clock.now(), self.settings.delivery_batch_size, token
        )
        if not entries:
            return None
        return entries, await self._read_context(session, entries)

    def hand_off(self, claimed: tuple[list[LedgerEntry], _Context]) -> None:
        """Send rows `claim_within` claimed, once their transaction has committed."""
        task = asyncio.create_task(self._deliver_handed_off(*claimed), name="delivery-hand-off")
        self._handed_off.add(task)
        task.add_done_callback(self._handed_off.discard)

    async def _deliver_handed_off(self, entries: list[LedgerEntry], context: _Context) -> None:
        self.passes += 1
        try:
            await self.deliver(entries, context)
        except Exception:
            # `deliver` handed the unsent rows back: the loops send them.
            log.exception("delivery of handed-off rows failed; left to the delivery loops")
            self.wake()

    async def finish_handed_off(self, timeout_s: float = 20.0) -> None:
        """On shutdown, after the consumers stopped: let hand-offs finish (cancelled after `timeout_s`;
        rows not yet sending are handed back, as in a delivery loop)."""
        if not self._handed_off:
            return
        _, pending = await asyncio.wait(set(self._handed_off), timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def wake(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._wakeups.put_nowait(None)

    async def run(self) -> None:
        """One delivery loop; the app runs several so a slow batch never leaves providers idle."""
        while True:
            try:
                await self.resolve_stale()
                # A full batch may leave more due rows; a partial one took all there were (rows that
                # come later bring a wake-up token).
                while await self.run_once() >= self.settings.delivery_batch_size:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("delivery pass failed; retrying")
                await asyncio.sleep(1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeups.get(), self.settings.delivery_poll_interval_s)

    async def run_once(self) -> int:
        """One pass: claim a batch (committed), then per row: `sending` (committed) -> provider ->
        outcome (committed), rows concurrently. Returns the rows claimed."""
        # The claim and what the sends need are read in one transaction (one commit, not two).
        async with self.unit_of_work() as uow:
            claimed = await self._claim(uow.session)
        if claimed is None:
            return 0
        self.passes += 1
        entries, context = claimed
        await self.deliver(entries, context)
        return len(entries)

    async def deliver(self, entries: Sequence[LedgerEntry], context: _Context | None = None) -> None:
        """Send claimed rows (each only while its claim still holds) and record each outcome."""
        try:
            if context is None:
                context = await self._load_context(entries)
            await asyncio.gather(*(self._deliver(entry, context) for entry in entries))
        except BaseException:
            # Rows still `claimed` never reached a provider: hand them back now rather than after
            # `claim_stale_after_s` (those already `sending` or recorded do not match any more).
            with contextlib.suppress(Exception):
                await asyncio.shield(self._hand_back(entries))
            raise

    async def _deliver(self, entry: LedgerEntry, context: _Context) -> None:
        try:
            result = await self._attempt_safely(entry, context)
        except ClaimLost:
            log.info(
                "claim lost before sending; left to its new owner", extra={"message_id": entry.message_id}
            )
            return
        result.correlation_id = entry.correlation_id
        await self._outcome_writes.submit(result)

    async def _hand_back(self, entries: Sequence[LedgerEntry]) -> None:
        async with self.unit_of_work() as uow:
            await ledger_repo.hand_back(
                uow.session, [(e.message_id, e.claim_token or "") for e in entries], self.clock.now()
            )

    async def _before_provider_call(self, entry: LedgerEntry) -> None:
        """Commit `claimed` -> `sending`; from here on a crash makes the outcome unknown."""
        try:
            owned = await self._sending_writes.submit((entry.message_id, entry.claim_token or ""))
        except Exception as exc:
            # Unknown whether it committed: not sending is the safe side (the stale check resolves
            # the row: handed back if still `claimed`, `unknown` if it became `sending`).
            log.warning(
                "marking a row sending failed", extra={"message_id": entry.message_id, "error": repr(exc)}
            )
            raise ClaimLost(entry.message_id) from exc
        if not owned:
            raise ClaimLost(entry.message_id)

    async def _mark_sending(self, claims: Sequence[tuple[str, str]]) -> list[bool]:
        # One statement, committed on its own: a round trip per coalesced write instead of three.
        async with driver_autocommit(self.engine) as conn:
            owned = await ledger_repo.mark_sending(conn, claims, self.clock.now())
        return [message_id in owned for message_id, _ in claims]

    async def _attempt_safely(self, entry: LedgerEntry, ctx: _Context) -> AttemptResult:
        try:
            return await self._attempt(entry, ctx)
        except ClaimLost:
            raise
        except Exception as exc:
            # Raised before any provider call (the router turns provider errors into results):
            # a bug or bad data for this one message; it fails alone, with the reason.
            log.exception("preparing a message failed", extra={"message_id": entry.message_id})
            reason = f"internal error: {type(exc).__name__}: {exc}"[:500]
            return AttemptResult(
                Outcome(
                    entry.message_id, "failed", entry.attempts, reason=reason, claim_token=entry.claim_token
                ),
                [status_of(entry.request, MessageStatusKind.FAILED, self.clock.now(), reason=reason)],
            )

    async def _record_until_done(self, results: Sequence[AttemptResult]) -> list[None]:
        """Providers were called: the outcome must be written, so a database blip is waited out
        (if the process dies meanwhile, the rows resolve as `unknown`, never resent)."""
        delay = 0.5
        while True:
            try:
                await self._record(results)
                return [None] * len(results)
            except Exception as exc:
                log.warning(
                    "recording outcomes failed; retrying", extra={"error": repr(exc), "retry_in_s": delay}
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _stale_check_every_s(self) -> float:
        return max(
            0.05, min(10.0, self.settings.claim_stale_after_s / 2, self.settings.sending_stale_after_s / 2)
        )

    async def resolve_stale(self, *, every_s: float | None = None) -> None:
        # A cheap guard: stale rows are rare (a crashed process), no need to look on every pass.
        every_s = self._stale_check_every_s() if every_s is None else every_s
        if time.monotonic() - self._stale_checked_at < every_s:
            return
        self._stale_checked_at = time.monotonic()
        now = self.clock.now()
        async with self.unit_of_work() as uow:
            handed_back = await ledger_repo.hand_back_stale_claims(
                uow.session, now - timedelta(seconds=self.settings.claim_stale_after_s), now
            )
        if handed_back:
            log.warning("stale claims handed back (never sent)", extra={"count": handed_back})
            self.wake()
        async with self.unit_of_work() as uow:
            stale = await ledger_repo.stale_sending(
                uow.session, now - timedelta(seconds=self.settings.sending_stale_after_s)
            )
            reason = (
                "outcome unknown: the process stopped during the provider call; not resent (at most once)"
            )
            recorded = await ledger_repo.record_outcomes(
                uow.session,
                [
                    Outcome(e.message_id, "unknown", e.attempts, reason=reason, claim_token=e.claim_token)
                    for e in stale
                ],
                now,
            )
            for e in stale:
                if e.message_id in recorded:
                    failed = status_of(e.request, MessageStatusKind.FAILED, now, reason=reason)
                    self._emit_status(uow, failed, e.correlation_id)
        if stale:
            log.warning("stale sends resolved as unknown", extra={"count": len(stale)})

    async def _load_context(self, entries: Sequence[LedgerEntry]) -> _Context:
        async with self.unit_of_work() as uow:
            return await self._read_context(uow.session, entries)

    async def _read_context(self, session: AsyncSession, entries: Sequence[LedgerEntry]) -> _Context:
        requests = [e.request for e in entries]
        read = await send_context_repo.read(
            session,
            {r.customer_id for r in requests},
            {r.template_id for r in requests},
            {r.subscription_topic for r in requests if r.subscription_topic},
        )
        # The address each marketing SMS or email would go to (its override recipient or the
        # profile's): a STOP from that number, a complaint about that address, suppresses it, whoever
        # CLM thinks the customer is.
        stop_keys = {k for r in requests for k in self._optout_keys(r, read.contacts.get(r.customer_id))}
        suppression_keys = {
            k for r in requests for k in self._suppression_keys(r, read.contacts.get(r.customer_id))
        }
        suppressed, stopped = await suppressions_repo.blocked(session, suppression_keys, stop_keys)
        return _Context(
            templates=read.templates,
            contacts=read.contacts,
            topics=read.topics,
            choices=read.choices,
            opted_out=stopped,
            suppressed=suppressed,
        )

    def _suppression_keys(self, request: MessageRequested, contact: ContactView | None) -> list[str]:
        """The keys a suppression of the address a message would go to may be kept under
        (`suppression.lookup_keys`: its `suppression_key`, and for an email address written with
        A-labels the key such an address had before); none for a channel whose addresses are never
        suppressed."""
        if request.channel not in SUPPRESSIBLE:
            return []
        address = recipient_address(request, contact)
        if not address:
            return []
        salt = self.settings.privacy_salt.get_secret_value()
        return lookup_keys(salt, request.channel, address, self.settings.sms_default_region)

    def _optout_keys(self, request: MessageRequested, contact: ContactView | None) -> list[str]:
        """The keys an opt-out is kept under of a marketing SMS's recipient number (`phone_key`) or a
        marketing email's address (`address_key`, as `_suppression_keys`); none for any other
        message."""
        if request.category is not MessageCategory.MARKETING or request.channel not in (
            Channel.SMS,
            Channel.EMAIL,
        ):
            return []
        address = recipient_address(request, contact)
        if not address:
            return []
        salt = self.settings.privacy_salt.get_secret_value()
        if request.channel is Channel.EMAIL:
            return lookup_keys(salt, Channel.EMAIL, address, None)
        e164 = normalized(address, self.settings.sms_default_region)
        return [phone_key(salt, e164)] if e164 else []

    def prepare(
        self,
        request: MessageRequested,
        template: TemplateDefinition | None,
        contact: ContactView | None,
        topic: SubscriptionTopic | None,
        choices: dict[tuple[str, str], bool],
        opted_out: Collection[str] = frozenset(),
        suppressed: Mapping[str, str] | None = None,
    ) -> Prepared:
        """`opted_out`: the keys of marketing addresses that opted out (`_Context.opted_out`);
        `suppressed`: the `suppression_key`s of addresses a provider refused for good, with its codes
        (`_Context.suppressed`)."""
        decision = consent.decide(
            request.category, request.channel, request.subscription_topic, topic, choices
        )
        if not decision.allowed:
            return Prepared(None, MessageStatusKind.SUPPRESSED, decision.reason)
        if any(key in opted_out for key in self._optout_keys(request, contact)):
            reason = (
                consent.SMS_NUMBER_OPTED_OUT
                if request.channel is Channel.SMS
                else consent.EMAIL_ADDRESS_OPTED_OUT
            )
            return Prepared(None, MessageStatusKind.SUPPRESSED, reason)
        if template is None:
            return Prepared(None, MessageStatusKind.FAILED, f"unknown template {request.template_id!r}")
        if template.channel is not request.channel:
            return Prepared(
                None,
                MessageStatusKind.FAILED,
                f"template {template.id!r} is for {template.channel.value}, not {request.channel.value}",
            )
        problems = message_data_problems(request.data)
        if problems:  # no profile or retry can fix the request's own data
            return Prepared(None, MessageStatusKind.FAILED, f"invalid template data: {describe(problems)}")
        address = recipient_address(request, contact)
        if not address:
            # An event-triggered send can overtake the customer's profile on clm.profiles.v1 (a welcome
            # mail for a sign-up whose identify with the email is a moment behind, while an earlier
            # profile without it is known): retry on the usual schedule instead of failing at once,
            # for a known customer only while the request is young.
            young = self.clock.now() - request.requested_at < timedelta(seconds=self.settings.address_wait_s)
            return Prepared(
                None,
                MessageStatusKind.FAILED,
                f"no {request.channel.value} address for the customer",
                retry=contact is None or young,
            )
        if request.channel is Channel.SMS:
            # The provider gets the number the STOP check used: one form however it was written.
            try:
                address = to_e164(address, self.settings.sms_default_region)
            except InvalidPhoneNumber as exc:
                return Prepared(None, MessageStatusKind.FAILED, f"no sms address for the customer: {exc}")
        if request.channel is Channel.EMAIL and mailbox(address) is None:
            # Bounces, complaints and erasures key an address by its mailbox: none, no check could
            # hold (the SMTP client would still send to the text as written).
            return Prepared(
                None,
                MessageStatusKind.FAILED,
                f"no email address for the customer: not a mailbox ({MAILBOX_RULE})",
            )
        if suppressed and (
            why := next(
                (suppressed[k] for k in self._suppression_keys(request, contact) if k in suppressed), None
            )
        ):
            return Prepared(
                None,
                MessageStatusKind.SUPPRESSED,
                f"the {request.channel.value} address is suppressed: a provider refused it before "
                f"({why}; see /v1/suppressions)",
            )
        try:
            rendered = self.renderer.render(
                template, locale_of(request, contact), template_data(request, contact, self.links, address)
            )
        except RenderError as exc:
            # Without a contact the template may lack the traits it names: wait for the profile
            # like a missing address does. Any other template error (an unknown filter, a value a
            # filter cannot take), or a known customer's, fails at once: no later try can fix it.
            return Prepared(
                None,
                MessageStatusKind.FAILED,
                f"template error: {exc}",
                retry=contact is None and exc.missing_data,
            )
        email = None
        if request.channel is Channel.EMAIL:
            email = compose_email(
                request, rendered, self.links, sender=self.email_sender, to=address, now=self.clock.now()
            )
        return Prepared(
            Delivery(request.message_id, request.customer_id, request.channel, address, rendered.parts, email)
        )

    async def _attempt(self, entry: LedgerEntry, ctx: _Context) -> AttemptResult:
        request = entry.request
        prepared = self.prepare(
            request,
            ctx.templates.get(request.template_id),
            ctx.contacts.get(request.customer_id),
            ctx.topics.get(request.subscription_topic) if request.subscription_topic else None,
            ctx.choices.get(request.customer_id, {}),
            ctx.opted_out,
            ctx.suppressed,
        )
        now = self.clock.now()
        if prepared.delivery is None and prepared.retry:
            next_at = self.policy.next_attempt_at(now, entry.attempts, self.rng)
            if next_at is not None:
                return AttemptResult(
                    Outcome(
                        entry.message_id,
                        ledger_repo.PENDING,
                        entry.attempts,
                        next_attempt_at=next_at,
                        reason=prepared.reason,
                        claim_token=entry.claim_token,
                    )
                )
        if prepared.delivery is None:
            assert prepared.status is not None
            return AttemptResult(
                Outcome(
                    entry.message_id,
                    prepared.status.value,
                    entry.attempts,
                    reason=prepared.reason,
                    claim_token=entry.claim_token,
                ),
                [status_of(request, prepared.status, now, reason=prepared.reason)],
            )
        provider, result = await self.router.send(
            prepared.delivery, before_call=lambda: self._before_provider_call(entry)
        )
        decided = self._decide(entry, provider, result)
        if result.address_gone is not None:
            decided.suppress = self.suppression(
                request, prepared.delivery.to, provider, result.address_gone, now
            )
        return decided

    def suppression(
        self, request: MessageRequested, address: str, provider: str | None, reason: str, now: datetime
    ) -> Suppression | None:
        """The suppression of `address` (where `request` went), which a provider said does not exist
        (`reason`: in its codes, never its words, which may quote the address)."""
        key = suppression_key(
            self.settings.privacy_salt.get_secret_value(),
            request.channel,
            address,
            self.settings.sms_default_region,
        )
        if key is None:
            return None
        return Suppression(key, request.channel.value, reason, provider, request.message_id, now)

    def _decide(self, entry: LedgerEntry, provider: str | None, result: SendResult) -> AttemptResult:
        decided = self._decide_outcome(entry, provider, result)
        decided.outcome = replace(decided.outcome, claim_token=entry.claim_token)
        return decided

    def _decide_outcome(self, entry: LedgerEntry, provider: str | None, result: SendResult) -> AttemptResult:
        request, now = entry.request, self.clock.now()
        if result.ok:
            kinds = [MessageStatusKind.SENT] + ([MessageStatusKind.DELIVERED] if result.delivered else [])
            return AttemptResult(
                Outcome(
                    entry.message_id,
                    kinds[-1].value,
                    entry.attempts,
                    provider=provider,
                    provider_message_id=result.provider_message_id,
                ),
                [status_of(request, k, now, provider=provider) for k in kinds],
            )
        reason = result.reason or "provider failure"
        if result.failure is Failure.BOUNCE:
            return AttemptResult(
                Outcome(entry.message_id, "bounced", entry.attempts, provider=provider, reason=reason),
                [status_of(request, MessageStatusKind.BOUNCED, now, reason=reason, provider=provider)],
            )
        if result.failure in (Failure.TRANSIENT, Failure.PROVIDER):
            next_at = self.policy.next_attempt_at(now, entry.attempts, self.rng, result.retry_after_s)
            if next_at is not None:
                return AttemptResult(
                    Outcome(
                        entry.message_id,
                        ledger_repo.PENDING,
                        entry.attempts,
                        next_attempt_at=next_at,
                        provider=provider,
                        reason=reason,
                    )
                )
            reason = f"gave up after {entry.attempts} attempts: {reason}"
            return AttemptResult(
                Outcome(entry.message_id, "failed", entry.attempts, provider=provider, reason=reason),
                [status_of(request, MessageStatusKind.FAILED, now, reason=reason, provider=provider)],
                dead_letter_reason=reason,
                dead_letter=request,
            )
        return AttemptResult(
            Outcome(entry.message_id, "failed", entry.attempts, provider=provider, reason=reason),
            [status_of(request, MessageStatusKind.FAILED, now, reason=reason, provider=provider)],
        )

    async def _record(self, results: Sequence[AttemptResult]) -> None:
        # Off the mail's path, yet once per send: the outcomes and their statuses in one statement
        # (`AnnouncedChanges`), one round trip where a unit of work takes four.
        announced = AnnouncedChanges(self.settings)
        for result in results:
            # Each message is inserted only if its outcome is written: a claim handed back or
            # resolved meanwhile says nothing (its owner reports).
            owner = result.outcome.message_id
            for status in result.statuses:
                announced.emit(
                    owner,
                    MESSAGE_STATUS.name,
                    status.customer_id,
                    status,
                    correlation_id=result.correlation_id,
                )
            if result.dead_letter is not None:
                self._dead_letter(announced, owner, result.dead_letter, result)
        suppress = [r for r in results if r.suppress is not None]
        async with driver_autocommit(self.engine) as conn:
            if not suppress:
                recorded = await ledger_repo.record_outcomes_announcing(
                    conn, [r.outcome for r in results], announced, self.clock.now()
                )
            else:
                async with conn.transaction():  # the outcome and its address's suppression together
                    recorded = await ledger_repo.record_outcomes_announcing(
                        conn, [r.outcome for r in results], announced, self.clock.now()
                    )
                    added = await suppressions_repo.add(
                        conn,
                        [r.suppress for r in suppress if r.suppress and r.outcome.message_id in recorded],
                    )
                for channel in added.values():
                    ADDRESSES_SUPPRESSED.labels(channel).inc()
        if recorded and len(announced) and self.notify_relay is not None:
            self.notify_relay()
        dead_lettered = sum(
            1 for r in results if r.dead_letter is not None and r.outcome.message_id in recorded
        )
        if dead_lettered:  # committed: counted as the consumers count theirs
            DLQ_MESSAGES.labels(self.settings.service_name, self.settings.topic(MESSAGE_REQUESTS.name)).inc(
                dead_lettered
            )
        if any(r.outcome.state == ledger_repo.PENDING for r in results):
            log.info(
                "transient failures rescheduled",
                extra={"count": sum(r.outcome.state == ledger_repo.PENDING for r in results)},
            )

    def _dead_letter(
        self, announced: AnnouncedChanges, owner: str, request: MessageRequested, result: AttemptResult
    ) -> None:
        announced.emit(
            owner,
            MESSAGE_REQUESTS.dead_letter,
            request.customer_id,
            request,
            correlation_id=result.correlation_id,
            extra_headers={
                Headers.DLQ_ERROR: (result.dead_letter_reason or "")[:2000],
                Headers.DLQ_SOURCE: "notifier.send_ledger",
                Headers.DLQ_GROUP: self.settings.consumer_group("delivery"),
                Headers.DLQ_ATTEMPTS: str(result.outcome.attempts),
            },
        )

    @staticmethod
    def _emit_status(uow: UnitOfWork, status: MessageStatus, correlation_id: str | None = None) -> None:
        uow.emit(MESSAGE_STATUS.name, status.customer_id, status, correlation_id=correlation_id)

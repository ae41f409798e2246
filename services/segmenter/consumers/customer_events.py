"""The `clm.events.v1` handler: one unit of work per Kafka batch.

Claim the batch's messageIds (duplicates drop out), resolve identities (links, merges), fold the
events into the profiles (locked in id order), append the timeline, re-evaluate only the segments
these changes can affect, and leave commit + inbox + outbox to the unit of work. The runner commits
offsets only after that.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession

from services.segmenter.conflicts import CONFLICT_ATTEMPTS, ConcurrentIdentityChange, is_transient_conflict
from services.segmenter.domain.identity import batch_identifiers, plan_identities, split_identities
from services.segmenter.domain.profile import (
    ORDER_EVENT,
    EventAggregate,
    ProfileSnapshot,
    TraitLimits,
    TraitRefusal,
    aggregate_name,
    apply_bounded_traits,
    context_traits,
    order_revenue,
    trait_change,
)
from services.segmenter.reevaluation import SegmentCatalogCache, announce, reevaluate
from services.segmenter.store import profiles as profile_store
from services.segmenter.store.profiles import TimelineRow
from shared.clock import Clock
from shared.contracts.events import CustomerEvent, ProfileChanged, ProfileChangeKind
from shared.contracts.topics import PROFILES
from shared.db.unit_of_work import UnitOfWork
from shared.kafka.consumer import Consumed
from shared.privacy import erased_among, erasure_gate
from shared.runtime import Platform

if TYPE_CHECKING:
    from services.segmenter.lifecycle import Lifecycle
    from services.segmenter.recommendations import Recommendations

CONSUMER = "segmenter.events"
log = logging.getLogger(__name__)

TRAITS_REFUSED = Counter(
    "clm_segmenter_trait_changes_refused_total",
    "Trait changes not applied because the profile's traits would pass their bound "
    "(profile_max_trait_bytes: reason size; profile_max_traits: reason count); source identify, group "
    "or context (the change was refused whole, the event counted) or merge (the merged-away profile's "
    "values left out)",
    ["reason", "source"],
)
_LOGGED_NAMES = 20


def _refused(customer_id: str, cause: str, source: str, refusal: TraitRefusal) -> None:
    TRAITS_REFUSED.labels(refusal.reason, source).inc()
    log.warning(
        "trait change not applied: the profile's traits would pass their bound",
        extra={
            "customer_id": customer_id,
            "message_id": cause,
            "source": source,
            "reason": refusal.reason,
            "traits": list(refusal.names[:_LOGGED_NAMES]),
            "traits_refused": len(refusal.names),
            "bytes_before": refusal.bytes_before,
            "bytes_after": refusal.bytes_after,
            "count_before": refusal.count_before,
            "count_after": refusal.count_after,
        },
    )


def _fold_event(
    p: ProfileSnapshot,
    e: CustomerEvent,
    counts: dict[tuple[str, str], EventAggregate],
    limits: TraitLimits,
) -> set[str]:
    """Apply one event to a locked profile; returns the trait names it changed. A trait change that
    would take the traits past `limits` is not applied (logged, counted); the event counts anyway."""
    f = p.fields
    ts = e.timestamp
    f["first_seen"] = ts if f["first_seen"] is None else min(f["first_seen"], ts)
    f["last_seen"] = ts if f["last_seen"] is None else max(f["last_seen"], ts)
    f["event_count"] = (f["event_count"] or 0) + 1
    name = aggregate_name(e)
    if name is not None:
        key = (p.customer_id, name)
        agg = counts.get(key)
        if agg is None:
            counts[key] = EventAggregate(1, ts, ts)
        else:
            agg.count += 1
            agg.first_at, agg.last_at = min(agg.first_at, ts), max(agg.last_at, ts)
        if name == ORDER_EVENT:
            f["orders_count"] = (f["orders_count"] or 0) + 1
            f["revenue"] = float(f["revenue"] or 0) + order_revenue(e.properties)
            f["first_order_at"] = ts if f["first_order_at"] is None else min(f["first_order_at"], ts)
            f["last_order_at"] = ts if f["last_order_at"] is None else max(f["last_order_at"], ts)
    changed: set[str] = set()
    change = trait_change(e)
    if change is not None:
        outcome = apply_bounded_traits(p, change, limits)
        changed = outcome.changed
        if outcome.refused is not None:
            _refused(p.customer_id, e.message_id, e.type.value, outcome.refused)
    from_context = context_traits(e, p.traits)
    if from_context is not None:
        outcome = apply_bounded_traits(p, from_context, limits)
        changed |= outcome.changed
        if outcome.refused is not None:
            _refused(p.customer_id, e.message_id, "context", outcome.refused)
    return changed


class CustomerEventsHandler:
    def __init__(
        self,
        platform: Platform,
        clock: Clock,
        catalog: SegmentCatalogCache,
        trait_limits: TraitLimits | None = None,
        *,
        identities_per_message: int = 1000,
    ) -> None:
        self.platform = platform
        self.clock = clock
        self.catalog_cache = catalog
        # The bound on a profile's traits (settings `profile_max_trait_bytes`, `profile_max_traits`).
        self.trait_limits = trait_limits or TraitLimits()
        self.identities_per_message = identities_per_message
        # Issue 9: set by the runtime; feeds the catalogue and recommendation counts per batch.
        self.recommendations: Recommendations | None = None
        # Issue 7: set by the runtime; keeps lifecycle stage and metrics current in the same unit of work.
        self.lifecycle: Lifecycle | None = None

    async def __call__(self, batch: Sequence[Consumed[CustomerEvent]]) -> None:
        # On a backlog the runner runs several such units at once, on different partitions.
        await self.handle_in_own_unit([c.value for c in batch], batch)

    async def handle_in_own_unit(
        self, events: list[CustomerEvent], consumed: Sequence[Consumed[CustomerEvent]] = ()
    ) -> None:
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                async with self.platform.unit_of_work() as uow:
                    uow.note_correlations(consumed)  # announcements pass on their cause's correlation id
                    await self.handle(uow, events)
                return
            except Exception as exc:
                if not is_transient_conflict(exc) or attempt == CONFLICT_ATTEMPTS:
                    raise
                log.info(
                    "concurrent change to the same customers; retrying the batch", extra={"attempt": attempt}
                )
                # Growing, jittered: two pipelined units merging the same customers over and over (a
                # burst of aliases) conflicted five times within 100 ms on a loaded host, and the batch
                # then went to the runner's one-by-one isolation, counted as a handler error.
                await asyncio.sleep(random.uniform(0.5, 1.0) * min(0.01 * 2**attempt, 0.5))

    async def _without_erased(
        self, session: AsyncSession, events: list[CustomerEvent]
    ) -> list[CustomerEvent]:
        """Erased customers stay erased: an event carrying one of their ids is dropped (its claim stays,
        so it is never retried), never folded into a profile again. See docs/privacy.md."""
        salt = self.platform.settings.privacy_salt.get_secret_value()
        # An alias's previousId too: it would link the erased identifier to a new profile.
        ids = {i for e in events for i in (e.user_id, e.anonymous_id, e.previous_id) if i}
        await erasure_gate(session, exclusive=False)
        erased = await erased_among(session, salt, ids)
        if not erased:
            return events
        return [e for e in events if not erased.intersection((e.user_id, e.anonymous_id, e.previous_id))]

    async def handle(self, uow: UnitOfWork, events: list[CustomerEvent]) -> None:
        session = uow.session
        now = self.clock.now()
        fresh = await uow.claim_many(CONSUMER, [e.message_id for e in events], erasure_gate=True)
        todo: list[CustomerEvent] = []
        for e in events:
            if e.message_id in fresh:
                fresh.discard(e.message_id)  # a duplicate inside the batch counts once
                todo.append(e)
        if not todo:
            return
        todo = await self._without_erased(session, todo)
        if not todo:
            return
        catalog = await self.catalog_cache.refresh(session)

        idents = batch_identifiers(todo)
        candidates = {v for _, v in idents} | {f"{k}:{v}" for k, v in idents}
        known = await profile_store.lookup_identities(session, idents, candidates)
        plan = plan_identities(todo, known.links, known.with_user, known.taken_ids, known.retired_ids)
        linked = await profile_store.insert_customers_and_links(session, plan.new_customers, plan.links, now)
        if linked != len(plan.links):
            # Another transaction linked one of these identifiers since we looked: start over, the
            # retry sees its link (never two customers for one identifier).
            raise ConcurrentIdentityChange()

        merged_into: dict[str, list[str]] = {}
        merge_cause: dict[str, str] = {}
        merged_traits: dict[str, set[str]] = {}
        for m in plan.merges:
            result = await profile_store.merge_customers(session, m, now, self.trait_limits)
            if result.dropped_traits is not None:
                _refused(m.into_id, m.message_id, "merge", result.dropped_traits)
            merged_into.setdefault(m.into_id, []).append(m.from_id)
            merge_cause[m.into_id] = f"{m.event_type} {m.message_id}: " + ", ".join(
                f"{k}={v}" for k, v in m.identifiers
            )
            merged_traits.setdefault(m.into_id, set()).update(result.changed_traits)
            for sid, transitions in result.exited:
                name = next((s.name for s in catalog.segments if s.segment_id == sid), sid)
                announce(uow, m.from_id, sid, name, False, transitions, "merge", now, {})
        # A survivor that was itself merged later in the batch reports under its final id.
        final = set(plan.customer_of_event)
        profiles = await profile_store.lock_profiles(session, final)
        if len(profiles) != len(final):
            raise profile_store.ProfileGone(", ".join(sorted(final - set(profiles))))
        # Each profile's change is dated by `now`, or by its last change where that is later: `now`
        # was taken before the lock, so a batch that took a later one may have committed meanwhile
        # (or another replica's clock runs ahead). Its updated_at and announcements never go back
        # in time, which a consumer keeping the newest (the notifier) would take for an old change.
        for p in profiles.values():
            p.updated_at = now if p.updated_at is None else max(now, p.updated_at)

        counts: dict[tuple[str, str], EventAggregate] = {}
        timeline: list[TimelineRow] = []
        changed_traits: dict[str, set[str]] = {}
        names_seen: dict[str, set[str]] = {}
        last_message: dict[str, str] = {}
        for e, cid in zip(todo, plan.customer_of_event, strict=True):
            p = profiles[cid]
            changed = _fold_event(p, e, counts, self.trait_limits)
            if changed:
                changed_traits.setdefault(cid, set()).update(changed)
            agg_name = aggregate_name(e)
            names_seen.setdefault(cid, set())
            if agg_name is not None:
                names_seen[cid].add(agg_name)
            last_message[cid] = e.message_id
            timeline.append(
                TimelineRow(
                    cid,
                    e.message_id,
                    e.type.value,
                    agg_name or e.event,
                    e.properties,
                    e.traits,
                    e.timestamp,
                    e.received_at,
                )
            )
        await profile_store.save_events(session, counts, timeline)
        lifecycle_write = None
        if self.lifecycle is not None:  # stage, metrics, surveys (issue 7); updates the snapshots in place
            lifecycle_write = await self.lifecycle.on_batch(
                uow, profiles, todo, plan.customer_of_event, last_message, now
            )
        await profile_store.save_profiles(
            session, [profiles[c] for c in sorted(names_seen)], now, lifecycle_write
        )
        if self.recommendations is not None:  # catalogue, counts, lists: same unit of work (issue 9)
            merges = [(m.from_id, m.into_id) for m in plan.merges]
            await self.recommendations.on_events(uow, todo, plan.customer_of_event, merges, profiles, now)

        # A customer known by another identifier than its id now: others resolve that one to it.
        relinked = {cid for _, value, cid in plan.links if value != cid}
        await self._publish_profiles(
            uow,
            profiles,
            changed_traits,
            merged_into,
            merge_cause,
            merged_traits,
            relinked,
            last_message,
            now,
        )
        affected: dict[str, set[str]] = {}
        causes: dict[str, str] = {}
        # A new profile was never evaluated: any segment may hold for it, also one its events do not
        # name (`email not_exists`, a holdout bucket, `not member_of`, `not_performed`).
        new = set(plan.new_customers)
        for cid in profiles:
            affected[cid] = catalog.affected(
                changed_traits.get(cid, set()) | merged_traits.get(cid, set()),
                # "*": every event moves last_seen / event_count, identify and group included.
                names_seen.get(cid, set()) | {"*"},
                everything=cid in merged_into or cid in new,
            )
            causes[cid] = last_message.get(cid, "merge") if cid not in merged_into else "merge"
        await reevaluate(uow, catalog, profiles, affected, causes, now)

    async def _publish_profiles(
        self,
        uow: UnitOfWork,
        profiles: dict[str, ProfileSnapshot],
        changed_traits: dict[str, set[str]],
        merged_into: dict[str, list[str]],
        merge_cause: dict[str, str],
        merged_traits: dict[str, set[str]],
        relinked: set[str],
        last_message: dict[str, str],
        now: datetime,
    ) -> None:
        publish = (set(changed_traits) | set(merged_into) | relinked) & set(profiles)
        if not publish:
            return
        identities = await profile_store.identities_of(uow.session, publish)
        for cid in sorted(publish):
            p = profiles[cid]
            merged = merged_into.get(cid)
            if merged:
                kind, tag = ProfileChangeKind.IDENTITY_MERGED, "merge"
            elif cid in changed_traits:
                kind, tag = ProfileChangeKind.TRAITS_CHANGED, "traits"
            else:
                kind, tag = ProfileChangeKind.IDENTITY_LINKED, "linked"
            event_id = f"profile:{cid}:{last_message.get(cid, 'merge')}:{tag}"
            first, *more = split_identities(identities.get(cid, {}), self.identities_per_message)
            uow.emit(
                PROFILES.name,
                cid,
                ProfileChanged(
                    event_id=event_id,
                    customer_id=cid,
                    kind=kind,
                    occurred_at=p.updated_at or now,
                    traits=p.traits,
                    changed_traits=sorted(changed_traits.get(cid, set()) | merged_traits.get(cid, set())),
                    identities=first,
                    merged_ids=merged or [],
                    merge_cause=merge_cause.get(cid),
                    caused_by=last_message.get(cid),
                ),
                cause=last_message.get(cid),
            )
            # The rest of a large identity set, when identities changed (consumers add the ones a
            # change names and keep the others, so a trait change needs only the first part): same
            # traits (consumers keep a change's traits as the current ones), nothing changed or merged.
            if not (merged or cid in relinked):
                more = []
            for n, part in enumerate(more, start=2):
                uow.emit(
                    PROFILES.name,
                    cid,
                    ProfileChanged(
                        event_id=f"{event_id}:identities-{n}",
                        customer_id=cid,
                        kind=ProfileChangeKind.IDENTITY_LINKED,
                        occurred_at=p.updated_at or now,
                        traits=p.traits,
                        identities=part,
                        caused_by=last_message.get(cid),
                    ),
                    cause=last_message.get(cid),
                )

"""The `clm.events.v1` handler: one unit of work per Kafka batch.

Claim the batch's messageIds (duplicates drop out), resolve identities (links, merges), fold the
events into the profiles (locked in id order), append the timeline, re-evaluate only the segments
these changes can affect, and leave commit + inbox + outbox to the unit of work. The runner commits
offsets only after that.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from services.segmenter.domain.identity import batch_identifiers, plan_identities
from services.segmenter.domain.profile import (
    ORDER_EVENT,
    EventAggregate,
    ProfileSnapshot,
    aggregate_name,
    apply_traits,
    order_revenue,
    trait_change,
)
from services.segmenter.reevaluation import SegmentCatalogCache, announce, reevaluate
from services.segmenter.store import profiles as profile_store
from services.segmenter.store.profiles import TimelineRow
from shared.clock import Clock
from shared.contracts.events import CustomerEvent, ProfileChangeKind, ProfileChanged
from shared.contracts.topics import PROFILES
from shared.db.unit_of_work import UnitOfWork
from shared.kafka.consumer import Consumed
from shared.runtime import Platform

CONSUMER = "segmenter.events"


def _fold_event(p: ProfileSnapshot, e: CustomerEvent, counts: dict[tuple[str, str], EventAggregate]) -> set[str]:
    """Apply one event to a locked profile; returns the trait names it changed."""
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
    change = trait_change(e)
    return apply_traits(p.traits, p.trait_times, change) if change else set()


class CustomerEventsHandler:
    def __init__(self, platform: Platform, clock: Clock, catalog: SegmentCatalogCache) -> None:
        self.platform = platform
        self.clock = clock
        self.catalog_cache = catalog

    async def __call__(self, batch: Sequence[Consumed[CustomerEvent]]) -> None:
        async with self.platform.unit_of_work() as uow:
            await self.handle(uow, [c.value for c in batch])

    async def handle(self, uow: UnitOfWork, events: list[CustomerEvent]) -> None:
        session = uow.session
        now = self.clock.now()
        fresh = await uow.claim_many(CONSUMER, [e.message_id for e in events])
        todo: list[CustomerEvent] = []
        for e in events:
            if e.message_id in fresh:
                fresh.discard(e.message_id)  # a duplicate inside the batch counts once
                todo.append(e)
        if not todo:
            return
        catalog = await self.catalog_cache.refresh(session)

        idents = batch_identifiers(todo)
        known, with_user = await profile_store.lookup_identities(session, idents)
        candidates = {v for _, v in idents} | {f"{k}:{v}" for k, v in idents}
        taken = await profile_store.existing_customer_ids(session, candidates)
        plan = plan_identities(todo, known, with_user, taken)
        await profile_store.insert_customers(session, plan.new_customers, now)
        await profile_store.insert_links(session, plan.links, now)

        merged_into: dict[str, list[str]] = {}
        merge_cause: dict[str, str] = {}
        merged_traits: dict[str, set[str]] = {}
        for m in plan.merges:
            result = await profile_store.merge_customers(session, m, now)
            merged_into.setdefault(m.into_id, []).append(m.from_id)
            merge_cause[m.into_id] = f"{m.event_type} {m.message_id}: " + ", ".join(f"{k}={v}" for k, v in m.identifiers)
            merged_traits.setdefault(m.into_id, set()).update(result.changed_traits)
            for sid, transitions in result.exited:
                name = next((s.name for s in catalog.segments if s.segment_id == sid), sid)
                announce(uow, m.from_id, sid, name, False, transitions, "merge", now, {})
        # A survivor that was itself merged later in the batch reports under its final id.
        final = set(plan.customer_of_event)
        profiles = await profile_store.lock_profiles(session, final)

        counts: dict[tuple[str, str], EventAggregate] = {}
        timeline: list[TimelineRow] = []
        changed_traits: dict[str, set[str]] = {}
        names_seen: dict[str, set[str]] = {}
        last_message: dict[str, str] = {}
        for e, cid in zip(todo, plan.customer_of_event, strict=True):
            p = profiles[cid]
            changed = _fold_event(p, e, counts)
            if changed:
                changed_traits.setdefault(cid, set()).update(changed)
            agg_name = aggregate_name(e)
            names_seen.setdefault(cid, set())
            if agg_name is not None:
                names_seen[cid].add(agg_name)
            last_message[cid] = e.message_id
            timeline.append(
                TimelineRow(cid, e.message_id, e.type.value, agg_name or e.event, e.properties, e.traits, e.timestamp,
                            e.received_at)
            )
        await profile_store.save_profiles(session, [profiles[c] for c in sorted(names_seen)], now)
        await profile_store.upsert_event_counts(session, counts)
        await profile_store.insert_timeline(session, timeline)

        await self._publish_profiles(uow, profiles, changed_traits, merged_into, merge_cause, merged_traits,
                                     last_message, now)
        affected: dict[str, set[str]] = {}
        causes: dict[str, str] = {}
        for cid in profiles:
            affected[cid] = catalog.affected(
                changed_traits.get(cid, set()) | merged_traits.get(cid, set()),
                names_seen.get(cid, set()),
                everything=cid in merged_into,
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
        last_message: dict[str, str],
        now: datetime,
    ) -> None:
        publish = (set(changed_traits) | set(merged_into)) & set(profiles)
        if not publish:
            return
        identities = await profile_store.identities_of(uow.session, publish)
        for cid in sorted(publish):
            p = profiles[cid]
            merged = merged_into.get(cid)
            uow.emit(
                PROFILES.name,
                cid,
                ProfileChanged(
                    event_id=f"profile:{cid}:{last_message.get(cid, 'merge')}:{'merge' if merged else 'traits'}",
                    customer_id=cid,
                    kind=ProfileChangeKind.IDENTITY_MERGED if merged else ProfileChangeKind.TRAITS_CHANGED,
                    occurred_at=now,
                    traits=p.traits,
                    changed_traits=sorted(changed_traits.get(cid, set()) | merged_traits.get(cid, set())),
                    identities=identities.get(cid, {}),
                    merged_ids=merged or [],
                    merge_cause=merge_cause.get(cid),
                    caused_by=last_message.get(cid),
                ),
            )

"""Catalogue and recommendations inside the segmenter (issue 9): the part of the event batch that
feeds the catalogue and the co-occurrence counts, the per-customer lists, and the full recompute.

The event hook runs inside the batch's unit of work, after the profiles are saved and before the
segments are re-evaluated: catalogue upsert, new (customer, product) rows, count increments (the
`basket_delta`s), the touched customers' lists, and a `ProfileChanged` carrying the lists when
they changed, all committed with the profile update, the inbox claims and the outbox.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.segmenter.conflicts import hold_for_job, retry_job_chunk
from services.segmenter.domain.profile import ProfileSnapshot
from services.segmenter.domain.recommendations.catalogue import (
    CatalogueItem,
    InteractionKind,
    catalogue_items_from_event,
)
from services.segmenter.domain.recommendations.cooccurrence import (
    ItemSimilarities,
    ScoringParams,
    SimilarityMeasure,
)
from services.segmenter.domain.recommendations.recommend import (
    CustomerHistory,
    CustomerRecommendations,
    PopularityIndex,
    RecommendParams,
    customer_categories,
    recommend_for_customer,
)
from services.segmenter.domain.recommendations.stored import batch_increments, stored_counts
from services.segmenter.reevaluation import SegmentCatalogCache
from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import catalogue as catalogue_store
from services.segmenter.store import segments as segment_store
from shared.clock import Clock
from shared.contracts.events import CustomerEvent, EventType, ProfileChanged, ProfileChangeKind
from shared.contracts.topics import PROFILES
from shared.db.locks import try_exclusive
from shared.db.unit_of_work import UnitOfWork
from shared.privacy import erasure_gate
from shared.runtime import Platform

log = logging.getLogger(__name__)
TemplateLists = dict[str, list[dict[str, Any]]]


def _product_ids(lists: Mapping[str, list[dict[str, Any]]] | None) -> Any:
    """What a customer would see: the product ids of each list, in order (scores and support counts
    move with every purchase anywhere; announcing those would be noise)."""
    if lists is None:
        return None
    return {k: [e.get("product_id") for e in v] for k, v in sorted(lists.items())}


@dataclass
class RecomputeResult:
    products: int
    pairs: int
    customers: int
    changed: int

    def as_json(self) -> dict[str, int]:
        return {
            "product_counts": self.products,
            "pair_counts": self.pairs,
            "customers": self.customers,
            "lists_changed": self.changed,
        }


class Recommendations:
    def __init__(
        self, settings: SegmenterSettings, platform: Platform, clock: Clock, catalog: SegmentCatalogCache
    ) -> None:
        self.settings, self.platform, self.clock, self.catalog_cache = settings, platform, clock, catalog
        self.scoring = ScoringParams(
            measure=SimilarityMeasure(settings.recommendations_measure),
            min_support=settings.recommendations_min_support,
            view_weight=settings.recommendations_view_weight,
        )
        self.params = RecommendParams(
            cross_sell_limit=settings.recommendations_cross_sell_limit,
            upsell_limit=settings.recommendations_upsell_limit,
        )
        self._recompute_lock = asyncio.Lock()

    # ------------------------------------------------------------------ per customer

    async def compute(
        self,
        session: AsyncSession,
        customer_ids: Iterable[str],
        limit: int | None = None,
        histories: Mapping[str, CustomerHistory] | None = None,
    ) -> dict[str, CustomerRecommendations]:
        """Each customer's lists from the stored counts: only the rows their anchors need (their
        products' pairs, the counts of those products and of their categories, the top sellers).
        `histories`: what the customers bought and viewed, when the caller read it already."""
        params = self.params
        if limit is not None:
            params = params.model_copy(update={"cross_sell_limit": limit, "upsell_limit": limit})
        if histories is None:
            histories = await catalogue_store.histories(session, customer_ids)
        if not histories:
            return {}
        anchors = {p for h in histories.values() for p in h.purchased | h.viewed}
        anchor_items = await catalogue_store.items_for(session, anchors, ())
        categories = {c for h in histories.values() for c in customer_categories(h, anchor_items)}
        pairs = await catalogue_store.pairs_of(session, anchors)
        neighbours = {b for rows in pairs.values() for _, b, _ in rows}
        most_owned = max(len(h.purchased) for h in histories.values())
        top = await catalogue_store.top_sellers(session, params.cross_sell_limit + most_owned)
        catalogue = await catalogue_store.items_for(session, anchors | neighbours | set(top), categories)
        counts_of = await catalogue_store.product_counts(
            session, anchors | neighbours | set(top) | set(catalogue)
        )
        totals = (
            await catalogue_store.customer_totals(session)
            if self.scoring.measure is SimilarityMeasure.LIFT
            else {}
        )
        counts = stored_counts(totals, counts_of, pairs)
        similarities = ItemSimilarities(counts, self.scoring)
        popularity = PopularityIndex(counts, catalogue)
        return {
            cid: recommend_for_customer(history, similarities, catalogue, popularity, params)
            for cid, history in histories.items()
        }

    async def save_lists(
        self,
        uow: UnitOfWork,
        computed: Mapping[str, CustomerRecommendations],
        profiles: Mapping[str, tuple[dict[str, Any], datetime]],
        causes: Mapping[str, str],
        default_cause: str,
    ) -> int:
        """Store these customers' lists; announce those whose products changed. `profiles`: each
        customer's traits and the time of the profile's last change, read under the customer's row
        lock (the announcement carries them: see `ProfileChanged.occurred_at` in docs/architecture.md)."""
        lists: dict[str, TemplateLists] = {c: r.as_template_variables() for c, r in computed.items()}
        as_of = {c: profiles[c][1] for c in lists}
        saved = await catalogue_store.save_recommendations(uow.session, lists, as_of)
        changed = 0
        for cid in sorted(lists):
            if _product_ids(saved[cid].previous) == _product_ids(lists[cid]):
                continue
            changed += 1
            cause = causes.get(cid, default_cause)
            traits = profiles[cid][0]
            uow.emit(
                PROFILES.name,
                cid,
                ProfileChanged(
                    event_id=f"profile:{cid}:{cause}:recommendations",
                    customer_id=cid,
                    kind=ProfileChangeKind.TRAITS_CHANGED,
                    # The profile's last change, not now: the lists travel with the traits that
                    # change left, and a consumer keeping the newest (the notifier's contacts and
                    # lists) must prefer the customer's next change, whose time can be earlier
                    # than now (taken before it waited for this transaction's lock). Never earlier
                    # than the lists replaced (`save_recommendations`).
                    occurred_at=saved[cid].at,
                    traits=traits,
                    recommendations=dict(lists[cid]),
                    caused_by=cause,
                ),
                cause=cause,
            )
        return changed

    # ------------------------------------------------------------------ the event hook

    async def on_events(
        self,
        uow: UnitOfWork,
        events: Sequence[CustomerEvent],
        customer_of_event: Sequence[str],
        merges: Sequence[tuple[str, str]],
        profiles: Mapping[str, ProfileSnapshot],
        now: datetime,
    ) -> None:
        """Catalogue, products, counts and lists for one batch (inside its unit of work)."""
        session = uow.session
        if merges:
            await catalogue_store.move_products(session, merges)
        items: dict[str, CatalogueItem] = {}
        interactions: list[tuple[str, InteractionKind, list[str]]] = []
        last_message: dict[str, str] = {}
        for e, cid in zip(events, customer_of_event, strict=True):
            if e.type != EventType.TRACK:
                continue
            extracted = catalogue_items_from_event(e.event, e.properties)
            if extracted.kind is None:
                continue
            if extracted.rejected:
                log.info(
                    "product descriptions rejected",
                    extra={
                        "message_id": e.message_id,
                        "rejected": [r.model_dump() for r in extracted.rejected],
                    },
                )
            for item in extracted.items:
                known = items.get(item.product_id)
                items[item.product_id] = item if known is None else known.merged_with(item)
            if extracted.product_ids:
                interactions.append((cid, extracted.kind, extracted.product_ids))
                last_message[cid] = e.message_id
        if not items and not interactions:
            return
        await catalogue_store.upsert_items(session, list(items.values()), now)
        owned = await catalogue_store.owned(session, {c for c, _, _ in interactions})
        increments = batch_increments(owned, interactions)
        await catalogue_store.apply_increments(session, increments, now)
        if increments.customers:
            # The batch holds these customers' rows (FOR UPDATE) and dates their change by the
            # updated_at it writes (`CustomerEventsHandler.handle`).
            computed = await self.compute(session, increments.customers)
            held = {c: (profiles[c].traits, profiles[c].updated_at or now) for c in computed if c in profiles}
            computed = {c: r for c, r in computed.items() if c in held}
            await self.save_lists(uow, computed, held, last_message, "batch")

    # ------------------------------------------------------------------ full recompute

    async def recompute(self) -> RecomputeResult:
        """Counts from scratch (SQL X^T X), every customer's lists again (announcing the changed
        ones), then back-fill the segments that read the lists."""
        async with self._recompute_lock:
            async with self.platform.unit_of_work() as uow:
                products, pairs = await catalogue_store.recompute_counts(uow.session)
            customers = changed = 0
            after: str | None = None
            while True:
                done = await retry_job_chunk(
                    functools.partial(self._recompute_chunk, after), "recommendations recompute chunk"
                )
                if done is None:
                    break
                n, chunk_changed, after = done
                customers += n
                changed += chunk_changed
            async with self.platform.unit_of_work() as uow:
                catalog = await self.catalog_cache.refresh(uow.session)
                using = {s.segment_id for s in catalog.segments if s.refs.recommendations}
                if using:
                    await segment_store.restart_backfill(uow.session, using, self.clock.now())
            return RecomputeResult(products, pairs, customers, changed)

    async def _recompute_chunk(self, after: str | None) -> tuple[int, int, str] | None:
        """The lists of the next chunk of customers after `after` (by id), in one unit of work:
        (customers, lists announced, last id), or None past the last customer."""
        async with self.platform.unit_of_work() as uow:
            session = uow.session
            # Like the back-fill: an erasure never lands between this chunk's read of the ids
            # and its write of their lists (which would store an erased customer's lists).
            await erasure_gate(session, exclusive=False)
            ids = await catalogue_store.customer_ids_after(
                session, after, self.settings.recommendations_recompute_chunk
            )
            if not ids:
                return None
            # The lists first, without holding the customers (the slow part: scoring in Python) ...
            read = await catalogue_store.histories(session, ids)
            computed = await self.compute(session, ids, histories=read)
            # ... then the customers, FOR SHARE until commit: their traits as they are now, so the
            # announcements go out before any later change of theirs (the journey engine keeps the
            # last one it gets). Held only for the writes from here on. Should an event batch hold
            # one of them, the chunk waits briefly, then gives way and runs again (`hold_for_job`).
            await hold_for_job(session)
            profiles = await catalogue_store.lock_customers(session, ids)
            # Lists from products a customer's own events changed since the read would replace the
            # lists those events stored: computed again from what it has now.
            now_owned = await catalogue_store.histories(session, list(profiles))
            moved = {c: h for c, h in now_owned.items() if h != read.get(c)}
            if moved:
                computed |= await self.compute(session, moved, histories=moved)
            computed = {c: r for c, r in computed.items() if c in profiles}  # not the merged-away
            cause = f"recompute:{self.clock.now().isoformat()}"
            changed = await self.save_lists(uow, computed, profiles, {}, cause)
        return len(profiles), changed, ids[-1]  # not counting those merged away since the read

    async def run_forever(self) -> None:
        interval = self.settings.recommendations_recompute_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                # Every replica runs this loop; one recompute at a time (the others skip this round).
                lock = f"{self.settings.db_schema}:recommendations-recompute"
                async with try_exclusive(self.platform.engine, lock) as mine:
                    if not mine:
                        log.info("recommendations recompute running on another replica; skipped")
                        continue
                    result = await self.recompute()
                log.info("recommendations recomputed", extra=result.as_json())
            except Exception as exc:
                log.warning(
                    "recommendation recompute failed; next one on schedule", extra={"error": repr(exc)}
                )

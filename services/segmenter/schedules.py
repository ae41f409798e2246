"""Background work without events: due timers (time-based conditions) and segment back-fill.

Both loops use the injected clock and expose `run_once()`, so tests drive them step by step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime

from services.segmenter.reevaluation import SegmentCatalogCache, reevaluate
from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import profiles as profile_store
from services.segmenter.store import segments as segment_store
from shared.clock import Clock
from shared.contracts.topics import SEGMENT_MEMBERSHIP
from shared.privacy import erasure_gate
from shared.runtime import Platform

log = logging.getLogger(__name__)


class DueTimers:
    """Re-evaluates (customer, segment) pairs whose time-based condition may flip now.

    Timers are claimed in batches with `FOR UPDATE SKIP LOCKED` and deleted in the same transaction
    as the re-evaluation (which stores the next due moment, if any), so nothing is lost or doubled
    and replicas share the work."""

    def __init__(
        self, platform: Platform, clock: Clock, catalog: SegmentCatalogCache, settings: SegmenterSettings
    ):
        self.platform, self.clock, self.catalog_cache, self.settings = platform, clock, catalog, settings

    async def run_once(self) -> int:
        now = self.clock.now()
        async with self.platform.unit_of_work() as uow:
            due = await segment_store.claim_due_timers(uow.session, now, self.settings.timer_batch_size)
            if not due:
                return 0
            catalog = await self.catalog_cache.refresh(uow.session)
            affected: dict[str, set[str]] = {}
            for cid, sid in due:
                affected.setdefault(cid, set()).add(sid)
            profiles = await profile_store.lock_profiles(uow.session, affected)
            known = catalog.ids
            affected = {c: s & known for c, s in affected.items() if c in profiles}
            await reevaluate(uow, catalog, profiles, affected, dict.fromkeys(profiles, "schedule"), now)
            return len(due)

    async def run_forever(self) -> None:
        while True:
            try:
                n = await self.run_once()
            except Exception as exc:
                log.warning("due timer pass failed; retrying", extra={"error": repr(exc)})
                n = 0
            if n < self.settings.timer_batch_size:
                await asyncio.sleep(self.settings.timer_interval_s)


class Backfill:
    """Evaluates a new or edited segment over every existing profile, chunk by chunk (each chunk one
    set-based statement and one transaction), with progress stored on the segment row."""

    def __init__(
        self, platform: Platform, clock: Clock, catalog: SegmentCatalogCache, settings: SegmenterSettings
    ):
        self.platform, self.clock, self.catalog_cache, self.settings = platform, clock, catalog, settings
        self.wake = asyncio.Event()

    async def finish_deletion(self, segment_id: str | None = None) -> bool:
        """Remove a hidden segment's memberships and timers and announce its members' exits
        (`segment_id`'s, or the oldest waiting: one a crash left half done); False if none waits or
        another worker has it."""
        async with self.platform.unit_of_work() as uow:
            claimed = await segment_store.claim_deletion(uow.session, segment_id)
            if claimed is None:
                return False
            sid, name = claimed
            await segment_store.delete_segment(uow.session, sid, self._announcement(name, self.clock.now()))
        self.platform.relay.notify()  # outbox rows written by SQL, not through uow.emit
        return True

    async def run_once(self) -> bool:
        """Finish one half-done deletion, or process one chunk of one segment; False when nothing is
        waiting."""
        if await self.finish_deletion():
            return True
        now = self.clock.now()
        dependents_to_restart: set[str] = set()
        async with self.platform.unit_of_work() as uow:
            # Shared, like an event batch, before any row lock: an erasure waits for a chunk in flight
            # (and then deletes the memberships it wrote), or the chunk reads the base after the
            # erasure committed. Back-fills never wait on each other or on event batches for it.
            await erasure_gate(uow.session, exclusive=False)
            row = await segment_store.claim_backfill(uow.session)
            if row is None:
                return False
            catalog = await self.catalog_cache.refresh(uow.session)
            seg = next((s for s in catalog.segments if s.segment_id == row["segment_id"]), None)
            if seg is None:  # invalid stored definition: nothing to evaluate
                await segment_store.advance_backfill(uow.session, row["segment_id"], None, 0, True, now)
                return True
            started = time.perf_counter()
            upto = await segment_store.chunk_upper_bound(
                uow.session, row["backfill_cursor"], self.settings.backfill_chunk_size
            )
            if upto is None:
                await segment_store.advance_backfill(
                    uow.session, seg.segment_id, row["backfill_cursor"], 0, True, now
                )
                dependents_to_restart = catalog.dependents.get(seg.segment_id, set())
            else:
                seen, changed = await segment_store.backfill_chunk(
                    uow.session,
                    seg.segment_id,
                    seg.rule,
                    row["backfill_cursor"],
                    upto,
                    now,
                    self._announcement(seg.name, now),
                )
                await segment_store.advance_backfill(uow.session, seg.segment_id, upto, seen, False, now)
                log.debug(
                    "backfill chunk",
                    extra={
                        "segment_id": seg.segment_id,
                        "seen": seen,
                        "changed": changed,
                        "s": time.perf_counter() - started,
                    },
                )
            if dependents_to_restart:
                # Segments built on this one see its new memberships only after their own pass.
                await segment_store.restart_backfill(uow.session, dependents_to_restart, now)
        self.platform.relay.notify()  # outbox rows written by SQL, not through uow.emit
        return True

    def _announcement(self, segment_name: str, now: datetime) -> segment_store.Announcement:
        return segment_store.Announcement.of(
            self.settings.topic(SEGMENT_MEMBERSHIP.name), self.settings.service_name, segment_name, now
        )

    async def run_until_idle(self) -> None:
        while await self.run_once():
            pass

    async def run_forever(self) -> None:
        while True:
            try:
                busy = await self.run_once()
            except Exception as exc:
                log.warning("backfill pass failed; retrying", extra={"error": repr(exc)})
                busy = False
            if not busy:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.settings.backfill_poll_interval_s)

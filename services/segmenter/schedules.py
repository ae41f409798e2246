"""Background work without events: due timers (time-based conditions) and segment back-fill.

Both loops use the injected clock and expose `run_once()`, so tests drive them step by step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter

from services.segmenter.consumers.customer_events import is_transient_conflict
from services.segmenter.domain.rules import InvalidRule, parse_rule
from services.segmenter.reevaluation import SegmentCatalogCache, reevaluate
from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import profiles as profile_store
from services.segmenter.store import segments as segment_store
from shared.clock import Clock
from shared.contracts.topics import SEGMENT_MEMBERSHIP
from shared.kafka.consumer import is_infrastructure_error
from shared.privacy import erasure_gate
from shared.runtime import Platform

log = logging.getLogger(__name__)

BACKFILL_FAILURES = Counter(
    "clm_segmenter_backfill_failures_total",
    "Back-fill chunks that failed for their segment (not a dependency outage): outcome retried (the "
    "segment is tried again backfill_retry_after_s later, behind the others) or failed "
    "(backfill_max_failures reached, or its stored definition is invalid: the segment is marked "
    "failed until saved again)",
    ["outcome"],
)
# The error kept on the segment (shown by the API): the driver's message, not the statement.
ERROR_CHARS = 500


def failure_text(exc: BaseException) -> str:
    """`CheckViolationError: new row for relation ...`: the driver's error, not SQLAlchemy's wrapper
    (whose text repeats the whole chunk statement and its parameters), first line only (PostgreSQL's
    DETAIL line can quote a customer's row)."""
    orig = getattr(exc, "orig", None)
    cause = exc if orig is None else (orig.__cause__ or orig)
    return f"{type(cause).__name__}: {str(cause).partition(chr(10))[0]}"[:ERROR_CHARS]


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
        waiting. A chunk failing for its segment (not an outage or a conflict with a concurrent
        writer, which are raised) is counted on the segment, which goes behind the others and is
        retried `backfill_retry_after_s` later, and is `failed` after `backfill_max_failures`:
        before, it was claimed first on every pass, and one segment whose chunk could not run
        stopped every other back-fill."""
        if await self.finish_deletion():
            return True
        now = self.clock.now()
        claimed: dict[str, Any] = {}
        try:
            return await self._chunk(now, claimed)
        except Exception as exc:
            if not claimed or is_infrastructure_error(exc) or is_transient_conflict(exc):
                raise
            # An invalid definition never gets better by retrying.
            tries = 1 if isinstance(exc, InvalidRule) else self.settings.backfill_max_failures
            await self._failed(claimed, failure_text(exc), tries, now)
            return True

    async def _failed(self, row: dict[str, Any], error: str, max_failures: int, now: datetime) -> None:
        """Count a failed chunk on its segment, in a transaction of its own (the chunk's rolled back)."""
        async with self.platform.unit_of_work() as uow:
            recorded = await segment_store.record_backfill_failure(
                uow.session, row["segment_id"], row["version"], error, max_failures, now
            )
        if recorded is None:  # edited, restarted or deleted meanwhile: a new pass, or none
            return
        status, failures = recorded
        gave_up = status == "failed"
        BACKFILL_FAILURES.labels("failed" if gave_up else "retried").inc()
        extra = {"segment_id": row["segment_id"], "version": row["version"], "failures": failures}
        if gave_up:
            log.error(
                "segment back-fill failed; stopped until the segment is saved again",
                extra={**extra, "error": error},
            )
        else:
            log.warning(
                "segment back-fill chunk failed; retried later, behind the other segments",
                extra={**extra, "error": error},
            )

    async def _chunk(self, now: datetime, claimed: dict[str, Any]) -> bool:
        """One chunk of one segment; the segment's row is copied into `claimed` once a failure from
        here on is the segment's."""
        dependents_to_restart: set[str] = set()
        async with self.platform.unit_of_work() as uow:
            # Shared, like an event batch, before any row lock: an erasure waits for a chunk in flight
            # (and then deletes the memberships it wrote), or the chunk reads the base after the
            # erasure committed. Back-fills never wait on each other or on event batches for it.
            await erasure_gate(uow.session, exclusive=False)
            retry_from = now - timedelta(seconds=self.settings.backfill_retry_after_s)
            row = await segment_store.claim_backfill(uow.session, retry_from)
            if row is None:
                return False
            catalog = await self.catalog_cache.refresh(uow.session)
            seg = next((s for s in catalog.segments if s.segment_id == row["segment_id"]), None)
            claimed.update(row)
            if seg is None:
                # Left out of the catalogue: its stored definition is invalid (saved by a release
                # that accepted it). Failed at once, saying why (InvalidRule), not `ready` with no
                # member.
                parse_rule(row["definition"])
                raise RuntimeError("the segment is not in the catalogue")
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

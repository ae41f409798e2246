"""The due-timer loop: re-evaluates (customer, segment) pairs whose time-based condition may flip now.

Uses the injected clock and exposes `run_once()`, so tests drive it step by step. A batch that fails
for a reason of its own is taken apart, so that one failing timer holds no other back (`run_once`).
"""

from __future__ import annotations

import asyncio
import logging
import random

from prometheus_client import Counter

from services.segmenter.reevaluation import SegmentCatalogCache, reevaluate
from services.segmenter.schedules import PASSING_SQLSTATES, failure_text
from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import profiles as profile_store
from services.segmenter.store import timers as timer_store
from services.segmenter.store.timers import DueTimer
from shared.clock import Clock
from shared.db.errors import sqlstate
from shared.kafka.consumer import is_infrastructure_error
from shared.runtime import Platform

log = logging.getLogger(__name__)

TIMER_FAILURES = Counter(
    "clm_segmenter_timer_failures_total",
    "Due timers whose re-evaluation failed alone, outcome retried (tried again "
    "segment_timer_retry_s later, doubled each time) or parked (after segment_timer_max_attempts "
    "tries: moved to segment_timers_parked); and due-timer passes that failed as a whole, outcome "
    "backed_off (an outage or a passing condition of the database: retried with back-off, counted "
    "on no timer)",
    ["outcome"],
)
# A deadlock or serialization failure with a concurrent writer (a back-fill chunk, an event batch):
# the unit of work is tried again at once, up to CONFLICT_TRIES times in all, pausing from
# CONFLICT_PAUSE_S (doubling, jittered), then the pass fails as an outage does.
CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})
CONFLICT_TRIES = 4
CONFLICT_PAUSE_S = 0.025
# The loop's pause after a failed pass, doubling from `timer_interval_s`, at most this.
FAILED_PASS_PAUSE_MAX_S = 30.0


def is_conflict(exc: BaseException) -> bool:
    return sqlstate(exc) in CONFLICT_SQLSTATES


def is_passing(exc: BaseException) -> bool:
    """A failure that says nothing about the timers: an outage (the database unreachable, the server
    going away), a conflict with a concurrent writer, or a passing condition of the database, by
    SQLSTATE (the back-fill's `PASSING_SQLSTATES`: statement timeout, read-only transaction after a
    failover, lock timeout; and classes 53, insufficient resources, and 58, system errors). Retried
    with back-off, never counted against a timer."""
    if is_infrastructure_error(exc):
        return True
    state = sqlstate(exc)
    return state is not None and (
        state in CONFLICT_SQLSTATES or state in PASSING_SQLSTATES or state.startswith(("53", "58"))
    )


def backoff(first: float, attempt: int, most: float) -> float:
    """Seconds before try `attempt + 1`: doubling from `first`, at most `most`, jittered (two workers
    that met one deadlock do not meet again in step)."""
    return random.uniform(0.5, 1.0) * min(first * 2.0 ** min(attempt - 1, 30), most)


def error_text(exc: BaseException) -> str:
    """What went wrong, as stored with a parked timer: the driver's message (`failure_text`: no
    statement, no parameters, first line), storable as text (no NUL, no lone surrogate)."""
    text = failure_text(exc).replace("\x00", "\\x00")
    return text.encode("utf-8", "replace").decode("utf-8")


class DueTimers:
    """Re-evaluates (customer, segment) pairs whose time-based condition may flip now.

    Timers are claimed in batches with `FOR UPDATE SKIP LOCKED` and deleted in the same transaction
    as the re-evaluation (which stores the next due moment, if any), so nothing is lost or doubled
    and replicas share the work. Each try of a batch, or of a part of one, is a unit of work of its
    own: a failed one wrote nothing (no membership, no announcement) and its timers are due again."""

    def __init__(
        self, platform: Platform, clock: Clock, catalog: SegmentCatalogCache, settings: SegmenterSettings
    ):
        self.platform, self.clock, self.catalog_cache, self.settings = platform, clock, catalog, settings

    async def run_once(self) -> int:
        """One batch of due timers (oldest first); the number claimed. An outage or a passing
        condition of the database (`is_passing`; a conflict after CONFLICT_TRIES quick tries) is
        raised, for the loop to back off: nothing is counted against the timers, however long it
        lasts. A batch that fails for another reason (an evaluation that raises for one customer, a
        constraint, a bug) is taken apart by halves (`_isolate`): claimed oldest first, its timers
        would otherwise fail every pass first, and every later timer of every customer stay due
        behind them. The parts that succeed commit; a timer that fails alone is tried again later,
        then parked (`_count_failure`)."""
        claimed: list[DueTimer] = []
        try:
            try:
                await self._unit(claimed)
            except Exception as exc:
                if is_passing(exc) or not claimed:
                    raise
                log.warning(
                    "due timer batch failed; isolating the failing timers",
                    extra={"size": len(claimed), "error": error_text(exc)},
                )
                # By customer: the timers of a customer whose profile fails every evaluation go together.
                failed = await self._isolate(sorted(claimed), exc)
                for timer, failure in failed:
                    await self._count_failure(timer, failure)
        except Exception:
            TIMER_FAILURES.labels("backed_off").inc()
            raise
        return len(claimed)

    async def _unit(self, claimed: list[DueTimer], keys: list[DueTimer] | None = None) -> None:
        """`_fire`, tried again after a short, growing pause when a conflict with a concurrent writer
        failed it; raised after CONFLICT_TRIES. `claimed` holds what the last try claimed."""
        for attempt in range(1, CONFLICT_TRIES + 1):
            claimed.clear()
            try:
                await self._fire(claimed, keys)
                return
            except Exception as exc:
                if attempt == CONFLICT_TRIES or not is_conflict(exc):
                    raise
                log.info(
                    "due timer unit of work met a concurrent writer; retrying",
                    extra={"sqlstate": sqlstate(exc), "attempt": attempt},
                )
                await asyncio.sleep(backoff(CONFLICT_PAUSE_S, attempt, 1.0))

    async def _fire(self, claimed: list[DueTimer], keys: list[DueTimer] | None) -> None:
        """Claim due timers (or these `keys`, those still there and due) and re-evaluate their pairs
        in one unit of work; `claimed` receives them as soon as they are claimed (what a failed unit
        had taken, to take apart: its delete rolled back, they are due again)."""
        now = self.clock.now()
        async with self.platform.unit_of_work() as uow:
            limit = self.settings.timer_batch_size if keys is None else len(keys)
            claimed[:] = await timer_store.claim_due_timers(uow.session, now, limit, keys)
            if not claimed:
                return
            catalog = await self.catalog_cache.refresh(uow.session)
            affected: dict[str, set[str]] = {}
            for t in claimed:
                affected.setdefault(t.customer_id, set()).add(t.segment_id)
            profiles = await profile_store.lock_profiles(uow.session, affected)
            # A deleted segment's timer, or an erased or merged-away customer's, is dropped.
            known = catalog.ids
            affected = {c: s & known for c, s in affected.items() if c in profiles}
            await reevaluate(uow, catalog, profiles, affected, dict.fromkeys(profiles, "schedule"), now)

    async def _isolate(self, timers: list[DueTimer], error: Exception) -> list[tuple[DueTimer, Exception]]:
        """The timers of a unit of work that failed with `error` that fail alone, with why, found by
        halves as the consumers find a poison message (`shared.kafka.consumer`): a part that succeeds
        commits in one unit of work, a failing one is split again, down to single timers. One failing
        timer in a batch of 1,000 costs about 20 units of work, in the same pass. An outage or a
        passing condition meanwhile is raised (the parts done stay done, the others due)."""
        if len(timers) == 1:
            return [(timers[0], error)]
        middle = len(timers) // 2
        failed: list[tuple[DueTimer, Exception]] = []
        for part in (timers[:middle], timers[middle:]):
            try:
                await self._unit([], part)
            except Exception as exc:
                if is_passing(exc):
                    raise
                failed += await self._isolate(part, exc)
        return failed

    async def _count_failure(self, timer: DueTimer, failure: Exception) -> None:
        """One more try counted on the timer's row, in a transaction of its own: tried again later, or
        parked (`segment_timers_parked`, with the error), logged and counted, never dropped. A timer
        whose try cannot be recorded stays due as it was (logged); the others go on."""
        error = error_text(failure)
        try:
            async with self.platform.unit_of_work() as uow:
                noted = await timer_store.note_timer_failure(
                    uow.session,
                    timer,
                    error,
                    self.clock.now(),
                    retry_s=self.settings.segment_timer_retry_s,
                    max_attempts=self.settings.segment_timer_max_attempts,
                )
        except Exception as again:
            log.warning(
                "could not record a failed due timer's try; it stays due",
                extra={
                    "customer_id": timer.customer_id,
                    "segment_id": timer.segment_id,
                    "error": repr(again),
                },
            )
            return
        if noted is None:
            return  # re-evaluated, put off or parked by another worker meanwhile, or moved by an event
        where = {
            "customer_id": timer.customer_id,
            "segment_id": timer.segment_id,
            "attempts": noted.attempts,
            "error": error,
        }
        if noted.retry_at is not None:
            TIMER_FAILURES.labels("retried").inc()
            log.warning(
                "a due timer's re-evaluation failed; it is tried again later",
                extra=where | {"retry_at": noted.retry_at.isoformat()},
                exc_info=failure,
            )
            return
        TIMER_FAILURES.labels("parked").inc()
        log.error(
            "a due timer's re-evaluation kept failing: the timer is parked (segment_timers_parked); the "
            "customer's membership of the segment waits for an event of theirs the segment names, a "
            "back-fill of the segment or a requeue",
            extra=where,
            exc_info=failure,
        )

    async def run_forever(self) -> None:
        """Due timers in batches, resting `timer_interval_s` when none is left; after a failed pass
        (an outage, a passing condition of the database) twice as long each time in a row, at most
        FAILED_PASS_PAUSE_MAX_S."""
        failures = 0
        interval = self.settings.timer_interval_s
        while True:
            try:
                n = await self.run_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning(
                    "due timer pass failed; retrying",
                    extra={"error": error_text(exc), "sqlstate": sqlstate(exc), "failed_passes": failures},
                )
                await asyncio.sleep(backoff(interval, failures, max(interval, FAILED_PASS_PAUSE_MAX_S)))
                continue
            if n < self.settings.timer_batch_size:
                await asyncio.sleep(interval)

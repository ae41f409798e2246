"""The due-timer loop: re-evaluates (customer, segment) pairs whose time-based condition may flip now.

Uses the injected clock and exposes `run_once()`, so tests drive it step by step. No failing timer
holds the others back (`run_once`): one whose evaluation raises is counted in the transaction that
re-evaluates the others, a batch that fails in the database is taken apart, a batch whose pass stalls
is claimed smaller, and a batch whose every timer fails in several segments is taken for an outage.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from prometheus_client import Counter, Gauge

from services.segmenter.domain.catalog import Catalog
from services.segmenter.reevaluation import SegmentCatalogCache, reevaluate
from services.segmenter.schedules import PASSING_SQLSTATES, failure_text
from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import profiles as profile_store
from services.segmenter.store import timers as timer_store
from services.segmenter.store.timers import DueTimer, TimerFailure
from shared.clock import Clock
from shared.db.errors import set_lock_timeout, sqlstate
from shared.kafka.consumer import is_infrastructure_error
from shared.runtime import Platform

log = logging.getLogger(__name__)

TIMER_FAILURES = Counter(
    "clm_segmenter_timer_failures_total",
    "Due timers whose re-evaluation failed, outcome retried (a try counted: tried again "
    "segment_timer_retry_s later, doubled each time) or parked (after segment_timer_max_attempts "
    "failures or segment_timer_max_stalls stalls in a row: moved to segment_timers_parked); stalled "
    "(a timer whose pass alone stalled, a statement timeout say: put off, a stall counted); put_off "
    "(a batch whose every timer failed, in several segments, taken for an outage: put off, nothing "
    "counted). And due-timer passes that failed as a whole: backed_off (an outage, a passing "
    "condition of the database, or a batch taken for an outage: the loop backs off, nothing counted "
    "on the timers but stalls) or error (a failure before any timer was claimed)",
    ["outcome"],
)
PARKED = Gauge(
    "clm_segmenter_timers_parked",
    "Parked due timers (segment_timers_parked), as of this replica's last sweep (every "
    "segment_timer_sweep_s while the loop is idle)",
)
# A deadlock or serialization failure with a concurrent writer (a back-fill chunk, an event batch):
# the unit of work is tried again at once, up to CONFLICT_TRIES times in all, pausing from
# CONFLICT_PAUSE_S (doubling, jittered), then the pass stalls.
CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})
CONFLICT_TRIES = 4
CONFLICT_PAUSE_S = 0.025
# The loop's pause after a failed pass, doubling from `timer_interval_s`, at most this.
FAILED_PASS_PAUSE_MAX_S = 30.0
# How long the sweep of parked rows waits for a row another transaction holds (a requeue, a merge).
SWEEP_LOCK_TIMEOUT_MS = 1000
# Timers a worker remembers having put off for an outage; past it, it forgets them all.
OUTAGE_MEMORY = 100_000


def is_conflict(exc: BaseException) -> bool:
    return sqlstate(exc) in CONFLICT_SQLSTATES


def is_stall(exc: BaseException) -> bool:
    """A passing condition of the database that the batch itself may cause, by SQLSTATE: a statement
    timeout (`57014`), a lock timeout (`55P03`), insufficient resources (`53xxx`, but too many
    connections, an outage), a conflict with a concurrent writer on every quick try. The next pass
    claims half as many timers (`_stalled`)."""
    state = sqlstate(exc)
    return state is not None and (
        state in CONFLICT_SQLSTATES
        or state in ("57014", "55P03")
        or (state.startswith("53") and state != "53300")
    )


def is_passing(exc: BaseException) -> bool:
    """A failure that says nothing about the timers: an outage (the database unreachable, the server
    going away), a conflict with a concurrent writer, or a passing condition of the database, by
    SQLSTATE (the back-fill's `PASSING_SQLSTATES`: statement timeout, read-only transaction after a
    failover, lock timeout; and classes 53, insufficient resources, and 58, system errors). Retried
    with back-off, never counted against a timer (but a stall, `is_stall`, of a timer alone)."""
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
    """What went wrong, as stored with a parked timer and logged: the driver's message (`failure_text`:
    no statement, no parameters, first line; never the DETAIL line, which can quote a customer's
    row), storable as text (no NUL, no lone surrogate)."""
    text = failure_text(exc).replace("\x00", "\\x00")
    return text.encode("utf-8", "replace").decode("utf-8")


def origin(exc: BaseException) -> str | None:
    """Where it was raised (`file.py:line in function`, the innermost frame): logged instead of the
    traceback, whose text and chained exceptions may quote a customer's data."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {code.co_name}"


class TimersFailing(Exception):
    """Every timer of a batch failed, in more than one segment: taken for a failure of every
    evaluation (a release or a dependency that broke the evaluator), not of those timers. They are
    put off `segment_timer_retry_s`, no try counted, and the loop backs off."""


class _EveryFailed(Exception):
    """Raised inside a unit of work (rolling it back) whose every re-evaluated timer's evaluation
    raised, in more than one segment: nothing is written, `_failed_alone` decides."""

    def __init__(self, failed: list[tuple[DueTimer, Exception]]) -> None:
        super().__init__(f"every one of {len(failed)} due timers failed")
        self.failed = failed


@dataclass
class _Fired:
    """A unit of work that committed: timers re-evaluated without a failure, and those whose
    evaluation raised, counted in the same unit (with the error and what was noted)."""

    ok: int = 0
    charged: list[tuple[Exception, TimerFailure]] = field(default_factory=list)


def charged_timers(
    timers: Iterable[DueTimer], failed: Mapping[tuple[str, str], Exception], catalog: Catalog
) -> list[tuple[DueTimer, Exception]]:
    """The claimed timers the failed pairs are counted on: the pair's own timer, or the customer's
    timers whose segments it was evaluated for (a segment built on them, `member_of`, failed)."""
    by_customer: dict[str, dict[str, Exception]] = {}
    for (cid, sid), exc in failed.items():
        by_customer.setdefault(cid, {})[sid] = exc
    out: list[tuple[DueTimer, Exception]] = []
    for t in timers:
        bad = by_customer.get(t.customer_id)
        if not bad:
            continue
        own = bad.get(t.segment_id)
        if own is None:
            reach = catalog.with_dependents({t.segment_id})
            own = next((e for sid, e in sorted(bad.items()) if sid in reach), None)
        if own is not None:
            out.append((t, own))
    return out


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
        # Timers per batch after a stalled pass (halved each time, doubled back by each pass that goes
        # through); None: `timer_batch_size`.
        self._limit: int | None = None
        # (customer, segment) -> times this worker put the timer off for an outage (`_outage`).
        self._taken_for_outage: dict[tuple[str, str], int] = {}
        # When `maybe_sweep` last swept (None: not yet, so it sweeps at the loop's start).
        self._swept_at: datetime | None = None

    def batch_size(self) -> int:
        full = self.settings.timer_batch_size
        return full if self._limit is None else min(self._limit, full)

    async def run_once(self) -> int:
        """One batch of due timers (oldest first); the number claimed.

        A timer whose pair's evaluation raises has a try counted in the unit of work that commits the
        others (`reevaluate` with `failed`): tried again later, parked after its tries.
        When every timer of the batch failed so, in more than one segment, the batch is taken for an
        outage (`_failed_alone`): nothing counted, the timers put off, `TimersFailing` raised for the
        loop to back off. An outage or a passing condition of the database (`is_passing`; a conflict
        after CONFLICT_TRIES quick tries) is raised, nothing counted however long it lasts; one the
        batch may cause (`is_stall`) makes the next pass claim half as many timers, and is counted as
        a stall on a timer claimed alone (`_stalled`). A batch that fails in the database for another
        reason (a constraint, a bug) is taken apart by halves (`_isolate`): claimed oldest first, its
        timers would otherwise fail every pass first, and every later timer of every customer stay
        due behind them."""
        try:
            return await self._pass()
        except Exception as exc:
            passing = isinstance(exc, TimersFailing) or is_passing(exc)
            TIMER_FAILURES.labels("backed_off" if passing else "error").inc()
            raise

    async def _pass(self) -> int:
        claimed: list[DueTimer] = []
        try:
            fired = await self._unit(claimed, self.batch_size())
        except _EveryFailed as every:
            await self._failed_alone(every.failed, every=True)
            return len(claimed)
        except Exception as exc:
            if not claimed:
                raise
            if is_stall(exc):
                await self._stalled(claimed, exc)
                raise
            if is_passing(exc):
                raise
            log.warning(
                "due timer batch failed; isolating the failing timers",
                extra={"size": len(claimed), "error": error_text(exc), "sqlstate": sqlstate(exc)},
            )
            # By customer: the timers of a customer whose profile fails every statement go together.
            failed, ok = await self._isolate(sorted(claimed), exc)
            await self._failed_alone(failed, every=ok == 0)
            return len(claimed)
        self._report(fired.charged, "attempts")
        if self._limit is not None:
            self._limit *= 2
            if self._limit >= self.settings.timer_batch_size:
                self._limit = None
        if self._taken_for_outage:
            for t in claimed:
                self._taken_for_outage.pop((t.customer_id, t.segment_id), None)
        return len(claimed)

    async def _unit(self, claimed: list[DueTimer], limit: int, keys: list[DueTimer] | None = None) -> _Fired:
        """`_fire`, tried again after a short, growing pause when a conflict with a concurrent writer
        failed it; raised after CONFLICT_TRIES. `claimed` holds what the last try claimed."""
        attempt = 1
        while True:
            claimed.clear()
            try:
                return await self._fire(claimed, limit, keys)
            except Exception as exc:
                if attempt == CONFLICT_TRIES or not is_conflict(exc):
                    raise
                log.info(
                    "due timer unit of work met a concurrent writer; retrying",
                    extra={"sqlstate": sqlstate(exc), "attempt": attempt},
                )
                await asyncio.sleep(backoff(CONFLICT_PAUSE_S, attempt, 1.0))
                attempt += 1

    async def _fire(self, claimed: list[DueTimer], limit: int, keys: list[DueTimer] | None) -> _Fired:
        """Claim due timers (or these `keys`, those still there and due) and re-evaluate their pairs
        in one unit of work; `claimed` receives them as soon as they are claimed (what a failed unit
        had taken: its delete rolled back, they are due again). A pair whose evaluation raises has its
        timer's try counted here (`timer_store.charge_claimed`), the others commit; when they all
        raised, in more than one segment, `_EveryFailed` rolls it all back."""
        now = self.clock.now()
        async with self.platform.unit_of_work() as uow:
            claimed[:] = await timer_store.claim_due_timers(uow.session, now, limit, keys)
            if not claimed:
                return _Fired()
            catalog = await self.catalog_cache.refresh(uow.session)
            affected: dict[str, set[str]] = {}
            for t in claimed:
                affected.setdefault(t.customer_id, set()).add(t.segment_id)
            profiles = await profile_store.lock_profiles(uow.session, affected)
            # A deleted segment's timer, or an erased or merged-away customer's, is dropped.
            known = catalog.ids
            affected = {c: s & known for c, s in affected.items() if c in profiles}
            failed: dict[tuple[str, str], Exception] = {}
            await reevaluate(
                uow, catalog, profiles, affected, dict.fromkeys(profiles, "schedule"), now, failed
            )
            live = [t for t in claimed if t.segment_id in affected.get(t.customer_id, ())]
            if not failed:
                return _Fired(ok=len(live))
            charged = charged_timers(live, failed, catalog)
            if len(charged) == len(live) and len({t.segment_id for t, _ in charged}) > 1:
                raise _EveryFailed(charged)
            noted = await timer_store.charge_claimed(
                uow.session,
                [(t, error_text(exc)) for t, exc in charged],
                now,
                retry_s=self.settings.segment_timer_retry_s,
                max_attempts=self.settings.segment_timer_max_attempts,
            )
        return _Fired(
            ok=len(live) - len(charged),
            charged=[(exc, n) for (_, exc), n in zip(charged, noted, strict=True)],
        )

    async def _isolate(
        self, timers: list[DueTimer], error: Exception
    ) -> tuple[list[tuple[DueTimer, Exception]], int]:
        """The timers of a unit of work that failed in the database with `error` that fail alone, with
        why, found by halves as the consumers find a poison message (`shared.kafka.consumer`): a part
        that succeeds commits in one unit of work, a failing one is split again, down to single
        timers; and how many timers went through. One failing timer in a batch of 1,000 costs about
        20 units of work, in the same pass (evaluations that raise do not split: they are counted
        in their unit). An outage or a passing condition meanwhile is raised (the parts done stay
        done, the others due)."""
        if len(timers) == 1:
            return [(timers[0], error)], 0
        middle = len(timers) // 2
        failed: list[tuple[DueTimer, Exception]] = []
        ok = 0
        for part in (timers[:middle], timers[middle:]):
            try:
                fired = await self._unit([], len(part), part)
            except _EveryFailed as every:
                failed += every.failed
                continue
            except Exception as exc:
                if is_passing(exc):
                    raise
                alone, done = await self._isolate(part, exc)
                failed += alone
                ok += done
                continue
            self._report(fired.charged, "attempts")
            ok += fired.ok
        return failed, ok

    async def _failed_alone(self, failed: list[tuple[DueTimer, Exception]], *, every: bool) -> None:
        """One more try counted on each timer that failed alone (in place, in one transaction of its
        own): tried again later, or parked. When no timer of the batch went through (`every`) and
        those that failed are of more than one segment, it is taken for an outage (`_outage`):
        nothing counted, the timers put off `segment_timer_retry_s` (those after them get their turn:
        they would be claimed first again on every pass), and `TimersFailing` raised for the loop's
        back-off. (Timers of one segment that all fail, a broken definition, are counted.) A try that
        cannot be recorded leaves the timers due as they were (logged)."""
        if not failed:
            return
        count: list[tuple[DueTimer, Exception]] = failed
        put_off: list[DueTimer] = []
        if every and len({t.segment_id for t, _ in failed}) > 1:
            count, put_off = self._outage(failed)
        now = self.clock.now()
        try:
            async with self.platform.unit_of_work() as uow:
                if put_off:
                    await timer_store.put_off(uow.session, put_off, now, self.settings.segment_timer_retry_s)
                noted = await timer_store.note_failures(
                    uow.session,
                    [(t, error_text(exc)) for t, exc in count],
                    now,
                    counter="attempts",
                    retry_s=self.settings.segment_timer_retry_s,
                    max_tries=self.settings.segment_timer_max_attempts,
                )
        except Exception as again:
            if is_passing(again):
                raise
            log.error(
                "could not record the failed due timers' tries; they stay due",
                extra={"timers": len(failed), "error": error_text(again), "sqlstate": sqlstate(again)},
            )
            return
        why = {(t.customer_id, t.segment_id): exc for t, exc in count}
        self._report([(why[n.customer_id, n.segment_id], n) for n in noted], "attempts")
        if put_off:
            TIMER_FAILURES.labels("put_off").inc(len(put_off))
            first = failed[0][1]
            segments = len({t.segment_id for t, _ in failed})
            error = TimersFailing(
                f"all {len(failed)} due timers of the batch failed, in {segments} segments: taken for "
                f"an outage, {len(put_off)} put off, no try counted ({error_text(first)})"
            )
            raise error from first

    def _outage(
        self, failed: list[tuple[DueTimer, Exception]]
    ) -> tuple[list[tuple[DueTimer, Exception]], list[DueTimer]]:
        """A batch taken for an outage: (those to count all the same, those to put off). A timer this
        worker has now put off `segment_timer_outage_passes` times is counted: segments broken at
        once while nothing else is due would otherwise be tried for ever."""
        if len(self._taken_for_outage) > OUTAGE_MEMORY:
            self._taken_for_outage.clear()  # fired or parked by other workers meanwhile: forget them
        count: list[tuple[DueTimer, Exception]] = []
        put_off: list[DueTimer] = []
        for t, exc in failed:
            key = (t.customer_id, t.segment_id)
            seen = self._taken_for_outage.get(key, 0) + 1
            if seen >= self.settings.segment_timer_outage_passes:
                self._taken_for_outage.pop(key, None)
                count.append((t, exc))
            else:
                self._taken_for_outage[key] = seen
                put_off.append(t)
        return count, put_off

    async def _stalled(self, claimed: list[DueTimer], exc: Exception) -> None:
        """A pass that stalled (`is_stall`): the next claims half as many timers (down to one, the
        oldest: the pass of the timer at fault stalls alone, the others go through behind it); a
        timer claimed alone has a stall counted, in place, and is put off as a failed one is, then
        parked after `segment_timer_max_stalls` in a row. Logged; the pass is raised all the same."""
        if len(claimed) > 1:
            self._limit = max(1, len(claimed) // 2)
            log.warning(
                "due timer pass stalled; the next claims fewer timers",
                extra={
                    "claimed": len(claimed),
                    "next": self._limit,
                    "error": error_text(exc),
                    "sqlstate": sqlstate(exc),
                },
            )
            return
        self._limit = 1
        now = self.clock.now()
        try:
            async with self.platform.unit_of_work() as uow:
                noted = await timer_store.note_failures(
                    uow.session,
                    [(claimed[0], error_text(exc))],
                    now,
                    counter="stalls",
                    retry_s=self.settings.segment_timer_retry_s,
                    max_tries=self.settings.segment_timer_max_stalls,
                )
        except Exception as again:
            log.warning(
                "could not record a stalled due timer; it stays due",
                extra={"error": error_text(again), "sqlstate": sqlstate(again)},
            )
            return
        self._report([(exc, n) for n in noted], "stalls")

    def _report(
        self, noted: Iterable[tuple[Exception, TimerFailure]], counter: Literal["attempts", "stalls"]
    ) -> None:
        """Log and count what was noted on timers that failed (`attempts`) or stalled (`stalls`): the
        error's text and where it was raised, never the exception itself."""
        for exc, n in noted:
            where = {
                "customer_id": n.customer_id,
                "segment_id": n.segment_id,
                counter: n.tries,
                "error": error_text(exc),
                "sqlstate": sqlstate(exc),
                "at": origin(exc),
            }
            if n.retry_at is None:
                TIMER_FAILURES.labels("parked").inc()
                log.error(
                    "a due timer's re-evaluation kept failing: the timer is parked (segment_timers_parked); "
                    "the customer's membership of the segment waits for an event of theirs the segment "
                    "names, a back-fill of the segment or a requeue",
                    extra=where,
                )
            elif counter == "stalls":
                TIMER_FAILURES.labels("stalled").inc()
                log.warning(
                    "a due timer's pass stalled alone; it is tried again later",
                    extra=where | {"retry_at": n.retry_at.isoformat()},
                )
            else:
                TIMER_FAILURES.labels("retried").inc()
                log.warning(
                    "a due timer's re-evaluation failed; it is tried again later",
                    extra=where | {"retry_at": n.retry_at.isoformat()},
                )

    async def sweep(self) -> int:
        """Delete the parked rows whose customer or segment no longer exists (left by a release that did
        not know the table: its erasures, merges and deletions leave them, and their errors may quote
        a customer's data); set the parked-timers gauge. The number deleted."""
        async with self.platform.unit_of_work() as uow:
            await set_lock_timeout(uow.session, SWEEP_LOCK_TIMEOUT_MS)
            gone, left = await timer_store.sweep_parked(uow.session)
        PARKED.set(left)
        if gone:
            log.warning(
                "deleted parked due timers of customers or segments no longer there (erased, merged "
                "or deleted by an earlier release)",
                extra={"deleted": gone, "parked": left},
            )
        return gone

    async def maybe_sweep(self) -> None:
        """`sweep`, at the first call and then every `segment_timer_sweep_s` at most; a failure is
        logged (tried again after the interval)."""
        now = self.clock.now()
        last = self._swept_at
        if last is not None and 0 <= (now - last).total_seconds() < self.settings.segment_timer_sweep_s:
            return
        self._swept_at = now
        try:
            await self.sweep()
        except Exception as exc:
            log.warning(
                "could not sweep parked due timers; tried again later",
                extra={"error": error_text(exc), "sqlstate": sqlstate(exc)},
            )

    async def run_forever(self) -> None:
        """Due timers in batches, resting `timer_interval_s` when none is left (and sweeping parked
        rows then, `maybe_sweep`); after a failed pass twice as long each time in a row, at most
        FAILED_PASS_PAUSE_MAX_S."""
        failures = 0
        interval = self.settings.timer_interval_s
        idle = True
        while True:
            if idle:
                await self.maybe_sweep()
            limit = self.batch_size()
            try:
                n = await self.run_once()
                failures = 0
            except Exception as exc:
                failures += 1
                log.warning(
                    "due timer pass failed; retrying",
                    extra={"error": error_text(exc), "sqlstate": sqlstate(exc), "failed_passes": failures},
                )
                await asyncio.sleep(backoff(interval, failures, max(interval, FAILED_PASS_PAUSE_MAX_S)))
                continue
            idle = n < limit
            if idle:
                await asyncio.sleep(interval)

"""Background work without events: segment back-fill (the due timers of time-based conditions are
`due_timers.py`'s).

Both loops use the injected clock and expose `run_once()`, so tests drive them step by step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from prometheus_client import Counter

from services.segmenter.conflicts import is_transient_conflict
from services.segmenter.domain.catalog import Catalog, SegmentRule
from services.segmenter.domain.rules import InvalidRule
from services.segmenter.reevaluation import SegmentCatalogCache
from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import segments as segment_store
from shared.clock import Clock
from shared.contracts.topics import SEGMENT_MEMBERSHIP
from shared.db.errors import sqlstate
from shared.kafka.consumer import is_infrastructure_error
from shared.privacy import erasure_gate
from shared.runtime import Platform

log = logging.getLogger(__name__)

BACKFILL_FAILURES = Counter(
    "clm_segmenter_backfill_failures_total",
    "Back-fill chunks that failed after their segment was claimed: outcome retried (a failure "
    "counted on the segment, tried again backfill_retry_after_s later, behind the others), failed "
    "(backfill_max_failures failures or backfill_max_stalls stalls in a row, or its stored "
    "definition is invalid: the segment is marked failed until retried or saved again), "
    "backed_off (a passing cause, an outage, or a conflict on every one of backfill_conflict_tries "
    "tries: a stall, tried again backfill_retry_after_s later, doubled for each stall in a row, at "
    "most backfill_max_backoff_s) or conflict (a deadlock or serialization failure with a "
    "concurrent writer, tried again after a short pause)",
    ["outcome"],
)
# The error kept on the segment (shown by the API): the driver's message, not the statement.
ERROR_CHARS = 500
# Passing causes, most likely not the segment's: statement timeout (under load), read-only
# transaction (a connection to a former primary after a failover), lock timeout; and class 53,
# insufficient resources (disk full, out of memory; too many connections, 53300, is an outage
# already). Each is a stall, not a failure: `backfill_max_stalls` in a row without progress (a chunk
# that outlasts the statement timeout, or runs out of memory, every time) fail the segment too.
PASSING_SQLSTATES = frozenset({"57014", "25006", "55P03"})


def failure_text(exc: BaseException) -> str:
    """`CheckViolationError: new row for relation ...`: the driver's error, not SQLAlchemy's wrapper
    (whose text repeats the whole chunk statement and its parameters), first line only (PostgreSQL's
    DETAIL line can quote a customer's row)."""
    orig = getattr(exc, "orig", None)
    cause = exc if orig is None else (orig.__cause__ or orig)
    return f"{type(cause).__name__}: {str(cause).partition(chr(10))[0]}"[:ERROR_CHARS]


def _position(row: dict[str, Any]) -> tuple[Any, ...]:
    """Where a claimed segment's pass stands: conflicts count in a row on one chunk of one pass."""
    return (row["version"], row["backfill_started_at"], row["backfill_cursor"])


def conflict_pause_s(first: float, tries: int) -> float:
    """The longest pause after a chunk's `tries`-th conflict in a row: `first`, doubling, at most 1 s
    (the exponent bounded too: no overflow, whatever the tries)."""
    return min(first * 2.0 ** min(tries - 1, 30), 1.0)


def failure_kind(exc: BaseException) -> str:
    """What a chunk's failure says: `conflict` (a deadlock or serialization failure with a concurrent
    writer: tried again after a short pause, a stall once `backfill_conflict_tries` tries met one),
    `outage` (the connection or the server went: the transaction is gone), `passing` (a cause that
    passes and may not be the segment's: a stall, backed off), `invalid` (its stored definition) or
    `segment` (anything else: counted on it)."""
    if is_transient_conflict(exc):
        return "conflict"
    if is_infrastructure_error(exc):
        return "outage"
    if isinstance(exc, InvalidRule):
        return "invalid"
    state = sqlstate(exc)
    if state is not None and (state in PASSING_SQLSTATES or state.startswith("53")):
        return "passing"
    return "segment"


class Backfill:
    """Evaluates a new or edited segment over every existing profile, chunk by chunk (each chunk one
    set-based statement and one transaction), with progress stored on the segment row."""

    def __init__(
        self, platform: Platform, clock: Clock, catalog: SegmentCatalogCache, settings: SegmenterSettings
    ):
        self.platform, self.clock, self.catalog_cache, self.settings = platform, clock, catalog, settings
        self.wake = asyncio.Event()
        # (segment, version) whose invalid stored definition `fail_invalid` has dealt with.
        self._invalid_seen: set[tuple[str, int]] = set()
        # (segment, its pass's position, conflicts met there in a row by this worker): one slot, cleared
        # when a chunk ends otherwise or a claim finds another segment or none.
        self._conflict: tuple[str, tuple[Any, ...], int] | None = None
        # The pause before a conflicting chunk's next try, and its jitter: tests record them instead.
        self.pause: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.jitter: Callable[[float, float], float] = random.uniform
        # When `recover_valid` last looked (None: not yet, so it looks at the first pass).
        self._rechecked_at: datetime | None = None

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
        """Finish one half-done deletion, back-fill again the segments failed for a stored definition
        that validates now (`recover_valid`), mark failed the segments whose stored definition no
        longer validates, or process one chunk of one segment; False when nothing is waiting.

        A chunk runs in a savepoint: when it fails, the failure is recorded in the chunk's own
        transaction, the segment's row still locked (no other replica re-runs the chunk meanwhile, a
        restart waiting for the lock finds its new pass clean). Counted on the segment (which goes
        behind the others, is retried `backfill_retry_after_s` later, and is `failed` after
        `backfill_max_failures` in a row) unless it is a passing cause (`failure_kind`), which is a
        stall: it backs the segment off, twice as long as the stall before (at most
        `backfill_max_backoff_s`), and `backfill_max_stalls` in a row without progress fail it (a
        chunk that always outlasts the statement timeout). A conflict with a concurrent writer (a
        deadlock, a serialization failure) is tried again, in a new transaction after a short
        jittered pause, `backfill_conflict_tries` times in all; the last try's conflict is a stall
        (a chunk that deadlocks every time is backed off, then failed, never spun on). An outage is
        raised, and is a stall of the segment first if the database still answers, so a segment
        whose chunk kills its connection (or the server) does not stay first, nor come back every
        minute, for ever."""
        if await self.finish_deletion():
            return True
        if await self.recover_valid():
            return True
        if await self.fail_invalid():
            return True
        while True:
            now = self.clock.now()
            claimed: dict[str, Any] = {}
            try:
                return await self._chunk(now, claimed)
            except Exception as exc:
                kind = failure_kind(exc) if claimed else None
                if kind == "outage":
                    await self._back_off(claimed, exc, now)
                if kind != "conflict":
                    raise
                tries = self._note_conflict(claimed)
                if tries >= self.settings.backfill_conflict_tries:
                    # The last try's conflict struck outside the chunk's savepoint (the commit, the
                    # restart of its dependents): its transaction is gone, recorded in one of its own.
                    self._conflict = None
                    await self._back_off(claimed, exc, now)
                    return True
                BACKFILL_FAILURES.labels("conflict").inc()
                pause = self.jitter(0.5, 1.0) * conflict_pause_s(
                    self.settings.backfill_conflict_pause_s, tries
                )
                log.info(
                    "segment back-fill chunk met a concurrent writer; tried again",
                    extra={
                        "segment_id": claimed["segment_id"],
                        "tries": tries,
                        "error": failure_text(exc),
                        "pause_s": round(pause, 3),
                    },
                )
                # No lock held meanwhile (the transaction is gone): the other writer goes on.
                await self.pause(pause)

    def _conflicts_in_a_row(self, row: dict[str, Any]) -> int:
        seen = self._conflict
        return seen[2] if seen is not None and seen[:2] == (row["segment_id"], _position(row)) else 0

    def _note_conflict(self, row: dict[str, Any]) -> int:
        tries = self._conflicts_in_a_row(row) + 1
        self._conflict = (row["segment_id"], _position(row), tries)
        return tries

    async def recover_valid(self) -> bool:
        """Back-fill again, from the first customer, the segments `failed` for a stored definition
        that validates now (saved by a later release, failed by an earlier one after a rollback,
        accepted again by this one), logged; at the first pass, then every
        `backfill_invalid_recheck_s` (0: never). Only those: other failures wait for a retry or a
        save. One built on another restarted here waits for it: the end of that one's pass restarts
        it. True if it restarted any."""
        interval = self.settings.backfill_invalid_recheck_s
        if interval <= 0:
            return False
        now = self.clock.now()
        last = self._rechecked_at
        if last is not None and 0 <= (now - last).total_seconds() < interval:
            return False
        async with self.platform.unit_of_work() as uow:
            failed = await segment_store.failed_for_definition(uow.session)
            restarted: list[tuple[SegmentRule, datetime | None]] = []
            existing: set[str] = set()
            if failed:
                catalog = await self.catalog_cache.refresh(uow.session)
                valid = {(s.segment_id, s.version): s for s in catalog.segments}
                mended = {
                    sid: (valid[sid, version], at) for sid, version, at in failed if (sid, version) in valid
                }
                # Built on one restarted here: restarted when that one's pass ends (seeing its new
                # memberships), not twice.
                later = catalog.with_dependents(
                    {d for sid in mended for d in catalog.dependents.get(sid, ())}
                )
                restarted = [
                    (seg, at)
                    for sid, (seg, at) in mended.items()
                    if sid not in later
                    and await segment_store.restart_failed_definition(uow.session, sid, seg.version, now)
                ]
                existing = catalog.ids | set(self.catalog_cache.invalid)
        # Looked: not again for `interval` (but at once after an outage, which raised before this).
        self._rechecked_at = now
        for seg, failed_at in restarted:
            log.warning(
                "segment's stored definition validates again; back-filled again from the first customer, "
                "announcing every membership that changed since",
                extra={
                    "segment_id": seg.segment_id,
                    "version": seg.version,
                    "failed_at": failed_at.isoformat() if failed_at else None,
                },
            )
            gone = sorted(seg.refs.segments - existing)
            if gone:
                # Not checked as a save checks it: no member of these is found.
                log.warning(
                    "segment back-filled again refers (member_of) to segments that no longer exist; "
                    "none of their members counts",
                    extra={"segment_id": seg.segment_id, "version": seg.version, "missing": gone},
                )
        return bool(restarted)

    async def fail_invalid(self) -> bool:
        """Mark `failed` (whatever their status, naming the nodes) the segments whose stored definition
        no longer validates: the catalogue leaves them out, so nothing updates them any more, and a
        `ready` one would go on looking up to date. True if it marked any."""
        now = self.clock.now()
        async with self.platform.unit_of_work() as uow:
            await self.catalog_cache.refresh(uow.session)
            todo = sorted(
                (sid, version, why)
                for sid, (version, why) in self.catalog_cache.invalid.items()
                if (sid, version) not in self._invalid_seen
            )
            marked = [
                (sid, version, why)
                for sid, version, why in todo
                if await segment_store.fail_definition(uow.session, sid, version, why[:ERROR_CHARS], now)
            ]
        self._invalid_seen.update((sid, version) for sid, version, _ in todo)
        for sid, version, why in marked:
            BACKFILL_FAILURES.labels("failed").inc()
            log.error(
                "segment failed: its stored definition is invalid; save it again",
                extra={"segment_id": sid, "version": version, "error": why},
            )
        return bool(marked)

    async def _back_off(self, row: dict[str, Any], exc: BaseException, now: datetime) -> None:
        """After an outage that struck a claimed segment's chunk (its transaction is gone): a stall,
        recorded in a transaction of its own, if the database answers (else nothing: no segment is
        claimed while it does not)."""
        try:
            async with self.platform.unit_of_work() as uow:
                recorded = await segment_store.record_backfill_failure(
                    uow.session,
                    row,
                    failure_text(exc),
                    now,
                    counted=False,
                    max_failures=self.settings.backfill_max_failures,
                    max_stalls=self.settings.backfill_max_stalls,
                )
        except Exception as again:
            log.debug("could not back the segment off", extra={"error": repr(again)})
            return
        if recorded is not None:
            self._report(row, failure_text(exc), recorded, counted=False)

    def _report(
        self, row: dict[str, Any], error: str, recorded: segment_store.RecordedFailure, *, counted: bool
    ) -> None:
        outcome = "failed" if recorded.status == "failed" else "retried" if counted else "backed_off"
        BACKFILL_FAILURES.labels(outcome).inc()
        extra = {
            "segment_id": row["segment_id"],
            "version": row["version"],
            "failures": recorded.failures,
            "stalls": recorded.stalls,
            "error": error,
        }
        if outcome != "failed":
            extra["retry_in_s"] = segment_store.backoff_s(
                recorded.stalls, self.settings.backfill_retry_after_s, self.settings.backfill_max_backoff_s
            )
        if outcome == "failed":
            log.error("segment back-fill failed; stopped until retried or saved again", extra=extra)
        elif outcome == "retried":
            log.warning(
                "segment back-fill chunk failed; retried later, behind the other segments", extra=extra
            )
        else:
            log.warning(
                "segment back-fill chunk stalled (a passing cause, an outage or a conflict on every "
                "try); retried later, backing off",
                extra=extra,
            )

    async def _chunk(self, now: datetime, claimed: dict[str, Any]) -> bool:
        """One chunk of one segment; the segment's row is copied into `claimed` once it is locked."""
        dependents_to_restart: set[str] = set()
        failure: tuple[str, segment_store.RecordedFailure, bool] | None = None
        async with self.platform.unit_of_work() as uow:
            # Shared, like an event batch, before any row lock: an erasure waits for a chunk in flight
            # (and then deletes the memberships it wrote), or the chunk reads the base after the
            # erasure committed. Back-fills never wait on each other or on event batches for it.
            await erasure_gate(uow.session, exclusive=False)
            row = await segment_store.claim_backfill(
                uow.session, now, self.settings.backfill_retry_after_s, self.settings.backfill_max_backoff_s
            )
            if row is None:
                self._conflict = None
                return False
            if self._conflict is not None and self._conflict[0] != row["segment_id"]:
                self._conflict = None  # in a row: another segment's chunk came in between
            claimed.update(row)
            catalog = await self.catalog_cache.refresh(uow.session)
            seg = next((s for s in catalog.segments if s.segment_id == row["segment_id"]), None)
            if seg is None:
                # Left out of the catalogue: its stored definition is invalid (saved by a release
                # that accepted it). Failed at once, saying why, not `ready` with no member.
                why = self.catalog_cache.invalid.get(
                    row["segment_id"],
                    (
                        row["version"],
                        f"{segment_store.DEFINITION_ERROR}the stored definition does not validate",
                    ),
                )[1]
                if await segment_store.fail_definition(
                    uow.session, row["segment_id"], row["version"], why[:ERROR_CHARS], now
                ):
                    failure = (
                        why,
                        segment_store.RecordedFailure(
                            "failed", row["backfill_failures"] + 1, row["backfill_stalls"]
                        ),
                        True,
                    )
            else:
                try:
                    async with uow.session.begin_nested():
                        dependents_to_restart = await self._run_chunk(uow.session, seg, row, catalog, now)
                except Exception as exc:
                    kind = failure_kind(exc)
                    if kind == "conflict" and (
                        self._conflicts_in_a_row(row) + 1 >= self.settings.backfill_conflict_tries
                    ):
                        kind = "passing"  # its last try: a stall, recorded while the row is held
                    if kind in ("conflict", "outage"):
                        raise
                    # Rolled back to the savepoint: the row is still locked by this transaction.
                    error, counted = failure_text(exc), kind != "passing"
                    recorded = await segment_store.record_backfill_failure(
                        uow.session,
                        row,
                        error,
                        now,
                        counted=counted,
                        max_failures=1 if kind == "invalid" else self.settings.backfill_max_failures,
                        max_stalls=self.settings.backfill_max_stalls,
                    )
                    if recorded is not None:
                        failure = (error, recorded, counted)
            if dependents_to_restart:
                # Segments built on this one see its new memberships only after their own pass.
                await segment_store.restart_backfill(uow.session, dependents_to_restart, now)
        self._conflict = None
        if failure is not None:
            self._report(row, failure[0], failure[1], counted=failure[2])
        else:
            self.platform.relay.notify()  # outbox rows written by SQL, not through uow.emit
        return True

    async def _run_chunk(
        self, session: Any, seg: SegmentRule, row: dict[str, Any], catalog: Catalog, now: datetime
    ) -> set[str]:
        """The chunk after the segment's cursor, or the end of its pass (returns the segments to
        back-fill again then: those built on it)."""
        started = time.perf_counter()
        upto = await segment_store.chunk_upper_bound(
            session, row["backfill_cursor"], self.settings.backfill_chunk_size
        )
        if upto is None:
            await segment_store.advance_backfill(
                session, seg.segment_id, row["backfill_cursor"], 0, True, now
            )
            return catalog.dependents.get(seg.segment_id, set())
        seen, changed = await segment_store.backfill_chunk(
            session,
            seg.segment_id,
            seg.rule,
            row["backfill_cursor"],
            upto,
            now,
            self._announcement(seg.name, now),
        )
        await segment_store.advance_backfill(session, seg.segment_id, upto, seen, False, now)
        log.debug(
            "backfill chunk",
            extra={
                "segment_id": seg.segment_id,
                "seen": seen,
                "changed": changed,
                "s": time.perf_counter() - started,
            },
        )
        return set()

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

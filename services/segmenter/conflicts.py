"""Conflicts between units of work writing the same customers, and how each kind of unit meets them.

Event batches lock their customers in id order, but a batch with a merge locks the merge's two rows
first (`store.profiles.merge_customers`), so two batches, or a batch and a whole-base job holding
customer rows in id order (the recommendations recompute, the profile republish, the lifecycle
write-back), can deadlock. The unit that loses rolled back whole: it runs again.

A job gives way to the event path: it takes its customers' row locks under a short lock timeout
(`hold_for_job`), so in a deadlock with an event batch it gives up after `JOB_LOCK_TIMEOUT_MS`
instead of both waiting out PostgreSQL's `deadlock_timeout` (1 s, the batch stalled all along), and
it tries again after a jittered pause that lets the batch through.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from services.segmenter.store import profiles as profile_store
from shared.db.errors import is_lock_timeout, set_lock_timeout

log = logging.getLogger(__name__)
T = TypeVar("T")

# Tries of an event batch that meets a concurrent change to its customers (1-2 s of waiting in all).
CONFLICT_ATTEMPTS = 9

# How long a job's chunk waits for one customer row an event batch holds: shorter than PostgreSQL's
# deadlock_timeout (1 s), so in a deadlock the chunk gives up first. Meanwhile the chunk holds the
# rows it has, which other event batches then wait for.
JOB_LOCK_TIMEOUT_MS = 200
# Tries of a job's chunk, with a pause after each failed one from JOB_FIRST_PAUSE_S, doubling, at most
# JOB_MAX_PAUSE_S, jittered (half to all of it): 160 tries are 2.5 to 5 minutes of pauses. On a
# backlog, event batches hold their rows up to a second or so and a chunk of thousands of customers
# may give way to them again and again until it drains; a chunk still refused then fails its job
# (the recompute and the refit run again on schedule, a republish is started again).
JOB_CONFLICT_ATTEMPTS = 160
JOB_FIRST_PAUSE_S = 0.05
JOB_MAX_PAUSE_S = 2.0

# The pause between a job's tries, and its jitter: tests record the pauses instead of waiting.
pause: Callable[[float], Awaitable[None]] = asyncio.sleep
jitter: Callable[[float, float], float] = random.uniform


class ConcurrentIdentityChange(Exception):
    """Another unit linked one of the batch's identifiers after the batch looked it up."""


def is_transient_conflict(exc: BaseException) -> bool:
    """A conflict with a concurrent transaction on the same customers: retrying resolves it."""
    if isinstance(exc, (ConcurrentIdentityChange, profile_store.ProfileGone)):
        return True
    # Wrapped by SQLAlchemy (`orig`), or straight from asyncpg (the `Statement`s of every batch).
    orig = getattr(exc, "orig", None)
    cause = (getattr(orig, "__cause__", None) or orig) if orig is not None else exc
    return type(cause).__name__ in {"DeadlockDetectedError", "SerializationError"}


async def hold_for_job(session: AsyncSession) -> None:
    """Before a job's statement that locks its chunk's customers: from here to its commit, a row lock
    not granted within JOB_LOCK_TIMEOUT_MS fails the chunk (retried by `retry_job_chunk`)."""
    await set_lock_timeout(session, JOB_LOCK_TIMEOUT_MS)


def job_pause_s(attempt: int) -> float:
    """The pause after a chunk's `attempt`-th failed try."""
    return jitter(0.5, 1.0) * min(JOB_FIRST_PAUSE_S * (1 << min(attempt - 1, 30)), JOB_MAX_PAUSE_S)


async def retry_job_chunk(unit: Callable[[], Awaitable[T]], what: str) -> T:
    """Run `unit`, a job's chunk in a unit of work of its own, again when it gave way to an event batch
    (a lock timeout) or lost a deadlock to one: it rolled back, nothing is half done, and it reads
    again what it writes."""
    for attempt in range(1, JOB_CONFLICT_ATTEMPTS + 1):
        try:
            return await unit()
        except Exception as exc:
            if not (is_transient_conflict(exc) or is_lock_timeout(exc)) or attempt == JOB_CONFLICT_ATTEMPTS:
                raise
            log.info(
                "customers held by a concurrent change; trying the chunk again",
                extra={"what": what, "attempt": attempt, "lock_timeout": is_lock_timeout(exc)},
            )
        await pause(job_pause_s(attempt))
    raise AssertionError("unreachable")

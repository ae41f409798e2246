"""Conflicts between units of work writing the same customers, and how each kind of unit meets them.

Event batches lock their customers in id order, but a batch with a merge locks the merge's two rows
first (`store.profiles.merge_customers`), so two batches, or a batch and a whole-base job holding
customer rows in id order (the recommendations recompute, the profile republish), can deadlock. The
unit that loses rolled back whole: it runs again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.segmenter.store import profiles as profile_store

log = logging.getLogger(__name__)
T = TypeVar("T")

# Tries of an event batch that meets a concurrent change to its customers (1-2 s of waiting in all).
CONFLICT_ATTEMPTS = 9


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


async def retry_job_chunk(unit: Callable[[], Awaitable[T]], what: str) -> T:
    """Run `unit`, a job's chunk in a unit of work of its own, again when it lost a deadlock to an
    event batch: it rolled back, nothing is half done, and it reads again what it writes."""
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        try:
            return await unit()
        except Exception as exc:
            if not is_transient_conflict(exc) or attempt == CONFLICT_ATTEMPTS:
                raise
            log.info(
                "concurrent change to the same customers; retrying", extra={"what": what, "attempt": attempt}
            )
    raise AssertionError("unreachable")

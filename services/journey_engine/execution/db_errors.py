"""Which failures of a timer unit of work say nothing about its timers: an outage, or a passing
condition of the database (a deadlock, a full disk). The timer loop retries those, with backoff, and
counts only the others toward parking a timer (`JourneyEngine.run_once`)."""

from __future__ import annotations

import random

from shared.db.errors import sqlstate
from shared.kafka.consumer import is_infrastructure_error

# By SQLSTATE: what a second try, later, may not meet. A deadlock (an erasure locks instances, then
# their timers; a timer claim locks a timer, then its instance), a serialization failure, a lock not
# available (lock_timeout, NOWAIT), a statement cancelled (statement_timeout, an administrator),
# insufficient resources (class 53: disk full, out of memory, too many connections) and system errors
# (class 58: I/O).
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014"})
TRANSIENT_CLASSES = ("53", "58")


def is_transient(exc: BaseException) -> bool:
    """A database condition that passes (see `TRANSIENT_SQLSTATES`), not the timer's fault."""
    state = sqlstate(exc)
    return state is not None and (state in TRANSIENT_SQLSTATES or state.startswith(TRANSIENT_CLASSES))


def is_passing(exc: BaseException) -> bool:
    """An outage (the database or Kafka unreachable) or a transient condition: retried, never counted."""
    return is_infrastructure_error(exc) or is_transient(exc)


def backoff(first: float, attempt: int, most: float) -> float:
    """Seconds to wait before try `attempt + 1`: doubling from `first`, at most `most`, jittered (two
    workers that met one deadlock do not meet again in step)."""
    return random.uniform(0.5, 1.0) * min(first * 2.0 ** (attempt - 1), most)

"""How a provider outcome is classified, and when the next attempt happens."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class Failure(StrEnum):
    # Timeouts, connection errors, 5xx, 429: try again later (or the secondary provider now).
    TRANSIENT = "transient"
    # The provider refuses to work for us (401/403): the secondary provider may still work.
    PROVIDER = "provider"
    # The message itself is refused (other 4xx, refused address, rejected recipient): never retry.
    PERMANENT = "permanent"
    # The recipient's mailbox or number does not exist (SMTP 550 and friends).
    BOUNCE = "bounce"


def classify_http(status: int) -> Failure | None:
    if status < 400:
        return None
    if status == 429 or status >= 500 or status == 408:
        return Failure.TRANSIENT
    if status in (401, 403):
        return Failure.PROVIDER
    return Failure.PERMANENT


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_s: float
    max_s: float

    def backoff(
        self, attempt: int, rng: random.Random | None = None, retry_after_s: float | None = None
    ) -> float:
        """Full jitter: uniform(0, min(cap, base * 2^(attempt-1))); never sooner than Retry-After."""
        ceiling = min(self.max_s, self.base_s * 2 ** max(0, attempt - 1))
        delay = (rng or random).uniform(0, ceiling)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_s))
        return delay

    def next_attempt_at(
        self,
        now: datetime,
        attempt: int,
        rng: random.Random | None = None,
        retry_after_s: float | None = None,
    ) -> datetime | None:
        """When attempt `attempt + 1` is due, or None if `attempt` was the last one allowed."""
        if attempt >= self.max_attempts:
            return None
        return now + timedelta(seconds=self.backoff(attempt, rng, retry_after_s))

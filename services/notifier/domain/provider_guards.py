"""Per-provider protection: a circuit breaker and a token-bucket rate limiter (pure; `now` is given)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CircuitBreaker:
    """Closed -> open after `threshold` consecutive failures; after `cooldown_s` one trial call
    (half-open) decides: success closes it, failure opens it again."""

    threshold: int
    cooldown_s: float
    failures: int = 0
    opened_at: float | None = None
    trial_in_flight: bool = field(default=False)

    def allows(self, now: float) -> bool:
        if self.opened_at is None:
            return True
        if now - self.opened_at >= self.cooldown_s and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def record_success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.trial_in_flight = False

    def release_trial(self) -> None:
        """The call allowed was not made (aborted before the provider): the next one may try."""
        self.trial_in_flight = False

    def record_failure(self, now: float) -> None:
        self.failures += 1
        self.trial_in_flight = False
        if self.failures >= self.threshold or self.opened_at is not None:
            self.opened_at = now


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: float
    tokens: float = -1.0
    updated_at: float | None = None

    def reserve(self, now: float) -> float:
        """Take one token; returns how long to wait before using it (0 if available now)."""
        if self.updated_at is None:
            self.tokens = self.burst
            self.updated_at = now
        elapsed = max(0.0, now - self.updated_at)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate_per_s)
        self.updated_at = now
        self.tokens -= 1
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / self.rate_per_s

"""Journey engine settings (env prefix `CLM_`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from services.journey_engine.domain.definition import TimeOfDay
from services.journey_engine.domain.timing import QuietHours
from services.journey_engine.domain.walker import CapRule, MessagingRules
from shared.settings import BaseServiceSettings


class FrequencyCap(BaseModel):
    limit: int = Field(ge=0)
    # "day": calendar day in the customer's timezone; "week": rolling 7 days.
    period: Literal["day", "week"] = "day"


class JourneyEngineSettings(BaseServiceSettings):
    service_name: str = "journey_engine"
    port: int = 8003
    db_schema: str = "journey_engine"

    # Durable timers: how many a worker claims per transaction, how often an idle worker looks,
    # and how many workers each process runs side by side (they coordinate with SKIP LOCKED).
    timer_batch_size: int = 500
    timer_poll_interval_s: float = 0.2
    timer_workers: int = 2
    # A batch of timers that fails for a reason of its own (a bug, a constraint; not an outage, not a
    # deadlock or another transient condition) is taken apart by halves; a timer that fails alone is
    # tried again `timer_retry_s` later (doubled each time: 60 s, then 120 s), and parked
    # (`timers_parked`) once it has failed this many times.
    timer_max_attempts: int = Field(default=3, ge=1)
    timer_retry_s: float = Field(default=60.0, gt=0)
    # A batch whose every timer failed alone in several journeys, with no other journey's timer
    # stepping its instance, is taken for an outage: its timers are put off `timer_retry_s`, no try counted. A
    # worker that has taken the same timer for an outage this many times counts its tries anyway
    # (journeys broken at once while nothing else is due would otherwise be tried for ever).
    timer_outage_passes: int = Field(default=10, ge=1)
    # Tests drive the loop themselves (`engine.run_once()`) with a ManualClock.
    run_timer_loop: bool = True
    # Step counters are insert-only (a row per unit of work); a journey with more than this many rows
    # per total is rolled up every `counts_compact_interval_s`, so its stats stay a read of a few rows.
    counts_rows_per_total: int = 20
    counts_compact_interval_s: float = 300.0
    # An archive exits its journey's customers after its status change, this many per transaction;
    # every `archive_sweep_interval_s` one replica finishes archives a crash (or an entry by a
    # replica of the release before) left with customers inside.
    archive_chunk_size: int = Field(default=5000, ge=1, le=100_000)
    archive_sweep_interval_s: float = Field(default=60.0, gt=0)
    # Broadcasts (`schedule` entries, `enrol_current`) enrol a segment this many members per
    # transaction (each takes one lock per member: PostgreSQL's lock table is finite), resuming
    # after the last committed chunk; a pass works on them this long before the timers' turn. A
    # journey whose broadcast fails is retried after `broadcast_retry_s`, the others go on.
    broadcast_chunk_size: int = Field(default=500, ge=1, le=5000)
    broadcast_budget_s: float = Field(default=1.0, gt=0)
    broadcast_retry_s: float = Field(default=60.0, ge=0)
    # How often the timer worker looks for due broadcasts (timers themselves: `timer_poll_interval_s`):
    # a broadcast starts at most this late.
    broadcast_poll_interval_s: float = Field(default=1.0, gt=0)
    # Statuses only move instances waiting on an open or a click, never a send: their consumer lets the
    # broker hold a fetch until this much is waiting or this long has passed (bigger, cheaper batches;
    # an idle consumer costs 4 fetches a second at 250 ms, 20 at 50).
    statuses_fetch_min_bytes: int = 65536
    statuses_fetch_max_wait_ms: int = 250
    # Profile changes (a trait, a stage) arrive about once per event and each costs a unit of work;
    # batched the same way, a stage-triggered entry waits at most this much longer (segment-triggered
    # entries already wait as long in the segmenter).
    profiles_fetch_min_bytes: int = 65536
    profiles_fetch_max_wait_ms: int = 50

    # Global rules for marketing messages, across every journey (transactional journeys bypass them).
    # e.g. CLM_FREQUENCY_CAPS='{"email": {"limit": 2, "period": "day"}}'
    frequency_caps: dict[str, FrequencyCap] = Field(default_factory=dict)
    # Local times in each customer's timezone: no UTC offset (refused at start).
    quiet_hours_start: TimeOfDay | None = None
    quiet_hours_end: TimeOfDay | None = None
    quiet_hours_mode: Literal["hold", "skip"] = "hold"
    # For customers whose profile has no (valid) timezone.
    default_timezone: str = "UTC"

    def messaging_rules(self) -> MessagingRules:
        quiet = None
        if self.quiet_hours_start is not None and self.quiet_hours_end is not None:
            quiet = QuietHours(self.quiet_hours_start, self.quiet_hours_end)
        return MessagingRules(
            caps={channel: CapRule(cap.limit, cap.period) for channel, cap in self.frequency_caps.items()},
            quiet_hours=quiet,
            quiet_mode=self.quiet_hours_mode,
            default_timezone=self.default_timezone,
        )

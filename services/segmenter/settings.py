"""Segmenter settings (env prefix `CLM_`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.segmenter.domain.profile import TraitLimits
from shared.settings import BaseServiceSettings


class SegmenterSettings(BaseServiceSettings):
    # Days of timeline (`events`) kept, by receipt time (0: forever). Counts, first and last times and
    # commerce totals stay; rules over occurrences (time windows, property filters, dates) see only
    # what is kept, so keep more than the longest window your segments use. The lifecycle models
    # (order days, repeat value: churn risk, CLV, stages) and the KPIs are computed from the
    # timeline's orders too: a customer whose orders all fell out of it looks like one who never
    # ordered (and may change stage). Keep years, not months.
    timeline_retention_days: float = 0
    # The bound on one profile's traits (docs/services/segmenter.md, "Limits"): every profile change
    # and membership announcement carries them whole, and a Kafka message is at most 1 MB. A trait
    # change (one identify or group call) that would make them bigger than `profile_max_trait_bytes`
    # of compact JSON, or add names past `profile_max_traits`, is not applied (the event still counts).
    # Keep the bytes well under the broker's `message.max.bytes`: a message adds the identities and,
    # downstream, the event and template data.
    profile_max_trait_bytes: int = Field(default=256 * 1024, ge=1)
    profile_max_traits: int = Field(default=1000, ge=1)
    # Identities per `ProfileChanged`: a profile with more goes out in several (see `split_identities`).
    # At most 1,000: an identifier is up to 512 bytes, so 1,000 of them and the traits' 256 KB stay
    # under Kafka's 1 MB.
    profile_identities_per_message: int = Field(default=1000, ge=1, le=1000)
    service_name: str = "segmenter"
    port: int = 8002
    db_schema: str = "segmenter"
    # Events per unit of work (on a backlog; while keeping up a unit takes what arrived meanwhile).
    # Bigger units amortize the round trips of the set-based statements and each customer's work
    # (lock, evaluation, lifecycle, row update) over more of their events: 4,000 gave ~10,500 events/s
    # where 2,000 gave ~9,300 and 1,000 ~8,400 (bench-segmenter, 20k customers), 8,000 ~11,000 but
    # holds twice the memory and row locks for ~1 s.
    consumer_max_batch: int = Field(default=4000, ge=1)  # the base's bound: 0 would fetch nothing
    # On a backlog, up to four units of work at once: the database works on some while Python folds
    # and evaluates another (see `BaseServiceSettings.consumer_concurrency`).
    consumer_concurrency: int = 4
    consumer_max_partition_fetch_bytes: int = 8 * 1024 * 1024
    # A unit of work keeps ~50 objects per event alive until it commits: at 10,000 the young
    # collections examined them ~30 times a second and promoted them into costlier older ones (12% of
    # the process's CPU at the maximum rate, 2,000-event units). Above a unit's live set they die by
    # reference count first (4,000-event units: two young collections in a 10 s burst).
    gc_young_threshold: int = 400_000
    # Messages per outbox relay pass (platform default 500; whole rows). The relay shares the event loop
    # with units of thousands of events, whose Python runs for hundreds of ms between awaits, so a pass
    # takes about as long whatever its size: at 500 rows it published 23,000 of the 140,000 announcements of
    # a 100,000-event backlog while the backlog was consumed (the rest after); at 5,000, 55,000-60,000,
    # consuming at about the same rate (4,009/s in that run; 3,911 and 3,718/s in two at 5,000), and event
    # -> announcement at half the maximum went from p50/p99 541/988 to 428/811 and 305/778 ms. A pass is
    # also bounded in bytes (`outbox_batch_bytes`): snapshots can be hundreds of KB each.
    outbox_batch_size: int = Field(default=5000, ge=1)
    # Batches, not single events, even at low rates: the broker holds a fetch until 64 KB (a few hundred
    # events) are waiting or 50 ms have passed. Fewer, bigger units of work cost far less CPU, which the
    # journey engine and notifier (on the path to a customer's message) need more; the segmenter's
    # announcements take up to 50 ms longer when traffic is light.
    consumer_fetch_min_bytes: int = 65536
    consumer_fetch_max_wait_ms: int = 50
    # Message statuses only feed engagement counts: their fetches may wait longer (an idle consumer
    # then costs 4 fetches a second, not 20). Privacy requests are long-polled (`LONG_POLL`).
    statuses_fetch_max_wait_ms: int = Field(default=250, gt=0, le=5000)
    # Due timers claimed per transaction, and how often the loop looks for due ones.
    timer_batch_size: int = 1000
    timer_interval_s: float = 1.0
    # A due timer whose re-evaluation fails (its evaluation raises: the other timers of its batch go
    # through in the same transaction; or the batch fails in the database, taken apart by halves) is
    # tried again `segment_timer_retry_s` later, doubled each time (60 s, then 120 s; at most a day),
    # and parked (`segment_timers_parked`) once it has failed this many times in a row. Bounded: the
    # tries are retried, not spun on (20 tries at 60 s already wait past a year, capped to a day each).
    segment_timer_max_attempts: int = Field(default=3, ge=1, le=20)
    segment_timer_retry_s: float = Field(default=60.0, ge=0, le=86400)
    # A batch whose pass stalls (a statement or lock timeout, running out of memory, a deadlock on every
    # quick try) is claimed half as big at the next pass, down to a single timer, and grows back as
    # passes go through; a single timer whose pass stalls is put off as a failed one is (same waits),
    # no try counted, and parked after this many stalls in a row: a customer whose re-evaluation always
    # outlasts the statement timeout no longer holds every later timer back.
    segment_timer_max_stalls: int = Field(default=10, ge=1, le=50)
    # A batch whose every timer failed, in more than one segment, is taken for a failure of every
    # evaluation (a release or a dependency that broke the evaluator), not of those timers: they are put
    # off `segment_timer_retry_s`, no try counted, and the loop backs off. A timer this worker has put
    # off so this many times is counted all the same (segments broken at once while nothing else is
    # due would otherwise be tried for ever).
    segment_timer_outage_passes: int = Field(default=10, ge=1, le=1000)
    # How often (and at start) the loop, when idle, deletes parked timers whose customer or segment no
    # longer exists (an erasure, a merge or a deletion by a release that does not know the table: a
    # rolling upgrade or a rollback), and sets the parked-timers gauge.
    segment_timer_sweep_s: float = Field(default=600.0, gt=0)
    # Customers per back-fill transaction, and how often the back-fill loop looks for work.
    backfill_chunk_size: int = 50000
    backfill_poll_interval_s: float = 1.0
    # Failed chunks in a row caused by the segment after which its back-fill is `failed` until retried
    # or saved again; stalls (a passing cause such as a statement timeout, or an outage, striking its
    # chunk) in a row without progress after which it is `failed` too. After a failure it is tried
    # again `backfill_retry_after_s` later, the others first; the wait doubles with each stall in a
    # row, up to `backfill_max_backoff_s`. A chunk that goes through clears both counts.
    backfill_max_failures: int = Field(default=3, ge=1)
    backfill_max_stalls: int = Field(default=10, ge=1)
    backfill_retry_after_s: float = Field(default=60.0, ge=0)
    backfill_max_backoff_s: float = Field(default=3600.0, ge=0)
    # A deadlock or serialization failure with a concurrent writer (40P01, 40001) in a chunk: tried
    # `backfill_conflict_tries` times in all, each in a transaction of its own after a short jittered
    # pause (from `backfill_conflict_pause_s`, doubling, at most 1 s), then a stall like a statement
    # timeout. Retried without limit, a chunk that deadlocked every time (against a steady real-time
    # writer) re-ran its whole statement every second for ever and was never backed off nor failed.
    # Counted in a row by each worker on its own. Bounded: a pause is at most 1 s, so 20 tries wait
    # ~15 s at most, and a first pause past that cap would not double.
    backfill_conflict_tries: int = Field(default=4, ge=1, le=20)
    backfill_conflict_pause_s: float = Field(default=0.05, ge=0, le=1.0)
    # Segments `failed` because their stored definition did not validate are looked at again at start
    # and then this often: one that validates now (a later release accepts it again) is back-filled
    # again from its first customer, announcing what changed meanwhile. Only those: other failures
    # wait for a retry or a save. 0: never (operators save or retry each themselves).
    backfill_invalid_recheck_s: float = Field(default=300.0, ge=0)
    # Run the background loops (tests drive them by hand with `run_once`).
    run_background_loops: bool = True
    # How long GET /v1/customers/{id}/export waits for every service's part before answering 504.
    privacy_export_wait_s: float = 10.0
    # Recommendations (issue 9): full recompute of the counts and every customer's lists (0 = off).
    recommendations_recompute_interval_s: float = 3600.0
    recommendations_recompute_chunk: int = 1000
    recommendations_cross_sell_limit: int = 10
    recommendations_upsell_limit: int = 5
    recommendations_min_support: int = 2
    recommendations_view_weight: float = 0.3
    recommendations_measure: Literal["cosine", "lift"] = "cosine"
    # Lifecycle (issue 7): model refit interval (0 = never on a schedule; at start if none), customers per
    # chunk of a refit/recompute, how long a replica keeps the latest model and stage policy cached.
    lifecycle_refit_interval_s: float = 21600.0
    lifecycle_chunk_size: int = 50000
    lifecycle_cache_s: float = 5.0

    @property
    def trait_limits(self) -> TraitLimits:
        return TraitLimits(self.profile_max_trait_bytes, self.profile_max_traits)

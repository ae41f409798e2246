"""Keeping every profile's lifecycle stage and metrics current.

- Event path (`on_batch`, inside the batch's unit of work, after the profile fold and the batch's
  events are saved): survey answers, then the touched customers' metrics from the latest stored model
  (one order-aggregate query, vectorized numpy), their stage, the stage changes (history +
  `ProfileChanged(stage_changed)` via the outbox); the new values are written by the batch's profile
  write, in the same UPDATE of each row. The profile snapshots are updated in place so the real-time
  segment evaluation that follows sees them.
- Refit (`refit`, on a schedule and on demand): the base is read in keyset chunks, BG/NBD + Gamma-Gamma
  are fitted and stored with the RFM quintile cut points, then every customer's metrics and stage are
  recomputed over the whole base and written back chunk by chunk (each chunk one unit of work).
- `recompute` does the second half alone (after a stage policy change).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from prometheus_client import Counter

from services.segmenter.conflicts import hold_for_job, retry_job_chunk
from services.segmenter.domain.lifecycle.snapshot import BaseHistory, FittedModels, SnapshotSettings
from services.segmenter.domain.lifecycle.stages import StagePolicy
from services.segmenter.domain.lifecycle.tracking import (
    CustomerInputs,
    LifecycleModel,
    RfmCuts,
    build_history,
    compute,
    default_stage_policy,
    fit_models,
    models_from_json,
    stored_rows,
)
from services.segmenter.domain.lifecycle.voice import (
    SurveyError,
    SurveyType,
    nps_category,
    parse_survey_response,
)
from services.segmenter.domain.profile import ProfileSnapshot
from services.segmenter.domain.rules import LIFECYCLE_FIELDS
from services.segmenter.settings import SegmenterSettings
from services.segmenter.store import lifecycle as store
from shared.clock import Clock
from shared.contracts.events import CustomerEvent, EventType, ProfileChanged, ProfileChangeKind
from shared.contracts.topics import PROFILES
from shared.db.locks import try_exclusive
from shared.db.unit_of_work import UnitOfWork
from shared.runtime import Platform

log = logging.getLogger(__name__)

# Metrics carried in ProfileChanged.metrics with a stage change.
NO_MODEL_RETRY_S = 300.0
SURVEY_ADJUSTED = Counter(
    "clm_segmenter_survey_answers_adjusted_total",
    "Survey Responded events not used as sent: outcome answer_ignored (no usable survey_type or score), "
    "or an optional property dropped, truncated or converted (the answer counted)",
    ["field", "rule", "outcome"],
)
ANNOUNCED_METRICS = ("churn_risk", "p_alive", "expected_orders", "predicted_clv", "rfm_score", "nps_category")


@dataclass
class _Base:
    ids: list[str]
    event_counts: list[int]  # the write-back's guard: skip customers whose profile changed since the read
    history: BaseHistory


@dataclass
class _Cached:
    model: LifecycleModel
    policy: StagePolicy
    loaded_at: float


class Lifecycle:
    def __init__(self, platform: Platform, clock: Clock, settings: SegmenterSettings) -> None:
        self.platform = platform
        self.clock = clock
        self.settings = settings
        self.snapshot_settings = SnapshotSettings()
        self._cached: _Cached | None = None
        self._refit_lock = asyncio.Lock()

    # ----------------------------------------------------------------- model and policy

    def invalidate(self) -> None:
        self._cached = None

    async def current(self, uow: UnitOfWork) -> tuple[LifecycleModel, StagePolicy]:
        """The latest model and policy, re-read at most every `lifecycle_cache_s` (other replicas refit)."""
        c = self._cached
        if c is not None and time.monotonic() - c.loaded_at < self.settings.lifecycle_cache_s:
            return c.model, c.policy
        row = await store.latest_model(uow.session)
        model = (
            LifecycleModel(
                row["id"],
                models_from_json(row["transactions"], row["spend"]),
                RfmCuts.from_json(row["rfm_cuts"]),
            )
            if row
            else LifecycleModel(None, None, RfmCuts())
        )
        stored = await store.get_policy(uow.session)
        policy = StagePolicy.model_validate(stored[0]) if stored else default_stage_policy()
        self._cached = _Cached(model, policy, time.monotonic())
        return model, policy

    # ----------------------------------------------------------------- event path

    async def on_batch(
        self,
        uow: UnitOfWork,
        profiles: dict[str, ProfileSnapshot],
        events: Sequence[CustomerEvent],
        customer_of_event: Sequence[str],
        last_message: dict[str, str],
        now: datetime,
    ) -> store.EventPathWrite:
        """After the batch's events are saved (its orders count in the metrics), before its profile
        rows: returns what the profile write (`store.profiles.save_profiles`) writes with them."""
        if not profiles:
            return store.EventPathWrite()
        surveys = self._surveys(profiles, events, customer_of_event)
        surveyed = {row.customer_id: True for row in surveys}
        model, policy = await self.current(uow)
        ids = sorted(profiles)
        buyers = [cid for cid in ids if (profiles[cid].fields.get("orders_count") or 0) > 0]
        aggregates = await store.order_aggregates(
            uow.session, buyers, now, self.snapshot_settings.growth_window_days
        )
        inputs = [_inputs(profiles[cid]) for cid in ids]
        computed = compute(
            build_history(inputs, aggregates, now, self.snapshot_settings),
            now,
            model,
            policy,
            self.snapshot_settings,
            whole_base=False,
        )
        values: list[tuple[str, dict[str, Any]]] = []
        changes: list[store.StageChange] = []
        stored = stored_rows(computed)
        for cid, new in zip(ids, stored, strict=True):
            f = profiles[cid].fields
            before = f.get("lifecycle_stage")
            if before != new["lifecycle_stage"]:
                changes.append(store.StageChange(cid, before, new["lifecycle_stage"]))
                new["lifecycle_stage_since"] = now
            else:
                new["lifecycle_stage_since"] = f.get("lifecycle_stage_since")
            for name in ("nps_score", "nps_category", "nps_at", "csat_score", "csat_at"):
                new[name] = f.get(name)
            # Most events change nothing here (metrics move by the day): write only what changed.
            if cid in surveyed or tuple(map(f.get, new)) != tuple(new.values()):
                values.append((cid, new))
            f.update(new)
        for change in changes:
            profile = profiles[change.customer_id]
            cause = last_message.get(change.customer_id, "event")
            self._announce(uow, profile, change, cause, profile.updated_at or now)
        return store.EventPathWrite(values, changes, surveys, last_message)

    def _surveys(
        self,
        profiles: dict[str, ProfileSnapshot],
        events: Sequence[CustomerEvent],
        customer_of_event: Sequence[str],
    ) -> list[store.SurveyRow]:
        """Survey answers of the batch; each customer's latest answer (by event time) updates their
        NPS / CSAT fields in place. An answer without a usable type or score is logged, counted and
        ignored (it never fails the batch); an optional property not used as sent is counted (and
        logged unless it was only converted) and the answer kept."""
        rows: list[store.SurveyRow] = []
        for e, cid in zip(events, customer_of_event, strict=True):
            if e.type != EventType.TRACK:
                continue
            try:
                answer = parse_survey_response(e.event, e.properties, e.timestamp)
            except SurveyError as exc:
                SURVEY_ADJUSTED.labels(exc.field, exc.rule, "answer_ignored").inc()
                log.info(
                    "ignoring an invalid survey answer",
                    extra={"message_id": e.message_id, "field": exc.field, "rule": exc.rule},
                )
                continue
            if answer is None:
                continue
            for field, rule, outcome in answer.adjusted:
                SURVEY_ADJUSTED.labels(field, rule, outcome).inc()
            if any(outcome != "converted" for _, _, outcome in answer.adjusted):
                log.info(
                    "survey answer kept without part of its properties",
                    extra={"message_id": e.message_id, "adjusted": [list(a) for a in answer.adjusted]},
                )
            rows.append(
                store.SurveyRow(
                    e.message_id,
                    cid,
                    answer.survey_type.value,
                    answer.score,
                    answer.comment,
                    answer.survey_id,
                    e.timestamp,
                )
            )
            f = profiles[cid].fields
            if answer.survey_type is SurveyType.NPS:
                if f.get("nps_at") is None or e.timestamp >= f["nps_at"]:
                    f["nps_score"], f["nps_at"] = answer.score, e.timestamp
                    f["nps_category"] = nps_category(answer.score).value
            elif f.get("csat_at") is None or e.timestamp >= f["csat_at"]:
                f["csat_score"], f["csat_at"] = answer.score, e.timestamp
        return rows

    def _announce(
        self, uow: UnitOfWork, profile: ProfileSnapshot, change: store.StageChange, cause: str, at: datetime
    ) -> None:
        f = profile.fields
        uow.emit(
            PROFILES.name,
            change.customer_id,
            ProfileChanged(
                event_id=f"profile:{change.customer_id}:{cause}:stage:{change.to_stage}",
                customer_id=change.customer_id,
                kind=ProfileChangeKind.STAGE_CHANGED,
                occurred_at=at,
                traits=profile.traits,
                lifecycle_stage=change.to_stage,
                previous_stage=change.from_stage,
                metrics={name: f.get(name) for name in ANNOUNCED_METRICS},
                caused_by=cause,
            ),
            cause=cause,
        )

    # ----------------------------------------------------------------- refit and recompute over the base

    async def _load_base(self, now: datetime) -> _Base:
        """The whole base in keyset chunks, each turned into numpy columns at once (no per-customer
        Python objects are kept beyond a chunk)."""
        ids: list[str] = []
        event_counts: list[int] = []
        parts: list[BaseHistory] = []
        after: str | None = None
        while True:
            async with self.platform.unit_of_work() as uow:
                chunk, orders = await store.base_chunk(
                    uow.session,
                    after,
                    self.settings.lifecycle_chunk_size,
                    now,
                    self.snapshot_settings.growth_window_days,
                )
            if not chunk:
                break
            parts.append(build_history([r.inputs for r in chunk], orders, now, self.snapshot_settings))
            ids += [r.inputs.customer_id for r in chunk]
            event_counts += [r.event_count for r in chunk]
            after = chunk[-1].inputs.customer_id
        empty = build_history([], {}, now, self.snapshot_settings)
        history = BaseHistory(
            **{
                name: np.concatenate([getattr(part, name) for part in parts])
                if parts
                else getattr(empty, name)
                for name in BaseHistory.__dataclass_fields__
            }
        )
        return _Base(ids, event_counts, history)

    async def refit(self) -> dict[str, Any]:
        """Fit the models on the whole base, store them, then recompute every customer."""
        async with self._refit_lock:
            now = self.clock.now()
            started = time.perf_counter()
            base = await self._load_base(now)
            history = base.history
            transactions, spend = await asyncio.to_thread(fit_models, history)
            models = (
                FittedModels(transactions.params, spend.params if spend else None) if transactions else None
            )
            model = LifecycleModel(None, models, RfmCuts())
            _, policy = await self._policy_only()
            computed = compute(history, now, model, policy, self.snapshot_settings, whole_base=True)
            cuts = RfmCuts.of_base(computed.rfm_scores)
            fit_s = time.perf_counter() - started
            async with self.platform.unit_of_work() as uow:
                model_id = await store.insert_model(
                    uow.session,
                    now,
                    transactions.as_json() if transactions else None,
                    spend.as_json() if spend else None,
                    cuts.as_json(),
                    len(base.ids),
                    int((history.orders > 0).sum()),
                    fit_s,
                )
            self.invalidate()
            changed = await self._write_back(base, computed, now, f"refit:{model_id}")
            log.info(
                "lifecycle refit",
                extra={"model_id": model_id, "customers": len(base.ids), "stage_changes": changed},
            )
            return {
                "model_id": model_id,
                "customers": len(base.ids),
                "stage_changes": changed,
                "fit_s": fit_s,
            }

    async def recompute(self, cause: str = "policy") -> dict[str, Any]:
        """Every customer's metrics and stage from the stored model (after a policy change)."""
        async with self._refit_lock:
            now = self.clock.now()
            self.invalidate()
            async with self.platform.unit_of_work() as uow:
                model, policy = await self.current(uow)
            base = await self._load_base(now)
            computed = compute(base.history, now, model, policy, self.snapshot_settings, whole_base=True)
            changed = await self._write_back(base, computed, now, cause)
            return {"customers": len(base.ids), "stage_changes": changed}

    async def _policy_only(self) -> tuple[LifecycleModel, StagePolicy]:
        async with self.platform.unit_of_work() as uow:
            return await self.current(uow)

    async def _write_back(self, base: _Base, computed: Any, now: datetime, cause: str) -> int:
        changed = 0
        size = self.settings.lifecycle_chunk_size
        for lo in range(0, len(base.ids), size):
            chunk = functools.partial(
                self._write_back_chunk, base, computed, range(lo, min(lo + size, len(base.ids))), now, cause
            )
            # The chunk holds its customers in id order: it may give way to an event batch.
            changed += await retry_job_chunk(chunk, "lifecycle write-back chunk")
        async with self.platform.unit_of_work() as uow:
            # Bulk changes reach segments on lifecycle fields through their back-fill.
            await store.restart_lifecycle_segments(uow.session, LIFECYCLE_FIELDS, now)
        return changed

    async def _write_back_chunk(
        self, base: _Base, computed: Any, part: range, now: datetime, cause: str
    ) -> int:
        """One chunk's stored metrics and stages, their history and announcements, in one unit of
        work: the number of stage changes."""
        values = stored_rows(computed, part.start, part.stop)
        ids = base.ids[part.start : part.stop]
        async with self.platform.unit_of_work() as uow:
            await hold_for_job(uow.session)
            changes = await store.save_recomputed(
                uow.session, ids, base.event_counts[part.start : part.stop], values, now, cause
            )
            by_id = dict(zip(ids, values, strict=True))
            for change in changes:
                profile = ProfileSnapshot(
                    change.customer_id, traits=change.traits or {}, fields=by_id[change.customer_id]
                )
                # Dated by the profile's last change, not this job's `now` (taken before the
                # base was read): a change that took its time before that and commits after
                # this chunk must still win in a consumer that keeps the newest (the notifier).
                self._announce(uow, profile, change, cause, change.as_of or now)
        return len(changes)

    async def run_forever(self) -> None:
        """Refit at start when no model exists yet, then every `lifecycle_refit_interval_s` (0: only at
        start). A base too small to fit is tried again every few minutes."""
        interval = self.settings.lifecycle_refit_interval_s
        lock = f"{self.platform.settings.db_schema}:lifecycle-refit"
        while True:
            try:
                # Every replica runs this loop: one refits, the others find its model next round.
                async with try_exclusive(self.platform.engine, lock) as mine:
                    if mine:
                        await self._refit_if_due(interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lifecycle refit failed; retrying later")
            await asyncio.sleep(min(60.0, interval) if interval > 0 else 60.0)

    async def _refit_if_due(self, interval: float) -> None:
        async with self.platform.unit_of_work() as uow:
            latest = await store.latest_model(uow.session)
        age = (self.clock.now() - latest["fitted_at"]).total_seconds() if latest else 0.0
        if (
            latest is None
            or (interval > 0 and age >= interval)
            or (latest["transactions"] is None and age >= NO_MODEL_RETRY_S)
        ):
            await self.refit()


def _inputs(p: ProfileSnapshot) -> CustomerInputs:
    f = p.fields
    return CustomerInputs(
        p.customer_id,
        int(f.get("orders_count") or 0),
        float(f.get("revenue") or 0.0),
        f.get("first_seen"),
        f.get("nps_score"),
        f.get("csat_score"),
    )

"""Running journeys: turns inputs (events, segment changes, profile changes, message statuses, due
timers) into steps, and persists each step's state, timer and effects in the caller's unit of work.

The graph walking itself is pure (`domain.walker`); this module loads what it needs, locks the
customers involved (so frequency caps and "once per key" hold across processes) and writes back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import Counter
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from services.journey_engine.domain.definition import (
    Goal,
    Graph,
    JourneyDefinition,
    ScheduleEntry,
    SegmentEntry,
)
from services.journey_engine.domain.entry import (
    EventTrigger,
    SegmentTrigger,
    StageTrigger,
    Trigger,
    correlation_keys,
    correlation_value,
    entry_stopped_holding,
    goal_reached,
    may_reenter,
    triggers,
)
from services.journey_engine.domain.timing import upcoming_run, zone
from services.journey_engine.domain.walker import (
    CustomerView,
    EventArrived,
    Input,
    InstanceView,
    MessageWithheld,
    Outcome,
    RequestMessage,
    SegmentChanged,
    Start,
    StatusArrived,
    TimerFired,
    UpdateTraits,
    Walker,
    facts_for,
)
from services.journey_engine.execution import db_errors
from services.journey_engine.settings import JourneyEngineSettings
from services.journey_engine.store import batch_read, projection
from services.journey_engine.store import instances as instance_store
from services.journey_engine.store import journeys as journey_store
from services.journey_engine.store import parked as parked_store
from services.journey_engine.store import privacy as privacy_store
from services.journey_engine.store import recommendations as recommendation_projection
from services.journey_engine.store.instances import (
    ClaimedTimer,
    GoalWindow,
    InstanceConflict,
    InstanceRow,
    StepWriter,
)
from services.journey_engine.store.journeys import JourneyRow
from services.journey_engine.store.parked import ParkedTimer
from shared.clock import Clock
from shared.contracts.events import (
    RESYNC_CAUSE,
    CustomerEvent,
    EventType,
    MessageRequested,
    MessageStatus,
    MessageStatusKind,
    ProfileChanged,
    ProfileChangeKind,
    Recipient,
    SegmentMembershipChanged,
)
from shared.contracts.topics import CUSTOMER_EVENTS, MESSAGE_REQUESTS, MESSAGE_STATUS
from shared.db.errors import is_lock_timeout, set_lock_timeout, sqlstate
from shared.db.locks import try_exclusive
from shared.db.unit_of_work import UnitOfWork
from shared.privacy import add_tombstones, erased_among, erased_identities, erasure_gate, hashed_identities
from shared.runtime import Platform

log = logging.getLogger(__name__)
INSTANCE_NAMESPACE = uuid.UUID("6f1c2a52-4d0e-4c7e-9a51-0b8f3d7e2c11")


class TimersFailing(Exception):
    """Every timer of a batch failed alone, in more than one journey, and no due timer of another
    journey stepped its instance: taken for an outage (`JourneyEngine._failed_alone`), nothing
    counted toward parking; the timers are put off to their retry time, the later ones get their
    turn."""


class CustomersMoved(Exception):
    """A merge moved some of a batch's customers (or instances) between the batch's lookup and its
    locks: roll back and go again; the next lookup sees the merge (`consumers.handlers`)."""


MERGES_TAKEN_OVER = Counter(
    "clm_journey_merges_taken_over_total",
    "Profiles merged into another whose instances, entries and message log the survivor took over",
)
# The exit reason of a merged-away profile's instance whose journey the survivor is inside already.
MERGED_AWAY = "merged: the surviving profile is inside this journey"
TIMER_ERRORS = Counter(
    "clm_journey_timer_errors_total",
    "Timer units of work that failed for a reason other than an outage (each try: a batch, a part of "
    "one, a single timer)",
)
TIMERS_PARKED = Counter(
    "clm_journey_timers_parked_total",
    "Timers whose step failed CLM_TIMER_MAX_ATTEMPTS times, moved to timers_parked with the error",
    ["journey"],
)
# A transient condition of the database (`db_errors`) is retried at once this many times in all,
# pausing from this long, doubling, before the batch is given back to the loop's backoff.
TRANSIENT_TRIES = 4
TRANSIENT_PAUSE_S = 0.05
# The timer loop's pause after a failed pass (an outage), doubling from `timer_poll_interval_s`.
FAILED_PASS_PAUSE_MAX_S = 30.0
# The exit reason of an archived journey's instances.
ARCHIVED = "archived"
# The exit reason of an instance whose parked timer an operator discarded (`discard_parked`).
TIMER_DISCARDED = "timer_discarded"
# How long an operator's requeue or discard of one parked timer waits for its instance (a step, an
# event or an erasure of that customer holds it) before it gives up (`ParkedBusy`): the request waits
# no longer, nor keeps what it locked. A bulk request waits for none: it skips those held.
PARKED_LOCK_TIMEOUT_MS = 1000
BROADCAST_FAILURES = Counter(
    "clm_journey_broadcast_failures_total",
    "Broadcast chunks that failed (the journey is retried after CLM_BROADCAST_RETRY_S)",
    ["journey"],
)


@dataclass(frozen=True)
class ActiveJourney:
    row: JourneyRow
    graph: Graph


def customer_view(rec: projection.CustomerRecord) -> CustomerView:
    return CustomerView(
        customer_id=rec.customer_id,
        traits=rec.traits,
        timezone=rec.timezone,
        locale=rec.locale,
        email=rec.email,
        phone=rec.phone,
        stage=rec.stage,
        segments=frozenset(rec.segments),
        recent_sends=rec.recent_sends,
        recommendations=rec.recommendations,
    )


def instance_view(row: InstanceRow) -> InstanceView:
    return InstanceView(
        instance_id=row.id,
        journey_id=row.journey_id,
        version=row.version,
        node_id=row.node_id,
        entered_at=row.entered_at,
        correlation=row.correlation,
        context=row.context,
        wait=row.wait,
    )


@dataclass(frozen=True)
class Fired:
    """What a unit of work of timers fired: every timer it claimed (`timers`), and those of them
    that stepped a live instance (`stepped`). A stale timer (its instance moved on, exited or was
    erased) fires as a no-op: it says nothing of whether steps work."""

    timers: list[ClaimedTimer]
    stepped: list[ClaimedTimer]


@dataclass(frozen=True)
class ParkedHandled:
    """What one unit of work did to parked timers (`JourneyEngine.requeue_parked`, `discard_parked`):
    those it read (`seen`), those it put back or discarded (`timers`, as they stood under their
    instances' locks), the instances a discard exited (id -> exit reason), and its time (a requeued
    timer's due time)."""

    seen: list[ParkedTimer]
    timers: list[ParkedTimer]
    exited: dict[str, str]
    at: datetime
    # Those left as they were, their instances held elsewhere at that moment (bulk requests only).
    skipped: list[ParkedTimer] = field(default_factory=list)


@dataclass(frozen=True)
class ParkedTotals:
    """What a bulk requeue or discard did (`JourneyEngine.handle_all_parked`): timers handled,
    instances exited, timers skipped (their instances held elsewhere: left parked), and its time."""

    handled: int
    exited: int
    skipped: int
    at: datetime


class ParkedBusy(Exception):
    """A parked timer's instance stayed held elsewhere `PARKED_LOCK_TIMEOUT_MS`: nothing changed."""


@dataclass
class Batch:
    """What one consumer batch works on: its customers, their active instances and past entries."""

    now: datetime
    writer: StepWriter
    customers: dict[str, CustomerView]
    active: dict[str, list[InstanceRow]]
    entries: dict[tuple[str, str, str], datetime]
    journeys: list[ActiveJourney]
    # Journeys of `active` instances that are archived: the archive exits its customers after it
    # committed, and a step that comes first exits the instance instead (`JourneyEngine._archived`).
    archived: set[str]
    # Finished instances whose goal may still be reached (event batches only: goals are events).
    windows: dict[str, list[GoalWindow]] = field(default_factory=dict)
    # What the caller looked up before the locks, read again after them (`batch_read.BatchRead`).
    resolved: dict[str, str] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    # The batch's customers merged into another profile (by an earlier batch, or this one).
    merged_away: set[str] = field(default_factory=set)
    # Merges this batch took over (counted once it committed).
    taken_over: int = 0
    # The batch's customers that were erased (`check_erased`; or by an `erased` announcement in
    # it): nothing of theirs is written again.
    erased: set[str] = field(default_factory=set)
    # How many of the writer's new windows `windows` holds already.
    _windows_seen: int = 0

    def prune(self, customer_id: str) -> None:
        self.active[customer_id] = [r for r in self.active[customer_id] if r.status == "active"]

    def see_new_windows(self) -> None:
        """Windows opened by the batch's earlier inputs count for its later ones: an SDK flushing
        `Joined` then `Purchased` together must not lose the conversion of an instance the first one
        finished (a holdout arm that exits at once)."""
        for w in self.writer.windows[self._windows_seen :]:
            self.windows.setdefault(w.customer_id, []).append(w)
        self._windows_seen = len(self.writer.windows)


class JourneyEngine:
    def __init__(self, platform: Platform, settings: JourneyEngineSettings, clock: Clock) -> None:
        self.platform = platform
        self.settings = settings
        self.clock = clock
        self.rules = settings.messaging_rules()
        self._salt = platform.settings.privacy_salt.get_secret_value()
        # Versions are immutable once saved, so parsed graphs can be cached for good.
        self._graphs: dict[tuple[str, int], Graph] = {}
        # Called after each committed timer batch with the due times fired (the benchmark's lateness).
        self.on_fired: Callable[[list[datetime]], None] | None = None
        # Broadcasts: journeys waiting out a failed chunk (until then), and whether the last pass
        # left chunks to do (the timer loop then goes on without resting).
        self._broadcast_retry: dict[str, datetime] = {}
        self.broadcasts_pending = False
        # Timer id -> how many times this worker took it for an outage (`_failed_alone`).
        self._taken_for_outage: dict[int, int] = {}

    # ------------------------------------------------------------------ definitions

    async def graph(self, session: AsyncSession, journey_id: str, version: int) -> Graph | None:
        key = (journey_id, version)
        if key not in self._graphs:
            raw = await journey_store.definition(session, journey_id, version)
            if raw is None:
                return None
            try:
                stored = JourneyDefinition.model_validate(raw, context={"stored": True})
                self._graphs[key] = Graph(stored)
            except (ValidationError, StopIteration):
                log.error(
                    "stored journey definition is invalid", extra={"journey": journey_id, "version": version}
                )
                return None
        return self._graphs[key]

    async def active_journeys(self, session: AsyncSession, rows: list[JourneyRow]) -> list[ActiveJourney]:
        out = []
        for row in rows:
            graph = await self.graph(session, row.id, row.current_version)
            if graph is not None:
                out.append(ActiveJourney(row, graph))
        return out

    # ------------------------------------------------------------------ consumers' entry points

    async def _batch(
        self,
        session: AsyncSession,
        customer_ids: list[str],
        *,
        goals: bool = False,
        identities: Sequence[str] = (),
        instance_ids: Sequence[str] = (),
        entering: bool = True,
        check_erased: bool = False,
    ) -> Batch:
        """Lock the batch's customers, then their instances and everything else their steps need
        (`store.batch_read`: two statements). `identities`, `instance_ids`: what the caller found the
        customers by, looked up again once the locks are held (`Batch.resolved`, `Batch.owners`).
        `entering`: the batch may enter customers in the active journeys it reads, holding the entry
        gate until it commits, so a pause or archive never slips between that read and the entry.
        `check_erased`: find which customers have an erasure tombstone (`Batch.erased`), in the same
        read; the transaction must hold the erasure gate already."""
        now = self.clock.now()
        ids = sorted(set(customer_ids))
        by_hash = hashed_identities(self._salt, ids) if check_erased else {}
        await projection.lock_customers(session, ids, entering=entering)
        read = await batch_read.read(
            session,
            ids,
            now=now,
            sends_since=projection.sends_window(now, bool(self.rules.caps)),
            goals=goals,
            identities=identities,
            instance_ids=instance_ids,
            hashes=list(by_hash),
        )
        active: dict[str, list[InstanceRow]] = {c: [] for c in ids}
        for row in read.active:
            active[row.customer_id].append(row)
        windows: dict[str, list[GoalWindow]] = {}
        for w in read.windows:
            windows.setdefault(w.customer_id, []).append(w)
        return Batch(
            now=now,
            writer=StepWriter(now),
            customers={c: customer_view(r) for c, r in read.customers.items()},
            active=active,
            entries=read.entries,
            journeys=await self.active_journeys(session, read.journeys),
            archived=read.archived,
            windows=windows,
            resolved=read.resolved,
            owners=read.owners,
            merged_away=read.merged_away,
            erased=erased_identities(by_hash, read.tombstoned),
        )

    async def on_events(
        self,
        uow: UnitOfWork,
        items: Sequence[tuple[str, CustomerEvent]],
        known: Mapping[str, str] | None = None,
    ) -> None:
        """(event id, event) pairs already claimed in `uow`'s inbox; `known`: their ids resolved to
        customers already (`projection.resolve`), when the caller read them with its own reads."""
        session = uow.session
        tracks = [(eid, e) for eid, e in items if e.type == EventType.TRACK and e.event]
        if not tracks:
            return
        identities = [i for _, e in tracks for i in (e.user_id, e.anonymous_id) if i is not None]
        if known is None:
            known = await projection.resolve(session, identities)
        owners = [(eid, e, self._customer_of(e, known)) for eid, e in tracks]
        # Tombstones read again under the customer locks (`check_erased`): the consumer dropped events
        # of erased identities before taking them, but a profile's `erased` announcement committing
        # while this batch waited for its lock would otherwise be missed (and the customer re-entered).
        batch = await self._batch(
            session, [c for _, _, c in owners], goals=True, identities=identities, check_erased=True
        )
        if any(self._customer_of(e, batch.resolved) != c for _, e, c in owners):
            raise CustomersMoved()
        for event_id, event, customer_id in owners:
            if customer_id in batch.erased:
                continue
            payload = event.model_dump(mode="json", by_alias=True)
            assert event.event is not None
            await self._apply_trigger(
                uow,
                batch,
                customer_id,
                EventTrigger(event.event, payload),
                EventArrived(event.event, payload),
                trigger_id=event_id,
                trigger_context={"trigger": payload},
            )
        await batch.writer.flush(session)

    async def on_segment_changes(self, uow: UnitOfWork, items: Sequence[SegmentMembershipChanged]) -> None:
        """`uow` holds the erasure gate (shared): a change announced before the customer's erasure
        and read after it writes nothing (nor enters them anywhere)."""
        session = uow.session
        if not items:
            return
        batch = await self._batch(session, [m.customer_id for m in items], check_erased=True)
        for m in items:
            if m.customer_id in batch.merged_away or m.customer_id in batch.erased:
                # Sent before its profile was merged into another (no person's any more), or before
                # the customer was erased.
                continue
            await projection.set_membership(session, m.segment_id, m.customer_id, m.change == "entered")
            customer = batch.customers[m.customer_id]
            customer.segments = (
                customer.segments | {m.segment_id}
                if m.change == "entered"
                else customer.segments - {m.segment_id}
            )
            if m.cause == RESYNC_CAUSE:
                continue  # the projection's state, re-announced: no journey enters or leaves on it
            trigger = {"segment_id": m.segment_id, "segment_name": m.segment_name, "change": m.change}
            await self._apply_trigger(
                uow,
                batch,
                m.customer_id,
                SegmentTrigger(m.segment_id, m.change),
                SegmentChanged(m.segment_id, m.change),
                trigger_id=m.event_id,
                trigger_context={"trigger": trigger},
            )
        await batch.writer.flush(session)

    async def on_profiles(self, uow: UnitOfWork, items: Sequence[ProfileChanged]) -> int:
        """Returns the merges taken over (`_take_over`), to count once the unit committed. `uow`
        holds the erasure gate (shared): an announcement made before the customer's erasure and read
        after it writes nothing; an `erased` one deletes what the engine holds on the customer."""
        session = uow.session
        if not items:
            return 0
        # Instances are locked (in `_batch`) before the projection rows are written: the same order a
        # timer step that updates a trait uses, so the two never wait on each other in a cycle.
        merges = [
            (old, p.customer_id)
            for p in items
            if p.kind == ProfileChangeKind.IDENTITY_MERGED
            for old in p.merged_ids
            if old != p.customer_id
        ]
        survivors = sorted({new for _, new in merges})
        final: dict[str, str] = {}
        if merges:
            # An erasure finds a customer's rows by their identities: not while a merge moves them.
            await erasure_gate(session, exclusive=False)
            # A survivor merged on into another since (its announcement late): that one takes over.
            final = await projection.survivors(session, survivors)
        # (A merge committed meanwhile is seen by `_take_over`, which looks the survivor up again.)
        batch = await self._batch(
            session,
            [p.customer_id for p in items] + [old for old, _ in merges] + list(final.values()),
            check_erased=True,
        )
        for p in items:
            cid = p.customer_id
            if p.kind == ProfileChangeKind.ERASED:
                await self._erase(session, batch, cid, p.event_id)
                continue
            if cid in batch.erased:
                continue  # announced before the customer's erasure: nothing of theirs comes back
            if p.kind == ProfileChangeKind.IDENTITY_MERGED:
                for old in p.merged_ids:
                    if old != cid and old not in batch.erased:
                        await self._take_over(session, batch, old, cid, p.occurred_at)
            if cid in batch.merged_away:
                # Announced before this profile was merged into another: its traits, identities and
                # stage are the survivor's announcements' to give (and it enters nothing).
                continue
            traits = dict(p.traits)
            view = batch.customers[cid]
            view.traits = traits
            view.timezone, view.locale = _str(traits.get("timezone")), _str(traits.get("locale"))
            view.email, view.phone = _str(traits.get("email")), _str(traits.get("phone"))
            view.stage = p.lifecycle_stage or view.stage
            await projection.upsert_customer(
                session,
                cid,
                traits,
                timezone=view.timezone,
                locale=view.locale,
                email=view.email,
                phone=view.phone,
                stage=p.lifecycle_stage,
                now=batch.now,
            )
            await projection.add_identities(
                session,
                cid,
                [i for ids in p.identities.values() for i in ids]
                + [old for old in p.merged_ids if old not in batch.erased],
                p.occurred_at,
            )
            if p.recommendations is not None:  # issue 9: lists for message data
                view.recommendations = dict(p.recommendations)
                await recommendation_projection.set_lists(session, cid, view.recommendations, batch.now)
            if p.kind == ProfileChangeKind.STAGE_CHANGED and p.lifecycle_stage:
                trigger = {"lifecycle_stage": p.lifecycle_stage, "previous_stage": p.previous_stage}
                await self._apply_trigger(
                    uow,
                    batch,
                    cid,
                    StageTrigger(p.lifecycle_stage, p.previous_stage),
                    None,
                    trigger_id=p.event_id,
                    trigger_context={"trigger": trigger},
                )
        await batch.writer.flush(session)
        return batch.taken_over

    async def _erase(self, session: AsyncSession, batch: Batch, cid: str, event_id: str) -> None:
        """The segmenter erased the customer: delete what the engine holds on them, as the privacy
        erasure does (`store.privacy.erase`; its request may come later or earlier, on another topic),
        and tombstone their id so a change announced before the erasure and read after it (on the
        membership or profiles topic) brings nothing back. Their active instances are counted as
        exited first, as before."""
        for row in batch.active[cid]:
            self._leave(batch.writer, row, "exited", "erased", "exited")
        await batch.writer.flush(session)  # the counts, and anything this batch wrote for them
        # Every identity the engine knew them by is tombstoned, not the id alone: until the privacy
        # request is read, an event under their userId or anonymousId would otherwise no longer
        # resolve to them and enter a new customer.
        known = await privacy_store.identities_of(session, cid)
        await privacy_store.erase(session, [cid])
        await add_tombstones(session, self._salt, [cid, *known], event_id, batch.now)
        batch.active[cid] = []
        batch.customers[cid] = CustomerView(cid)
        batch.windows.pop(cid, None)
        for key in [k for k in batch.entries if k[1] == cid]:
            del batch.entries[key]
        batch.erased.add(cid)

    async def _take_over(self, session: AsyncSession, batch: Batch, old: str, new: str, at: datetime) -> None:
        """Profile `old` was merged into `new`: one person. Its instances, entries, goal windows and
        message log become `new`'s, so the re-entry policy, frequency caps and goals count the
        person once (before, the survivor entered a journey again that the merged-away profile was
        in: a second welcome series). Where both are inside the same journey (and correlation
        value), the survivor's instance goes on and the other exits."""
        # The survivor may itself have been merged into another since (by an earlier announcement,
        # or one earlier in this batch, written in this transaction): that one takes over.
        target = (await projection.survivors(session, [new])).get(new, new)
        if target not in batch.active:
            raise CustomersMoved()  # not locked by this batch: the next try locks it
        new = target
        if old == new:
            return
        inside = {(r.journey_id, r.correlation) for r in batch.active[new] if r.status == "active"}
        for row in batch.active[old]:
            if row.status == "active" and (row.journey_id, row.correlation) in inside:
                self._leave(batch.writer, row, "exited", MERGED_AWAY, "exited")
        await batch.writer.flush(session)  # those exits first: one active instance per key
        closed = await instance_store.move_customer(session, old, new)
        await projection.forget_merged(session, old, new, at)
        batch.merged_away.add(old)
        moved = [replace(r, customer_id=new) for r in batch.active[old] if r.status == "active"]
        batch.active[new] = [*batch.active[new], *moved]
        batch.active[old] = []
        for (journey_id, customer_id, correlation), entered in list(batch.entries.items()):
            if customer_id == old:
                del batch.entries[(journey_id, customer_id, correlation)]
                key = (journey_id, new, correlation)
                batch.entries[key] = max(entered, batch.entries.get(key, entered))
        for w in batch.windows.pop(old, []):
            batch.windows.setdefault(new, []).append(replace(w, customer_id=new))
        # One goal per person (and correlation value): the windows the move closed count no more.
        batch.windows[new] = [w for w in batch.windows.get(new, []) if w.instance_id not in closed]
        # Frequency caps in the rest of this batch count the merged-away profile's sends too.
        sent = batch.customers[new].recent_sends
        for channel, times in batch.customers[old].recent_sends.items():
            sent[channel] = sorted([*sent.get(channel, []), *times])
        batch.customers[old].recent_sends = {}
        batch.taken_over += 1

    async def on_statuses(self, uow: UnitOfWork, items: Sequence[MessageStatus]) -> None:
        """A status reaches the instance waiting for it by the instance's id (a journey's messages
        carry it), whoever the instance belongs to now: a merge may have moved it to the surviving
        profile since the message was requested."""
        session = uow.session
        waits = [s for s in items if s.instance_id]
        if not waits:
            return
        ids = [s.instance_id for s in items if s.instance_id]
        owners = await instance_store.owners(session, ids)
        # A status enters no one: it need not wait for a pause or archive.
        batch = await self._batch(session, list(owners.values()), instance_ids=ids, entering=False)
        if batch.owners != owners:
            raise CustomersMoved()
        for s in waits:
            cid = owners.get(s.instance_id or "")
            if cid is None:
                continue
            for row in list(batch.active[cid]):
                wait = row.wait or {}
                if (
                    row.id == s.instance_id
                    and wait.get("kind") == "message"
                    and wait.get("message_id") == s.message_id
                ):
                    if row.journey_id in batch.archived:
                        self._archived(batch.writer, row)
                        continue
                    await self._react(
                        uow,
                        batch.writer,
                        row,
                        batch.customers[cid],
                        StatusArrived(s.message_id, str(s.status)),
                        batch.now,
                    )
            batch.prune(cid)
        await batch.writer.flush(session)

    def _customer_of(self, event: CustomerEvent, known: Mapping[str, str]) -> str:
        for identity in (event.user_id, event.anonymous_id):
            if identity is not None and identity in known:
                return known[identity]
        return event.customer_key

    async def _apply_trigger(
        self,
        uow: UnitOfWork,
        batch: Batch,
        customer_id: str,
        trigger: Trigger,
        arrived: Input | None,
        *,
        trigger_id: str,
        trigger_context: dict[str, Any],
    ) -> None:
        """Goals and exit criteria first, then waits that this input satisfies, then new entries."""
        session = uow.session
        now, writer = batch.now, batch.writer
        batch.see_new_windows()
        customer = batch.customers[customer_id]
        event_payload = trigger.event if isinstance(trigger, EventTrigger) else {}
        facts = facts_for(customer, event_payload)
        for row in list(batch.active[customer_id]):
            if row.journey_id in batch.archived:
                self._archived(writer, row)
                continue
            graph = await self.graph(session, row.journey_id, row.version)
            if graph is None:
                continue
            if isinstance(trigger, EventTrigger) and goal_reached(
                graph.definition, trigger, facts, row.entered_at, row.correlation_key, now
            ):
                self._leave(writer, row, "converted", f"goal: {trigger.name}", "converted")
                continue
            if entry_stopped_holding(graph.definition, trigger):
                self._leave(
                    writer, row, "exited", "entry condition no longer holds", "exited", graph.definition.goal
                )
                continue
            if arrived is not None:
                await self._react(uow, writer, row, customer, arrived, now)
        batch.prune(customer_id)
        if isinstance(trigger, EventTrigger) and batch.windows.get(customer_id):
            # Finished instances still count the goal within its window (a path shorter than the
            # window, a holdout arm that exits at once), once each.
            still_open = []
            for window in batch.windows[customer_id]:
                graph = await self.graph(session, window.journey_id, window.version)
                if graph is not None and goal_reached(
                    graph.definition, trigger, facts, window.entered_at, window.correlation, now
                ):
                    writer.converted.append(window.instance_id)
                else:
                    still_open.append(window)
            batch.windows[customer_id] = still_open
        inside = {(r.journey_id, r.correlation) for r in batch.active[customer_id]}
        for journey in batch.journeys:
            if not triggers(journey.graph.definition, trigger, facts):
                continue
            correlation = correlation_value(journey.graph.definition, trigger)
            if (journey.row.id, correlation) in inside:
                continue
            # An entry is found under every form it may be stored in (a long value: as itself, as
            # the release before stored it, too); a new one is recorded under the key.
            stored = correlation_keys(correlation)
            last = [batch.entries.get((journey.row.id, customer_id, k)) for k in stored]
            entered = await self._enter(
                uow,
                writer,
                journey,
                customer,
                correlation,
                trigger_id,
                dict(trigger_context),
                now,
                start_at=None,
                last_entered_at=max((t for t in last if t is not None), default=None),
            )
            if entered is not None:
                batch.entries[(journey.row.id, customer_id, stored[0])] = now
                batch.windows[customer_id] = [
                    w
                    for w in batch.windows.get(customer_id, [])
                    if w.journey_id != journey.row.id
                    or w.correlation not in stored
                    or w.instance_id == entered.id
                ]
                if entered.status == "active":
                    batch.active[customer_id].append(entered)
                    inside.add((journey.row.id, correlation))

    # ------------------------------------------------------------------ steps

    async def _enter(
        self,
        uow: UnitOfWork,
        writer: StepWriter,
        journey: ActiveJourney,
        customer: CustomerView,
        correlation: str,
        trigger_id: str,
        context: dict[str, Any],
        now: datetime,
        *,
        start_at: datetime | None,
        last_entered_at: datetime | None = None,
    ) -> InstanceRow | None:
        """The new instance, or None when the re-entry policy or the entry cap says no."""
        session = uow.session
        allowed, _ = may_reenter(journey.graph.definition, last_entered_at, now)
        if not allowed:
            return None
        if journey.row.entry_cap is not None and not await journey_store.take_entry_slot(
            session, journey.row.id
        ):
            return None
        chain = uow.correlations.get(trigger_id)
        if chain is not None:
            # The Kafka chain's id (not the journey's correlation key): the instance's messages pass it on.
            context["correlation_id"] = chain
        row = InstanceRow(
            id=instance_id(journey.row.id, customer.customer_id, trigger_id),
            journey_id=journey.row.id,
            version=journey.row.current_version,
            customer_id=customer.customer_id,
            correlation=correlation,
            status="active",
            node_id=journey.graph.entry_id,
            wait={"kind": "start"},
            context=context,
            seq=0,
            entered_at=now,
        )
        writer.new_instances.append(row)
        writer.enrolments[(journey.row.id, customer.customer_id, row.correlation_key)] += 1
        if journey.graph.definition.goal is not None and last_entered_at is not None:
            # The newest instance owns the goal: an earlier one's open window closes (one purchase
            # converted every past run of a weekly broadcast, and windows piled up per run). A first
            # entry (no enrolment yet) has no earlier instance: no statement for it.
            for stored in correlation_keys(correlation):
                writer.superseded[(journey.row.id, customer.customer_id, stored)] = row.id
        if start_at is not None and start_at > now:
            writer.timers.append((row.id, row.seq, start_at))
            return row
        outcome = self._walk(journey.graph, row, customer, Start(), now)
        if outcome is not None:
            await self._apply(uow, writer, row, outcome, customer, journey.graph, new=True)
        return row

    def _walk(
        self, graph: Graph, row: InstanceRow, customer: CustomerView, event: Input, now: datetime
    ) -> Outcome | None:
        # The walker updates the customer it walks (traits set by update_trait nodes, sends counted for
        # frequency caps) so that the batch's later steps see them: on a copy, kept only if the walk
        # succeeds, so a failed one (e.g. a loop through a delay whose date has passed) leaves no trace
        # in the customer's other journeys.
        work = replace(customer, recent_sends={k: list(v) for k, v in customer.recent_sends.items()})
        try:
            outcome = Walker(graph, instance_view(row), work, self.rules, now).react(event)
            customer.traits, customer.recent_sends = work.traits, work.recent_sends
            return outcome
        except Exception as exc:  # a broken step must not block the customer's other journeys
            log.exception("journey step failed", extra={"instance": row.id, "node": row.node_id})
            return Outcome(
                node_id=row.node_id,
                status="exited",
                context=dict(row.context),
                exit_reason=f"error: {exc!r}"[:500],
                counts=[(row.node_id, "exited")],
            )

    async def _react(
        self,
        uow: UnitOfWork,
        writer: StepWriter,
        row: InstanceRow,
        customer: CustomerView,
        event: Input,
        now: datetime,
    ) -> bool:
        """Walk `row` on `event`; whether it was walked (False: its version's graph is missing)."""
        graph = await self.graph(uow.session, row.journey_id, row.version)
        if graph is None:
            return False
        outcome = self._walk(graph, row, customer, event, now)
        if outcome is not None:
            await self._apply(uow, writer, row, outcome, customer, graph)
        return True

    def _leave(
        self,
        writer: StepWriter,
        row: InstanceRow,
        status: str,
        reason: str,
        metric: str,
        goal: Goal | None = None,
    ) -> None:
        row.status = status
        row.exit_reason = reason
        row.wait = None
        row.seq += 1
        if status == "converted" and row.converted_at is None:
            row.converted_at = writer.now
        writer.changed.append(row)
        writer.counts[(row.journey_id, row.version, row.node_id, metric)] += 1
        if status == "exited":
            self._open_goal_window(writer, row, goal)

    def _archived(self, writer: StepWriter, row: InstanceRow) -> None:
        """An archived journey's instance the archive has not exited yet: it exits (as the archive
        would, no goal window) rather than step on and send."""
        self._leave(writer, row, "exited", ARCHIVED, "exited")

    @staticmethod
    def _open_goal_window(writer: StepWriter, row: InstanceRow, goal: Goal | None) -> None:
        """A finished instance's goal still counts until `within` after its entry (no `within`: until
        the journey is archived)."""
        if goal is None:
            return
        until = None if goal.within is None else row.entered_at + goal.within
        if until is not None and until <= writer.now:
            return
        writer.windows.append(
            GoalWindow(
                row.id,
                row.customer_id,
                row.journey_id,
                row.version,
                row.node_id,
                row.correlation_key,
                row.entered_at,
                until,
            )
        )

    async def _apply(
        self,
        uow: UnitOfWork,
        writer: StepWriter,
        row: InstanceRow,
        outcome: Outcome,
        customer: CustomerView,
        graph: Graph,
        *,
        new: bool = False,
    ) -> None:
        row.node_id = outcome.node_id
        row.status = outcome.status
        row.wait = None if outcome.wait is None else {k: v for k, v in outcome.wait.items() if k != "what"}
        row.context = outcome.context
        row.exit_reason = outcome.exit_reason
        row.seq += 1
        if not new:
            writer.changed.append(row)
        if outcome.status == "active" and outcome.due_at is not None:
            writer.timers.append((row.id, row.seq, outcome.due_at))
        if outcome.status == "exited":
            self._open_goal_window(writer, row, graph.definition.goal)
        for node_id, metric in outcome.counts:
            writer.counts[(row.journey_id, row.version, node_id, metric)] += 1
        now = writer.now
        for effect in outcome.effects:
            if isinstance(effect, RequestMessage):
                self._request(uow, writer, row, customer, effect, now)
            elif isinstance(effect, MessageWithheld):
                self._withhold(uow, writer, row, effect, now)
            elif isinstance(effect, UpdateTraits):
                await projection.merge_traits(uow.session, row.customer_id, effect.traits, now)
                uow.emit(
                    CUSTOMER_EVENTS.name,
                    row.customer_id,
                    CustomerEvent(
                        message_id=effect.event_id,
                        type=EventType.IDENTIFY,
                        # The canonical id names the profile: as a userId alone it would be a new
                        # customer's whenever the profile's id is an anonymousId (a visitor who signed up).
                        customer_id=row.customer_id,
                        user_id=row.customer_id,
                        traits=effect.traits,
                        timestamp=now,
                        received_at=now,
                        source="journey_engine",
                        context={
                            "journey": {
                                "id": row.journey_id,
                                "version": row.version,
                                "node_id": effect.node_id,
                            }
                        },
                    ),
                    correlation_id=_chain(row),
                )

    def _request(
        self,
        uow: UnitOfWork,
        writer: StepWriter,
        row: InstanceRow,
        customer: CustomerView,
        effect: RequestMessage,
        now: datetime,
    ) -> None:
        recipient = Recipient(
            email=customer.email or _str(customer.traits.get("email")),
            phone=customer.phone or _str(customer.traits.get("phone")),
            timezone=customer.timezone,
            locale=customer.locale,
            webhook_url=effect.webhook_url,
        )
        uow.emit(
            MESSAGE_REQUESTS.name,
            row.customer_id,
            MessageRequested(
                message_id=effect.message_id,
                customer_id=row.customer_id,
                channel=effect.channel,
                template_id=effect.template_id,
                category=effect.category,
                subscription_topic=effect.subscription_topic,
                recipient=recipient,
                data=effect.data,
                journey_id=row.journey_id,
                journey_version=row.version,
                instance_id=row.id,
                node_id=effect.node_id,
                requested_at=now,
            ),
            correlation_id=_chain(row),
        )
        writer.messages.append(
            self._log(
                row,
                effect.node_id,
                effect.message_id,
                str(effect.channel),
                str(effect.category),
                "requested",
                None,
                effect.template_id,
            )
        )

    def _withhold(
        self, uow: UnitOfWork, writer: StepWriter, row: InstanceRow, effect: MessageWithheld, now: datetime
    ) -> None:
        status = MessageStatusKind.CAPPED if effect.status == "capped" else MessageStatusKind.SKIPPED
        uow.emit(
            MESSAGE_STATUS.name,
            row.customer_id,
            MessageStatus(
                status_id=f"{effect.message_id}:{effect.status}",
                message_id=effect.message_id,
                customer_id=row.customer_id,
                status=status,
                channel=effect.channel,
                occurred_at=now,
                reason=effect.reason,
                template_id=effect.template_id,
                category=effect.category,
                journey_id=row.journey_id,
                journey_version=row.version,
                instance_id=row.id,
                node_id=effect.node_id,
            ),
            correlation_id=_chain(row),
        )
        writer.messages.append(
            self._log(
                row,
                effect.node_id,
                effect.message_id,
                str(effect.channel),
                str(effect.category),
                effect.status,
                effect.reason,
                effect.template_id,
            )
        )

    @staticmethod
    def _log(
        row: InstanceRow,
        node_id: str,
        message_id: str,
        channel: str,
        category: str,
        decision: str,
        reason: str | None,
        template_id: str,
    ) -> dict[str, Any]:
        return {
            "message_id": message_id,
            "customer_id": row.customer_id,
            "channel": channel,
            "category": category,
            "decision": decision,
            "reason": reason,
            "template_id": template_id,
            "journey_id": row.journey_id,
            "version": row.version,
            "instance_id": row.id,
            "node_id": node_id,
        }

    # ------------------------------------------------------------------ timers

    async def run_once(self, *, broadcasts: bool = True) -> int:
        """Fire one batch of due timers (oldest first) in one unit of work; the number of timers
        claimed. A transient condition of the database (a deadlock, a full disk: `db_errors`) is
        retried at once a few times, then raised as an outage is (the caller retries the batch with
        backoff, without limit): neither is the timers' fault. A batch that fails for another reason
        (a bug, a constraint) is taken apart (`_isolate`): its timers would otherwise be claimed
        first again and again, and every later timer of every journey stay due behind them. Then,
        unless `broadcasts` is false or timers are behind, run the due broadcasts: after a pass that
        failed too (then raised once they ran), so that failing timers hold no broadcast back."""
        claimed: list[ClaimedTimer] = []
        try:
            fired = await self._timers(claimed)
        except InstanceConflict:
            raise  # the loop goes again at once
        except Exception:
            if broadcasts:
                try:
                    await self.run_due_broadcasts()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("due broadcasts failed after a failed timer pass")
            raise
        if fired and self.on_fired is not None:
            self.on_fired([t.due_at for t in fired])
        if broadcasts and len(claimed) < self.settings.timer_batch_size:
            # Not behind on timers: look for due broadcasts (skipped while draining a backlog).
            await self.run_due_broadcasts()
        return len(claimed)

    async def _timers(self, claimed: list[ClaimedTimer]) -> list[ClaimedTimer]:
        """One pass over due timers (`run_once`): those fired; `claimed` receives the batch."""
        try:
            return (await self._unit(claimed)).timers
        except Exception as exc:
            if isinstance(exc, InstanceConflict) or db_errors.is_passing(exc) or not claimed:
                raise
            TIMER_ERRORS.inc()
            log.warning(
                "timer batch failed; isolating the failing timers",
                extra={"size": len(claimed), "error": _error_text(exc)},
            )
            fired, failed = await self._isolate(sorted(claimed, key=lambda t: (t.due_at, t.id)), exc)
            return fired.timers + await self._failed_alone(fired.stepped, failed)

    async def _unit(
        self,
        claimed: list[ClaimedTimer],
        ids: Sequence[int] | None = None,
        other_than: Sequence[str] | None = None,
    ) -> Fired:
        """`_fire`, tried again after a short, growing pause when a transient condition of the
        database failed it (a deadlock with an erasure, say); raised after `TRANSIENT_TRIES`."""
        for attempt in range(1, TRANSIENT_TRIES + 1):
            claimed.clear()
            try:
                return await self._fire(claimed, ids, other_than)
            except Exception as exc:
                if attempt == TRANSIENT_TRIES or not db_errors.is_transient(exc):
                    raise
                log.info(
                    "timer unit of work met a transient database condition; retrying",
                    extra={"sqlstate": sqlstate(exc), "attempt": attempt},
                )
                await asyncio.sleep(db_errors.backoff(TRANSIENT_PAUSE_S, attempt, 1.0))
        raise AssertionError("unreachable")

    async def _fire(
        self,
        claimed: list[ClaimedTimer],
        ids: Sequence[int] | None = None,
        other_than: Sequence[str] | None = None,
    ) -> Fired:
        """Claim due timers (or these `ids`, those still there and due; or those of journeys other
        than these) and step their instances in one unit of work; the timers fired, and those of
        them that stepped a live instance (only those say steps work: `_failed_alone`). `claimed`
        receives them as soon as they are claimed: what a failed unit of work had taken, to take
        apart."""
        now = self.clock.now()
        stepped: list[ClaimedTimer] = []
        async with self.platform.unit_of_work() as uow:
            session = uow.session
            batch_size = self.settings.timer_batch_size if ids is None else len(ids)
            if self.rules.caps:
                # Frequency caps count sends across journeys: serialize each customer's steps, taking the
                # customers' locks before the instances' (the order consumers use).
                claimed[:] = await instance_store.claim_due_timers(session, now, batch_size, ids, other_than)
                instance_ids = sorted({t.instance_id for t in claimed})
                locked = await projection.lock_customers_of_instances(session, instance_ids)
                held = await instance_store.lock_instances(session, instance_ids)
                rows = {r.id: r for r, _ in held}
                archived = {r.id for r, a in held if a}
                if any(r.customer_id not in locked for r in rows.values()):
                    raise InstanceConflict()  # a merge moved one to another customer: go again
            else:
                # Without caps an instance's own row lock is all a timer step needs: one round trip.
                steps = await instance_store.claim_due_steps(session, now, batch_size, ids, other_than)
                claimed[:] = [t for t, _, _ in steps]
                rows = {r.id: r for _, r, _ in steps}
                archived = {r.id for _, r, a in steps if a}
            if claimed:
                live: dict[str, InstanceRow] = {}
                for t in claimed:
                    row = rows.get(t.instance_id)
                    # A stale timer (the instance moved on, e.g. the awaited event came) fires as a no-op.
                    if row is not None and row.status == "active" and row.seq == t.seq:
                        live[row.id] = row
                records = await projection.load(
                    session,
                    [r.customer_id for r in live.values()],
                    projection.sends_window(now, bool(self.rules.caps)),
                )
                customers = {cid: customer_view(rec) for cid, rec in records.items()}
                writer = StepWriter(now)
                reacted: set[tuple[str, int]] = set()
                for row in live.values():
                    if row.id in archived:
                        self._archived(writer, row)
                        continue
                    seq = row.seq  # the step moves it on
                    # A version without a graph steps nothing: no evidence that steps work.
                    if await self._react(uow, writer, row, customers[row.customer_id], TimerFired(), now):
                        reacted.add((row.id, seq))
                await writer.flush(session)
                stepped = [t for t in claimed if (t.instance_id, t.seq) in reacted]
        return Fired(list(claimed), stepped)

    async def _isolate(
        self, timers: list[ClaimedTimer], error: Exception
    ) -> tuple[Fired, list[tuple[ClaimedTimer, Exception]]]:
        """Find the failing timers of a unit of work that failed with `error` by halves, as the
        consumers find a poison message (`shared.kafka.consumer`): a part that succeeds is done in
        one unit of work, a failing one is split again, down to single timers. One failing timer in a
        batch of 500 costs ~20 units of work. (the timers fired, those that failed alone with why)."""
        fired = Fired([], [])
        if len(timers) == 1:
            return fired, [(timers[0], error)]
        middle = len(timers) // 2
        failed: list[tuple[ClaimedTimer, Exception]] = []
        for part in (timers[:middle], timers[middle:]):
            done, failure = await self._try(part)
            if failure is not None:
                done, alone = await self._isolate(part, failure)
                failed += alone
            fired.timers.extend(done.timers)
            fired.stepped.extend(done.stepped)
        return fired, failed

    async def _try(self, timers: list[ClaimedTimer]) -> tuple[Fired, Exception | None]:
        """Fire these timers (those still there) in one unit of work: (fired, None), or (none, the
        error) when it failed for a reason of its own (an outage or a transient condition is raised)."""
        while True:
            try:
                return await self._unit([], [t.id for t in timers]), None
            except InstanceConflict:
                continue  # a merge moved one of the instances meanwhile: go again
            except Exception as exc:
                if db_errors.is_passing(exc):
                    raise
                TIMER_ERRORS.inc()
                return Fired([], []), exc

    async def _failed_alone(
        self, stepped: list[ClaimedTimer], failed: list[tuple[ClaimedTimer, Exception]]
    ) -> list[ClaimedTimer]:
        """Count a try for each timer that failed alone: it is tried again `timer_retry_s` later
        (doubled each time), and parked once it has failed `timer_max_attempts` times. When no timer
        of the batch stepped a live instance (`stepped`: a stale timer fires as a no-op, which says
        nothing of whether steps work) and those that failed wait in more than one journey, the due
        timers of the other journeys are tried (`_probe`; those fired are returned). If none of them
        steps a live instance either (none due, only stale ones, or they fail too), it is taken for
        an outage (the engine or the database, not a journey's step: a release that fails every
        step, a condition `db_errors` does not know):
        nothing is counted, the failed timers are put off `timer_retry_s` (so that the timers due
        after them get their turn: they would be claimed first again on every pass) and
        `TimersFailing` is raised, for the loop's backoff; no customer's timer is parked for it. A
        timer this worker has taken for an outage `timer_outage_passes` times is counted all the
        same: journeys broken at once while nothing else is due would be tried for ever. (Timers of
        one journey that all fail, a broken node, are counted: held back, they would hold back every
        later timer.)"""
        if not failed:
            return []
        probed = Fired([], [])
        outage: TimersFailing | None = None
        if not stepped and len(failed) > 1:
            async with self.platform.unit_of_work() as uow:
                journeys = set(
                    (
                        await instance_store.journeys_of_instances(
                            uow.session, [t.instance_id for t, _ in failed]
                        )
                    ).values()
                )
            if len(journeys) > 1:
                probed = await self._probe(journeys)
                if not probed.stepped:
                    failed, outage = await self._outage(journeys, failed)
        for timer, failure in failed:
            try:
                await self._count_failure(timer, failure)
            except asyncio.CancelledError:
                raise
            except Exception:
                # It stays due as it was: the next pass meets it again. The other timers go on.
                log.exception(
                    "could not record a failed timer's try",
                    extra={"timer": timer.id, "instance": timer.instance_id},
                )
        if outage is not None:
            raise outage
        return probed.timers

    async def _outage(
        self, journeys: set[str], failed: list[tuple[ClaimedTimer, Exception]]
    ) -> tuple[list[tuple[ClaimedTimer, Exception]], TimersFailing | None]:
        """A batch taken for an outage (`_failed_alone`): put off its timers, but for those this
        worker has now taken for one `timer_outage_passes` times: (those, to count all the same; the
        error to raise once they are, None when none was put off)."""
        if len(self._taken_for_outage) > 100_000:
            self._taken_for_outage.clear()  # fired or parked by other workers meanwhile: forget them
        count: list[tuple[ClaimedTimer, Exception]] = []
        put_off: list[int] = []
        for timer, failure in failed:
            seen = self._taken_for_outage.get(timer.id, 0) + 1
            if seen >= self.settings.timer_outage_passes:
                self._taken_for_outage.pop(timer.id, None)
                count.append((timer, failure))
            else:
                self._taken_for_outage[timer.id] = seen
                put_off.append(timer.id)
        if not put_off:
            return count, None
        async with self.platform.unit_of_work() as uow:
            await instance_store.put_off_timers(
                uow.session, put_off, self.clock.now(), self.settings.timer_retry_s
            )
        error = TimersFailing(
            f"all {len(failed)} timers of the batch failed alone, in {len(journeys)} journeys, and no "
            f"other journey's timer stepped its instance: taken for an outage, {len(put_off)} put off "
            f"({_error_text(failed[0][1])})"
        )
        error.__cause__ = failed[0][1]
        return count, error

    async def _probe(self, journeys: set[str]) -> Fired:
        """After a batch whose every timer failed alone in these journeys: fire a batch of the due
        timers of the other journeys, in one unit of work; those fired (none: none was due, or that
        batch failed too, left due as it was). One that stepped a live instance says the engine and
        the database work: the failures are those journeys' own. Stale ones only (no-ops) say
        nothing: as if none had fired."""
        while True:
            try:
                return await self._unit([], other_than=sorted(journeys))
            except InstanceConflict:
                continue  # a merge moved one of the instances meanwhile: go again
            except Exception as exc:
                if db_errors.is_passing(exc):
                    raise
                TIMER_ERRORS.inc()
                log.warning(
                    "timers of other journeys failed too, after a batch failed in several",
                    extra={"journeys": sorted(journeys), "error": _error_text(exc)},
                )
                return Fired([], [])

    async def _count_failure(self, timer: ClaimedTimer, failure: Exception) -> None:
        """One more try counted on the timer's row: retried later, or parked (`timers_parked`, with
        the error), logged and counted, never dropped. A parked timer's instance waits where it was;
        put back into `timers`, it fires again."""
        error = _error_text(failure)
        async with self.platform.unit_of_work() as uow:
            noted = await instance_store.note_timer_failure(
                uow.session,
                timer.id,
                error,
                self.clock.now(),
                retry_s=self.settings.timer_retry_s,
                max_attempts=self.settings.timer_max_attempts,
            )
        if noted is None:
            return  # fired, parked or put off by another worker meanwhile
        where = {"timer": timer.id, "instance": timer.instance_id, "attempts": noted.attempts, "error": error}
        if noted.retry_at is not None:
            log.warning(
                "a timer's step failed; it is tried again later",
                extra=where | {"retry_at": noted.retry_at.isoformat()},
                exc_info=failure,
            )
            return
        TIMERS_PARKED.labels(noted.journey_id or "").inc()
        log.error(
            "a timer's step kept failing: the timer is parked (timers_parked)",
            extra=where | {"journey": noted.journey_id, "node": noted.node_id},
            exc_info=failure,
        )

    # ------------------------------------------------------------------ parked timers (operators)

    async def requeue_parked(self, journey_id: str, timer_ids: Sequence[int]) -> ParkedHandled:
        """Put these parked timers of the journey back among the due timers, under their ids, due now
        with no tries counted: the next pass fires them (one whose instance moved on as a no-op)."""
        done = await self._handle_parked(lambda s: parked_store.find(s, journey_id, timer_ids), discard=False)
        if done.timers:
            log.info("parked timers put back", extra={"journey": journey_id, "timers": len(done.timers)})
        return done

    async def discard_parked(self, journey_id: str, timer_ids: Sequence[int]) -> ParkedHandled:
        """Delete these parked timers of the journey; an instance one still held (active, at the step
        it was armed for) exits there (`TIMER_DISCARDED`, counted and with its goal window as any
        exit), so its correlation value may enter again, as the re-entry policy says. One of an
        archived journey the archive has not got to yet exits as the archive exits it (`ARCHIVED`,
        no goal window), as a step of it would."""
        done = await self._handle_parked(lambda s: parked_store.find(s, journey_id, timer_ids), discard=True)
        if done.timers:
            log.info(
                "parked timers discarded",
                extra={"journey": journey_id, "timers": len(done.timers), "exited": len(done.exited)},
            )
        return done

    async def handle_all_parked(
        self, journey_id: str, *, discard: bool, node_id: str | None = None
    ) -> ParkedTotals:
        """Requeue (or discard) every parked timer of the journey (of its instances at `node_id`, if
        given), `timer_batch_size` per unit of work (a timer batch's locks at most). It waits for no
        instance: one held elsewhere (a step, an event, an erasure of that customer) is skipped and
        its timer left parked (counted), and those parked while it runs may be left: list again."""
        size = self.settings.timer_batch_size
        after, handled, exited, skipped, at = 0, 0, 0, 0, self.clock.now()

        async def chunk(session: AsyncSession) -> list[ParkedTimer]:
            return await parked_store.next_chunk(session, journey_id, after, size, node_id)

        while True:
            done = await self._handle_parked(chunk, discard=discard, skip_locked=True)
            handled, exited, at = handled + len(done.timers), exited + len(done.exited), done.at
            skipped += len(done.skipped)
            if len(done.seen) < size:
                break
            after = max(t.id for t in done.seen)
        if handled or skipped:
            log.info(
                "parked timers discarded" if discard else "parked timers put back",
                extra={
                    "journey": journey_id,
                    "node": node_id,
                    "timers": handled,
                    "exited": exited,
                    "skipped": skipped,
                },
            )
        return ParkedTotals(handled, exited, skipped, at)

    async def _handle_parked(
        self,
        read: Callable[[AsyncSession], Awaitable[list[ParkedTimer]]],
        *,
        discard: bool,
        skip_locked: bool = False,
    ) -> ParkedHandled:
        """`_parked_unit`, tried again after a short pause when a transient condition of the database
        failed it (a deadlock with a merge moving the instances' customer, say). An instance held
        past `PARKED_LOCK_TIMEOUT_MS` is not waited for again: `ParkedBusy`."""
        for attempt in range(1, TRANSIENT_TRIES + 1):
            try:
                return await self._parked_unit(read, discard=discard, skip_locked=skip_locked)
            except Exception as exc:
                if is_lock_timeout(exc):
                    raise ParkedBusy() from exc
                if attempt == TRANSIENT_TRIES or not db_errors.is_transient(exc):
                    raise
                await asyncio.sleep(db_errors.backoff(TRANSIENT_PAUSE_S, attempt, 1.0))
        raise AssertionError("unreachable")

    async def _parked_unit(
        self,
        read: Callable[[AsyncSession], Awaitable[list[ParkedTimer]]],
        *,
        discard: bool,
        skip_locked: bool,
    ) -> ParkedHandled:
        """One unit of work: the parked timers `read` finds, put back or discarded (state and outbox
        together, as any step); with `skip_locked`, those whose instance is held elsewhere are left
        as they were (`skipped`)."""
        now = self.clock.now()
        async with self.platform.unit_of_work() as uow:
            session = uow.session
            # Every lock it waits for, it waits for a while only: it holds the instances it locked
            # meanwhile, and their customers' steps wait behind it.
            await set_lock_timeout(session, PARKED_LOCK_TIMEOUT_MS)
            seen = await read(session)
            if not seen:
                return ParkedHandled([], [], {}, now)
            # Their instances first, in id order, as steps and erasures lock them (an erasure then
            # deletes their timers, parked ones too): whether one still holds its instance is read
            # under that lock, and no timer is put back for an instance being erased.
            ids = sorted({t.instance_id for t in seen})
            locked = await instance_store.lock_instances(session, ids, skip_locked=skip_locked)
            rows = {r.id: r for r, _ in locked}
            archived = {r.id for r, a in locked if a}
            skipped: list[ParkedTimer] = []
            if skip_locked:
                # Not locked: held elsewhere (or deleted since by an erasure, which held it too).
                skipped = [t for t in seen if t.instance_id not in rows]
                seen_now = [t for t in seen if t.instance_id in rows]
            else:
                seen_now = seen
            current = [_as_held(t, rows.get(t.instance_id)) for t in seen_now]
            if not discard:
                done = await parked_store.requeue(session, current, now)
                return ParkedHandled(seen, [t for t in current if t.id in done], {}, now, skipped)
            done = await parked_store.discard(session, current)
            writer = StepWriter(now)
            exited: dict[str, str] = {}
            for t in current:
                row = rows.get(t.instance_id)
                if t.id not in done or not t.holds_instance or row is None or row.id in exited:
                    continue  # gone meanwhile, or it holds nobody (the instance moved on or exited)
                if row.id in archived:
                    # Archived, its customers not exited yet: as the archive (or a step) exits it.
                    self._archived(writer, row)
                    exited[row.id] = ARCHIVED
                    continue
                graph = await self.graph(session, row.journey_id, row.version)
                goal = graph.definition.goal if graph is not None else None
                self._leave(writer, row, "exited", TIMER_DISCARDED, "exited", goal)
                exited[row.id] = TIMER_DISCARDED
            await writer.flush(session)
            return ParkedHandled(seen, [t for t in current if t.id in done], exited, now, skipped)

    async def run_due_broadcasts(self) -> int:
        """Scheduled broadcasts (and enrolment of current segment members) that are due: a chunk of
        members per transaction, round robin over the due journeys until the pass's budget is spent
        (`broadcasts_pending` then says more is waiting). A journey whose chunk fails is logged,
        counted and retried after `broadcast_retry_s`; the others go on."""
        now = self.clock.now()
        self._broadcast_retry = {j: t for j, t in self._broadcast_retry.items() if t > now}
        async with self.platform.unit_of_work() as uow:
            pending = await journey_store.due_runs(uow.session, now, sorted(self._broadcast_retry))
        deadline = time.monotonic() + self.settings.broadcast_budget_s
        enrolled = 0
        self.broadcasts_pending = False
        while pending:
            more = []
            for journey_id in pending:
                try:
                    n, again = await self._broadcast_chunk(journey_id)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("broadcast chunk failed; retrying later", extra={"journey": journey_id})
                    BROADCAST_FAILURES.labels(journey_id).inc()
                    self._broadcast_retry[journey_id] = self.clock.now() + timedelta(
                        seconds=self.settings.broadcast_retry_s
                    )
                    continue
                enrolled += n
                if again:
                    more.append(journey_id)
            pending = more
            if pending and time.monotonic() >= deadline:
                self.broadcasts_pending = True
                break
        return enrolled

    async def _broadcast_chunk(self, journey_id: str) -> tuple[int, bool]:
        """Enrol the next chunk of a due broadcast's members in one transaction: (enrolled, whether
        members are left). Only members' locks for one chunk are held at a time, and the progress is
        saved with the chunk, so a crash resumes after the last committed chunk."""
        async with self.platform.unit_of_work() as uow:
            session = uow.session
            now = self.clock.now()
            state = await journey_store.run_state(session, journey_id)
            if (
                state is None
                or state.status != "active"
                or state.next_run_at is None
                or state.next_run_at > now
            ):
                return 0, False
            run_at = state.next_run_at
            graph = await self.graph(session, journey_id, state.version)
            entry = graph.definition.entry if graph is not None else None
            if graph is None or not (
                isinstance(entry, ScheduleEntry)
                or (isinstance(entry, SegmentEntry) and entry.enrol_current and entry.change == "entered")
            ):
                # Nothing to enrol (the entry is no longer a broadcast, nor an enrolment of current
                # members: a broadcast edited into a segment-triggered journey does not send its
                # pending run to the segment): stop scheduling runs.
                if await journey_store.lock_run(session, state) is not None:
                    await journey_store.finish_run(session, journey_id, None, now)
                return 0, False
            size = self.settings.broadcast_chunk_size
            # The erasure gate before the members' read and locks, as the consumers take it: an
            # erasure either deletes what this chunk writes or is seen by it.
            await erasure_gate(session, exclusive=False)
            members = await projection.segment_members_after(
                session, entry.segment_id, state.resume_after, size
            )
            # The customers' locks before the journey's row: the order consumers take them in (a
            # consumer may count an entry against the journey's cap while holding its customers').
            await projection.lock_customers(session, members)
            row = await journey_store.lock_run(session, state)
            if row is None:
                return 0, False  # another worker has this chunk, or the journey changed meanwhile
            # (`members[-1]` stays the page's key: an erased member is skipped, not read again.)
            erased = await erased_among(session, self._salt, members)
            enrolled = await self._enrol_members(
                uow, ActiveJourney(row, graph), entry, run_at, [c for c in members if c not in erased], now
            )
            if len(members) < size:
                # The next run is the one the current definition says (it may have been edited
                # since this run began); an enrolment of current members has none.
                following = (
                    upcoming_run(entry.at, entry.every, now) if isinstance(entry, ScheduleEntry) else None
                )
                await journey_store.finish_run(session, journey_id, following, now)
                return enrolled, False
            await journey_store.save_progress(session, journey_id, run_at, members[-1], now)
            return enrolled, True

    async def _enrol_members(
        self,
        uow: UnitOfWork,
        journey: ActiveJourney,
        entry: ScheduleEntry | SegmentEntry,
        run_at: datetime,
        members: list[str],
        now: datetime,
    ) -> int:
        """Enter these (locked) members on the run at `run_at`, skipping those already inside, those
        this run already entered, those who entered otherwise since it began and those who left the
        segment since it was read."""
        if not members:
            return 0
        session = uow.session
        run_id = f"run:{run_at.isoformat()}"
        skip = await instance_store.inside_or_entered(
            session, journey.row.id, members, [instance_id(journey.row.id, c, run_id) for c in members]
        )
        records = await projection.load(
            session,
            [c for c in members if c not in skip],
            projection.sends_window(now, bool(self.rules.caps)),
        )
        candidates = [c for c in sorted(records) if entry.segment_id in records[c].segments]
        last = await instance_store.last_entries(session, journey.row.id, candidates)
        # Entered since the run began, by another way than this run's instance id: a membership event
        # just after activation (enrol_current), or a profile merged into this one after a chunk
        # entered it (its enrolment moved here). Entering them again sent the same message twice.
        since = {c for (c, _), at in last.items() if at >= run_at}
        candidates = [c for c in candidates if c not in since]
        writer = StepWriter(now)
        enrolled = 0
        for cid in candidates:
            customer = customer_view(records[cid])
            start_at = now
            if isinstance(entry, ScheduleEntry) and entry.local_time is not None:
                tz = zone(customer.timezone, self.rules.default_timezone)
                start_at = max(
                    now, datetime.combine(run_at.astimezone(UTC).date(), entry.local_time, tzinfo=tz)
                )
            context: dict[str, Any] = {
                "trigger": {"broadcast": run_at.isoformat(), "segment_id": entry.segment_id}
            }
            if await self._enter(
                uow,
                writer,
                journey,
                customer,
                "",
                run_id,
                context,
                now,
                start_at=start_at,
                last_entered_at=last.get((cid, "")),
            ):
                enrolled += 1
        await writer.flush(session)
        return enrolled

    async def finish_archive(self, journey_id: str) -> int:
        """Exit an archived journey's customers (counted as exited at their node) and close its goal
        windows, a chunk per transaction; the number exited. Its status changed first, on its own
        (the entry gate is held exclusive only for that): until a chunk gets to an instance, any step
        of it exits it rather than send (`_archived`)."""
        size = self.settings.archive_chunk_size
        exited, after = 0, None
        while True:
            async with self.platform.unit_of_work() as uow:
                n, after = await instance_store.exit_unheld(
                    uow.session, journey_id, ARCHIVED, self.clock.now(), size, after
                )
            exited += n
            if after is None:
                break
        while True:  # those steps in flight held (skipped above), waiting for them
            async with self.platform.unit_of_work() as uow:
                n = await instance_store.exit_held(uow.session, journey_id, ARCHIVED, self.clock.now(), size)
            exited += n
            if n == 0:
                break
        async with self.platform.unit_of_work() as uow:
            await instance_store.close_goal_windows(uow.session, journey_id)
        return exited

    async def finish_archives(self) -> int:
        """Finish the archived journeys that still have customers inside or goal windows open (one
        replica at a time): an archive's answer that never got to them (a crash after its status
        changed), or an entry committed after it (a replica of the release before takes no entry
        gate). Returns the customers exited."""
        async with try_exclusive(self.platform.engine, "journey_engine.finish_archives") as mine:
            if not mine:
                return 0
            async with self.platform.unit_of_work() as uow:
                unfinished = await journey_store.unfinished_archives(uow.session)
            exited = 0
            for journey_id in unfinished:
                exited += await self.finish_archive(journey_id)
            return exited

    async def finish_archives_forever(self) -> None:
        await _every(
            self.settings.archive_sweep_interval_s,
            self.finish_archives,
            "archived journeys' customers exited",
            "instances",
            "finishing archived journeys failed; retrying next round",
        )

    async def compact_counts(self) -> int:
        """Roll up the step counters of journeys that have piled up rows and forget expired goal
        windows (one replica at a time); returns how many journeys were compacted."""
        done = 0
        async with try_exclusive(self.platform.engine, "journey_engine.compact_counts") as mine:
            if not mine:
                return 0
            async with self.platform.unit_of_work() as uow:
                # Goal windows that closed unconverted: the same housekeeping round.
                await instance_store.prune_goal_windows(uow.session, self.clock.now())
                crowded = await instance_store.crowded_journeys(
                    uow.session, self.settings.counts_rows_per_total
                )
            for journey_id in crowded:  # a transaction each: short locks on one journey's rows
                async with self.platform.unit_of_work() as uow:
                    await instance_store.compact_node_counts(uow.session, journey_id)
                done += 1
        return done

    async def compact_counts_forever(self) -> None:
        await _every(
            self.settings.counts_compact_interval_s,
            self.compact_counts,
            "step counters compacted",
            "journeys",
            "compacting step counters failed; retrying next round",
        )

    async def run_forever(self) -> None:
        """One timer worker: fire due timers in batches, resting only when nothing is due. Due
        broadcasts are looked for at most every `broadcast_poll_interval_s` (a transaction each time,
        on every replica), unless a pass left some waiting."""
        looked = -math.inf
        failures = 0
        while True:
            broadcasts = (
                self.broadcasts_pending
                or time.monotonic() - looked >= self.settings.broadcast_poll_interval_s
            )
            if broadcasts:
                looked = time.monotonic()
            try:
                claimed = await self.run_once(broadcasts=broadcasts)
                failures = 0
            except asyncio.CancelledError:
                raise
            except InstanceConflict:
                # An event stepped one of the instances meanwhile: the batch rolled back, go again.
                continue
            except Exception:
                # An outage, a transient condition that outlasted its quick retries, or a batch taken
                # for an outage (`TimersFailing`): nothing was counted against its timers.
                failures += 1
                log.exception("timer batch failed; retrying", extra={"failed_passes": failures})
                poll = self.settings.timer_poll_interval_s
                await asyncio.sleep(db_errors.backoff(poll, failures, max(poll, FAILED_PASS_PAUSE_MAX_S)))
                continue
            if claimed < self.settings.timer_batch_size and not self.broadcasts_pending:
                await asyncio.sleep(self.settings.timer_poll_interval_s)


def instance_id(journey_id: str, customer_id: str, trigger_id: str) -> str:
    """Deterministic: the same trigger (a message, a broadcast's run) never enters a customer twice."""
    return str(uuid.uuid5(INSTANCE_NAMESPACE, f"{journey_id}|{customer_id}|{trigger_id}"))


def _as_held(timer: ParkedTimer, row: InstanceRow | None) -> ParkedTimer:
    """A parked timer as its instance stands under its lock (None: the instance is gone)."""
    if row is None:
        return replace(timer, holds_instance=False)
    return replace(
        timer,
        version=row.version,
        node_id=row.node_id,
        instance_status=row.status,
        holds_instance=row.status == "active" and row.seq == timer.seq,
    )


def _chain(row: InstanceRow) -> str | None:
    """The correlation id of the message that started the instance (None: its messages start a chain)."""
    value = row.context.get("correlation_id")
    return value if isinstance(value, str) else None


def _error_text(exc: BaseException) -> str:
    """What went wrong, as stored with a parked timer: the driver's message without the statement
    and its parameters (customers' data) that SQLAlchemy's adds; no NUL (text cannot hold it)."""
    cause = getattr(exc, "orig", None)
    shown = cause if isinstance(cause, BaseException) else exc
    return f"{type(shown).__name__}: {shown}".replace("\x00", "\\x00")[:2000]


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


async def _every(
    interval_s: float, job: Callable[[], Awaitable[int]], done: str, counted: str, failed: str
) -> None:
    """Housekeeping of one replica at a time, every `interval_s`: `job` returns how many things it
    did (logged when any); a failed round is logged and the next one goes on."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            if count := await job():
                log.info(done, extra={counted: count})
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(failed)

"""Re-evaluating segments for some customers inside a unit of work, and announcing what changed.

Used by the event consumer (the segments an event can affect), the due-timer loop (a time-based
condition may have flipped) and merges (every segment). Each actual enter/exit is written with a
guarded upsert and announced through the outbox in the same transaction, with the event id
`<customer>:<segment>:<transition number>`, so it is announced exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.segmenter.domain.catalog import Catalog, SegmentRule, compile_segment
from services.segmenter.domain.profile import ProfileSnapshot
from services.segmenter.domain.rules import InvalidRule
from services.segmenter.store import catalogue as catalogue_store
from services.segmenter.store import segments as segment_store
from shared.contracts.events import SegmentMembershipChanged
from shared.contracts.topics import SEGMENT_MEMBERSHIP
from shared.db.unit_of_work import UnitOfWork

log = logging.getLogger(__name__)


def membership_event_id(customer_id: str, segment_id: str, transition: int) -> str:
    return f"{customer_id}:{segment_id}:{transition}"


class SegmentCatalogCache:
    """The segments' parsed rules, re-read each batch but re-parsed only when a version changes.

    A stored definition that no longer validates (saved by an earlier release) is left out, and kept in
    `invalid` with why: the back-fill worker marks such a segment `failed` (`Backfill.fail_invalid`),
    so it does not go on looking up to date while nothing updates it."""

    def __init__(self) -> None:
        self._parsed: dict[tuple[str, int], SegmentRule] = {}
        self._refused: dict[tuple[str, int], str] = {}
        self._key: tuple[tuple[str, int], ...] = ()
        self.catalog = Catalog()
        # segment id -> (its stored version, why that version is invalid, naming the nodes)
        self.invalid: dict[str, tuple[int, str]] = {}

    async def refresh(self, session: AsyncSession) -> Catalog:
        rows = await segment_store.segment_versions(session)
        key = tuple(sorted((sid, version) for sid, version, _, _ in rows))
        if key == self._key:
            return self.catalog
        parsed: dict[tuple[str, int], SegmentRule] = {}
        refused: dict[tuple[str, int], str] = {}
        for sid, version, name, definition in rows:
            cached = self._parsed.get((sid, version))
            if cached is None:
                why = self._refused.get((sid, version))
                if why is None:
                    try:
                        cached = compile_segment(sid, name, version, definition)
                    except InvalidRule as exc:
                        why = f"{segment_store.DEFINITION_ERROR}{exc}"
                        log.error(
                            "stored segment definition is invalid; skipped",
                            extra={"segment_id": sid, "version": version, "error": why},
                        )
                if why is not None:
                    refused[(sid, version)] = why
                    continue
            assert cached is not None
            parsed[(sid, version)] = cached
        self._parsed, self._refused, self._key = parsed, refused, key
        self.invalid = {sid: (version, why) for (sid, version), why in refused.items()}
        self.catalog = Catalog.build(parsed.values())
        return self.catalog


async def fill_snapshots(
    session: AsyncSession, catalog: Catalog, profiles: Mapping[str, ProfileSnapshot], now: datetime
) -> segment_store.EvaluationInputs:
    """Add what rules read besides the profile row: event aggregates, the occurrences windows and
    filters need (only as far back as a rule looks), memberships; plus the pending due timers."""
    inputs = await segment_store.load_evaluation_inputs(
        session, profiles, catalog.count_events, catalog.timeline_since(now)
    )
    for cid, p in profiles.items():
        p.events = inputs.counts.get(cid, {})
        p.timeline = inputs.occurrences.get(cid, {})
        p.memberships = {sid for sid, st in inputs.memberships.get(cid, {}).items() if st.is_member}
    if any(s.refs.recommendations for s in catalog.segments):
        lists = await catalogue_store.recommendation_categories(session, profiles)
        for cid, p in profiles.items():
            p.recommendations = lists.get(cid, {})
    return inputs


async def reevaluate(
    uow: UnitOfWork,
    catalog: Catalog,
    profiles: Mapping[str, ProfileSnapshot],
    affected: Mapping[str, set[str]],
    causes: Mapping[str, str],
    now: datetime,
    failed: dict[tuple[str, str], Exception] | None = None,
) -> int:
    """Evaluate `affected[customer]` segments for each customer; store, schedule and announce changes.
    Returns the number of announced transitions.

    An evaluation that raises is raised, unless `failed` is given (the due-timer loop's): then the
    pair (customer, segment) goes into it and is left as it was (membership, timer), and the others
    are stored as usual; one built on it (`member_of`) sees its membership as stored."""
    if not any(affected.values()):
        return 0
    session = uow.session
    touched = {cid: p for cid, p in profiles.items() if affected.get(cid)}
    inputs = await fill_snapshots(session, catalog, touched, now)
    changes: list[segment_store.MembershipChange] = []
    due: list[tuple[str, str, datetime]] = []
    clear: list[tuple[str, str]] = []
    names = {s.segment_id: s.name for s in catalog.segments}
    # The segments to evaluate for each distinct affected set, in dependency order (member_of sees
    # this pass's result): customers of a batch share a handful of such sets.
    plans: dict[frozenset[str], list[SegmentRule]] = {}
    for cid, p in touched.items():
        key = frozenset(affected[cid])
        plan = plans.get(key)
        if plan is None:
            todo = catalog.with_dependents(set(key))
            plan = plans[key] = [s for s in catalog.segments if s.segment_id in todo]
        for seg in plan:
            timed = seg.refs.time_dependent
            # Both before anything is noted for the pair. (The `try` costs nothing while nothing
            # raises: the event path's loop does the same work, and sends the same statements.)
            try:
                hit = seg.holds(p, now)
                when = seg.next_change_at(p, now) if timed else None
            except Exception as exc:
                if failed is None:
                    raise
                failed[cid, seg.segment_id] = exc
                continue
            was = seg.segment_id in p.memberships
            if hit != was:
                changes.append(
                    segment_store.MembershipChange(seg.segment_id, cid, hit, causes.get(cid, "unknown"))
                )
                (p.memberships.add if hit else p.memberships.discard)(seg.segment_id)
            if timed:
                pending = inputs.timers.get((cid, seg.segment_id))
                if when is None and pending is not None:
                    clear.append((cid, seg.segment_id))
                elif when is not None and when != pending:
                    due.append((cid, seg.segment_id, when))
    await segment_store.set_timers(session, due, clear)
    applied = await segment_store.apply_membership_changes(session, changes, now)
    for sid, cid, is_member, transitions, cause in applied:
        announce(uow, cid, sid, names.get(sid, sid), is_member, transitions, cause, now, profiles[cid].traits)
    return len(applied)


def announce(
    uow: UnitOfWork,
    customer_id: str,
    segment_id: str,
    segment_name: str,
    is_member: bool,
    transitions: int,
    cause: str,
    now: datetime,
    traits: dict[str, Any],
) -> None:
    uow.emit(
        SEGMENT_MEMBERSHIP.name,
        customer_id,
        SegmentMembershipChanged(
            event_id=membership_event_id(customer_id, segment_id, transitions),
            customer_id=customer_id,
            segment_id=segment_id,
            segment_name=segment_name,
            change="entered" if is_member else "exited",
            occurred_at=now,
            cause=cause,
            traits=traits,
        ),
        cause=cause,
    )

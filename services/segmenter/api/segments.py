"""The marketer's segment API (admin token): CRUD, preview, members, explain."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DBAPIError

from services.segmenter.domain.catalog import (
    Catalog,
    CycleError,
    compile_segment,
    cycle_through,
    dependency_order,
)
from services.segmenter.domain.evaluation import evaluate, explain
from services.segmenter.domain.rules import (
    InvalidRule,
    Rule,
    member_of_nodes,
    parse_rule,
    stored_member_of,
)
from services.segmenter.domain.rules import rule_to_json as rule_json
from services.segmenter.reevaluation import fill_snapshots
from services.segmenter.runtime import Segmenter
from services.segmenter.store import profiles as profile_store
from services.segmenter.store import segments as segment_store
from services.segmenter.store import timers as timer_store
from shared.db.errors import is_lock_timeout, set_lock_timeout, sqlstate
from shared.http import ApiError, admin_guard, field_error

# How long a deletion waits for the segment's row (see `delete_segment`) before answering 503.
DELETE_LOCK_TIMEOUT_MS = 5000
# A requeue of parked timers: parked rows per transaction, and how long one waits for a row (a timer a
# back-fill chunk or the due-timer loop holds, a customer an event batch, an erasure or a merge holds:
# an event batch of 4,000 events holds its customers about half a second) before answering 503.
REQUEUE_CHUNK = 1000
REQUEUE_LOCK_TIMEOUT_MS = 2000
# Lock timeout, deadlock, serialization failure: a requeue meeting a concurrent writer.
BUSY_SQLSTATES = frozenset({"55P03", "40P01", "40001"})


class SegmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)
    definition: Any


class PreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    definition: Any
    sample: int = Field(default=10, ge=0, le=100)


def _invalid(exc: InvalidRule) -> ApiError:
    return ApiError(
        400,
        "invalid_definition",
        "the segment definition is invalid",
        errors=[field_error(e.path, e.rule, e.message) for e in exc.errors],
    )


def _stored_invalid(exc: InvalidRule) -> ApiError:
    """The segment's stored definition (saved by an earlier release) no longer validates."""
    return ApiError(
        409,
        "invalid_stored_definition",
        "the segment's stored definition is no longer valid; save it again",
        errors=[field_error(e.path, e.rule, e.message) for e in exc.errors],
    )


def _parse(definition: Any) -> Rule:
    if definition is None:
        raise ApiError(
            400,
            "invalid_definition",
            "a definition is required",
            errors=[field_error("definition", "required", "a rule tree is required")],
        )
    try:
        return parse_rule(definition)
    except InvalidRule as exc:
        raise _invalid(exc) from None


def _view(row: dict[str, Any], members: int | None = None) -> dict[str, Any]:
    out = {
        "id": row["segment_id"],
        "name": row["name"],
        "description": row["description"],
        "definition": row["definition"],
        "version": row["version"],
        "status": row["status"],
        "backfill": {
            "processed": row["backfill_done"],
            "total": row["backfill_total"],
            "progress": 1.0
            if row["status"] == "ready"
            else (round(row["backfill_done"] / row["backfill_total"], 4) if row["backfill_total"] else 0.0),
            "started_at": row["backfill_started_at"],
            "finished_at": row["backfill_finished_at"],
            # Chunks of this pass that failed, or stalled (a passing cause or an outage), in a row, the
            # last one's error and time (`failed`: it gave up).
            "failures": row["backfill_failures"],
            "stalls": row["backfill_stalls"],
            "error": row["backfill_error"],
            "failed_at": row["backfill_failed_at"],
        },
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }
    if members is not None:
        out["member_count"] = members
    return out


def segments_router(seg: Segmenter) -> APIRouter:
    router = APIRouter(
        prefix="/v1/segments", tags=["segments"], dependencies=[Depends(admin_guard(seg.settings))]
    )
    platform = seg.platform

    async def check_references(session: Any, segment_id: str, rule: Rule) -> None:
        """member_of must name existing segments, and no segment may (indirectly) contain itself; each
        offending member_of node is named by its path, as `check_rule` names the others."""
        nodes = member_of_nodes(rule)
        rows = await segment_store.segment_versions(session)
        existing = {sid: (version, name, definition) for sid, version, name, definition in rows}
        missing = [(path, sid) for path, sid in nodes if sid not in existing and sid != segment_id]
        if missing:
            raise ApiError(
                400,
                "invalid_definition",
                "member_of refers to unknown segments",
                errors=[field_error(path, "unknown_segment", f"no segment {sid!r}") for path, sid in missing],
            )
        compiled = []
        # What each other segment refers to, also those whose stored definition no longer validates
        # (left out of the catalogue, still to be saved again).
        refers: dict[str, set[str]] = {}
        for sid, (version, name, definition) in existing.items():
            if sid == segment_id:
                continue
            try:
                compiled.append(compile_segment(sid, name, version, definition))
            except InvalidRule:
                refers[sid] = stored_member_of(definition)
                continue
            refers[sid] = set(compiled[-1].refs.segments)
        cycles = [(path, cycle_through(segment_id, sid, refers)) for path, sid in nodes]
        if any(trail for _, trail in cycles):
            raise ApiError(
                400,
                "invalid_definition",
                "segments would refer to each other in a cycle",
                errors=[field_error(path, "cycle", " -> ".join(trail)) for path, trail in cycles if trail],
            )
        compiled.append(compile_segment(segment_id, "new", 0, rule_json(rule)))
        try:
            dependency_order(compiled)
        except CycleError as exc:  # among stored segments alone (none through this one): not its node's
            raise ApiError(
                400,
                "invalid_definition",
                "segments would refer to each other in a cycle",
                errors=[field_error("definition", "cycle", str(exc))],
            ) from None

    @router.post("", status_code=201)
    async def create_segment(body: SegmentIn) -> dict[str, Any]:
        rule = _parse(body.definition)
        segment_id = f"seg_{uuid.uuid4().hex[:16]}"
        async with platform.unit_of_work() as uow:
            await check_references(uow.session, segment_id, rule)
            await segment_store.insert_segment(
                uow.session, segment_id, body.name, body.description, rule_json(rule), seg.clock.now()
            )
            row = await segment_store.get_segment(uow.session, segment_id)
        seg.backfill.wake.set()
        assert row is not None
        return _view(row)

    @router.get("")
    async def list_segments() -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            rows = await segment_store.list_segments(uow.session)
            parked = await timer_store.parked_counts(uow.session, [r["segment_id"] for r in rows])
        return {"segments": [_view(r) | {"parked_timer_count": parked.get(r["segment_id"], 0)} for r in rows]}

    @router.post("/preview")
    async def preview(body: PreviewIn) -> dict[str, Any]:
        rule = _parse(body.definition)
        async with platform.unit_of_work() as uow:
            await check_references(uow.session, "__preview__", rule)
            count, sample = await segment_store.preview(uow.session, rule, seg.clock.now(), body.sample)
        return {"count": count, "sample": sample}

    @router.get("/{segment_id}")
    async def get_segment(segment_id: str) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            # Not locked: a read never waits for a back-fill chunk in flight.
            row = await segment_store.get_segment(uow.session, segment_id)
            if row is None:
                raise ApiError(404, "not_found", f"no segment {segment_id!r}")
            members = await segment_store.member_count(uow.session, segment_id)
            parked = await timer_store.parked_counts(uow.session, [segment_id])
        # Due timers of the segment whose re-evaluation kept failing (see /parked-timers).
        return _view(row, members) | {"parked_timer_count": parked.get(segment_id, 0)}

    @router.put("/{segment_id}")
    async def update_segment(segment_id: str, body: SegmentIn) -> dict[str, Any]:
        rule = _parse(body.definition)
        async with platform.unit_of_work() as uow:
            # Waits for a back-fill chunk in flight (its rule changes under it otherwise), not for
            # real time: the back-fill that follows re-evaluates everyone.
            if await segment_store.get_segment(uow.session, segment_id, lock="FOR NO KEY UPDATE") is None:
                raise ApiError(404, "not_found", f"no segment {segment_id!r}")
            await check_references(uow.session, segment_id, rule)
            await segment_store.update_segment(
                uow.session, segment_id, body.name, body.description, rule_json(rule), seg.clock.now()
            )
            row = await segment_store.get_segment(uow.session, segment_id)
        seg.backfill.wake.set()
        assert row is not None
        return _view(row)

    @router.delete("/{segment_id}", status_code=204)
    async def delete_segment(segment_id: str) -> Response:
        try:
            async with platform.unit_of_work() as uow:
                # Hidden first, in a short transaction: locked FOR UPDATE, so the back-fill chunk and
                # the event batches writing its memberships have committed (their memberships are
                # removed below), and later ones skip it. Bounded: a segment every batch writes may be
                # share-locked back to back for a while.
                await set_lock_timeout(uow.session, DELETE_LOCK_TIMEOUT_MS)
                row = await segment_store.get_segment(uow.session, segment_id, lock="FOR UPDATE")
                if row is None:
                    raise ApiError(404, "not_found", f"no segment {segment_id!r}")
                rows = await segment_store.segment_versions(uow.session)
                # Read from the stored JSON: a definition that no longer validates depends on it too.
                users = [
                    sid
                    for sid, _, _, definition in rows
                    if sid != segment_id and segment_id in stored_member_of(definition)
                ]
                if users:
                    raise ApiError(
                        409, "segment_in_use", f"segments {', '.join(sorted(users))} refer to this segment"
                    )
                await segment_store.hide_segment(uow.session, segment_id, row["name"], seg.clock.now())
        except DBAPIError as exc:
            if not is_lock_timeout(exc):
                raise
            raise ApiError(
                503,
                "segment_busy",
                "the segment is being written; try the deletion again",
                headers={"Retry-After": "1"},
            ) from exc
        # Then its memberships, timers and members' exits, without holding up real time (a crash
        # in between leaves it to the back-fill worker, which finishes hidden segments' deletions).
        await seg.backfill.finish_deletion(segment_id)
        return Response(status_code=204)

    @router.post("/{segment_id}/backfill/retry")
    async def retry_backfill(segment_id: str) -> dict[str, Any]:
        """A `failed` back-fill (or one backed off) goes on from where it stopped, its failures and
        stalls cleared, once the cause is gone: saving the segment again would restart it from the
        first customer. One failed for its stored definition (valid again: a later release) starts
        a new pass instead: real time and its due timers skipped it meanwhile."""
        async with platform.unit_of_work() as uow:
            # Waits for a chunk of it in flight, as an edit does.
            row = await segment_store.get_segment(uow.session, segment_id, lock="FOR NO KEY UPDATE")
            if row is None:
                raise ApiError(404, "not_found", f"no segment {segment_id!r}")
            try:
                parse_rule(row["definition"])
            except InvalidRule as exc:
                raise _stored_invalid(exc) from None
            if row["status"] == "ready":
                raise ApiError(
                    409, "backfill_not_failed", "the segment's back-fill is done: nothing to retry"
                )
            if segment_store.failed_for_its_definition(row):
                await segment_store.restart_backfill(uow.session, [segment_id], seg.clock.now())
            else:
                await segment_store.retry_backfill(uow.session, segment_id)
            row = await segment_store.get_segment(uow.session, segment_id)
        seg.backfill.wake.set()
        assert row is not None
        return _view(row)

    @router.get("/{segment_id}/members")
    async def members(
        segment_id: str, after: str | None = None, limit: int = Query(default=100, ge=1, le=1000)
    ) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            if await segment_store.get_segment(uow.session, segment_id) is None:
                raise ApiError(404, "not_found", f"no segment {segment_id!r}")
            ids = await segment_store.members_page(uow.session, segment_id, after, limit)
        return {"members": ids, "next_after": ids[-1] if len(ids) == limit else None}

    @router.get("/{segment_id}/parked-timers")
    async def parked_timers(
        segment_id: str, after: str | None = None, limit: int = Query(default=100, ge=1, le=1000)
    ) -> dict[str, Any]:
        """Due timers of the segment whose re-evaluation failed `segment_timer_max_attempts` times, or
        whose pass alone stalled `segment_timer_max_stalls` times, in a row (keyset paging by customer
        id): those customers' time-based membership of the segment is not re-evaluated until an event
        of theirs the segment names, a back-fill of it (a save) or a requeue. `rescheduled_due_at`: a
        timer written for the customer since (an event re-evaluated them), if any: the parked row goes
        when that timer is re-evaluated."""
        async with platform.unit_of_work() as uow:
            if await segment_store.get_segment(uow.session, segment_id) is None:
                raise ApiError(404, "not_found", f"no segment {segment_id!r}")
            rows = await timer_store.parked_timers(uow.session, segment_id, after, limit)
        return {
            "parked_timers": rows,
            "next_after": rows[-1]["customer_id"] if len(rows) == limit else None,
        }

    @router.post("/{segment_id}/parked-timers/requeue")
    async def requeue_parked_timers(segment_id: str) -> dict[str, Any]:
        """Put the segment's parked timers back among the due ones, with no try counted, once the cause
        is gone: due at once, re-evaluated at the loop's next pass (a pair with a timer again keeps
        it). REQUEUE_CHUNK per transaction, each waiting REQUEUE_LOCK_TIMEOUT_MS at most for a row a
        concurrent writer holds: then 503 `segment_busy` (Retry-After), the chunks before it requeued,
        and a retry goes on with the rest."""
        requeued, after = 0, ""
        try:
            while True:
                async with platform.unit_of_work() as uow:
                    await set_lock_timeout(uow.session, REQUEUE_LOCK_TIMEOUT_MS)
                    if not after and await segment_store.get_segment(uow.session, segment_id) is None:
                        raise ApiError(404, "not_found", f"no segment {segment_id!r}")
                    n, last = await timer_store.requeue_parked_chunk(
                        uow.session, segment_id, after, REQUEUE_CHUNK
                    )
                requeued += n
                if last is None or n < REQUEUE_CHUNK:
                    return {"requeued": requeued}
                after = last
        except DBAPIError as exc:
            if sqlstate(exc) not in BUSY_SQLSTATES:
                raise
            raise ApiError(
                503,
                "segment_busy",
                f"the segment's parked timers are being written ({requeued} requeued before); try the "
                "requeue again",
                headers={"Retry-After": "1"},
            ) from exc

    @router.get("/{segment_id}/explain/{customer_ref}")
    async def explain_membership(segment_id: str, customer_ref: str) -> dict[str, Any]:
        now = seg.clock.now()
        async with platform.unit_of_work() as uow:
            row = await segment_store.get_segment(uow.session, segment_id)
            if row is None:
                raise ApiError(404, "not_found", f"no segment {segment_id!r}")
            cid = await profile_store.resolve_customer(uow.session, customer_ref)
            profile = await profile_store.read_profile(uow.session, cid) if cid else None
            if cid is None or profile is None:
                raise ApiError(404, "not_found", f"no customer {customer_ref!r}")
            try:
                rule_def = compile_segment(segment_id, row["name"], row["version"], row["definition"])
            except InvalidRule as exc:
                raise _stored_invalid(exc) from None
            await fill_snapshots(uow.session, Catalog.build([rule_def]), {cid: profile}, now)
            member = segment_id in profile.memberships
        return {
            "customer_id": cid,
            "segment_id": segment_id,
            "member": member,
            "matches_now": evaluate(rule_def.rule, profile, now),
            "evaluated_at": now,
            "explanation": explain(rule_def.rule, profile, now).as_json(),
        }

    return router

"""The marketer API: journey definitions, their lifecycle, per-node stats and dry runs (admin token)."""

from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from services.journey_engine.domain.definition import (
    UNICODE_MESSAGE,
    UNICODE_RULE,
    Graph,
    JourneyDefinition,
    ScheduleEntry,
    SegmentEntry,
    SplitNode,
    definition_warnings,
    graph_errors,
    surrogate_path,
)
from services.journey_engine.domain.entry import EventTrigger, triggers
from services.journey_engine.domain.stats import two_proportion_z_test
from services.journey_engine.domain.template_references import referenced_templates, template_warnings
from services.journey_engine.domain.timing import (
    RunInProgress,
    Schedule,
    SchedulePassed,
    run_after_edit,
    run_on_activation,
    run_on_resume,
)
from services.journey_engine.domain.walker import (
    CustomerView,
    MessageWithheld,
    RequestMessage,
    dry_run,
    facts_for,
)
from services.journey_engine.execution.engine import JourneyEngine, customer_view
from services.journey_engine.store import instances as instance_store
from services.journey_engine.store import journeys as journey_store
from services.journey_engine.store import projection
from services.journey_engine.store import templates as template_store
from services.journey_engine.store.journeys import JourneyRow
from shared.db.errors import is_lock_timeout, set_lock_timeout
from shared.http import ApiError, admin_guard, field_error
from shared.runtime import Platform

log = logging.getLogger(__name__)
SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# How long a pause or archive waits for the entry gate, and then for the journey's row, before
# answering 503 (`journey_busy`): while it waits, every consumer batch that may enter customers
# waits behind it.
STATUS_LOCK_TIMEOUT_MS = 1000
TRANSITIONS: dict[str, dict[str, set[str]]] = {
    "activate": {"from": {"draft", "paused"}, "to": {"active"}},
    "pause": {"from": {"active"}, "to": {"paused"}},
    "archive": {"from": {"draft", "active", "paused"}, "to": {"archived"}},
}


class JourneyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(default=None, pattern=SLUG.pattern)
    definition: JourneyDefinition


class JourneyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    definition: JourneyDefinition
    # Move customers already inside to the new version (those at a node that still exists there).
    migrate: bool = False


class InlineProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    traits: dict[str, Any] = Field(default_factory=dict)
    timezone: str | None = None
    locale: str | None = None
    email: str | None = None
    phone: str | None = None
    stage: str | None = None
    segments: list[str] = Field(default_factory=list)


class DryRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    definition: JourneyDefinition
    # The id the journey is (or will be) saved under: A/B arms are a stable hash of it.
    journey_id: str = "dry-run"
    customer_id: str | None = None
    profile: InlineProfile | None = None
    # The triggering event ({"event": ..., "properties": {...}}), for entry filters and conditions.
    event: dict[str, Any] | None = None


def journey_busy(message: str) -> ApiError:
    """503 `journey_busy`: a lock the request needs stayed held past its wait; try again in a second."""
    return ApiError(503, "journey_busy", message, headers={"Retry-After": "1"})


def refuse_unpaired_surrogates(value: Any, prefix: str) -> None:
    """A plain text field (a trait name, a correlation key, a dry run's customer id) holding half a
    surrogate pair passed the schema, then failed where it was written (orjson, asyncpg): a 500."""
    where = surrogate_path(value)
    if where is not None:
        field = ".".join(part for part in (prefix, where) if part) or "body"
        raise ApiError(
            400,
            "invalid_request",
            "the request is invalid",
            errors=[field_error(field, UNICODE_RULE, UNICODE_MESSAGE)],
        )


def check_graph(definition: JourneyDefinition) -> Graph:
    refuse_unpaired_surrogates(definition.model_dump(by_alias=True), "definition")
    errors = graph_errors(definition)
    if errors:
        raise ApiError(
            400,
            "invalid_journey",
            f"the journey graph breaks {len(errors)} rule(s)",
            errors=[field_error(f"definition.{e.field}", e.rule, e.message) for e in errors],
        )
    return Graph(definition)


async def warnings(session: AsyncSession, definition: JourneyDefinition) -> list[dict[str, str]]:
    """What was saved but is probably not what was meant, in the errors' shape: also the templates
    its steps name that the notifier does not have (or has for another channel)."""
    channels = await template_store.channels_of(session, referenced_templates(definition))
    found = [*definition_warnings(definition), *template_warnings(definition, channels)]
    return [field_error(f"definition.{w.field}", w.rule, w.message) for w in found]


def journey_body(
    row: JourneyRow, entered: int, definition: dict[str, Any] | None, versions: list[int] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "status": row.status,
        "version": row.current_version,
        "entered": entered,
        "next_run_at": row.next_run_at.isoformat() if row.next_run_at else None,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
    }
    if definition is not None:
        body["definition"] = definition
    if versions is not None:
        body["versions"] = versions
    return body


def first_run(definition: JourneyDefinition, now: datetime) -> datetime | None:
    """A draft's first broadcast run once activated (a one-off whose time has passed: `SchedulePassed`)."""
    entry = definition.entry
    if isinstance(entry, ScheduleEntry):
        return run_on_activation(entry.at, entry.every, now=now)
    if isinstance(entry, SegmentEntry) and entry.enrol_current:
        return now
    return None


def schedule_passed(message: str) -> ApiError:
    return ApiError(
        409,
        "schedule_passed",
        message,
        errors=[field_error("definition.entry.at", "schedule_passed", message)],
    )


def build_router(platform: Platform, engine: JourneyEngine) -> APIRouter:
    router = APIRouter(
        prefix="/v1/journeys", tags=["journeys"], dependencies=[Depends(admin_guard(platform.settings))]
    )
    clock = engine.clock

    async def load(session: Any, journey_id: str, *, for_update: bool = False) -> JourneyRow:
        row = await journey_store.get(session, journey_id, for_update=for_update)
        if row is None:
            raise ApiError(404, "not_found", f"no journey '{journey_id}'")
        return row

    @router.post("", status_code=201)
    async def create_journey(body: JourneyCreate) -> dict[str, Any]:
        check_graph(body.definition)
        journey_id = body.id or uuid.uuid4().hex[:12]
        stored = body.definition.model_dump(mode="json", by_alias=True)
        async with platform.unit_of_work() as uow:
            if await journey_store.get(uow.session, journey_id) is not None:
                raise ApiError(
                    409,
                    "conflict",
                    f"journey '{journey_id}' exists",
                    errors=[field_error("id", "unique", "choose another id")],
                )
            await journey_store.create(
                uow.session, journey_id, body.definition.name, stored, body.definition.entry_cap, clock.now()
            )
            row = await load(uow.session, journey_id)
            found = await warnings(uow.session, body.definition)
        return journey_body(row, 0, stored, [1]) | {"warnings": found}

    @router.get("")
    async def list_journeys() -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            rows = await journey_store.list_all(uow.session)
            entered = await journey_store.entered(uow.session, rows)
        return {"journeys": [journey_body(r, entered[r.id], None) for r in rows]}

    @router.get("/{journey_id}")
    async def get_journey(journey_id: str) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            row = await load(uow.session, journey_id)
            definition = await journey_store.definition(uow.session, journey_id, row.current_version)
            versions = await journey_store.versions(uow.session, journey_id)
            graph = await engine.graph(uow.session, journey_id, row.current_version)
            found = await warnings(uow.session, graph.definition) if graph is not None else []
            entered = (await journey_store.entered(uow.session, [row]))[row.id]
        return journey_body(row, entered, definition, versions) | {"warnings": found}

    @router.get("/{journey_id}/versions/{version}")
    async def get_version(
        journey_id: str, version: Annotated[int, Path(ge=1, le=2**31 - 1)]
    ) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            await load(uow.session, journey_id)
            definition = await journey_store.definition(uow.session, journey_id, version)
        if definition is None:
            raise ApiError(404, "not_found", f"journey '{journey_id}' has no version {version}")
        return {"id": journey_id, "version": version, "definition": definition}

    @router.put("/{journey_id}")
    async def update_journey(journey_id: str, body: JourneyUpdate) -> dict[str, Any]:
        try:
            return await save_edit(journey_id, body)
        except DBAPIError as exc:
            if not is_lock_timeout(exc):
                raise
            raise journey_busy(
                f"entries in flight held the new entry cap up for {STATUS_LOCK_TIMEOUT_MS} ms; nothing "
                "was saved, try again"
            ) from exc

    async def save_edit(journey_id: str, body: JourneyUpdate) -> dict[str, Any]:
        graph = check_graph(body.definition)
        stored = body.definition.model_dump(mode="json", by_alias=True)
        now = clock.now()
        capping = body.definition.entry_cap is not None
        async with platform.unit_of_work() as uow:
            seen = await load(uow.session, journey_id) if capping else None
            if seen is not None and seen.entry_cap is None and seen.status == "active":
                # A cap set on a live journey counts the entries made without one (`count_past_entries`):
                # the batches entering customers now commit first, as for a pause, and the next read
                # the cap (their entries counted on the row from then on).
                await set_lock_timeout(uow.session, STATUS_LOCK_TIMEOUT_MS)
                await journey_store.hold_entries(uow.session)
            row = await load(uow.session, journey_id, for_update=True)
            if row.status == "archived":
                raise ApiError(409, "archived", "an archived journey cannot be edited")
            version = row.current_version + 1
            await journey_store.add_version(uow.session, journey_id, version, stored, now)
            entry = body.definition.entry
            # A live schedule (paused too: it resumes at what its definition says) moves with its
            # definition; a draft's first run is set when it is activated.
            next_run, rescheduled, stopped = row.next_run_at, False, False
            if (
                not isinstance(entry, ScheduleEntry)
                and row.status in ("active", "paused")
                and row.next_run_at is not None
            ):
                # No longer a broadcast: its pending run (or the rest of a run in progress) is not
                # sent to the segment. Only an enrolment of current members pending (or under way)
                # when activated goes on, while the new version still asks for it.
                edited = await engine.graph(uow.session, journey_id, row.current_version)
                before = edited.definition.entry if edited is not None else None
                stopped = not (
                    isinstance(before, SegmentEntry)
                    and before.enrol_current
                    and isinstance(entry, SegmentEntry)
                    and entry.enrol_current
                )
            if isinstance(entry, ScheduleEntry) and row.status in ("active", "paused"):
                rescheduled = True
                state = await journey_store.run_state(uow.session, journey_id)
                edited = await engine.graph(uow.session, journey_id, row.current_version)
                before = edited.definition.entry if edited is not None else None
                try:
                    next_run = run_after_edit(
                        entry.at,
                        entry.every,
                        previous=Schedule(before.at, before.every)
                        if isinstance(before, ScheduleEntry)
                        else None,
                        pending=row.next_run_at,
                        started=state is not None and state.started,
                        now=now,
                    )
                except SchedulePassed as passed:
                    raise schedule_passed(
                        f"the broadcast has not gone out yet: it can go at a time ahead of now, not at "
                        f"{passed.due.isoformat()}, which has passed; nothing was saved"
                    ) from None
                except RunInProgress as running:
                    since = running.run_at.isoformat() if running.run_at else "a moment ago"
                    raise schedule_passed(
                        f"the broadcast is being sent (its run of {since} has members left): moved to "
                        f"{entry.at.isoformat()}, it would go out again then to those it reached "
                        "already; nothing was saved. To send it again, save that time once this run is "
                        "over (next_run_at null)"
                    ) from None
            await journey_store.update(
                uow.session,
                journey_id,
                now=now,
                name=body.definition.name,
                current_version=version,
                entry_cap=body.definition.entry_cap,
                set_entry_cap=True,
                next_run_at=next_run,
                set_next_run=rescheduled,
            )
            if capping and row.entry_cap is None:
                await journey_store.count_past_entries(uow.session, journey_id)
            if stopped:
                await journey_store.finish_run(uow.session, journey_id, None, now)
            migrated = 0
            if body.migrate and row.status in ("active", "paused"):
                waiting = await instance_store.lock_waiting(uow.session, journey_id, version)
                await refuse_type_changes(uow.session, journey_id, waiting, graph)
                checked = [(v, node_id) for v, node_id, _ in waiting if node_id in graph.nodes]
                migrated = await instance_store.migrate_version(uow.session, journey_id, version, checked)
            row = await load(uow.session, journey_id)
            found = await warnings(uow.session, body.definition)
            entered = (await journey_store.entered(uow.session, [row]))[row.id]
        return journey_body(row, entered, stored) | {"migrated": migrated, "warnings": found}

    async def refuse_type_changes(
        session: Any, journey_id: str, waiting: list[tuple[int, str, int]], graph: Graph
    ) -> None:
        """A migrated instance stays at its node id: if the new version made that id another kind of
        node (a delay now a condition), its timer or wait means nothing there and it would be stuck, or
        take a wrong branch. Refuse (409, the whole edit) naming each such node."""
        errors = []
        for old_version, node_id, n in waiting:
            new_node = graph.nodes.get(node_id)
            old_graph = await engine.graph(session, journey_id, old_version)
            old_node = old_graph.nodes.get(node_id) if old_graph is not None else None
            if new_node is None or old_node is None or new_node.type == old_node.type:
                continue
            errors.append(
                field_error(
                    f"definition.nodes.{node_id}",
                    "migrate_same_type",
                    f"{n} customer(s) wait at '{node_id}', a {old_node.type} node in version "
                    f"{old_version}; in the new version it is a {new_node.type} node. Keep its type, "
                    "give the new node another id, or save without migrate",
                )
            )
        if errors:
            raise ApiError(
                409,
                "migration_conflict",
                "customers wait at nodes whose type the new version changes; nothing was saved",
                errors=errors,
            )

    def check_transition(row: JourneyRow, action: str) -> None:
        rule = TRANSITIONS[action]
        if row.status not in rule["from"]:
            raise ApiError(
                409,
                "invalid_transition",
                f"cannot {action} a journey that is {row.status}",
                errors=[field_error("status", "transition", f"{action} needs one of {sorted(rule['from'])}")],
            )

    async def transition(journey_id: str, action: Literal["activate", "pause", "archive"]) -> dict[str, Any]:
        try:
            return await change_status(journey_id, action)
        except DBAPIError as exc:
            if not is_lock_timeout(exc):
                raise
            raise journey_busy(
                f"entries in flight (or an edit or broadcast of this journey) held the {action} up for "
                f"{STATUS_LOCK_TIMEOUT_MS} ms; nothing changed, try again"
            ) from exc

    async def change_status(
        journey_id: str, action: Literal["activate", "pause", "archive"]
    ) -> dict[str, Any]:
        now = clock.now()
        rule = TRANSITIONS[action]
        async with platform.unit_of_work() as uow:
            # Refused (404, 409) before any lock: the gate below holds up every entry while it waits.
            check_transition(await load(uow.session, journey_id), action)
            if action != "activate":
                # Entries in flight commit first (archive exits them with the rest); none after. Not
                # for long: every consumer batch that may enter customers waits behind this request
                # while it waits (for the gate, then for the journey's row).
                await set_lock_timeout(uow.session, STATUS_LOCK_TIMEOUT_MS)
                await journey_store.hold_entries(uow.session)
            row = await load(uow.session, journey_id, for_update=True)
            check_transition(row, action)  # changed meanwhile
            status = next(iter(rule["to"]))
            graph = await engine.graph(uow.session, journey_id, row.current_version)
            entry = graph.definition.entry if graph is not None else None
            if action == "activate" and row.status == "draft":
                try:
                    run = first_run(graph.definition, now) if graph is not None else None
                except SchedulePassed as passed:
                    raise schedule_passed(
                        f"the broadcast is a one-off due at {passed.due.isoformat()}, which has passed, "
                        "and has not gone out: to send it, save an `at` ahead of now and activate it "
                        "again; nothing changed"
                    ) from None
                await journey_store.update(
                    uow.session, journey_id, now=now, status=status, next_run_at=run, set_next_run=True
                )
            elif action == "activate" and isinstance(entry, ScheduleEntry):
                # Resumed: the schedule's next run is what its definition says now.
                state = await journey_store.run_state(uow.session, journey_id)
                try:
                    run = run_on_resume(
                        entry.at,
                        entry.every,
                        pending=row.next_run_at,
                        started=state is not None and state.started,
                        now=now,
                    )
                except SchedulePassed as passed:
                    raise schedule_passed(
                        f"the broadcast was due at {passed.due.isoformat()}, which has passed, and has not "
                        "gone out: to send it, save an `at` ahead of now and activate it again; to drop "
                        "it, archive the journey"
                    ) from None
                await journey_store.update(
                    uow.session, journey_id, now=now, status=status, next_run_at=run, set_next_run=True
                )
            else:
                await journey_store.update(uow.session, journey_id, now=now, status=status)
            row = await load(uow.session, journey_id)
            # Going live is when a step naming a template the notifier lacks starts failing messages.
            found = await warnings(uow.session, graph.definition) if graph is not None else []
            entered = (await journey_store.entered(uow.session, [row]))[row.id]
        if action == "archive":
            # The customers inside exit now, the gate released: entries never waited for that.
            try:
                await engine.finish_archive(journey_id)
            except Exception:
                log.exception("exiting an archived journey's customers failed; the sweeper finishes it")
        return journey_body(row, entered, None) | {"warnings": found}

    @router.post("/{journey_id}/activate")
    async def activate(journey_id: str) -> dict[str, Any]:
        return await transition(journey_id, "activate")

    @router.post("/{journey_id}/pause")
    async def pause(journey_id: str) -> dict[str, Any]:
        return await transition(journey_id, "pause")

    @router.post("/{journey_id}/archive")
    async def archive(journey_id: str) -> dict[str, Any]:
        return await transition(journey_id, "archive")

    @router.get("/{journey_id}/stats")
    async def stats(journey_id: str) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            await load(uow.session, journey_id)
            totals = await instance_store.node_totals(uow.session, journey_id)
            arms = await instance_store.arm_outcomes(uow.session, journey_id)
            parked = await instance_store.parked_timers(uow.session, journey_id)
            graphs = {
                v: await engine.graph(uow.session, journey_id, v)
                for v in await journey_store.versions(uow.session, journey_id)
            }
        versions = []
        for v, graph in sorted(graphs.items()):
            node_ids = list(graph.nodes) if graph else sorted({n for (ver, n) in totals if ver == v})
            nodes = []
            for node_id in node_ids:
                t = totals.get((v, node_id), {})
                node_type = graph.nodes[node_id].type if graph else None
                nodes.append(
                    {"node_id": node_id, "type": node_type}
                    | {m: t.get(m, 0) for m in ("entered", "waiting", "passed", "exited", "converted")}
                )
            versions.append({"version": v, "nodes": nodes})
        return {
            "journey_id": journey_id,
            "versions": versions,
            "splits": split_report(graphs, arms),
            # Customers held at a step whose timer kept failing (docs: a timer that keeps failing).
            "timers_parked": parked,
        }

    @router.get("/{journey_id}/instances")
    async def list_instances(
        journey_id: str, limit: int = Query(default=100, ge=1, le=1000)
    ) -> dict[str, Any]:
        """The most recent instances: where each customer is, what they wait for, why they left."""
        async with platform.unit_of_work() as uow:
            await load(uow.session, journey_id)
            rows = await instance_store.list_for_journey(uow.session, journey_id, limit)
            parked = await instance_store.with_parked_timers(uow.session, [r.id for r in rows])
        return {
            "instances": [
                {
                    "id": r.id,
                    "customer_id": r.customer_id,
                    "version": r.version,
                    "status": r.status,
                    "node_id": r.node_id,
                    "waiting_for": r.wait,
                    "correlation": r.correlation or None,
                    "entered_at": r.entered_at.isoformat(),
                    "exit_reason": r.exit_reason,
                    "converted_at": r.converted_at.isoformat() if r.converted_at else None,
                    "arms": r.context.get("arms", {}),
                    "timer_parked": r.id in parked,
                }
                for r in rows
            ]
        }

    @router.post("/dry-run")
    async def dry_run_journey(body: DryRunRequest) -> dict[str, Any]:
        graph = check_graph(body.definition)
        refuse_unpaired_surrogates(body.model_dump(exclude={"definition"}), "")
        now = clock.now()
        if body.profile is not None:
            p = body.profile
            customer = CustomerView(
                customer_id=body.customer_id or "dry-run",
                traits=p.traits,
                timezone=p.timezone,
                locale=p.locale,
                email=p.email,
                phone=p.phone,
                stage=p.stage,
                segments=frozenset(p.segments),
            )
        elif body.customer_id is not None:
            async with platform.unit_of_work() as uow:
                records = await projection.load(uow.session, [body.customer_id], projection.sends_window(now))
            customer = customer_view(records[body.customer_id])
        else:
            raise ApiError(
                400,
                "invalid_request",
                "give a customer_id or a profile",
                errors=[field_error("customer_id", "required", "customer_id or profile is required")],
            )
        enters = None
        if body.event is not None and isinstance(body.event.get("event"), str):
            facts = facts_for(customer, body.event)
            enters = triggers(body.definition, EventTrigger(body.event["event"], body.event), facts)
        outcome = dry_run(graph, customer, engine.rules, now, trigger=body.event, journey_id=body.journey_id)
        async with platform.unit_of_work() as uow:
            found = await warnings(uow.session, body.definition)
        return {
            "warnings": found,
            "customer_id": customer.customer_id,
            "would_enter": enters,
            "path": [{"node_id": s.node_id, "why": s.note} for s in outcome.path],
            "ends_at": outcome.node_id,
            "status": outcome.status,
            "messages": [
                {
                    "node_id": e.node_id,
                    "channel": str(e.channel),
                    "template_id": e.template_id,
                    "decision": e.status if isinstance(e, MessageWithheld) else "requested",
                    "reason": e.reason if isinstance(e, MessageWithheld) else None,
                }
                for e in outcome.effects
                if isinstance(e, (RequestMessage, MessageWithheld))
            ],
        }

    return router


def split_report(
    graphs: dict[int, Graph | None], arms: list[tuple[int, str, str, int, int, int]]
) -> list[dict[str, Any]]:
    """Each split's arms per customer (`arm_outcomes`), each tested against the holdout arm."""
    out = []
    for version, graph in sorted(graphs.items()):
        if graph is None:
            continue
        for node in graph.definition.nodes:
            if not isinstance(node, SplitNode):
                continue
            outcomes = {arm: (n, c, e) for v, nid, arm, n, c, e in arms if v == version and nid == node.id}
            holdout = next((a.name for a in node.arms if a.holdout), None)
            h_n, h_c, _ = outcomes.get(holdout, (0, 0, 0)) if holdout else (0, 0, 0)
            rows = []
            for arm in node.arms:
                n, c, entries = outcomes.get(arm.name, (0, 0, 0))
                test = two_proportion_z_test(c, n, h_c, h_n) if holdout and arm.name != holdout else None
                rows.append(
                    {
                        "arm": arm.name,
                        "percent": arm.percent,
                        "holdout": arm.holdout,
                        "customers": n,
                        "converted": c,
                        "conversion_rate": c / n if n else None,
                        "entries": entries,
                        "vs_holdout": None
                        if test is None
                        else {
                            "z": test.z,
                            "p_value": test.p_value,
                            "significant_at_0_05": test.p_value < 0.05,
                        },
                    }
                )
            out.append({"version": version, "node_id": node.id, "arms": rows})
    return out

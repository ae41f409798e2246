"""Parked timers (admin token): a journey's timers whose step kept failing, listed, put back among the
due timers once the cause is fixed, or discarded (their customers exit)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncSession

from services.journey_engine.api.journeys import journey_busy
from services.journey_engine.domain.definition import NameText
from services.journey_engine.execution.engine import (
    PARKED_LOCK_TIMEOUT_MS,
    JourneyEngine,
    ParkedBusy,
    ParkedHandled,
    ParkedTotals,
)
from services.journey_engine.store import journeys as journey_store
from services.journey_engine.store import parked as parked_store
from services.journey_engine.store.parked import ParkedTimer
from shared.http import ApiError, admin_guard, field_error
from shared.runtime import Platform

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TimerId = Annotated[int, Path(ge=1, le=2**63 - 1, description="the parked timer's id (`id` in the listing)")]
# Bounded as a definition's node ids are (`MAX_NAME_BYTES`): a longer one names no node.
NodeId = Annotated[
    NameText | None, Query(description="only the timers of the journey's customers at this node")
]
# Microseconds since the epoch (negative before 1970), then the timer's id: `cursor_of`.
CURSOR = re.compile(r"(-?[0-9]{1,20})-([0-9]{1,19})")
SHOWN_CHARS = 100  # of a node id quoted back in an error


class BulkBody(BaseModel):
    """A bulk request's body: none is needed. Which timers it takes is in its query (`node_id`),
    where the audit log records it; a `node_id` in the body is refused, not ignored (the request
    would take every parked timer of the journey)."""

    model_config = ConfigDict(extra="forbid")
    node_id: Any = None


def cursor_of(timer: ParkedTimer) -> str:
    """A URL-safe keyset cursor: when the timer was parked (microseconds since the epoch) and its id."""
    return f"{(timer.parked_at - EPOCH) // timedelta(microseconds=1)}-{timer.id}"


def parse_cursor(after: str | None) -> tuple[datetime, int] | None:
    if after is None:
        return None
    try:
        # Times before 1970 are negative (`-123-7`).
        match = CURSOR.fullmatch(after)
        if match is None:
            raise ValueError(after)
        at, number = EPOCH + timedelta(microseconds=int(match[1])), int(match[2])
        if not 0 <= number < 2**63:
            raise ValueError(number)
        return at, number
    except (ValueError, OverflowError):
        raise ApiError(
            400,
            "invalid_request",
            "bad cursor",
            errors=[field_error("after", "cursor", "use the `next_after` of the previous page")],
        ) from None


def busy(what: str) -> ApiError:
    """503 `journey_busy`, as a pause or archive held up answers: try again in a second."""
    return journey_busy(
        f"{what} held for more than {PARKED_LOCK_TIMEOUT_MS} ms by a step, an event or an erasure of "
        "that customer; nothing changed, try again"
    )


def timer_view(t: ParkedTimer) -> dict[str, Any]:
    return {
        "id": t.id,
        "instance_id": t.instance_id,
        "customer_id": t.customer_id,
        "version": t.version,
        "node_id": t.node_id,
        "instance_status": t.instance_status,
        "holds_instance": t.holds_instance,
        "due_at": t.due_at.isoformat(),
        "parked_at": t.parked_at.isoformat(),
        "attempts": t.attempts,
        "error": t.error,
    }


def build_parked_router(platform: Platform, engine: JourneyEngine) -> APIRouter:
    router = APIRouter(
        prefix="/v1/journeys/{journey_id}/parked-timers",
        tags=["journeys"],
        dependencies=[Depends(admin_guard(platform.settings))],
    )

    async def check_journey(session: AsyncSession, journey_id: str) -> None:
        if await journey_store.get(session, journey_id) is None:
            raise ApiError(404, "not_found", f"no journey '{journey_id}'")

    async def check_node(session: AsyncSession, journey_id: str, node_id: str | None, field: str) -> None:
        """A node of some version of the journey: a typo would otherwise match nothing, silently."""
        if node_id is None:
            return
        for version in await journey_store.versions(session, journey_id):
            graph = await engine.graph(session, journey_id, version)
            if graph is not None and node_id in graph.nodes:
                return
            raw = await journey_store.definition(session, journey_id, version) if graph is None else None
            nodes = raw.get("nodes") if isinstance(raw, dict) else None
            if isinstance(nodes, list) and any(isinstance(n, dict) and n.get("id") == node_id for n in nodes):
                return  # a stored definition the engine cannot read: its node ids still count
        shown = node_id if len(node_id) <= SHOWN_CHARS else f"{node_id[:SHOWN_CHARS]}..."
        raise ApiError(
            400,
            "invalid_request",
            f"journey '{journey_id}' has no node '{shown}' in any version",
            errors=[field_error(field, "unknown_node", "must be the id of a node of the journey")],
        )

    async def not_parked(journey_id: str, timer_id: int, action: str) -> ApiError:
        """Why a timer could not be requeued or discarded: back among the due timers already (409),
        or no parked timer of this journey (404). Nothing was changed either way."""
        async with platform.unit_of_work() as uow:
            due = await parked_store.due_timers(uow.session, journey_id, [timer_id])
        if timer_id in due:
            message = (
                f"timer {timer_id} is not parked: it was put back, due at {due[timer_id].isoformat()} "
                f"(it fires on the next pass after that); nothing to {action}, nothing changed"
            )
            return ApiError(
                409,
                "already_requeued",
                message,
                errors=[field_error("timer_id", "parked", message)],
            )
        message = (
            f"journey '{journey_id}' has no parked timer {timer_id} (fired since it was put back, "
            "discarded, or another journey's); nothing changed"
        )
        return ApiError(404, "not_found", message, errors=[field_error("timer_id", "parked", message)])

    async def one(journey_id: str, timer_id: int, *, discard: bool) -> ParkedHandled:
        async with platform.unit_of_work() as uow:
            await check_journey(uow.session, journey_id)
        try:
            if discard:
                done = await engine.discard_parked(journey_id, [timer_id])
            else:
                done = await engine.requeue_parked(journey_id, [timer_id])
        except ParkedBusy:
            raise busy(f"the instance of timer {timer_id} was") from None
        if not done.timers:
            raise await not_parked(journey_id, timer_id, "discard" if discard else "requeue")
        return done

    @router.get("")
    async def list_parked(
        journey_id: str,
        limit: int = Query(default=100, ge=1, le=1000),
        after: str | None = None,
        node_id: NodeId = None,
    ) -> dict[str, Any]:
        """The journey's parked timers, oldest parked first; `holds_instance`: its customer waits on it."""
        cursor = parse_cursor(after)
        async with platform.unit_of_work() as uow:
            await check_journey(uow.session, journey_id)
            await check_node(uow.session, journey_id, node_id, "node_id")
            rows = await parked_store.page(uow.session, journey_id, limit, cursor, node_id)
        return {
            "journey_id": journey_id,
            "parked_timers": [timer_view(t) for t in rows],
            "next_after": cursor_of(rows[-1]) if len(rows) == limit else None,
        }

    @router.post("/{timer_id}/requeue")
    async def requeue_one(journey_id: str, timer_id: TimerId) -> dict[str, Any]:
        """Back among the due timers (same id), due now, no tries counted: the next pass fires it."""
        done = await one(journey_id, timer_id, discard=False)
        [timer] = done.timers
        return timer_view(timer) | {"due_at": done.at.isoformat(), "attempts": 0, "requeued": True}

    @router.post("/{timer_id}/discard")
    async def discard_one(journey_id: str, timer_id: TimerId) -> dict[str, Any]:
        """Deleted; the customer it held exits there (`timer_discarded`; `archived` if the journey is
        archived and its customers not exited yet), and may enter again."""
        done = await one(journey_id, timer_id, discard=True)
        [timer] = done.timers
        reason = done.exited.get(timer.instance_id)
        return timer_view(timer) | {
            "discarded": True,
            "instance_exited": reason is not None,
            "instance_status": "exited" if reason is not None else timer.instance_status,
            "exit_reason": reason,
        }

    async def bulk(
        journey_id: str, node_id: str | None, body: BulkBody | None, *, discard: bool
    ) -> ParkedTotals:
        if body is not None and "node_id" in body.model_fields_set:
            raise ApiError(
                400,
                "invalid_request",
                "`node_id` goes in the query (`?node_id=<node>`), where the audit log records it; "
                "nothing changed",
                errors=[field_error("node_id", "in_query", "give it as a query parameter, not in the body")],
            )
        async with platform.unit_of_work() as uow:
            await check_journey(uow.session, journey_id)
            await check_node(uow.session, journey_id, node_id, "node_id")
        try:
            return await engine.handle_all_parked(journey_id, discard=discard, node_id=node_id)
        except ParkedBusy:
            # It waits for no instance; another lock did not come (those done before stay done).
            raise busy("a lock of the journey's parked timers was") from None

    @router.post("/requeue")
    async def requeue_all(
        journey_id: str, node_id: NodeId = None, body: BulkBody | None = None
    ) -> dict[str, Any]:
        """Every parked timer of the journey (or of its customers at `node_id`) put back, due now;
        `skipped`: those whose customer's instance was held at that moment, left parked."""
        done = await bulk(journey_id, node_id, body, discard=False)
        return {
            "journey_id": journey_id,
            "requeued": done.handled,
            "skipped": done.skipped,
            "due_at": done.at.isoformat(),
        }

    @router.post("/discard")
    async def discard_all(
        journey_id: str, node_id: NodeId = None, body: BulkBody | None = None
    ) -> dict[str, Any]:
        """Every parked timer of the journey (or of its customers at `node_id`) discarded; the
        customers they held exit (`timer_discarded`); `skipped` as for requeue."""
        done = await bulk(journey_id, node_id, body, discard=True)
        return {
            "journey_id": journey_id,
            "discarded": done.handled,
            "exited": done.exited,
            "skipped": done.skipped,
        }

    return router

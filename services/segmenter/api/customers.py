"""The profile API (admin token): one customer's profile, segments and event timeline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Query

from services.segmenter.api.lifecycle import lifecycle_view
from services.segmenter.runtime import Segmenter
from services.segmenter.store import catalogue as catalogue_store
from services.segmenter.store import lifecycle as lifecycle_store
from services.segmenter.store import profiles as profile_store
from services.segmenter.store import segments as segment_store
from shared.http import ApiError, admin_guard, field_error

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _cursor_of(ts: datetime, seq: int) -> str:
    """A URL-safe keyset cursor: microseconds since the epoch and the row's sequence number."""
    return f"{(ts - EPOCH) // timedelta(microseconds=1)}-{seq}"


def _cursor(before: str | None) -> tuple[datetime, int] | None:
    if before is None:
        return None
    try:
        # The last "-": times before 1970 are negative (`-123-7`).
        micros, seq = before.rsplit("-", 1)
        at, number = EPOCH + timedelta(microseconds=int(micros)), int(seq)
        if not 0 <= number < 2**63:
            raise ValueError(seq)
        return at, number
    except (ValueError, OverflowError):
        raise ApiError(
            400,
            "invalid_request",
            "bad cursor",
            errors=[field_error("before", "cursor", "use the `next_before` of the previous page")],
        ) from None


def customers_router(seg: Segmenter) -> APIRouter:
    router = APIRouter(
        prefix="/v1/customers", tags=["customers"], dependencies=[Depends(admin_guard(seg.settings))]
    )
    platform = seg.platform

    async def resolve(session: Any, ref: str) -> str:
        cid = await profile_store.resolve_customer(session, ref)
        if cid is None:
            raise ApiError(404, "not_found", f"no customer known as {ref!r}")
        return cid

    @router.get("/{customer_ref}")
    async def get_customer(customer_ref: str) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            cid = await resolve(uow.session, customer_ref)
            profile = await profile_store.read_profile(uow.session, cid)
            if profile is None:
                raise ApiError(404, "not_found", f"no customer known as {customer_ref!r}")
            counts = (await profile_store.load_event_counts(uow.session, [cid], None)).get(cid, {})
            identities = (await profile_store.identities_of(uow.session, [cid])).get(cid, {})
            merges = await profile_store.merge_history(uow.session, cid)
            segments = await segment_store.segments_of(uow.session, cid)
            # Issue 9: the stored lists (as templates see them), refreshed on the customer's product events.
            recommendations = await catalogue_store.stored_recommendations(uow.session, cid)
            # Issue 7: stage history tail and message engagement.
            stage_history = await lifecycle_store.stage_history_of(uow.session, cid)
            engagement = await lifecycle_store.engagement_of(uow.session, cid)
        f = profile.fields
        return {
            "customer_id": cid,
            "traits": profile.traits,
            "trait_updated_at": profile.trait_times,
            "identities": identities,
            "aggregates": {
                "first_seen": f["first_seen"],
                "last_seen": f["last_seen"],
                "event_count": f["event_count"],
                "events": {
                    name: {"count": a.count, "first_at": a.first_at, "last_at": a.last_at}
                    for name, a in sorted(counts.items())
                },
            },
            "commerce": {
                "orders_count": f["orders_count"],
                "revenue": f["revenue"],
                "first_order_at": f["first_order_at"],
                "last_order_at": f["last_order_at"],
            },
            "merges": merges,
            "segments": segments,
            "recommendations": recommendations.as_template_variables() if recommendations else None,
            "lifecycle": lifecycle_view(f, stage_history, engagement),
            "engagement": engagement,
        }

    @router.get("/{customer_ref}/segments")
    async def customer_segments(customer_ref: str) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            cid = await resolve(uow.session, customer_ref)
            return {"customer_id": cid, "segments": await segment_store.segments_of(uow.session, cid)}

    @router.get("/{customer_ref}/events")
    async def customer_events(
        customer_ref: str, limit: int = Query(default=50, ge=1, le=500), before: str | None = None
    ) -> dict[str, Any]:
        cursor = _cursor(before)
        async with platform.unit_of_work() as uow:
            cid = await resolve(uow.session, customer_ref)
            rows = await profile_store.timeline_page(uow.session, cid, limit, cursor)
        events = [
            {
                "message_id": r["message_id"],
                "type": r["type"],
                "event": r["event"],
                "properties": r["properties"],
                "traits": r["traits"],
                "timestamp": r["timestamp"],
                "received_at": r["received_at"],
            }
            for r in rows
        ]
        nxt = _cursor_of(rows[-1]["timestamp"], rows[-1]["seq"]) if len(rows) == limit else None
        return {"customer_id": cid, "events": events, "next_before": nxt}

    return router

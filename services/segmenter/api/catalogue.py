"""The catalogue and recommendation API (admin token, issue 9): bulk upsert and read of catalogue
items, a customer's recommendations, and the on-demand full recompute."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from services.segmenter.domain.recommendations.catalogue import CatalogueItem, CatalogueUpsertRequest
from services.segmenter.domain.recommendations.recommend import Recommendation
from services.segmenter.runtime import Segmenter
from services.segmenter.store import catalogue as catalogue_store
from services.segmenter.store import profiles as profile_store
from shared.http import ApiError, admin_guard


def _item_json(item: CatalogueItem) -> dict[str, Any]:
    return item.model_dump(mode="json", exclude_none=True)


def _recommendation_json(r: Recommendation) -> dict[str, Any]:
    out: dict[str, Any] = {
        "product_id": r.product_id,
        "name": r.item.label if r.item else r.product_id,
        "reason": r.reason,
        "source": r.source.value,
        "score": r.score,
        "support": r.support,
        "anchor_product_id": r.anchor_product_id,
    }
    if r.item is not None:
        out["item"] = _item_json(r.item)
    return out


def catalogue_router(seg: Segmenter) -> APIRouter:
    router = APIRouter(tags=["catalogue"], dependencies=[Depends(admin_guard(seg.settings))])
    platform = seg.platform

    @router.put("/v1/catalogue/items")
    async def upsert_items(body: CatalogueUpsertRequest) -> dict[str, Any]:
        # The model rejects the whole request (400 naming items.<i>.<field> and the rule) before
        # anything is written; a 200 means every item is committed.
        async with platform.unit_of_work() as uow:
            await catalogue_store.upsert_items(uow.session, body.items, seg.clock.now())
        return {"upserted": len(body.items)}

    @router.get("/v1/catalogue/items/{product_id}")
    async def get_item(product_id: str) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            item = await catalogue_store.get_item(uow.session, product_id)
        if item is None:
            raise ApiError(404, "not_found", f"no catalogue item {product_id!r}")
        return _item_json(item)

    @router.get("/v1/catalogue/items")
    async def list_items(
        category: str | None = Query(default=None, min_length=1),
        after: str | None = Query(default=None, min_length=1),
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            items = await catalogue_store.list_items(uow.session, category, after, limit)
        return {
            "items": [_item_json(i) for i in items],
            "next_after": items[-1].product_id if len(items) == limit else None,
        }

    @router.get("/v1/customers/{customer_ref}/recommendations")
    async def customer_recommendations(
        customer_ref: str, limit: int = Query(default=10, ge=1, le=100)
    ) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            cid = await profile_store.resolve_customer(uow.session, customer_ref)
            if cid is None:
                raise ApiError(404, "not_found", f"no customer known as {customer_ref!r}")
            computed = (await seg.recommendations.compute(uow.session, [cid], limit=limit))[cid]
        return {
            "customer_id": cid,
            "cross_sell": [_recommendation_json(r) for r in computed.cross_sell],
            "upsell": [_recommendation_json(r) for r in computed.upsell],
        }

    @router.post("/v1/recommendations/recompute")
    async def recompute() -> dict[str, Any]:
        result = await seg.recommendations.recompute()
        return result.as_json()

    return router

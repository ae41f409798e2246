"""The lifecycle API (admin token): the stage policy, the fitted model, refit on demand."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends
from pydantic import ValidationError

from services.segmenter.domain.lifecycle.stages import StagePolicy, StageThresholds, default_policy
from services.segmenter.runtime import Segmenter
from services.segmenter.store import lifecycle as lifecycle_store
from shared.http import ApiError, admin_guard, field_error, validation_errors


def _policy_from_body(body: Any) -> StagePolicy:
    """`{"rules": [...], "otherwise": ...}` (a full ordered policy) or `{"thresholds": {...}}` (the default
    policy with other thresholds)."""
    if not isinstance(body, dict) or not ({"rules", "thresholds"} & set(body)):
        raise ApiError(
            400,
            "invalid_policy",
            "send either `rules` (an ordered policy) or `thresholds` (the default policy's knobs)",
            errors=[field_error("rules", "required", "`rules` or `thresholds` is required")],
        )
    if "rules" in body and "thresholds" in body:
        raise ApiError(
            400,
            "invalid_policy",
            "send either `rules` or `thresholds`, not both",
            errors=[field_error("thresholds", "one_of", "use `rules` or `thresholds`, not both")],
        )
    try:
        if "thresholds" in body:
            return default_policy(StageThresholds.model_validate(body["thresholds"] or {}))
        return StagePolicy.model_validate(body)
    except ValidationError as exc:
        prefix = "thresholds." if "thresholds" in body else ""
        errors = [{**e, "field": prefix + e["field"]} for e in validation_errors(exc.errors())]
        raise ApiError(400, "invalid_policy", "the stage policy is invalid", errors=errors) from None


def lifecycle_view(
    fields: dict[str, Any], history: list[dict[str, Any]], engagement: dict[str, Any]
) -> dict[str, Any]:
    """The `lifecycle` part of GET /v1/customers/{id}."""
    return {
        "stage": fields.get("lifecycle_stage"),
        "since": fields.get("lifecycle_stage_since"),
        "history": history,
        "rfm": {
            "r": fields.get("rfm_r"),
            "f": fields.get("rfm_f"),
            "m": fields.get("rfm_m"),
            "score": fields.get("rfm_score"),
        },
        "clv": {"historical": fields.get("revenue"), "predicted_12m": fields.get("predicted_clv")},
        "churn_risk": fields.get("churn_risk"),
        "p_alive": fields.get("p_alive"),
        "expected_orders_90d": fields.get("expected_orders"),
        "nps": {
            "score": fields.get("nps_score"),
            "category": fields.get("nps_category"),
            "at": fields.get("nps_at"),
        },
        "csat": {"score": fields.get("csat_score"), "at": fields.get("csat_at")},
        "engagement": {k: v for k, v in engagement.items() if k != "recent_messages"},
    }


def lifecycle_router(seg: Segmenter) -> APIRouter:
    router = APIRouter(
        prefix="/v1/lifecycle", tags=["lifecycle"], dependencies=[Depends(admin_guard(seg.settings))]
    )
    platform = seg.platform

    @router.get("/stages")
    async def get_stages() -> dict[str, Any]:
        """The ordered stage rules: the first rule whose condition matches decides a customer's stage."""
        async with platform.unit_of_work() as uow:
            stored = await lifecycle_store.get_policy(uow.session)
        if stored is None:
            return {
                "policy": default_policy().model_dump(mode="json"),
                "is_default": True,
                "updated_at": None,
            }
        return {"policy": stored[0], "is_default": False, "updated_at": stored[1]}

    @router.put("/stages")
    async def put_stages(body: Any = Body(...)) -> dict[str, Any]:
        """Replace the stage policy, then recompute every customer's stage (announcing the changes).

        Body: `{"rules": [{"stage", "when", "description"}...], "otherwise": "retention"}` or
        `{"thresholds": {"onboarding_days": 30, ...}}`. Invalid input: 400 naming the field and the rule.
        """
        policy = _policy_from_body(body)
        now = seg.clock.now()
        async with platform.unit_of_work() as uow:
            await lifecycle_store.put_policy(uow.session, policy.model_dump(mode="json"), now)
        seg.lifecycle.invalidate()
        result = await seg.lifecycle.recompute(f"policy:{now.isoformat()}")
        return {"policy": policy.model_dump(mode="json"), "recomputed": result}

    @router.get("/model")
    async def get_model() -> dict[str, Any]:
        """The latest fitted BG/NBD (transactions) and Gamma-Gamma (spend) parameters with diagnostics."""
        async with platform.unit_of_work() as uow:
            row = await lifecycle_store.latest_model(uow.session)
        if row is None:
            raise ApiError(404, "not_found", "no model fitted yet: POST /v1/lifecycle/refit")
        return {
            "model_id": row["id"],
            "fitted_at": row["fitted_at"],
            "transactions": row["transactions"],
            "spend": row["spend"],
            "rfm_cuts": row["rfm_cuts"],
            "customers": row["customers"],
            "buyers": row["buyers"],
            "duration_s": row["duration_s"],
            "time_unit_days": seg.lifecycle.snapshot_settings.model_time_unit_days,
        }

    @router.post("/refit")
    async def refit() -> dict[str, Any]:
        """Fit the models on the whole base now, store them, recompute every customer's metrics and stage."""
        return await seg.lifecycle.refit()

    return router

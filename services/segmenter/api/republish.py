"""`POST /v1/admin/republish-profiles` (admin token): re-announce every profile on clm.profiles.v1 so a
restored or new consumer can rebuild its projection; `GET` shows the job's progress."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from services.segmenter.runtime import Segmenter
from shared.http import ApiError, admin_guard


def republish_router(seg: Segmenter) -> APIRouter:
    router = APIRouter(
        prefix="/v1/admin", tags=["operations"], dependencies=[Depends(admin_guard(seg.settings))]
    )
    republisher = seg.republisher

    @router.post("/republish-profiles", status_code=202)
    async def republish() -> dict[str, Any]:
        job = await republisher.start()
        if job is None:
            raise ApiError(
                409, "job_running", "a republish job is running; see GET /v1/admin/republish-profiles"
            )
        return job.as_json()

    @router.get("/republish-profiles")
    async def progress() -> dict[str, Any]:
        if republisher.job is None:
            raise ApiError(404, "not_found", "no republish job has run in this process")
        return republisher.job.as_json()

    return router

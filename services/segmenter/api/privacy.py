"""Erasure, export and the privacy receipt (admin token). The segmenter coordinates: it owns identity.

- `DELETE /v1/customers/{ref}`: erase the customer here (one unit of work), keep salted-hash
  tombstones, publish `erase_requested` on clm.privacy.v1 for the other services (in parts when the
  customer has too many identifiers for one message); 202 + request id.
- `GET /v1/privacy/requests/{request_id}`: the receipt, each service's confirmation and its time.
- `GET /v1/customers/{ref}/export`: publish `export_requested`, wait (bounded) for every service's
  `export_part`, answer one JSON document; 504 naming the missing services otherwise, the document
  then comes later from `GET /v1/privacy/exports/{request_id}`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from services.segmenter.runtime import Segmenter
from services.segmenter.store import privacy as privacy_store
from services.segmenter.store import profiles as profile_store
from shared.contracts.events import PrivacyAction, ProfileChanged, ProfileChangeKind
from shared.contracts.topics import PRIVACY, PROFILES
from shared.http import ApiError, admin_guard
from shared.privacy import SERVICES, add_tombstones, answer, erasure_gate, identity_hashes, requests

SERVICE = "segmenter"
EXPORT_POLL_S = 0.1


def privacy_router(seg: Segmenter) -> APIRouter:
    router = APIRouter(tags=["privacy"], dependencies=[Depends(admin_guard(seg.settings))])
    platform, clock = seg.platform, seg.clock
    salt = seg.settings.privacy_salt.get_secret_value()

    @router.delete("/v1/customers/{customer_ref}", status_code=202)
    async def erase_customer(customer_ref: str) -> dict[str, Any]:
        request_id = f"erase-{uuid.uuid4().hex}"
        now = clock.now()
        async with platform.unit_of_work() as uow:
            session = uow.session
            await erasure_gate(session, exclusive=True)
            cid = await profile_store.resolve_customer(session, customer_ref)
            # Locked like the events consumer locks it: an event in flight for this customer either
            # committed before (and is erased with the rest) or retries after and meets the tombstone.
            if cid is None or not await privacy_store.lock_customer(session, cid):
                raise ApiError(404, "not_found", f"no customer known as {customer_ref!r}")
            ids = await privacy_store.known_identifiers(session, cid)
            # Rows by the customer's own ids: an identifier value may be another customer's id.
            deleted = await privacy_store.erase_customer(
                session, await privacy_store.own_customer_ids(session, cid)
            )
            await add_tombstones(session, salt, ids, request_id, now)
            await privacy_store.insert_request(
                session, request_id, "erase", cid, identity_hashes(salt, ids), now
            )
            await privacy_store.record_answer(
                session, request_id, SERVICE, PrivacyAction.ERASE_COMPLETED.value, {"deleted": deleted}, now
            )
            # In parts when the identifiers are too many for one message: each service erases by part.
            parts = requests(request_id, PrivacyAction.ERASE_REQUESTED, cid, ids, SERVICE, now)
            for part in parts:
                uow.emit(PRIVACY.name, cid, part)
            # Our own answer is to the whole request (our rows are erased above, all at once).
            whole = parts[0].model_copy(update={"parts": 1})
            uow.emit(PRIVACY.name, cid, answer(whole, SERVICE, PrivacyAction.ERASE_COMPLETED, now))
            # Projections of the profile (journey engine, notifier contacts) drop it at once.
            uow.emit(
                PROFILES.name,
                cid,
                ProfileChanged(
                    event_id=f"{request_id}:profile-erased",
                    customer_id=cid,
                    kind=ProfileChangeKind.ERASED,
                    occurred_at=now,
                    caused_by=request_id,
                ),
            )
        return {
            "request_id": request_id,
            "customer_id": cid,
            "status": "pending",
            "receipt_url": f"/v1/privacy/requests/{request_id}",
        }

    @router.get("/v1/privacy/requests/{request_id}")
    async def receipt(request_id: str) -> dict[str, Any]:
        async with platform.unit_of_work() as uow:
            record = await privacy_store.read_request(uow.session, request_id)
        if record is None:
            raise ApiError(404, "not_found", f"no privacy request {request_id!r}")
        services = {
            s: (
                {"status": "completed", "completed_at": record.answers[s][0]}
                if s in record.answers
                else {"status": "pending", "completed_at": None}
            )
            for s in SERVICES
        }
        done = all(v["status"] == "completed" for v in services.values())
        return {
            "request_id": record.request_id,
            "kind": record.kind,
            "customer_id": record.customer_id,
            "requested_at": record.requested_at,
            "status": "completed" if done else "pending",
            "services": services,
        }

    @router.get("/v1/customers/{customer_ref}/export", response_model=None)
    async def export_customer(customer_ref: str) -> dict[str, Any] | JSONResponse:
        request_id = f"export-{uuid.uuid4().hex}"
        now = clock.now()
        async with platform.unit_of_work() as uow:
            session = uow.session
            cid = await profile_store.resolve_customer(session, customer_ref)
            if cid is None:
                raise ApiError(404, "not_found", f"no customer known as {customer_ref!r}")
            ids = await privacy_store.known_identifiers(session, cid)
            await privacy_store.insert_request(
                session, request_id, "export", cid, identity_hashes(salt, ids), now
            )
            own = await privacy_store.export_customer(
                session, await privacy_store.own_customer_ids(session, cid)
            )
            await privacy_store.record_answer(
                session, request_id, SERVICE, PrivacyAction.EXPORT_PART.value, own, now
            )
            for part in requests(request_id, PrivacyAction.EXPORT_REQUESTED, cid, ids, SERVICE, now):
                uow.emit(PRIVACY.name, cid, part)
        deadline = time.monotonic() + seg.settings.privacy_export_wait_s
        while True:
            # Which parts are in, without reading them (a heavy customer's parts are megabytes).
            async with platform.unit_of_work() as uow:
                answered = await privacy_store.answered_services(
                    uow.session, request_id, PrivacyAction.EXPORT_PART.value
                )
            missing = [s for s in SERVICES if s not in answered]
            if not missing:
                document = await _export_document(request_id)
                if document is not None and not document["missing"]:
                    return document
            if time.monotonic() >= deadline:
                return JSONResponse(
                    {
                        "error": "export_incomplete",
                        "message": "not every service answered in time: " + ", ".join(missing),
                        "request_id": request_id,
                        "missing": missing,
                        "export_url": f"/v1/privacy/exports/{request_id}",
                    },
                    status_code=504,
                )
            await asyncio.sleep(EXPORT_POLL_S)

    @router.get("/v1/privacy/exports/{request_id}", response_model=None)
    async def fetch_export(request_id: str) -> dict[str, Any] | JSONResponse:
        document = await _export_document(request_id)
        if document is None:
            raise ApiError(404, "not_found", f"no export request {request_id!r}")
        if document["missing"]:
            return JSONResponse(jsonable_encoder({**document, "status": "pending"}), status_code=202)
        return document

    async def _export_document(request_id: str) -> dict[str, Any] | None:
        async with platform.unit_of_work() as uow:
            record = await privacy_store.read_request(uow.session, request_id)
        if record is None or record.kind != "export":
            return None
        return {
            "request_id": record.request_id,
            "customer_id": record.customer_id,
            "requested_at": record.requested_at,
            "status": "completed",
            "missing": [s for s in SERVICES if s not in record.answers],
            "services": {s: record.answers[s][1] for s in SERVICES if s in record.answers},
        }

    return router

"""Transactional sends: `POST /v1/messages` (admin token, Idempotency-Key) -> the same ledger path."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.notifier.api.dependencies import NotifierDep
from services.notifier.api.templates import TemplateData, check_template_data
from services.notifier.consumers.message_requests import enqueue
from services.notifier.store import api_requests_repo, consent_repo, ledger_repo, templates_repo
from shared.contracts import Channel, MessageCategory, MessageRequested, Recipient
from shared.http import ApiError, day_range, field_error

_KEYS = uuid.UUID("6f1c1c38-9a43-4c57-9a51-53a0d1c2b0aa")


class SendBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: str = Field(min_length=1, max_length=200)
    channel: Channel
    template_id: str = Field(min_length=1)
    category: MessageCategory = MessageCategory.TRANSACTIONAL
    subscription_topic: str | None = None
    recipient: Recipient = Field(default_factory=Recipient)
    data: TemplateData = Field(default_factory=dict)


class RetryBody(BaseModel):
    """Which failed messages to send again: every filter given must hold."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    message_ids: list[Annotated[str, Field(min_length=1, max_length=300)]] | None = Field(
        default=None, min_length=1, max_length=1000
    )
    from_: date | None = Field(default=None, alias="from", description="first day (UTC) asked for")
    to: date | None = Field(default=None, description="last day, inclusive; default today")
    template_id: str | None = Field(default=None, max_length=200)
    journey_id: str | None = Field(default=None, max_length=200)
    reason_contains: str | None = Field(default=None, min_length=1, max_length=200)
    limit: int = Field(default=10_000, ge=1, le=100_000)


def router(admin: Any) -> APIRouter:
    api = APIRouter(prefix="/v1/messages", tags=["messages"], dependencies=[Depends(admin)])

    @api.post("", status_code=202)
    async def send(
        body: SendBody,
        notifier: NotifierDep,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
    ) -> JSONResponse:
        if not idempotency_key:
            raise ApiError(
                400,
                "invalid_request",
                "the Idempotency-Key header is required",
                errors=[field_error("Idempotency-Key", "required", "send a unique key per message")],
            )
        check_template_data(body.data)
        message_id = f"api-{uuid.uuid5(_KEYS, idempotency_key)}"
        digest = hashlib.sha256(
            orjson.dumps(body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        ).hexdigest()
        request = MessageRequested(
            message_id=message_id,
            customer_id=body.customer_id,
            channel=body.channel,
            template_id=body.template_id,
            category=body.category,
            subscription_topic=body.subscription_topic,
            recipient=body.recipient,
            data=body.data,
            requested_at=notifier.clock.now(),
        )
        async with notifier.platform.unit_of_work() as uow:
            template = await templates_repo.get_definition(uow.session, body.template_id)
            if template is None or template.channel is not body.channel:
                problem = (
                    "no such template" if template is None else f"template is for {template.channel.value}"
                )
                raise ApiError(
                    400,
                    "invalid_request",
                    problem,
                    errors=[field_error("template_id", "exists", f"{problem}: {body.template_id!r}")],
                )
            if body.subscription_topic is not None and body.category is MessageCategory.MARKETING:
                # Sent anyway it would be suppressed for everyone, silently: say so now.
                topic = (await consent_repo.topics_by_id(uow.session, {body.subscription_topic})).get(
                    body.subscription_topic
                )
                if topic is None or body.channel.value not in topic.channels:
                    problem = (
                        "no such subscription topic"
                        if topic is None
                        else f"the topic is not offered on {body.channel.value}"
                    )
                    raise ApiError(
                        400,
                        "invalid_request",
                        problem,
                        errors=[
                            field_error(
                                "subscription_topic", "exists", f"{problem}: {body.subscription_topic!r}"
                            )
                        ],
                    )
            _, stored_digest = await api_requests_repo.claim_idempotency_key(
                uow.session, idempotency_key, message_id, digest
            )
            if stored_digest != digest:
                raise ApiError(
                    409,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different request",
                    errors=[field_error("Idempotency-Key", "unique_per_request", "use a new key")],
                )
            salt = notifier.settings.privacy_salt.get_secret_value()
            new = await enqueue(
                uow, [request], notifier.clock, salt, sms_default_region=notifier.settings.sms_default_region
            )
        if new:
            notifier.worker.wake()
        return JSONResponse(
            {"message_id": message_id, "status": "queued", "replayed": not new},
            status_code=202 if new else 200,
        )

    @api.post("/retry-failed")
    async def retry_failed(body: RetryBody, notifier: NotifierDep) -> dict[str, Any]:
        """Failed messages sent again through the normal path (consent is checked again at send time);
        never `unknown` ones, whose provider call may have gone through."""
        start, end = day_range(body.from_, body.to, notifier.clock.now().astimezone(UTC).date(), 30)
        async with notifier.platform.unit_of_work() as uow:
            ids = await ledger_repo.requeue_failed(
                uow.session,
                notifier.clock.now(),
                message_ids=body.message_ids,
                since=datetime.combine(start, time(), UTC),
                until=datetime.combine(end, time(), UTC) + timedelta(days=1),
                template_id=body.template_id,
                journey_id=body.journey_id,
                reason_contains=body.reason_contains,
                limit=body.limit,
            )
        if ids:
            notifier.worker.wake()
        return {"requeued": len(ids), "message_ids": ids[:100]}

    @api.get("/{message_id}")
    async def get_message(message_id: str, notifier: NotifierDep) -> dict[str, Any]:
        async with notifier.platform.unit_of_work() as uow:
            entry = await ledger_repo.get(uow.session, message_id)
        if entry is None:
            raise ApiError(404, "not_found", f"no message {message_id!r}")
        return {
            "message_id": entry.message_id,
            "state": entry.state,
            "attempts": entry.attempts,
            "provider": entry.provider,
            "reason": entry.reason,
            "next_attempt_at": entry.next_attempt_at,
            "customer_id": entry.request.customer_id,
            "channel": entry.request.channel.value,
            "provider_message_id": entry.provider_message_id,
        }

    return api

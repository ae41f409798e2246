"""Subscription topics and per-customer preferences (admin token); each change goes to the consent ledger."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from services.notifier.api.dependencies import NotifierDep
from services.notifier.domain.consent import ALL_TOPICS
from services.notifier.service import ErasureUnderWay
from services.notifier.store import consent_repo, identities_repo
from shared.contracts import Channel
from shared.http import ApiError, field_error

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
# `*` is reserved for "every marketing topic"; the pattern cannot match it.
TOPIC_ID = re.compile(NAME)


class TopicBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    channels: list[Channel] = Field(min_length=1)
    # True: opt-out model (subscribed until they say no); False: opt-in (only after a yes).
    default_subscribed: bool


class Choice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topic: str = Field(description="a topic id, or * for every marketing topic on the channel")
    channel: Channel
    subscribed: bool


class PreferencesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        min_length=1, max_length=100, description="who or what made the change, for the ledger"
    )
    preferences: list[Choice] = Field(min_length=1)


def _conflicting_duplicates(choices: list[Choice]) -> list[dict[str, str]]:
    """A topic and channel given twice with different answers: which one the customer meant cannot be
    told, so the request is refused (the same answer twice is harmless and kept once)."""
    first: dict[tuple[str, Channel], int] = {}
    errors = []
    for i, c in enumerate(choices):
        j = first.setdefault((c.topic, c.channel), i)
        if j != i and choices[j].subscribed is not c.subscribed:
            errors.append(
                field_error(
                    f"preferences.{i}",
                    "unique",
                    f"topic {c.topic!r} on {c.channel.value} is subscribed={c.subscribed} here and "
                    f"subscribed={choices[j].subscribed} in preferences.{j}: "
                    "give each topic and channel once",
                )
            )
    return errors


def router(admin: Any) -> APIRouter:
    api = APIRouter(tags=["consent"], dependencies=[Depends(admin)])

    @api.put("/v1/subscription-topics/{topic_id}")
    async def put_topic(topic_id: str, body: TopicBody, notifier: NotifierDep) -> dict[str, Any]:
        if not TOPIC_ID.fullmatch(topic_id):  # `match`: `$` also matched before a final newline
            raise ApiError(
                400,
                "invalid_request",
                "invalid topic id",
                errors=[field_error("topic_id", "pattern", f"must match {NAME}")],
            )
        async with notifier.platform.unit_of_work() as uow:
            return await consent_repo.upsert_topic(
                uow.session,
                topic_id=topic_id,
                name=body.name,
                description=body.description,
                channels=[c.value for c in body.channels],
                default_subscribed=body.default_subscribed,
                now=notifier.clock.now(),
            )

    @api.get("/v1/subscription-topics")
    async def list_topics(notifier: NotifierDep) -> dict[str, Any]:
        async with notifier.platform.unit_of_work() as uow:
            return {"topics": await consent_repo.list_topics(uow.session)}

    @api.delete("/v1/subscription-topics/{topic_id}", status_code=204)
    async def delete_topic(topic_id: str, notifier: NotifierDep) -> None:
        async with notifier.platform.unit_of_work() as uow:
            if not await consent_repo.delete_topic(uow.session, topic_id):
                raise ApiError(404, "not_found", f"no topic {topic_id!r}")

    # `{customer_id}` is any identifier of the customer (its id, a userId, an anonymousId), as in the
    # segmenter's API: choices are kept under the customer's id, which the answers give.
    @api.get("/v1/customers/{customer_id}/preferences")
    async def get_preferences(customer_id: str, notifier: NotifierDep) -> dict[str, Any]:
        async with notifier.platform.unit_of_work() as uow:
            cid = await identities_repo.canonical(uow.session, customer_id)
            return {"customer_id": cid, "preferences": await consent_repo.preferences_of(uow.session, cid)}

    @api.put("/v1/customers/{customer_id}/preferences")
    async def put_preferences(
        customer_id: str, body: PreferencesBody, notifier: NotifierDep
    ) -> dict[str, Any]:
        conflicts = _conflicting_duplicates(body.preferences)
        if conflicts:
            raise ApiError(
                400, "invalid_request", "conflicting choices for a topic and channel", errors=conflicts
            )
        async with notifier.platform.unit_of_work() as uow:
            known = await consent_repo.topics_by_id(
                uow.session, {c.topic for c in body.preferences} - {ALL_TOPICS}
            )
            errors = [
                field_error(f"preferences.{i}.topic", "exists", f"no subscription topic {c.topic!r}")
                for i, c in enumerate(body.preferences)
                if c.topic != ALL_TOPICS and c.topic not in known
            ]
            if errors:
                raise ApiError(400, "invalid_request", "unknown subscription topic", errors=errors)
            # As the unsubscribe links: nothing is recorded under an erased customer (the erasure
            # deleted their choices and consent history; a write here recreated them). The gate is
            # held to the commit, so an erasure in flight either deletes this write or is seen here.
            try:
                erased = await notifier.customer_erased(uow, customer_id)
            except ErasureUnderWay as exc:
                raise ApiError(
                    503,
                    "erasure_under_way",
                    f"a privacy erasure held the consent records up for {notifier.admin_gate_wait_ms} ms; "
                    "nothing changed, try again",
                    headers={"Retry-After": "2"},
                ) from exc
            if erased:
                # Not the identifier itself: it may be the erased person's email address, and an
                # answer is logged and kept by callers.
                raise ApiError(
                    410,
                    "erased",
                    "this customer was erased: no preferences are kept or recorded for them",
                    errors=[
                        field_error(
                            "customer_id",
                            "not_erased",
                            "the identifier names an erased customer (privacy erasure)",
                        )
                    ],
                )
            changed = await consent_repo.record_choices(
                uow.session,
                customer_id,
                [(c.topic, c.channel.value, c.subscribed) for c in body.preferences],
                source=body.source,
                now=notifier.clock.now(),
            )
            cid = await identities_repo.canonical(uow.session, customer_id)
            current = await consent_repo.preferences_of(uow.session, cid)
        return {"customer_id": cid, "changed": len(changed), "preferences": current}

    @api.get("/v1/customers/{customer_id}/consent-history")
    async def consent_history(customer_id: str, notifier: NotifierDep) -> dict[str, Any]:
        async with notifier.platform.unit_of_work() as uow:
            cid = await identities_repo.canonical(uow.session, customer_id)
            ids = [cid, *await identities_repo.aliases(uow.session, cid)]
            return {"customer_id": cid, "history": await consent_repo.history(uow.session, ids)}

    return api

"""Thin Kafka handlers: claim each message in the inbox, hand the fresh ones to the engine, and let
the unit of work commit projection, instance state, timers, inbox and outbox together."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from services.journey_engine.consumers.privacy import PrivacyConsumer, drop_erased_events
from services.journey_engine.execution.engine import MERGES_TAKEN_OVER, CustomersMoved, JourneyEngine
from services.journey_engine.store import templates as template_store
from shared.contracts.events import (
    CustomerEvent,
    MessageStatus,
    PrivacyRequest,
    ProfileChanged,
    SegmentMembershipChanged,
    TemplateChanged,
)
from shared.contracts.topics import (
    CUSTOMER_EVENTS,
    MESSAGE_STATUS,
    PRIVACY,
    PROFILES,
    SEGMENT_MEMBERSHIP,
    TEMPLATES,
)
from shared.kafka.consumer import LONG_POLL, Consumed
from shared.runtime import Platform

# Tries of a unit whose customers a merge keeps moving under it (each try looks them up again).
MOVED_ATTEMPTS = 5


async def again_if_moved(unit: Callable[[], Awaitable[None]]) -> None:
    """Run a unit of work again (it rolled back) when a merge moved some of its customers between its
    lookup and its locks (`CustomersMoved`): the next lookup sees the merge."""
    for attempt in range(1, MOVED_ATTEMPTS + 1):
        try:
            await unit()
            return
        except CustomersMoved:
            if attempt == MOVED_ATTEMPTS:
                raise


def register(platform: Platform, engine: JourneyEngine) -> None:
    salt = platform.settings.privacy_salt.get_secret_value()

    async def events(batch: Sequence[Consumed[CustomerEvent]]) -> None:
        async def unit() -> None:
            async with platform.unit_of_work() as uow:
                uow.note_correlations(batch)  # the instances they start pass the chain's id on
                fresh = await uow.claim_many("events", [c.event_id for c in batch], erasure_gate=True)
                items = [(c.event_id, c.value) for c in batch if c.event_id in fresh]
                kept, known = await drop_erased_events(uow, salt, items)
                await engine.on_events(uow, kept, known)

        await again_if_moved(unit)

    async def segments(batch: Sequence[Consumed[SegmentMembershipChanged]]) -> None:
        async with platform.unit_of_work() as uow:
            uow.note_correlations(batch)
            # The erasure gate with the claim: the engine drops the erased customers' changes.
            fresh = await uow.claim_many("segments", [c.event_id for c in batch], erasure_gate=True)
            await engine.on_segment_changes(uow, [c.value for c in batch if c.event_id in fresh])

    async def profiles(batch: Sequence[Consumed[ProfileChanged]]) -> None:
        taken_over = 0

        async def unit() -> None:
            nonlocal taken_over
            async with platform.unit_of_work() as uow:
                uow.note_correlations(batch)
                fresh = await uow.claim_many("profiles", [c.event_id for c in batch], erasure_gate=True)
                taken_over = await engine.on_profiles(uow, [c.value for c in batch if c.event_id in fresh])

        await again_if_moved(unit)
        MERGES_TAKEN_OVER.inc(taken_over)  # committed

    async def statuses(batch: Sequence[Consumed[MessageStatus]]) -> None:
        async def unit() -> None:
            async with platform.unit_of_work() as uow:
                fresh = await uow.claim_many("statuses", [c.event_id for c in batch])
                await engine.on_statuses(uow, [c.value for c in batch if c.event_id in fresh])

        await again_if_moved(unit)

    async def templates(batch: Sequence[Consumed[TemplateChanged]]) -> None:
        # No inbox: the newest state per template wins, so applying one twice changes nothing.
        async with platform.unit_of_work() as uow:
            await template_store.apply(uow.session, [c.value for c in batch])

    platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "events", events)
    platform.consumer(SEGMENT_MEMBERSHIP.name, SegmentMembershipChanged, "segments", segments)
    # Off the path of a send: the broker may hold their fetches to hand over bigger batches.
    st = engine.settings
    profiles_fetch = {
        "fetch_min_bytes": st.profiles_fetch_min_bytes,
        "fetch_max_wait_ms": st.profiles_fetch_max_wait_ms,
    }
    statuses_fetch = {
        "fetch_min_bytes": st.statuses_fetch_min_bytes,
        "fetch_max_wait_ms": st.statuses_fetch_max_wait_ms,
    }
    platform.consumer(PROFILES.name, ProfileChanged, "profiles", profiles, **profiles_fetch)
    platform.consumer(MESSAGE_STATUS.name, MessageStatus, "statuses", statuses, **statuses_fetch)
    privacy = PrivacyConsumer(platform, engine.clock)
    platform.consumer(PRIVACY.name, PrivacyRequest, "privacy", privacy.handle)
    # The notifier's templates: journeys' references to them are checked when saved.
    platform.consumer(TEMPLATES.name, TemplateChanged, "templates", templates, **LONG_POLL)

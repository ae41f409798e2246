"""What the segmenter's API, consumer and loops share: the platform, the clock, the segment catalogue."""

from __future__ import annotations

from dataclasses import dataclass

from services.segmenter.consumers.customer_events import CustomerEventsHandler
from services.segmenter.due_timers import DueTimers
from services.segmenter.lifecycle import Lifecycle
from services.segmenter.recommendations import Recommendations
from services.segmenter.reevaluation import SegmentCatalogCache
from services.segmenter.republish import Republisher
from services.segmenter.schedules import Backfill
from services.segmenter.settings import SegmenterSettings
from shared.clock import Clock
from shared.runtime import Platform


@dataclass
class Segmenter:
    settings: SegmenterSettings
    platform: Platform
    clock: Clock
    catalog: SegmentCatalogCache
    events: CustomerEventsHandler
    timers: DueTimers
    backfill: Backfill
    recommendations: Recommendations
    lifecycle: Lifecycle
    republisher: Republisher

    @classmethod
    def build(cls, settings: SegmenterSettings, platform: Platform, clock: Clock) -> Segmenter:
        catalog = SegmentCatalogCache()
        events = CustomerEventsHandler(
            platform,
            clock,
            catalog,
            settings.trait_limits,
            identities_per_message=settings.profile_identities_per_message,
        )
        recommendations = Recommendations(settings, platform, clock, catalog)
        events.recommendations = recommendations
        lifecycle = Lifecycle(platform, clock, settings)
        events.lifecycle = lifecycle
        return cls(
            settings=settings,
            platform=platform,
            clock=clock,
            catalog=catalog,
            events=events,
            timers=DueTimers(platform, clock, catalog, settings),
            backfill=Backfill(platform, clock, catalog, settings),
            recommendations=recommendations,
            lifecycle=lifecycle,
            republisher=Republisher(settings, platform, clock),
        )

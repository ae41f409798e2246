"""Which consumers batch their fetches and which long-poll: an idle consumer whose fetch the broker
holds 50 ms costs twenty fetches a second (client and broker wake-ups); rare topics are long-polled."""

from __future__ import annotations

from typing import Any

from services.journey_engine.app import create_app
from services.journey_engine.settings import JourneyEngineSettings
from tests.support import fetch_options


async def test_journey_engine_answers_events_at_once_batches_projections_and_long_polls_templates(
    make_settings: Any,
) -> None:
    app = create_app(make_settings(JourneyEngineSettings))
    assert fetch_options(app.state.platform.consumers) == {
        "events.v1": (1, 500),
        "segment-membership.v1": (1, 500),
        "profiles.v1": (65536, 50),
        "messages.status.v1": (65536, 250),
        "privacy.v1": (1, 500),
        "templates.v1": (1, 500),
    }

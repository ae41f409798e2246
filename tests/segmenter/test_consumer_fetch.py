"""Which consumers batch their fetches and which long-poll: an idle consumer whose fetch the broker
holds 50 ms costs twenty fetches a second (client and broker wake-ups); rare topics are long-polled."""

from __future__ import annotations

from typing import Any

from services.segmenter.app import create_app
from services.segmenter.settings import SegmenterSettings
from tests.support import fetch_options


async def test_segmenter_batches_events_waits_longer_for_statuses_and_long_polls_privacy(
    make_settings: Any,
) -> None:
    app = create_app(make_settings(SegmenterSettings))
    assert fetch_options(app.state.platform.consumers) == {
        "events.v1": (65536, 50),
        "messages.status.v1": (65536, 250),
        "privacy.v1": (1, 500),
    }

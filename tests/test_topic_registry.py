"""The topic registry (`shared.contracts.topics`), and so the AsyncAPI document's receive operations,
names every consumer the services register, and no other."""

from __future__ import annotations

from services.ingest.app import create_app as ingest_app
from services.ingest.settings import IngestSettings
from services.journey_engine.app import create_app as journey_app
from services.journey_engine.settings import JourneyEngineSettings
from services.notifier.app import create_app as notifier_app
from services.notifier.settings import NotifierSettings
from services.segmenter.app import create_app as segmenter_app
from services.segmenter.settings import SegmenterSettings
from shared.contracts import TOPICS
from shared.runtime import Platform


def test_every_registered_consumer_is_in_the_topic_registry() -> None:
    apps = (
        ingest_app(IngestSettings(topic_prefix="")),
        segmenter_app(SegmenterSettings(topic_prefix="")),
        journey_app(JourneyEngineSettings(topic_prefix="")),
        notifier_app(NotifierSettings(topic_prefix="")),
    )
    registered = set()
    for app in apps:
        platform: Platform = app.state.platform
        registered |= {(runner.topic, runner.group) for runner in platform.consumers}
    declared = {
        (spec.name, f"clm.{service}.{purpose}") for spec in TOPICS for service, purpose in spec.consumers
    }
    assert len(registered) == 13
    assert registered == declared

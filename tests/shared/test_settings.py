"""`shared.settings.BaseServiceSettings` refuses values that would silently stop the plumbing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.ingest.settings import IngestSettings
from services.journey_engine.settings import JourneyEngineSettings
from services.notifier.settings import NotifierSettings
from services.segmenter.settings import SegmenterSettings
from shared.settings import BaseServiceSettings


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("consumer_max_attempts", 0),  # every failing message dead-lettered without one attempt
        ("consumer_max_batch", 0),  # consumers fetch nothing
        ("outbox_batch_size", 0),  # the relay takes no row: nothing emitted is ever published
        ("outbox_poll_interval_s", 0),  # the relay polls in a busy loop
        ("retention_interval_s", 0),  # retention rounds back to back
        ("inbox_retention_days", 0),  # every processed id pruned at once: redeliveries processed again
    ],
)
@pytest.mark.parametrize(
    "settings_class",
    [BaseServiceSettings, IngestSettings, SegmenterSettings, JourneyEngineSettings, NotifierSettings],
)
def test_values_that_stop_the_plumbing_are_refused_naming_the_setting(
    name: str, value: float, settings_class: type[BaseServiceSettings]
) -> None:
    # A service that changes a default keeps the base's bound (a plain `int = 4000` dropped it).
    with pytest.raises(ValidationError) as refused:
        settings_class.model_validate({name: value})
    assert name in str(refused.value)


@pytest.mark.parametrize(
    "settings_class",
    [BaseServiceSettings, IngestSettings, SegmenterSettings, JourneyEngineSettings, NotifierSettings],
)
def test_the_defaults_pass_their_own_bounds(settings_class: type[BaseServiceSettings]) -> None:
    defaults = settings_class()
    # Validated again from their own values: a default outside a bound would be refused here.
    assert settings_class.model_validate(defaults.model_dump()) == defaults

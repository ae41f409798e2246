"""`shared.settings.BaseServiceSettings` refuses values that would silently stop the plumbing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import BaseServiceSettings


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("consumer_max_attempts", 0),  # every failing message dead-lettered without one attempt
        ("consumer_max_batch", 0),  # consumers fetch nothing
        ("outbox_batch_size", 0),  # the relay takes no row: nothing emitted is ever published
        ("outbox_poll_interval_s", 0),  # the relay polls in a busy loop
        ("retention_interval_s", 0),  # retention rounds back to back
    ],
)
def test_values_that_stop_the_plumbing_are_refused_naming_the_setting(name: str, value: float) -> None:
    with pytest.raises(ValidationError) as refused:
        BaseServiceSettings.model_validate({name: value})
    assert name in str(refused.value)


def test_the_defaults_are_valid() -> None:
    BaseServiceSettings()

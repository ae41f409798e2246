"""Every service's migration history ends in one head: an operator's `alembic upgrade head` works, and
a feature branch left unmerged shows up here rather than in production."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

SERVICES = Path(__file__).resolve().parents[3] / "services"


@pytest.mark.parametrize("service", ["ingest", "segmenter", "journey_engine", "notifier"])
def test_one_head(service: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(SERVICES / service / "store" / "migrations"))
    assert len(ScriptDirectory.from_config(config).get_heads()) == 1

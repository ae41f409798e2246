"""docker-compose.yml and the image agree with what the containers they use do (no Docker engine runs
here): the Kafka container keeps its data in its volume, and is reachable both from the other
containers and from the host through the port it publishes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def volume_targets(service: dict[str, Any]) -> list[str]:
    return [v.split(":")[1] for v in service.get("volumes", [])]


def test_kafka_keeps_its_log_dirs_in_its_volume() -> None:
    # apache/kafka defaults log.dirs to /tmp/kraft-combined-logs: outside any volume.
    kafka = compose()["services"]["kafka"]
    log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"].split(",")
    targets = volume_targets(kafka)
    for log_dir in log_dirs:
        assert any(log_dir == t or log_dir.startswith(t.rstrip("/") + "/") for t in targets), log_dir

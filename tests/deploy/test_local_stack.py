"""The local stack's broker management (`deploy.local.stack.LocalKafka`) where it fails, without a
broker: tests start private brokers of their own in parallel workers, and a failed start must not leave
a running JVM behind."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deploy.local import stack
from deploy.local.stack import LocalKafka, PortTaken


def fake_broker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, code: str) -> LocalKafka:
    """A LocalKafka whose broker process is `python -c code`, with nothing to fetch or format."""
    monkeypatch.setattr(stack, "LOG_DIR", tmp_path / "log")
    monkeypatch.setattr(LocalKafka, "fetch", lambda self: None)
    monkeypatch.setattr(LocalKafka, "_config", lambda self: tmp_path / "server.properties")
    monkeypatch.setattr(LocalKafka, "_java", lambda self: [sys.executable, "-c", code])
    # Two ports no one listens on (start checks them first).
    return LocalKafka(tmp_path / "kafka", 1, 2)


def test_a_broker_that_is_not_ready_in_time_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka = fake_broker(monkeypatch, tmp_path, "import time; time.sleep(120)")

    def not_ready(what: str, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{what} not ready after 90s")

    monkeypatch.setattr(stack, "wait_until", not_ready)
    with pytest.raises(RuntimeError, match="not ready") as failed:
        kafka.start()
    assert not isinstance(failed.value, PortTaken)
    assert kafka.proc is not None and kafka.proc.poll() is not None


def test_a_broker_that_cannot_bind_its_port_is_port_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = (
        "print('ERROR Exiting Kafka due to fatal exception (kafka.Kafka$) org.apache.kafka.common."
        "KafkaException: Socket server failed to bind to 127.0.0.1:2: Address already in use.');"
        "raise SystemExit(1)"
    )
    kafka = fake_broker(monkeypatch, tmp_path, code)
    with pytest.raises(PortTaken, match="could not listen"):
        kafka.start()
    # Only this start's lines count: another failure after it is not a port taken.
    kafka = fake_broker(monkeypatch, tmp_path, "raise SystemExit(1)")
    with pytest.raises(RuntimeError, match="exited with code 1") as failed:
        kafka.start()
    assert not isinstance(failed.value, PortTaken)

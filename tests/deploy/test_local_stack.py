"""The local stack's broker management (`deploy.local.stack.LocalKafka`) where it fails, without a
broker: tests start private brokers of their own in parallel workers, and a failed start or a
concurrent first fetch must leave neither a running JVM nor a broken jar cache behind."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from deploy.local import stack
from deploy.local.stack import LocalKafka, PortTaken


def test_concurrent_fetches_wait_for_one_another_and_fetch_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    libs = tmp_path / "kafka" / "libs"
    monkeypatch.setattr(stack, "KAFKA_LIBS", libs)
    fetched: list[str] = []

    def slow_fetch(self: LocalKafka) -> None:
        fetched.append(threading.current_thread().name)
        time.sleep(0.3)  # the other fetch starts meanwhile
        libs.mkdir(parents=True)
        (libs / "kafka_2.13-4.0.0.jar").touch()

    monkeypatch.setattr(LocalKafka, "_fetch_locked", slow_fetch)
    kafka = LocalKafka(tmp_path / "home", 1, 2)
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            kafka.fetch()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch, name=f"fetcher-{n}") for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert len(fetched) == 1, fetched
    kafka.fetch()  # the jars are there: nothing to do
    assert len(fetched) == 1


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

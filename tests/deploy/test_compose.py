"""docker-compose.yml and the image agree with what the containers they use do (no Docker engine runs
here): the Kafka container keeps its data in its volume, and is reachable both from the other
containers and from the host through the port it publishes."""

from __future__ import annotations

import importlib.metadata
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


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """`NAME://host:port,...` as {name: (host, port)}."""
    parsed = {}
    for listener in value.split(","):
        name, address = listener.split("://")
        host, port = address.rsplit(":", 1)
        parsed[name] = (host, int(port))
    return parsed


def test_kafka_is_advertised_where_the_containers_and_the_host_reach_it() -> None:
    services = compose()["services"]
    env = services["kafka"]["environment"]
    bound = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(bound) <= set(protocols)
    assert set(advertised) <= set(bound) - {env["KAFKA_CONTROLLER_LISTENER_NAMES"]}
    # The image's default inter-broker listener is PLAINTEXT.
    assert env.get("KAFKA_INTER_BROKER_LISTENER_NAME", "PLAINTEXT") in advertised
    # A client bootstraps anywhere, then connects to the address the broker advertises on the
    # listener it came in by: for the CLM containers, the one bound on the port they bootstrap on.
    host, port = services["ingest"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"].split(":")
    (name,) = [n for n, (_, p) in bound.items() if p == int(port)]
    assert advertised[name] == ("kafka", int(port)) and host == "kafka"
    # For the host: the published port leads to a listener advertised at that port on the host.
    for mapping in services["kafka"]["ports"]:
        published, target = (int(p) for p in mapping.split(":")[-2:])
        (name,) = [n for n, (_, p) in bound.items() if p == target]
        assert advertised[name] in {("127.0.0.1", published), ("localhost", published)}, mapping


def test_the_volumes_of_clm_containers_are_writable_by_the_image_user() -> None:
    """A named volume mounted where the image has a directory starts with that directory's owner;
    where it has none, root's: the image creates each mount point owned by its (non-root) user."""
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    runs = [line.split(None, 1)[1] for line in dockerfile.splitlines() if line.startswith("RUN ")]
    (user,) = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    commands = [c.split() for run in runs for c in run.split("&&")]
    made = {arg for c in commands if c[:1] == ["mkdir"] for arg in c[1:] if arg.startswith("/")}
    chowns = [c for c in commands if c[:1] == ["chown"] and c[-2] == user]
    owned = {c[-1] for c in chowns}
    owned_below = {c[-1].rstrip("/") + "/" for c in chowns if "-R" in c}
    mounted = 0
    for name, service in compose()["services"].items():
        if service.get("image") != "clm:local":
            continue
        for target in volume_targets(service):
            mounted += 1
            assert target in made, f"{name}: the image has no {target}"
            assert target in owned or any(target.startswith(o) for o in owned_below), (name, target)
    assert mounted


def test_the_build_context_leaves_out_local_state_but_nothing_the_image_copies() -> None:
    docker = ROOT / "deploy" / "docker"
    ignored = [
        line.strip()
        for line in (docker / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in ignored)
    assert {".venv", ".cache", "var", ".git"} <= set(ignored)
    copied = [
        source
        for line in (docker / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    ]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        parts = Path(source).parts
        assert not any(p.removeprefix("**/") in parts or p == source for p in ignored), source


def test_every_port_is_published_on_loopback_only() -> None:
    """Development defaults (admin token, write key, database password) are public: as `make run`,
    nothing is reachable from other machines (Docker's published ports also bypass host firewalls)."""
    for name, service in compose()["services"].items():
        for mapping in service.get("ports", []):
            assert mapping.startswith("127.0.0.1:"), (name, mapping)


def test_postgres_runs_with_the_local_stack_settings() -> None:
    """docker-compose.yml is "the same platform as `make run`": the same server settings."""
    stack = (ROOT / "deploy" / "local" / "stack.py").read_text()
    command = compose()["services"]["postgres"]["command"]
    given = {command[i + 1] for i, arg in enumerate(command) if arg == "-c"}
    local = {
        opt
        for line in stack.splitlines()
        if '"-c ' in line and "fsync" not in line
        for opt in line.strip().strip('",').split(" ")
        if "=" in opt
    }
    assert local and given == local


def test_clm_containers_get_the_kubernetes_grace_period_to_stop() -> None:
    deployments = [
        d
        for path in (ROOT / "deploy" / "kubernetes").glob("*.yaml")
        for d in yaml.safe_load_all(path.read_text())
        if d and d["kind"] == "Deployment"
    ]
    grace = {d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] for d in deployments}
    assert len(grace) == 1
    for name, service in compose()["services"].items():
        if service.get("image") == "clm:local":
            assert service["stop_grace_period"] == f"{next(iter(grace))}s", name


def test_a_process_without_a_sigterm_handler_runs_under_an_init() -> None:
    """The CLM services handle SIGTERM (uvicorn); the SMTP sink does not, and as PID 1 it would
    ignore it for the whole grace period."""
    assert "signal" not in (ROOT / "deploy" / "local" / "smtp_sink.py").read_text()
    assert compose()["services"]["smtp-sink"]["init"] is True


def test_installs_take_the_tested_versions_of_every_package() -> None:
    """`make venv` and the image install with constraints.txt, which pins every package the venv
    holds (transitive ones too): a build later gets what CI passed with."""
    pinned = {
        line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    installed = {
        (dist.metadata["Name"] or "").lower().replace("_", "-"): dist.version
        for dist in importlib.metadata.distributions()
    }
    # (A tool installed by hand beside them, a profiler, is no concern of this test.)
    assert {name: installed.get(name) for name in pinned} == pinned
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    assert "pip install -c constraints.txt ." in (ROOT / "deploy" / "docker" / "Dockerfile").read_text()

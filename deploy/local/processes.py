"""The platform's processes (SMTP sink + four services), as `make run` and the end-to-end tests run them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE_PORTS: dict[str, int] = {"ingest": 8001, "segmenter": 8002, "journey_engine": 8003, "notifier": 8004}


def service_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except Exception:
        return False


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode}; see {self.log_path}"
                )
            if self.ready_port is None or service_ready(self.ready_port):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; see {self.log_path}")

    def stop(self, timeout: float = 25) -> None:
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks run, as in a crash."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()


@dataclass
class PlatformProcesses:
    """The SMTP sink and the four services, each its own process with its own log file."""

    env: dict[str, str]
    log_dir: Path
    ports: dict[str, int] = field(default_factory=lambda: dict(SERVICE_PORTS))
    smtp_port: int = 2525
    mail_dir: Path | None = None
    # Tests run a private platform: topics get this prefix and each service a schema of its own.
    namespace: str | None = None
    # Benchmarks run their own in-process sink on `smtp_port` to time each mail's arrival.
    start_smtp_sink: bool = True
    processes: dict[str, ManagedProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        base = dict(os.environ)
        base.update(self.env)
        base["PYTHONPATH"] = str(ROOT) + os.pathsep + base.get("PYTHONPATH", "")
        base.setdefault("CLM_SMTP_HOST", "127.0.0.1")
        base["CLM_SMTP_PORT"] = str(self.smtp_port)
        base.setdefault("CLM_WRITE_KEYS", "dev-write-key")
        base.setdefault("CLM_ADMIN_TOKEN", "dev-admin-token")
        if self.namespace:
            base["CLM_TOPIC_PREFIX"] = f"{self.namespace}."
        if self.start_smtp_sink:
            argv = [sys.executable, "-m", "deploy.local.smtp_sink", "--port", str(self.smtp_port)]
            if self.mail_dir is not None:
                argv += ["--dir", str(self.mail_dir)]
            self.processes["smtp-sink"] = ManagedProcess(
                "smtp-sink", argv, base, self.log_dir / "smtp-sink.log"
            )
        for name, port in self.ports.items():
            env = dict(base)
            env["CLM_PORT"] = str(port)
            env.setdefault("CLM_PUBLIC_BASE_URL", f"http://127.0.0.1:{self.ports['notifier']}")
            if self.namespace:
                env["CLM_DB_SCHEMA"] = f"{name}_{self.namespace}"
            self.processes[name] = ManagedProcess(
                name, [sys.executable, "-m", f"services.{name}"], env, self.log_dir / f"{name}.log", port
            )

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def start(self) -> None:
        for p in self.processes.values():
            p.start()
        for p in self.processes.values():
            p.wait_ready()

    def restart(self, name: str) -> None:
        self.processes[name].start()
        self.processes[name].wait_ready()

    def stop(self) -> None:
        # Services first: they flush their outbox to the broker on the way out.
        for p in self.processes.values():
            if p.running and p.proc is not None:
                p.proc.send_signal(signal.SIGTERM)
        for p in self.processes.values():
            p.stop()

    def dead(self) -> list[str]:
        return [name for name, p in self.processes.items() if p.proc is not None and not p.running]

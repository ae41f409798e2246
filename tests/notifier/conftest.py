"""A running notifier with its stand-in providers: SMTP sink, Twilio, FCM (primary and backup) and a
webhook receiver, all on loopback free ports."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from deploy.local.smtp_sink import MailSink
from services.notifier.app import create_app
from services.notifier.settings import NotifierSettings, ProviderConfig
from shared.clock import Clock
from shared.contracts import MESSAGE_REQUESTS, MESSAGE_STATUS, PROFILES, MessageRequested, ProfileChanged
from shared.runtime import Platform
from tests.notifier.provider_servers import ProviderServer, fcm_ok, twilio_ok, webhook_ok
from tests.support import eventually, read_topic, running

ADMIN = {"Authorization": "Bearer test-admin-token"}

# An SMS template whose body reads a trait: the template-data tests' shared fixture.
SMS_TEMPLATE = {
    "id": "sms-data",
    "name": "SMS",
    "channel": "sms",
    "default_locale": "en",
    "variants": {"en": {"body": "Hi {{ traits.name | default: 'there' }}"}},
}


@dataclass
class Harness:
    client: httpx.AsyncClient
    settings: NotifierSettings
    platform: Platform
    sink: MailSink
    twilio: ProviderServer
    fcm: ProviderServer
    fcm_backup: ProviderServer
    webhook: ProviderServer
    app: Any

    async def publish(self, request: MessageRequested, **headers: str) -> None:
        await self.platform.producer.publish(
            MESSAGE_REQUESTS.name, request.customer_id, request, extra_headers=headers or None
        )

    async def profile(self, customer_id: str, traits: dict[str, Any]) -> None:
        change = ProfileChanged(
            event_id=f"p-{customer_id}-{len(traits)}-{datetime.now(UTC).timestamp()}",
            customer_id=customer_id,
            kind="traits_changed",
            occurred_at=datetime.now(UTC),
            traits=traits,
        )
        await self.platform.producer.publish(PROFILES.name, customer_id, change)

    async def ledger_entry(
        self, message_id: str, state: str, attempts: int | None = None
    ) -> dict[str, Any] | None:
        """The message's send-ledger entry (GET /v1/messages/{id}) if it is in `state` (and has
        made `attempts` attempts), else None: for `eventually`."""
        response = await self.client.get(f"/v1/messages/{message_id}", headers=ADMIN)
        if response.status_code != 200:
            return None
        entry: dict[str, Any] = response.json()
        if entry["state"] != state or (attempts is not None and entry["attempts"] != attempts):
            return None
        return entry

    async def contact_known(self, customer_id: str) -> bool:
        async with self.platform.engine.connect() as conn:
            found = await conn.scalar(
                text("SELECT 1 FROM contacts WHERE customer_id = :c"), {"c": customer_id}
            )
        return found == 1

    async def wait_contact(self, customer_id: str, timeout: float = 15) -> None:
        """Until the notifier's contacts projection holds the customer (its profiles consumer can
        start seconds after the app on a fresh topic)."""
        await eventually(lambda: self.contact_known(customer_id), timeout=timeout)

    async def statuses(
        self,
        until: Callable[[list[dict[str, Any]]], bool] | None = None,
        *,
        idle: float | None = None,
        timeout: float = 15,
    ) -> list[dict[str, Any]]:
        got = await read_topic(
            self.settings.topic(MESSAGE_STATUS.name),
            until=(lambda msgs: until([m["value"] for m in msgs])) if until else None,
            idle=idle,
            timeout=timeout,
        )
        return [m["value"] for m in got]

    async def wait_status(self, message_id: str, status: str, timeout: float = 15) -> list[dict[str, Any]]:
        found = await self.statuses(
            lambda vs: any(v["message_id"] == message_id and v["status"] == status for v in vs),
            timeout=timeout,
        )
        mine = [v for v in found if v["message_id"] == message_id]
        assert any(v["status"] == status for v in mine), f"no {status} for {message_id}: {mine}"
        return mine

    async def create_template(self, body: dict[str, Any]) -> None:
        response = await self.client.post("/v1/templates", json=body, headers=ADMIN)
        assert response.status_code == 201, response.text

    async def create_topic(self, topic_id: str, channels: list[str], default_subscribed: bool = True) -> None:
        response = await self.client.put(
            f"/v1/subscription-topics/{topic_id}",
            json={"name": topic_id.title(), "channels": channels, "default_subscribed": default_subscribed},
            headers=ADMIN,
        )
        assert response.status_code == 200, response.text


def request(
    message_id: str, customer_id: str, channel: str, template_id: str, **fields: Any
) -> MessageRequested:
    values: dict[str, Any] = {
        "message_id": message_id,
        "customer_id": customer_id,
        "channel": channel,
        "template_id": template_id,
        "requested_at": datetime.now(UTC),
        "journey_id": "j-welcome",
        "node_id": "n-email",
        "journey_version": 1,
        "instance_id": f"i-{customer_id}",
    }
    values.update(fields)
    return MessageRequested.model_validate(values)


@pytest.fixture
async def start_notifier(make_settings) -> AsyncIterator[Callable[..., Any]]:  # type: ignore[no-untyped-def]
    """`async with start_notifier(clock=..., **setting_overrides) as h:` a running notifier harness."""
    stack = contextlib.AsyncExitStack()

    @contextlib.asynccontextmanager
    async def start(clock: Clock | None = None, **overrides: Any) -> AsyncIterator[Harness]:
        sink = await MailSink.start(port=0)
        twilio = await ProviderServer(twilio_ok).start()
        fcm = await ProviderServer(fcm_ok).start()
        fcm_backup = await ProviderServer(fcm_ok).start()
        webhook = await ProviderServer(webhook_ok).start()
        values: dict[str, Any] = {
            "public_base_url": "http://testserver",
            "smtp_port": sink.port,
            "twilio_base_url": twilio.url,
            "fcm_base_url": fcm.url,
            "webhook_allow_list": ["127.0.0.1"],
            "providers": {
                "fcm_backup": ProviderConfig(
                    kind="fcm", base_url=fcm_backup.url, project_id="clm-dev", bearer_token="backup-token"
                ),
            },
            "channel_providers": {
                "email": ["smtp"],
                "sms": ["twilio"],
                "push": ["fcm", "fcm_backup"],
                "webhook": ["webhook"],
                "in_app": ["in_app"],
            },
            "retry_base_s": 60.0,
            "retry_max_s": 600.0,
            "send_max_attempts": 3,
            "delivery_poll_interval_s": 0.05,
            "circuit_failure_threshold": 3,
        }
        values.update(overrides)
        settings = make_settings(NotifierSettings, **values)
        app = create_app(settings, clock=clock)
        try:
            async with running(app) as client:
                yield Harness(
                    client, settings, app.state.platform, sink, twilio, fcm, fcm_backup, webhook, app
                )
        finally:
            for server in (twilio, fcm, fcm_backup, webhook):
                await server.stop()
            await sink.stop()

    yield start
    await stack.aclose()

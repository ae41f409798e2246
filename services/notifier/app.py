"""The notifier service: FastAPI app and lifespan.

Consumes clm.messages.requested.v1 (into the send ledger) and clm.profiles.v1 (contact projection);
a background delivery loop sends what is due; statuses go out on clm.messages.status.v1 via the outbox.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from services.notifier.api import (
    complaints,
    consent,
    customer_messages,
    inbound,
    inbox,
    links,
    messages,
    reports,
    suppressions,
    templates,
)
from services.notifier.channels.router import ProviderRouter
from services.notifier.consumers.message_requests import MessageRequestsConsumer
from services.notifier.consumers.privacy import PrivacyConsumer
from services.notifier.consumers.profiles import ProfilesConsumer
from services.notifier.delivery import DeliveryWorker
from services.notifier.domain.signing import LinkSigner, MessageLinks
from services.notifier.domain.templates import TemplateRenderer
from services.notifier.service import Notifier
from services.notifier.settings import NotifierSettings
from services.notifier.store import api_requests_repo, ledger_repo
from services.notifier.template_announcements import announce_all
from shared.audit import install_audit
from shared.clock import Clock, SystemClock
from shared.contracts import (
    MESSAGE_REQUESTS,
    PRIVACY,
    PROFILES,
    MessageRequested,
    PrivacyRequest,
    ProfileChanged,
)
from shared.http import admin_guard
from shared.runtime import Platform, install_common

MIGRATIONS = Path(__file__).parent / "store" / "migrations"


def create_app(settings: NotifierSettings | None = None, *, clock: Clock | None = None) -> FastAPI:
    settings = settings or NotifierSettings()
    clock = clock or SystemClock()
    platform = Platform(settings, migrations=MIGRATIONS)
    platform.keep_for(
        clock,
        ledger_repo.ledger_rule(settings.ledger_retention_days),
        api_requests_repo.idempotency_rule(settings.idempotency_key_retention_days),
    )
    links_ = MessageLinks(LinkSigner(settings.link_secret.get_secret_value()), settings.public_base_url)
    renderer = TemplateRenderer(
        max_output_chars=settings.template_max_output_chars,
        max_loop_iterations=settings.template_max_loop_iterations,
    )
    router = ProviderRouter.from_settings(settings, platform.unit_of_work, clock)
    worker = DeliveryWorker(
        settings,
        platform.unit_of_work,
        platform.engine,
        router,
        renderer,
        links_,
        clock,
        notify_relay=platform.relay.notify,
    )
    notifier = Notifier(settings, platform, clock, renderer, links_, router, worker)

    requests_consumer = MessageRequestsConsumer(
        platform.unit_of_work, clock, worker, settings.privacy_salt.get_secret_value()
    )
    platform.on_consumers_stopped.append(worker.finish_handed_off)
    platform.consumer(MESSAGE_REQUESTS.name, MessageRequested, "message-requests", requests_consumer.handle)
    platform.consumer(
        PROFILES.name,
        ProfileChanged,
        "profiles",
        ProfilesConsumer(
            platform.unit_of_work, settings.sms_default_region, settings.privacy_salt.get_secret_value()
        ).handle,
    )
    privacy_consumer = PrivacyConsumer(
        platform.unit_of_work,
        clock,
        settings.privacy_salt.get_secret_value(),
        settings.kafka_max_message_bytes,
        settings.sms_default_region,
    )
    platform.consumer(PRIVACY.name, PrivacyRequest, "privacy", privacy_consumer.handle)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await platform.start()
        await announce_all(platform)
        for n in range(settings.delivery_loops):
            platform.run_in_background(f"delivery-{n}", worker.run)
        platform.run_in_background("deferred-reports", notifier.run_deferred_reports)
        await platform.start_consumers()
        try:
            yield
        finally:
            await platform.stop()
            await router.close()

    app = FastAPI(
        title="CLM Notifier",
        description="Templates, consent, channel providers and delivery status.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.platform = platform
    app.state.notifier = notifier
    install_common(app, platform)
    admin = admin_guard(settings)
    app.include_router(templates.router(admin))
    app.include_router(consent.router(admin))
    app.include_router(messages.router(admin))
    app.include_router(reports.router(admin))
    app.include_router(suppressions.router(admin))
    app.include_router(complaints.router(admin))
    app.include_router(customer_messages.router(admin))
    app.include_router(inbox.router(admin))
    app.include_router(links.api)
    app.include_router(inbound.api)
    install_audit(app, platform.unit_of_work, settings)
    return app

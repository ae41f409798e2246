"""Production refuses the development secrets that ship in this repository."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import SecretStr, ValidationError

from services.ingest.settings import IngestSettings
from services.journey_engine.settings import JourneyEngineSettings
from services.notifier.settings import NotifierSettings, ProviderConfig
from services.segmenter.settings import SegmenterSettings
from shared.runtime import InsecureProduction, refuse_insecure_production
from shared.settings import BaseServiceSettings

STRONG = {
    "admin_token": "a" * 32,
    "privacy_salt": "b" * 32,
}
NOTIFIER_STRONG = {
    **STRONG,
    "link_secret": "c" * 32,
    "webhook_secret": "whsec_" + "ZA" * 16,
    "twilio_auth_token": "d" * 32,
}


@pytest.mark.parametrize("settings_class", [IngestSettings, SegmenterSettings, JourneyEngineSettings])
def test_every_service_names_its_development_secrets(settings_class: type[BaseServiceSettings]) -> None:
    assert settings_class().insecure_settings() == [
        "CLM_ADMIN_TOKEN is the development default",
        "CLM_PRIVACY_SALT is the development default",
    ]
    assert settings_class(**STRONG).insecure_settings() == []


def test_the_notifier_also_guards_its_link_and_webhook_secrets() -> None:
    problems = NotifierSettings(**STRONG).insecure_settings()
    assert problems == [
        "CLM_LINK_SECRET is the development default",
        "CLM_WEBHOOK_SECRET is the development default",
        "CLM_TWILIO_AUTH_TOKEN (or a routed Twilio account's auth_token) is the development default or "
        "shorter than 16 characters: inbound SMS requests are verified with it",
    ]
    assert NotifierSettings(**NOTIFIER_STRONG).insecure_settings() == []


def test_the_twilio_development_token_is_refused_only_where_inbound_sms_requests_are_verified_with_it() -> (
    None
):
    # Anyone could sign a START with the public token and opt customers back in to SMS.
    weak = {**NOTIFIER_STRONG, "twilio_auth_token": "dev-twilio-token"}
    assert len(NotifierSettings(**weak).insecure_settings()) == 1
    named = ProviderConfig(kind="twilio", auth_token=SecretStr("short"))
    routed = {"email": ["smtp"], "sms": ["twilio_eu"], "in_app": ["in_app"]}
    assert (
        len(
            NotifierSettings(
                **NOTIFIER_STRONG, providers={"twilio_eu": named}, channel_providers=routed
            ).insecure_settings()
        )
        == 1
    )
    # SMS routed to a named account with a real token: the flat default is never used.
    strong = ProviderConfig(kind="twilio", auth_token=SecretStr("e" * 32))
    assert (
        NotifierSettings(
            **weak, providers={"twilio_eu": strong}, channel_providers=routed
        ).insecure_settings()
        == []
    )


def test_empty_or_short_secrets_are_refused_too() -> None:
    problems = SegmenterSettings(admin_token="", privacy_salt="short").insecure_settings()
    assert problems == [
        "CLM_ADMIN_TOKEN must be at least 16 characters",
        "CLM_PRIVACY_SALT must be at least 16 characters",
    ]


def test_ingest_refuses_the_development_write_key() -> None:
    problems = IngestSettings(**STRONG, write_keys="dev-write-key,k" + "x" * 30).insecure_settings()
    assert problems == [
        "CLM_WRITE_KEYS holds 1 key(s) that are the development default or shorter than 16 characters"
    ]
    assert IngestSettings(**STRONG, write_keys="k" + "x" * 30).insecure_settings() == []


def test_only_production_refuses() -> None:
    refuse_insecure_production(IngestSettings())  # development: the defaults are fine
    with pytest.raises(InsecureProduction, match="CLM_ADMIN_TOKEN is the development default"):
        refuse_insecure_production(IngestSettings(environment="production"))
    refuse_insecure_production(IngestSettings(environment="production", **STRONG))


def test_a_malformed_webhook_secret_is_a_start_error_that_does_not_echo_it() -> None:
    with pytest.raises(ValidationError) as info:
        NotifierSettings(webhook_secret="whsec_not base64!")
    message = str(info.value)
    assert "webhook_secret" in message and "base64" in message
    assert "not base64!" not in message


def test_a_production_process_with_default_secrets_exits_before_serving() -> None:
    """The real entry point: it must stop with the reasons before touching Kafka or PostgreSQL (both
    point nowhere here, so a process that tried would hang in its retries instead of exiting)."""
    env = {
        **os.environ,
        "CLM_ENVIRONMENT": "production",
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",
        "CLM_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.notifier"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "refusing to start in production" in done.stderr
    for name in ("CLM_ADMIN_TOKEN", "CLM_PRIVACY_SALT", "CLM_LINK_SECRET", "CLM_WEBHOOK_SECRET"):
        assert name in done.stderr
    assert '"level": "critical"' in done.stdout.replace('":"', '": "')  # the JSON log line says it too

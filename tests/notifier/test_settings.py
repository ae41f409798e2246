"""Notifier settings on their own: which secrets verify what."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from services.notifier.settings import NotifierSettings, ProviderConfig


def test_inbound_twilio_requests_are_verified_with_the_accounts_sms_is_routed_to() -> None:
    """With named Twilio accounts, STOP replies were checked against the flat development token:
    anyone could sign a START for any number, and real STOPs (signed with the real token) got 403."""
    assert NotifierSettings().inbound_twilio_tokens() == ["dev-twilio-token"]
    routes = {"email": ["smtp"], "sms": ["twilio_us", "twilio_eu"], "in_app": ["in_app"]}
    named = NotifierSettings(
        providers={
            "twilio_us": ProviderConfig(kind="twilio", auth_token=SecretStr("us-token-0123456789")),
            "twilio_eu": ProviderConfig(kind="twilio", auth_token=SecretStr("eu-token-0123456789")),
        },
        channel_providers=routes,
    )
    assert named.inbound_twilio_tokens() == ["eu-token-0123456789", "us-token-0123456789"]


def test_the_sms_default_region_is_a_region_with_phone_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NotifierSettings().sms_default_region is None
    assert NotifierSettings(sms_default_region=" gb ").sms_default_region == "GB"
    assert NotifierSettings(sms_default_region="").sms_default_region is None
    monkeypatch.setenv("CLM_SMS_DEFAULT_REGION", "us")
    assert NotifierSettings().sms_default_region == "US"
    with pytest.raises(ValidationError) as refused:
        NotifierSettings(sms_default_region="USA")
    assert "sms_default_region" in str(refused.value) and "ISO 3166-1 alpha-2" in str(refused.value)

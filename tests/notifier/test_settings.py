"""Notifier settings on their own: which secrets verify what."""

from __future__ import annotations

from pydantic import SecretStr

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

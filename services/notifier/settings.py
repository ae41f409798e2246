"""Notifier settings (env prefix `CLM_`).

Providers are named; each channel lists the providers it tries in order (primary, then failover).
Flat settings (`CLM_SMTP_PORT`, `CLM_TWILIO_BASE_URL`, ...) configure the default providers; the
`CLM_PROVIDERS` JSON object adds or overrides named providers, `CLM_CHANNEL_PROVIDERS` the routing.
"""

from __future__ import annotations

import base64
import binascii
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from services.notifier.domain.phone_numbers import SUPPORTED_REGIONS
from shared.settings import BaseServiceSettings

ProviderKind = Literal["smtp", "twilio", "fcm", "webhook", "in_app"]


DEVELOPMENT_TWILIO_TOKEN = "dev-twilio-token"


class ProviderConfig(BaseModel):
    kind: ProviderKind
    # HTTP providers (twilio, fcm): the API's base URL, so a local stand-in can replace the real one.
    base_url: str = ""
    # smtp
    host: str = "127.0.0.1"
    port: int = 2525
    sender: str = "CLM <noreply@clm.local>"
    use_tls: bool = False  # TLS from the first byte (port 465)
    start_tls: bool = False  # STARTTLS after the greeting (port 587); required, not opportunistic
    # A PEM bundle of the CAs to verify the server's certificate by (a private CA); default: the system's.
    ca_file: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    # twilio
    account_sid: str = ""
    auth_token: SecretStr = SecretStr("")
    from_number: str = ""
    # fcm (an OAuth access token for the project; minted outside CLM)
    project_id: str = ""
    bearer_token: SecretStr = SecretStr("")
    timeout_s: float = 10.0
    # Token bucket: sustained sends per second and burst size.
    rate_per_s: float = 100.0
    burst: int = 100
    # Concurrent calls in flight to this provider.
    concurrency: int = 64

    @model_validator(mode="after")
    def _smtp_credentials_travel_encrypted(self) -> ProviderConfig:
        if self.kind != "smtp":
            return self
        if self.use_tls and self.start_tls:
            raise ValueError("use_tls (port 465) and start_tls (port 587) exclude each other")
        loopback = self.host in ("127.0.0.1", "::1", "localhost")
        if self.username and not (self.use_tls or self.start_tls or loopback):
            raise ValueError(
                "SMTP credentials would cross the network in clear: set use_tls (port 465) or start_tls (587)"
            )
        return self


class NotifierSettings(BaseServiceSettings):
    service_name: str = "notifier"
    port: int = 8004
    db_schema: str = "notifier"
    # Its outbox holds delivery statuses (two commits a message: queued, then the outcome), off the
    # path of the mail itself, read by consumers that batch them up to 250 ms anyway (journey engine,
    # segmenter): waiting 100 ms lets one relay pass (three statements and a produce) carry the
    # statuses of several messages; at 20 ms it was about one pass per message at 50 messages/s.
    outbox_relay_delay_ms: int = 100
    # Forged links could unsubscribe anyone or read their inbox; forged webhooks could speak for CLM.
    production_secrets: ClassVar[tuple[str, ...]] = (
        *BaseServiceSettings.production_secrets,
        "link_secret",
        "webhook_secret",
    )

    # Where links in messages point (unsubscribe, preference page, tracking): this service's public URL.
    public_base_url: str = "http://127.0.0.1:8004"
    # Signs unsubscribe, tracking and inbox tokens (HMAC-SHA256). Change it in production.
    link_secret: SecretStr = SecretStr("dev-link-secret-change-me")
    # Standard Webhooks signing secret ("whsec_" + base64 key).
    webhook_secret: SecretStr = SecretStr("whsec_ZGV2LXdlYmhvb2stc2VjcmV0LWNoYW5nZS1tZQ==")
    # Hosts or CIDR networks webhooks may reach although private/loopback (operator decision).
    webhook_allow_list: list[str] = Field(default_factory=list)
    webhook_max_redirects: int = 3

    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    smtp_sender: str = "CLM <noreply@clm.local>"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_use_tls: bool = False
    smtp_start_tls: bool = False
    smtp_ca_file: str | None = None
    twilio_base_url: str = "https://api.twilio.com"
    twilio_account_sid: str = "AC00000000000000000000000000000000"
    twilio_auth_token: SecretStr = SecretStr(DEVELOPMENT_TWILIO_TOKEN)
    twilio_from_number: str = "+15550000000"
    # Inbound webhooks (STOP) must carry a valid X-Twilio-Signature unless this is off.
    twilio_verify_inbound: bool = True
    # The country (ISO 3166-1 alpha-2: US, GB, DE...) a phone number written without its country
    # code is in. Every SMS goes to, and every STOP is matched by, the E.164 form; unset, such a
    # number is refused (the message fails with the reason) rather than guessed.
    sms_default_region: str | None = None
    fcm_base_url: str = "https://fcm.googleapis.com"
    fcm_project_id: str = "clm-dev"
    fcm_bearer_token: SecretStr = SecretStr("dev-fcm-token")
    provider_rate_per_s: float = 100.0
    provider_burst: int = 100

    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    channel_providers: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "email": ["smtp"],
            "sms": ["twilio"],
            "push": ["fcm"],
            "webhook": ["webhook"],
            "in_app": ["in_app"],
        }
    )

    # Days the send ledger keeps a decided message (with its engagements) and an Idempotency-Key of
    # POST /v1/messages (0: forever). A message id pruned from the ledger is no longer deduplicated:
    # keep more than the topics' Kafka retention, so no redelivery can come after it. Performance
    # reports cover what is kept.
    ledger_retention_days: float = 0
    idempotency_key_retention_days: float = 0
    # A message for a known customer without an address waits this long (retried on the schedule
    # below) for a profile change that brings one, then fails: the request can overtake the profile.
    address_wait_s: float = 120.0
    # Retries of transient failures: exponential backoff with full jitter, durable in the send ledger.
    # The defaults ride out a provider outage of ~18 minutes on average (at most ~37): nine retries
    # waiting up to 5 s, 10 s, ... 640 s, 900 s. (5 attempts from 2 s gave up after ~15 s.)
    send_max_attempts: int = 10
    retry_base_s: float = 5.0
    retry_max_s: float = 900.0
    # Circuit breaker per provider: open after N consecutive failures, half-open after the cooldown.
    circuit_failure_threshold: int = 5
    circuit_cooldown_s: float = 30.0
    # Delivery loop: rows claimed per pass, and how often it looks for due retries.
    delivery_batch_size: int = 200
    # Delivery loops working at once (each claims its own rows: SKIP LOCKED).
    delivery_loops: int = 4
    delivery_poll_interval_s: float = 1.0
    # A row left `sending` this long (process died mid-call) is resolved without resending.
    sending_stale_after_s: float = 300.0
    # A row left `claimed` this long (worker died before calling the provider) is handed back to pending.
    claim_stale_after_s: float = 60.0
    # How often delivery reports kept during an erasure (`deferred_provider_reports`) are looked for,
    # besides the wake-up each one brings: for those another replica or a stopped process kept.
    deferred_reports_poll_s: float = 5.0
    # A kept report whose try raised is tried again after this long, doubling each time (15 min at
    # most), and deleted (logged as an error) after this many tries: it never holds back the others.
    deferred_reports_retry_s: float = Field(30.0, gt=0)
    deferred_reports_max_attempts: int = Field(10, ge=1)
    # Templates: strict undefined variables (an unknown variable fails the message) and size limits.
    template_max_output_chars: int = 1_000_000
    template_max_loop_iterations: int = 10_000
    default_locale: str = "en"

    def provider_configs(self) -> dict[str, ProviderConfig]:
        rate = {"rate_per_s": self.provider_rate_per_s, "burst": self.provider_burst}
        defaults = {
            "smtp": ProviderConfig(
                kind="smtp",
                host=self.smtp_host,
                port=self.smtp_port,
                sender=self.smtp_sender,
                username=self.smtp_username,
                password=self.smtp_password,
                use_tls=self.smtp_use_tls,
                start_tls=self.smtp_start_tls,
                ca_file=self.smtp_ca_file,
                **rate,
            ),
            "twilio": ProviderConfig(
                kind="twilio",
                base_url=self.twilio_base_url,
                account_sid=self.twilio_account_sid,
                auth_token=self.twilio_auth_token,
                from_number=self.twilio_from_number,
                **rate,
            ),
            "fcm": ProviderConfig(
                kind="fcm",
                base_url=self.fcm_base_url,
                project_id=self.fcm_project_id,
                bearer_token=self.fcm_bearer_token,
                **rate,
            ),
            "webhook": ProviderConfig(kind="webhook", **rate),
            "in_app": ProviderConfig(kind="in_app", rate_per_s=1e9, burst=1_000_000),
        }
        defaults.update(self.providers)
        return defaults

    def insecure_settings(self) -> list[str]:
        problems = super().insecure_settings()
        # Inbound STOP/START and delivery reports are trusted when signed with a routed account's
        # token: the public development one would let anyone opt customers back in to SMS.
        weak = [
            t
            for t in self.inbound_twilio_tokens()
            if t == DEVELOPMENT_TWILIO_TOKEN or len(t) < self.MIN_SECRET_LENGTH
        ]
        if weak and self.twilio_verify_inbound:
            problems.append(
                "CLM_TWILIO_AUTH_TOKEN (or a routed Twilio account's auth_token) is the development "
                f"default or shorter than {self.MIN_SECRET_LENGTH} characters: inbound SMS requests "
                "are verified with it"
            )
        return problems

    def inbound_twilio_tokens(self) -> list[str]:
        """The auth tokens an inbound Twilio request (STOP/START, status callback) may be signed with:
        those of the Twilio accounts SMS is routed to (a named account, a failover one), not the flat
        development default when named accounts replace it."""
        configs = self.provider_configs()
        routed = {name for names in self.channel_providers.values() for name in names}
        return [
            token
            for name in sorted(routed)
            if (config := configs.get(name)) is not None and config.kind == "twilio"
            if (token := config.auth_token.get_secret_value())
        ]

    @field_validator("sms_default_region")
    @classmethod
    def _region_has_phone_metadata(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        region = value.strip().upper()
        if region not in SUPPORTED_REGIONS:
            raise ValueError(
                f"{value!r} is not a region with phone number metadata: an ISO 3166-1 alpha-2 code "
                "such as US, GB or DE"
            )
        return region

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_is_a_key(cls, value: SecretStr) -> SecretStr:
        # Checked on start: a malformed secret would otherwise fail every webhook send.
        try:
            key = base64.b64decode(value.get_secret_value().removeprefix("whsec_"), validate=True)
        except binascii.Error as exc:
            raise ValueError("must be whsec_ followed by a base64 key (Standard Webhooks)") from exc
        if not key:
            raise ValueError("must be whsec_ followed by a base64 key (Standard Webhooks)")
        return value

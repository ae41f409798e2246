"""Settings shared by every service: one env prefix (`CLM_`), per-service settings extend the base.

`KAFKA_BOOTSTRAP_SERVERS` and `DATABASE_URL` are also read without the prefix, the names operators
and the local stack use to point CLM at an existing cluster.
"""

from __future__ import annotations

import ipaddress
import ssl
from typing import ClassVar, Literal

from pydantic import (
    AliasChoices,
    Field,
    FilePath,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class BaseServiceSettings(BaseSettings):
    # Errors name the setting, never echo its value: many hold secrets (DATABASE_URL's password too).
    model_config = SettingsConfigDict(
        env_prefix="CLM_", extra="ignore", populate_by_name=True, hide_input_in_errors=True
    )

    service_name: str = "clm"
    # `production` refuses to start while a secret is still a development default, empty or short
    # (`insecure_settings`): the defaults are in this repository, so anyone could use them.
    environment: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"

    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("CLM_KAFKA_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"),
    )
    # How every Kafka client of the service connects (`shared.kafka.connection.client_options`).
    # PLAINTEXT: no encryption, no authentication (a broker only CLM's network reaches). Managed
    # services (Confluent Cloud, MSK, Aiven) take SASL_SSL, or SSL with a client certificate.
    kafka_security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    # SASL only, and then required: the broker's mechanism is not guessed (a wrong one fails to connect).
    kafka_sasl_mechanism: KafkaSaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    # SSL and SASL_SSL: a PEM bundle of the CAs the brokers' certificates are checked against (a
    # private CA: Strimzi's cluster CA, Aiven's project CA); unset, the system's CAs.
    kafka_ssl_ca_file: FilePath | None = None
    # A client certificate (PEM; may hold the key too) for brokers that authenticate clients by it
    # (ssl.client.auth=required), its key if in a file of its own, and the key's password if encrypted.
    kafka_ssl_cert_file: FilePath | None = None
    kafka_ssl_key_file: FilePath | None = None
    kafka_ssl_key_password: SecretStr | None = None
    # Whether a broker's certificate must name the host it is reached at. Off only for brokers whose
    # certificates do not name their advertised addresses, and then with a private CA (production
    # refuses it with the system's CAs: any public certificate would do).
    kafka_ssl_check_hostname: bool = True
    # Prepended to every topic name: lets tests (or tenants) share one broker without colliding.
    topic_prefix: str = ""
    # Partition count used when the platform creates a topic; per-topic overrides below.
    topic_partitions: int = 8
    topic_partition_overrides: dict[str, int] = Field(default_factory=dict)
    topic_replication_factor: int = 1

    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:55432/clm",
        validation_alias=AliasChoices("CLM_DATABASE_URL", "DATABASE_URL"),
    )
    # Each service owns one PostgreSQL schema; its tables and Alembic history live there.
    db_schema: str = "clm"
    db_pool_size: int = 10

    admin_token: SecretStr = SecretStr("dev-admin-token")
    # Key of the salted hashes that erasure tombstones keep instead of a customer's identifiers.
    privacy_salt: SecretStr = SecretStr("dev-privacy-salt")

    # At least 1: 0 attempts dead-lettered every failing message untried; a batch of 0 fetched nothing.
    consumer_max_batch: int = Field(default=500, ge=1)
    consumer_max_attempts: int = Field(default=3, ge=1)
    consumer_retry_backoff_s: float = 0.2
    # Kafka's fetch.min.bytes / fetch.max.wait.ms: the broker answers a fetch once this much is waiting
    # or this long has passed. 1 byte = at once (lowest latency). A service off the latency-critical
    # path can wait a little to work in bigger batches: a unit of work costs about the same for 1 event
    # as for 50, so at low rates this saves most of its CPU for the services that are on it.
    consumer_fetch_min_bytes: int = 1
    consumer_fetch_max_wait_ms: int = 500
    # Offsets of handled batches are committed at most this often (0 = after every batch). They are
    # only ever offsets whose effects are already committed, so a crash in between means a short
    # redelivery that the inbox drops; per-batch commits cost the broker an offsets write each.
    consumer_commit_interval_ms: int = 500
    # Units of work a consumer runs at once, each on partitions no other unit holds (so a key's events
    # stay in order); handlers must allow concurrent units on different keys. While units take less
    # than `consumer_pipeline_after_ms` (moving average), one at a time takes everything waiting: the
    # least cost per event. Slower, two run whenever events wait, each on half the partitions, so the
    # database works on one while Python works on the other; more only for a full batch waiting (a
    # backlog). See `shared.kafka.consumer.ConsumerRunner._dispatch_loop`. Segmenter units took ~30 ms at
    # 3,000 events/s (pipelining there doubled the units and the p99) and 200-500 ms at 5,000/s.
    consumer_concurrency: int = 1
    consumer_pipeline_after_ms: int = 100
    # Kafka's max.partition.fetch.bytes. aiokafka fetches from a broker again only once every
    # partition's buffered records are taken (or 100 ms have passed): on a backlog, concurrent units
    # that finished their partitions' share would wait for the others; a bigger share avoids that.
    consumer_max_partition_fetch_bytes: int = 1024 * 1024
    outbox_poll_interval_s: float = Field(default=0.2, gt=0)  # 0: the relay polls in a busy loop
    # After a commit wakes the relay, wait this long before the pass, so that the commits of the next
    # few ms are relayed with it. 0 = at once (for topics on the latency-critical path).
    outbox_relay_delay_ms: int = 0
    # Messages a relay pass takes at most (whole rows: at least one, however many it packs).
    outbox_batch_size: int = Field(default=500, ge=1)  # 0: the relay never published a row
    # ... and at most about this many bytes of values (always at least one row): a pass sends its rows
    # under one `outbox_send_timeout_s`, and profile snapshots can be hundreds of KB each.
    outbox_batch_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    # A unit of work's messages go into the outbox packed, this many bytes of them to a row at most
    # (a larger message has a row of its own): one row instead of one per message, for the insert,
    # the relay's delete and vacuum (`shared.db.outbox`). 0: a row for each message, as releases before
    # packing wrote and read them (for a rolling upgrade from one: their relays cannot read packed rows).
    outbox_pack_bytes: int = Field(default=1024 * 1024, ge=0)
    # How long a relay pass waits for the broker's acknowledgements before it rolls back and tries
    # again (its rows then go out again: consumers' inboxes drop the duplicates).
    outbox_send_timeout_s: float = Field(default=30.0, gt=0)
    # The largest message CLM produces, as a single-record batch (`shared.kafka.producer.record_size`).
    # Must not exceed any CLM topic's max.message.bytes (the broker's default is 1,048,588 bytes):
    # the outbox relay parks larger rows in `outbox_parked` instead of sending them, and a consumer
    # dead-letters a record without its value when the dead-letter record would be larger.
    kafka_max_message_bytes: int = Field(default=1_000_000, ge=4096)
    # Inbox rows (ids of processed messages) are pruned after this many days. Keep it longer than
    # the topics' retention, or a consumer reset to the beginning reprocesses older messages.
    inbox_retention_days: int = Field(default=14, ge=1)
    # Retention (`shared.db.retention`): days the admin audit log is kept (0: forever), and how often
    # each service's retention round runs (one replica at a time).
    audit_retention_days: float = 0
    retention_interval_s: float = Field(default=3600, gt=0)
    # The garbage collector's young-generation threshold once the service is up (`shared.heap`).
    gc_young_threshold: int = 10_000
    # PostgreSQL's plan_cache_mode for the service's connections. `auto` reuses a generic plan once it
    # looks as cheap as the custom ones; a generic plan chosen while a table was tiny is chosen again
    # when (auto)ANALYZE updates its statistics. `force_custom_plan` plans every execution: the
    # segmenter ran with it until its identities index made generic plans safe, and it cost ~15% more
    # database CPU there (a dozen batch statements planned per batch) and a worse announcement p99.
    db_plan_cache_mode: Literal["auto", "force_custom_plan", "force_generic_plan"] = "auto"

    # The secrets that guard CLM itself (API access, signed links, erasure hashes); a service adds its own.
    production_secrets: ClassVar[tuple[str, ...]] = ("admin_token", "privacy_salt")
    MIN_SECRET_LENGTH: ClassVar[int] = 16

    def insecure_settings(self) -> list[str]:
        """What production must not run with, one line per setting, named by its env var: a secret
        still at its development default, empty, or shorter than `MIN_SECRET_LENGTH`."""
        problems = []
        for name in self.production_secrets:
            value: SecretStr = getattr(self, name)
            default = type(self).model_fields[name].default
            secret = value.get_secret_value()
            env = f"CLM_{name.upper()}"
            if isinstance(default, SecretStr) and secret == default.get_secret_value():
                problems.append(f"{env} is the development default")
            elif len(secret) < self.MIN_SECRET_LENGTH:
                problems.append(f"{env} must be at least {self.MIN_SECRET_LENGTH} characters")
        return problems + self.kafka_insecure_settings()

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper_case(cls, value: object) -> object:
        # As Kafka's own clients read them: `sasl_ssl` and `scram-sha-512` are fine too.
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("kafka_security_protocol", "kafka_ssl_check_hostname", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object, info: ValidationInfo) -> object:
        # As for the settings below: set to "" (a ConfigMap listing what it does not use), the default.
        if isinstance(value, str) and not value.strip():
            return cls.model_fields[str(info.field_name)].default
        return value

    @field_validator(
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_ssl_ca_file",
        "kafka_ssl_cert_file",
        "kafka_ssl_key_file",
        "kafka_ssl_key_password",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # A ConfigMap or compose file often sets a variable it does not use to "".
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, SecretStr) and not value.get_secret_value():
            return None
        return value

    @model_validator(mode="after")
    def _kafka_security_is_whole(self) -> BaseServiceSettings:
        """Refuse Kafka security settings that the protocol would ignore or that it lacks: the client
        would connect without them, and fail against the broker with a less clear error, or not fail."""
        protocol = self.kafka_security_protocol
        named = f"CLM_KAFKA_SECURITY_PROTOCOL is {protocol}"
        if protocol.startswith("SASL_"):
            required = {
                "CLM_KAFKA_SASL_MECHANISM (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)": self.kafka_sasl_mechanism,
                "CLM_KAFKA_SASL_USERNAME": self.kafka_sasl_username,
                "CLM_KAFKA_SASL_PASSWORD": self.kafka_sasl_password,
            }
            if missing := [env for env, value in required.items() if value is None]:
                listed = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
                raise ValueError(f"{named}: set {listed}")
        else:
            sasl = {
                "CLM_KAFKA_SASL_MECHANISM": self.kafka_sasl_mechanism,
                "CLM_KAFKA_SASL_USERNAME": self.kafka_sasl_username,
                "CLM_KAFKA_SASL_PASSWORD": self.kafka_sasl_password,
            }
            if given := [env for env, value in sasl.items() if value is not None]:
                raise ValueError(f"{named}, without SASL: unset {', '.join(given)} (or use SASL_SSL)")
        if not protocol.endswith("SSL"):
            tls = {
                "CLM_KAFKA_SSL_CA_FILE": self.kafka_ssl_ca_file,
                "CLM_KAFKA_SSL_CERT_FILE": self.kafka_ssl_cert_file,
                "CLM_KAFKA_SSL_KEY_FILE": self.kafka_ssl_key_file,
                "CLM_KAFKA_SSL_KEY_PASSWORD": self.kafka_ssl_key_password,
                "CLM_KAFKA_SSL_CHECK_HOSTNAME": None if self.kafka_ssl_check_hostname else False,
            }
            if given := [env for env, value in tls.items() if value is not None]:
                instead = "SASL_SSL" if protocol == "SASL_PLAINTEXT" else "SSL or SASL_SSL"
                raise ValueError(f"{named}, without TLS: unset {', '.join(given)} (or use {instead})")
        if self.kafka_ssl_key_file is not None and self.kafka_ssl_cert_file is None:
            raise ValueError("CLM_KAFKA_SSL_KEY_FILE needs CLM_KAFKA_SSL_CERT_FILE (the key's certificate)")
        if self.kafka_ssl_key_password is not None and self.kafka_ssl_cert_file is None:
            raise ValueError("CLM_KAFKA_SSL_KEY_PASSWORD needs CLM_KAFKA_SSL_CERT_FILE (and its key)")
        if protocol.endswith("SSL"):
            self._check_kafka_ssl_files()
        return self

    def _check_kafka_ssl_files(self) -> None:
        # Read once here, so that a file that is not PEM or a wrong key password stops the service at
        # start, named; a client would fail every connection with OpenSSL's "PEM lib" instead.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CAs of its own: only the files are read
        if self.kafka_ssl_ca_file is not None:
            try:
                context.load_verify_locations(cafile=self.kafka_ssl_ca_file)
            except ssl.SSLError as exc:
                raise ValueError(f"CLM_KAFKA_SSL_CA_FILE holds no PEM certificate ({exc.reason})") from exc
        if self.kafka_ssl_cert_file is not None:
            password = self.kafka_ssl_key_password
            try:
                context.load_cert_chain(
                    self.kafka_ssl_cert_file,
                    self.kafka_ssl_key_file,
                    password.get_secret_value() if password is not None else "",
                )
            except ssl.SSLError as exc:
                raise ValueError(
                    "CLM_KAFKA_SSL_CERT_FILE and CLM_KAFKA_SSL_KEY_FILE are not a PEM certificate and "
                    "its key, or the key is encrypted and CLM_KAFKA_SSL_KEY_PASSWORD does not open it "
                    f"({exc.reason})"
                ) from exc

    def kafka_insecure_settings(self) -> list[str]:
        """Kafka security settings production must not run with (part of `insecure_settings`)."""
        problems: list[str] = []
        # PLAIN sends the password as it is: without TLS, whoever sees the traffic can use it. SCRAM
        # only sends proofs of it (the rest of the traffic is readable all the same: docs/deploy.md).
        if (
            self.kafka_security_protocol == "SASL_PLAINTEXT"
            and self.kafka_sasl_mechanism == "PLAIN"
            and not _loopback_only(self.kafka_bootstrap_servers)
        ):
            problems.append(
                "CLM_KAFKA_SASL_MECHANISM=PLAIN over SASL_PLAINTEXT sends the Kafka password in clear "
                "to a remote broker: use SASL_SSL"
            )
        if (
            self.kafka_security_protocol.endswith("SSL")
            and not self.kafka_ssl_check_hostname
            and self.kafka_ssl_ca_file is None
        ):
            problems.append(
                "CLM_KAFKA_SSL_CHECK_HOSTNAME=false with the system's CAs accepts any public "
                "certificate as the broker's: set CLM_KAFKA_SSL_CA_FILE to the brokers' own CA"
            )
        return problems

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def consumer_group(self, purpose: str) -> str:
        return f"{self.topic_prefix}clm.{self.service_name}.{purpose}"


def _loopback_only(bootstrap_servers: str) -> bool:
    """Whether every bootstrap server is this machine (a sidecar or tunnel that encrypts onwards).

    Only the bootstrap addresses are seen here: the brokers a client then connects to are the ones
    the cluster advertises, which may be other hosts (docs/deploy.md, "Kafka security")."""
    return all(_is_loopback(_host_of(server)) for server in bootstrap_servers.split(","))


def _host_of(server: str) -> str:
    """The host of a bootstrap server: `host:port`, `[v6]:port`, or a host alone (`::1` too)."""
    server = server.strip()
    if server.startswith("["):
        return server[1:].partition("]")[0]
    try:
        ipaddress.ip_address(server)  # an address without a port (a bare IPv6 one has colons)
        return server
    except ValueError:
        pass
    host, colon, _ = server.rpartition(":")
    return host if colon else server


def _is_loopback(host: str) -> bool:
    # Host names are case-insensitive (LOCALHOST, localhost.); any other name may be remote.
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False

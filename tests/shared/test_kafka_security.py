"""The Kafka security settings (`BaseServiceSettings.kafka_*`) and the client options built from them
(`shared.kafka.connection.client_options`), without a broker: combinations refused at load, named
by their env vars; what production refuses; TLS contexts tried in a handshake with a local server."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from pydantic import SecretStr, ValidationError

from services.ingest.settings import IngestSettings
from services.journey_engine.settings import JourneyEngineSettings
from services.notifier.settings import NotifierSettings
from services.segmenter.settings import SegmenterSettings
from shared.kafka import client_options
from shared.settings import BaseServiceSettings
from tests.shared.test_production_settings import NOTIFIER_STRONG, STRONG

PASSWORD = "s3cret-kafka-password"
SASL = {
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_sasl_username": "clm",
    "kafka_sasl_password": PASSWORD,
}


class Pki:
    """A private CA, a broker certificate (localhost) and a client certificate, as PEM files."""

    def __init__(self, home: Path) -> None:
        self.ca = trustme.CA()
        self.broker = self.ca.issue_cert("localhost", "127.0.0.1")
        client = self.ca.issue_cert("clm-client@example.com")
        self.ca_file = home / "ca.pem"
        self.cert_file = home / "client.pem"
        self.key_file = home / "client.key"
        self.encrypted_key_file = home / "client-encrypted.key"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        client.cert_chain_pems[0].write_to_path(str(self.cert_file))
        client.private_key_pem.write_to_path(str(self.key_file))
        key = serialization.load_pem_private_key(client.private_key_pem.bytes(), None)
        self.encrypted_key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"key-password"),
            )
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def test_the_default_is_plaintext_with_nothing_but_the_brokers() -> None:
    settings = BaseServiceSettings(kafka_bootstrap_servers="kafka-1:9092,kafka-2:9092")
    assert client_options(settings) == {
        "bootstrap_servers": "kafka-1:9092,kafka-2:9092",
        "security_protocol": "PLAINTEXT",
    }


def test_sasl_ssl_from_the_environment_as_a_managed_service_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lower case, as some write them; the system's CAs, as for Confluent Cloud or MSK.
    for name, value in {
        "KAFKA_BOOTSTRAP_SERVERS": "b-1.example.kafka.us-east-1.amazonaws.com:9096",
        "CLM_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "CLM_KAFKA_SASL_MECHANISM": "scram-sha-512",
        "CLM_KAFKA_SASL_USERNAME": "clm",
        "CLM_KAFKA_SASL_PASSWORD": PASSWORD,
    }.items():
        monkeypatch.setenv(name, value)
    settings = BaseServiceSettings()
    assert PASSWORD not in repr(settings)
    options = client_options(settings)
    context = options.pop("ssl_context")
    assert options == {
        "bootstrap_servers": "b-1.example.kafka.us-east-1.amazonaws.com:9096",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "clm",
        "sasl_plain_password": PASSWORD,
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED


def test_sasl_plaintext_has_no_tls_context() -> None:
    values = {**SASL, "kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN"}
    options = client_options(BaseServiceSettings(**values))
    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert options["sasl_mechanism"] == "PLAIN"
    assert options["sasl_plain_password"] == PASSWORD
    assert "ssl_context" not in options


def test_empty_variables_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ConfigMap or compose file that lists the variables with empty values for a plaintext broker."""
    for name in ("MECHANISM", "USERNAME", "PASSWORD"):
        monkeypatch.setenv(f"CLM_KAFKA_SASL_{name}", "")
    for name in ("CA_FILE", "CERT_FILE", "KEY_FILE", "KEY_PASSWORD"):
        monkeypatch.setenv(f"CLM_KAFKA_SSL_{name}", "")
    settings = BaseServiceSettings()
    assert settings.kafka_sasl_password is None and settings.kafka_ssl_ca_file is None
    assert client_options(settings)["security_protocol"] == "PLAINTEXT"


def test_an_empty_protocol_or_hostname_check_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set to "" (or blanks), as a ConfigMap may list them unused: PLAINTEXT and a checked hostname,
    not a refusal; the other Kafka security settings are unset when empty (above)."""
    monkeypatch.setenv("CLM_KAFKA_SECURITY_PROTOCOL", "")
    monkeypatch.setenv("CLM_KAFKA_SSL_CHECK_HOSTNAME", " ")
    settings = BaseServiceSettings()
    assert settings.kafka_security_protocol == "PLAINTEXT" and settings.kafka_ssl_check_hostname is True
    assert client_options(settings)["security_protocol"] == "PLAINTEXT"
    # With TLS, the empty check is still a checked hostname.
    monkeypatch.setenv("CLM_KAFKA_SECURITY_PROTOCOL", "SSL")
    context = client_options(BaseServiceSettings())["ssl_context"]
    assert context.check_hostname


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (
            {"kafka_security_protocol": "SASL_SSL"},
            "CLM_KAFKA_SECURITY_PROTOCOL is SASL_SSL: set CLM_KAFKA_SASL_MECHANISM (PLAIN, SCRAM-SHA-256 "
            "or SCRAM-SHA-512), CLM_KAFKA_SASL_USERNAME and CLM_KAFKA_SASL_PASSWORD [",
        ),
        # Only what is missing is named.
        ({**SASL, "kafka_sasl_username": None}, "is SASL_SSL: set CLM_KAFKA_SASL_USERNAME ["),
        ({**SASL, "kafka_sasl_password": ""}, "is SASL_SSL: set CLM_KAFKA_SASL_PASSWORD ["),
        (
            {**SASL, "kafka_sasl_mechanism": None, "kafka_sasl_password": None},
            "is SASL_SSL: set CLM_KAFKA_SASL_MECHANISM (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512) and "
            "CLM_KAFKA_SASL_PASSWORD [",
        ),
        (
            {"kafka_sasl_mechanism": "PLAIN"},
            "CLM_KAFKA_SECURITY_PROTOCOL is PLAINTEXT, without SASL: unset CLM_KAFKA_SASL_MECHANISM",
        ),
        (
            {**SASL, "kafka_security_protocol": "SSL"},
            "is SSL, without SASL: unset CLM_KAFKA_SASL_MECHANISM, CLM_KAFKA_SASL_USERNAME, "
            "CLM_KAFKA_SASL_PASSWORD",
        ),
        (
            {"kafka_ssl_check_hostname": False},
            "is PLAINTEXT, without TLS: unset CLM_KAFKA_SSL_CHECK_HOSTNAME (or use SSL or SASL_SSL)",
        ),
        (
            {**SASL, "kafka_security_protocol": "SASL_PLAINTEXT", "kafka_ssl_key_password": "pw"},
            "is SASL_PLAINTEXT, without TLS: unset CLM_KAFKA_SSL_KEY_PASSWORD (or use SASL_SSL)",
        ),
        ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
        ({**SASL, "kafka_sasl_mechanism": "GSSAPI"}, "kafka_sasl_mechanism"),
    ],
)
def test_combinations_the_protocol_would_ignore_or_lacks_are_refused_by_name(
    values: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        BaseServiceSettings.model_validate(values)
    assert named in str(refused.value)
    assert PASSWORD not in str(refused.value)


def test_tls_files_are_read_at_load_and_named_when_unusable(pki: Pki, tmp_path: Path) -> None:
    ssl_only = {"kafka_security_protocol": "SSL"}

    def refused(**values: Any) -> str:
        with pytest.raises(ValidationError) as error:
            BaseServiceSettings.model_validate({**ssl_only, **values})
        return str(error.value)

    assert "kafka_ssl_ca_file" in refused(kafka_ssl_ca_file=str(tmp_path / "missing.pem"))
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    assert "CLM_KAFKA_SSL_CA_FILE holds no PEM certificate" in refused(kafka_ssl_ca_file=str(not_pem))
    assert "CLM_KAFKA_SSL_KEY_FILE needs CLM_KAFKA_SSL_CERT_FILE" in refused(kafka_ssl_key_file=pki.key_file)
    assert "CLM_KAFKA_SSL_KEY_PASSWORD needs CLM_KAFKA_SSL_CERT_FILE" in refused(kafka_ssl_key_password="x")
    # An encrypted key without its password: refused at load, not prompted for on a terminal.
    for password in (None, "wrong"):
        message = refused(
            kafka_ssl_cert_file=pki.cert_file,
            kafka_ssl_key_file=pki.encrypted_key_file,
            kafka_ssl_key_password=password,
        )
        assert "CLM_KAFKA_SSL_KEY_PASSWORD does not open it" in message
        assert "wrong" not in message
    # A certificate with a key that is not its own.
    other_key = tmp_path / "other.key"
    trustme.CA().issue_cert("other").private_key_pem.write_to_path(str(other_key))
    assert "not a PEM certificate and its key" in refused(
        kafka_ssl_cert_file=pki.cert_file, kafka_ssl_key_file=other_key
    )


async def handshake(pki: Pki, settings: BaseServiceSettings, server_hostname: str) -> str | None:
    """A TLS handshake with a local server presenting `pki.broker` and requiring a client
    certificate signed by `pki.ca`, through `client_options(settings)`'s context: the client
    certificate's name (its subjectAltName) as the server saw it."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.broker.configure_cert(server_context)
    pki.ca.configure_trust(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    seen: list[str] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        seen.extend(value for _, value in peer.get("subjectAltName", ()))
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        context = client_options(settings)["ssl_context"]
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=server_hostname
        )
        await asyncio.sleep(0.05)  # the server's handler has run
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    return seen[0] if seen else None


async def test_the_tls_context_trusts_the_ca_file_and_presents_the_client_certificate(pki: Pki) -> None:
    settings = BaseServiceSettings(
        kafka_security_protocol="SSL",
        kafka_ssl_ca_file=pki.ca_file,
        kafka_ssl_cert_file=pki.cert_file,
        kafka_ssl_key_file=pki.encrypted_key_file,
        kafka_ssl_key_password="key-password",
    )
    options = client_options(settings)
    assert options["security_protocol"] == "SSL" and "sasl_mechanism" not in options
    assert await handshake(pki, settings, "localhost") == "clm-client@example.com"
    # The broker's certificate names localhost, not this: refused unless hostnames are not checked.
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        await handshake(pki, settings, "kafka.example.com")
    unchecked = settings.model_copy(update={"kafka_ssl_check_hostname": False})
    assert await handshake(pki, unchecked, "kafka.example.com") == "clm-client@example.com"


async def test_without_a_ca_file_a_private_ca_is_not_trusted(pki: Pki) -> None:
    settings = BaseServiceSettings(
        kafka_security_protocol="SSL", kafka_ssl_cert_file=pki.cert_file, kafka_ssl_key_file=pki.key_file
    )
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await handshake(pki, settings, "localhost")


SETTINGS_CLASSES: list[tuple[type[BaseServiceSettings], dict[str, Any]]] = [
    (IngestSettings, {**STRONG, "write_keys": "k" * 32}),
    (SegmenterSettings, STRONG),
    (JourneyEngineSettings, STRONG),
    (NotifierSettings, NOTIFIER_STRONG),
]


@pytest.mark.parametrize(("settings_class", "strong"), SETTINGS_CLASSES)
def test_production_refuses_a_plain_password_sent_in_clear_to_a_remote_broker(
    settings_class: type[BaseServiceSettings], strong: dict[str, Any]
) -> None:
    def problems(**values: Any) -> list[str]:
        return settings_class(**strong, **values).insecure_settings()

    plain = {**SASL, "kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN"}
    assert problems(**plain, kafka_bootstrap_servers="kafka-0.kafka:9092,127.0.0.1:9092") == [
        "CLM_KAFKA_SASL_MECHANISM=PLAIN over SASL_PLAINTEXT sends the Kafka password in clear to a "
        "remote broker: use SASL_SSL"
    ]
    # To this machine (a sidecar or tunnel that encrypts onwards): nothing crosses the network. Host
    # names are case-insensitive; an IPv6 address in brackets with a port, or alone.
    for loopback in ("127.0.0.1:9092,[::1]:9092,localhost:9092", "LOCALHOST:9092", "Localhost.", "::1"):
        assert problems(**plain, kafka_bootstrap_servers=loopback) == [], loopback
    # Any remote one among them is refused: a name, an address, an IPv6 one (`::1:9092` is an address
    # of its own, not ::1 with a port: that is written [::1]:9092).
    for remote in (
        "localhost:9092,kafka:9092",
        "10.0.0.7",
        "[fe80::1]:9092",
        "::1:9092",
        "localhost.example:1",
    ):
        assert problems(**plain, kafka_bootstrap_servers=remote) != [], remote
    # SCRAM sends proofs of the password, never the password; SASL_SSL encrypts it all.
    assert problems(**{**plain, "kafka_sasl_mechanism": "SCRAM-SHA-256"}, kafka_bootstrap_servers="k:1") == []
    assert problems(**{**plain, "kafka_security_protocol": "SASL_SSL"}, kafka_bootstrap_servers="k:1") == []
    # Plaintext without authentication is a network decision (a broker only CLM reaches), not refused.
    assert problems(kafka_bootstrap_servers="kafka-0.kafka:9092") == []


def test_production_refuses_unchecked_hostnames_only_with_the_system_cas(pki: Pki) -> None:
    unchecked = {**SASL, "kafka_ssl_check_hostname": False}
    assert SegmenterSettings(**STRONG, **unchecked).insecure_settings() == [
        "CLM_KAFKA_SSL_CHECK_HOSTNAME=false with the system's CAs accepts any public certificate as "
        "the broker's: set CLM_KAFKA_SSL_CA_FILE to the brokers' own CA"
    ]
    assert SegmenterSettings(**STRONG, **unchecked, kafka_ssl_ca_file=pki.ca_file).insecure_settings() == []


def test_the_passwords_are_secrets(pki: Pki) -> None:
    settings = BaseServiceSettings(
        **SASL,
        kafka_ssl_cert_file=pki.cert_file,
        kafka_ssl_key_file=pki.encrypted_key_file,
        kafka_ssl_key_password="key-password",
    )
    assert isinstance(settings.kafka_sasl_password, SecretStr)
    shown = repr(settings) + str(settings.model_dump())
    assert PASSWORD not in shown and "key-password" not in shown

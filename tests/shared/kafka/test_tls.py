"""CLM's Kafka clients over TLS (`shared.kafka.connection.client_options`), against a private broker
of this module's own (the shared one has no certificates): an SSL listener that requires a client
certificate (mutual TLS, as Aiven's and Strimzi's TLS listeners) and a SASL_SSL one (PLAIN, as
Confluent Cloud), both with certificates of a private CA made here (trustme; Kafka reads PEM)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiokafka.errors import KafkaConnectionError
from cryptography.hazmat.primitives import serialization

from deploy.local.stack import LOCAL_SASL_PASSWORD, LOCAL_SASL_USERNAME, LocalKafka, PortTaken
from shared.contracts import CUSTOMER_EVENTS, CustomerEvent
from shared.kafka import Consumed, ConsumerRunner, EventProducer, ensure_topics
from shared.settings import BaseServiceSettings
from tests.shared.test_consumer_runner import event
from tests.support import eventually, free_port

# A broker of its own (one for the module, both TLS listeners): ~10 s on an idle two-core host, most
# of it the broker's start. `make test` runs it; `-m 'not slow'` leaves it out.
pytestmark = pytest.mark.slow


def pkcs8(key_pem: bytes) -> bytes:
    # Kafka's PEM key store reads PKCS#8 keys only.
    key = serialization.load_pem_private_key(key_pem, None)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class TlsKafka(LocalKafka):
    """A single-node broker with an SSL (client certificate required) and a SASL_SSL listener too."""

    tls_dir: Path = Path()
    ssl_port: int = 0
    sasl_ssl_port: int = 0

    def ports(self) -> list[int]:
        return [*super().ports(), self.ssl_port, self.sasl_ssl_port]

    def _listeners(self) -> list[str]:
        plaintext = f"PLAINTEXT://127.0.0.1:{self.port}"
        tls = f"SSL://127.0.0.1:{self.ssl_port},SASL_SSL://127.0.0.1:{self.sasl_ssl_port}"
        users = f'user_{LOCAL_SASL_USERNAME}="{LOCAL_SASL_PASSWORD}"'
        return [
            f"listeners={plaintext},{tls},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners={plaintext},{tls}",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={self.tls_dir / 'broker.pem'}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={self.tls_dir / 'ca.pem'}",
            "listener.name.ssl.ssl.client.auth=required",
            "sasl.enabled.mechanisms=PLAIN",
            "listener.name.sasl_ssl.plain.sasl.jaas.config="
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};",
        ]


@dataclass
class Tls:
    ssl_bootstrap: str
    sasl_ssl_bootstrap: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    # A CA the broker's certificate is not from.
    other_ca_file: Path


# The broker's four ports are found free, then released for it to take: another process may take one
# meanwhile. The broker then starts again, on other ports.
START_ATTEMPTS = 3


def start_broker(home: Path, tls_dir: Path) -> TlsKafka:
    attempt = 1
    while True:
        kafka = TlsKafka(
            home / f"kafka-{attempt}",
            free_port(),
            free_port(),
            heap="256m",
            tls_dir=tls_dir,
            ssl_port=free_port(),
            sasl_ssl_port=free_port(),
        )
        try:
            kafka.start()  # a broker that fails to start is stopped by it
        except PortTaken:
            if attempt == START_ATTEMPTS:
                raise
            attempt += 1
        else:
            return kafka


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    home = tmp_path_factory.mktemp("tls-kafka")
    tls_dir = home / "tls"
    tls_dir.mkdir()
    ca = trustme.CA()
    broker = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("clm-client@example.com")
    ca.cert_pem.write_to_path(str(tls_dir / "ca.pem"))
    chain = b"".join(pem.bytes() for pem in broker.cert_chain_pems)
    (tls_dir / "broker.pem").write_bytes(pkcs8(broker.private_key_pem.bytes()) + chain)
    client.cert_chain_pems[0].write_to_path(str(tls_dir / "client.pem"))
    client.private_key_pem.write_to_path(str(tls_dir / "client.key"))
    trustme.CA().cert_pem.write_to_path(str(tls_dir / "other-ca.pem"))
    kafka = start_broker(home, tls_dir)
    try:
        yield Tls(
            ssl_bootstrap=f"127.0.0.1:{kafka.ssl_port}",
            sasl_ssl_bootstrap=f"127.0.0.1:{kafka.sasl_ssl_port}",
            ca_file=tls_dir / "ca.pem",
            cert_file=tls_dir / "client.pem",
            key_file=tls_dir / "client.key",
            other_ca_file=tls_dir / "other-ca.pem",
        )
    finally:
        kafka.stop()


def mutual_tls(tls: Tls, **overrides: Any) -> BaseServiceSettings:
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": tls.ssl_bootstrap,
        "kafka_security_protocol": "SSL",
        "kafka_ssl_ca_file": tls.ca_file,
        "kafka_ssl_cert_file": tls.cert_file,
        "kafka_ssl_key_file": tls.key_file,
        **overrides,
    }
    return BaseServiceSettings.model_validate({"topic_partitions": 1, **values})


def sasl_ssl(tls: Tls, **overrides: Any) -> BaseServiceSettings:
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": tls.sasl_ssl_bootstrap,
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "PLAIN",
        "kafka_sasl_username": LOCAL_SASL_USERNAME,
        "kafka_sasl_password": LOCAL_SASL_PASSWORD,
        "kafka_ssl_ca_file": tls.ca_file,
        **overrides,
    }
    return BaseServiceSettings.model_validate({"topic_partitions": 1, **values})


async def round_trip(settings: BaseServiceSettings) -> list[int]:
    """Topics created, three events produced and consumed by a runner, all through `settings`."""
    created = await ensure_topics(settings, specs=[CUSTOMER_EVENTS])
    assert settings.topic(CUSTOMER_EVENTS.name) in created
    received: list[int] = []

    async def handle(batch: Sequence[Consumed[CustomerEvent]]) -> None:
        received.extend(int(item.value.properties["n"]) for item in batch)

    producer = EventProducer(settings)
    await producer.start()
    runner = ConsumerRunner(
        settings,
        topic=CUSTOMER_EVENTS.name,
        schema=CustomerEvent,
        group=settings.consumer_group("tls"),
        handler=handle,
        producer=producer,
    )
    try:
        await runner.start()
        for n in range(3):
            await producer.publish(CUSTOMER_EVENTS.name, "u1", event(n))
        await eventually(lambda: len(received) >= 3, timeout=20)
    finally:
        await runner.stop()
        await producer.stop()
    return received


async def test_mutual_tls_with_a_private_ca(tls: Tls) -> None:
    assert await round_trip(mutual_tls(tls, topic_prefix="mtls.")) == [0, 1, 2]


async def test_sasl_ssl_with_a_private_ca(tls: Tls) -> None:
    assert await round_trip(sasl_ssl(tls, topic_prefix="saslssl.")) == [0, 1, 2]


async def refused(settings: BaseServiceSettings, caplog: pytest.LogCaptureFixture) -> list[str]:
    """What aiokafka logged while the producer's start failed."""
    caplog.clear()
    caplog.set_level(logging.ERROR, logger="aiokafka")
    producer = EventProducer(settings)
    with pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(producer.start(), 15)
    return [r.getMessage() for r in caplog.records if r.name.startswith("aiokafka")]


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        # The system's CAs (no CA file), or another CA: the broker's certificate is not trusted.
        (lambda tls: sasl_ssl(tls, kafka_ssl_ca_file=None), "CERTIFICATE_VERIFY_FAILED"),
        (lambda tls: mutual_tls(tls, kafka_ssl_ca_file=tls.other_ca_file), "CERTIFICATE_VERIFY_FAILED"),
    ],
    ids=["system CAs", "another CA"],
)
async def test_a_broker_certificate_not_from_the_ca_is_refused(
    tls: Tls,
    caplog: pytest.LogCaptureFixture,
    settings: Callable[[Tls], BaseServiceSettings],
    reason: str,
) -> None:
    logged = await refused(settings(tls), caplog)
    assert any(reason in message for message in logged), logged


async def test_the_broker_refuses_a_client_without_a_certificate(
    tls: Tls, caplog: pytest.LogCaptureFixture
) -> None:
    """TLS 1.3: the handshake completes on the client's side before the broker checks the client's
    certificate; the broker then closes the connection (its log says why, not the client's)."""
    anonymous = mutual_tls(tls, kafka_ssl_cert_file=None, kafka_ssl_key_file=None)
    logged = await refused(anonymous, caplog)
    assert any("closed" in message for message in logged), logged

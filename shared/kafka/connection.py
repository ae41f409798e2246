"""How every Kafka client CLM creates connects: the bootstrap servers and the security settings."""

from __future__ import annotations

from typing import Any

from aiokafka.helpers import create_ssl_context

from shared.settings import BaseServiceSettings


def client_options(settings: BaseServiceSettings) -> dict[str, Any]:
    """The keyword arguments of `AIOKafkaProducer`, `AIOKafkaConsumer` and `AIOKafkaAdminClient` that
    say where the brokers are and how to reach them (TLS, SASL), from the `kafka_*` settings (checked
    as a whole when the settings load)."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": protocol,
    }
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        assert settings.kafka_sasl_password is not None  # the settings refuse SASL without one
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        # aiokafka's names; SCRAM reads the same two.
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    if protocol in ("SSL", "SASL_SSL"):
        key_password = settings.kafka_ssl_key_password
        context = create_ssl_context(
            cafile=settings.kafka_ssl_ca_file,  # None: the system's CAs
            certfile=settings.kafka_ssl_cert_file,
            keyfile=settings.kafka_ssl_key_file,
            # Always given: without one, OpenSSL would prompt on the terminal for an encrypted key's.
            password=key_password.get_secret_value() if key_password is not None else "",
        )
        context.check_hostname = settings.kafka_ssl_check_hostname
        options["ssl_context"] = context
    return options

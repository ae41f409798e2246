"""CLM's Kafka clients over SASL (`shared.kafka.connection.client_options`), against a real broker:
the local stack's SASL_PLAINTEXT listener (PLAIN; `deploy/local/stack.py`), whose address the stack
exports as KAFKA_SASL_BOOTSTRAP_SERVERS. Topics, the producer and a consumer runner all reach it
through the settings, as a service does; a wrong password or mechanism is refused, with the reason in
the log."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from deploy.local.stack import LOCAL_SASL_PASSWORD, LOCAL_SASL_USERNAME
from services.ingest.app import create_app
from services.ingest.settings import IngestSettings
from shared.contracts import CUSTOMER_EVENTS, CustomerEvent
from shared.kafka import Consumed, ConsumerRunner, EventProducer, ensure_topics
from shared.settings import BaseServiceSettings
from tests.shared.test_consumer_runner import event
from tests.support import eventually, messaging_platform, read_topic, running

SASL_BOOTSTRAP = os.environ.get("KAFKA_SASL_BOOTSTRAP_SERVERS", "")

pytestmark = pytest.mark.skipif(
    not SASL_BOOTSTRAP,
    reason=(
        "KAFKA_SASL_BOOTSTRAP_SERVERS is not set: no SASL listener is known for the broker at "
        "KAFKA_BOOTSTRAP_SERVERS (an external cluster, or one started without it). deploy/local/stack.py "
        f"starts one (SASL_PLAINTEXT, PLAIN, user {LOCAL_SASL_USERNAME!r}) and exports its address: run "
        "`make test`. Set it by hand only to a listener of the broker at KAFKA_BOOTSTRAP_SERVERS (the "
        "tests read back through that) that takes this user with the local stack's password"
    ),
)


class SaslSettings(BaseServiceSettings):
    service_name: str = "sasl_test"
    db_schema: str = "sasl"


def sasl(**overrides: Any) -> dict[str, Any]:
    return {
        "kafka_bootstrap_servers": SASL_BOOTSTRAP,
        "kafka_security_protocol": "SASL_PLAINTEXT",
        "kafka_sasl_mechanism": "PLAIN",
        "kafka_sasl_username": LOCAL_SASL_USERNAME,
        "kafka_sasl_password": LOCAL_SASL_PASSWORD,
        "topic_partitions": 1,
        **overrides,
    }


async def test_topics_producer_and_consumers_reach_the_broker_over_sasl(
    make_settings: Callable[..., Any],
) -> None:
    """What a service starts (`shared.runtime.Platform`: topic creation, the producer, a consumer
    runner with its group) on a listener that accepts nothing but SASL."""
    settings = make_settings(SaslSettings, **sasl())
    received: list[tuple[str | None, int]] = []

    async def handle(batch: Sequence[Consumed[CustomerEvent]]) -> None:
        received.extend((item.key, int(item.value.properties["n"])) for item in batch)

    async with messaging_platform(settings) as platform:
        runner = platform.consumer(CUSTOMER_EVENTS.name, CustomerEvent, "sasl", handle)
        await platform.start_consumers()
        for n in range(3):
            await platform.producer.publish(CUSTOMER_EVENTS.name, "u1", event(n))
        await eventually(lambda: len(received) >= 3, timeout=20)
        assert received == [("u1", 0), ("u1", 1), ("u1", 2)]
        assert runner.last_error is None
        await platform.ping_kafka()


async def test_a_whole_service_serves_over_sasl(make_settings: Callable[..., Any]) -> None:
    """Ingest, as its process runs it (its lifespan: migrations, topics, the producer, the event
    writer's producers, its consumer): a tracked event lands on its topic."""
    write_key = "sasl-write-key-0123456789"
    settings = make_settings(IngestSettings, **sasl(), write_keys=[write_key])
    async with running(create_app(settings)) as client:
        body = {"userId": "u-sasl", "event": "Signed Up", "messageId": "m-sasl"}
        response = await client.post("/v1/track", json=body, auth=(write_key, ""))
        assert response.status_code == 200, response.text
        assert (await client.get("/readyz")).status_code == 200
    # Read back over the plaintext listener: the same broker.
    [message] = await read_topic(settings.topic(CUSTOMER_EVENTS.name), count=1, timeout=15)
    assert message["key"] == "u-sasl"
    assert message["value"]["messageId"] == "m-sasl"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"kafka_sasl_password": "not-the-password"}, "Authentication failed"),
        ({"kafka_sasl_mechanism": "SCRAM-SHA-512"}, "UnsupportedSaslMechanismError"),
    ],
    ids=["wrong password", "mechanism the listener lacks"],
)
async def test_credentials_the_broker_refuses_stop_each_client_with_the_reason_logged(
    make_settings: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    overrides: dict[str, Any],
    reason: str,
) -> None:
    """Refused at once (no metadata, no topic created, nothing sent): each client's start fails, and
    the client logs the broker's answer at ERROR, which a service's log shows (`configure_logging`
    keeps aiokafka's warnings and errors), before the service's own retry warning."""
    settings = make_settings(SaslSettings, **sasl(**overrides))
    caplog.set_level(logging.ERROR, logger="aiokafka")

    async def refused(start: Callable[[], Any]) -> None:
        caplog.clear()
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(start(), 15)
        logged = [r.getMessage() for r in caplog.records if r.name.startswith("aiokafka")]
        assert any(reason in message for message in logged), logged
        # The password is never what gets logged.
        assert not any(str(settings.kafka_sasl_password.get_secret_value()) in m for m in logged)

    await refused(lambda: ensure_topics(settings, specs=[CUSTOMER_EVENTS]))
    producer = EventProducer(settings)
    await refused(producer.start)

    async def handle(batch: Sequence[Consumed[CustomerEvent]]) -> None:
        raise AssertionError("nothing is consumed")

    runner = ConsumerRunner(
        settings,
        topic=CUSTOMER_EVENTS.name,
        schema=CustomerEvent,
        group=settings.consumer_group("sasl"),
        handler=handle,
        producer=producer,
    )
    try:
        await refused(runner.start)
    finally:
        await runner.stop()

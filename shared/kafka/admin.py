"""Creates CLM's topics (and their dead-letter topics) idempotently on start."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from shared.contracts.topics import TOPICS, TopicSpec
from shared.kafka.connection import client_options
from shared.settings import BaseServiceSettings

log = logging.getLogger(__name__)


async def ensure_topics(
    settings: BaseServiceSettings, specs: Iterable[TopicSpec] = TOPICS, extra: Iterable[str] = ()
) -> list[str]:
    """Create missing topics; returns the names created. Safe to call from every service at once."""
    wanted: dict[str, tuple[int, dict[str, str]]] = {}
    for spec in specs:
        partitions = settings.topic_partition_overrides.get(spec.name, settings.topic_partitions)
        wanted[settings.topic(spec.name)] = (partitions, dict(spec.config))
        wanted[settings.topic(spec.dead_letter)] = (1, {})
    for name in extra:
        wanted[settings.topic(name)] = (settings.topic_partitions, {})
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=10000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, n, settings.topic_replication_factor, topic_configs=config)
            for name, (n, config) in wanted.items()
            if name not in existing
        ]
        created: list[str] = []
        if missing:
            try:
                resp = await admin.create_topics(missing)
                for topic, code, *_ in getattr(resp, "topic_errors", []):
                    if code == 0:
                        created.append(topic)
                    elif code != TopicAlreadyExistsError.errno:
                        raise RuntimeError(f"cannot create topic {topic}: error code {code}")
            except TopicAlreadyExistsError:
                pass  # another service created them first
        if created:
            log.info("created topics", extra={"topics": created})
        return created
    finally:
        await admin.close()

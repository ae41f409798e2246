"""The producer's batch path picks the partition Kafka's own clients pick for a key."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner

from shared.kafka import producer as producer_module
from shared.kafka.producer import EventProducer
from shared.settings import BaseServiceSettings


class _Settings(BaseServiceSettings):
    service_name: str = "partitioning_test"


def test_keys_go_to_the_default_partitioners_partition_also_after_the_hash_cache_is_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(producer_module, "_KEY_HASHES_KEPT", 50)  # cleared several times below
    producer = EventProducer(_Settings())
    reference = DefaultPartitioner()
    keys = [f"customer-{i}".encode() for i in range(300)] + ["клиент-ü".encode(), b"", b"\x00\xff"]
    for n in (1, 3, 12):
        partitions = list(range(n))
        for key in keys + keys:  # the second pass is answered from the cache
            assert producer._partition(key, partitions, partitions) == reference(key, partitions, partitions)
    assert len(producer._key_hashes) <= 50
    # No key: any available partition, as aiokafka does.
    assert producer._partition(None, [0, 1, 2], [2]) == 2

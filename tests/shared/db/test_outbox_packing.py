"""Packing a unit of work's outbox rows and the relay's unpacking, without a database: every
message comes back byte for byte, in order, and a packed row stays within its byte budget."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import orjson
import pytest

from shared.db.outbox import _unpack
from shared.db.unit_of_work import OutboxRow, pack_outbox_rows

_ALPHABET = 'ab"\\\n\t\x00é😀<>&/ '


def _row(rng: random.Random, n: int) -> OutboxRow:
    text = "".join(rng.choice(_ALPHABET) for _ in range(rng.randrange(0, 400)))
    value = orjson.dumps({"event_id": f"e{n}", "note": text})
    headers = {"clm-event-id": f"e{n}", "clm-correlation-id": f'c"{n}\\', "clm-producer": "tést"}
    key = f'key-"{n}"-' + '"\\' * rng.randrange(0, 20)  # customer ids are whatever upstream sent
    return OutboxRow("clm.topic.v1", key.encode(), value, orjson.dumps(headers).decode())


@pytest.mark.parametrize("seed", range(20))
def test_packed_rows_unpack_to_the_same_messages_in_order_within_the_budget(seed: int) -> None:
    rng = random.Random(seed)
    rows = [_row(rng, n) for n in range(rng.randrange(1, 60))]
    limit = rng.choice([1, 500, 2_000, 10_000, 1 << 20])
    packs = pack_outbox_rows(rows, limit)
    assert sum(count for _, count in packs) == len(rows)
    unpacked = []
    at = datetime.now(UTC)
    for row_id, (value, count) in enumerate(packs):
        # At most the budget, unless the row holds one message larger than it.
        assert len(value) <= limit or count == 1
        taken = _unpack((row_id, None, None, value, None, at, count))
        assert [t.part for t in taken] == list(range(count))
        unpacked += [t.message for t in taken]
    assert [(m.topic, m.key, m.value) for m in unpacked] == [(r.topic, r.key, r.value) for r in rows]
    assert [dict((k, v.decode()) for k, v in m.headers) for m in unpacked] == [
        orjson.loads(r.headers) for r in rows
    ]


def test_a_full_budget_starts_the_next_row_and_nothing_is_empty() -> None:
    rng = random.Random(7)
    rows = [_row(rng, n) for n in range(30)]
    packs = pack_outbox_rows(rows, 3_000)
    assert len(packs) > 1 and all(count >= 1 for _, count in packs)
    assert pack_outbox_rows([], 3_000) == []

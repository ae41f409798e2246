"""The garbage collector's settings for a service process.

A service imports ~150k long-lived objects (modules, functions, types, pydantic and SQLAlchemy
schemas) and then allocates in batches: a Kafka batch's records, rows and snapshots live across a few
young collections, get promoted, and soon trigger a full collection, which walks every one of those
150k objects. Measured in the segmenter at 2,000 events a batch: ~100 ms per full collection, three
a second, a third of the process's CPU and a 100 ms pause each time (bench/README.md).
"""

from __future__ import annotations

import gc

# Allocations (net of frees) between young collections; CPython's default is 700. A batch's
# short-lived objects mostly die before they are examined, so fewer are promoted towards a full
# collection. Services override it with `gc_young_threshold`.
YOUNG_THRESHOLD = 10_000


def settle_heap(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Call once the service's code is imported and its app built: moves what exists now out of the
    collector's reach (it lives as long as the process; plain reference counting still frees any of
    it that is released) and raises the young generation's threshold."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)

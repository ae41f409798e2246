import gc
from collections.abc import Iterator

import pytest

from shared.heap import YOUNG_THRESHOLD, settle_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_settle_heap_freezes_what_exists_and_raises_the_young_threshold() -> None:
    _, older, oldest = gc.get_threshold()
    survivor = [object()]  # a container the collector tracks, alive through the call

    settle_heap()

    assert gc.get_freeze_count() > 0
    assert not any(o is survivor for o in gc.get_objects())  # out of the collector's reach
    assert gc.get_threshold() == (YOUNG_THRESHOLD, older, oldest)
    assert survivor  # still usable: frozen is not freed

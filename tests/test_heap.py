"""The collector settings of long-running processes (heap.py): what is frozen, and when.

In-process on purpose: these read the collector's own state. Each test gives the test process its
heap and thresholds back (frozen objects return to the collector with ``gc.unfreeze``).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcp_bastion.config import GatewaySettings
from mcp_bastion.gateway import Gateway
from mcp_bastion.heap import GEN0_THRESHOLD, settle_heap

# What may be left in the collector's sight right after a settle: what the call itself allocates on
# its way out. Without the freeze it is the whole test process (hundreds of thousands of objects).
LEFT_AFTER_SETTLE = 2_000


@pytest.fixture
def restored_collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_settle_heap_freezes_what_exists_and_collects_young_objects_less_often(
    restored_collector: None,
) -> None:
    assert len(gc.get_objects()) > 10 * LEFT_AFTER_SETTLE  # a test process: plenty in sight
    older = gc.get_threshold()[1:]
    settle_heap()
    assert len(gc.get_objects()) < LEFT_AFTER_SETTLE
    assert gc.get_freeze_count() > 10 * LEFT_AFTER_SETTLE
    assert gc.get_threshold() == (GEN0_THRESHOLD, *older)


def test_settle_heap_keeps_collecting_cycles_made_afterwards(restored_collector: None) -> None:
    settle_heap()

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2  # a cycle made after the freeze is garbage the collector still finds


async def test_the_relay_settles_the_heap_after_opening_its_own_store(
    tmp_path: Path, restored_collector: None
) -> None:
    """With auth off the connector store (SQLAlchemy: ~40,000 objects) opens at the first connector's
    attach, after start-up froze the heap: the relay freezes it too, or every full collection under
    load walks it (the tunnel's p99 at C=50: 15 ms, against 5 ms)."""
    gateway = Gateway(GatewaySettings(data_dir=str(tmp_path)), [])
    assert gateway.relay is not None and gateway.store is None
    gc.freeze()  # as start-up leaves it
    frozen = gc.get_freeze_count()
    store = await gateway.relay.store()
    try:
        assert len(gc.get_objects()) < LEFT_AFTER_SETTLE
        assert gc.get_freeze_count() > frozen
        assert await gateway.relay.store() is store  # opened once
    finally:
        await gateway.relay.close()

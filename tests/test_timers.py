"""Coarse timers (timers.py): due deadlines fire in order, within a slot of their time; cancelled
ones never; many deadlines share one loop timer; a failing callback does not stop the others."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from mcp_bastion import timers
from mcp_bastion.timers import RESOLUTION, SLACK, Timers


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_deadlines_fire_in_order_within_their_slot_and_cancelled_ones_never(loop_factory: object) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        t = Timers(loop)
        fired: list[tuple[str, float]] = []
        start = loop.time()

        def mark(name: str) -> None:
            fired.append((name, loop.time() - start))

        t.later(0.2, lambda: mark("c"))
        t.later(0.05, lambda: mark("a"))
        gone = t.later(0.1, lambda: mark("never"))
        t.later(0.12, lambda: mark("b"))
        gone.cancel()
        gone.cancel()  # twice is harmless
        assert t.pending() == 3
        await asyncio.sleep(0.2 + 3 * RESOLUTION)
        assert [name for name, _ in fired] == ["a", "b", "c"]
        for (_, at), wanted in zip(fired, (0.05, 0.12, 0.2), strict=True):
            assert wanted - SLACK <= at <= wanted + RESOLUTION + 0.05  # the loop's own lateness
        assert t.pending() == 0

    runner = asyncio.Runner(loop_factory=loop_factory)  # type: ignore[arg-type]
    with runner:
        runner.run(main())


def test_one_loop_timer_serves_many_deadlines_and_a_failing_callback_stops_none() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        t = Timers(loop)
        handles: list[asyncio.TimerHandle] = []
        real_call_at = loop.call_at

        def call_at(when: float, callback: object, *args: object, **kw: object) -> asyncio.TimerHandle:
            handle = real_call_at(when, callback, *args, **kw)  # type: ignore[arg-type]
            if callback == t._fire:
                handles.append(handle)
            return handle

        loop.call_at = call_at  # type: ignore[method-assign]
        hits: list[int] = []

        def boom() -> None:
            raise RuntimeError("faulty callback")

        t.later(0.03, boom)
        deadlines = [t.later(0.03, lambda i=i: hits.append(i)) for i in range(1000)]
        for d in deadlines[::2]:
            d.cancel()
        assert len(handles) == 1  # one slot, one loop timer, for 1,001 deadlines
        await asyncio.sleep(0.03 + 3 * RESOLUTION)
        assert hits == list(range(1, 1000, 2))

    asyncio.run(main())


def test_the_module_timers_follow_the_running_loop() -> None:
    """``later`` keeps one Timers per loop: a new loop (each test, each process) gets its own."""
    seen: list[Timers | None] = []

    async def main() -> None:
        fired = asyncio.Event()
        timers.later(0.01, fired.set)
        seen.append(timers._current)
        await asyncio.wait_for(fired.wait(), 1)

    asyncio.run(main())
    asyncio.run(main())
    assert seen[0] is not None and seen[1] is not None and seen[0] is not seen[1]


def test_a_deadline_cancelled_by_an_earlier_callback_of_its_slot_does_not_fire() -> None:
    async def main() -> None:
        t = Timers(asyncio.get_running_loop())
        fired: list[str] = []
        second = None

        def first() -> None:
            fired.append("first")
            assert second is not None
            second.cancel()

        t.later(0.02, first)
        second = t.later(0.02, lambda: fired.append("second"))
        await asyncio.sleep(0.02 + 3 * RESOLUTION)
        assert fired == ["first"]

    asyncio.run(main())

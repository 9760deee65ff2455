"""Coarse timers: the many deadlines of the data plane on one loop timer.

A forwarded call waits with deadlines that almost never fire: its upstream answer's timeout, its
response's keep-alive or connection watch. ``loop.call_later`` and ``cancel`` cost ~1.6 µs each
(uvloop, this project's benchmark machine), twice per call at C=50 (bench/README.md). Here a
deadline is an entry in a slot of ``RESOLUTION`` seconds; one loop timer fires at the earliest slot
that holds any. A deadline fires up to ``RESOLUTION`` late (and at most ``SLACK`` early, the loop's
own clock slack), which every user of this module can afford.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable

import structlog

log = structlog.get_logger("mcp_bastion.timers")

RESOLUTION = 0.025  # seconds per slot
SLACK = 0.001  # a slot this close to now is due (the loop may wake a little before its timer)
_GONE = object()


class Deadline:
    """One pending deadline; :meth:`cancel` is a dict removal."""

    __slots__ = ("_slot", "callback")

    def __init__(self, slot: dict[Deadline, None], callback: Callable[[], object]) -> None:
        self._slot = slot
        self.callback = callback

    def cancel(self) -> None:
        self._slot.pop(self, None)


class Timers:
    """The deadlines of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._slots: dict[int, dict[Deadline, None]] = {}
        self._due: list[int] = []  # slot numbers, a heap (a slot's number is in it once)
        self._armed: int | None = None  # the slot the loop timer is set for
        self._handle: asyncio.TimerHandle | None = None

    def later(self, seconds: float, callback: Callable[[], object]) -> Deadline:
        number = math.ceil((self.loop.time() + seconds) / RESOLUTION)
        slot = self._slots.get(number)
        if slot is None:
            slot = self._slots[number] = {}
            heapq.heappush(self._due, number)
            if self._armed is None or number < self._armed:
                self._arm(number)
        deadline = Deadline(slot, callback)
        slot[deadline] = None
        return deadline

    def pending(self) -> int:
        return sum(len(slot) for slot in self._slots.values())

    def _arm(self, number: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = number
        self._handle = self.loop.call_at(number * RESOLUTION, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed = None
        now = self.loop.time() + SLACK
        due = self._due
        while due and due[0] * RESOLUTION <= now:
            slot = self._slots.pop(heapq.heappop(due), None) or {}
            for deadline in list(slot):
                if slot.pop(deadline, _GONE) is _GONE:
                    continue  # cancelled by a callback before it in this slot
                try:
                    deadline.callback()
                except Exception:  # one faulty callback must not stop the others
                    log.exception("timer_callback_failed")
        if due:
            self._arm(due[0])


# The running loop's timers. A process that alternates between loops (threads) gets new ones at each
# switch; the old ones still fire their own deadlines (their loop timer holds them), only less shared.
_current: Timers | None = None


def later(seconds: float, callback: Callable[[], object]) -> Deadline:
    """Call ``callback`` (on the running loop) in about ``seconds``; the returned deadline cancels it."""
    global _current
    timers = _current
    loop = asyncio.get_running_loop()
    if timers is None or timers.loop is not loop:
        timers = _current = Timers(loop)
    return timers.later(seconds, callback)

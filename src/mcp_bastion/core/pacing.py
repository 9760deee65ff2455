"""When a process reads a stdio server's output in batches (read coalescing under load); no I/O, no clock.

A gateway or a connector often shares a core with the stdio servers it runs. Woken for every message
(a request from its client side, an answer from the child), it spent most of its CPU on the wake-ups
themselves: at the MCP SDK echo server's pace (~1,300 calls/s at C=50, the child on the same core)
~2.5 context switches and 150-290 µs of CPU per call, where its work per message is a few tens of µs
(bench/README.md, "Changed (5)" and "Read coalescing on the gateway"). Once a server is queueing, a
read taken a moment later costs its calls nothing they notice, and every wake-up carries a batch: the
reader then leaves its inputs (the child's output; on a connector also the link) unread for one short
window after each read.

"Queueing" is all three: at least two calls are in flight to the server, the oldest of them has
waited at least ``QUEUED_AFTER`` windows, and an answer came within the last window (answers come
often: one slow call with a few quick ones beside it is not a queue). A call then waits at most one
window more on its way in and one on its way out, and only while calls already wait ``QUEUED_AFTER``
times as long; below that (one caller, a fast server, a single long call) nothing changes. A read
of more than ``SMALL_READ`` bytes is a batch already and is never followed by a hold: what waits
unread meanwhile is bounded by the pipe (64 KiB on Linux), and a server with large answers would
stall on it (64 KiB echoes at C=50: 3,300 → 630 calls/s before this rule).
"""

from __future__ import annotations

from collections.abc import Hashable

QUEUED_AFTER = 4  # windows the oldest call in flight has waited before reads are held
DEFAULT_WINDOW = 0.002  # seconds; libuv's timers count whole milliseconds
SMALL_READ = 16 * 1024  # bytes: a larger read carries a batch already


class Pacer:
    """The calls one server has in flight, and whether its reads should be held now."""

    __slots__ = ("_last_answer", "_sent", "held", "window")

    def __init__(self, window: float = DEFAULT_WINDOW) -> None:
        self.window = window  # 0: never hold
        self.held = 0  # reads followed by a hold (:meth:`hold`), logged when the process stops
        self._sent: dict[Hashable, float] = {}  # in the order they were sent: the first is the oldest
        self._last_answer = float("-inf")

    def sent(self, key: Hashable, now: float) -> None:
        """A call went to the server (a key sent again moves to the end: the first stays the oldest)."""
        self._sent.pop(key, None)
        self._sent[key] = now

    def answered(self, key: Hashable, now: float) -> None:
        """The server answered the call ``key`` (unknown keys are ignored)."""
        if self._sent.pop(key, None) is not None:
            self._last_answer = now

    def forget(self, key: Hashable) -> None:
        """The call ended without an answer (cancelled): no longer in flight, not an answer."""
        self._sent.pop(key, None)

    def clear(self) -> None:
        self._sent.clear()

    @property
    def in_flight(self) -> int:
        return len(self._sent)

    def delay(self, now: float, read: int = 0) -> float:
        """How long to leave the inputs unread after a read of ``read`` bytes: ``window`` while
        queueing and the read was small, else 0."""
        window = self.window
        if window <= 0 or read > SMALL_READ or len(self._sent) < 2 or now - self._last_answer > window:
            return 0.0
        oldest = next(iter(self._sent.values()))
        return window if now - oldest >= QUEUED_AFTER * window else 0.0

    def hold(self, now: float, read: int) -> float:
        """:meth:`delay` for the server's own output, counted in ``held`` when it holds."""
        delay = self.delay(now, read)
        if delay > 0:
            self.held += 1
        return delay


def link_delay(pacers: list[Pacer], now: float, read: int = 0) -> float:
    """The link carries every server's requests: hold it only while each server with calls in
    flight is queueing (a call to a quiet server is never held for a busy one's sake)."""
    delay = 0.0
    for pacer in pacers:
        if pacer.in_flight:
            mine = pacer.delay(now, read)
            if mine <= 0:
                return 0.0
            delay = mine if delay == 0 else min(delay, mine)
    return delay

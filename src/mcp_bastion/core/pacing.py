"""When a process reads a stdio server's output in batches (read coalescing under load); no I/O, no clock.

A gateway or a connector often shares a core with the stdio servers it runs. Woken for every message
(a request from its client side, an answer from the child), it spent most of its CPU on the wake-ups
themselves: at the MCP SDK echo server's pace (~1,300 calls/s at C=50, the child on the same core)
~2.5 context switches and 150-290 µs of CPU per call, where its work per message is a few tens of µs
(bench/README.md, "Changed (5)" and "Read coalescing on the gateway"). Once a server is queueing, a
read taken a moment later costs its calls nothing they notice, and every wake-up carries a batch: the
reader then leaves its inputs (the child's output; the link to a connector, on both of its ends)
unread for a short hold after each read.

"Queueing" is all three: at least two calls are in flight to the server, the oldest of them has
waited at least ``QUEUED_AFTER`` windows, and an answer came within the hold. The hold is a quarter
(``1 / QUEUED_AFTER``) of the shorter of two spans: how long the oldest call has waited, and how
long the server needs for the calls queued behind the one it works on (the mean time between its
answers times their number); at most ``MAX_WINDOWS`` windows, and none below one window. So at each
hold a call waits at most a quarter more than it already has, a server is never left without work by
a hold (it still has three quarters of its queue when the hold ends), and the batches grow with the
queue (bench/README.md, "Holds sized to the queue"). Below that (one caller, a fast server, a single
long call) nothing changes. A read of more than ``SMALL_READ`` bytes is a batch already and is never
followed by a hold: what waits unread meanwhile is bounded by the pipe (64 KiB on Linux), and a
server with large answers would stall on it (64 KiB echoes at C=50: 3,300 → 630 calls/s before this
rule).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

QUEUED_AFTER = 4  # windows the oldest call in flight has waited before reads are held
DEFAULT_WINDOW = 0.002  # seconds; libuv's timers count whole milliseconds
MAX_WINDOWS = 8  # the longest hold, in windows
SMALL_READ = 16 * 1024  # bytes: a larger read carries a batch already
SMOOTHING = 0.1  # weight of each new gap between answers in their running mean


class Pacer:
    """The calls one server has in flight, and whether its reads should be held now."""

    __slots__ = ("_last_answer", "_sent", "gap", "held", "window")

    def __init__(self, window: float = DEFAULT_WINDOW) -> None:
        self.window = window  # 0: never hold
        self.held = 0  # reads followed by a hold (:meth:`hold`), logged when the process stops
        self._sent: dict[Hashable, float] = {}  # in the order they were sent: the first is the oldest
        self._last_answer = float("-inf")
        # The mean time between answers: while the server queues, how long it takes per call. A gap
        # longer than the longest hold is an idle spell, not work, and counts as that long.
        self.gap = 0.0

    def sent(self, key: Hashable, now: float) -> None:
        """A call went to the server (a key sent again moves to the end: the first stays the oldest)."""
        self._sent.pop(key, None)
        self._sent[key] = now

    def answered(self, key: Hashable, now: float) -> None:
        """The server answered the call ``key`` (unknown keys are ignored)."""
        if self._sent.pop(key, None) is not None:
            gap = min(now - self._last_answer, MAX_WINDOWS * self.window)
            self.gap += (gap - self.gap) * SMOOTHING
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
        """How long to leave the inputs unread after a read of ``read`` bytes: while queueing and the
        read was small, a quarter of the shorter of the oldest call's wait and the queue's work (at
        least one window, at most ``MAX_WINDOWS``), else 0."""
        window = self.window
        queued = len(self._sent)
        if window <= 0 or read > SMALL_READ or queued < 2:
            return 0.0
        waited = now - next(iter(self._sent.values()))
        if waited < QUEUED_AFTER * window:
            return 0.0
        hold = min(waited, (queued - 1) * self.gap, MAX_WINDOWS * QUEUED_AFTER * window) / QUEUED_AFTER
        if hold < window or now - self._last_answer > hold:
            return 0.0
        return hold

    def hold(self, now: float, read: int) -> float:
        """:meth:`delay` for the server's own output, counted in ``held`` when it holds."""
        delay = self.delay(now, read)
        if delay > 0:
            self.held += 1
        return delay


def link_delay(pacers: Iterable[Pacer], now: float, read: int = 0) -> float:
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

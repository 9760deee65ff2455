"""The connector's read coalescing (tunnel/pacing.py): when it holds its reads, and when never.

Sans-IO: times are plain numbers. A model of the rule checks every sequence hypothesis makes."""

from __future__ import annotations

import asyncio
import sys
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_bastion.tunnel.pacing import QUEUED_AFTER, SMALL_READ, Pacer, link_delay
from mcp_bastion.upstream.stdio import StdioChannel

W = 0.002


def queueing(window: float = W) -> tuple[Pacer, float]:
    """A pacer with two calls in flight, the oldest waited long enough, an answer just now."""
    pacer = Pacer(window)
    pacer.sent("a", 0.0)
    pacer.sent("b", 0.001)
    pacer.sent("c", 0.002)
    now = QUEUED_AFTER * window + 0.001
    pacer.answered("a", now)
    return pacer, now


def test_holds_while_a_server_queues() -> None:
    pacer, now = queueing()
    assert pacer.in_flight == 2
    assert pacer.delay(now) == W
    assert pacer.delay(now + W) == W  # an answer within the last window still counts
    assert pacer.delay(now + W + 0.0001) == 0  # answers stopped coming: not a queue
    assert pacer.delay(now, SMALL_READ) == W
    assert pacer.delay(now, SMALL_READ + 1) == 0  # a large read is a batch: holding would fill the pipe


def test_never_holds_otherwise() -> None:
    assert Pacer(0.0).delay(1.0) == 0  # off
    pacer, now = queueing(0.0)
    assert pacer.delay(now) == 0  # off, even while queueing
    one = Pacer(W)  # a single call in flight, however long it has waited
    one.sent("a", 0.0)
    one.sent("b", 0.0)
    one.answered("a", 1.0)
    assert one.delay(1.0) == 0
    fresh = Pacer(W)  # the oldest call has not waited QUEUED_AFTER windows yet
    fresh.sent("a", 0.0)
    fresh.sent("b", 0.0)
    fresh.sent("c", 0.0)
    fresh.answered("a", QUEUED_AFTER * W - 0.0001)
    assert fresh.delay(QUEUED_AFTER * W - 0.0001) == 0
    quiet = Pacer(W)  # calls wait, but no answer came: one long call is not a queue
    quiet.sent("a", 0.0)
    quiet.sent("b", 0.0)
    assert quiet.delay(1.0) == 0


def test_a_cancelled_call_is_not_an_answer_and_unknown_keys_are_ignored() -> None:
    pacer = Pacer(W)
    pacer.sent("a", 0.0)
    pacer.sent("b", 0.0)
    pacer.sent("c", 0.0)
    pacer.forget("a")
    pacer.answered("zzz", 1.0)  # not in flight: not an answer either
    assert pacer.in_flight == 2
    assert pacer.delay(1.0) == 0
    pacer.answered("b", 1.0)
    pacer.sent("d", 1.0)
    assert pacer.delay(1.0) == W  # "c", sent at 0, is the oldest now
    pacer.clear()
    assert pacer.in_flight == 0 and pacer.delay(1.0) == 0


def test_a_key_sent_again_counts_from_its_new_time() -> None:
    pacer = Pacer(W)
    pacer.sent("a", 0.0)
    pacer.sent("b", 0.005)
    pacer.sent("c", 0.006)
    pacer.sent("a", 0.010)  # again: "b" is now the oldest call in flight
    pacer.answered("c", 0.012)
    assert pacer.delay(0.0135) == W  # "b" has waited 8.5 ms, 4 windows and more


def test_the_link_is_held_only_while_every_busy_server_queues() -> None:
    busy, now = queueing()
    slower, _ = queueing(2 * W)
    idle = Pacer(W)
    assert link_delay([], now) == 0
    assert link_delay([idle], now) == 0
    assert link_delay([busy, idle], now) == W  # a server with nothing in flight does not count
    assert link_delay([busy, idle], now, SMALL_READ + 1) == 0
    quick = Pacer(W)  # a call in flight to a server that is not queueing: never held for the busy one
    quick.sent("x", now)
    assert link_delay([busy, quick], now) == 0
    later = QUEUED_AFTER * 2 * W + 0.003  # "c", sent at 0.002, has waited 4 of the slower's windows
    for pacer in (busy, slower):
        pacer.sent("d", later)
        pacer.answered("b", later)
    assert link_delay([busy, slower], later) == W  # the shortest window of them


Op = tuple[str, int, float, int]


@settings(max_examples=500)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["sent", "answered", "forget", "delay"]),
            st.integers(0, 5),
            st.floats(0, 0.02),
            st.sampled_from([0, 100, SMALL_READ, SMALL_READ + 1, 256 * 1024]),
        ),
        max_size=60,
    ),
    st.sampled_from([0.0, 0.001, 0.002, 0.005]),
)
def test_any_sequence_follows_the_rule(ops: list[Op], window: float) -> None:
    pacer = Pacer(window)
    sent: dict[int, float] = {}
    last_answer = float("-inf")
    now = 0.0
    for op, key, step, read in ops:
        now += step
        if op == "sent":
            sent[key] = now  # a key sent again counts from its new time
            pacer.sent(key, now)
        elif op == "answered":
            if sent.pop(key, None) is not None:
                last_answer = now
            pacer.answered(key, now)
        elif op == "forget":
            sent.pop(key, None)
            pacer.forget(key)
        got = pacer.delay(now, read)
        oldest = min(sent.values(), default=now)
        expected = (
            window > 0
            and read <= SMALL_READ
            and len(sent) >= 2
            and now - last_answer <= window
            and now - oldest >= QUEUED_AFTER * window
        )
        assert got == (window if expected else 0.0), (ops, window)
        assert pacer.in_flight == len(sent)


RAW_ECHO = """
import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    if m.get("method") == "initialize":
        r = {"protocolVersion": m["params"]["protocolVersion"], "capabilities": {"tools": {}},
             "serverInfo": {"name": "raw", "version": "1"}}
    else:
        r = {"echo": m.get("params")}
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}) + "\\n")
    sys.stdout.flush()
"""


async def test_a_stdio_channel_leaves_the_childs_output_unread_for_the_window() -> None:
    """With ``pace`` giving a delay, an answer that comes meanwhile waits in the pipe until the hold
    ends (then arrives, whole); with a pace of 0, or none, it is read at once."""
    ch = StdioChannel("raw", "legacy", lambda channel, events: None, sys.executable, ["-c", RAW_ECHO])
    await ch.start()
    try:
        await asyncio.wait_for(ch.ready.wait(), 30)
        for hold in (1.0, 0.0, None):
            paced: list[float] = []

            def pace(read: int, hold: float | None = hold, paced: list[float] = paced) -> float:
                assert 0 < read < 1000  # the bytes just read: one small answer
                paced.append(time.monotonic())
                return hold if hold and len(paced) == 1 else 0.0

            ch.pace = pace if hold is not None else None
            first = await ch.call("tools/call", {"n": 1}, wait=10)  # read, then (if held) 1 s unread
            sent = time.monotonic()
            second = await ch.call("tools/call", {"n": 2}, wait=10)
            took = time.monotonic() - sent
            assert first == {"echo": {"n": 1}} and second == {"echo": {"n": 2}}
            assert len(paced) == (0 if hold is None else 2)  # asked after each read
            if hold:
                assert took >= 0.8, took  # it waited out the hold (not a speed target)
            else:
                assert took < 0.8, took  # read at once (a bound a loaded machine keeps by far)
    finally:
        await ch.close()

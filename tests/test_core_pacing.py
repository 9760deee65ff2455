"""Read coalescing under load (core/pacing.py): when a gateway or a connector holds its reads of a
stdio server's output, and when never.

The rule is sans-IO (times are plain numbers; a model checks every sequence hypothesis makes); then a
real stdio channel keeping its pacer, and a real gateway holding its reads while a server queues."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_bastion.auth.identity import ANONYMOUS
from mcp_bastion.config import parse_server
from mcp_bastion.core import jsonrpc as rpc
from mcp_bastion.core.pacing import MAX_WINDOWS, QUEUED_AFTER, SMALL_READ, SMOOTHING, Pacer, link_delay
from mcp_bastion.hub import ServerEntry
from mcp_bastion.upstream.stdio import StdioChannel
from tests.conftest import NOTES_SERVER, GatewayFactory, servers_file
from tests.support.external import stop_process
from tests.test_identity_routing import Collector

STUBBORN = str(Path(__file__).parent / "servers" / "stubborn_server.py")

W = 0.002


def queueing(window: float = W, calls: int = 10, gap: float = 0.004) -> tuple[Pacer, float]:
    """A server taking ``gap`` per call, ``calls`` sent 1 ms apart, the first answered just now at
    50 ms: ``calls - 1`` in flight, the oldest (sent at 1 ms) has waited 49 ms."""
    pacer = Pacer(window)
    for k in range(calls):
        pacer.sent(k, 0.001 * k)
    now = 0.05
    pacer.answered(0, now)
    pacer.gap = gap  # as if measured over many answers (the running mean: its own test below)
    return pacer, now


def test_holds_a_quarter_of_the_queues_work_while_a_server_queues() -> None:
    pacer, now = queueing()
    assert pacer.in_flight == 9
    # 8 calls wait behind the one the server works on, 4 ms each: 32 ms of work; waited 49 ms
    assert pacer.delay(now) == pytest.approx(0.032 / QUEUED_AFTER)
    assert pacer.delay(now + 0.008) == pytest.approx(0.008)  # an answer within the hold still counts
    assert pacer.delay(now + 0.0081) == 0  # answers stopped coming: not a queue
    assert pacer.delay(now, SMALL_READ) == pytest.approx(0.008)
    assert pacer.delay(now, SMALL_READ + 1) == 0  # a large read is a batch: holding would fill the pipe


def test_the_hold_is_bounded_by_the_oldest_wait_and_by_max_windows() -> None:
    young = Pacer(W)  # the queue's work is long, the oldest call has waited only 10 ms
    for k in range(10):
        young.sent(k, 0.04 + 0.0001 * k)
    young.answered(0, 0.05)
    young.gap = 0.004
    assert young.delay(0.05) == pytest.approx((0.05 - 0.0401) / QUEUED_AFTER)
    slow, now = queueing(gap=0.1)  # 800 ms of work, but the oldest waited 49 ms
    assert slow.delay(now) == pytest.approx(0.049 / QUEUED_AFTER)
    later = 2.0
    slow.answered(1, later)
    slow.gap = 0.1
    assert slow.delay(later) == pytest.approx(MAX_WINDOWS * W)  # waited 2 s: at most 8 windows


def test_never_holds_less_than_a_window_or_otherwise() -> None:
    quick, now = queueing(gap=0.0002)  # a fast server: 1.6 ms of work queued, a 0.4 ms hold
    assert quick.delay(now) == 0
    assert Pacer(0.0).delay(1.0) == 0  # off
    pacer, now = queueing(0.0)
    assert pacer.delay(now) == 0  # off, even while queueing
    one = Pacer(W)  # a single call in flight, however long it has waited
    one.sent("a", 0.0)
    one.sent("b", 0.0)
    one.answered("a", 1.0)
    one.gap = 0.004
    assert one.delay(1.0) == 0
    fresh, _ = queueing()  # the oldest call has not waited QUEUED_AFTER windows yet
    assert fresh.delay(0.001 + QUEUED_AFTER * W - 0.0001) == 0
    quiet = Pacer(W)  # calls wait, but no answer came: one long call is not a queue
    for k in range(5):
        quiet.sent(k, 0.0)
    quiet.gap = 0.004
    assert quiet.delay(1.0) == 0


def test_the_gap_is_the_running_mean_time_between_answers() -> None:
    pacer = Pacer(W)
    for k in range(200):
        pacer.sent(k, 0.0)
    for k in range(100):
        pacer.answered(k, 1.0 + 0.003 * k)  # one answer every 3 ms
    assert pacer.gap == pytest.approx(0.003, rel=1e-3)
    for k in range(100, 110):  # ten answers at once (read in one batch): the mean barely moves...
        pacer.answered(k, 1.5)
    batch = pacer.gap
    assert 0.0005 < batch < 0.003
    pacer.answered(110, 100.0)  # ...and an idle spell counts as the longest hold, not as work
    assert pacer.gap == pytest.approx(batch + (MAX_WINDOWS * W - batch) * SMOOTHING)
    pacer.answered("unknown", 101.0)
    pacer.forget(111)
    assert pacer.gap == pytest.approx(batch + (MAX_WINDOWS * W - batch) * SMOOTHING)  # not answers


def test_hold_counts_the_reads_it_holds() -> None:
    pacer, now = queueing()
    assert pacer.hold(now, 100) > 0 and pacer.held == 1
    assert pacer.hold(now, SMALL_READ + 1) == 0 and pacer.held == 1  # not held: not counted
    assert pacer.delay(now) > 0 and pacer.held == 1  # asking (the link's rule) is not holding


def test_a_cancelled_call_is_not_an_answer_and_unknown_keys_are_ignored() -> None:
    pacer, now = queueing()
    pacer.forget(1)
    pacer.answered("zzz", now)  # not in flight: not an answer either
    assert pacer.in_flight == 8
    # the oldest is now the call sent at 2 ms; 7 wait behind it
    assert pacer.delay(now) == pytest.approx(7 * 0.004 / QUEUED_AFTER)
    pacer.clear()
    assert pacer.in_flight == 0 and pacer.delay(now) == 0


def test_a_key_sent_again_counts_from_its_new_time() -> None:
    pacer, now = queueing(calls=4, gap=0.1)  # hold bounded by the oldest call's wait
    assert pacer.delay(now) == pytest.approx(0.049 / QUEUED_AFTER)
    pacer.sent(1, 0.03)  # again: the call sent at 2 ms is now the oldest
    assert pacer.delay(now) == pytest.approx(0.048 / QUEUED_AFTER)


def test_the_link_is_held_only_while_every_busy_server_queues() -> None:
    busy, now = queueing()
    shorter, _ = queueing(gap=0.003)
    idle = Pacer(W)
    assert link_delay([], now) == 0
    assert link_delay([idle], now) == 0
    assert link_delay([busy, idle], now) == pytest.approx(0.008)  # nothing in flight: not counted
    assert link_delay([busy, idle], now, SMALL_READ + 1) == 0
    assert link_delay(iter([busy, shorter]), now) == pytest.approx(0.006)  # the shortest hold of them
    quick = Pacer(W)  # a call in flight to a server that is not queueing: never held for the busy one
    quick.sent("x", now)
    assert link_delay([busy, quick], now) == 0


Op = tuple[str, int, float, int]


@settings(max_examples=500)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["sent", "answered", "forget", "delay"]),
            st.integers(0, 9),
            st.floats(0, 0.02),
            st.sampled_from([0, 100, SMALL_READ, SMALL_READ + 1, 256 * 1024]),
        ),
        max_size=80,
    ),
    st.sampled_from([0.0, 0.001, 0.002, 0.005]),
)
def test_any_sequence_follows_the_rule(ops: list[Op], window: float) -> None:
    pacer = Pacer(window)
    sent: dict[int, float] = {}
    last_answer = float("-inf")
    gap = 0.0
    now = 0.0
    for op, key, step, read in ops:
        now += step
        if op == "sent":
            sent.pop(key, None)
            sent[key] = now  # a key sent again counts from its new time
            pacer.sent(key, now)
        elif op == "answered":
            if sent.pop(key, None) is not None:
                gap += (min(now - last_answer, MAX_WINDOWS * window) - gap) * SMOOTHING
                last_answer = now
            pacer.answered(key, now)
        elif op == "forget":
            sent.pop(key, None)
            pacer.forget(key)
        got = pacer.delay(now, read)
        expected = 0.0
        if window > 0 and read <= SMALL_READ and len(sent) >= 2:
            waited = now - min(sent.values())
            hold = min(waited, (len(sent) - 1) * gap, MAX_WINDOWS * QUEUED_AFTER * window) / QUEUED_AFTER
            if waited >= QUEUED_AFTER * window and hold >= window and now - last_answer <= hold:
                expected = hold
        assert got == pytest.approx(expected), (ops, window)
        assert got == 0 or window <= got <= MAX_WINDOWS * window + 1e-12
        assert pacer.in_flight == len(sent)


RAW_ECHO = """
import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m or m.get("method") == "hang":
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


async def test_a_paced_stdio_channel_keeps_its_calls_in_flight() -> None:
    """``pace_with``: each request the channel writes is in flight until its answer is read; a
    cancellation it writes forgets its call; a child that goes away takes its calls with it."""
    pacer = Pacer(W)
    ch = StdioChannel("raw", "legacy", lambda channel, events: None, sys.executable, ["-c", RAW_ECHO])
    ch.pace_with(pacer)
    await ch.start()
    try:
        await asyncio.wait_for(ch.ready.wait(), 30)
        assert pacer.in_flight == 0  # the handshake's initialize was answered
        answers = await asyncio.gather(*(ch.call("tools/call", {"n": n}, wait=10) for n in range(20)))
        assert answers == [{"echo": {"n": n}} for n in range(20)] and pacer.in_flight == 0
        hung = ch.state.forward_request(None, rpc.request(1, "hang"))
        await ch.send(hung)
        assert pacer.in_flight == 1
        cancel = ch.state.cancel(hung["id"], "given up")
        assert cancel is not None
        await ch.send(cancel)
        assert pacer.in_flight == 0
        await ch.send(ch.state.forward_request(None, rpc.request(2, "hang")))
        assert pacer.in_flight == 1
    finally:
        await ch.close()
    assert pacer.in_flight == 0  # the channel is gone: nothing of it is in flight
    await ch.send(ch.state.forward_request(None, rpc.request(3, "tools/call", {"n": 3})))
    assert pacer.in_flight == 0  # never written (no child): never in flight either


async def queue_up(url: str, sessions: int = 12, calls: int = 8) -> None:
    """Make calls queue at a stubborn server's ``busy`` tool (4 ms per call, one at a time): ``sessions``
    handshake-era sessions calling it in a closed loop; every call must get its own answer."""
    headers = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-11-25"}

    async def caller(client: httpx.AsyncClient, n: int) -> list[str]:
        init = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        }
        r = await client.post(url, json=rpc.request(0, "initialize", init), headers=headers)
        session = {**headers, "mcp-session-id": r.headers["mcp-session-id"]}
        await client.post(url, json=rpc.notification("notifications/initialized"), headers=session)
        texts = []
        for k in range(calls):
            busy = {"name": "busy", "arguments": {"text": f"{n}.{k}", "seconds": 0.004}}
            r = await client.post(url, json=rpc.request(k + 1, "tools/call", busy), headers=session)
            answer = r.json()
            assert answer["id"] == k + 1, answer
            assert "result" in answer, answer
            texts.append(answer["result"]["content"][0]["text"])
        return texts

    async with httpx.AsyncClient(timeout=30) as client:
        texts = await asyncio.gather(*(caller(client, n) for n in range(sessions)))
    assert texts == [[f"{n}.{k}" for k in range(calls)] for n in range(sessions)]


@pytest.mark.parametrize("coalesce_ms", ["2", "0"])
async def test_the_gateway_holds_its_reads_while_a_server_queues(
    gateway: GatewayFactory, tmp_path: Path, coalesce_ms: str
) -> None:
    """A server that works 4 ms per call, one at a time, and 12 sessions calling it in a closed loop:
    calls queue, so the gateway leaves the child's output unread for a window after each read and
    says how often when it stops (``reads_held``); every call still gets its own answer. With
    ``coalesce_ms = 0`` it never holds a read."""
    servers = servers_file(tmp_path, {"busy": {"command": sys.executable, "args": [STUBBORN]}})
    gw = gateway("serve", "--config", str(servers), env={"MCP_BASTION_COALESCE_MS": coalesce_ms})
    await queue_up(f"{gw.base}/servers/busy/mcp")
    stop_process(gw.proc)
    stopped = [json.loads(line) for line in gw.logs().splitlines() if '"gateway_stopped"' in line]
    assert len(stopped) == 1, gw.logs()[-2000:]
    held = stopped[0]["reads_held"]["busy"]
    if coalesce_ms == "0":
        assert held == 0
    else:
        assert held > 0  # 96 calls, 12 waiting at a time: the rule engaged (not a speed target)


@pytest.mark.parametrize("isolation", ["shared", "session"])
async def test_which_gateway_channels_are_paced(isolation: str) -> None:
    """Shared channels are paced, with one pacer per era kept across restarts of the child; a
    session's own child (``isolation = "session"``) is not: a pacer per session would outlive it, and
    one shared by sessions would mix their calls."""
    config = parse_server(
        "notes", {"command": NOTES_SERVER[0], "args": NOTES_SERVER[1:], "isolation": isolation}
    )
    entry = ServerEntry(config, lambda ch, evs: None, coalesce_seconds=W)
    peer = Collector("p", ANONYMOUS, "legacy")
    try:
        ch = await entry.channel("legacy", peer)
        if isolation == "session":
            assert ch.pacer is None and ch.pace is None
            return
        assert ch.pacer is not None and ch.pacer.window == W
        await ch.close()  # as a child that exited: the next call opens a new channel
        again = await entry.channel("legacy", peer)
        assert again is not ch and again.pacer is ch.pacer
        assert entry.reads_held == 0
    finally:
        await entry.close()
        for own in peer.hub_channels.values():
            await own.close()

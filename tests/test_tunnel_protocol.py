"""The tunnel's frame codec and multiplexer, without I/O: every rule, and a stateful model of two ends.

The state machine wires a gateway Mux and a connector Mux back to back through two ordered queues (one
per direction, as the WebSocket is) and interleaves everything at random: opening streams, body writes
of random sizes, responses, ends, resets from either side, readers that consume at their own pace, and
partial deliveries. Whatever happens: every byte arrives in order and exactly once per stream (or the
stream is reset), no sender ever has more bytes in flight than its credit, and nothing raises.
"""

from __future__ import annotations

import contextlib
import struct
from collections import defaultdict
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mcp_bastion.tunnel import protocol as p
from mcp_bastion.tunnel.protocol import FrameType as T

HEAD = ("POST", "/servers/notes/mcp", [("content-type", "application/json")])


def pair(window: int = p.INITIAL_WINDOW) -> tuple[p.Mux, p.Mux]:
    """A gateway and a connector after the HELLO/WELCOME exchange."""
    gw, conn = p.Mux("gateway", initial_window=window), p.Mux("connector", initial_window=window)
    events = deliver(conn.hello("laptop", ["notes"], "test"), gw)
    assert events == [p.Hello("laptop", ["notes"], "test")]
    events = deliver(gw.welcome(["notes"], {"other": "taken"}), conn)
    assert events == [p.Welcome(["notes"], {"other": "taken"})]
    return gw, conn


def deliver(frames: list[bytes], to: p.Mux, now: float = 0.0) -> list[p.Event]:
    out: list[p.Event] = []
    for f in frames:
        out.extend(to.receive(f, now))
    return out


def data_bytes(frames: list[bytes]) -> int:
    return sum(len(f) - 5 for f in frames if f[0] == T.DATA)


# ---- codec ---------------------------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    frame = p.decode(p.encode(T.DATA, 7, b"abc"))
    assert frame == p.Frame(T.DATA, 7, b"abc")
    assert p.encode(T.PING, 0, b"12345678")[:5] == b"\x09\x00\x00\x00\x00"
    with pytest.raises(ValueError, match="exceeds"):
        p.encode(T.DATA, 1, b"x" * (p.MAX_FRAME + 1))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "shorter than"),
        (b"\x05\x00\x00", "shorter than"),
        (b"\x63\x00\x00\x00\x01", "unknown frame type 99"),
        (b"\x05\x00\x00\x00\x00abc", "DATA frame must be on a stream other than 0"),
        (b"\x09\x00\x00\x00\x01" + b"x" * 8, "PING frame must be on stream 0"),
        (b"\x05\x00\x00\x00\x01" + b"x" * (p.MAX_FRAME + 1), "exceeds"),
    ],
)
def test_malformed_frames(raw: bytes, message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.decode(raw)


# ---- handshake and roles ----------------------------------------------------------------------------------


def test_handshake_rules() -> None:
    gw = p.Mux("gateway")
    with pytest.raises(p.ProtocolError, match="before the HELLO"):
        gw.receive(p.encode(T.RESPONSE, 1, b"{}"), 0)
    gw = p.Mux("gateway")
    with pytest.raises(p.ProtocolError, match="version"):
        gw.receive(p.encode(T.HELLO, 0, orjson.dumps({"v": 2, "servers": []})), 0)
    gw = p.Mux("gateway")
    with pytest.raises(p.ProtocolError, match="servers must be a list"):
        gw.receive(p.encode(T.HELLO, 0, orjson.dumps({"v": 1, "servers": "notes"})), 0)
    gw = p.Mux("gateway")
    with pytest.raises(p.ProtocolError, match="not JSON"):
        gw.receive(p.encode(T.HELLO, 0, b"{"), 0)
    conn = p.Mux("connector")
    with pytest.raises(p.ProtocolError, match="HELLO frames go from the connector"):
        conn.receive(p.encode(T.HELLO, 0, orjson.dumps({"v": 1, "servers": []})), 0)
    conn = p.Mux("connector")
    with pytest.raises(p.ProtocolError, match="before the HELLO/WELCOME"):
        conn.receive(p.encode(T.OPEN, 1, orjson.dumps({"method": "GET", "path": "/"})), 0)
    with pytest.raises(ValueError, match="only the gateway"):
        p.Mux("connector").open_stream(*HEAD)
    with pytest.raises(ValueError, match="only the connector"):
        p.Mux("gateway").hello("x", [])
    gw, conn = pair()
    with pytest.raises(p.ProtocolError, match="second WELCOME"):
        conn.receive(p.encode(T.WELCOME, 0, orjson.dumps({"v": 1, "accepted": []})), 0)
    with pytest.raises(p.ProtocolError, match="second HELLO"):
        gw.receive(p.encode(T.HELLO, 0, orjson.dumps({"v": 1, "servers": []})), 0)


def test_a_broken_link_stays_broken() -> None:
    gw, _ = pair()
    with pytest.raises(p.ProtocolError):
        gw.receive(b"\xff", 0)
    with pytest.raises(p.ProtocolError, match="already closed"):
        gw.receive(p.encode(T.PING, 0, b"12345678"), 0)


def test_request_and_response_flow() -> None:
    gw, conn = pair()
    sid, frames = gw.open_stream(*HEAD)
    assert sid == 1
    frames += gw.send_data(sid, b'{"jsonrpc":"2.0"}') + gw.end(sid)
    events = deliver(frames, conn)
    assert events == [
        p.Opened(1, "POST", "/servers/notes/mcp", [("content-type", "application/json")]),
        p.Data(1, b'{"jsonrpc":"2.0"}'),
        p.Ended(1),
    ]
    with pytest.raises(p.StreamClosed, match="response head goes before"):
        conn.send_data(1, b"x")
    frames = conn.respond(1, 200, [("content-type", "text/event-stream")])
    frames += conn.send_data(1, b"data: 1\n\n") + conn.end(1)
    assert 1 not in conn.streams  # both directions ended: forgotten
    events = deliver(frames, gw)
    assert events == [
        p.Response(1, 200, [("content-type", "text/event-stream")]),
        p.Data(1, b"data: 1\n\n"),
        p.Ended(1),
    ]
    assert gw.streams == {}
    sid2, _ = gw.open_stream(*HEAD)
    assert sid2 == 3


def test_stream_rules() -> None:
    gw, conn = pair()
    sid, frames = gw.open_stream(*HEAD)
    deliver(frames, conn)
    with pytest.raises(p.ProtocolError, match="DATA before the head"):
        gw.receive(p.encode(T.DATA, sid, b"x"), 0)
    gw, conn = pair()
    sid, frames = gw.open_stream(*HEAD)
    deliver(frames + gw.end(sid), conn)
    with pytest.raises(p.ProtocolError, match="DATA after END"):
        conn.receive(p.encode(T.DATA, sid, b"x"), 0)
    gw, conn = pair()
    with pytest.raises(p.ProtocolError, match="never opened"):
        gw.receive(p.encode(T.DATA, 5, b"x"), 0)
    gw, conn = pair()
    deliver(gw.open_stream(*HEAD)[1], conn)
    with pytest.raises(p.ProtocolError, match="odd and increasing"):
        conn.receive(p.encode(T.OPEN, 1, orjson.dumps({"method": "GET", "path": "/"})), 0)
    gw, conn = pair()
    with pytest.raises(p.ProtocolError, match="method"):
        conn.receive(p.encode(T.OPEN, 1, orjson.dumps({"method": "G ET", "path": "/"})), 0)
    gw, conn = pair()
    with pytest.raises(p.ProtocolError, match="headers"):
        conn.receive(p.encode(T.OPEN, 1, orjson.dumps({"method": "GET", "path": "/", "headers": [1]})), 0)
    gw, conn = pair()
    sid, frames = gw.open_stream(*HEAD)
    with pytest.raises(p.ProtocolError, match="status"):
        gw.receive(p.encode(T.RESPONSE, sid, orjson.dumps({"status": 42})), 0)
    gw, conn = pair()
    sid, frames = gw.open_stream(*HEAD)
    deliver(frames, conn)
    for bad, message in [
        (b"", "4 bytes"),
        (b"\x00\x00\x00\x00", "positive"),
        (b"\x7f\xff\xff\xff", "overflows"),
    ]:
        g2, c2 = pair()
        s2, f2 = g2.open_stream(*HEAD)
        deliver(f2, c2)
        with pytest.raises(p.ProtocolError, match=message):
            g2.receive(p.encode(T.WINDOW, s2, bad), 0)
    with pytest.raises(p.StreamClosed):
        gw.send_data(99, b"x")


def test_credit_limits_what_is_in_flight() -> None:
    gw, conn = pair()
    sid, frames = gw.open_stream(*HEAD)
    deliver(frames, conn)
    deliver(conn.respond(sid, 200, []), gw)
    body = bytes(range(256)) * 4096  # 1 MiB
    out = conn.send_data(sid, body) + conn.end(sid)
    assert data_bytes(out) == p.INITIAL_WINDOW  # the rest waits for credit; END waits behind it
    assert all(len(f) - 5 <= p.MAX_FRAME for f in out)
    assert conn.queued(sid) == len(body) - p.INITIAL_WINDOW
    chunk = b"".join(e.data for e in deliver(out, gw) if isinstance(e, p.Data))
    received = chunk
    while True:  # the reader consumes what it got; each grant releases as much again
        events = deliver(gw.consumed(sid, len(chunk)), conn)
        assert all(isinstance(e, p.Credit) for e in events)
        more = conn.pending_frames()
        assert more, "the sender is stuck although the reader consumed everything"
        got = deliver(more, gw)
        chunk = b"".join(e.data for e in got if isinstance(e, p.Data))
        received += chunk
        if any(isinstance(e, p.Ended) for e in got):
            break
    assert received == body


def test_data_beyond_credit_is_a_protocol_error() -> None:
    gw, conn = pair()
    sid, frames = gw.open_stream(*HEAD)
    deliver(frames, conn)
    deliver(conn.respond(sid, 200, []), gw)
    for _ in range(p.INITIAL_WINDOW // p.MAX_FRAME):
        gw.receive(p.encode(T.DATA, sid, b"x" * p.MAX_FRAME), 0)
    with pytest.raises(p.ProtocolError, match="exceeds its credit"):
        gw.receive(p.encode(T.DATA, sid, b"x"), 0)


def test_small_consumption_is_batched() -> None:
    gw, conn = pair()
    sid, frames = gw.open_stream(*HEAD)
    deliver(frames, conn)
    assert gw.consumed(sid, 10) == []  # below a quarter window: no WINDOW yet
    frames = gw.consumed(sid, p.INITIAL_WINDOW // 4)
    assert [f[0] for f in frames] == [T.WINDOW]
    assert struct.unpack("!I", frames[0][5:]) == (p.INITIAL_WINDOW // 4 + 10,)


def test_a_widened_stream_takes_more_in_flight_and_grants_per_quarter_of_it() -> None:
    """A PIPE stream's receiver widens its window with one WINDOW frame: the sender (which knows
    only the initial window) may then have that much in flight, and no more."""
    gw, conn = pair()
    sid, frames = gw.open_stream(*HEAD)
    deliver(frames, conn)
    deliver(conn.respond(sid, 200, []), gw)
    wide = 4 * p.INITIAL_WINDOW
    grant = gw.widen(sid, wide)
    assert [f[0] for f in grant] == [T.WINDOW]
    assert struct.unpack("!I", grant[0][5:]) == (wide - p.INITIAL_WINDOW,)
    assert deliver(grant, conn) == [p.Credit(sid)]
    assert gw.widen(sid, wide) == [] and gw.widen(sid, p.INITIAL_WINDOW) == []  # never narrower
    body = b"x" * (wide + 1000)
    out = conn.send_data(sid, body)
    assert data_bytes(out) == wide and conn.queued(sid) == 1000
    deliver(out, gw)  # all of it within the widened window: no protocol error
    with pytest.raises(p.ProtocolError, match="exceeds its credit"):
        gw.receive(p.encode(T.DATA, sid, b"x"), 0)
    assert gw.consumed(sid, p.INITIAL_WINDOW // 4) == []  # a quarter of the wide window, not of 256 KiB
    assert gw.consumed(sid, wide // 4 - p.INITIAL_WINDOW // 4 - 1) == []
    frames = gw.consumed(sid, 1)
    assert [f[0] for f in frames] == [T.WINDOW]
    assert struct.unpack("!I", frames[0][5:]) == (wide // 4,)
    with pytest.raises(ValueError, match="outside"):
        gw.widen(sid, p.MAX_WINDOW + 1)


def test_reset_drops_queued_data_and_late_frames_are_ignored() -> None:
    gw, conn = pair()
    sid, frames = gw.open_stream(*HEAD)
    deliver(frames, conn)
    deliver(conn.respond(sid, 200, []), gw)
    conn.send_data(sid, b"x" * (p.INITIAL_WINDOW + 10))
    assert conn.queued(sid) == 10
    in_flight = conn.pending_frames()
    frames = gw.reset(sid, "client went away")
    assert deliver(frames, conn) == [p.Reset(sid, "client went away")]
    assert conn.queued(sid) == 0 and sid not in conn.streams
    assert deliver(in_flight, gw) == []  # DATA already on its way: ignored, not an error
    assert gw.reset(sid, "again") == []  # resetting a gone stream is a no-op
    with pytest.raises(p.StreamClosed):
        conn.send_data(sid, b"more")


def test_heartbeats_and_dead_links() -> None:
    gw, conn = pair()
    assert conn.ping(1.0) == []  # not due yet
    ping = conn.ping(p.HEARTBEAT_SECONDS)
    assert [f[0] for f in ping] == [T.PING]
    assert deliver(ping, gw, now=p.HEARTBEAT_SECONDS) == []
    pong = gw.pending_frames()
    assert deliver(pong, conn, now=p.HEARTBEAT_SECONDS) == [p.Pong(ping[0][5:])]
    assert not conn.dead(p.HEARTBEAT_SECONDS * 3.5)
    assert conn.dead(p.HEARTBEAT_SECONDS * 4.01)
    with pytest.raises(p.ProtocolError, match="8 bytes"):
        conn.receive(p.encode(T.PING, 0, b"short"), 0)


def test_goaway_and_abort() -> None:
    gw, conn = pair()
    sid, frames = gw.open_stream(*HEAD)
    deliver(frames, conn)
    assert deliver(gw.goaway("revoked"), conn) == [p.GoAway("revoked")]
    assert conn.abort_all("link lost") == [p.Reset(sid, "link lost")]
    assert conn.streams == {}


def test_stream_limit() -> None:
    gw = p.Mux("gateway")
    conn = p.Mux("connector", max_streams=2)
    deliver(conn.hello("c", []), gw)
    deliver(gw.welcome([], {}), conn)
    events = deliver([gw.open_stream(*HEAD)[1][0] for _ in range(3)], conn)
    assert [type(e) for e in events] == [p.Opened, p.Opened]
    assert [f[0] for f in conn.pending_frames()] == [T.RESET]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8), st.sampled_from(["gateway", "connector"]))
def test_garbage_is_a_protocol_error_never_another_exception(blobs: list[bytes], role: str) -> None:
    gw, conn = pair()
    mux = gw if role == "gateway" else conn
    if role == "gateway":
        gw.open_stream(*HEAD)
    for blob in blobs:
        try:
            mux.receive(blob, 0)
        except p.ProtocolError:
            return


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(list(T)),
    st.integers(min_value=0, max_value=9),
    st.one_of(
        st.binary(max_size=12),
        st.dictionaries(
            st.sampled_from(["v", "status", "method", "path", "headers", "reason"]),
            st.integers(-(2**40), 2**40),
        ),
        st.dictionaries(
            st.sampled_from(["v", "servers", "accepted", "refused", "headers", "reason", "method", "path"]),
            st.one_of(st.text(max_size=5), st.lists(st.text(max_size=3), max_size=2), st.none()),
        ),
    ),
    st.sampled_from(["gateway", "connector"]),
)
def test_well_framed_nonsense_is_a_protocol_error(kind: T, sid: int, body: Any, role: str) -> None:
    gw, conn = pair()
    _, frames = gw.open_stream(*HEAD)
    deliver(frames, conn)
    mux = gw if role == "gateway" else conn
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    with contextlib.suppress(p.ProtocolError):
        mux.receive(p.encode(kind, sid, payload), 0)


# ---- the stateful model ---------------------------------------------------------------------------------

WINDOW = 4096


class TwoEnds(RuleBasedStateMachine):
    """A gateway and a connector, back to back, with everything interleaved at random."""

    def __init__(self) -> None:
        super().__init__()
        self.gw, self.conn = pair(WINDOW)
        self.to_conn: list[bytes] = []
        self.to_gw: list[bytes] = []
        # Per direction ("up": gateway -> connector, "down": connector -> gateway) and stream:
        self.sent: dict[str, dict[int, bytearray]] = {
            "up": defaultdict(bytearray),
            "down": defaultdict(bytearray),
        }
        self.got: dict[str, dict[int, bytearray]] = {
            "up": defaultdict(bytearray),
            "down": defaultdict(bytearray),
        }
        self.consumed: dict[str, dict[int, int]] = {"up": defaultdict(int), "down": defaultdict(int)}
        self.emitted: dict[str, dict[int, int]] = {"up": defaultdict(int), "down": defaultdict(int)}
        self.granted: dict[str, dict[int, int]] = {"up": defaultdict(int), "down": defaultdict(int)}
        self.ended_sent: dict[str, set[int]] = {"up": set(), "down": set()}
        self.ended_got: dict[str, set[int]] = {"up": set(), "down": set()}
        self.reset: set[int] = set()
        self.opened_at_conn: set[int] = set()
        self.responded: set[int] = set()
        self.streams: list[int] = []
        self.counter = 0

    # ---- bookkeeping ----
    def _out(self, frames: list[bytes], direction: str) -> None:
        for f in frames:
            frame = p.decode(f)
            if frame.type is T.DATA:
                self.emitted[direction][frame.stream] += len(frame.payload)
        (self.to_conn if direction == "up" else self.to_gw).extend(frames)

    def _chunk(self, n: int) -> bytes:
        out = bytes((self.counter + i) % 251 for i in range(n))
        self.counter += n
        return out

    def _live(self, sid: int) -> bool:
        return sid not in self.reset

    # ---- gateway side ----
    @rule()
    def open_stream(self) -> None:
        sid, frames = self.gw.open_stream(*HEAD)
        self.streams.append(sid)
        self._out(frames, "up")

    @precondition(lambda self: self.streams)
    @rule(data=st.data(), size=st.integers(min_value=1, max_value=3 * WINDOW))
    def gateway_writes(self, data: st.DataObject, size: int) -> None:
        sid = data.draw(st.sampled_from(self.streams))
        if not self._live(sid) or sid in self.ended_sent["up"] or sid not in self.gw.streams:
            return
        body = self._chunk(size)
        self.sent["up"][sid] += body
        self._out(self.gw.send_data(sid, body), "up")

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def gateway_ends(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(self.streams))
        if not self._live(sid) or sid in self.ended_sent["up"] or sid not in self.gw.streams:
            return
        self.ended_sent["up"].add(sid)
        self._out(self.gw.end(sid), "up")

    # ---- connector side ----
    @precondition(lambda self: self.opened_at_conn - self.responded)
    @rule(data=st.data(), status=st.sampled_from([200, 202, 404]))
    def connector_responds(self, data: st.DataObject, status: int) -> None:
        sid = data.draw(st.sampled_from(sorted(self.opened_at_conn - self.responded)))
        self.responded.add(sid)
        if sid not in self.conn.streams:
            return
        self._out(self.conn.respond(sid, status, [("content-type", "application/json")]), "down")

    @precondition(lambda self: self.responded)
    @rule(data=st.data(), size=st.integers(min_value=1, max_value=3 * WINDOW))
    def connector_writes(self, data: st.DataObject, size: int) -> None:
        sid = data.draw(st.sampled_from(sorted(self.responded)))
        if not self._live(sid) or sid in self.ended_sent["down"] or sid not in self.conn.streams:
            return
        body = self._chunk(size)
        self.sent["down"][sid] += body
        self._out(self.conn.send_data(sid, body), "down")

    @precondition(lambda self: self.responded)
    @rule(data=st.data())
    def connector_ends(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.responded)))
        if not self._live(sid) or sid in self.ended_sent["down"] or sid not in self.conn.streams:
            return
        self.ended_sent["down"].add(sid)
        self._out(self.conn.end(sid), "down")

    # ---- either side ----
    @precondition(lambda self: self.streams)
    @rule(data=st.data(), side=st.sampled_from(["gateway", "connector"]))
    def reset_stream(self, data: st.DataObject, side: str) -> None:
        sid = data.draw(st.sampled_from(self.streams))
        mux = self.gw if side == "gateway" else self.conn
        if sid in mux.streams:
            self.reset.add(sid)
        self._out(mux.reset(sid, "test reset"), "up" if side == "gateway" else "down")

    @precondition(lambda self: self.streams)
    @rule(data=st.data(), direction=st.sampled_from(["up", "down"]), factor=st.integers(1, 4))
    def reader_widens(self, data: st.DataObject, direction: str, factor: int) -> None:
        """A receiver raises a stream's window (as both ends of a PIPE do) at any point."""
        sid = data.draw(st.sampled_from(self.streams))
        reader = self.conn if direction == "up" else self.gw
        self._out(reader.widen(sid, WINDOW * factor), "down" if direction == "up" else "up")

    @rule(data=st.data(), direction=st.sampled_from(["up", "down"]))
    def reader_consumes(self, data: st.DataObject, direction: str) -> None:
        waiting = [s for s, b in self.got[direction].items() if len(b) > self.consumed[direction][s]]
        if not waiting:
            return
        sid = data.draw(st.sampled_from(sorted(waiting)))
        available = len(self.got[direction][sid]) - self.consumed[direction][sid]
        n = data.draw(st.integers(min_value=1, max_value=available))
        self.consumed[direction][sid] += n
        reader = self.conn if direction == "up" else self.gw
        self._out(reader.consumed(sid, n), "down" if direction == "up" else "up")

    @rule(count=st.integers(min_value=1, max_value=6), direction=st.sampled_from(["up", "down"]))
    def deliver_some(self, count: int, direction: str) -> None:
        queue = self.to_conn if direction == "up" else self.to_gw
        batch, queue[:] = queue[:count], queue[count:]
        receiver = self.conn if direction == "up" else self.gw
        back = "down" if direction == "up" else "up"
        for frame in batch:
            raw = p.decode(frame)
            if raw.type is T.WINDOW and raw.stream in receiver.streams:
                self.granted[back][raw.stream] += struct.unpack("!I", raw.payload)[0]
            for ev in receiver.receive(frame, 0):
                self._event(ev, direction)
            self._out(receiver.pending_frames(), back)

    def _event(self, ev: p.Event, direction: str) -> None:
        if isinstance(ev, p.Opened):
            self.opened_at_conn.add(ev.stream)
        elif isinstance(ev, p.Data):
            self.got[direction][ev.stream] += ev.data
            sent = self.sent[direction][ev.stream]
            got = self.got[direction][ev.stream]
            assert bytes(got) == bytes(sent[: len(got)]), "bytes out of order, duplicated or corrupted"
        elif isinstance(ev, p.Ended):
            assert ev.stream not in self.ended_got[direction], "END delivered twice"
            self.ended_got[direction].add(ev.stream)
            assert bytes(self.got[direction][ev.stream]) == bytes(self.sent[direction][ev.stream])
        elif isinstance(ev, p.Reset):
            self.reset.add(ev.stream)

    # ---- invariants ----
    @invariant()
    def no_sender_exceeds_its_credit(self) -> None:
        for direction in ("up", "down"):
            for sid, n in self.emitted[direction].items():
                assert n <= WINDOW + self.granted[direction][sid], (direction, sid, n)

    @invariant()
    def received_is_a_prefix_of_sent(self) -> None:
        for direction in ("up", "down"):
            for sid, got in self.got[direction].items():
                assert len(got) <= len(self.sent[direction][sid])

    def teardown(self) -> None:
        # Drain everything, with readers consuming all they get: every stream that was not reset and
        # whose sender ended has delivered all its bytes; nothing is stuck behind credit.
        for _ in range(10_000):
            moved = bool(self.to_conn or self.to_gw)
            self.deliver_some(len(self.to_conn) or 1, "up")
            self.deliver_some(len(self.to_gw) or 1, "down")
            for direction in ("up", "down"):
                reader = self.conn if direction == "up" else self.gw
                for sid, got in list(self.got[direction].items()):
                    n = len(got) - self.consumed[direction][sid]
                    if n:
                        self.consumed[direction][sid] += n
                        self._out(reader.consumed(sid, n), "down" if direction == "up" else "up")
                        moved = True
            if not moved:
                break
        for direction in ("up", "down"):
            for sid in self.ended_sent[direction]:
                if sid not in self.reset:
                    assert sid in self.ended_got[direction], f"stream {sid} {direction} never ended"
                    assert bytes(self.got[direction][sid]) == bytes(self.sent[direction][sid])


TwoEnds.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_two_ends = TwoEnds.TestCase


# ---- batches and the announced heartbeat ----------------------------------------------------------------


def test_batches_carry_frames_in_order_and_bad_batches_are_refused() -> None:
    gw, conn = pair()
    sid, frames = gw.open_stream(*HEAD)
    frames += gw.send_data(sid, b"x" * (p.MAX_FRAME + 10))  # two DATA frames
    frames += gw.end(sid)
    assert p.pack(frames[:1]) == frames[:1]  # a lone frame goes out as it is
    messages = p.pack(frames)
    assert len(messages) == 1 and messages[0][0] == T.BATCH and len(messages[0]) <= p.MAX_MESSAGE
    events = deliver(messages, conn)
    assert [type(e) for e in events] == [p.Opened, p.Data, p.Data, p.Ended]
    assert sum(len(e.data) for e in events if isinstance(e, p.Data)) == p.MAX_FRAME + 10
    # More than a message holds: several batches, every frame once, in order.
    many = [p.encode(T.DATA, 1, b"y" * p.MAX_FRAME) for _ in range(5)]
    packed = p.pack(many)
    assert len(packed) > 1 and all(len(m) <= p.MAX_MESSAGE for m in packed)
    frames_out = [f for m in map(p.decode, packed) for f in (p.unbatch(m) if m.type is T.BATCH else [m])]
    assert frames_out == [p.decode(f) for f in many]
    batch = p.pack([p.encode(T.PING, 0, b"12345678")] * 2)[0]
    for raw, message in (
        (p.encode(T.BATCH, 0, b""), "empty BATCH"),
        (p.encode(T.BATCH, 0, b"\x00\x00"), "cut short"),
        (p.encode(T.BATCH, 0, b"\x00\x00\x00\x09\x09"), "longer than"),
        (p.encode(T.BATCH, 0, struct.pack("!I", len(batch)) + batch), "BATCH inside BATCH"),
        (p.encode(T.BATCH, 0, struct.pack("!I", 1) + b"\x09"), "shorter than"),
    ):
        _, c2 = pair()
        with pytest.raises(p.ProtocolError, match=message):
            c2.receive(raw, 0)


def test_the_gateway_adopts_the_connectors_heartbeat_within_bounds() -> None:
    for announced, adopted in ((3.0, 3.0), (0.1, 1.0), (600, 60.0)):
        gw, conn = p.Mux("gateway"), p.Mux("connector", heartbeat_seconds=announced)
        (hello,) = deliver(conn.hello("laptop", ["notes"]), gw)
        assert isinstance(hello, p.Hello) and hello.heartbeat == adopted
        assert gw.heartbeat_seconds == adopted
        assert gw.dead(3 * adopted + 0.5) and not gw.dead(3 * adopted - 0.5)
    gw = p.Mux("gateway")
    with pytest.raises(p.ProtocolError, match="heartbeat"):
        gw.receive(p.encode(T.HELLO, 0, orjson.dumps({"v": 1, "servers": [], "heartbeat": "fast"})), 0)


# ---- PIPE streams: newline-delimited messages in arbitrary chunks ------------------------------------


@given(
    st.lists(st.dictionaries(st.text(max_size=8), st.text(max_size=40), max_size=4), min_size=1, max_size=12),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=40),
    st.sampled_from([0, 48, 16 * 1024]),
)
def test_pipe_lines_survive_any_chunking(
    messages: list[dict[str, str]], cuts: list[int], copy_below: int
) -> None:
    """However the link cuts the byte stream, the reader gets every message once, whole, in order
    (lines as copies or as views of their chunk: ``copy_below`` 0 takes views of every chunk)."""
    from mcp_bastion.core.lines import Lines

    data = b"".join(orjson.dumps(m) + b"\n" for m in messages)
    lines = Lines(copy_below=copy_below)
    got: list[Any] = []
    at, i = 0, 0
    while at < len(data):
        size = cuts[i % len(cuts)]
        got += [orjson.loads(line) for line in lines.feed(data[at : at + size])]
        at += size
        i += 1
    assert got == messages


def test_pipe_line_without_end_is_refused() -> None:
    """A line that never ends is dropped as it grows past the limit (never buffered whole), and the
    pipe's reader resets the stream on it."""
    from mcp_bastion.core.lines import MAX_LINE, Lines

    lines = Lines()
    chunk = b"x" * (1024 * 1024)
    for _ in range(MAX_LINE // len(chunk) + 2):
        assert lines.feed(chunk) == []
    assert lines.dropped == 1
    assert sum(len(p) for p in lines._parts) == 0


@given(
    st.lists(st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=12),
    st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=20),
    st.sampled_from([0, 8, 16 * 1024]),
)
def test_lines_drop_only_what_is_too_long(pieces: list[bytes], cuts: list[int], copy_below: int) -> None:
    """With a small limit: every line within it arrives whole and in order, every longer one is
    dropped and counted, whatever the chunking (a stdio child's overlong line is skipped, not fatal);
    blank and whitespace-only lines are skipped; alike as copies and as views."""
    from mcp_bastion.core.lines import Lines

    limit = 10
    data = b"".join(piece + b"\n" for piece in pieces)
    lines = Lines(limit, copy_below=copy_below)
    got: list[bytes] = []
    at, i = 0, 0
    while at < len(data):
        size = cuts[i % len(cuts)]
        got += [bytes(line).rstrip(b"\n") for line in lines.feed(data[at : at + size])]
        at += size
        i += 1
    assert got == [p for p in pieces if len(p) <= limit and p.strip()]
    assert lines.dropped == sum(1 for p in pieces if len(p) > limit)

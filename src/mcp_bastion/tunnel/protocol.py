"""The tunnel's wire format and its sans-IO multiplexer (docs/internals/tunnel.md).

One WebSocket binary message is one frame: ``type (1 byte) | stream id (4 bytes, big endian) | payload``.
:class:`Mux` does no I/O and keeps no clock of its own: it turns what the application wants into
frames and frames from the peer into events, enforcing frame sizes and per-stream credit, so the
rules can be tested exhaustively without sockets. Everything the peer can get wrong ends in a
:class:`ProtocolError` with a clear message, never another exception.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal

import orjson

VERSION = 1
MAX_FRAME = 64 * 1024  # payload bytes per frame
MAX_MESSAGE = 128 * 1024  # WebSocket message limit on both ends (a frame plus room)
INITIAL_WINDOW = 256 * 1024  # credit per stream per direction
MAX_WINDOW = 2**31 - 1
HEARTBEAT_SECONDS = 10.0
HEARTBEAT_BOUNDS = (1.0, 60.0)  # the gateway follows the connector's announced interval within these
DEAD_AFTER_INTERVALS = 3
MAX_STREAMS = 4096  # concurrent streams a connector accepts; more are reset
_HEADER = struct.Struct("!BI")
_U32 = struct.Struct("!I")

Role = Literal["gateway", "connector"]


class FrameType(IntEnum):
    HELLO = 1
    WELCOME = 2
    OPEN = 3
    RESPONSE = 4
    DATA = 5
    END = 6
    RESET = 7
    WINDOW = 8
    PING = 9
    PONG = 10
    GOAWAY = 11
    BATCH = 12


CONNECTION_FRAMES = frozenset(
    {FrameType.HELLO, FrameType.WELCOME, FrameType.PING, FrameType.PONG, FrameType.GOAWAY, FrameType.BATCH}
)
BATCH_LIMIT = MAX_MESSAGE - 5  # payload bytes of one BATCH frame


class ProtocolError(Exception):
    """The peer broke the tunnel protocol: the link must be closed (the message says how)."""


class StreamClosed(Exception):
    """The application used a stream that is reset, finished, or never existed."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    stream: int
    payload: bytes = b""


def encode(kind: FrameType, stream: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(kind, stream) + payload


def decode(data: bytes) -> Frame:
    """One frame from one message; raises ProtocolError for anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("a frame must be a binary message")
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise ProtocolError(f"frame of {len(data)} bytes is shorter than its {_HEADER.size}-byte header")
    raw_type, stream = _HEADER.unpack_from(data)
    limit = BATCH_LIMIT if raw_type == FrameType.BATCH else MAX_FRAME
    if len(data) - _HEADER.size > limit:
        raise ProtocolError(f"frame payload of {len(data) - _HEADER.size} bytes exceeds {limit}")
    try:
        kind = FrameType(raw_type)
    except ValueError:
        raise ProtocolError(f"unknown frame type {raw_type}") from None
    if (kind in CONNECTION_FRAMES) != (stream == 0):
        where = "stream 0" if kind in CONNECTION_FRAMES else "a stream other than 0"
        raise ProtocolError(f"{kind.name} frame must be on {where}, not stream {stream}")
    return Frame(kind, stream, data[_HEADER.size :])


def pack(frames: list[bytes]) -> list[bytes]:
    """Messages for frames, in order: runs of frames go out as BATCH frames (one WebSocket message,
    one write, one wake-up of the peer for many frames); a frame on its own goes out as it is."""
    if len(frames) < 2:
        return list(frames)
    out: list[bytes] = []
    run: list[bytes] = []
    size = 0
    for frame in frames:
        if run and size + 4 + len(frame) > BATCH_LIMIT:
            out.append(_batch(run))
            run, size = [], 0
        run.append(frame)
        size += 4 + len(frame)
    out.append(_batch(run))
    return out


def _batch(run: list[bytes]) -> bytes:
    if len(run) == 1:
        return run[0]
    parts = [_HEADER.pack(FrameType.BATCH, 0)]
    for frame in run:
        parts.append(_U32.pack(len(frame)))
        parts.append(frame)
    return b"".join(parts)


def unbatch(frame: Frame) -> list[Frame]:
    """The frames inside a BATCH frame (each ``length (4 bytes) | frame``), in order."""
    data = frame.payload
    frames: list[Frame] = []
    at = 0
    while at < len(data):
        if at + 4 > len(data):
            raise ProtocolError("BATCH entry cut short")
        (n,) = _U32.unpack_from(data, at)
        at += 4
        if at + n > len(data):
            raise ProtocolError("BATCH entry longer than the BATCH")
        inner = decode(data[at : at + n])
        at += n
        if inner.type is FrameType.BATCH:
            raise ProtocolError("BATCH inside BATCH")
        frames.append(inner)
    if not frames:
        raise ProtocolError("empty BATCH")
    return frames


def _json(frame: Frame) -> dict[str, Any]:
    try:
        value = orjson.loads(frame.payload)
    except orjson.JSONDecodeError:
        raise ProtocolError(f"{frame.type.name} payload is not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{frame.type.name} payload must be a JSON object")
    return value


def _headers(frame: Frame, head: dict[str, Any]) -> list[tuple[str, str]]:
    raw = head.get("headers", [])
    if not isinstance(raw, list) or not all(
        isinstance(h, list) and len(h) == 2 and isinstance(h[0], str) and isinstance(h[1], str) for h in raw
    ):
        raise ProtocolError(f"{frame.type.name} headers must be a list of [name, value] strings")
    return [(k, v) for k, v in raw]


def _reason(frame: Frame) -> str:
    if not frame.payload:
        return ""
    reason = _json(frame).get("reason", "")
    if not isinstance(reason, str):
        raise ProtocolError(f"{frame.type.name} reason must be a string")
    return reason[:500]


def _names(frame: Frame, value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ProtocolError(f"{frame.type.name} {what} must be a list of strings")
    return list(value)


# ---- events ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """The connector introduced itself (gateway side)."""

    connector: str
    servers: list[str]
    software: str
    heartbeat: float = HEARTBEAT_SECONDS  # the connector's interval (bounded): the gateway adopts it


@dataclass(frozen=True, slots=True)
class Welcome:
    """The gateway's answer to HELLO (connector side)."""

    accepted: list[str]
    refused: dict[str, str]


@dataclass(frozen=True, slots=True)
class Opened:
    """The gateway opened a stream: one HTTP request (connector side)."""

    stream: int
    method: str
    path: str
    headers: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Response:
    """The response head of a stream (gateway side)."""

    stream: int
    status: int
    headers: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Data:
    stream: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Ended:
    """The peer sends no more DATA on this stream."""

    stream: int


@dataclass(frozen=True, slots=True)
class Reset:
    """The stream was aborted (by the peer, or locally because the link is going away)."""

    stream: int
    reason: str


@dataclass(frozen=True, slots=True)
class Credit:
    """The peer granted credit on a stream: queued data may have gone out, writers may go on."""

    stream: int


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class GoAway:
    reason: str


Event = Hello | Welcome | Opened | Response | Data | Ended | Reset | Credit | Pong | GoAway


# ---- the multiplexer -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Stream:
    id: int
    send_credit: int
    recv_window: int  # bytes the peer may still send before our next WINDOW
    window: int  # this end's whole receive window (WINDOW goes out per quarter of it)
    unacked: int = 0  # bytes consumed by the application but not yet granted back
    queue: deque[bytes] = field(default_factory=deque)
    queued: int = 0
    head_sent: bool = False
    head_received: bool = False
    end_queued: bool = False
    sent_end: bool = False
    remote_ended: bool = False


class Mux:
    """The state of one tunnel link, on either end, without I/O.

    Methods that the application calls append frames to an outbox and return everything in it, in
    order; :meth:`receive` returns events and leaves any frames it causes (PONG, queued DATA that new
    credit released) in the outbox for :meth:`pending_frames`. Streams are opened by the gateway only
    (odd ids, increasing). Credit is per stream and direction: a sender never has more DATA bytes
    unacknowledged than the peer granted, so a reader that stops reading stalls only its own stream.
    """

    def __init__(
        self,
        role: Role,
        *,
        initial_window: int = INITIAL_WINDOW,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        max_streams: int = MAX_STREAMS,
        now: float = 0.0,
    ) -> None:
        if not 0 < initial_window <= MAX_WINDOW:
            raise ValueError("initial_window must be positive and below 2**31")
        self.role: Role = role
        self.initial_window = initial_window
        self.heartbeat_seconds = heartbeat_seconds
        self.max_streams = max_streams
        self.streams: dict[int, _Stream] = {}
        self._outbox: list[bytes] = []
        self._next_id = 1  # gateway: the next id to open
        self._last_id = 0  # the highest stream id ever used on this link
        self._handshaken = False
        self._hello_seen = False
        self._broken = False
        self._last_received = now
        self._last_ping = now
        self._ping_count = 0

    # ---- outbox ------------------------------------------------------------------------------------
    def pending_frames(self) -> list[bytes]:
        """Every frame waiting to be sent, oldest first; the outbox is empty afterwards."""
        out, self._outbox = self._outbox, []
        return out

    def _new_stream(self, sid: int, *, head_sent: bool = False, head_received: bool = False) -> _Stream:
        w = self.initial_window
        return _Stream(
            sid, send_credit=w, recv_window=w, window=w, head_sent=head_sent, head_received=head_received
        )

    def _emit(self, kind: FrameType, stream: int, payload: bytes = b"") -> None:
        self._outbox.append(encode(kind, stream, payload))

    def _emit_json(self, kind: FrameType, stream: int, value: dict[str, Any]) -> None:
        payload = orjson.dumps(value)
        if len(payload) > MAX_FRAME:
            raise ValueError(f"{kind.name} of {len(payload)} bytes exceeds the {MAX_FRAME}-byte frame limit")
        self._emit(kind, stream, payload)

    # ---- connection frames ---------------------------------------------------------------------------
    def hello(self, connector: str, servers: list[str], software: str = "") -> list[bytes]:
        self._need("connector", "send HELLO")
        self._emit_json(
            FrameType.HELLO,
            0,
            {
                "v": VERSION,
                "connector": connector,
                "servers": servers,
                "software": software,
                "heartbeat": self.heartbeat_seconds,
            },
        )
        return self.pending_frames()

    def welcome(self, accepted: list[str], refused: dict[str, str]) -> list[bytes]:
        self._need("gateway", "send WELCOME")
        self._emit_json(FrameType.WELCOME, 0, {"v": VERSION, "accepted": accepted, "refused": refused})
        self._handshaken = True
        return self.pending_frames()

    def goaway(self, reason: str) -> list[bytes]:
        self._emit_json(FrameType.GOAWAY, 0, {"reason": reason[:500]})
        return self.pending_frames()

    def ping(self, now: float) -> list[bytes]:
        """A PING when one is due (every ``heartbeat_seconds``); frames to send, possibly none."""
        if now - self._last_ping >= self.heartbeat_seconds:
            self._last_ping = now
            self._ping_count += 1
            self._emit(FrameType.PING, 0, struct.pack("!Q", self._ping_count))
        return self.pending_frames()

    def dead(self, now: float) -> bool:
        """True when nothing at all came from the peer for three heartbeat intervals."""
        return now - self._last_received > DEAD_AFTER_INTERVALS * self.heartbeat_seconds

    # ---- streams (application side) --------------------------------------------------------------
    def open_stream(self, method: str, path: str, headers: list[tuple[str, str]]) -> tuple[int, list[bytes]]:
        """Gateway: a new stream carrying one request head."""
        self._need("gateway", "open streams")
        sid = self._next_id
        if sid > 0xFFFFFFFF:
            raise StreamClosed("stream ids exhausted on this link")
        self._emit_json(
            FrameType.OPEN, sid, {"method": method, "path": path, "headers": [[k, v] for k, v in headers]}
        )
        self._next_id += 2
        self._last_id = sid
        st = self._new_stream(sid, head_sent=True)
        self.streams[sid] = st
        return sid, self.pending_frames()

    def respond(self, sid: int, status: int, headers: list[tuple[str, str]]) -> list[bytes]:
        """Connector: the response head of a stream."""
        self._need("connector", "send RESPONSE")
        st = self._stream(sid)
        if st.head_sent:
            raise StreamClosed(f"stream {sid} already has its response head")
        self._emit_json(FrameType.RESPONSE, sid, {"status": status, "headers": [[k, v] for k, v in headers]})
        st.head_sent = True
        return self.pending_frames()

    def send_data(self, sid: int, data: bytes) -> list[bytes]:
        """Body bytes: as much as the credit allows goes out now, the rest waits for WINDOW."""
        st = self._stream(sid)
        if not st.head_sent:
            raise StreamClosed(f"stream {sid}: the response head goes before any data")
        if st.end_queued or st.sent_end:
            raise StreamClosed(f"stream {sid}: data after END")
        view = memoryview(bytes(data))
        for start in range(0, len(view), MAX_FRAME):
            chunk = bytes(view[start : start + MAX_FRAME])
            st.queue.append(chunk)
            st.queued += len(chunk)
        self._drain(st)
        return self.pending_frames()

    def end(self, sid: int) -> list[bytes]:
        """No more data from this side (sent once every queued byte has gone out)."""
        st = self._stream(sid)
        if not st.head_sent:
            raise StreamClosed(f"stream {sid}: the response head goes before END")
        if not (st.end_queued or st.sent_end):
            st.end_queued = True
            self._drain(st)
        return self.pending_frames()

    def reset(self, sid: int, reason: str) -> list[bytes]:
        """Abort a stream; a stream that is already gone is left alone."""
        if self.streams.pop(sid, None) is not None:
            self._emit_json(FrameType.RESET, sid, {"reason": reason[:500]})
        return self.pending_frames()

    def consumed(self, sid: int, n: int) -> list[bytes]:
        """The application took ``n`` received bytes: grant them back (batched, a quarter window)."""
        st = self.streams.get(sid)
        if st is None or st.remote_ended or n <= 0:
            return self.pending_frames()
        st.unacked += n
        if st.unacked >= max(1, st.window // 4):
            self._emit(FrameType.WINDOW, sid, _U32.pack(st.unacked))
            st.recv_window += st.unacked
            st.unacked = 0
        return self.pending_frames()

    def widen(self, sid: int, window: int) -> list[bytes]:
        """Raise a stream's receive window to ``window`` bytes, granting the difference at once.

        For a stream that carries many calls at once (a ``PIPE``: every caller of one server shares it),
        where the initial window would let only a few large messages be in flight and turn each of them
        into a WINDOW round trip. A plain WINDOW frame, so a peer of any version follows it."""
        st = self.streams.get(sid)
        if not self.initial_window <= window <= MAX_WINDOW:
            raise ValueError(f"a window of {window} bytes is outside {self.initial_window}..{MAX_WINDOW}")
        if st is not None and not st.remote_ended and window > st.window:
            extra = window - st.window
            st.window = window
            st.recv_window += extra
            self._emit(FrameType.WINDOW, sid, _U32.pack(extra))
        return self.pending_frames()

    def send_credit(self, sid: int) -> int:
        st = self.streams.get(sid)
        return 0 if st is None else st.send_credit

    def queued(self, sid: int) -> int:
        """Bytes of a stream waiting for credit (0 for a stream that is gone)."""
        st = self.streams.get(sid)
        return 0 if st is None else st.queued

    def abort_all(self, reason: str) -> list[Event]:
        """The link is gone: every open stream ends as reset (no frames: there is nobody to tell)."""
        events: list[Event] = [Reset(sid, reason) for sid in self.streams]
        self.streams.clear()
        self._outbox.clear()
        self._broken = True
        return events

    # ---- receiving ---------------------------------------------------------------------------------
    def receive(self, data: bytes, now: float) -> list[Event]:
        """Events for one frame from the peer; raises ProtocolError when the peer broke the rules."""
        if self._broken:
            raise ProtocolError("the link is already closed")
        try:
            frame = decode(data)
            self._last_received = now
            if frame.type is FrameType.BATCH:
                events: list[Event] = []
                for inner in unbatch(frame):
                    events += self._handle(inner)
                return events
            return self._handle(frame)
        except ProtocolError:
            self._broken = True
            raise

    def _handle(self, frame: Frame) -> list[Event]:
        kind = frame.type
        if kind is FrameType.PING:
            if len(frame.payload) != 8:
                raise ProtocolError("PING payload must be 8 bytes")
            self._emit(FrameType.PONG, 0, frame.payload)
            return []
        if kind is FrameType.PONG:
            if len(frame.payload) != 8:
                raise ProtocolError("PONG payload must be 8 bytes")
            return [Pong(frame.payload)]
        if kind is FrameType.GOAWAY:
            return [GoAway(_reason(frame))]
        if kind is FrameType.HELLO:
            return [self._hello(frame)]
        if kind is FrameType.WELCOME:
            return [self._welcome(frame)]
        if not self._handshaken:
            raise ProtocolError(f"{kind.name} before the HELLO/WELCOME exchange")
        if kind is FrameType.OPEN:
            return self._open(frame)
        st = self._known(frame)
        if st is None:
            return []  # a frame in flight for a stream that was reset meanwhile
        if kind is FrameType.RESPONSE:
            if self.role != "gateway":
                raise ProtocolError("RESPONSE frames go from the connector to the gateway")
            if st.head_received:
                raise ProtocolError(f"second RESPONSE on stream {st.id}")
            head = _json(frame)
            status = head.get("status")
            if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
                raise ProtocolError("RESPONSE status must be an HTTP status code")
            st.head_received = True
            return [Response(st.id, status, _headers(frame, head))]
        if kind is FrameType.DATA:
            if not st.head_received:
                raise ProtocolError(f"DATA before the head on stream {st.id}")
            if st.remote_ended:
                raise ProtocolError(f"DATA after END on stream {st.id}")
            if len(frame.payload) > st.recv_window:
                raise ProtocolError(
                    f"DATA of {len(frame.payload)} bytes on stream {st.id} exceeds its credit "
                    f"of {st.recv_window}"
                )
            st.recv_window -= len(frame.payload)
            return [Data(st.id, frame.payload)] if frame.payload else []
        if kind is FrameType.END:
            if frame.payload:
                raise ProtocolError("END carries no payload")
            if not st.head_received:
                raise ProtocolError(f"END before the head on stream {st.id}")
            if st.remote_ended:
                raise ProtocolError(f"second END on stream {st.id}")
            st.remote_ended = True
            self._maybe_finish(st)
            return [Ended(st.id)]
        if kind is FrameType.RESET:
            reason = _reason(frame)
            del self.streams[st.id]
            return [Reset(st.id, reason or "reset by peer")]
        if kind is FrameType.WINDOW:
            if len(frame.payload) != 4:
                raise ProtocolError("WINDOW payload must be 4 bytes")
            (increment,) = _U32.unpack(frame.payload)
            if increment == 0:
                raise ProtocolError("WINDOW increment must be positive")
            if st.send_credit + increment > MAX_WINDOW:
                raise ProtocolError(f"WINDOW overflows the credit of stream {st.id}")
            st.send_credit += increment
            self._drain(st)
            return [Credit(st.id)]
        raise ProtocolError(f"unexpected {kind.name} frame")  # pragma: no cover - every type is handled

    def _hello(self, frame: Frame) -> Hello:
        if self.role != "gateway":
            raise ProtocolError("HELLO frames go from the connector to the gateway")
        if self._hello_seen:
            raise ProtocolError("second HELLO")
        self._hello_seen = True
        body = _json(frame)
        if body.get("v") != VERSION:
            raise ProtocolError(f"unsupported tunnel protocol version {body.get('v')!r} (this is {VERSION})")
        connector = body.get("connector", "")
        software = body.get("software", "")
        if not isinstance(connector, str) or not isinstance(software, str):
            raise ProtocolError("HELLO connector and software must be strings")
        heartbeat = body.get("heartbeat", self.heartbeat_seconds)
        if not isinstance(heartbeat, int | float) or isinstance(heartbeat, bool) or not heartbeat > 0:
            raise ProtocolError("HELLO heartbeat must be a positive number of seconds")
        # Both ends beat (and notice a silent drop) at the connector's pace, within bounds.
        low, high = HEARTBEAT_BOUNDS
        self.heartbeat_seconds = min(max(float(heartbeat), low), high)
        return Hello(
            connector, _names(frame, body.get("servers"), "servers"), software[:200], self.heartbeat_seconds
        )

    def _welcome(self, frame: Frame) -> Welcome:
        if self.role != "connector":
            raise ProtocolError("WELCOME frames go from the gateway to the connector")
        if self._handshaken:
            raise ProtocolError("second WELCOME")
        body = _json(frame)
        if body.get("v") != VERSION:
            raise ProtocolError(f"unsupported tunnel protocol version {body.get('v')!r} (this is {VERSION})")
        refused = body.get("refused", {})
        if not isinstance(refused, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in refused.items()
        ):
            raise ProtocolError("WELCOME refused must map server names to reasons")
        self._handshaken = True
        return Welcome(_names(frame, body.get("accepted"), "accepted"), dict(refused))

    def _open(self, frame: Frame) -> list[Event]:
        if self.role != "connector":
            raise ProtocolError("OPEN frames go from the gateway to the connector")
        sid = frame.stream
        if sid % 2 == 0 or sid <= self._last_id:
            raise ProtocolError(f"OPEN of stream {sid}: ids are odd and increasing (last {self._last_id})")
        self._last_id = sid
        head = _json(frame)
        method, path = head.get("method"), head.get("path")
        if not isinstance(method, str) or not method.isalpha() or len(method) > 16:
            raise ProtocolError("OPEN method must be an HTTP method")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ProtocolError("OPEN path must start with '/'")
        headers = _headers(frame, head)
        if len(self.streams) >= self.max_streams:
            self._emit_json(FrameType.RESET, sid, {"reason": "too many concurrent streams"})
            return []
        self.streams[sid] = self._new_stream(sid, head_received=True)
        return [Opened(sid, method, path, headers)]

    def _known(self, frame: Frame) -> _Stream | None:
        sid = frame.stream
        st = self.streams.get(sid)
        if st is not None:
            return st
        if sid > self._last_id or (self.role == "gateway" and sid % 2 == 0):
            raise ProtocolError(f"{frame.type.name} on stream {sid}, which was never opened")
        return None

    # ---- internals ---------------------------------------------------------------------------------
    def _need(self, role: Role, what: str) -> None:
        if self.role != role:
            raise ValueError(f"only the {role} may {what}")

    def _stream(self, sid: int) -> _Stream:
        st = self.streams.get(sid)
        if st is None:
            raise StreamClosed(f"stream {sid} is not open")
        return st

    def _drain(self, st: _Stream) -> None:
        while st.queue and st.send_credit > 0:
            chunk = st.queue[0]
            if len(chunk) > st.send_credit:
                chunk, st.queue[0] = chunk[: st.send_credit], chunk[st.send_credit :]
            else:
                st.queue.popleft()
            st.send_credit -= len(chunk)
            st.queued -= len(chunk)
            self._emit(FrameType.DATA, st.id, chunk)
        if st.end_queued and not st.queue and not st.sent_end:
            st.sent_end = True
            self._emit(FrameType.END, st.id)
            self._maybe_finish(st)

    def _maybe_finish(self, st: _Stream) -> None:
        """Both directions done: forget the stream (late frames for it are ignored)."""
        if st.sent_end and st.remote_ended:
            self.streams.pop(st.id, None)

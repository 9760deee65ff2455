"""One tunnel link on asyncio: a :class:`~.protocol.Mux` driven over a WebSocket, on either end.

The gateway end reads and writes through its ASGI ``websocket`` scope (:class:`AsgiWire`), the connector
end through a ``websockets`` client connection (:class:`ClientWire`). Frames leave in the order the
multiplexer produced them: whoever flushes takes the whole outbox under one lock. A stream's writer
waits while its data is queued for credit, so memory per stream stays bounded and a stalled reader
stalls only its own stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

import structlog
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from ..core.pacing import Pacer
from ..upstream.base import hold_reading
from . import protocol as p

log = structlog.get_logger("mcp_bastion.tunnel")


class StreamReset(ConnectionError):
    """The stream was reset by the peer, by this side, or because the link went away.

    A ConnectionError, as a dropped HTTP connection is: ASGI apps already treat that as the client
    having gone away."""


class Wire(Protocol):
    """A message transport for frames: one binary message per frame."""

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes | None:
        """The next message; None once the connection is closed."""
        ...

    async def close(self, code: int, reason: str) -> None: ...

    def abort(self) -> None: ...

    async def hold(self, seconds: float) -> None:
        """Read nothing more for ``seconds``: what arrives meanwhile waits to be read in one go."""
        ...


class AsgiWire:
    """The gateway's end: an accepted ASGI websocket connection."""

    def __init__(
        self,
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        self._receive = receive
        self._send = send
        self._closed = False

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionError("the link is closed")
        try:
            await self._send({"type": "websocket.send", "bytes": data})
        except OSError as exc:  # uvicorn raises ClientDisconnected (an OSError) after a drop
            self._closed = True
            raise ConnectionError(str(exc) or "the link is closed") from None

    async def recv(self) -> bytes | None:
        while not self._closed:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                self._closed = True
                return None
            if kind == "websocket.receive":
                data = message.get("bytes")
                if data is None:
                    raise p.ProtocolError("text message on the tunnel: frames are binary messages")
                return bytes(data)
        return None

    async def close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self._send({"type": "websocket.close", "code": code, "reason": reason[:120]})

    def abort(self) -> None:
        self._closed = True  # returning from the ASGI handler closes the connection

    async def hold(self, seconds: float) -> None:
        # ASGI offers no way to pause reading. uvicorn's WebSocket protocols keep their transport on
        # the object ``receive`` is a method of: paused there, what the connector sends meanwhile
        # waits in the kernel and this process is not woken for it. Under another server the hold
        # still gathers what arrives into one batch, only without sparing the wake-ups.
        transport = getattr(getattr(self._receive, "__self__", None), "transport", None)
        if transport is None:
            await asyncio.sleep(seconds)
        else:
            await hold_reading(transport, seconds)


class ClientWire:
    """The connector's end: a ``websockets`` client connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, data: bytes) -> None:
        try:
            await self.ws.send(data)
        except ConnectionClosed as exc:
            raise ConnectionError(str(exc)) from None

    async def recv(self) -> bytes | None:
        try:
            data = await self.ws.recv()
        except ConnectionClosed:
            return None
        if isinstance(data, str):
            raise p.ProtocolError("text message on the tunnel: frames are binary messages")
        return data

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, reason[:120]), 2.0)
        self.abort()

    def abort(self) -> None:
        transport = self.ws.transport
        if transport is not None:
            transport.abort()

    async def hold(self, seconds: float) -> None:
        await hold_reading(self.ws.transport, seconds)  # not while websockets' flow control paused it


class TunnelStream:
    """One request/response exchange on a link, as the application sees it."""

    def __init__(self, link: Link, sid: int, opened: p.Opened | None = None) -> None:
        self.link = link
        self.id = sid
        self.opened = opened  # connector side: the request head
        self.response: asyncio.Future[p.Response] = asyncio.get_running_loop().create_future()
        self._chunks: deque[bytes] = deque()
        self._ended = False
        self._error: str | None = None
        self._readable: asyncio.Future[None] | None = None
        # Writers waiting for credit: several at once on a PIPE stream (one per call in flight).
        self._writers: list[asyncio.Future[None]] = []
        self._soon: list[bytes] = []  # send_soon's bytes of this turn of the loop, not yet framed
        self._soon_size = 0
        self._room = 0  # the peer's credit when this turn's first send_soon came
        self.gone = asyncio.Event()  # set once the stream is reset or this side has ended it

    @property
    def error(self) -> str | None:
        return self._error

    # ---- fed by the link ---------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)
        self._credit()

    def _data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake()

    def _end(self) -> None:
        self._ended = True
        self._wake()

    def _credit(self) -> None:
        writers, self._writers = self._writers, []
        for fut in writers:
            if not fut.done():
                fut.set_result(None)

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        if not self.response.done():
            self.response.set_exception(StreamReset(reason))
            self.response.exception()  # retrieved: nobody may be waiting for it
        self.gone.set()
        self._wake()

    # ---- application side ----------------------------------------------------------------------------
    async def read(self) -> bytes:
        """The next body chunk; b"" once the peer ended the stream; StreamReset if it was aborted."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                frames = self.link.mux.consumed(self.id, len(chunk))
                if frames:
                    with contextlib.suppress(ConnectionError):
                        await self.link.send_frames(frames)
                return chunk
            if self._error is not None:
                raise StreamReset(self._error)
            if self._ended:
                return b""
            self._readable = asyncio.get_running_loop().create_future()
            await self._readable

    async def write(self, data: bytes, *, end: bool = False) -> None:
        """Send body bytes; returns once they are sent or in flight within the peer's credit.

        ``end=True``: the last bytes; END follows them (in the same message when the credit allows)."""
        if self._error is not None:
            raise StreamReset(self._error)
        if not data:
            if end:
                await self.end()
            return
        try:
            frames = self._take_soon()
            frames += self.link.mux.send_data(self.id, data)
            if end and self.link.mux.queued(self.id) == 0:
                frames += self.link.mux.end(self.id)
                self.link.forget(self.id)
                self.gone.set()
                end = False
        except p.StreamClosed as exc:
            raise StreamReset(self._error or str(exc)) from None
        await self.link.send_frames(frames)
        if end:
            await self.drained()
            await self.end()
            return
        await self.drained()

    def send_soon(self, data: bytes) -> bool:
        """Queue body bytes to leave at the end of this turn of the loop: what a stream gathers in one
        turn becomes one DATA chunk, and it leaves with every other frame queued meanwhile as one
        WebSocket message (at C=50 a write, a syscall, per message cost a quarter of the gateway's
        CPU, and a frame per message was the connector's largest cost after that). True when more
        is waiting than the peer's credit allows: the writer should then wait in :meth:`drained`."""
        if self._error is not None:
            raise StreamReset(self._error)
        if not self._soon:
            self.link.soon(self)
            mux = self.link.mux  # the room left this turn: read once, not per message
            self._room = mux.send_credit(self.id) if mux.queued(self.id) == 0 else 0
        self._soon.append(data)
        self._soon_size += len(data)
        return self._soon_size > self._room

    def _take_soon(self) -> list[bytes]:
        """Frame what :meth:`send_soon` gathered (before any later bytes of this stream: in order)."""
        if not self._soon:
            return []
        data = b"".join(self._soon)
        self._soon.clear()
        self._soon_size = 0
        return self.link.mux.send_data(self.id, data)

    async def drained(self) -> None:
        if self._soon:
            try:
                self.link.kick(self._take_soon())
            except p.StreamClosed as exc:
                raise StreamReset(self._error or str(exc)) from None
        while self.link.mux.queued(self.id) > 0:
            if self._error is not None:
                raise StreamReset(self._error)
            waiter = asyncio.get_running_loop().create_future()
            self._writers.append(waiter)
            await waiter
        if self._error is not None:
            raise StreamReset(self._error)

    async def end(self) -> None:
        if self._error is not None:
            raise StreamReset(self._error)
        try:
            frames = self._take_soon()
            frames += self.link.mux.end(self.id)
        except p.StreamClosed as exc:
            raise StreamReset(self._error or str(exc)) from None
        self.link.forget(self.id)
        self.gone.set()
        await self.link.send_frames(frames)

    async def respond(self, status: int, headers: list[tuple[str, str]]) -> None:
        if self._error is not None:
            raise StreamReset(self._error)
        try:
            frames = self.link.mux.respond(self.id, status, headers)
        except p.StreamClosed as exc:
            raise StreamReset(self._error or str(exc)) from None
        # Queued, not sent: the body (usually right behind) joins it in one message; if none comes
        # within this turn of the loop, the head goes out on its own.
        self.link.kick(frames)

    def widen(self, window: int) -> None:
        """Let the peer have up to ``window`` bytes in flight on this stream (see ``Mux.widen``)."""
        self.link.kick(self.link.mux.widen(self.id, window))  # a stream gone meanwhile: no frame

    def reset(self, reason: str) -> None:
        """Abort the stream (no await: usable from cleanup paths and cancellation)."""
        if self._error is None:
            self._error = reason
        self._soon.clear()
        self._soon_size = 0
        self.link.streams.pop(self.id, None)
        self.link.kick(self.link.mux.reset(self.id, reason))
        self.gone.set()
        self._wake()


OnOpen = Callable[[TunnelStream], Awaitable[None]]
OnControl = Callable[[p.Event], None]


class Link:
    """A running tunnel link: reads frames, dispatches events, sends heartbeats."""

    def __init__(
        self,
        wire: Wire,
        mux: p.Mux,
        *,
        on_open: OnOpen | None = None,
        on_control: OnControl | None = None,
        clock: Callable[[], float] = time.monotonic,
        pace: Callable[[int], float] | None = None,
    ) -> None:
        self.wire = wire
        self.mux = mux
        self.on_open = on_open
        self.on_control = on_control
        self.clock = clock
        self.pace = pace  # seconds to read nothing after a message of N bytes (core/pacing.py)
        self.held = 0  # messages followed by a hold
        # The gateway's end: the pacers of the channels reading from this link (its pace asks them).
        self.pacers: set[Pacer] = set()
        self.streams: dict[int, TunnelStream] = {}
        self.closed = asyncio.Event()
        self.reason = ""
        self._lock = asyncio.Lock()
        self._kicker: asyncio.Future[None] | None = None
        self._kick_due = False
        self._queue: list[bytes] = []  # frames taken from the mux, not yet handed to the wire
        self._soon_streams: list[TunnelStream] = []  # streams whose send_soon bytes are not framed yet
        self._failed: str | None = None  # the wire failed under a send: every later send fails too
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    # ---- sending -------------------------------------------------------------------------------------
    async def send_frames(self, frames: list[bytes]) -> None:
        """Send frames just taken from the multiplexer, in order (ConnectionError once the wire is gone).

        Callers take frames and call this with no await in between: they join the link's outgoing
        queue in the order the multiplexer produced them. Whoever holds the (FIFO) lock sends all that
        is queued, packed into as few messages as the limit allows (BATCH frames), so frames that many
        streams produce meanwhile leave together; a caller whose frames someone else sent returns once
        they are on the wire."""
        self._queue.extend(frames)
        if not self._queue and self._failed is None:
            return
        async with self._lock:
            # Until the queue is empty: frames queued while this task was sending (kicked ones too,
            # whose kicker saw this send in progress) must not wait for some later send.
            while self._queue:
                if self._failed is not None:
                    raise ConnectionError(self._failed)
                batch, self._queue = self._queue, []
                try:
                    for message in p.pack(batch):
                        await self.wire.send(message)
                except ConnectionError as exc:
                    self._failed = str(exc) or "the link is closed"
                    raise
            if self._failed is not None:
                raise ConnectionError(self._failed)

    async def flush(self) -> None:
        await self.send_frames(self.mux.pending_frames())

    def kick(self, frames: list[bytes]) -> None:
        """Send frames soon, from code that cannot await (cancellation, cleanup, a response head that
        its body will most likely join within this turn of the loop)."""
        if self.closed.is_set() or not frames:
            return
        self._queue.extend(frames)
        if not self._kick_due:
            self._kick_due = True
            asyncio.get_running_loop().call_soon(self._kick_now)

    def soon(self, stream: TunnelStream) -> None:
        """A stream has bytes from :meth:`TunnelStream.send_soon`: frame them at the end of this turn."""
        self._soon_streams.append(stream)
        if not self._kick_due:
            self._kick_due = True
            asyncio.get_running_loop().call_soon(self._kick_now)

    def _kick_now(self) -> None:
        self._kick_due = False
        streams, self._soon_streams = self._soon_streams, []
        for stream in streams:
            with contextlib.suppress(p.StreamClosed):  # reset meanwhile: its bytes are void
                self._queue.extend(stream._take_soon())
        if self._queue and not self.closed.is_set() and (self._kicker is None or self._kicker.done()):
            self._kicker = asyncio.ensure_future(self._send_deferred())

    async def _send_deferred(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.send_frames([])

    def forget(self, sid: int) -> None:
        if sid not in self.mux.streams:
            self.streams.pop(sid, None)

    async def open(self, method: str, path: str, headers: list[tuple[str, str]]) -> TunnelStream:
        """Gateway: open a stream (its head); the body follows with :meth:`TunnelStream.write`."""
        if self.closed.is_set():
            raise StreamReset(self.reason or "the link is closed")
        sid, frames = self.mux.open_stream(method, path, headers)
        stream = TunnelStream(self, sid)
        self.streams[sid] = stream
        try:
            await self.send_frames(frames)
        except ConnectionError as exc:
            stream._fail(str(exc))
            raise StreamReset(str(exc)) from None
        return stream

    # ---- running -------------------------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        """End the link soon (run() returns; every open stream fails with ``reason``)."""
        if not self._stop.done():
            self._stop.set_result(reason)

    async def run(self) -> str:
        """Read until the link ends; returns why it ended. Every open stream is failed on the way out."""
        reader = asyncio.create_task(self._read())
        beat = asyncio.create_task(self._heartbeat())
        reason = "shut down"
        try:
            done, _ = await asyncio.wait({reader, beat, self._stop}, return_when=asyncio.FIRST_COMPLETED)
            first = next(iter(done))
            if not first.cancelled() and first.exception() is None:
                reason = str(first.result())
            elif not first.cancelled():
                reason = f"internal error: {first.exception()!r}"
        finally:
            for task in (reader, beat):
                task.cancel()
            self.reason = self.reason or reason
            self._abort(self.reason)
        return self.reason

    def _abort(self, reason: str) -> None:
        self.closed.set()
        self.mux.abort_all(reason)
        for stream in list(self.streams.values()):
            stream._fail(reason)
        self.streams.clear()
        self.wire.abort()

    async def _read(self) -> str:
        while True:
            try:
                data = await self.wire.recv()
            except p.ProtocolError as exc:
                return await self._violation(str(exc))
            if data is None:
                return "the connection closed"
            try:
                events = self.mux.receive(data, self.clock())
            except p.ProtocolError as exc:
                return await self._violation(str(exc))
            for ev in events:
                gone = self._dispatch(ev)
                if gone is not None:
                    return gone
            frames = self.mux.pending_frames()
            if frames:
                try:
                    await self.send_frames(frames)
                except ConnectionError:
                    return "the connection closed"
            if self.pace is not None and (delay := self.pace(len(data))) > 0:
                self.held += 1
                await self.wire.hold(delay)

    async def _violation(self, message: str) -> str:
        log.warning("tunnel_protocol_error", error=message)
        reason = f"protocol error: {message}"
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send_frames(p.Mux(self.mux.role).goaway(reason)), 2.0)
        with contextlib.suppress(Exception):
            await self.wire.close(1002, reason)
        return reason

    def _dispatch(self, ev: p.Event) -> str | None:
        if isinstance(ev, p.Data):
            st = self.streams.get(ev.stream)
            if st is not None:
                st._data(ev.data)
        elif isinstance(ev, p.Credit):
            st = self.streams.get(ev.stream)
            if st is not None:
                st._credit()
        elif isinstance(ev, p.Response):
            st = self.streams.get(ev.stream)
            if st is not None and not st.response.done():
                st.response.set_result(ev)
        elif isinstance(ev, p.Ended):
            st = self.streams.get(ev.stream)
            if st is not None:
                st._end()
                self.forget(ev.stream)
        elif isinstance(ev, p.Reset):
            st = self.streams.pop(ev.stream, None)
            if st is not None:
                st._fail(ev.reason)
        elif isinstance(ev, p.Opened):
            stream = TunnelStream(self, ev.stream, ev)
            self.streams[ev.stream] = stream
            if self.on_open is None:
                stream.reset("this end serves no streams")
            else:
                task = asyncio.create_task(self._serve(stream))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        else:
            if self.on_control is not None:
                self.on_control(ev)
            if isinstance(ev, p.GoAway):
                return f"the peer closed the link: {ev.reason}" if ev.reason else "the peer closed the link"
        return None

    async def _serve(self, stream: TunnelStream) -> None:
        assert self.on_open is not None
        try:
            await self.on_open(stream)
        except StreamReset:
            pass
        except Exception as exc:  # one stream's failure must not take the link down
            log.error("tunnel_stream_failed", stream=stream.id, error=f"{type(exc).__name__}: {exc}")
            stream.reset("internal error")

    async def _heartbeat(self) -> str:
        while True:
            interval = self.mux.heartbeat_seconds  # the gateway's may change once HELLO arrives
            await asyncio.sleep(min(interval / 4, 1.0))
            now = self.clock()
            if self.mux.dead(now):
                return f"no frame from the peer for {p.DEAD_AFTER_INTERVALS * interval:g} s"
            frames = self.mux.ping(now)
            if frames:
                try:
                    await asyncio.wait_for(self.send_frames(frames), interval * p.DEAD_AFTER_INTERVALS)
                except (ConnectionError, TimeoutError):
                    return "the connection closed"

    async def close(self, reason: str, code: int = 1000) -> None:
        """Orderly close: GOAWAY, then the WebSocket close."""
        if not self.closed.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send_frames(self.mux.goaway(reason)), 2.0)
            with contextlib.suppress(Exception):
                await self.wire.close(code, reason)
        self.reason = self.reason or reason
        self.stop(reason)

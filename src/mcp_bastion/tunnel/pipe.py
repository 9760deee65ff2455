"""A connector's server as a message pipe: the gateway's ``TunnelChannel`` and the connector's ``PipeHost``.

The gateway reaches a server behind a connector the way it reaches a local stdio child: one
long-lived stream per protocol era (a ``PIPE`` stream on the link) carries newline-delimited JSON-RPC
both ways, and the gateway's own hub does all the MCP work (sessions, eras, translation, names).
The connector end is thin on purpose: it keeps one upstream channel per server and era (a supervised
stdio child, or an HTTP server of the private network), rewrites ids so that a reply can never reach
a caller of an earlier link, answers the handshake from the child's own, and enforces its own tool
allow/deny lists. Running a second HTTP front and hub there cost as much CPU per call as the whole
direct gateway path (bench/README.md, "Profile notes: the tunnel path").
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from ..core import jsonrpc as rpc
from ..core.forward import Broadcast, Delivery, Event, ServerRequest
from ..core.lines import Line, Lines
from ..upstream.base import Channel, Era, Sink, Unreachable, UpstreamUnavailable

if TYPE_CHECKING:
    from ..config import ServerConfig
    from ..core.pacing import Pacer
    from .link import TunnelStream
    from .relay import TunnelRegistry

log = structlog.get_logger("mcp_bastion.tunnel")

PIPE_METHOD = "PIPE"
ERA_HEADER = "mcp-era"
HANDSHAKE_METHODS = frozenset({"initialize", "server/discover"})


def pipe_path(server: str) -> str:
    return f"/servers/{server}/pipe"


def _retrieve(task: asyncio.Future[None]) -> None:
    """A fire-and-forget write to a child that may be gone: its failure is expected, not logged."""
    if not task.cancelled():
        task.exception()


def too_long(lines: Lines) -> str:
    return f"a message longer than {lines.limit} bytes"


def parse(line: Line) -> rpc.Message | None:
    try:
        return rpc.validate(orjson.loads(line))
    except (orjson.JSONDecodeError, rpc.ProtocolError) as exc:
        log.warning("tunnel_bad_message", error=str(exc)[:200])
        return None


# The receive window of a PIPE stream, each way. Every caller of a server shares its PIPE, so the
# per-stream default (256 KiB) let only two 128 KiB answers, or four 64 KiB calls, be in flight, and
# each needed a WINDOW round trip between the two processes. Bounded: what one PIPE may hold unread.
PIPE_WINDOW = 4 * 1024 * 1024
OUTBOX_LIMIT = 4 * 1024 * 1024  # bytes waiting for a gateway that does not read, before it is held off
NOTICE_LIMIT = 1024 * 1024  # bytes of notifications waiting behind a write that does not finish


class Outbox:
    """Messages for one stream, written in order by one writer task (sinks cannot await).

    Bounded, because a gateway may stop reading (stalled, or hostile): once ``limit`` bytes wait or
    are being written, :meth:`room` holds the connector's reading of the gateway's requests (so the
    answers owed stop growing, and the gateway's writes stop for lack of credit); answers and the
    child's own requests are never dropped. Notifications, which the child may send without end,
    are dropped (and counted) once ``notice_limit`` bytes of them wait behind a write that does not
    finish; a large answer that is being read meanwhile does not count against them."""

    def __init__(
        self, stream: TunnelStream, limit: int = OUTBOX_LIMIT, notice_limit: int = NOTICE_LIMIT
    ) -> None:
        self.stream = stream
        self.limit = limit
        self.notice_limit = notice_limit
        self.size = 0  # bytes queued or being written
        self.dropped = 0  # notifications dropped behind the current write
        self._notices = 0  # bytes of notifications queued behind the current write
        self._lines: list[bytes] = []
        self._wake: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self._task = asyncio.create_task(self._run())
        self._task.add_done_callback(lambda _: self._open())

    def put(self, message: rpc.Message) -> None:
        data = orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)
        if "id" not in message:
            if self._notices >= self.notice_limit:
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("tunnel_gateway_not_reading", queued=self.size, dropping="notifications")
                return
            self._notices += len(data)
        self._lines.append(data)
        self.size += len(data)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def room(self) -> None:
        """Return once fewer than ``limit`` bytes wait (at once if the stream is gone)."""
        while self.size >= self.limit and not self._task.done():
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await self._room

    def _open(self) -> None:
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    async def _run(self) -> None:
        from .link import StreamReset

        with contextlib.suppress(StreamReset):
            while True:
                if not self._lines:
                    self._wake = asyncio.get_running_loop().create_future()
                    await self._wake
                    continue
                data, self._lines, self._notices = b"".join(self._lines), [], 0
                if self.dropped:
                    log.warning("tunnel_notifications_dropped", count=self.dropped)
                    self.dropped = 0
                await self.stream.write(data)  # messages that queued meanwhile leave in one frame
                self.size -= len(data)
                if self.size < self.limit:
                    self._open()

    def close(self) -> None:
        self._task.cancel()


# ---- the gateway's end ------------------------------------------------------------------------------


class TunnelChannel(Channel):
    """A server behind a connector, as one channel: a PIPE stream over the connector's live link.

    It does not outlive its stream: when the link drops, every call in flight fails at once with
    "connector … is offline", the channel closes, and the hub opens a new one (a new stream, a new
    handshake against the same child) for the next call."""

    def __init__(self, server: str, era: Era, sink: Sink, registry: TunnelRegistry, timeout: float) -> None:
        super().__init__(server, era, sink, handshake_timeout=timeout)
        self.registry = registry
        self.connector: str | None = None
        self.stream: TunnelStream | None = None
        self._reader: asyncio.Task[None] | None = None

    async def _connect(self) -> None:
        from .link import StreamReset
        from .relay import offline

        self.connector, link = self.registry.route(self.server)
        if link is None:
            raise Unreachable(offline(self.connector))
        try:
            stream = await link.open(PIPE_METHOD, pipe_path(self.server), [(ERA_HEADER, self.era)])
            stream.widen(PIPE_WINDOW)
            head = await asyncio.wait_for(stream.response, self.handshake_timeout)
        except StreamReset as exc:
            raise Unreachable(self._why(str(exc))) from None
        except TimeoutError:
            raise Unreachable(f"connector {self.connector!r} did not answer in time") from None
        if head.status != 200:
            detail = b""
            with contextlib.suppress(StreamReset):
                while chunk := await stream.read():
                    detail += chunk
            raise UpstreamUnavailable(f"connector {self.connector!r}: {_error_text(detail, head.status)}")
        self.stream = stream
        if self.pacer is not None:  # the link's reads are held while its servers queue (relay.py)
            link.pacers.add(self.pacer)
        self._reader = asyncio.create_task(self._read(stream), name=f"tunnel:{self.label}")
        try:
            await self.handshake()
        except UpstreamUnavailable as exc:
            if stream.gone.is_set():  # the link went, not the server: no verdict on its era
                raise Unreachable(str(exc)) from None
            raise

    def _why(self, reason: str) -> str:
        from .relay import offline

        stream = self.stream
        if stream is not None and stream.link.closed.is_set():
            return f"{offline(self.connector)} (the link was lost: {stream.link.reason or reason})"
        return f"connector {self.connector!r}: {reason}"

    async def _read(self, stream: TunnelStream) -> None:
        from .link import StreamReset

        lines = Lines()
        reason = "ended the stream"
        try:
            while chunk := await stream.read():
                for line in lines.feed(chunk):
                    message = parse(line)
                    if message is not None:
                        self.count_answer(message)
                        self.received(message)
                if lines.dropped:  # an endless line: the connector broke the pipe's rules
                    reason = too_long(lines)
                    stream.reset(reason)
                    break
        except StreamReset as exc:
            reason = str(exc)
        if not self.closed:
            self.closed = True  # the hub opens a fresh channel for the next call
            log.warning("tunnel_server_lost", server=self.server, era=self.era, reason=reason)
            self.lost(reason, detail=self._why(reason))

    async def _write(self, message: rpc.Message) -> None:
        stream = self.stream
        if stream is None or stream.gone.is_set():
            raise UpstreamUnavailable(self._why(stream.error or "closed") if stream else "not connected")
        full = stream.send_soon(orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE))
        self.count_sent(message)
        if full:
            await stream.drained()  # beyond the connector's credit: wait until it reads

    async def _disconnect(self) -> None:
        if self.stream is not None:
            self.stream.reset("the gateway closed the channel")
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    def describe(self) -> dict[str, Any]:
        return {"connector": self.connector}


def _error_text(body: bytes, status: int) -> str:
    with contextlib.suppress(orjson.JSONDecodeError):
        value = orjson.loads(body) if body else None
        if isinstance(value, dict) and isinstance(value.get("error"), str):
            return str(value["error"])[:300]
    return f"HTTP {status}"


# ---- the connector's end ------------------------------------------------------------------------------


class PipeHost:
    """One server in one era on the connector: its upstream channel (kept across links) and the PIPE
    stream of the gateway currently attached (at most one; a newer one replaces it)."""

    def __init__(self, config: ServerConfig, era: Era, pacer: Pacer) -> None:
        self.config = config
        self.era: Era = era
        self.pacer = pacer  # this server's calls in flight (its channel keeps it), when reads are held
        self.channel: Channel | None = None
        self._lock = asyncio.Lock()
        self.stream: TunnelStream | None = None
        self.outbox: Outbox | None = None
        self.ids: dict[rpc.RequestId, rpc.RequestId] = {}  # the gateway's request id -> the child's
        self.lists: set[rpc.RequestId] = set()  # child ids of tools/list requests (their answers filtered)
        self.asked: set[rpc.RequestId] = set()  # the child's own requests the gateway has not answered

    async def ready_channel(self) -> Channel:
        """The upstream channel, started (and its handshake done) on first use."""
        from ..upstream.factory import make_channel

        async with self._lock:
            ch = self.channel
            if ch is None or ch.closed:
                ch = make_channel(self.config, self.era, self._events)
                ch.on_lost = self._upstream_lost
                if self.pacer.window > 0:
                    ch.pace_with(self.pacer)
                try:
                    await ch.start()
                except UpstreamUnavailable:
                    await ch.close()
                    raise
                self.channel = ch
        if not ch.ready.is_set():
            try:
                await asyncio.wait_for(ch.ready.wait(), self.config.timeout)
            except TimeoutError:
                raise UpstreamUnavailable(f"server {self.config.name!r} is not available") from None
        return ch

    async def serve(self, stream: TunnelStream) -> None:
        """Attach the gateway's PIPE stream and carry messages until it ends."""
        from .link import StreamReset

        try:
            ch = await self.ready_channel()
        except UpstreamUnavailable as exc:
            await refuse(stream, 502, str(exc))
            return
        if self.stream is not None:
            self._detach("replaced by a newer stream from the gateway")
        self.stream = stream
        self.outbox = outbox = Outbox(stream)
        await stream.respond(200, [("content-type", "application/x-ndjson")])  # joins the first answer
        stream.widen(PIPE_WINDOW)
        lines = Lines()
        try:
            while True:
                await outbox.room()  # a gateway that does not read its answers gets no more read
                chunk = await stream.read()
                if not chunk:
                    break
                for line in lines.feed(chunk):
                    message = parse(line)
                    if message is not None:
                        await self._from_gateway(ch, message)
                if lines.dropped:  # an endless line: the gateway broke the pipe's rules
                    reason = too_long(lines)
                    log.warning("tunnel_bad_stream", server=self.config.name, error=reason)
                    stream.reset(reason)
                    break
        except StreamReset:
            pass
        finally:
            if self.stream is stream:
                self._detach("the gateway's stream ended")

    async def _from_gateway(self, ch: Channel, message: rpc.Message) -> None:
        if "method" not in message:  # the gateway's answer to one of the child's requests
            if message.get("id") in self.asked:  # an answer nobody asked for is not passed on
                self.asked.discard(message["id"])
                await ch.send(message)
            return
        method = message["method"]
        if "id" not in message:
            if method == "notifications/initialized":
                return  # the child had its own handshake
            if method == "notifications/cancelled":
                params = rpc.params_of(message)
                rid = params.get("requestId")
                up = self.ids.pop(rid, None) if isinstance(rid, str | int) else None
                reason = params.get("reason")
                why = reason if isinstance(reason, str) else None
                cancel = None if up is None else ch.state.cancel(up, why)
                if cancel is not None:
                    await ch.send(cancel)
                return
            await ch.send(message)
            return
        outbox = self.outbox
        assert outbox is not None
        if method in HANDSHAKE_METHODS:
            outbox.put(rpc.result(message["id"], ch.init_result))
            return
        if method == "tools/call" and self.config.filters_tools:
            name = str(rpc.params_of(message).get("name", ""))
            if not self.config.tool_allowed(name):
                outbox.put(rpc.error(message["id"], rpc.INVALID_PARAMS, f"Unknown tool: {name}"))
                return
        out = ch.state.forward_request(self, message)
        self.ids[message["id"]] = out["id"]
        if method == "tools/list":
            self.lists.add(out["id"])
        await ch.send(out)

    def _events(self, channel: Channel, events: list[Event]) -> None:
        outbox = self.outbox
        for ev in events:
            if isinstance(ev, Delivery):
                message = ev.message
                if ev.final:
                    up = self.ids.pop(ev.related, None) if ev.related is not None else None
                    if up in self.lists:
                        self.lists.discard(up)
                        message = self._filtered(message)
            elif isinstance(ev, ServerRequest):
                message = ev.message
                if outbox is None:  # nobody to ask: the child gets its answer now
                    self._answer_child(channel, ev.up_id)
                    continue
                self.asked.add(ev.up_id)
            else:
                assert isinstance(ev, Broadcast)
                message = ev.message
            if outbox is not None:
                outbox.put(message)

    def _filtered(self, message: rpc.Message) -> rpc.Message:
        result = message.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return message
        tools = [
            t
            for t in result["tools"]
            if isinstance(t, dict) and self.config.tool_allowed(str(t.get("name", "")))
        ]
        return {**message, "result": {**result, "tools": tools}}

    def _answer_child(self, channel: Channel, up_id: rpc.RequestId) -> None:
        reply = rpc.error(up_id, rpc.INTERNAL_ERROR, "the gateway is not connected")
        task = asyncio.ensure_future(channel.send(reply))
        task.add_done_callback(_retrieve)

    def _detach(self, reason: str) -> None:
        """The gateway's stream is gone: the child forgets its calls (cancelled), and what it asked
        of the gateway is answered with an error; its late answers are dropped, never delivered."""
        stream, outbox, ch = self.stream, self.outbox, self.channel
        self.stream = self.outbox = None
        if outbox is not None:
            outbox.close()
        if stream is not None and not stream.gone.is_set():
            stream.reset(reason)
        self.ids.clear()
        self.lists.clear()
        if ch is None:
            return
        for up_id in list(ch.state.pending):
            cancel = ch.state.cancel(up_id, "the gateway link was lost")
            if cancel is not None:
                task = asyncio.ensure_future(ch.send(cancel))
                task.add_done_callback(_retrieve)
        for asked in list(self.asked):
            self._answer_child(ch, asked)
        self.asked.clear()

    def _upstream_lost(self, channel: Channel) -> None:
        # The child exited (it is restarted by its channel): the gateway re-handshakes on a new stream.
        if self.stream is not None:
            log.warning("tunnel_upstream_lost", server=self.config.name, era=self.era)
            self._detach(f"server {self.config.name!r} exited")

    async def close(self) -> None:
        self._detach("the connector is shutting down")
        if self.channel is not None:
            await self.channel.close()


async def refuse(stream: TunnelStream, status: int, message: str) -> None:
    """Answer a stream with an error status and a JSON ``{"error": …}`` body, then end it."""
    await stream.respond(status, [("content-type", "application/json")])
    await stream.write(orjson.dumps({"error": message}), end=True)

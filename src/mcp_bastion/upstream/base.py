"""What every upstream channel is: a JSON-RPC connection in one era, after its handshake.

A channel owns a :class:`~mcp_bastion.core.forward.ChannelState` for its id maps and
reports what the upstream says as core events to its ``sink``. Channels for stdio,
Streamable HTTP and legacy SSE differ only in how bytes move.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Literal

import structlog

from .. import __version__
from ..core import jsonrpc as rpc
from ..core.eras import (
    LATEST_HANDSHAKE,
    LATEST_MODERN,
    META_CLIENT_CAPABILITIES,
    META_CLIENT_INFO,
    META_PROTOCOL_VERSION,
)
from ..core.forward import ChannelState, Delivery, Event
from ..core.pacing import Pacer

Era = Literal["legacy", "modern"]
log = structlog.get_logger("mcp_bastion.upstream")

# What the gateway tells upstreams it can do: everything, because it forwards to
# clients that may (a client that cannot answers with an error, which is forwarded).
CLIENT_CAPABILITIES: dict[str, Any] = {
    "sampling": {"tools": {}},
    "elicitation": {"form": {}, "url": {}},
    "roots": {"listChanged": True},
}
CLIENT_INFO = {"name": "mcp-bastion", "version": __version__}


class UpstreamUnavailable(Exception):
    """The upstream cannot be reached or did not complete its handshake."""


class Unreachable(UpstreamUnavailable):
    """Nothing answered at all (e.g. its connector is offline): no evidence of which era it speaks."""


class FutureRoute:
    """A route that resolves a future: for requests the gateway makes itself."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[rpc.Message] = asyncio.get_running_loop().create_future()


def modern_meta(capabilities: dict[str, Any] | None = None, info: Any = None) -> dict[str, Any]:
    return {
        META_PROTOCOL_VERSION: LATEST_MODERN,
        META_CLIENT_CAPABILITIES: capabilities if capabilities is not None else CLIENT_CAPABILITIES,
        META_CLIENT_INFO: info if info is not None else CLIENT_INFO,
    }


Sink = Callable[["Channel", list[Event]], None]


async def hold_reading(transport: Any, seconds: float) -> None:
    """Read nothing from ``transport`` for ``seconds`` (what arrives waits in the kernel's buffer),
    for ``Channel.pace`` and the tunnel's ``Link.pace``. A transport that is not reading (its
    protocol's own flow control paused it), or none, is left alone."""
    if transport is None or not hasattr(transport, "is_reading") or not transport.is_reading():
        return
    transport.pause_reading()
    try:
        await asyncio.sleep(seconds)
    finally:
        if not transport.is_closing():
            transport.resume_reading()


class Channel:
    """Base of all channels; subclasses implement ``_connect``, ``_write`` and ``_disconnect``."""

    def __init__(self, server: str, era: Era, sink: Sink, *, handshake_timeout: float = 30.0) -> None:
        self.server = server
        self.era: Era = era
        self.state = ChannelState(f"{server}.{era[0]}")
        self.sink = sink
        self.handshake_timeout = handshake_timeout
        self.init_result: dict[str, Any] = {}
        self.ready = asyncio.Event()
        self.closed = False
        # Whose credentials this channel carries: "" the server's own, else an identity name.
        self.credentials = ""
        self.on_ready: Callable[[Channel], None] | None = None
        self.on_lost: Callable[[Channel], None] | None = None
        # Seconds to leave the upstream's output unread after a read of N bytes (0: none); honoured
        # by stdio channels. None: never held. Usually set by pace_with (core/pacing.py).
        self.pace: Callable[[int], float] | None = None
        # The calls in flight the pace is decided from; stdio and tunnel channels keep it up to date
        # (a tunnel channel's link asks the pacers of all its channels, relay.py).
        self.pacer: Pacer | None = None

    def pace_with(self, pacer: Pacer) -> None:
        """Hold reads while this server queues (read coalescing, core/pacing.py): the channel tells
        ``pacer`` each request it writes and each answer it reads, and asks it after every read.
        A pacer may outlive the channel (a restarted child gets a new channel, the same pacer)."""
        self.pacer = pacer
        self.pace = lambda read: pacer.hold(time.monotonic(), read)

    def count_sent(self, message: rpc.Message) -> None:
        """For the pacer: a request now in flight (until its answer is read), or a cancellation that
        ends one. Called by ``_write`` once the message is on its way (never for one that fails)."""
        pacer = self.pacer
        if pacer is None or "method" not in message:
            return
        if "id" in message:
            pacer.sent(message["id"], time.monotonic())
        elif message["method"] == "notifications/cancelled":
            rid = rpc.params_of(message).get("requestId")
            if type(rid) is int or type(rid) is str:
                pacer.forget(rid)

    def count_answer(self, message: rpc.Message) -> None:
        """For the pacer: an answer read from the upstream (a valid message: a response has an id)."""
        if self.pacer is not None and "method" not in message:
            self.pacer.answered(message["id"], time.monotonic())

    @property
    def label(self) -> str:
        return f"{self.server}/{self.era}"

    # --- subclass hooks -------------------------------------------------------------
    async def _connect(self) -> None:
        raise NotImplementedError

    async def _write(self, message: rpc.Message) -> None:
        raise NotImplementedError

    async def _disconnect(self) -> None:
        raise NotImplementedError

    # --- shared behaviour -----------------------------------------------------------
    async def send(self, message: rpc.Message) -> None:
        """Write one message upstream; a dead channel answers its caller at once."""
        try:
            await self._write(message)
        except (OSError, UpstreamUnavailable, RuntimeError) as exc:
            if rpc.is_request(message):
                pend = self.state.pending.pop(message["id"], None)
                if pend is not None:
                    err = rpc.error(
                        pend.down_id, rpc.UPSTREAM_UNAVAILABLE, f"upstream {self.server!r}: {exc}"
                    )
                    self._dispatch([Delivery(pend.route, err, pend.down_id, final=True)])

    def _dispatch(self, events: list[Event]) -> None:
        rest: list[Event] = []
        for ev in events:
            if isinstance(ev, Delivery) and isinstance(ev.route, FutureRoute):
                if ev.final and not ev.route.future.done():
                    ev.route.future.set_result(ev.message)
            else:
                rest.append(ev)
        if rest:
            self.sink(self, rest)

    def received(self, message: rpc.Message) -> None:
        self._dispatch(self.state.receive(message))

    def lost(self, reason: str, *, detail: str | None = None) -> None:
        """The connection broke: callers in flight get a clear error now (``detail``: its full text)."""
        was_ready = self.ready.is_set()
        self.ready.clear()
        if self.pacer is not None:
            self.pacer.clear()  # its calls fail now: none is in flight any more
        if was_ready and self.on_lost is not None:
            self.on_lost(self)
        events: list[Event] = list(
            self.state.fail_all(rpc.UPSTREAM_UNAVAILABLE, detail or f"upstream {self.server!r} {reason}")
        )
        if events:
            self._dispatch(events)

    async def call(self, method: str, params: dict[str, Any] | None = None, wait: float = 30.0) -> Any:
        """A request of the gateway's own; returns the result or raises UpstreamUnavailable."""
        route = FutureRoute()
        msg = self.state.forward_request(
            route, rpc.request(0, method, params), wants_logs=False, accepts_requests=False
        )
        await self.send(msg)
        try:
            reply = await asyncio.wait_for(route.future, wait)
        except TimeoutError:
            cancel = self.state.cancel(msg["id"], "timed out")
            if cancel is not None:
                with contextlib.suppress(Exception):
                    await self._write(cancel)
            raise UpstreamUnavailable(f"{method} timed out after {wait:g}s") from None
        if "error" in reply:
            raise UpstreamUnavailable(f"{method} failed: {reply['error'].get('message')}")
        return reply.get("result", {})

    async def handshake(self) -> None:
        """Initialize (legacy) or discover (modern); raises UpstreamUnavailable on failure."""
        if self.era == "modern":
            result = await self.call("server/discover", {"_meta": modern_meta()}, self.handshake_timeout)
            if not isinstance(result, dict) or LATEST_MODERN not in (result.get("supportedVersions") or []):
                raise UpstreamUnavailable("upstream does not speak 2026-07-28")
        else:
            result = await self.call(
                "initialize",
                {
                    "protocolVersion": LATEST_HANDSHAKE,
                    "capabilities": CLIENT_CAPABILITIES,
                    "clientInfo": CLIENT_INFO,
                },
                self.handshake_timeout,
            )
            if not isinstance(result, dict):
                raise UpstreamUnavailable("initialize returned no result object")
            await self._write(rpc.notification("notifications/initialized"))
        self.init_result = result
        self.ready.set()
        if self.on_ready is not None:
            self.on_ready(self)

    async def start(self) -> None:
        await self._connect()

    async def close(self) -> None:
        self.closed = True
        self.ready.clear()
        await self._disconnect()
        self.lost("was shut down")

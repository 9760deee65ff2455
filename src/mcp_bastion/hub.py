"""The message router: one endpoint's view of one or many upstream servers.

A :class:`Hub` answers a downstream peer's requests by forwarding them to the right
upstream channel (renaming in aggregation, translating between eras where the
upstream does not speak the client's) and routes what upstreams send back. One
:class:`ServerEntry` per configured server owns its channels; hubs share entries,
so ``/servers/<name>/mcp`` and the aggregate ``/mcp`` use the same children.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
import structlog

from . import __version__
from .config import ConfigError, ServerConfig
from .core import jsonrpc as rpc
from .core.eras import (
    LATEST_MODERN,
    META_CLIENT_CAPABILITIES,
    META_CLIENT_INFO,
    META_LOG_LEVEL,
    META_PROTOCOL_VERSION,
    META_SERVER_INFO,
    META_SUBSCRIPTION_ID,
    negotiate_handshake,
    x_mcp_headers,
)
from .core.forward import Broadcast, Delivery, Event, ServerRequest
from .core.names import NameMap, PrefixMode, UriMap
from .core.pacing import Pacer
from .core.sealing import StateSealer
from .peers import CallRoute, Peer, level_index
from .upstream.base import Channel, Era, Unreachable, UpstreamUnavailable, modern_meta
from .upstream.factory import make_channel

log = structlog.get_logger("mcp_bastion.hub")

LIST_METHODS = {
    "tools/list": "tools",
    "prompts/list": "prompts",
    "resources/list": "resources",
    "resources/templates/list": "resourceTemplates",
}
CACHEABLE = {*LIST_METHODS, "resources/read", "server/discover"}
ENVELOPE_KEYS = (META_PROTOCOL_VERSION, META_CLIENT_CAPABILITIES, META_CLIENT_INFO, META_LOG_LEVEL)
MRTR_HOLD_SECONDS = 300.0
# Why a call is cancelled upstream when nobody waits for its answer any more: its handler was
# cancelled (the session ended, the 2026-07-28 stream closed, shutdown) or its peer detached.
GONE = "client went away"
# What a client must declare to be asked each kind of server request.
CAPABILITY_FOR = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}
# Methods the 2026-07-28 revision removed; a modern request for one is an unknown method.
REMOVED_IN_MODERN = frozenset(
    {"initialize", "ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe"}
)


class ListenRoute(CallRoute):
    """A subscriptions/listen the gateway holds upstream for a handshake-era client."""

    def forward(self, channel: Channel, message: rpc.Message, hub: Hub) -> None:
        method = message.get("method")
        if method not in ("notifications/resources/updated",) and not str(method).endswith("/list_changed"):
            return  # the acknowledgement, or the listen's end
        params = {k: v for k, v in rpc.params_of(message).items() if k != "_meta"}
        if "uri" in params:
            params["uri"] = hub.uris.expose(channel.server, str(params["uri"]))
        self.peer.deliver({**message, "params": params}, None)


class HeldCall:
    """A legacy upstream call paused on server requests while a modern client answers them."""

    def __init__(self, handle: str, channel: Channel, up_id: rpc.RequestId, route: CallRoute) -> None:
        self.handle = handle
        self.channel = channel
        self.up_id = up_id
        self.route = route
        self.outstanding: dict[str, rpc.RequestId] = {}  # input key -> upstream server-request id
        self.expires = time.monotonic() + MRTR_HOLD_SECONDS


class ServerEntry:
    """One configured upstream server and its channels (per era; per session if isolated)."""

    def __init__(
        self,
        config: ServerConfig,
        on_events: Callable[[Channel, list[Event]], None],
        coalesce_seconds: float = 0.0,
    ) -> None:
        self.config = config
        self.name = config.name
        self.on_events = on_events
        # Read coalescing under load (core/pacing.py): each shared channel's window, 0 for none; a
        # pacer per era and credentials, kept across restarts of the server.
        self.coalesce_seconds = coalesce_seconds
        self._pacers: dict[tuple[Era, str], Pacer] = {}
        self.channels: dict[Era, Channel] = {}
        # Channels carrying one identity's own credentials (``users`` in the config): (era, name).
        self.user_channels: dict[tuple[Era, str], Channel] = {}
        self.modern: bool | None = None if config.era == "auto" else config.era == "modern"
        if config.transport == "sse":
            self.modern = False  # HTTP+SSE predates the 2026-07-28 era
        self._locks: dict[str, asyncio.Lock] = {}
        self.list_cache: dict[str, list[dict[str, Any]]] = {}
        self.last_error: str | None = None
        # Called when a channel comes up or goes down: aggregates announce list changes.
        self.on_change: Callable[[Channel], None] | None = None

    @property
    def reads_held(self) -> int:
        """Reads of this server's output followed by a hold, over its life (logged at the end)."""
        return sum(pacer.held for pacer in self._pacers.values())

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def credentials_for(self, peer: Peer | None) -> str | None:
        """The credentials key a peer reaches this server with ("" shared), None if it may not."""
        if peer is None:
            return ""
        if not peer.identity.may_use(self.name):
            return None
        if not self.config.users and not self.config.users_only:
            return ""
        return self.config.credentials_key(peer.identity.name)

    def usable_by(self, peer: Peer) -> bool:
        return self.credentials_for(peer) is not None

    async def _open(self, era: Era, credentials: str = "", *, paced: bool = True) -> Channel:
        try:
            ch = make_channel(self.config.for_credentials(credentials), era, self.on_events)
        except ConfigError as exc:  # e.g. a secret reference that does not resolve
            if not credentials:
                self.last_error = str(exc)
            raise UpstreamUnavailable(f"upstream {self.name!r}: {exc}") from None
        ch.credentials = credentials
        if paced and self.coalesce_seconds > 0:
            ch.pace_with(self._pacers.setdefault((era, credentials), Pacer(self.coalesce_seconds)))
        ch.on_ready = self._on_ready
        ch.on_lost = self._on_lost
        try:
            await ch.start()
        except UpstreamUnavailable as exc:
            if not credentials:
                self.last_error = str(exc)
            await ch.close()
            raise
        if not credentials:
            self.last_error = None
        return ch

    def _on_ready(self, channel: Channel) -> None:
        # A (re)started channel: cached lists may be stale.
        self.list_cache.clear()
        if self.on_change is not None:
            self.on_change(channel)

    def _on_lost(self, channel: Channel) -> None:
        self.list_cache.clear()
        if self.on_change is not None:
            self.on_change(channel)

    def era_for(self, wanted: Era) -> Era:
        if wanted == "modern" and self.modern is False:
            return "legacy"
        if wanted == "legacy" and self.config.era == "modern":
            return "modern"
        return wanted

    async def channel(self, wanted: Era, peer: Peer | None = None, *, wait: bool = True) -> Channel:
        """The channel to use for a peer of era ``wanted`` (translating if the upstream can't).

        ``wait=False``: a channel that exists but is restarting counts as unavailable now."""
        era = self.era_for(wanted)
        credentials = self.credentials_for(peer)
        if credentials is None:
            raise rpc.ProtocolError(rpc.INVALID_REQUEST, f"Not permitted: server {self.name!r}")
        isolated = self.config.isolation == "session" and peer is not None and peer.era == "legacy"
        pool: dict[Any, Channel] = self.user_channels if credentials else self.channels
        slot: Any = (era, credentials) if credentials else era
        if isolated:
            assert peer is not None
            ch = peer.hub_channels.get(self.name)
            if ch is not None and not ch.closed:
                return ch
        else:
            ch = pool.get(slot)
            if ch is not None and not ch.closed:
                if not wait and not ch.ready.is_set():
                    raise UpstreamUnavailable(f"upstream {self.name!r} is restarting")
                await self._wait_ready(ch)
                return ch
        key = f"{era}:{peer.id if isolated and peer else ''}:{credentials}"
        async with self._lock(key):
            if not isolated:
                ch = pool.get(slot)
                if ch is not None and not ch.closed:
                    await self._wait_ready(ch)
                    return ch
            try:
                # A session's own child (isolation) serves one client: not paced (a pacer per
                # session would outlive it, and one shared by sessions would mix their calls).
                ch = await self._open(era, credentials, paced=not isolated)
            except UpstreamUnavailable as exc:
                if era == "modern" and self.config.era == "auto" and not isinstance(exc, Unreachable):
                    log.info("upstream_not_modern", server=self.name)
                    self.modern = False
                    return await self.channel("legacy", peer)
                raise
            if era == "modern":
                self.modern = True
            if isolated:
                assert peer is not None
                peer.hub_channels[self.name] = ch
            else:
                pool[slot] = ch
            return ch

    async def _wait_ready(self, ch: Channel) -> None:
        if ch.ready.is_set():
            return
        try:
            await asyncio.wait_for(ch.ready.wait(), self.config.timeout)
        except TimeoutError:
            raise UpstreamUnavailable(f"upstream {self.name!r} is not available") from None

    def ready(self) -> bool:
        return any(ch.ready.is_set() for ch in self.channels.values())

    async def close(self) -> None:
        channels = [*self.channels.values(), *self.user_channels.values()]
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)
        self.channels.clear()
        self.user_channels.clear()


class Hub:
    """One MCP endpoint over a set of servers."""

    def __init__(
        self,
        path: str,
        entries: list[ServerEntry],
        *,
        prefix_mode: PrefixMode,
        aggregate: bool,
        separator: str = "_",
        sealer: StateSealer,
        page_size: int = 500,
        request_timeout: float = 300.0,
    ) -> None:
        self.path = path
        self.entries = {e.name: e for e in entries}
        # One server served as itself (pass-through), or any number merged under one name space.
        self.single = not aggregate
        mode: PrefixMode = "none" if self.single else prefix_mode
        self.tools = NameMap(mode, separator)
        self.prompts = NameMap(mode, separator)
        self.uris = UriMap(mode)
        self.sealer = sealer
        self.page_size = page_size
        self.request_timeout = request_timeout
        self.peers: set[Peer] = set()
        self.held: dict[str, HeldCall] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        # Exposed tool name -> the Mcp-Param-* headers its inputSchema declares (property -> header),
        # as last listed; only tools that declare some.
        self.param_headers: dict[str, dict[str, str]] = {}
        # Each server's lists as last fetched, so a peer that may use only some servers can
        # rebuild the shared name maps without reaching the others.
        self._last_lists: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def add_entry(self, entry: ServerEntry) -> None:
        """A server that joined while the gateway runs (brought by a tunnel connector)."""
        self.entries[entry.name] = entry

    def usable(self, peer: Peer) -> list[ServerEntry]:
        """The servers this peer's identity may use, in configuration order."""
        return [e for e in self.entries.values() if e.usable_by(peer)]

    def _remember_tools(self, tools: Any) -> None:
        if isinstance(tools, list):
            for t in tools:
                if isinstance(t, dict) and isinstance(t.get("name"), str):
                    declared = x_mcp_headers(t.get("inputSchema"))
                    if declared:
                        self.param_headers[t["name"]] = declared
                    else:
                        self.param_headers.pop(t["name"], None)

    # ------------------------------------------------------------------ lifecycle
    def attach(self, peer: Peer) -> None:
        self.peers.add(peer)

    async def detach(self, peer: Peer) -> None:
        """A session ended or an exchange closed: cancel its calls upstream."""
        self.peers.discard(peer)
        for down_id in list(peer.inflight):
            await self.cancel(peer, down_id, GONE)
        for ch, up_id in list(peer.upstream_listens.values()):
            note = ch.state.cancel(up_id, "session ended")
            if note is not None:
                with contextlib.suppress(Exception):
                    await ch.send(note)
        peer.upstream_listens.clear()
        for ch in list(peer.hub_channels.values()):
            await ch.close()
        peer.hub_channels.clear()

    async def cancel(
        self, peer: Peer, down_id: rpc.RequestId, reason: str | None = None, *, answer: bool = False
    ) -> None:
        """Stop one in-flight request upstream; with ``answer`` (the client cancelled it) its
        handler ends now with -32800 instead of waiting out the request timeout."""
        hit = peer.inflight.pop(down_id, None)
        if hit is None:
            return
        channel, up_id = hit
        pend = channel.state.pending.get(up_id)
        note = channel.state.cancel(up_id, reason)
        if answer and pend is not None and isinstance(pend.route, CallRoute):
            cancelled = rpc.error(down_id, rpc.REQUEST_CANCELLED, "Request cancelled")
            pend.route.mailbox.put(("final", cancelled))
        if note is not None:
            with contextlib.suppress(Exception):
                await channel.send(note)

    # ------------------------------------------------------------------ events from upstreams
    def on_events(self, channel: Channel, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, Delivery):
                route = ev.route
                if isinstance(route, ListenRoute):
                    route.forward(channel, ev.message, self)
                elif isinstance(route, CallRoute):
                    if ev.final:
                        route.mailbox.put(("final", ev.message))
                    else:
                        route.deliver(ev.message, ev.related)
            elif isinstance(ev, ServerRequest):
                self._server_request(channel, ev)
            elif isinstance(ev, Broadcast):
                self._broadcast(channel, ev.message)

    def _server_request(self, channel: Channel, ev: ServerRequest) -> None:
        method = ev.message.get("method")
        if method == "ping":
            self._background(channel.send(rpc.result(ev.up_id, {})))
            return
        route = ev.route
        if isinstance(route, CallRoute) and route.peer.era == "modern":
            route.mailbox.put(("request", ev))
            return
        peer = route.peer if isinstance(route, CallRoute) else self._any_legacy_peer()
        if peer is None or peer.closed:
            err = rpc.error(ev.up_id, rpc.METHOD_NOT_FOUND, f"no client connected to answer {method}")
            self._background(channel.send(err))
            return
        down_id = peer.next_request_id()
        peer.server_requests[down_id] = (channel, ev.up_id)
        out = {**ev.message, "id": down_id}
        peer.deliver(out, ev.related)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def server_changed(self, channel: Channel) -> None:
        """A server went away or came back: in an aggregate its tools go or return with it."""
        if self.single:
            return
        for kind in ("tools", "prompts", "resources"):
            self._broadcast(channel, rpc.notification(f"notifications/{kind}/list_changed"))

    def has_legacy_peer(self) -> bool:
        return self._any_legacy_peer() is not None

    def _any_legacy_peer(self) -> Peer | None:
        for p in self.peers:
            if p.era == "legacy" and not p.closed:
                return p
        return None

    def _broadcast(self, channel: Channel, message: rpc.Message) -> None:
        method = message.get("method", "")
        params = rpc.params_of(message)
        server = channel.server
        entry = self.entries.get(server)
        if entry is None:
            return

        def sees(peer: Peer) -> bool:  # the identity reaches this server with these credentials
            return entry.credentials_for(peer) == channel.credentials

        if method.endswith("/list_changed"):
            entry.list_cache.clear()
            kind = method.split("/")[1]
            flag = {
                "tools": "toolsListChanged",
                "prompts": "promptsListChanged",
                "resources": "resourcesListChanged",
            }
            for peer in list(self.peers):
                if not sees(peer):
                    continue
                if peer.era == "legacy":
                    peer.deliver(message, None)
                else:
                    for listen_id, wants in peer.listen.items():
                        if wants.get(flag.get(kind, "")):
                            note = {
                                **message,
                                "params": {**params, "_meta": {META_SUBSCRIPTION_ID: listen_id}},
                            }
                            peer.deliver(note, listen_id)
        elif method == "notifications/resources/updated":
            uri = self.uris.expose(server, str(params.get("uri", "")))
            note = {**message, "params": {**params, "uri": uri}}
            for peer in list(self.peers):
                if uri in peer.subscriptions and sees(peer):
                    if peer.era == "legacy":
                        peer.deliver(note, None)
                    else:
                        for listen_id, wants in peer.listen.items():
                            if uri in wants.get("resourceSubscriptions", []):
                                tagged = {
                                    **note,
                                    "params": {**note["params"], "_meta": {META_SUBSCRIPTION_ID: listen_id}},
                                }
                                peer.deliver(tagged, listen_id)
        elif method == "notifications/message":
            for peer in list(self.peers):
                if peer.era == "legacy" and peer.wants_log(params.get("level")) and sees(peer):
                    peer.deliver(message, None)
        elif method == "notifications/cancelled":
            up_id = params.get("requestId")
            for peer in list(self.peers):
                for down_id, target in list(peer.server_requests.items()):
                    if isinstance(target, tuple) and target[0] is channel and target[1] == up_id:
                        del peer.server_requests[down_id]
                        peer.deliver({**message, "params": {**params, "requestId": down_id}}, None)

    # ------------------------------------------------------------------ downstream input
    async def client_response(self, peer: Peer, message: rpc.Message) -> None:
        """A client's answer to a request an upstream made of it."""
        target = peer.server_requests.pop(message["id"], None)
        if target is None:
            return
        if isinstance(target, asyncio.Future):
            if not target.done():
                target.set_result(message)
            return
        channel, up_id = target
        await channel.send(channel.state.answer_server_request(up_id, message))

    async def client_notification(self, peer: Peer, message: rpc.Message) -> None:
        method = message["method"]
        params = rpc.params_of(message)
        if method == "notifications/cancelled":
            request_id = params.get("requestId")
            if isinstance(request_id, str | int):
                await self.cancel(peer, request_id, params.get("reason"), answer=True)
        elif method == "notifications/roots/list_changed":
            for entry in self.usable(peer):
                creds = entry.credentials_for(peer)
                pool = (
                    entry.channels.values()
                    if not creds
                    else [ch for (_, c), ch in entry.user_channels.items() if c == creds]
                )
                for ch in [*pool, *peer.hub_channels.values()]:
                    if ch.era == "legacy" and ch.ready.is_set():
                        await ch.send(message)
        # notifications/initialized and anything else: nothing to forward.

    async def request(self, peer: Peer, message: rpc.Message) -> rpc.Message:
        """Answer one downstream request; always returns a response message."""
        down_id = message["id"]
        try:
            if message["method"] == "tools/call":  # most requests: routed here, without the others' checks
                routed = self._route_call(message)
                if routed is not None:
                    return await self.forward(peer, routed[0], routed[1], "tools/call")
            result = await self._dispatch(peer, message)
        except rpc.ProtocolError as exc:
            return exc.to_message(down_id)
        except UpstreamUnavailable as exc:
            return rpc.error(down_id, rpc.UPSTREAM_UNAVAILABLE, str(exc))
        return result

    def _route_call(self, message: rpc.Message) -> tuple[str, rpc.Message] | None:
        """A tools/call's server and the call as that server must see it; None when the name is not
        known yet (``_dispatch`` lists the tools again first). ProtocolError for a tool the server's
        configuration does not offer."""
        try:
            server, rewritten = self._target("tools/call", message)
        except rpc.ProtocolError:
            return None
        self._check_offered(server, message, rewritten)
        return server, rewritten

    def _check_offered(self, server: str, message: rpc.Message, rewritten: rpc.Message) -> None:
        config = self.entries[server].config
        if config.filters_tools and not config.tool_allowed(str(rpc.params_of(rewritten).get("name", ""))):
            shown = rpc.params_of(message).get("name")
            raise rpc.ProtocolError(rpc.INVALID_PARAMS, f"Unknown tool: {shown}")

    async def _dispatch(self, peer: Peer, message: rpc.Message) -> rpc.Message:
        method: str = message["method"]
        params = rpc.params_of(message)
        down_id = message["id"]
        if peer.era == "modern" and method in REMOVED_IN_MODERN:
            raise rpc.ProtocolError(rpc.METHOD_NOT_FOUND, f"Method not found: {method}", http_status=404)
        if method == "initialize":
            return rpc.result(down_id, await self._initialize(peer, params))
        if method == "ping":
            return rpc.result(down_id, {})
        if method == "server/discover":
            return rpc.result(down_id, await self._discover(peer))
        if method == "logging/setLevel" and peer.era == "legacy":
            return await self._set_level(peer, message)
        if method in LIST_METHODS and not self.single:
            return rpc.result(down_id, await self._merged_list(peer, method, params))
        if method == "subscriptions/listen" and not (self.single and await self._modern_passthrough(peer)):
            return await self._listen(peer, message)
        if method in ("resources/subscribe", "resources/unsubscribe"):
            return await self._subscribe(peer, message)
        try:
            server, rewritten = self._target(method, message)
        except rpc.ProtocolError as exc:
            if exc.code != rpc.INVALID_PARAMS:
                raise
            await self.refresh_names(peer)  # a name this hub has not listed yet
            server, rewritten = self._target(method, message)
        if method == "tools/call":
            self._check_offered(server, message, rewritten)
        return await self.forward(peer, server, rewritten, method)

    def _target(self, method: str, message: rpc.Message) -> tuple[str, rpc.Message]:
        """Which server a request is for, and the request as that server must see it."""
        if self.single:
            return next(iter(self.entries)), message
        params = rpc.params_of(message)
        servers = list(self.entries)
        found: tuple[str, str] | None = None
        if method in ("tools/call", "prompts/get"):
            names = self.tools if method == "tools/call" else self.prompts
            found = names.resolve(str(params.get("name", "")), servers)
            if found is None:
                kind = "tool" if method == "tools/call" else "prompt"
                raise rpc.ProtocolError(rpc.INVALID_PARAMS, f"Unknown {kind}: {params.get('name')}")
            return found[0], {**message, "params": {**params, "name": found[1]}}
        if method == "resources/read":
            found = self.uris.resolve(str(params.get("uri", "")), servers)
            if found is None:
                raise rpc.ProtocolError(rpc.INVALID_PARAMS, f"Resource not found: {params.get('uri')}")
            return found[0], {**message, "params": {**params, "uri": found[1]}}
        if method == "completion/complete":
            ref = params.get("ref") if isinstance(params.get("ref"), dict) else {}
            assert isinstance(ref, dict)
            if ref.get("type") == "ref/prompt":
                found = self.prompts.resolve(str(ref.get("name", "")), servers)
                if found:
                    new_ref = {**ref, "name": found[1]}
            else:
                found = self.uris.resolve(str(ref.get("uri", "")), servers)
                if found:
                    new_ref = {**ref, "uri": found[1]}
            if found is None:
                raise rpc.ProtocolError(rpc.INVALID_PARAMS, "completion/complete: unknown reference")
            return found[0], {**message, "params": {**params, "ref": new_ref}}
        raise rpc.ProtocolError(rpc.METHOD_NOT_FOUND, f"Method not found: {method}", http_status=404)

    async def _modern_passthrough(self, peer: Peer) -> bool:
        if peer.era != "modern":
            return False
        entry = next(iter(self.entries.values()))
        ch = await entry.channel("modern", peer)
        return ch.era == "modern"

    # ------------------------------------------------------------------ forwarding
    async def forward(
        self, peer: Peer, server: str, message: rpc.Message, method: str, route: CallRoute | None = None
    ) -> rpc.Message:
        """Send one request to a server, in its era, and return the (translated) answer."""
        entry = self.entries[server]
        channel = await entry.channel(peer.era, peer)
        down_id = message["id"]
        route = route or CallRoute(owner=self, peer=peer, down_id=down_id)
        out = self._to_upstream(peer, channel, message, route)
        if channel.era == "legacy" and peer.era == "modern" and method == "tools/call":
            return await self._held_call(peer, channel, out, route, message)
        reply = await self._exchange(peer, channel, out, route)
        return self._from_upstream(peer, channel, server, method, reply)

    def _to_upstream(
        self, peer: Peer, channel: Channel, message: rpc.Message, route: CallRoute
    ) -> rpc.Message:
        params = rpc.params_of(message)
        meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else None
        if peer.era == "modern":
            route.modern_log_level = (meta or {}).get(META_LOG_LEVEL)
        if (
            channel.era == "legacy"
            and meta is not None
            and (peer.era == "modern" or META_PROTOCOL_VERSION in meta)
        ):
            # A handshake-era upstream refuses the 2026-07-28 envelope (some dual-era
            # clients send it inside a session too), so it never reaches one.
            stripped = {k: v for k, v in meta.items() if k not in ENVELOPE_KEYS}
            new_params = {
                k: v for k, v in params.items() if k not in ("_meta", "inputResponses", "requestState")
            }
            if stripped:
                new_params["_meta"] = stripped
            return {**message, "params": new_params}
        if channel.era == "modern" and peer.era == "legacy":
            envelope = modern_meta(peer.client_capabilities, peer.client_info)
            if peer.log_level is not None:
                envelope[META_LOG_LEVEL] = peer.log_level
            return {**message, "params": {**params, "_meta": {**(meta or {}), **envelope}}}
        return message

    async def _exchange(
        self, peer: Peer, channel: Channel, message: rpc.Message, route: CallRoute
    ) -> rpc.Message:
        """Forward one request and wait for its final answer (answering MRTR for legacy peers)."""
        down_id = message["id"]
        while True:
            up = channel.state.forward_request(route, message, accepts_requests=True)
            peer.inflight[down_id] = (channel, up["id"])
            await channel.send(up)
            try:
                while True:
                    kind, payload = await route.mailbox.get(self.request_timeout)
                    if kind == "final":
                        break
                    # A handshake-era upstream asked a 2026-07-28 client something outside
                    # tools/call, where no input_required round trip exists: it is refused.
                    await channel.send(
                        rpc.error(
                            payload.up_id, rpc.METHOD_NOT_FOUND, "the client cannot answer requests here"
                        )
                    )
            except TimeoutError:
                await self.cancel(peer, down_id, "timed out")
                return rpc.error(
                    down_id, rpc.REQUEST_TIMEOUT, f"upstream {channel.server!r} did not answer in time"
                )
            except asyncio.CancelledError:
                await self.cancel(peer, down_id, GONE)
                raise
            finally:
                peer.inflight.pop(down_id, None)
            reply: rpc.Message = payload
            result = reply.get("result")
            if (
                channel.era == "modern"
                and peer.era == "legacy"
                and isinstance(result, dict)
                and result.get("resultType") == "input_required"
            ):
                message = await self._answer_input_requests(peer, message, result)
                continue
            return reply

    async def _answer_input_requests(
        self, peer: Peer, message: rpc.Message, result: dict[str, Any]
    ) -> rpc.Message:
        """A modern upstream asked for input: ask the legacy client, then retry with the answers."""
        requests = result.get("inputRequests") or {}
        answers: dict[str, Any] = {}

        async def ask(key: str, req: dict[str, Any]) -> None:
            fut: asyncio.Future[rpc.Message] = asyncio.get_running_loop().create_future()
            rid = peer.next_request_id()
            peer.server_requests[rid] = fut
            peer.deliver(rpc.request(rid, str(req.get("method")), req.get("params") or {}), message["id"])
            reply = await asyncio.wait_for(fut, self.request_timeout)
            if "error" in reply:
                raise rpc.ProtocolError(
                    reply["error"].get("code", rpc.INTERNAL_ERROR), reply["error"].get("message", "")
                )
            answers[key] = reply.get("result", {})

        await asyncio.gather(*(ask(k, v) for k, v in requests.items() if isinstance(v, dict)))
        params = dict(rpc.params_of(message))
        params["inputResponses"] = answers
        if "requestState" in result:
            params["requestState"] = result["requestState"]
        else:
            params.pop("requestState", None)
        return {**message, "params": params}

    async def _held_call(
        self, peer: Peer, channel: Channel, out: rpc.Message, route: CallRoute, original: rpc.Message
    ) -> rpc.Message:
        """tools/call from a modern client to a legacy upstream: server requests become input_required."""
        params = rpc.params_of(original)
        down_id = original["id"]
        # Bound to the caller too: a state handle is not authentication, so another identity
        # presenting it (a stolen or guessed state) gets -32602 like a tampered one.
        binding = f"{self.path}|tools/call|{params.get('name')}|{peer.identity.subject}"
        state = params.get("requestState")
        held: HeldCall | None = None
        if state is not None or "inputResponses" in params:
            handle = self.sealer.open(state, binding, time.time())
            held = self.held.get(handle) if handle else None
            if held is None:
                raise rpc.ProtocolError(rpc.INVALID_PARAMS, "Invalid or expired requestState")
            responses = params.get("inputResponses")
            if not isinstance(responses, dict) or set(held.outstanding) - set(responses):
                raise rpc.ProtocolError(rpc.INVALID_PARAMS, "inputResponses must answer every input request")
            route = held.route
            route.peer = peer
            route.down_id = down_id
            channel = held.channel
            channel.state.reroute(held.up_id, route, down_id)
            for key, up_req_id in held.outstanding.items():
                await channel.send(rpc.result(up_req_id, responses[key]))
            held.outstanding.clear()
        else:
            up = channel.state.forward_request(route, out, accepts_requests=True)
            handle = secrets.token_urlsafe(16)
            held = HeldCall(handle, channel, up["id"], route)
            await channel.send(up)
        peer.inflight[down_id] = (channel, held.up_id)
        try:
            kind, payload = await route.mailbox.get(self.request_timeout)
            # Server requests that arrive together are answered together.
            batch = [(kind, payload)]
            if kind == "request":
                await asyncio.sleep(0.01)
                while route.mailbox.items:
                    batch.append(route.mailbox.items.popleft())
        except TimeoutError:
            self.held.pop(held.handle, None)
            await self.cancel(peer, down_id, "timed out")
            return rpc.error(down_id, rpc.REQUEST_TIMEOUT, "upstream did not answer in time")
        except asyncio.CancelledError:
            await self.cancel(peer, down_id, GONE)
            raise
        finally:
            peer.inflight.pop(down_id, None)
        finals = [p for k, p in batch if k == "final"]
        if finals:
            self.held.pop(held.handle, None)
            return self._from_upstream(peer, channel, channel.server, "tools/call", finals[0])
        missing = {
            CAPABILITY_FOR[ev.message["method"]]
            for _, ev in batch
            if CAPABILITY_FOR.get(ev.message["method"]) not in (None, *peer.client_capabilities)
        }
        if missing:
            # The client did not declare what the upstream needs: say so (-32021), stop the call.
            for _, ev in batch:
                await channel.send(
                    rpc.error(ev.up_id, rpc.METHOD_NOT_FOUND, "the client lacks this capability")
                )
            self.held.pop(held.handle, None)
            note = channel.state.cancel(held.up_id, "client lacks a required capability")
            if note is not None:
                await channel.send(note)
            raise rpc.ProtocolError(
                rpc.MISSING_CLIENT_CAPABILITY,
                "Missing required client capability",
                {"requiredCapabilities": {cap: {} for cap in sorted(missing)}},
            )
        input_requests: dict[str, Any] = {}
        for n, (_, ev) in enumerate(batch):
            key = f"input-{held.up_id}-{len(held.outstanding) + n}"
            held.outstanding[key] = ev.up_id
            input_requests[key] = {"method": ev.message["method"], "params": ev.message.get("params", {})}
        self.held[held.handle] = held
        # Keep the upstream call alive but attached to no exchange until the retry.
        channel.state.reroute(held.up_id, route, down_id)
        self._expire_held()
        return rpc.result(
            down_id,
            {
                "resultType": "input_required",
                "inputRequests": input_requests,
                "requestState": self.sealer.seal(held.handle, binding, time.time() + MRTR_HOLD_SECONDS),
            },
        )

    def _expire_held(self) -> None:
        now = time.monotonic()
        for handle, held in list(self.held.items()):
            if held.expires < now:
                del self.held[handle]
                note = held.channel.state.cancel(held.up_id, "input was never provided")
                if note is not None:
                    self._background(held.channel.send(note))

    def _from_upstream(
        self, peer: Peer, channel: Channel, server: str, method: str, reply: rpc.Message
    ) -> rpc.Message:
        result = reply.get("result")
        if not isinstance(result, dict):
            return reply
        out = result
        config = self.entries[server].config
        if method == "tools/list" and (config.tools_allow or config.tools_deny):
            out = {**out, "tools": self._offered(server, out.get("tools"))}
        if method in ("tools/list", "prompts/list", "resources/list", "resources/templates/list"):
            out = self._rename_list(server, method, out)
            if method == "tools/list":
                self._remember_tools(out.get("tools"))
        if channel.era == "legacy" and peer.era == "modern":
            out = {**out, "resultType": out.get("resultType", "complete")}
            if method in CACHEABLE:
                out.setdefault("ttlMs", 0)
                out.setdefault("cacheScope", "private")
            meta = out.get("_meta") if isinstance(out.get("_meta"), dict) else {}
            out["_meta"] = {**(meta or {}), META_SERVER_INFO: self._server_info(channel)}
        elif channel.era == "modern" and peer.era == "legacy":
            out = {k: v for k, v in out.items() if k not in ("resultType", "ttlMs", "cacheScope")}
        if out is result:
            return reply
        return {**reply, "result": out}

    def _offered(self, server: str, tools: Any) -> list[Any]:
        """A server's tools minus those its configuration hides (tools allow/deny)."""
        config = self.entries[server].config
        if not isinstance(tools, list):
            return []
        return [t for t in tools if isinstance(t, dict) and config.tool_allowed(str(t.get("name", "")))]

    def _rename_list(self, server: str, method: str, result: dict[str, Any]) -> dict[str, Any]:
        if self.single:
            return result
        key = LIST_METHODS[method]
        items = result.get(key)
        if not isinstance(items, list):
            return result
        renamed = [self._rename_item(server, key, it) for it in items if isinstance(it, dict)]
        return {**result, key: renamed}

    def _rename_item(self, server: str, key: str, item: dict[str, Any]) -> dict[str, Any]:
        if key == "tools":
            return {**item, "name": self.tools.expose(server, str(item.get("name", "")))}
        if key == "prompts":
            return {**item, "name": self.prompts.expose(server, str(item.get("name", "")))}
        if key == "resources":
            return {**item, "uri": self.uris.expose(server, str(item.get("uri", "")))}
        return {**item, "uriTemplate": self.uris.expose(server, str(item.get("uriTemplate", "")))}

    def _server_info(self, channel: Channel) -> Any:
        if self.single:
            info = channel.init_result.get("serverInfo")
            if info is None:
                info = (channel.init_result.get("_meta") or {}).get(META_SERVER_INFO)
            if info is not None:
                return info
        return {"name": "mcp-bastion", "version": __version__}

    # ------------------------------------------------------------------ local methods
    async def _initialize(self, peer: Peer, params: dict[str, Any]) -> dict[str, Any]:
        peer.protocol_version = negotiate_handshake(params.get("protocolVersion"))
        caps = params.get("capabilities")
        peer.client_capabilities = caps if isinstance(caps, dict) else {}
        peer.client_info = params.get("clientInfo")
        if self.single:
            entry = next(iter(self.entries.values()))
            ch = await entry.channel("legacy", peer)
            init = ch.init_result
            if ch.era == "modern":
                return {
                    "protocolVersion": peer.protocol_version,
                    "capabilities": init.get("capabilities", {}),
                    "serverInfo": self._server_info(ch),
                    **({"instructions": init["instructions"]} if "instructions" in init else {}),
                }
            out = {k: v for k, v in init.items() if k != "protocolVersion"}
            out["protocolVersion"] = peer.protocol_version
            return out
        caps_all, instructions = await self._aggregate_capabilities(peer)
        out = {
            "protocolVersion": peer.protocol_version,
            "capabilities": caps_all,
            "serverInfo": {"name": "mcp-bastion", "version": __version__},
        }
        if instructions:
            out["instructions"] = instructions
        return out

    async def _aggregate_capabilities(self, peer: Peer) -> tuple[dict[str, Any], str]:
        caps: dict[str, Any] = {"logging": {}}
        notes: list[str] = []

        async def one(entry: ServerEntry) -> None:
            try:
                ch = await entry.channel(peer.era, peer)
            except UpstreamUnavailable:
                return
            c = ch.init_result.get("capabilities") or {}
            for kind in ("tools", "prompts", "resources"):
                if kind in c:
                    caps.setdefault(kind, {})["listChanged"] = True
            if isinstance(c.get("resources"), dict) and c["resources"].get("subscribe"):
                caps["resources"]["subscribe"] = True
            if "completions" in c:
                caps["completions"] = {}
            if ch.init_result.get("instructions"):
                notes.append(f"[{entry.name}] {ch.init_result['instructions']}")

        await asyncio.gather(*(one(e) for e in self.usable(peer)))
        return caps, "\n\n".join(sorted(notes))

    async def _discover(self, peer: Peer) -> dict[str, Any]:
        if self.single:
            entry = next(iter(self.entries.values()))
            ch = await entry.channel("modern", peer)
            if ch.era == "modern":
                return ch.init_result
            init = ch.init_result
            out: dict[str, Any] = {
                "resultType": "complete",
                "supportedVersions": [LATEST_MODERN],
                "capabilities": init.get("capabilities", {}),
                "_meta": {META_SERVER_INFO: self._server_info(ch)},
                "ttlMs": 0,
                "cacheScope": "private",
            }
            if init.get("instructions"):
                out["instructions"] = init["instructions"]
            return out
        caps, instructions = await self._aggregate_capabilities(peer)
        result = {
            "resultType": "complete",
            "supportedVersions": [LATEST_MODERN],
            "capabilities": caps,
            "_meta": {META_SERVER_INFO: {"name": "mcp-bastion", "version": __version__}},
            "ttlMs": 0,
            "cacheScope": "private",
        }
        if instructions:
            result["instructions"] = instructions
        return result

    async def _set_level(self, peer: Peer, message: rpc.Message) -> rpc.Message:
        level = rpc.params_of(message).get("level")
        if level_index(level) == 0 and level != "debug":
            return rpc.error(message["id"], rpc.INVALID_PARAMS, f"Invalid log level: {level!r}")
        peer.log_level = str(level)
        # The shared upstream logs at the most verbose level any of its sessions wants;
        # each session's own level is applied when the gateway delivers.
        levels = [p.log_level for p in self.peers if p.era == "legacy" and p.log_level]
        lowest = min(levels, key=level_index) if levels else peer.log_level
        last: rpc.Message = rpc.result(message["id"], {})
        for entry in self.usable(peer):
            try:
                ch = await entry.channel("legacy", peer)
            except UpstreamUnavailable:
                continue
            if ch.era != "legacy" or "logging" not in (ch.init_result.get("capabilities") or {}):
                continue
            fwd = {**message, "params": {**rpc.params_of(message), "level": lowest}}
            reply = await self._exchange(
                peer, ch, fwd, CallRoute(owner=self, peer=peer, down_id=message["id"])
            )
            if "error" in reply and self.single:
                last = reply
        return last

    async def _subscribe(self, peer: Peer, message: rpc.Message) -> rpc.Message:
        method = message["method"]
        uri = str(rpc.params_of(message).get("uri", ""))
        if method == "resources/subscribe":
            peer.subscriptions.add(uri)
        else:
            peer.subscriptions.discard(uri)
        server, rewritten = (
            (next(iter(self.entries)), message) if self.single else self._route_uri(message, uri)
        )
        entry = self.entries[server]
        ch = await entry.channel("legacy", peer)
        if ch.era == "modern":
            return await self._modern_subscription(
                peer, ch, message, str(rpc.params_of(rewritten).get("uri", ""))
            )
        return await self._exchange(
            peer, ch, rewritten, CallRoute(owner=self, peer=peer, down_id=message["id"])
        )

    async def _modern_subscription(
        self, peer: Peer, ch: Channel, message: rpc.Message, upstream_uri: str
    ) -> rpc.Message:
        """resources/(un)subscribe from a handshake-era client to a 2026-07-28 upstream: a
        ``subscriptions/listen`` held upstream for that URI stands in for the subscription."""
        key = f"{ch.server}|{upstream_uri}"
        held = peer.upstream_listens.pop(key, None)
        if held is not None:
            note = held[0].state.cancel(held[1], "unsubscribed")
            if note is not None:
                await held[0].send(note)
        if message["method"] == "resources/subscribe":
            route = ListenRoute(owner=self, peer=peer, down_id=f"listen-{key}")
            params = {
                "notifications": {"resourceSubscriptions": [upstream_uri]},
                "_meta": modern_meta(peer.client_capabilities, peer.client_info),
            }
            up = ch.state.forward_request(
                route, rpc.request(route.down_id, "subscriptions/listen", params), accepts_requests=False
            )
            peer.upstream_listens[key] = (ch, up["id"])
            await ch.send(up)
        return rpc.result(message["id"], {})

    def _route_uri(self, message: rpc.Message, uri: str) -> tuple[str, rpc.Message]:
        found = self.uris.resolve(uri, list(self.entries))
        if found is None:
            raise rpc.ProtocolError(rpc.INVALID_PARAMS, f"Resource not found: {uri}")
        params = rpc.params_of(message)
        return found[0], {**message, "params": {**params, "uri": found[1]}}

    async def _listen(self, peer: Peer, message: rpc.Message) -> rpc.Message:
        """subscriptions/listen served by the gateway (aggregate, or a legacy upstream)."""
        params = rpc.params_of(message)
        wanted = params.get("notifications") if isinstance(params.get("notifications"), dict) else {}
        assert isinstance(wanted, dict)
        honoured: dict[str, Any] = {}
        for flag in ("toolsListChanged", "promptsListChanged", "resourcesListChanged"):
            if wanted.get(flag):
                honoured[flag] = True
        uris = [u for u in wanted.get("resourceSubscriptions") or [] if isinstance(u, str)]
        if uris:
            honoured["resourceSubscriptions"] = uris
        listen_id = message["id"]
        peer.listen[listen_id] = honoured
        for uri in uris:
            peer.subscriptions.add(uri)
            with contextlib.suppress(rpc.ProtocolError, UpstreamUnavailable):
                req = rpc.request(listen_id, "resources/subscribe", {"uri": uri})
                server, sub = (next(iter(self.entries)), req) if self.single else self._route_uri(req, uri)
                ch = await self.entries[server].channel("legacy", peer)
                if ch.era == "legacy":
                    await self._exchange(
                        peer, ch, sub, CallRoute(owner=self, peer=peer, down_id=f"sub-{listen_id}")
                    )
        ack = rpc.notification(
            "notifications/subscriptions/acknowledged",
            {"notifications": honoured, "_meta": {META_SUBSCRIPTION_ID: listen_id}},
        )
        peer.deliver(ack, listen_id)
        try:
            await asyncio.Event().wait()  # held open until the client closes the stream
        finally:
            peer.listen.pop(listen_id, None)
        return rpc.result(listen_id, {"resultType": "complete"})

    # ------------------------------------------------------------------ aggregation
    async def _server_list(self, peer: Peer, entry: ServerEntry, method: str) -> list[dict[str, Any]]:
        cache_key = f"{method}|{peer.era}|{entry.credentials_for(peer)}"
        if cache_key in entry.list_cache:
            return entry.list_cache[cache_key]
        key = LIST_METHODS[method]
        items: list[dict[str, Any]] = []
        cursor: Any = None
        ch = await entry.channel(peer.era, peer, wait=False)
        caps = ch.init_result.get("capabilities") or {}
        if (key.startswith("resource") and "resources" not in caps) or (
            key in ("tools", "prompts") and key not in caps
        ):
            return []
        for _ in range(1000):
            params: dict[str, Any] = {}
            if cursor is not None:
                params["cursor"] = cursor
            if ch.era == "modern":
                params["_meta"] = modern_meta(peer.client_capabilities or None, peer.client_info)
            reply = await ch.call(method, params, self.request_timeout)
            page = reply.get(key) if isinstance(reply, dict) else None
            if isinstance(page, list):
                items.extend(i for i in page if isinstance(i, dict))
            cursor = reply.get("nextCursor") if isinstance(reply, dict) else None
            if cursor is None:
                break
        if key == "tools":
            items = self._offered(entry.name, items)
        entry.list_cache[cache_key] = items
        return items

    async def refresh_names(self, peer: Peer) -> dict[str, dict[str, list[dict[str, Any]]]]:
        lists: dict[str, dict[str, list[dict[str, Any]]]] = {}

        async def one(entry: ServerEntry) -> None:
            got: dict[str, list[dict[str, Any]]] = {}
            for method in LIST_METHODS:
                try:
                    got[method] = await self._server_list(peer, entry, method)
                except UpstreamUnavailable as exc:
                    log.warning("upstream_list_failed", server=entry.name, method=method, error=str(exc))
                    got[method] = []
            lists[entry.name] = got

        await asyncio.gather(*(one(e) for e in self.usable(peer)))
        self._last_lists.update(lists)
        lists = {name: self._last_lists.get(name, lists.get(name, {})) for name in self.entries}
        lists = {name: got for name, got in lists.items() if got}
        self.tools.rebuild({s: [str(t.get("name")) for t in v["tools/list"]] for s, v in lists.items()})
        self.prompts.rebuild({s: [str(t.get("name")) for t in v["prompts/list"]] for s, v in lists.items()})
        self.uris.rebuild(
            {s: [str(t.get("uri")) for t in v["resources/list"]] for s, v in lists.items()},
            {s: [str(t.get("uriTemplate")) for t in v["resources/templates/list"]] for s, v in lists.items()},
        )
        return lists

    async def _merged_list(self, peer: Peer, method: str, params: dict[str, Any]) -> dict[str, Any]:
        lists = await self.refresh_names(peer)
        allowed = {e.name for e in self.usable(peer)}
        lists = {name: got for name, got in lists.items() if name in allowed}
        key = LIST_METHODS[method]
        merged: list[dict[str, Any]] = []
        for server in sorted(lists):
            merged.extend(self._rename_item(server, key, it) for it in lists[server][method])
        if key == "tools":
            merged.sort(key=lambda t: str(t.get("name")))
        offset = 0
        cursor = params.get("cursor")
        if cursor is not None:
            try:
                offset = int(orjson.loads(base64.urlsafe_b64decode(str(cursor)))["o"])
            except Exception:
                raise rpc.ProtocolError(rpc.INVALID_PARAMS, "Invalid cursor") from None
            if offset < 0 or offset > len(merged):
                raise rpc.ProtocolError(rpc.INVALID_PARAMS, "Invalid cursor")
        page = merged[offset : offset + self.page_size]
        if key == "tools":
            self._remember_tools(page)
        out: dict[str, Any] = {key: page}
        if offset + self.page_size < len(merged):
            out["nextCursor"] = base64.urlsafe_b64encode(
                orjson.dumps({"o": offset + self.page_size})
            ).decode()
        if peer.era == "modern":
            out.update({"resultType": "complete", "ttlMs": 0, "cacheScope": "private"})
        return out

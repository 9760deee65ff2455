"""The gateway's end of the tunnel: ``/connect``, servers that connectors bring, ``TunnelTransport``.

A connector authenticates with its token (always, auth on or off), says which servers it has (HELLO)
and gets told which the gateway took (WELCOME). Each accepted server becomes an ordinary Streamable
HTTP upstream whose httpx client sends every request as one stream over the connector's link
(:class:`TunnelTransport`), so sessions, SSE, cancellation and both eras work as for any HTTP upstream.
Servers stay when their connector drops: calls then fail at once with "connector <c> is offline".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import structlog

from ..config import ServerConfig
from ..core import jsonrpc as rpc
from ..core.eras import H_SESSION
from ..core.names import valid_server_name
from ..upstream.base import Era, Sink
from ..upstream.http import StreamableHttpChannel, sse_events
from . import protocol as p
from .link import AsgiWire, Link, StreamReset, TunnelStream

if TYPE_CHECKING:
    from ..auth.store import Store
    from ..gateway import Gateway

log = structlog.get_logger("mcp_bastion.tunnel")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

CONNECT_PATH = "/connect"
TUNNEL_HOST = "tunnel.invalid"  # the host of a tunnel server's URL: never resolved, never dialled
HELLO_TIMEOUT = 10.0
REVOCATION_CHECK_SECONDS = 2.0  # a revoked connector's link closes within this (plus a store read)
# Request headers that describe the gateway's own connection, not the request.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"trailer"}
)


def tunnel_url(server: str) -> str:
    return f"http://{TUNNEL_HOST}/servers/{server}/mcp"


def offline(connector: str) -> str:
    return f"connector {connector!r} is offline"


@dataclasses.dataclass
class Attached:
    """One connector's live link."""

    name: str
    connector_id: str
    link: Link
    address: str
    since: datetime
    servers: list[str]
    software: str


class TunnelRegistry:
    """Which connector brought which server, and which connectors are attached now (one per process)."""

    def __init__(self) -> None:
        self.owners: dict[str, str] = {}  # server name -> connector name (kept across drops)
        self.attached: dict[str, Attached] = {}  # connector name -> live link

    def route(self, server: str) -> tuple[str, Link | None]:
        connector = self.owners.get(server, "?")
        found = self.attached.get(connector)
        return connector, (found.link if found is not None and not found.link.closed.is_set() else None)

    def online(self, server: str) -> bool:
        return self.route(server)[1] is not None


REGISTRY = TunnelRegistry()


class _ResponseBody(httpx.AsyncByteStream):
    """A response body read from a stream; closing it early resets the stream (the request's cancel)."""

    def __init__(self, stream: TunnelStream, connector: str) -> None:
        self.stream = stream
        self.connector = connector
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                chunk = await self.stream.read()
            except StreamReset as exc:
                self.done = True
                raise httpx.ReadError(_lost(self.connector, self.stream.link, str(exc))) from None
            if not chunk:
                self.done = True
                return
            yield chunk

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.stream.reset("the gateway closed the response")


def _lost(connector: str, link: Link, reason: str) -> str:
    if link.closed.is_set():
        return f"{offline(connector)} (the link was lost: {link.reason or reason})"
    return f"connector {connector!r}: stream reset ({reason})"


class TunnelTransport(httpx.AsyncBaseTransport):
    """httpx transport for a server behind a connector: one request per stream over its live link."""

    def __init__(self, server: str, registry: TunnelRegistry = REGISTRY) -> None:
        self.server = server
        self.registry = registry

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        connector, link = self.registry.route(self.server)
        if link is None:
            raise httpx.ConnectError(offline(connector), request=request)
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in request.headers.raw
            if k.lower() not in HOP_BY_HOP
        ]
        path = request.url.raw_path.decode("ascii")
        stream: TunnelStream | None = None
        try:
            if isinstance(request.stream, httpx.ByteStream):
                # The whole body is known (every POST the channel makes): head, body and END leave
                # as one batch, not three sends.
                stream = await link.open(request.method, path, headers, body=request.content)
            else:
                stream = await link.open(request.method, path, headers)
                assert isinstance(request.stream, httpx.AsyncByteStream)
                async for chunk in request.stream:
                    await stream.write(chunk)
                await stream.end()
            head = await stream.response
        except ConnectionError as exc:  # the stream was reset, or the link went away under it
            if stream is not None:
                stream.reset("the request could not be sent")
            raise httpx.ReadError(_lost(connector, link, str(exc)), request=request) from None
        except BaseException:
            if stream is not None:
                stream.reset("the request was cancelled")
            raise
        return httpx.Response(
            head.status, headers=head.headers, stream=_ResponseBody(stream, connector), request=request
        )


class TunnelClient(httpx.AsyncClient):
    """The httpx client of a tunnel server: requests go straight to its :class:`TunnelTransport`.

    The generic client's per-request work (URL merging, cookie jar, auth flow, redirect handling,
    a bound stream per response) cost about a quarter of the gateway's CPU per tunnelled call and
    means nothing here: the URL is fixed, there are no cookies or redirects, and the transport
    ignores timeouts (a lost link fails the stream at once)."""

    def __init__(self, server: str, timeout: float, registry: TunnelRegistry = REGISTRY) -> None:
        self.tunnel = TunnelTransport(server, registry)
        super().__init__(
            timeout=httpx.Timeout(timeout, read=None), follow_redirects=False, transport=self.tunnel
        )
        self._urls: dict[str, httpx.URL] = {}

    def build_request(  # type: ignore[override]
        self,
        method: str,
        url: httpx.URL | str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Request:
        if not isinstance(url, str) or any(v is not None for k, v in kwargs.items() if k != "timeout"):
            return super().build_request(method, url, content=content, headers=headers, **kwargs)
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = httpx.URL(url)
        return httpx.Request(method, parsed, content=content, headers=headers)

    async def send(self, request: httpx.Request, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        response = await self.tunnel.handle_async_request(request)
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response


class TunnelChannel(StreamableHttpChannel):
    """Streamable HTTP to a server behind a connector, with the hot path (one POST per request,
    answered with JSON) written against the link directly: building and reading httpx requests and
    responses cost more gateway CPU per call than the tunnel itself. SSE answers, notifications, the
    GET stream and DELETE still go through :class:`TunnelClient`, with the same behaviour and errors."""

    def __init__(
        self, server: str, era: Era, sink: Sink, url: str, headers: Mapping[str, str], timeout: float
    ) -> None:
        client = TunnelClient(server, timeout)
        super().__init__(server, era, sink, url, headers, timeout, client=client)
        self.tunnel = client.tunnel
        parsed = httpx.URL(url)
        self._path = parsed.raw_path.decode("ascii")
        self._host = parsed.netloc.decode("ascii")

    async def _post_request(self, message: rpc.Message, retried: bool = False) -> None:
        connector, link = self.tunnel.registry.route(self.tunnel.server)
        if link is None:
            self._fail(message, offline(connector))
            return
        body = orjson.dumps(message)
        headers = [("host", self._host), *self._request_headers(message).items()]
        headers.append(("content-length", str(len(body))))
        stream: TunnelStream | None = None
        finished = False
        try:
            stream = await link.open("POST", self._path, headers, body=body)
            head = await stream.response
            fields = {k.lower(): v for k, v in head.headers}
            ctype = fields.get("content-type", "")
            if head.status == 404 and self.session_id and not retried and message["method"] != "initialize":
                while await stream.read():
                    pass
                finished = True
                await self._reinitialize()
                await self._post_request(message, retried=True)
                return
            sid = fields.get(H_SESSION.lower())
            if sid and message["method"] == "initialize":
                self.session_id = sid
            learn = message["method"] == "tools/list" and self.era == "modern"
            if ctype.startswith("text/event-stream"):
                finished = True  # the response object owns the stream from here (and resets it if left)
                response = httpx.Response(
                    head.status, headers=head.headers, stream=_ResponseBody(stream, connector)
                )
                try:
                    async for _event, data in sse_events(response):
                        self._feed(data, learn)
                except httpx.HTTPError as exc:
                    self._fail(message, str(exc) or type(exc).__name__)
                    return
                finally:
                    await response.aclose()
            else:
                parts = []
                while chunk := await stream.read():
                    parts.append(chunk)
                finished = True
                if not ctype.startswith("application/json"):
                    self._fail(message, f"HTTP {head.status} without a JSON-RPC answer")
                    return
                self._feed(b"".join(parts), learn)
        except ConnectionError as exc:  # the stream was reset, or the link went away under it
            finished = True
            if stream is not None:
                stream.reset("the request could not be completed")
            self._fail(message, _lost(connector, link, str(exc)))
            return
        finally:
            if not finished and stream is not None:
                stream.reset("the gateway closed the response")  # cancelled (2026-07-28: the cancel)
        if message["id"] in self.state.pending:
            self._fail(message, "the response stream ended without an answer")


async def deny(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    """Refuse a WebSocket before the upgrade: an HTTP status where the server supports it, else close."""
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        body = orjson.dumps({"error": message})
        headers = [(b"content-type", b"application/json")]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="mcp-bastion connectors"'))
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return str(v.decode("latin-1"))
    return None


def _address(scope: Scope) -> str:
    client = scope.get("client")
    if isinstance(client, list | tuple) and len(client) == 2:
        return f"{client[0]}:{client[1]}"
    return "?"


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Relay:
    """Accepts connectors on ``/connect`` and adds the servers they bring to the gateway."""

    def __init__(self, gateway: Gateway, registry: TunnelRegistry = REGISTRY) -> None:
        self.gateway = gateway
        self.registry = registry
        self._own_store: Store | None = None
        self._store_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    # ---- store (the gateway's with auth on; opened here with auth off) -----------------------------------
    async def store(self) -> Store:
        if self.gateway.store is not None:
            return self.gateway.store
        async with self._store_lock:
            if self._own_store is None:
                from ..auth.store import Store

                self._own_store = await Store.open(self.gateway.settings.store_url())
            return self._own_store

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for attached in list(self.registry.attached.values()):
            await attached.link.close("the gateway is shutting down", 1001)
        if self._own_store is not None:
            await self._own_store.close()
            self._own_store = None

    # ---- readiness -------------------------------------------------------------------------------
    def owner(self, server: str) -> str | None:
        return self.registry.owners.get(server)

    def online(self, server: str) -> bool:
        return self.registry.online(server)

    def report(self) -> dict[str, Any]:
        return {
            a.name: {"since": _iso(a.since), "from": a.address, "servers": a.servers, "software": a.software}
            for a in self.registry.attached.values()
        }

    # ---- /connect --------------------------------------------------------------------------------
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One connector's WebSocket, from the upgrade to the end of its link."""
        policy = self.gateway.app.policy
        if not policy.host_ok(_header(scope, b"host")):
            log.warning("connector_rejected", reason="invalid Host header", host=_header(scope, b"host"))
            await deny(scope, receive, send, 403, "Forbidden: invalid Host header")
            return
        if not policy.origin_ok(_header(scope, b"origin")):
            log.warning("connector_rejected", reason="invalid Origin header")
            await deny(scope, receive, send, 403, "Forbidden: invalid Origin header")
            return
        auth = _header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        address = _address(scope)
        if scheme.lower() != "bearer" or not token.strip():
            log.warning("connector_rejected", reason="no connector token", address=address)
            await deny(scope, receive, send, 401, "a connector token is required (Authorization: Bearer)")
            return
        try:
            store = await self.store()
            record = await store.find_connector(token.strip())
        except Exception as exc:  # the store is unreachable: say so, let the connector retry
            log.error("connector_store_failed", error=f"{type(exc).__name__}: {exc}")
            await deny(scope, receive, send, 503, "the gateway cannot check connector tokens now")
            return
        if record is None:
            log.warning("connector_rejected", reason="unknown or revoked token", address=address)
            await deny(scope, receive, send, 401, "unknown or revoked connector token")
            return
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        await self._run(record.name, record.id, address, store, AsgiWire(receive, send))

    async def _run(self, name: str, connector_id: str, address: str, store: Store, wire: AsgiWire) -> None:
        hello: asyncio.Future[p.Hello] = asyncio.get_running_loop().create_future()

        def control(ev: p.Event) -> None:
            if isinstance(ev, p.Hello) and not hello.done():
                hello.set_result(ev)

        link = Link(wire, p.Mux("gateway"), on_control=control)
        running = asyncio.create_task(link.run())
        try:
            waitables: set[asyncio.Future[Any]] = {hello, running}
            done, _ = await asyncio.wait(
                waitables, timeout=HELLO_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            if hello not in done:
                hello.cancel()
                if running not in done:
                    await link.close("no HELLO from the connector", 1002)
                return
            offer = hello.result()
            if offer.connector and offer.connector != name:
                await link.close(f"this token belongs to connector {name!r}, not {offer.connector!r}", 1008)
                return
            previous = self.registry.attached.get(name)
            if previous is not None:  # a reconnect the old link has not noticed yet: the new one wins
                log.info("connector_replaced", connector=name)
                del self.registry.attached[name]  # so its own ending does not mark the row detached
                await previous.link.close("replaced by a newer connection of the same connector")
            accepted, refused = self._accept(name, offer.servers)
            try:
                await link.send_frames(link.mux.welcome(accepted, refused))
            except ConnectionError:
                return  # gone already; its servers stay, offline
            now = datetime.now(UTC)
            attached = Attached(name, connector_id, link, address, now, accepted, offer.software)
            self.registry.attached[name] = attached
            log.info(
                "connector_attached",
                connector=name,
                address=address,
                servers=accepted,
                refused=refused or None,
                software=offer.software or None,
            )
            with contextlib.suppress(Exception):
                await store.connector_attached(connector_id, address, accepted)
            self._start_watcher()
            for server in accepted:
                self._warm(server)
            reason = await running
            if self.registry.attached.get(name) is attached:
                del self.registry.attached[name]
                with contextlib.suppress(Exception):
                    await store.connector_detached(connector_id)
            log.info("connector_detached", connector=name, reason=reason)
        finally:
            if not running.done():
                link.stop("shut down")
                with contextlib.suppress(BaseException):
                    await running

    def _accept(self, name: str, offered: list[str]) -> tuple[list[str], dict[str, str]]:
        """Which offered servers to take: a name the gateway has already (local, or another connector's)
        is refused with the reason, so one connector can never shadow another's server."""
        accepted: list[str] = []
        refused: dict[str, str] = {}
        for server in dict.fromkeys(offered):
            owner = self.registry.owners.get(server)
            if not valid_server_name(server):
                refused[server] = "not a valid server name"
            elif owner == name:
                accepted.append(server)  # reconnecting: the same server again
            elif owner is not None:
                refused[server] = f"server {server!r} is already offered by connector {owner!r}"
            elif server in self.gateway.entries:
                refused[server] = f"the gateway already has a server named {server!r} (configured locally)"
            elif self.gateway.single:
                refused[server] = "this gateway serves a single server (expose); use serve for connectors"
            else:
                self.gateway.add_server(ServerConfig(server, "tunnel", url=tunnel_url(server)))
                self.registry.owners[server] = name
                accepted.append(server)
        for server, reason in refused.items():
            log.warning("connector_server_refused", connector=name, server=server, reason=reason)
        return accepted, refused

    def _warm(self, server: str) -> None:
        """Open the server's channel now (as start_upstreams does), so readiness shows at once."""
        entry = self.gateway.entries.get(server)
        if entry is None:
            return

        async def warm() -> None:
            from ..upstream.base import UpstreamUnavailable

            with contextlib.suppress(UpstreamUnavailable):
                await entry.channel(entry.era_for("legacy"))

        task = asyncio.create_task(warm())
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def _start_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """Close the links of connectors revoked meanwhile; tell the store which links are still up."""
        seen_every = 30.0
        since_seen = 0.0
        while True:
            await asyncio.sleep(REVOCATION_CHECK_SECONDS)
            since_seen += REVOCATION_CHECK_SECONDS
            try:
                store = await self.store()
                for attached in list(self.registry.attached.values()):
                    record = await store.get_connector(attached.connector_id)
                    if record is None or record.revoked_at is not None:
                        log.warning("connector_revoked", connector=attached.name)
                        await attached.link.close("the connector was revoked", 1008)
                if since_seen >= seen_every:
                    since_seen = 0.0
                    await store.connector_seen([a.connector_id for a in self.registry.attached.values()])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store may be briefly unreachable; try again
                log.error("connector_check_failed", error=f"{type(exc).__name__}: {exc}")

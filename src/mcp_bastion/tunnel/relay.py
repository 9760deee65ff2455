"""The gateway's end of the tunnel: ``/connect``, and the servers that connectors bring.

A connector authenticates with its token (always, auth on or off), says which servers it has (HELLO)
and gets told which the gateway took (WELCOME). Each accepted server becomes an upstream whose
channels are PIPE streams over the connector's link (:class:`~mcp_bastion.tunnel.pipe.TunnelChannel`),
so the gateway's hub serves it as it serves a local stdio child: both eras, sessions, cancellation.
Servers stay when their connector drops: calls then fail at once with "connector <c> is offline".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from ..config import ServerConfig
from ..core.names import valid_server_name
from ..core.pacing import link_delay
from ..heap import settle_heap
from . import protocol as p
from .link import AsgiWire, Link

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


def offline(connector: str | None) -> str:
    if connector is None:  # its connector was revoked, and no other has brought it since
        return "no connector offers this server now"
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

    def route(self, server: str) -> tuple[str | None, Link | None]:
        connector = self.owners.get(server)
        found = None if connector is None else self.attached.get(connector)
        return connector, (found.link if found is not None and not found.link.closed.is_set() else None)

    def release(self, connector: str) -> list[str]:
        """A revoked connector's servers stop being its own: another connector may bring them."""
        released = [server for server, owner in self.owners.items() if owner == connector]
        for server in released:
            del self.owners[server]
        return released

    def online(self, server: str) -> bool:
        return self.route(server)[1] is not None


REGISTRY = TunnelRegistry()


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
                # SQLAlchemy and the store came after start-up froze the heap: out of the collector's
                # sight too, or every full collection walks them (~12 ms each under load; heap.py).
                settle_heap()
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
        # Answers of a queueing server are read in batches here too, as from a stdio child: the link
        # is held while every server with calls in flight on it queues (core/pacing.py).
        link.pace = lambda read: link_delay(link.pacers, time.monotonic(), read)
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
            log.info("connector_detached", connector=name, reason=reason, reads_held=link.held)
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
                if self.gateway.entries[server].config.transport == "tunnel":  # its connector was revoked
                    self.registry.owners[server] = name
                    accepted.append(server)
                else:
                    refused[server] = (
                        f"the gateway already has a server named {server!r} (configured locally)"
                    )
            elif self.gateway.single:
                refused[server] = "this gateway serves a single server (expose); use serve for connectors"
            else:
                self.gateway.add_server(ServerConfig(server, "tunnel", url=tunnel_url(server)))
                self.registry.owners[server] = name
                accepted.append(server)
        for server, reason in refused.items():
            log.warning("connector_server_refused", connector=name, server=server, reason=reason)
        return accepted, refused

    def _release(self, connector: str) -> None:
        released = self.registry.release(connector)
        if released:
            log.info("connector_servers_released", connector=connector, servers=released)

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
                        self._release(attached.name)
                away = {c for c in self.registry.owners.values() if c not in self.registry.attached}
                if away:  # revoked while offline: their servers are released too
                    active = {c.name for c in await store.list_connectors() if c.revoked_at is None}
                    for name in away - active:
                        self._release(name)
                if since_seen >= seen_every:
                    since_seen = 0.0
                    await store.connector_seen([a.connector_id for a in self.registry.attached.values()])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store may be briefly unreachable; try again
                log.error("connector_check_failed", error=f"{type(exc).__name__}: {exc}")

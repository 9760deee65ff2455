"""Wiring: configuration in, a running gateway out (entries, hubs, the ASGI app, the server)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn

from .config import GatewaySettings, ServerConfig, is_loopback_host
from .core.forward import Event, ServerRequest
from .core.sealing import StateSealer
from .heap import settle_heap
from .hub import Hub, ServerEntry
from .transport.asgi import McpHttpApp
from .transport.security import HostPolicy
from .tunnel.protocol import MAX_MESSAGE
from .tunnel.relay import Relay, offline
from .upstream.base import Channel, UpstreamUnavailable

if TYPE_CHECKING:
    from .auth.server import AuthorizationServer
    from .auth.store import Store
    from .auth.tokens import KeyRing

log = structlog.get_logger("mcp_bastion.gateway")
auth_log = structlog.get_logger("mcp_bastion.auth")
# How often a running gateway checks whether its signing key is due for rotation.
KEY_ROTATION_CHECK_SECONDS = 3600.0


class Gateway:
    """All endpoints of one gateway process over a set of servers.

    ``single=True`` (``expose``) serves the one server at ``/mcp``; otherwise each
    server is at ``/servers/<name>/mcp`` and all of them, aggregated, at ``/mcp``.
    """

    def __init__(
        self, settings: GatewaySettings, servers: list[ServerConfig], *, single: bool = False
    ) -> None:
        self.settings = settings
        self.single = single
        self.store: Store | None = None
        self.keyring: KeyRing | None = None
        self.authorization_server: AuthorizationServer | None = None
        self._rotator: asyncio.Task[None] | None = None
        self.sealer = StateSealer()
        self.hubs: dict[str, Hub] = {}
        coalesce = settings.coalesce_ms / 1000
        self.entries = {s.name: ServerEntry(s, self._on_events, coalesce) for s in servers}
        self._listeners: dict[str, list[Hub]] = {name: [] for name in self.entries}
        entries = list(self.entries.values())
        for entry in entries:
            entry.on_change = self._server_changed
        if single:
            self._add_hub("", entries, aggregate=False)
        else:
            self._add_hub("", entries, aggregate=True)
            for entry in entries:
                self._add_hub(f"/servers/{entry.name}", [entry], aggregate=False)
        policy = HostPolicy(
            settings.port,
            settings.public_url,
            settings.allowed_hosts,
            settings.allowed_origins,
            settings.host,
        )
        self.app = McpHttpApp(self.hubs, settings, policy, self.health)
        # Tunnel connectors attach at /connect and bring servers of their own (serve only).
        self.relay = None if single else Relay(self)
        if self.relay is not None:
            self.app.connect = self.relay.handle

    def add_server(self, config: ServerConfig) -> ServerEntry:
        """A server that joins while the gateway runs (a connector's): in /mcp and at /servers/<name>/mcp."""
        if config.name in self.entries or self.single:
            raise ValueError(f"cannot add server {config.name!r} here")
        # Paced like a stdio server: its answers come over the connector's link, which the relay
        # holds while the link's servers queue (core/pacing.py); the connector paces the child.
        entry = ServerEntry(config, self._on_events, self.settings.coalesce_ms / 1000)
        entry.on_change = self._server_changed
        self.entries[config.name] = entry
        self._listeners[config.name] = []
        aggregate = self.hubs[""]
        aggregate.add_entry(entry)
        self._listeners[config.name].append(aggregate)
        base = f"/servers/{config.name}"
        self._add_hub(base, [entry], aggregate=False)
        self.app.add_hub(base, self.hubs[base])
        if self.app.guard is not None:
            added = self.app.guard.add_server(config.name)
            if self.authorization_server is not None:
                self.authorization_server.add_resources(added)
        return entry

    def _add_hub(self, base: str, entries: list[ServerEntry], *, aggregate: bool) -> None:
        hub = Hub(
            base or "/",
            entries,
            prefix_mode=self.settings.prefix_mode,
            aggregate=aggregate,
            separator=self.settings.separator,
            sealer=self.sealer,
            request_timeout=self.settings.request_timeout_seconds,
        )
        self.hubs[base] = hub
        for e in entries:
            self._listeners[e.name].append(hub)

    def _on_events(self, channel: Channel, events: list[Event]) -> None:
        """Upstream events go to every hub the server is part of; routed ones only where they belong."""
        hubs = self._listeners.get(channel.server, [])
        shared: list[Event] = []
        for ev in events:
            route = getattr(ev, "route", None)
            owner = getattr(route, "owner", None)
            if isinstance(owner, Hub):
                owner.on_events(channel, [ev])
            elif isinstance(ev, ServerRequest):
                # Nobody's request is in flight: the first hub with a session takes it.
                target = next((h for h in hubs if h.has_legacy_peer()), hubs[0] if hubs else None)
                if target is not None:
                    target.on_events(channel, [ev])
            else:
                shared.append(ev)
        if shared:
            for hub in hubs:
                hub.on_events(channel, shared)

    def _server_changed(self, channel: Channel) -> None:
        for hub in self._listeners.get(channel.server, []):
            hub.server_changed(channel)

    def health(self) -> dict[str, Any]:
        servers = {
            name: {"ready": e.ready(), **({"error": e.last_error} if e.last_error else {})}
            for name, e in self.entries.items()
        }
        if self.relay is None:
            return {"ready": all(s["ready"] for s in servers.values()), "servers": servers}
        for name, report in servers.items():
            connector = self.relay.owner(name)
            if connector is not None:
                report["connector"] = connector
            if self.entries[name].config.transport == "tunnel" and not self.relay.online(name):
                report["ready"] = False
                report["error"] = offline(connector)
        return {
            "ready": all(s["ready"] for s in servers.values()),
            "servers": servers,
            "connectors": self.relay.report(),
        }

    async def start_upstreams(self) -> None:
        """Start every server's handshake-era channel now, so the first client does not wait.
        A server that fails to start is retried on demand; it does not stop the others."""

        async def one(entry: ServerEntry) -> None:
            try:
                await entry.channel(entry.era_for("legacy"))
            except UpstreamUnavailable as exc:
                log.error("upstream_unavailable", server=entry.name, error=str(exc))

        await asyncio.gather(*(one(e) for e in self.entries.values()))

    async def open_auth(self) -> None:
        """With auth on: open the store and signing keys, protect the MCP endpoints, mount the
        authorization server. With auth off: say so loudly when the gateway is reachable from afar."""
        settings = self.settings
        if not settings.auth_enabled():
            if settings.public_url or not is_loopback_host(settings.host):
                auth_log.warning(
                    "auth_off_beyond_loopback",
                    host=settings.host,
                    public_url=settings.public_url or None,
                    hint="--no-auth: anyone who reaches this address can use every server",
                )
            return
        from sqlalchemy.engine import make_url

        from .auth.resource import ResourceGuard
        from .auth.server import build_auth_app
        from .auth.store import Store
        from .auth.tokens import KeyRing

        if not settings.public_url and not is_loopback_host(settings.host):
            # The issuer and resource URLs would name the bind address (e.g. 0.0.0.0), which no
            # client can reach or match: tokens would be minted for the wrong audience.
            auth_log.warning(
                "auth_without_public_url",
                host=settings.host,
                hint="set --public-url https://your.host (the URL clients use) beyond loopback",
            )
        url = settings.store_url()
        store = await Store.open(url)
        self.store = store
        keyring = KeyRing.for_settings(settings, store)
        await keyring.load()
        self.keyring = keyring
        single = next(iter(self.entries)) if self.single and self.entries else None
        guard = ResourceGuard(settings, keyring, store, servers=list(self.entries), single=single)
        auth_app = build_auth_app(settings, store, keyring, guard.resources())
        self.authorization_server = auth_app.state.authorization_server
        self.app.enable_auth(guard, auth_app)
        self._rotator = asyncio.create_task(self._rotate_keys(keyring))
        auth_log.info(
            "auth_on",
            issuer=guard.issuer,
            resources=list(guard.resources()),
            store=make_url(url).render_as_string(hide_password=True),
            sign_in="oidc" if settings.oidc_issuer else "local users",
        )
        users = [u for u in await store.list_users() if not u.disabled]
        keys = [k for k in await store.list_api_keys() if k.usable()]
        if not settings.oidc_issuer and not users and not keys:
            auth_log.warning(
                "auth_nobody_can_sign_in",
                hint="add a user (mcp-bastion users add NAME) or an API key "
                "(mcp-bastion keys create --name NAME), or configure oidc_issuer; "
                "with the same --data-dir or --database-url",
            )

    async def _rotate_keys(self, keyring: KeyRing) -> None:
        """Hourly upkeep while the gateway runs: signing keys age out, and rows that can no longer
        matter (expired codes, pending sign-ins, refresh tokens, revoked token ids) are deleted."""
        while True:
            await asyncio.sleep(KEY_ROTATION_CHECK_SECONDS)
            try:
                await keyring.maybe_rotate()
            except Exception as exc:  # the store may be briefly unreachable; try again later
                auth_log.error("signing_key_rotation_failed", error=str(exc))
            if self.store is not None:
                try:
                    purged = await self.store.purge_expired()
                except Exception as exc:
                    auth_log.error("store_purge_failed", error=str(exc))
                else:
                    if purged:
                        auth_log.info("store_purged", rows=purged)

    async def close(self) -> None:
        if self.relay is not None:
            await self.relay.close()
        await asyncio.gather(*(e.close() for e in self.entries.values()), return_exceptions=True)
        if self._rotator is not None:
            self._rotator.cancel()
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def serve(self) -> None:
        config = uvicorn.Config(
            self.app,
            host=self.settings.host,
            port=self.settings.port,
            lifespan="on",
            log_level="warning",
            access_log=False,
            loop="none",
            http="httptools",
            timeout_graceful_shutdown=5,
            ws_max_size=MAX_MESSAGE,  # tunnel frames are bounded; so are the messages carrying them
            # WebSocket only where connectors attach (serve); expose then never loads a WebSocket library.
            ws="auto" if self.relay is not None else "none",
        )
        server = uvicorn.Server(config)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await self.open_auth()
        except Exception as exc:  # a store that cannot be opened: say why and stop, no traceback
            auth_log.error("auth_start_failed", error=f"{type(exc).__name__}: {exc}")
            await self.close()
            raise SystemExit(1) from None
        await self.start_upstreams()
        settle_heap()
        serving = asyncio.create_task(server.serve())
        log.info(
            "gateway_listening",
            url=f"http://{self.settings.host}:{self.settings.port}/mcp",
            servers=sorted(self.entries),
        )
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        with contextlib.suppress(Exception):
            await serving
        waiter.cancel()
        await self.close()
        log.info("gateway_stopped", reads_held={name: e.reads_held for name, e in self.entries.items()})


def run(gateway: Gateway) -> None:
    try:
        import uvloop

        uvloop.run(gateway.serve())
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(gateway.serve())

"""Wiring: configuration in, a running gateway out (entries, hubs, the ASGI app, the server)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import structlog
import uvicorn

from .config import GatewaySettings, ServerConfig
from .core.forward import Event, ServerRequest
from .core.sealing import StateSealer
from .hub import Hub, ServerEntry
from .transport.asgi import McpHttpApp
from .transport.security import HostPolicy
from .upstream.base import Channel, UpstreamUnavailable

log = structlog.get_logger("mcp_bastion.gateway")


class Gateway:
    """All endpoints of one gateway process over a set of servers.

    ``single=True`` (``expose``) serves the one server at ``/mcp``; otherwise each
    server is at ``/servers/<name>/mcp`` and all of them, aggregated, at ``/mcp``.
    """

    def __init__(
        self, settings: GatewaySettings, servers: list[ServerConfig], *, single: bool = False
    ) -> None:
        self.settings = settings
        self.sealer = StateSealer()
        self.hubs: dict[str, Hub] = {}
        self.entries = {s.name: ServerEntry(s, self._on_events) for s in servers}
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
        return {"ready": all(s["ready"] for s in servers.values()), "servers": servers}

    async def start_upstreams(self) -> None:
        """Start every server's handshake-era channel now, so the first client does not wait.
        A server that fails to start is retried on demand; it does not stop the others."""

        async def one(entry: ServerEntry) -> None:
            try:
                await entry.channel(entry.era_for("legacy"))
            except UpstreamUnavailable as exc:
                log.error("upstream_unavailable", server=entry.name, error=str(exc))

        await asyncio.gather(*(one(e) for e in self.entries.values()))

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.entries.values()), return_exceptions=True)

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
        )
        server = uvicorn.Server(config)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await self.start_upstreams()
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
        log.info("gateway_stopped")


def run(gateway: Gateway) -> None:
    try:
        import uvloop

        uvloop.run(gateway.serve())
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(gateway.serve())

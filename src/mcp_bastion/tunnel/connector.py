"""The private end of the tunnel: ``mcp-bastion connect``.

It keeps its servers' upstream channels (stdio children, HTTP servers of the private network) and
dials the gateway out (one WebSocket); each PIPE stream the gateway opens, for a server it accepted and
one protocol era, is served by a :class:`~mcp_bastion.tunnel.pipe.PipeHost`. Nothing listens here.
The stdio children keep running while the link drops and comes back. Upstream secrets stay here: the
gateway sees MCP messages, never this side's env or headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import certifi
import orjson
import structlog
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus, WebSocketException

from .. import __version__
from ..config import ServerConfig, is_loopback_host
from ..core.pacing import DEFAULT_WINDOW, Pacer, link_delay
from ..heap import settle_heap
from ..upstream.base import Era, UpstreamUnavailable
from . import protocol as p
from .link import ClientWire, Link, TunnelStream
from .pipe import ERA_HEADER, PIPE_METHOD, PipeHost, refuse
from .relay import CONNECT_PATH

log = structlog.get_logger("mcp_bastion.tunnel")

BACKOFF_START = 0.5
BACKOFF_CAP = 30.0
HEALTHY_AFTER = 30.0  # a link up this long resets the backoff
WELCOME_TIMEOUT = 15.0
OPEN_TIMEOUT = 15.0
_PIPE_PATH = re.compile(r"/servers/([^/]+)/pipe")


class ConnectorError(Exception):
    """The connector cannot run as configured, or the gateway refused it for good (bad token)."""


@dataclass(frozen=True)
class Endpoint:
    """Where the connector dials: the WebSocket URL, and the one origin its token may go to."""

    ws_url: str
    origin: str
    secure: bool


def endpoint(url: str, *, insecure_http: bool = False) -> Endpoint:
    """The ``/connect`` WebSocket URL for a gateway URL; plain http only to loopback unless allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConnectorError(f"{url!r}: give the gateway's https:// URL")
    if parts.username or parts.password:
        raise ConnectorError(f"{url!r}: no credentials in the URL; use --token")
    if parts.query or parts.fragment:
        raise ConnectorError(f"{url!r}: no query or fragment in the gateway URL")
    secure = parts.scheme == "https"
    if not secure and not insecure_http and not is_loopback_host(parts.hostname):
        raise ConnectorError(
            f"{url!r}: plain http would send the token in clear; use https:// "
            "(or --insecure-http on a network you trust)"
        )
    path = parts.path.rstrip("/")
    if path.endswith(CONNECT_PATH):
        path = path[: -len(CONNECT_PATH)]
    ws_url = urlunsplit(("wss" if secure else "ws", parts.netloc, path + CONNECT_PATH, "", ""))
    return Endpoint(ws_url, f"{parts.scheme}://{parts.netloc}".lower(), secure)


class _NoRedirects(ws_connect):
    """The token goes to the configured origin and nowhere else: a redirect is an error, not followed."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        if isinstance(exc, InvalidStatus) and 300 <= exc.response.status_code < 400:
            where = exc.response.headers.get("Location", "?")
            return ConnectorError(f"the gateway answered with a redirect to {where!r}; not followed")
        return exc


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Verification on, always: the given bundle (private PKI) or the usual public roots."""
    return ssl.create_default_context(cafile=ca_bundle or certifi.where())


class Connector:
    """Runs the local servers and keeps one link to the gateway up, reconnecting with backoff."""

    def __init__(
        self,
        url: str,
        token: str,
        servers: list[ServerConfig],
        *,
        name: str = "",
        ca_bundle: str | None = None,
        insecure_http: bool = False,
        heartbeat_seconds: float = p.HEARTBEAT_SECONDS,
        coalesce_seconds: float = DEFAULT_WINDOW,
    ) -> None:
        if not servers:
            raise ConnectorError("no servers configured")
        self.endpoint = endpoint(url, insecure_http=insecure_http)
        self.token = token
        self.name = name
        self.ssl = tls_context(ca_bundle) if self.endpoint.secure else None
        self.heartbeat_seconds = heartbeat_seconds
        self.coalesce_seconds = coalesce_seconds  # read coalescing under load (core/pacing.py); 0: off
        self.held = 0  # times a link was left unread for a hold, over all links (logged at the end)
        self.configs = {s.name: s for s in servers}
        self.servers = list(self.configs)
        self.hosts: dict[tuple[str, Era], PipeHost] = {}
        self.accepted: set[str] = set()
        self.link: Link | None = None
        self._stop = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Until stopped: start the local servers, then keep the link up."""
        await self._start_servers()
        settle_heap()
        log.info("connector_started", gateway=self.endpoint.origin, servers=self.servers)
        delay = BACKOFF_START
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    reason = await self._session()
                    log.warning("link_lost", reason=reason)
                except ConnectorError:
                    raise
                except (OSError, TimeoutError, WebSocketException) as exc:
                    log.warning("connect_failed", error=f"{type(exc).__name__}: {exc}")
                if self._stop.is_set():
                    break
                if time.monotonic() - started >= HEALTHY_AFTER:
                    delay = BACKOFF_START
                wait = delay * random.uniform(0.5, 1.0)
                log.info("reconnecting", seconds=round(wait, 2))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), wait)
                delay = min(delay * 2, BACKOFF_CAP)
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stop.set()
        if self.link is not None:
            self.link.stop("the connector is shutting down")

    async def _shutdown(self) -> None:
        if self.link is not None and not self.link.closed.is_set():
            await self.link.close("the connector is shutting down", 1001)
        await asyncio.gather(*(host.close() for host in self.hosts.values()), return_exceptions=True)
        held = {"link": self.held, "servers": sum(host.pacer.held for host in self.hosts.values())}
        log.info("connector_stopped", reads_held=held)

    def host(self, server: str, era: Era) -> PipeHost:
        found = self.hosts.get((server, era))
        if found is None:
            pacer = Pacer(self.coalesce_seconds)
            found = self.hosts[(server, era)] = PipeHost(self.configs[server], era, pacer)
        return found

    def _pace(self, read: int) -> float:
        return link_delay((host.pacer for host in self.hosts.values()), time.monotonic(), read)

    async def _start_servers(self) -> None:
        """Start every server's handshake-era channel now (the one the gateway opens first), so the
        first call does not wait; a server that fails is retried when the gateway asks for it."""

        async def one(config: ServerConfig) -> None:
            if config.users_only:
                return  # served to nobody through the tunnel (see _serve)
            try:
                await self.host(config.name, "modern" if config.era == "modern" else "legacy").ready_channel()
            except UpstreamUnavailable as exc:
                log.error("upstream_unavailable", server=config.name, error=str(exc))

        await asyncio.gather(*(one(c) for c in self.configs.values()))

    # ---- one link ----------------------------------------------------------------------------------
    async def _session(self) -> str:
        """Connect, introduce ourselves, serve streams until the link ends; returns why it ended."""
        try:
            ws = await _NoRedirects(
                self.endpoint.ws_url,
                additional_headers={"Authorization": f"Bearer {self.token}"},
                user_agent_header=f"mcp-bastion-connector/{__version__}",
                ssl=self.ssl,
                max_size=p.MAX_MESSAGE,
                compression=None,
                ping_interval=None,  # the tunnel's own heartbeats
                open_timeout=OPEN_TIMEOUT,
                close_timeout=2,
                # wss: an HTTPS proxy from the environment sees only TLS; ws (loopback): no proxy.
                proxy=True if self.endpoint.secure else None,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            detail = _error_text(exc.response.body)
            if status in (401, 403):
                raise ConnectorError(f"the gateway refused the connector (HTTP {status}): {detail}") from None
            raise OSError(f"the gateway answered HTTP {status}: {detail}") from None
        welcome: asyncio.Future[p.Welcome] = asyncio.get_running_loop().create_future()

        def control(ev: p.Event) -> None:
            if isinstance(ev, p.Welcome) and not welcome.done():
                self.accepted = set(ev.accepted)
                welcome.set_result(ev)
            elif isinstance(ev, p.GoAway):
                log.warning("gateway_goaway", reason=ev.reason)

        mux = p.Mux("connector", heartbeat_seconds=self.heartbeat_seconds, now=time.monotonic())
        pace = self._pace if self.coalesce_seconds > 0 else None
        link = Link(ClientWire(ws), mux, on_open=self._serve, on_control=control, pace=pace)
        self.link = link
        running = asyncio.create_task(link.run())
        try:
            await link.send_frames(mux.hello(self.name, self.servers, f"mcp-bastion/{__version__}"))
            waitables: set[asyncio.Future[Any]] = {welcome, running}
            done, _ = await asyncio.wait(
                waitables, timeout=WELCOME_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            if welcome in done:
                answer = welcome.result()
                for server, why in answer.refused.items():
                    log.error("server_refused", server=server, reason=why)
                log.info("link_up", gateway=self.endpoint.origin, accepted=answer.accepted)
                if not answer.accepted:
                    log.error("no_server_accepted", hint="rename the servers in the config (names clash)")
            elif running not in done:
                await link.close("no WELCOME from the gateway", 1002)
            return await running
        finally:
            welcome.cancel()
            if not running.done():
                link.stop("shut down")
                with contextlib.suppress(BaseException):
                    await running
            self.held += link.held

    async def _serve(self, stream: TunnelStream) -> None:
        """One stream: a PIPE to a server the gateway accepted, in the era it asks for; nothing else."""
        opened = stream.opened
        assert opened is not None
        match = _PIPE_PATH.fullmatch(opened.path)
        server = match.group(1) if match is not None else ""
        if opened.method != PIPE_METHOD or server not in self.accepted or server not in self.configs:
            await refuse(stream, 404, "not found: this connector serves PIPE /servers/<name>/pipe only")
            return
        wanted = next((v for k, v in opened.headers if k.lower() == ERA_HEADER), "")
        config = self.configs[server]
        era: Era = "modern" if wanted == "modern" else "legacy"
        if wanted not in ("legacy", "modern"):
            await refuse(stream, 400, f"{ERA_HEADER} must be legacy or modern")
        elif config.users_only:
            why = f"server {server!r} has usersOnly credentials: not offered through the tunnel"
            await refuse(stream, 403, why)
        elif config.era not in ("auto", era):
            await refuse(stream, 409, f"server {server!r} is configured for the {config.era} era only")
        else:
            await self.host(server, era).serve(stream)


def _error_text(body: bytes | bytearray | None) -> str:
    if not body:
        return "no detail"
    with contextlib.suppress(orjson.JSONDecodeError):
        value = orjson.loads(body)
        if isinstance(value, dict) and isinstance(value.get("error"), str):
            return str(value["error"])[:300]
    return bytes(body[:300]).decode("utf-8", "replace")


def run(connector: Connector) -> int:
    """Run until SIGINT/SIGTERM; 0 after a clean stop, 1 when the gateway refused us for good."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, connector.stop)
        try:
            await connector.run()
        except ConnectorError as exc:
            log.error("connector_refused", error=str(exc))
            return 1
        return 0

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(main())

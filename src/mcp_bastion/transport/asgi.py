"""The downstream HTTP edge, as a raw ASGI app: Streamable HTTP in both eras, and legacy HTTP+SSE.

Raw ASGI rather than a framework on the hot path: the data plane only reads the
JSON-RPC envelope, and routing is a dict lookup. Each endpoint path maps to a
:class:`~mcp_bastion.hub.Hub`; the era of a request is decided by its
``MCP-Protocol-Version`` header (absent: 2025-03-26).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs

import orjson
import structlog

from ..auth.identity import ANONYMOUS, Identity
from ..config import GatewaySettings
from ..core import jsonrpc as rpc
from ..core.eras import (
    DEFAULT_UNANNOUNCED,
    HANDSHAKE_VERSIONS,
    META_PROTOCOL_VERSION,
    MODERN_ERROR_STATUS,
    MODERN_VERSIONS,
    check_modern_request,
    check_param_values,
    duplicated_routing_header,
    unsupported_version,
)
from ..hub import Hub
from ..peers import Peer, Stream
from ..timers import Deadline, later
from .security import HostPolicy

if TYPE_CHECKING:
    from ..auth.resource import ResourceGuard

log = structlog.get_logger("mcp_bastion.http")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]
MAX_BUFFERED = 1000  # messages kept for a session whose GET stream is not open
MAX_LOGS = 64  # resumable POST streams kept per session
DISCONNECT_GRACE = 0.05  # seconds a 2026-07-28 answer may take before its connection is watched
# Where the bearer check leaves the caller's Identity in the ASGI scope (absent: auth is off).
IDENTITY_KEY = "mcp_bastion.identity"


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise ConnectionError("client went away")
        body = event.get("body", b"")
        size += len(body)
        if size > limit:
            raise BodyTooLarge
        chunks.append(body)
        if not event.get("more_body"):
            return b"".join(chunks)


async def respond(
    send: Send, status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or []})
    await send({"type": "http.response.body", "body": body})


async def respond_json(
    send: Send, status: int, message: rpc.Message, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    await respond(send, status, orjson.dumps(message), JSON_HEADERS + (extra or []))


def sse_event(message: rpc.Message | None, event_id: str | None = None, event: str | None = None) -> bytes:
    out = b""
    if event_id is not None:
        out += b"id: " + event_id.encode() + b"\n"
    if event is not None:
        out += b"event: " + event.encode() + b"\n"
    data = orjson.dumps(message) if message is not None else b""
    return out + b"data: " + data + b"\n\n"


class EventLog:
    """The events of one handshake-era POST stream, kept so a client can resume it.

    The request runs on when its connection drops; a GET with ``Last-Event-ID`` replays
    what the client missed and follows the stream to its end (2025-11-25 resumability).
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.entries: list[bytes] = []
        self.messages = 0  # notifications and requests before the answer
        self.done = False
        self.final: rpc.Message | None = None
        self.changed = asyncio.Event()

    def append(self, message: rpc.Message, final: bool = False) -> None:
        self.entries.append(sse_event(message, f"{self.key}-{len(self.entries) + 1}"))
        if final:
            self.final = message
            self.done = True
        else:
            self.messages += 1
        self.changed.set()

    def close(self) -> None:
        """The session ended before the answer: the stream ends without one."""
        self.done = True
        self.changed.set()

    def priming(self) -> bytes:
        return sse_event(None, f"{self.key}-0")


async def _respond_terminated(send: Send, down_id: rpc.RequestId | None, wants_sse: bool) -> None:
    """The answer to a request whose session ended while it ran (DELETE, expiry, shutdown).

    A client that takes SSE gets a stream that ends without a message, as the MCP SDK's own
    server does: its client then settles the call itself, and a client that has already closed
    (the SDK client sends its DELETE after closing its read stream) is not handed a message it
    can no longer take. A JSON-only client gets what any request of an ended session gets: 404.
    """
    if wants_sse:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        await respond_json(send, 404, rpc.error(down_id, rpc.INVALID_REQUEST, "Session terminated"))


class SseWriter:
    """The SSE response of a 2026-07-28 request, once it has one: it starts at the first message
    before the answer (or when the answer is slower than the keep-alive) and is sent by its own task
    while the request runs on in the handler; :meth:`finish` hands it the answer, which ends it."""

    def __init__(self, send: Send, stream: Stream, keepalive: float, failed: Callable[[], None]) -> None:
        self.send = send
        self.stream = stream
        self.keepalive = keepalive
        self.failed = failed
        self.final: rpc.Message | None = None
        self.task = asyncio.create_task(self._run())

    def finish(self, reply: rpc.Message) -> None:
        self.final = reply
        self.stream.wake()

    async def _run(self) -> None:
        stream, send = self.stream, self.send
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            if not stream.items and self.final is None:  # started by the keep-alive: show it
                await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
            while True:
                while stream.items:
                    note = sse_event(stream.items.popleft())
                    await send({"type": "http.response.body", "body": note, "more_body": True})
                if self.final is not None:
                    last = sse_event(self.final)
                    await send({"type": "http.response.body", "body": last, "more_body": False})
                    return
                getter = stream.signal()
                timer = asyncio.get_running_loop().call_later(self.keepalive, stream.wake)
                try:
                    await getter
                finally:
                    timer.cancel()
                if not stream.items and self.final is None:
                    await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
        except OSError:
            self.failed()


class PostStream(Stream):
    """What comes for one handshake-era POST before its answer: progress, logs, a server request.

    Usually nothing does, and the answer goes back as JSON. The first message (or :meth:`open`, when
    the answer is slower than the keep-alive) opens the request's resumable event log, which turns the
    response into an SSE stream; from then on messages go straight into the log."""

    __slots__ = ("_open_log", "log")

    def __init__(self, open_log: Callable[[], EventLog]) -> None:
        super().__init__()
        self.log: EventLog | None = None
        self._open_log = open_log

    def open(self) -> EventLog:
        if self.log is None:
            self.log = self._open_log()
        return self.log

    def put(self, item: Any) -> None:
        self.open().append(item)


class LegacySession(Peer):
    """A handshake-era session (Streamable HTTP with Mcp-Session-Id, or HTTP+SSE)."""

    era: Literal["legacy", "modern"] = "legacy"

    def __init__(self, session_id: str, protocol_version: str, hub: Hub, sse_transport: bool = False) -> None:
        super().__init__(session_id, protocol_version)
        self.hub = hub
        self.sse_transport = sse_transport
        self.post_streams: dict[rpc.RequestId, Stream] = {}
        self.logs: dict[str, EventLog] = {}  # resumable POST streams, newest last
        self._log_ids = itertools.count(1)
        self.get_stream: Stream | None = None
        self.backlog: list[rpc.Message] = []
        self.last_active = time.monotonic()
        self.active_requests = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.initialized = False

    def deliver(self, message: rpc.Message, related: rpc.RequestId | None, final: bool = False) -> None:
        if self.closed:
            return
        stream = self.post_streams.get(related) if related is not None else None
        if stream is None:
            stream = self.get_stream
        if stream is None:
            self.backlog.append(message)
            del self.backlog[:-MAX_BUFFERED]
            return
        stream.put(message)

    def new_log(self) -> EventLog:
        log = EventLog(f"s{next(self._log_ids)}")
        self.logs[log.key] = log
        while len(self.logs) > MAX_LOGS:
            del self.logs[next(iter(self.logs))]
        return log

    def touch(self) -> None:
        self.last_active = time.monotonic()


_exchange_ids = itertools.count(1)


class ModernExchange(Peer):
    """One 2026-07-28 request and its response stream."""

    era: Literal["legacy", "modern"] = "modern"

    def __init__(self, protocol_version: str) -> None:
        # Only a key inside this process (never shown to anyone): a counter, not a random token,
        # whose getrandom() was ~5 % of the gateway's samples per call (py-spy, C=50).
        super().__init__(f"x-{next(_exchange_ids)}", protocol_version)
        self.stream = Stream()
        self.on_message: Callable[[], None] | None = None  # the handler's: a message before the answer

    def deliver(self, message: rpc.Message, related: rpc.RequestId | None, final: bool = False) -> None:
        if not self.closed:
            self.stream.put(message)
            if self.on_message is not None:
                self.on_message()


_HEADERS_KEY = "mcp_bastion.headers"


def _raw_headers(scope: Scope) -> dict[bytes, bytes]:
    """Each header's first value by name (lower-case in ASGI), built once per request: a request
    reads six to eight headers (a scan of the list for each showed in the profiles)."""
    heads: dict[bytes, bytes] | None = scope.get(_HEADERS_KEY)
    if heads is None:
        heads = scope[_HEADERS_KEY] = dict(reversed(list(scope["headers"])))
    return heads


def _header(scope: Scope, name: bytes) -> str | None:
    value = _raw_headers(scope).get(name)
    return None if value is None else value.decode("latin-1")


def _identity(scope: Scope) -> Identity:
    identity: Identity = scope.get(IDENTITY_KEY, ANONYMOUS)
    return identity


def _mcp_headers(scope: Scope) -> dict[str, str]:
    """The request's ``mcp-*`` headers, which are all the 2026-07-28 checks read; a routing header
    sent twice is refused (-32020) rather than one of its values picked."""
    heads = _raw_headers(scope)
    if len(heads) != len(scope["headers"]):  # some name appears twice: is it a routing one?
        dup = duplicated_routing_header((k.decode("latin-1"), "") for k, _ in scope["headers"])
        if dup is not None:
            raise rpc.ProtocolError(rpc.HEADER_MISMATCH, f"{dup} header appears more than once")
    # HTTP field values carry no leading or trailing whitespace (RFC 9110 5.5).
    return {
        k.decode("latin-1"): v.decode("latin-1").strip(" \t") for k, v in heads.items() if k[:4] == b"mcp-"
    }


def _accepts(accept: str | None) -> tuple[bool, bool]:
    """(accepts JSON, accepts SSE) from an Accept header; absent counts as both."""
    if not accept:
        return True, True
    parts = [p.split(";")[0].strip().lower() for p in accept.split(",")]
    any_ = "*/*" in parts
    return (
        any_ or "application/json" in parts or "application/*" in parts,
        any_ or "text/event-stream" in parts or "text/*" in parts,
    )


class McpHttpApp:
    """ASGI app serving every endpoint of one gateway."""

    def __init__(
        self,
        hubs: dict[str, Hub],
        settings: GatewaySettings,
        policy: HostPolicy,
        health: Callable[[], dict[str, Any]],
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.health = health
        self.routes: dict[str, tuple[str, Hub]] = {}
        for base, hub in hubs.items():
            self.add_hub(base, hub)
        self.sessions: dict[str, LegacySession] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.guard: ResourceGuard | None = None
        self.auth_app: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None
        # The tunnel relay's WebSocket endpoint (GET /connect), when this gateway accepts connectors.
        self.connect: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None

    def add_hub(self, base: str, hub: Hub) -> None:
        """Serve ``hub`` at ``<base>/mcp``, ``<base>/sse`` and ``<base>/messages``."""
        self.routes[f"{base}/mcp"] = ("mcp", hub)
        self.routes[f"{base}/sse"] = ("sse", hub)
        self.routes[f"{base}/messages"] = ("messages", hub)
        self.routes[f"{base}/messages/"] = ("messages", hub)

    def enable_auth(
        self, guard: ResourceGuard, auth_app: Callable[[Scope, Receive, Send], Awaitable[None]]
    ) -> None:
        """Protect every MCP endpoint with ``guard``; every other path goes to the authorization server."""
        self.guard = guard
        self.auth_app = auth_app

    # ------------------------------------------------------------------ ASGI entry
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            if scope["path"] == "/connect" and self.connect is not None:
                await self.connect(scope, receive, send)
            elif (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008, "reason": "no WebSocket endpoint here"})
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/healthz":
            await respond_json(send, 200, {"status": "ok"})
            return
        if path == "/readyz":
            report = self.health()
            await respond_json(send, 200 if report.get("ready") else 503, report)
            return
        route = self.routes.get(path)
        if route is None:
            if self.guard is not None:
                await self._not_mcp(scope, receive, send, self.guard)
                return
            await respond_json(send, 404, rpc.error(None, rpc.INVALID_REQUEST, f"No MCP endpoint at {path}"))
            return
        if not self.policy.host_ok(_header(scope, b"host")):
            log.warning("rejected_host", host=_header(scope, b"host"), path=path)
            await respond_json(
                send, 403, rpc.error(None, rpc.INVALID_REQUEST, "Forbidden: invalid Host header")
            )
            return
        if not self.policy.origin_ok(_header(scope, b"origin")):
            log.warning("rejected_origin", origin=_header(scope, b"origin"), path=path)
            await respond_json(
                send, 403, rpc.error(None, rpc.INVALID_REQUEST, "Forbidden: invalid Origin header")
            )
            return
        if self.guard is not None:
            protected = self.guard.protection(path)
            if protected is not None:
                outcome = await self.guard.authenticate(scope, protected)
                if not isinstance(outcome, Identity):
                    await respond(send, outcome.status, outcome.body, outcome.headers)
                    return
                scope[IDENTITY_KEY] = outcome
        kind, hub = route
        if kind == "mcp":
            await self._mcp(scope, receive, send, hub)
        elif kind == "sse":
            await self._sse_get(scope, receive, send, hub)
        else:
            await self._sse_post(scope, receive, send, hub)

    async def _not_mcp(self, scope: Scope, receive: Receive, send: Send, guard: ResourceGuard) -> None:
        """With auth on: protected resource metadata here, everything else to the authorization server."""
        if not self.policy.host_ok(_header(scope, b"host")):
            log.warning("rejected_host", host=_header(scope, b"host"), path=scope["path"])
            await respond(send, 403, b"Forbidden: invalid Host header", [(b"content-type", b"text/plain")])
            return
        document = guard.prm_document(scope["path"])
        if document is not None:  # public metadata, readable from browser-based clients too
            cors = [(b"access-control-allow-origin", b"*")]
            if scope["method"] == "OPTIONS":
                allow = [(b"access-control-allow-methods", b"GET"), (b"access-control-max-age", b"86400")]
                await respond(send, 204, b"", cors + allow)
            elif scope["method"] in ("GET", "HEAD"):
                await respond(send, 200, document, JSON_HEADERS + cors)
            else:
                await respond(send, 405, b"", [(b"allow", b"GET")])
            return
        assert self.auth_app is not None
        await self.auth_app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                self._sweeper = asyncio.create_task(self._sweep())
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self._sweeper:
                    self._sweeper.cancel()
                for session in list(self.sessions.values()):
                    await self._end_session(session)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _sweep(self) -> None:
        """Idle sessions expire; a session with a request in flight is never idle."""
        while True:
            await asyncio.sleep(min(30.0, max(0.5, self.settings.session_idle_seconds / 4)))
            limit = time.monotonic() - self.settings.session_idle_seconds
            for session in list(self.sessions.values()):
                if (
                    session.active_requests == 0
                    and session.get_stream is None
                    and session.last_active < limit
                ):
                    log.info("session_expired", session=session.id[:8])
                    await self._end_session(session)

    async def _end_session(self, session: LegacySession) -> None:
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.id, None)
        for task in list(session.tasks):
            task.cancel()
        if session.get_stream is not None:
            session.get_stream.wake()  # its response ends now, not at the next keep-alive
        await session.hub.detach(session)

    # ------------------------------------------------------------------ Streamable HTTP
    async def _mcp(self, scope: Scope, receive: Receive, send: Send, hub: Hub) -> None:
        version = _header(scope, b"mcp-protocol-version")
        method = scope["method"]
        if version in MODERN_VERSIONS:
            if method != "POST":
                await respond(send, 405, b"", [(b"allow", b"POST")])
                return
            await self._modern_post(scope, receive, send, hub)
            return
        if version is not None and version not in HANDSHAKE_VERSIONS:
            # A revision we do not know: answer as a modern server would, naming the
            # versions server/discover advertises, with the request's own id.
            request_id: rpc.RequestId | None = None
            if method == "POST":
                with contextlib.suppress(Exception):
                    body = rpc.loads(await read_body(receive, self.settings.max_body_bytes))
                    if isinstance(body, dict) and isinstance(body.get("id"), str | int):
                        request_id = body["id"]
            await respond_json(send, 400, unsupported_version(version).to_message(request_id))
            return
        if method == "POST":
            await self._legacy_post(scope, receive, send, hub, version or DEFAULT_UNANNOUNCED)
        elif method == "GET":
            await self._legacy_get(scope, receive, send, hub)
        elif method == "DELETE":
            await self._legacy_delete(scope, send, hub)
        else:
            await respond(send, 405, b"", [(b"allow", b"GET, POST, DELETE")])

    async def _read_message(self, scope: Scope, receive: Receive, send: Send) -> rpc.Message | None:
        """Common POST checks: content type, size, JSON, envelope. Sends the error itself."""
        ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            await respond_json(
                send,
                415,
                rpc.error(None, rpc.INVALID_REQUEST, "Unsupported Media Type: use application/json"),
            )
            return None
        length = _header(scope, b"content-length")
        limit = self.settings.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            await respond_json(
                send, 413, rpc.error(None, rpc.INVALID_REQUEST, f"Payload Too Large: over {limit} bytes")
            )
            return None
        try:
            body = await read_body(receive, limit)
        except BodyTooLarge:
            await respond_json(
                send, 413, rpc.error(None, rpc.INVALID_REQUEST, f"Payload Too Large: over {limit} bytes")
            )
            return None
        except ConnectionError:
            return None
        try:
            decoded = rpc.loads(body)
            if isinstance(decoded, list):
                raise rpc.ProtocolError(
                    rpc.INVALID_REQUEST, "Invalid Request: JSON-RPC batches are not supported"
                )
            return rpc.validate(decoded)
        except rpc.ProtocolError as exc:
            rid = decoded.get("id") if isinstance(locals().get("decoded"), dict) else None
            await respond_json(send, 400, exc.to_message(rid if isinstance(rid, str | int) else None))
            return None

    async def _legacy_post(self, scope: Scope, receive: Receive, send: Send, hub: Hub, version: str) -> None:
        wants_json, wants_sse = _accepts(_header(scope, b"accept"))
        if not wants_json and not wants_sse:
            await respond_json(
                send, 406, rpc.error(None, rpc.INVALID_REQUEST, "Not Acceptable: accept application/json")
            )
            return
        message = await self._read_message(scope, receive, send)
        if message is None:
            return
        sid = _header(scope, b"mcp-session-id")
        identity = _identity(scope)
        if message.get("method") == "initialize" and rpc.is_request(message):
            existing = self.sessions.get(sid) if sid is not None else None
            if existing is not None and existing.identity.subject == identity.subject:
                err = rpc.error(
                    message["id"], rpc.INVALID_REQUEST, "Invalid Request: session already initialized"
                )
                await respond_json(send, 400, err)
                return
            if len(self.sessions) >= self.settings.max_sessions:
                await respond_json(
                    send,
                    503,
                    rpc.error(message["id"], rpc.INTERNAL_ERROR, "Too many sessions"),
                    [(b"retry-after", b"5")],
                )
                return
            session = LegacySession(secrets.token_urlsafe(32), version, hub)
            session.identity = identity
            reply = await hub.request(session, message)
            if "error" in reply:
                await respond_json(send, 200, reply)
                return
            self.sessions[session.id] = session
            hub.attach(session)
            log.info(
                "session_started",
                session=session.id[:8],
                path=scope["path"],
                client=str((session.client_info or {}).get("name", "?"))[:64]
                if isinstance(session.client_info, dict)
                else "?",
            )
            await respond_json(send, 200, reply, [(b"mcp-session-id", session.id.encode())])
            return
        if sid is None and self.settings.allow_sessionless and rpc.is_request(message):
            await self._sessionless(send, receive, hub, message, version, wants_sse, identity)
            return
        if sid is None:
            await respond_json(
                send,
                400,
                rpc.error(
                    message.get("id"), rpc.INVALID_REQUEST, "Bad Request: Mcp-Session-Id header is required"
                ),
            )
            return
        found = self.sessions.get(sid)
        if found is None or found.hub is not hub or found.identity.subject != identity.subject:
            await respond_json(
                send, 404, rpc.error(message.get("id"), rpc.INVALID_REQUEST, "Session not found")
            )
            return
        session = found
        session.touch()
        if not rpc.is_request(message):
            if rpc.is_response(message):
                await hub.client_response(session, message)
            else:
                await hub.client_notification(session, message)
            await respond(send, 202)
            return
        if session.active_requests >= self.settings.max_concurrent_per_session:
            err = rpc.error(
                message["id"], rpc.TOO_MANY_REQUESTS, "Too many concurrent requests in this session"
            )
            await respond_json(send, 429, err, [(b"retry-after", b"1")])
            return
        await self._legacy_answer(send, receive, session, hub, message, wants_sse)

    async def _answer(
        self,
        send: Send,
        receive: Receive,
        peer: ModernExchange,
        hub: Hub,
        message: rpc.Message,
        wants_sse: bool,
    ) -> None:
        """A 2026-07-28 request, run in this handler: JSON, or SSE (an :class:`SseWriter`) once a
        notification precedes the answer or the answer is slower than the keep-alive.

        Closing the response stream cancels the request (no resumability in this era): a watch on
        the connection, started only when the answer takes longer than DISCONNECT_GRACE (most come
        sooner), cancels this handler. No task per request (bench/README.md)."""
        me = asyncio.current_task()
        assert me is not None
        writer: SseWriter | None = None
        watch: asyncio.Task[None] | None = None
        keepalive: Deadline | None = None
        answered = gone = False
        # No closure here refers to itself through a cell (a reference cycle per request would be
        # left to the garbage collector): the grace deadline is a plain local.

        def leave() -> None:  # the client closed the stream, or writing to it failed
            nonlocal gone
            if not answered and not gone:
                gone = True
                me.cancel()  # the hub cancels the request's calls upstream as the cancellation passes

        def start_sse() -> None:
            nonlocal writer
            if writer is None and not answered:
                writer = SseWriter(send, peer.stream, self.settings.keepalive_seconds, leave)

        def watch_connection() -> None:
            nonlocal watch, keepalive
            watch = asyncio.create_task(self._wait_disconnect(receive))
            watch.add_done_callback(lambda task: None if task.cancelled() else leave())
            if wants_sse:
                keepalive = later(self.settings.keepalive_seconds - DISCONNECT_GRACE, start_sse)

        if wants_sse:
            peer.on_message = start_sse
        else:
            peer.closed = True  # a JSON-only client gets the answer alone
        grace = later(DISCONNECT_GRACE, watch_connection)
        try:
            reply = await hub.request(peer, message)
        except BaseException as exc:
            if writer is not None:
                writer.task.cancel()  # it would keep a stream nobody completes alive
            if not (gone and isinstance(exc, asyncio.CancelledError)):
                raise
            me.uncancel()  # the client went away
            await hub.detach(peer)  # what else it held upstream (a subscription, its own channels)
            return
        finally:
            answered = True
            peer.on_message = None
            grace.cancel()
            if keepalive is not None:
                keepalive.cancel()
            if watch is not None:
                watch.cancel()
        if writer is None:
            status = MODERN_ERROR_STATUS.get(reply["error"].get("code"), 200) if "error" in reply else 200
            await respond_json(send, status, reply)
            return
        writer.finish(reply)  # after the notifications that raced it
        await writer.task

    async def _sessionless(
        self,
        send: Send,
        receive: Receive,
        hub: Hub,
        message: rpc.Message,
        version: str,
        wants_sse: bool,
        identity: Identity,
    ) -> None:
        """A handshake-era request outside any session, answered on its own (allow_sessionless)."""
        session = LegacySession(secrets.token_urlsafe(16), version, hub)
        session.identity = identity
        hub.attach(session)
        try:
            await self._legacy_answer(send, receive, session, hub, message, wants_sse)
        finally:
            session.closed = True
            await hub.detach(session)

    async def _legacy_answer(
        self,
        send: Send,
        receive: Receive,
        session: LegacySession,
        hub: Hub,
        message: rpc.Message,
        wants_sse: bool,
    ) -> None:
        """A handshake-era request, run in this handler: answered as JSON, or as a resumable SSE
        stream once anything precedes the answer or the answer is slower than the keep-alive.

        No task per request (one, with its wake-ups, was ~18 % of the gateway's CPU per call at C=50,
        bench/README.md): the session's end cancels this handler itself (``session.tasks``), and
        once the response is SSE a reader task sends the log while the request runs on here."""
        down_id = message["id"]
        me = asyncio.current_task()
        assert me is not None
        post: PostStream | None = None
        reader: asyncio.Task[None] | None = None
        keepalive: Deadline | None = None
        if wants_sse:

            def open_log() -> EventLog:
                nonlocal reader
                log = session.new_log()
                reader = asyncio.create_task(self._read_log(send, receive, log, 0))
                return log

            post = PostStream(open_log)
            session.post_streams[down_id] = post
            keepalive = later(self.settings.keepalive_seconds, post.open)
        session.active_requests += 1
        session.tasks.add(me)
        reply: rpc.Message | None = None
        try:
            try:
                reply = await hub.request(session, message)
            except asyncio.CancelledError:
                if not session.closed:
                    raise
                me.uncancel()  # the session ended (DELETE, expiry, shutdown): answered below
            finally:
                session.tasks.discard(me)
                session.active_requests -= 1
                session.touch()
                if post is not None:
                    session.post_streams.pop(down_id, None)
                    assert keepalive is not None
                    keepalive.cancel()
            log = post.log if post is not None else None
            if log is None:
                if reply is None:
                    await _respond_terminated(send, down_id, wants_sse)
                else:
                    await respond_json(send, 200, reply)
                return
            if reply is not None:
                log.append(reply, final=True)
        finally:
            if post is not None and post.log is not None and not post.log.done:
                post.log.close()  # the session ended, or the request failed: the stream ends
        if reader is not None:
            try:
                await reader
            except asyncio.CancelledError:
                reader.cancel()
                raise

    async def _read_log(self, send: Send, receive: Receive, log: EventLog, start: int) -> None:
        """Send a log's events from ``start`` as an SSE stream, until its answer or the client leaves."""
        disconnect = asyncio.create_task(self._wait_disconnect(receive))
        pos = start
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": log.priming(), "more_body": True})
            while True:
                while pos < len(log.entries):
                    await send({"type": "http.response.body", "body": log.entries[pos], "more_body": True})
                    pos += 1
                if log.done:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                log.changed.clear()
                waiter = asyncio.create_task(log.changed.wait())
                done, _ = await asyncio.wait(
                    {waiter, disconnect},
                    timeout=self.settings.keepalive_seconds,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waiter.cancel()
                if disconnect in done:
                    return  # the request runs on; its events stay in the log for a resume
                if not done:
                    await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
        except OSError:
            return
        finally:
            disconnect.cancel()

    @staticmethod
    async def _wait_disconnect(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _session_of(self, scope: Scope, send: Send, hub: Hub) -> LegacySession | None:
        """The request's session; None after answering 400 (no Mcp-Session-Id) or 404 (unknown, or
        another caller's: a session is bound to the subject that opened it)."""
        sid = _header(scope, b"mcp-session-id")
        if sid is None:
            err = rpc.error(None, rpc.INVALID_REQUEST, "Bad Request: Mcp-Session-Id header is required")
            await respond_json(send, 400, err)
            return None
        session = self.sessions.get(sid)
        if session is None or session.hub is not hub or session.identity.subject != _identity(scope).subject:
            await respond_json(send, 404, rpc.error(None, rpc.INVALID_REQUEST, "Session not found"))
            return None
        return session

    async def _legacy_get(self, scope: Scope, receive: Receive, send: Send, hub: Hub) -> None:
        _, wants_sse = _accepts(_header(scope, b"accept"))
        if not wants_sse:
            await respond_json(
                send, 406, rpc.error(None, rpc.INVALID_REQUEST, "Not Acceptable: accept text/event-stream")
            )
            return
        session = await self._session_of(scope, send, hub)
        if session is None:
            return
        last = _header(scope, b"last-event-id")
        if last is not None and "-" in last:
            key, _, seq = last.rpartition("-")
            log = session.logs.get(key)
            if log is not None and seq.isdigit() and int(seq) <= len(log.entries):
                session.touch()
                await self._read_log(send, receive, log, int(seq))
                return
        if session.get_stream is not None:
            await respond_json(
                send, 409, rpc.error(None, rpc.INVALID_REQUEST, "Conflict: a GET stream is already open")
            )
            return
        stream = Stream()
        for m in session.backlog:
            stream.put(m)
        session.backlog.clear()
        session.get_stream = stream
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send({"type": "http.response.body", "body": sse_event(None, "0"), "more_body": True})
        await self._pump(stream, receive, send, session)
        if session.get_stream is stream:
            session.get_stream = None
            session.touch()

    async def _pump(
        self, stream: Stream, receive: Receive, send: Send, session: LegacySession, event: str | None = None
    ) -> None:
        """Copy a stream's messages to an open SSE response until the client leaves."""
        disconnect = asyncio.create_task(self._wait_disconnect(receive))
        try:
            while not session.closed:
                getter = stream.signal()
                done, _ = await asyncio.wait(
                    {getter, disconnect},
                    timeout=self.settings.keepalive_seconds,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if stream.items:
                    while stream.items:
                        body = sse_event(stream.items.popleft(), event=event)
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                    continue
                if disconnect in done:
                    return
                if session.closed:
                    break
                await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
        except OSError:
            return
        finally:
            disconnect.cancel()
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _legacy_delete(self, scope: Scope, send: Send, hub: Hub) -> None:
        session = await self._session_of(scope, send, hub)
        if session is None:
            return
        await self._end_session(session)
        log.info("session_ended", session=session.id[:8])
        await respond(send, 200)

    async def _modern_post(self, scope: Scope, receive: Receive, send: Send, hub: Hub) -> None:
        wants_json, wants_sse = _accepts(_header(scope, b"accept"))
        if not wants_json:
            await respond_json(
                send, 406, rpc.error(None, rpc.INVALID_REQUEST, "Not Acceptable: accept application/json")
            )
            return
        message = await self._read_message(scope, receive, send)
        if message is None:
            return
        if not rpc.is_request(message):
            await respond(send, 202)
            return
        try:
            headers = _mcp_headers(scope)
            envelope = check_modern_request(message, headers)
            if message["method"] == "tools/call":
                declared = hub.param_headers.get(str(rpc.params_of(message).get("name", "")))
                if declared is not None:
                    check_param_values(declared, rpc.params_of(message).get("arguments"), headers)
        except rpc.ProtocolError as exc:
            status = MODERN_ERROR_STATUS.get(exc.code, 400)
            await respond_json(send, status, exc.to_message(message["id"]))
            return
        if message["method"] == "subscriptions/listen" and not wants_sse:
            await respond_json(
                send,
                406,
                rpc.error(
                    message["id"],
                    rpc.INVALID_REQUEST,
                    "Not Acceptable: subscriptions/listen answers with text/event-stream",
                ),
            )
            return
        peer = ModernExchange(envelope.protocol_version)
        peer.identity = _identity(scope)
        peer.client_capabilities = envelope.client_capabilities
        peer.client_info = envelope.client_info
        hub.attach(peer)
        try:
            await self._answer(send, receive, peer, hub, message, wants_sse)
        finally:
            peer.closed = True
            hub.peers.discard(peer)

    # ------------------------------------------------------------------ legacy HTTP+SSE (2024-11-05)
    async def _sse_get(self, scope: Scope, receive: Receive, send: Send, hub: Hub) -> None:
        if scope["method"] != "GET":
            await respond(send, 405, b"", [(b"allow", b"GET")])
            return
        if len(self.sessions) >= self.settings.max_sessions:
            await respond_json(send, 503, rpc.error(None, rpc.INTERNAL_ERROR, "Too many sessions"))
            return
        session = LegacySession(secrets.token_urlsafe(32), "2024-11-05", hub, sse_transport=True)
        session.identity = _identity(scope)
        self.sessions[session.id] = session
        stream = Stream()
        session.get_stream = stream
        base = scope["path"][: -len("/sse")]
        endpoint = f"{scope.get('root_path', '')}{base}/messages?session_id={session.id}"
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send(
            {
                "type": "http.response.body",
                "body": b"event: endpoint\ndata: " + endpoint.encode() + b"\n\n",
                "more_body": True,
            }
        )
        log.info("sse_session_started", session=session.id[:8], path=scope["path"])
        try:
            await self._pump(stream, receive, send, session, event="message")
        finally:
            await self._end_session(session)

    async def _sse_post(self, scope: Scope, receive: Receive, send: Send, hub: Hub) -> None:
        if scope["method"] != "POST":
            await respond(send, 405, b"", [(b"allow", b"POST")])
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        sid = (query.get("session_id") or query.get("sessionId") or [None])[0]
        if sid is None:
            await respond_json(
                send, 400, rpc.error(None, rpc.INVALID_REQUEST, "Bad Request: session_id is required")
            )
            return
        session = self.sessions.get(sid)
        if (
            session is None
            or not session.sse_transport
            or session.hub is not hub
            or session.identity.subject != _identity(scope).subject
        ):
            await respond_json(send, 404, rpc.error(None, rpc.INVALID_REQUEST, "Session not found"))
            return
        message = await self._read_message(scope, receive, send)
        if message is None:
            return
        session.touch()
        await respond(send, 202, b"Accepted")
        if rpc.is_response(message):
            await hub.client_response(session, message)
            return
        if rpc.is_notification(message):
            await hub.client_notification(session, message)
            return
        if message["method"] != "initialize" and META_PROTOCOL_VERSION in rpc.meta_of(message):
            # Over HTTP+SSE the era is the message's own: a 2026-07-28 envelope
            # (a dual-era client probing with server/discover) makes it a modern request.
            try:
                envelope = check_modern_request(message, None)
            except rpc.ProtocolError as exc:
                session.deliver(exc.to_message(message["id"]), None)
                return
            if not session.initialized:
                session.era = "modern"
                session.protocol_version = envelope.protocol_version
                hub.attach(session)
                session.initialized = True
            session.client_capabilities = envelope.client_capabilities
            session.client_info = envelope.client_info
        elif message["method"] == "initialize":
            if session.initialized:
                session.deliver(rpc.error(message["id"], rpc.INVALID_REQUEST, "already initialized"), None)
                return
            session.initialized = True
            hub.attach(session)

        if session.active_requests >= self.settings.max_concurrent_per_session:
            err = rpc.error(
                message["id"], rpc.TOO_MANY_REQUESTS, "Too many concurrent requests in this session"
            )
            session.deliver(err, None)
            return

        async def run() -> None:
            session.active_requests += 1
            try:
                reply = await hub.request(session, message)
                session.deliver(reply, None)
            finally:
                session.active_requests -= 1

        task = asyncio.create_task(run())
        session.tasks.add(task)
        task.add_done_callback(session.tasks.discard)

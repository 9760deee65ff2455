"""Closed-loop load generator for MCP over Streamable HTTP, both protocol eras.

It speaks HTTP/1.1 itself (asyncio protocol + the ``httptools`` parser; one
keep-alive connection per session) so the client's own overhead stays small,
and it reads both JSON and SSE (``text/event-stream``) response bodies.

Eras:
  * ``handshake``: ``initialize`` -> ``Mcp-Session-Id`` -> ``notifications/initialized``,
    then ``tools/call`` with the session id and ``MCP-Protocol-Version``; ``DELETE`` at the end.
  * ``modern`` (2026-07-28): no session; ``server/discover`` once, then every request carries
    ``MCP-Protocol-Version: 2026-07-28``, ``Mcp-Method``, ``Mcp-Name`` and ``_meta`` with the
    protocol version and the client capabilities.

Scenarios (``--scenario``):
  * ``calls``: C concurrent sessions, each does a warm-up, then all start together and each makes
    N calls, one at a time (closed loop). Every payload is unique per session and call and every
    reply is checked: a reply carrying another call's payload (or JSON-RPC id) is *misrouted*.
  * ``storm``: S sessions set up (and torn down) as fast as possible, K at a time.
  * ``idle``: S handshake-era sessions opened and held; RSS growth of the subject per session.

While it runs it samples the subject's whole process tree (``--pid``, children included) with
psutil: peak RSS, process count and CPU seconds spent during the measured phase.

Prints one JSON object (a line) on stdout. Run ``python -m bench.loadgen --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import orjson
import psutil

MODERN = "2026-07-28"
HANDSHAKE_VERSION = "2025-11-25"
PROTOCOL_VERSION_META_KEY = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_META_KEY = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO = {"name": "mcp-bastion-bench", "version": "1.0"}
SETUP_ID_BASE = 2_000_000_000
CALL_ID_STRIDE = 1_000_000

ERAS = ("handshake", "modern")


# --------------------------------------------------------------------------------------------
# HTTP/1.1 client connection
# --------------------------------------------------------------------------------------------


class HttpError(Exception):
    """Transport-level failure: connection refused/closed, parse error, timeout."""


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    message: Any  # the decoded JSON-RPC response (JSON body or the SSE event), None if none
    body: bytes  # raw JSON body (empty for SSE)
    sse: bool
    t_reply: float  # perf_counter() when the reply was complete


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self._reply: asyncio.Future[Reply] | None = None
        self._idle: asyncio.Future[None] | None = None
        self._headers: dict[bytes, bytes] = {}
        self._body = bytearray()
        self._status = 0
        self._sse = False
        self._sse_found: Any = None
        self._sse_buf = bytearray()
        self._headers_done = False

    @classmethod
    async def open(cls, host: str, port: int, wait_s: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(cls, host, port), wait_s)
        except (OSError, TimeoutError) as exc:
            raise HttpError(f"connect: {exc!r}") from exc
        return conn

    # asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - never asked for
            self._fail(HttpError("unexpected upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(HttpError(f"HTTP parse error: {exc!r}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._headers_done:
            self.on_message_complete()  # a response delimited by the connection's close
        self._fail(HttpError(f"connection closed: {exc!r}" if exc else "connection closed"))

    # httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._headers_done = False
        self._headers = {}
        self._body = bytearray()
        self._sse = False
        self._sse_found = None
        self._sse_buf = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self._status = self.parser.get_status_code()
        ctype = self._headers.get(b"content-type", b"")
        self._sse = ctype.startswith(b"text/event-stream")
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        if not self._sse:
            self._body += body
            return
        buf = self._sse_buf
        buf += body
        while True:
            # Events end with a blank line; accept \n\n and \r\n\r\n.
            end = buf.find(b"\n\n")
            end_crlf = buf.find(b"\r\n\r\n")
            if end_crlf != -1 and (end == -1 or end_crlf < end):
                end, sep = end_crlf, 4
            elif end != -1:
                sep = 2
            else:
                return
            event = bytes(buf[:end])
            del buf[: end + sep]
            self._sse_event(event)

    def _sse_event(self, event: bytes) -> None:
        data = [
            line[5:].removeprefix(b" ")
            for line in event.replace(b"\r\n", b"\n").split(b"\n")
            if line.startswith(b"data:")
        ]
        if not data:
            return
        try:
            msg = orjson.loads(b"\n".join(data))
        except orjson.JSONDecodeError:
            return
        if not isinstance(msg, dict) or "method" in msg or "id" not in msg:
            return  # a notification or a server-to-client request: not our reply
        if self._sse_found is None:
            self._sse_found = msg
            self._resolve(msg)

    def on_message_complete(self) -> None:
        self._headers_done = False
        if self._sse:
            if self._sse_found is None:
                self._resolve(None)
        else:
            body = bytes(self._body)
            msg: Any = None
            if body:
                try:
                    msg = orjson.loads(body)
                except orjson.JSONDecodeError:
                    msg = None
            self._resolve(msg, body)
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        self._idle = None
        if not self.closed and not self.parser.should_keep_alive():
            self.close()

    # ------------------------------------------------------------------------------------
    def _resolve(self, msg: Any, body: bytes = b"") -> None:
        fut = self._reply
        if fut is None or fut.done():
            return
        fut.set_result(Reply(self._status, self._headers, msg, body, self._sse, time.perf_counter()))

    def _fail(self, exc: Exception) -> None:
        for fut in (self._reply, self._idle):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        self._reply = None
        self._idle = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def request(self, head: bytes, body: bytes, wait_s: float) -> Reply:
        """Send one request; return when its reply arrived (the SSE event, or the whole JSON body).

        The response body may still be streaming (SSE): ``wait_idle`` waits for its end.
        """
        if self.closed or self.transport is None:
            raise HttpError("connection closed")
        loop = asyncio.get_running_loop()
        self._reply = loop.create_future()
        self._idle = loop.create_future()
        self.transport.write(head + body if len(body) < 16384 else head)
        if len(body) >= 16384:
            self.transport.write(body)
        try:
            return await asyncio.wait_for(self._reply, wait_s)
        except TimeoutError as exc:
            self.close()
            raise HttpError(f"timeout after {wait_s:.0f}s") from exc
        finally:
            self._reply = None

    async def wait_idle(self, wait_s: float) -> None:
        """Wait for the end of the current response body; close the connection if it does not end."""
        idle = self._idle
        if idle is None or idle.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(idle), wait_s)
        except (TimeoutError, HttpError):
            self.close()


# --------------------------------------------------------------------------------------------
# MCP session over Streamable HTTP
# --------------------------------------------------------------------------------------------


class McpError(Exception):
    """A reply that is not a successful JSON-RPC result."""


@dataclass
class Endpoint:
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http:// URLs are supported: {url}")
        return cls(parts.hostname, parts.port or 80, parts.path or "/")


def _head(ep: Endpoint, method: str, extra: Iterable[tuple[str, str | bytes]], length: int | None) -> bytes:
    lines = [
        f"{method} {ep.path} HTTP/1.1",
        f"Host: {ep.host}:{ep.port}",
        "Accept: application/json, text/event-stream",
    ]
    if length is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {length}")
    for name, value in extra:
        lines.append(f"{name}: {value.decode() if isinstance(value, bytes) else value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Session:
    """One MCP client session on its own keep-alive connection (reconnects if it is closed)."""

    def __init__(self, ep: Endpoint, era: str, timeout: float) -> None:
        self.ep = ep
        self.era = era
        self.timeout = timeout
        self.conn: Connection | None = None
        self.session_id: bytes | None = None
        self.protocol_version = MODERN if era == "modern" else HANDSHAKE_VERSION
        self.reconnects = 0

    async def _conn(self) -> Connection:
        if self.conn is not None and not self.conn.closed:
            await self.conn.wait_idle(self.timeout)
        if self.conn is None or self.conn.closed:
            if self.conn is not None:
                self.reconnects += 1
            self.conn = await Connection.open(self.ep.host, self.ep.port, self.timeout)
        return self.conn

    def _headers(self, method: str, name: str | None) -> list[tuple[str, str | bytes]]:
        headers: list[tuple[str, str | bytes]] = []
        if self.session_id is not None:
            headers.append(("Mcp-Session-Id", self.session_id))
        if self.era == "modern":
            headers.append(("MCP-Protocol-Version", MODERN))
            headers.append(("Mcp-Method", method))
            if name is not None:
                headers.append(("Mcp-Name", name))
        elif method != "initialize":
            headers.append(("MCP-Protocol-Version", self.protocol_version))
        return headers

    async def post(self, msg: dict[str, Any], name: str | None = None) -> Reply:
        if self.era == "modern":
            params = msg.setdefault("params", {})
            params["_meta"] = {PROTOCOL_VERSION_META_KEY: MODERN, CLIENT_CAPABILITIES_META_KEY: {}}
        body = orjson.dumps(msg)
        head = _head(self.ep, "POST", self._headers(msg["method"], name), len(body))
        conn = await self._conn()
        return await conn.request(head, body, self.timeout)

    async def rpc(self, msg: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        reply = await self.post(msg, name)
        res = reply.message
        if reply.status != 200 or not isinstance(res, dict) or "result" not in res:
            raise McpError(describe_failure(reply))
        result = res["result"]
        if not isinstance(result, dict):
            raise McpError(f"result is not an object: {result!r:.200}")
        return result

    async def setup(self, seq: int) -> None:
        """Handshake era: initialize + notifications/initialized. Modern: server/discover."""
        if self.era == "modern":
            await self.rpc({"jsonrpc": "2.0", "id": SETUP_ID_BASE + seq, "method": "server/discover"})
            return
        init = {
            "jsonrpc": "2.0",
            "id": SETUP_ID_BASE + seq,
            "method": "initialize",
            "params": {"protocolVersion": HANDSHAKE_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO},
        }
        reply = await self.post(init)
        res = reply.message
        if reply.status != 200 or not isinstance(res, dict) or not isinstance(res.get("result"), dict):
            raise McpError("initialize: " + describe_failure(reply))
        self.session_id = reply.headers.get(b"mcp-session-id")
        version = res["result"].get("protocolVersion")
        if isinstance(version, str):
            self.protocol_version = version
        reply = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        if reply.status not in (200, 202, 204):
            raise McpError(f"notifications/initialized: HTTP {reply.status}")

    async def close(self) -> None:
        """DELETE the session (handshake era) and close the connection."""
        try:
            if self.session_id is not None and self.conn is not None:
                conn = await self._conn()
                head = _head(self.ep, "DELETE", self._headers("DELETE", None), 0)
                with contextlib.suppress(HttpError):
                    await conn.request(head, b"", min(self.timeout, 5.0))
                    await conn.wait_idle(1.0)
        except HttpError:
            pass
        finally:
            if self.conn is not None:
                self.conn.close()


def describe_failure(reply: Reply) -> str:
    msg = reply.message
    if isinstance(msg, dict) and isinstance(msg.get("error"), dict):
        err = msg["error"]
        return f"HTTP {reply.status} JSON-RPC error {err.get('code')}: {str(err.get('message'))[:200]}"
    if msg is None:
        snippet = (
            reply.body[:200].decode(errors="replace")
            if reply.body
            else ("<SSE without reply>" if reply.sse else "")
        )
        return f"HTTP {reply.status}: {snippet}"
    return f"HTTP {reply.status}: unexpected reply {orjson.dumps(msg)[:200].decode(errors='replace')}"


# --------------------------------------------------------------------------------------------
# Payloads and verification
# --------------------------------------------------------------------------------------------

_FILLER = ("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ" * 2048)[: 1 << 20]


def make_text(run: str, session: int, call: int, size: int) -> str:
    """A payload unique per run, session and call: a tag, then filler up to ``size`` bytes."""
    tag = f"{run}:{session}:{call}|"
    if len(tag) >= size:
        return tag
    # The tail repeats the tag so a truncated or spliced reply cannot pass.
    tail = f"|{session}:{call}"
    return tag + _FILLER[: max(0, size - len(tag) - len(tail))] + tail


def parse_tag(text: str, run: str) -> tuple[int, int] | None:
    head, sep, _ = text.partition("|")
    if not sep:
        return None
    parts = head.split(":")
    if len(parts) != 3 or parts[0] != run:
        return None
    try:
        return int(parts[1]), int(parts[2])
    except ValueError:
        return None


def reply_text(result: dict[str, Any]) -> str | None:
    """The echoed text of a tools/call result: ``content[0].text`` (and ``structuredContent.result``).

    When both are present they must agree; a disagreement is returned as an impossible payload.
    """
    text: str | None = None
    content = result.get("content")
    if isinstance(content, list) and content and isinstance(content[0], dict):
        first = content[0].get("text")
        if isinstance(first, str):
            text = first
    structured = result.get("structuredContent")
    if isinstance(structured, dict):
        value = structured.get("result")
        if isinstance(value, str):
            if text is not None and value != text:
                return "<content and structuredContent disagree>"
            text = value
    return text


# --------------------------------------------------------------------------------------------
# Subject process-tree monitor
# --------------------------------------------------------------------------------------------


class TreeMonitor:
    """Samples RSS and CPU time of a process and all its descendants in a background thread."""

    def __init__(self, pid: int | None, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss = 0
        self.peak_procs = 0
        self.last_rss = 0
        self._cpu: dict[tuple[int, float], float] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.root: psutil.Process | None = None
        if pid is not None:
            try:
                self.root = psutil.Process(pid)
            except psutil.Error:
                self.root = None

    def sample(self) -> int:
        """Take one sample; returns the tree's RSS in bytes."""
        if self.root is None:
            return 0
        with self._lock:
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return 0
            rss = 0
            for proc in procs:
                cached = self._procs.setdefault(proc.pid, proc)
                try:
                    with cached.oneshot():
                        mem = cached.memory_info().rss
                        cpu = cached.cpu_times()
                        key = (cached.pid, cached.create_time())
                except psutil.Error:
                    self._procs.pop(proc.pid, None)
                    continue
                rss += mem
                self._cpu[key] = cpu.user + cpu.system
            self.last_rss = rss
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, len(procs))
            return rss

    def cpu_seconds(self) -> float:
        """CPU seconds of every process of the tree ever seen (fresh sample first)."""
        self.sample()
        with self._lock:
            return sum(self._cpu.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            self.sample()
            spent = time.perf_counter() - t0
            # Keep the sampler's own cost below ~5 % of the load generator's core.
            self._stop.wait(max(self.interval, spent * 20))

    def start(self) -> TreeMonitor:
        if self.root is not None:
            self.sample()
            self._thread = threading.Thread(target=self._run, name="tree-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    url: str
    era: str = "handshake"
    scenario: str = "calls"
    concurrency: int = 10
    calls: int = 100
    warmup: int = 5
    payload: int = 32
    tool: str = "echo"
    sessions: int = 100
    hold: float = 2.0
    pool: int = 50
    timeout: float = 30.0
    max_seconds: float = 300.0
    max_rss_mb: float = 8192.0
    max_errors: int = 3
    pid: int | None = None


@dataclass
class Counts:
    ok: int = 0
    misrouted: int = 0
    errors: int = 0
    lost: int = 0
    skipped: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, kind: str, text: str) -> None:
        if kind == "lost":
            self.lost += 1
        else:
            self.errors += 1
        if len(self.error_samples) < 5 and text not in self.error_samples:
            self.error_samples.append(text)


def percentiles(values: list[float], points: Iterable[float] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    out: dict[str, float] = {}
    for p in points:
        idx = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
        out[f"p{p:g}"] = round(ordered[idx] * 1000, 4)
    out["max"] = round(ordered[-1] * 1000, 4)
    out["mean"] = round(sum(ordered) / len(ordered) * 1000, 4)
    return out


def cdf(values: list[float]) -> list[float]:
    """Latency (ms) at every percentile 0..100 plus 99.9."""
    if not values:
        return []
    ordered = sorted(values)
    n = len(ordered) - 1
    pts = [*range(0, 100), 99.9, 100]
    return [round(ordered[min(n, round(p / 100 * n))] * 1000, 4) for p in pts]


class Runner:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ep = Endpoint.parse(cfg.url)
        self.run_id = secrets.token_hex(3)
        self.counts = Counts()
        self.latencies: list[float] = []
        self.setup_latencies: list[float] = []
        self.setup_failures = 0
        self.setup_samples: list[str] = []
        self.reconnects = 0
        self.monitor = TreeMonitor(cfg.pid)
        self.aborted: str | None = None
        self.deadline = 0.0

    def tool_name(self) -> str:
        return self.cfg.tool

    def _setup_failed(self, exc: Exception) -> None:
        self.setup_failures += 1
        text = f"setup: {exc}"
        if len(self.setup_samples) < 5 and text not in self.setup_samples:
            self.setup_samples.append(text)

    def _over_memory(self) -> bool:
        if self.monitor.last_rss > self.cfg.max_rss_mb * 1e6:
            self.aborted = f"subject tree RSS above {self.cfg.max_rss_mb:.0f} MB"
            return True
        return False

    async def _open(self, seq: int) -> Session | None:
        session = Session(self.ep, self.cfg.era, self.cfg.timeout)
        t0 = time.perf_counter()
        try:
            session.conn = await Connection.open(self.ep.host, self.ep.port, self.cfg.timeout)
            await session.setup(seq)
        except (HttpError, McpError) as exc:
            self._setup_failed(exc)
            await session.close()
            return None
        self.setup_latencies.append(time.perf_counter() - t0)
        return session

    async def call(self, session: Session, sidx: int, cidx: int, record: bool) -> bool:
        """One verified tools/call; returns False when the session should give up."""
        cfg = self.cfg
        text = make_text(self.run_id, sidx, cidx, cfg.payload)
        req_id = sidx * CALL_ID_STRIDE + cidx
        msg = {
            "jsonrpc": "2.0",
            "id": req_id,
            "method": "tools/call",
            "params": {"name": cfg.tool, "arguments": {"text": text}},
        }
        counts = self.counts
        t0 = time.perf_counter()
        try:
            reply = await session.post(msg, cfg.tool)
        except HttpError as exc:
            if record:
                counts.error("lost", f"lost: {exc}")
            return False
        if not record:
            return reply.status == 200
        res = reply.message
        if not isinstance(res, dict) or reply.status != 200:
            counts.error("error", describe_failure(reply))
            return True
        rid = res.get("id")
        result = res.get("result")
        got = reply_text(result) if isinstance(result, dict) else None
        if rid == req_id and got == text:
            if isinstance(result, dict) and result.get("isError"):
                counts.error("error", f"isError with the right payload: {str(result)[:200]}")
                return True
            counts.ok += 1
            self.latencies.append(reply.t_reply - t0)
            return True
        foreign_tag = got is not None and parse_tag(got, self.run_id) not in (None, (sidx, cidx))
        if (rid is not None and rid != req_id) or foreign_tag:
            # Another call's reply (by JSON-RPC id or by payload) was delivered to this caller.
            counts.misrouted += 1
            sample = f"misrouted: sent id {req_id}, got id {rid} payload {(got or '')[:40]!r}"
            if len(counts.error_samples) < 5:
                counts.error_samples.append(sample)
        else:
            counts.error("error", f"wrong reply: {describe_failure(reply)}")
        return True

    # -- calls --------------------------------------------------------------------------------
    async def run_calls(self) -> dict[str, Any]:
        cfg = self.cfg
        ready = asyncio.Event()
        warmed = 0
        all_warm = asyncio.Event()
        cpu_marks: dict[str, float] = {}
        times: dict[str, float] = {}

        async def worker(sidx: int) -> None:
            nonlocal warmed
            session = await self._open(sidx)
            try:
                if session is not None:
                    for w in range(cfg.warmup):
                        if not await self.call(session, sidx, CALL_ID_STRIDE - 1 - w, record=False):
                            break
            finally:
                warmed += 1
                if warmed == cfg.concurrency:
                    all_warm.set()
            await ready.wait()
            if session is None:
                self.counts.skipped += cfg.calls
                return
            failures = 0
            try:
                for cidx in range(cfg.calls):
                    if self.aborted is not None or time.perf_counter() > self.deadline:
                        self.counts.skipped += cfg.calls - cidx
                        break
                    before = self.counts.ok
                    if not await self.call(session, sidx, cidx, record=True) or self.counts.ok == before:
                        failures += 1
                    else:
                        failures = 0
                    if failures >= cfg.max_errors:
                        self.counts.skipped += cfg.calls - cidx - 1
                        break
            finally:
                self.reconnects += session.reconnects
                await session.close()

        async def watchdog() -> None:
            while True:
                await asyncio.sleep(0.25)
                if self._over_memory():
                    ready.set()
                    return

        self.monitor.start()
        self.deadline = time.perf_counter() + cfg.max_seconds
        t_setup = time.perf_counter()
        tasks = [asyncio.create_task(worker(i)) for i in range(cfg.concurrency)]
        guard = asyncio.create_task(watchdog())
        try:
            await asyncio.wait_for(all_warm.wait(), cfg.max_seconds)
        except TimeoutError:
            self.aborted = "set-up and warm-up exceeded max-seconds"
        times["setup_s"] = time.perf_counter() - t_setup
        cpu_marks["start"] = self.monitor.cpu_seconds()
        t0 = time.perf_counter()
        self.deadline = t0 + cfg.max_seconds
        ready.set()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
        cpu_marks["end"] = self.monitor.cpu_seconds()
        guard.cancel()
        self.monitor.stop()
        cpu = cpu_marks["end"] - cpu_marks["start"]
        counts = self.counts
        return {
            "calls_expected": cfg.concurrency * cfg.calls,
            "ok": counts.ok,
            "misrouted": counts.misrouted,
            "errors": counts.errors,
            "lost": counts.lost,
            "skipped": counts.skipped,
            "error_samples": counts.error_samples,
            "elapsed_s": round(elapsed, 4),
            "throughput": round(counts.ok / elapsed, 2) if elapsed > 0 else 0.0,
            "latency_ms": percentiles(self.latencies),
            "latency_cdf_ms": cdf(self.latencies),
            "setup_ms": percentiles(self.setup_latencies),
            "setup_wall_s": round(times["setup_s"], 4),
            "setup_failures": self.setup_failures,
            "setup_samples": self.setup_samples,
            "reconnects": self.reconnects,
            "cpu_s": round(cpu, 4),
            "cpu_us_per_call": round(cpu / counts.ok * 1e6, 2) if counts.ok else None,
        }

    # -- storm --------------------------------------------------------------------------------
    async def run_storm(self) -> dict[str, Any]:
        """S sessions, K at a time: connect, set up, one verified call, DELETE."""
        cfg = self.cfg
        queue = iter(range(cfg.sessions))

        async def worker() -> None:
            for sidx in queue:
                if self.aborted is not None or time.perf_counter() > self.deadline:
                    self.counts.skipped += 1
                    continue
                session = await self._open(sidx)
                if session is None:
                    self.counts.skipped += 1
                    continue
                try:
                    await self.call(session, sidx, 0, record=True)
                finally:
                    await session.close()

        async def watchdog() -> None:
            while True:
                await asyncio.sleep(0.25)
                if self._over_memory():
                    return

        self.monitor.start()
        cpu0 = self.monitor.cpu_seconds()
        t0 = time.perf_counter()
        self.deadline = t0 + cfg.max_seconds
        guard = asyncio.create_task(watchdog())
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, cfg.sessions))))
        elapsed = time.perf_counter() - t0
        guard.cancel()
        cpu = self.monitor.cpu_seconds() - cpu0
        self.monitor.stop()
        opened = len(self.setup_latencies)
        return {
            "sessions": cfg.sessions,
            "opened": opened,
            "ok": self.counts.ok,
            "misrouted": self.counts.misrouted,
            "errors": self.counts.errors,
            "lost": self.counts.lost,
            "skipped": self.counts.skipped,
            "error_samples": self.counts.error_samples,
            "setup_failures": self.setup_failures,
            "setup_samples": self.setup_samples,
            "elapsed_s": round(elapsed, 4),
            "sessions_per_s": round(opened / elapsed, 2) if elapsed > 0 else 0.0,
            "setup_ms": percentiles(self.setup_latencies),
            "cpu_s": round(cpu, 4),
        }

    # -- idle ---------------------------------------------------------------------------------
    async def run_idle(self) -> dict[str, Any]:
        """Open S handshake-era sessions over a pool of connections and hold them."""
        cfg = self.cfg
        if cfg.era != "handshake":
            raise SystemExit("the idle scenario holds handshake-era sessions: use --era handshake")
        # One session first so that lazy imports and first-use allocations are in the baseline.
        first = await self._open(0)
        if first is None:
            raise SystemExit(f"cannot open a session: {self.setup_samples}")
        await self.call(first, 0, 0, record=True)
        await first.close()
        await asyncio.sleep(0.5)
        self.monitor.start()
        rss0 = self.monitor.sample()
        held: list[tuple[int, bytes | None]] = []
        pool = max(1, min(cfg.pool, cfg.sessions))
        queue = iter(range(1, cfg.sessions + 1))
        t0 = time.perf_counter()
        self.deadline = t0 + cfg.max_seconds

        async def worker() -> None:
            # A few connections carry all set-ups: the sessions outlive their connection.
            session = Session(self.ep, "handshake", cfg.timeout)
            for sidx in queue:
                if self.aborted is not None or time.perf_counter() > self.deadline:
                    break
                if self._over_memory():
                    break
                session.session_id = None
                t1 = time.perf_counter()
                try:
                    await session.setup(sidx)
                except (HttpError, McpError) as exc:
                    self._setup_failed(exc)
                    if self.setup_failures > 20:
                        self.aborted = "more than 20 set-up failures"
                    continue
                self.setup_latencies.append(time.perf_counter() - t1)
                held.append((sidx, session.session_id))
            if session.conn is not None:
                session.conn.close()

        await asyncio.gather(*(worker() for _ in range(pool)))
        open_s = time.perf_counter() - t0
        await asyncio.sleep(cfg.hold)
        rss1 = self.monitor.sample()
        # Check that held sessions are still alive: a spread sample of them makes a call.
        probe = Session(self.ep, "handshake", cfg.timeout)
        step = max(1, len(held) // 20)
        alive = 0
        checked = 0
        for sidx, sid in held[::step]:
            probe.session_id = sid
            checked += 1
            before = self.counts.ok
            await self.call(probe, sidx, 1, record=True)
            alive += self.counts.ok > before
        if probe.conn is not None:
            probe.conn.close()
        self.monitor.stop()
        n = len(held)
        return {
            "sessions": cfg.sessions,
            "opened": n,
            "setup_failures": self.setup_failures,
            "setup_samples": self.setup_samples,
            "open_s": round(open_s, 3),
            "sessions_per_s": round(n / open_s, 2) if open_s > 0 else 0.0,
            "setup_ms": percentiles(self.setup_latencies),
            "rss_before_mb": round(rss0 / 1e6, 2),
            "rss_after_mb": round(rss1 / 1e6, 2),
            "rss_delta_mb": round((rss1 - rss0) / 1e6, 2),
            "rss_per_session_kb": round((rss1 - rss0) / n / 1e3, 3) if n else None,
            "alive_checked": checked,
            "alive": alive,
            "misrouted": self.counts.misrouted,
            "errors": self.counts.errors,
            "lost": self.counts.lost,
            "error_samples": self.counts.error_samples,
        }

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        rss_start = self.monitor.sample()
        if cfg.scenario == "calls":
            result = await self.run_calls()
        elif cfg.scenario == "storm":
            result = await self.run_storm()
        elif cfg.scenario == "idle":
            result = await self.run_idle()
        else:
            raise SystemExit(f"unknown scenario {cfg.scenario}")
        result.update(
            {
                "rss_start_mb": round(rss_start / 1e6, 2),
                "rss_peak_mb": round(self.monitor.peak_rss / 1e6, 2),
                "procs_peak": self.monitor.peak_procs,
                "monitored": self.monitor.root is not None,
                "aborted": self.aborted,
            }
        )
        return result


# --------------------------------------------------------------------------------------------
# Probing a subject (used by run.py before it measures)
# --------------------------------------------------------------------------------------------


async def probe(url: str, era: str = "handshake", wait_s: float = 10.0) -> dict[str, Any]:
    """Set up one session, list the tools, find the echo tool and make one verified call.

    Returns ``{"tool": name, "tools": [...]}``; raises ``HttpError``/``McpError`` on failure.
    """
    ep = Endpoint.parse(url)
    session = Session(ep, era, wait_s)
    try:
        session.conn = await Connection.open(ep.host, ep.port, wait_s)
        await session.setup(0)
        result = await session.rpc({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})
        names = [t.get("name") for t in result.get("tools", []) if isinstance(t, dict)]
        tool = (
            "echo"
            if "echo" in names
            else next((n for n in names if isinstance(n, str) and n.endswith("_echo")), None)
        )
        if tool is None:
            raise McpError(f"no echo tool in tools/list: {names}")
        text = f"probe-{secrets.token_hex(4)}"
        msg = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": tool, "arguments": {"text": text}},
        }
        called = await session.rpc(msg, tool)
        if reply_text(called) != text:
            raise McpError(f"echo probe returned {called!r:.200}")
        return {"tool": tool, "tools": names}
    finally:
        await session.close()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def install_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def parse_args(argv: list[str] | None = None) -> tuple[Config, dict[str, Any], int | None]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="Streamable HTTP endpoint, e.g. http://127.0.0.1:8000/mcp")
    p.add_argument("--era", choices=ERAS, default="handshake")
    p.add_argument("--scenario", choices=("calls", "storm", "idle"), default="calls")
    p.add_argument("-c", "--concurrency", type=int, default=10, help="concurrent sessions (calls, storm)")
    p.add_argument("-n", "--calls", type=int, default=100, help="measured calls per session")
    p.add_argument("--warmup", type=int, default=5, help="warm-up calls per session")
    p.add_argument("--payload", type=int, default=32, help="bytes of text sent and echoed back")
    p.add_argument("--tool", default="echo", help="name of the echo tool (echo_echo when aggregated)")
    p.add_argument("--sessions", type=int, default=100, help="sessions (storm, idle)")
    p.add_argument("--hold", type=float, default=2.0, help="idle: seconds to hold before measuring")
    p.add_argument("--pool", type=int, default=50, help="idle: connections used to open the sessions")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--max-seconds", type=float, default=300.0, help="give up a scenario after this long")
    p.add_argument("--max-rss-mb", type=float, default=8192.0, help="abort when the subject tree exceeds it")
    p.add_argument("--pid", type=int, help="subject's root process: RSS/CPU of its whole tree are recorded")
    p.add_argument("--cpu", type=int, help="pin the load generator to this CPU")
    p.add_argument("--label", default="{}", help="JSON object merged into the output line")
    a = p.parse_args(argv)
    cfg = Config(
        url=a.url,
        era=a.era,
        scenario=a.scenario,
        concurrency=a.concurrency,
        calls=a.calls,
        warmup=a.warmup,
        payload=a.payload,
        tool=a.tool,
        sessions=a.sessions,
        hold=a.hold,
        pool=a.pool,
        timeout=a.timeout,
        max_seconds=a.max_seconds,
        max_rss_mb=a.max_rss_mb,
        pid=a.pid,
    )
    label = orjson.loads(a.label)
    if not isinstance(label, dict):
        raise SystemExit("--label must be a JSON object")
    return cfg, label, a.cpu


def main(argv: list[str] | None = None) -> None:
    cfg, label, cpu = parse_args(argv)
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    install_loop()
    t0 = time.time()
    result = asyncio.run(Runner(cfg).run())
    line = {
        **label,
        "scenario": cfg.scenario,
        "era": cfg.era,
        "concurrency": cfg.concurrency,
        "calls_per_session": cfg.calls,
        "warmup": cfg.warmup,
        "payload": cfg.payload,
        "tool": cfg.tool,
        "url": cfg.url,
        "started": round(t0, 3),
        **result,
    }
    sys.stdout.buffer.write(orjson.dumps(line) + b"\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

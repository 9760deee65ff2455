"""Remote upstreams: Streamable HTTP (either era) and legacy HTTP+SSE, over pooled httpx clients.

Only the headers configured for the server are sent (secrets resolved from their
references); a downstream client's own credentials never reach an upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urljoin

import httpx
import orjson
import structlog

from ..core import jsonrpc as rpc
from ..core.eras import (
    H_METHOD,
    H_NAME,
    H_PROTOCOL_VERSION,
    H_SESSION,
    LATEST_MODERN,
    NAME_BEARING,
    encode_header_value,
    x_mcp_headers,
)
from ..core.forward import Delivery
from .base import Channel, Era, Sink, UpstreamUnavailable

log = structlog.get_logger("mcp_bastion.http")


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream body."""
    event, data = "message", list[str]()
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", list[str]()
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if data:
        yield event, "\n".join(data)


def param_headers(schema: Any, arguments: Any) -> dict[str, str]:
    """The Mcp-Param-* headers a 2026-07-28 tools/call carries for ``x-mcp-header`` properties."""
    out: dict[str, str] = {}
    args = arguments if isinstance(arguments, dict) else {}
    for prop, header in x_mcp_headers(schema).items():
        value = args.get(prop)
        if isinstance(value, bool):
            out[f"Mcp-Param-{header}"] = "true" if value else "false"
        elif isinstance(value, int | float | str):
            out[f"Mcp-Param-{header}"] = encode_header_value(str(value))
    return out


def _client(timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, read=None),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        follow_redirects=False,
    )


class _HttpBase(Channel):
    def __init__(
        self,
        server: str,
        era: Era,
        sink: Sink,
        url: str,
        headers: Mapping[str, str],
        timeout: float,
    ):
        super().__init__(server, era, sink, handshake_timeout=timeout)
        self.url = url
        self.headers = dict(headers)
        self.client = _client(timeout)
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _fail(self, message: rpc.Message, reason: str) -> None:
        pend = self.state.pending.pop(message["id"], None)
        if pend is not None:
            err = rpc.error(pend.down_id, rpc.UPSTREAM_UNAVAILABLE, f"upstream {self.server!r}: {reason}")
            self._dispatch([Delivery(pend.route, err, pend.down_id, final=True)])

    async def _disconnect(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()


class StreamableHttpChannel(_HttpBase):
    """Streamable HTTP: one POST per message; replies as JSON or SSE."""

    def __init__(
        self,
        server: str,
        era: Era,
        sink: Sink,
        url: str,
        headers: Mapping[str, str],
        timeout: float,
    ):
        super().__init__(server, era, sink, url, headers, timeout)
        self.session_id: str | None = None
        self.version = LATEST_MODERN if era == "modern" else ""
        self._inflight: dict[rpc.RequestId, asyncio.Task[None]] = {}
        self.tool_schemas: dict[str, Any] = {}  # for the Mcp-Param-* headers of 2026-07-28 calls
        self._reinit = asyncio.Lock()

    async def _connect(self) -> None:
        await self.handshake()
        if self.era == "legacy":
            self.version = str(self.init_result.get("protocolVersion", ""))
            self._spawn(self._get_stream())

    def _request_headers(self, message: rpc.Message) -> dict[str, str]:
        h = {
            **self.headers,
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        if self.era == "modern":
            h[H_PROTOCOL_VERSION] = LATEST_MODERN
            if "method" in message:
                h[H_METHOD] = message["method"]
                key = NAME_BEARING.get(message["method"])
                value = rpc.params_of(message).get(key) if key else None
                if isinstance(value, str):
                    h[H_NAME] = encode_header_value(value)
                if message["method"] == "tools/call" and isinstance(value, str):
                    h.update(
                        param_headers(self.tool_schemas.get(value), rpc.params_of(message).get("arguments"))
                    )
        else:
            if self.version:
                h[H_PROTOCOL_VERSION] = self.version
            if self.session_id:
                h[H_SESSION] = self.session_id
        return h

    async def _write(self, message: rpc.Message) -> None:
        if self.era == "modern" and message.get("method") == "notifications/cancelled":
            # 2026-07-28: closing the response stream is the cancellation.
            request_id = rpc.params_of(message).get("requestId")
            task = self._inflight.pop(request_id, None) if isinstance(request_id, str | int) else None
            if task is not None:
                task.cancel()
            return
        if rpc.is_request(message):
            task = self._spawn(self._post_request(message))
            up_id: rpc.RequestId = message["id"]
            self._inflight[up_id] = task
            task.add_done_callback(lambda _t: self._inflight.pop(up_id, None))
            return
        try:
            resp = await self.client.post(
                self.url, content=orjson.dumps(message), headers=self._request_headers(message)
            )
            await resp.aclose()
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(str(exc) or type(exc).__name__) from None

    async def _post_request(self, message: rpc.Message, retried: bool = False) -> None:
        try:
            async with self.client.stream(
                "POST", self.url, content=orjson.dumps(message), headers=self._request_headers(message)
            ) as resp:
                if (
                    resp.status_code == 404
                    and self.session_id
                    and not retried
                    and message["method"] != "initialize"
                ):
                    await resp.aread()
                    await self._reinitialize()
                    await self._post_request(message, retried=True)
                    return
                sid = resp.headers.get(H_SESSION)
                if sid and message["method"] == "initialize":
                    self.session_id = sid
                ctype = resp.headers.get("content-type", "")
                learn = message["method"] == "tools/list" and self.era == "modern"
                if ctype.startswith("text/event-stream"):
                    async for _event, data in sse_events(resp):
                        self._feed(data, learn)
                elif ctype.startswith("application/json"):
                    self._feed(await resp.aread(), learn)
                else:
                    await resp.aread()
                    self._fail(message, f"HTTP {resp.status_code} without a JSON-RPC answer")
                    return
        except httpx.HTTPError as exc:
            self._fail(message, str(exc) or type(exc).__name__)
            return
        if message["id"] in self.state.pending:
            self._fail(message, "the response stream ended without an answer")

    def _feed(self, data: bytes | str, learn_tools: bool = False) -> None:
        try:
            msg = rpc.validate(orjson.loads(data))
        except (orjson.JSONDecodeError, rpc.ProtocolError) as exc:
            log.warning("upstream_bad_message", server=self.server, error=str(exc)[:200])
            return
        if learn_tools and isinstance(msg.get("result"), dict):
            for tool in msg["result"].get("tools") or []:
                if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                    self.tool_schemas[tool["name"]] = tool.get("inputSchema")
        self.received(msg)

    async def _reinitialize(self) -> None:
        """The upstream forgot our session (404): open a new one."""
        async with self._reinit:
            log.info("upstream_session_lost", server=self.server)
            self.session_id = None
            await self.handshake()
            self.version = str(self.init_result.get("protocolVersion", ""))

    async def _get_stream(self) -> None:
        """The standalone GET stream of a handshake-era session (server-initiated messages)."""
        delay = 1.0
        while not self.closed:
            try:
                headers = self._request_headers({})
                headers["Accept"] = "text/event-stream"
                async with self.client.stream("GET", self.url, headers=headers) as resp:
                    if resp.status_code in (405, 404, 400):
                        return
                    delay = 1.0
                    async for _event, data in sse_events(resp):
                        if data:
                            self._feed(data)
            except httpx.HTTPError:
                pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _disconnect(self) -> None:
        if self.session_id and self.era == "legacy":
            with contextlib.suppress(httpx.HTTPError):
                await self.client.delete(self.url, headers=self._request_headers({}), timeout=2.0)
        await super()._disconnect()


class SseChannel(_HttpBase):
    """Legacy HTTP+SSE (2024-11-05): GET opens the stream, POSTs go to the announced endpoint."""

    def __init__(self, server: str, sink: Sink, url: str, headers: Mapping[str, str], timeout: float):
        super().__init__(server, "legacy", sink, url, headers, timeout)
        self.endpoint: str | None = None
        self._endpoint_ready = asyncio.Event()

    async def _connect(self) -> None:
        self._spawn(self._stream())
        try:
            await asyncio.wait_for(self._endpoint_ready.wait(), self.handshake_timeout)
        except TimeoutError:
            raise UpstreamUnavailable("no endpoint event on the SSE stream") from None
        if self.endpoint is None:
            raise UpstreamUnavailable("the SSE stream could not be opened")
        await self.handshake()

    async def _stream(self) -> None:
        try:
            async with self.client.stream(
                "GET", self.url, headers={**self.headers, "Accept": "text/event-stream"}
            ) as resp:
                if resp.status_code != 200:
                    raise UpstreamUnavailable(f"HTTP {resp.status_code}")
                async for event, data in sse_events(resp):
                    if event == "endpoint":
                        self.endpoint = urljoin(self.url, data.strip())
                        self._endpoint_ready.set()
                    elif event == "message":
                        try:
                            self.received(rpc.validate(orjson.loads(data)))
                        except (orjson.JSONDecodeError, rpc.ProtocolError):
                            log.warning("upstream_bad_message", server=self.server)
        except (httpx.HTTPError, UpstreamUnavailable) as exc:
            log.warning("upstream_sse_failed", server=self.server, error=str(exc) or type(exc).__name__)
        finally:
            self._endpoint_ready.set()
            if not self.closed:
                self.closed = True  # the entry opens a new channel on the next request
                self.lost("closed its SSE stream")

    async def _write(self, message: rpc.Message) -> None:
        if self.endpoint is None:
            raise UpstreamUnavailable("is not connected")
        try:
            resp = await self.client.post(
                self.endpoint,
                content=orjson.dumps(message),
                headers={**self.headers, "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(str(exc) or type(exc).__name__) from None
        if resp.status_code >= 400:
            raise UpstreamUnavailable(f"HTTP {resp.status_code} from the message endpoint")

"""The pipe floor: the least any bridge of mcp-bastion's shape can cost, for the bench to compare with.

An ASGI app on uvicorn (uvloop + httptools, as the ceiling) that passes each call to one raw stdio
echo child (``raw_echo.py``) through a pipe and back, with nothing else: the request's id rewritten
to one of the pipe's own and back, writes of one loop turn batched, one future per call. It answers
``initialize`` itself (handshake-era sessions, as ``asgi_ceiling.py``) and forwards everything else,
2026-07-28 requests as they come. No policy, no sessions beyond a set of ids, no timeouts, no
translation, no errors handled: not a bridge anyone should run, a measure of what the hop costs::

    python pipe_floor.py --port 8000        # http://127.0.0.1:8000/mcp

Where ``asgi-ceiling`` answers in-process, this one adds exactly the hop (a parse, a dump and a pipe
each way), so it bounds from above what a real bridge reaches against the ceiling (bench/README.md).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson
from asgi_cli import parser, run  # type: ignore[import-not-found]  # a sibling script

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

RAW_ECHO = Path(__file__).with_name("raw_echo.py")
PATH = "/mcp"
_JSON = (b"content-type", b"application/json")
_HANDSHAKE_VERSION = "2025-11-25"


class PipeFloor:
    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task[None] | None = None
        self.started: asyncio.Future[None] | None = None
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.ids = itertools.count(1)
        self.out: list[bytes] = []
        self.sessions: set[bytes] = set()

    async def _start(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(RAW_ECHO), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        self.proc = proc
        self.reader = asyncio.create_task(self._read())
        init = {"protocolVersion": _HANDSHAKE_VERSION, "capabilities": {}, "clientInfo": {"name": "floor"}}
        await self._call({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init})
        self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        rest = b""
        while chunk := await self.proc.stdout.read(1 << 16):
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                msg = orjson.loads(line)
                waiter = self.pending.pop(msg.get("id"), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)

    def _write(self, msg: dict[str, Any]) -> None:
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(orjson.dumps(msg, option=orjson.OPT_APPEND_NEWLINE))

    def _flush(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"".join(self.out))
        self.out.clear()

    async def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        up = next(self.ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[up] = waiter
        self._write({**msg, "id": up})
        reply = await waiter
        return {**reply, "id": msg["id"]}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if self.started is None:
            self.started = asyncio.ensure_future(self._start())
        await self.started
        if scope["path"] != PATH:
            await _reply(send, 404, b"")
            return
        if scope["method"] == "DELETE":
            for name, value in scope["headers"]:
                if name == b"mcp-session-id":
                    self.sessions.discard(value)
            await _reply(send, 200, b"")
            return
        body = b""
        more = True
        while more:
            event = await receive()
            body += event.get("body", b"")
            more = event.get("more_body", False)
        msg = orjson.loads(body)
        headers = [_JSON]
        if msg.get("method") == "initialize":
            session = uuid.uuid4().hex.encode()
            self.sessions.add(session)
            headers.append((b"mcp-session-id", session))
            result = {
                "protocolVersion": _HANDSHAKE_VERSION,
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "pipe-floor", "version": "1"},
            }
            reply: dict[str, Any] = {"jsonrpc": "2.0", "id": msg["id"], "result": result}
        elif "id" not in msg:
            await _reply(send, 202, b"")
            return
        else:
            reply = await self._call(msg)
        await _reply(send, 200, orjson.dumps(reply), headers)


async def _reply(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or [_JSON]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    run(PipeFloor(), parser(__doc__).parse_args())


if __name__ == "__main__":
    main()

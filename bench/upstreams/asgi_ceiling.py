"""Bare-ASGI ceiling: an ASGI app that answers the echo calls itself, no hop at all.

It speaks Streamable HTTP in JSON-response mode in both eras (handshake era with
``Mcp-Session-Id``; 2026-07-28 per-request) and answers with the same replies as
the raw upstream (``raw_echo.respond``). Served by uvicorn (uvloop + httptools),
it is the ceiling for any Python HTTP front::

    python asgi_ceiling.py --port 8000        # http://127.0.0.1:8000/mcp

``--misroute-every K`` makes it faulty on purpose (for the harness's own tests): every K-th
``tools/call`` is answered with the previous call's reply, as a bridge that mixes up its
callers would.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from asgi_cli import parser, run  # type: ignore[import-not-found]  # a sibling script
from raw_echo import respond  # type: ignore[import-not-found]  # a sibling script

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PATH = "/mcp"
_JSON_HEADERS = [(b"content-type", b"application/json")]


class CeilingApp:
    def __init__(self, misroute_every: int = 0) -> None:
        self.sessions: set[bytes] = set()
        self.misroute_every = misroute_every
        self.calls = 0
        self.previous: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] != PATH:
            await _reply(send, 404, b"")
            return
        session: bytes | None = None
        modern = False
        for name, value in scope["headers"]:
            if name == b"mcp-session-id":
                session = value
            elif name == b"mcp-protocol-version" and value == b"2026-07-28":
                modern = True
        method = scope["method"]
        if method == "DELETE":
            if session is not None:
                self.sessions.discard(session)
            await _reply(send, 200, b"")
            return
        if method != "POST":
            await _reply(send, 405, b"")
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            msg = orjson.loads(body)
        except orjson.JSONDecodeError:
            await _reply(
                send, 400, b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}'
            )
            return
        headers = _JSON_HEADERS
        if isinstance(msg, dict) and msg.get("method") == "initialize":
            session = uuid.uuid4().hex.encode()
            self.sessions.add(session)
            headers = [*_JSON_HEADERS, (b"mcp-session-id", session)]
        elif not modern and (session is None or session not in self.sessions):
            await _reply(
                send,
                404,
                b'{"jsonrpc":"2.0","id":null,"error":{"code":-32001,"message":"Session not found"}}',
            )
            return
        reply = respond(msg)
        if reply is None:
            await _reply(send, 202, b"")
            return
        data = orjson.dumps(reply)
        if self.misroute_every and msg.get("method") == "tools/call":
            self.calls += 1
            previous, self.previous = self.previous, data
            if previous is not None and self.calls % self.misroute_every == 0:
                data = previous
        await _reply(send, 200, data, headers)


async def _reply(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or _JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})


app = CeilingApp()


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--misroute-every", type=int, default=0, help=argparse.SUPPRESS)
    args = options.parse_args()
    app.misroute_every = args.misroute_every
    run(app, args)


if __name__ == "__main__":
    main()

"""Minimal raw stdio JSON-RPC echo server: no MCP SDK, as cheap as possible.

It isolates a bridge's own cost: in front of this upstream nearly all the CPU a
bridge burns is its own. It speaks just enough MCP for a bridge and the load
generator: ``initialize``, ``notifications/initialized``, ``server/discover``
(2026-07-28), ``tools/list``, ``tools/call`` (``echo`` and ``sized``) and ``ping``.
Replies mirror the shape of the SDK echo server's replies (``content`` plus
``structuredContent``) so that both upstreams put the same bytes on the wire.

Newline-delimited JSON on stdin/stdout; all complete lines of one read are
answered with one write.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

try:
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - orjson is a bench requirement, stdlib fallback
    import json

    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


MODERN = "2026-07-28"
HANDSHAKE_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
PROTOCOL_VERSION_META_KEY = "io.modelcontextprotocol/protocolVersion"
SERVER_INFO_META_KEY = "io.modelcontextprotocol/serverInfo"
CACHEABLE = ("server/discover", "tools/list")  # results that carry ttlMs/cacheScope at 2026-07-28
SERVER_INFO = {"name": "bench-raw-echo", "version": "1.0.0"}
CAPABILITIES: dict[str, Any] = {"tools": {"listChanged": False}}

_STRING_OUT = {"type": "object", "properties": {"result": {"type": "string"}}, "required": ["result"]}
TOOLS: list[dict[str, Any]] = [
    {
        "name": "echo",
        "description": "Return the text unchanged.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        "outputSchema": _STRING_OUT,
    },
    {
        "name": "sized",
        "description": "Return n bytes of text.",
        "inputSchema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        "outputSchema": _STRING_OUT,
    },
]


def _error(req_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": req_id, "error": {"code": code, "message": message}}


def _call_tool(params: dict[str, Any]) -> dict[str, Any] | None:
    name = params.get("name")
    args = params.get("arguments") or {}
    if name == "echo":
        text = args.get("text")
        if not isinstance(text, str):
            return None
    elif name == "sized":
        n = args.get("n")
        if not isinstance(n, int) or n < 0:
            return None
        text = "x" * n
    else:
        return None
    return {
        "content": [{"type": "text", "text": text}],
        "isError": False,
        "structuredContent": {"result": text},
    }


def respond(msg: Any) -> dict[str, Any] | None:
    """Answer one JSON-RPC message; ``None`` for notifications and responses."""
    if not isinstance(msg, dict):
        return _error(None, -32600, "Invalid Request")
    method = msg.get("method")
    if "id" not in msg or method is None:
        return None  # notification (notifications/initialized, cancelled, ...) or a response
    req_id = msg["id"]
    params = msg.get("params") or {}
    meta = params.get("_meta") if isinstance(params, dict) else None
    modern = isinstance(meta, dict) and meta.get(PROTOCOL_VERSION_META_KEY) == MODERN
    result: dict[str, Any] | None
    if method == "tools/call":
        result = _call_tool(params)
        if result is None:
            return _error(req_id, -32602, f"Unknown tool or bad arguments: {params.get('name')!r}")
    elif method == "ping":
        result = {}
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "initialize":
        asked = params.get("protocolVersion")
        version = asked if asked in HANDSHAKE_VERSIONS else HANDSHAKE_VERSIONS[0]
        result = {"protocolVersion": version, "capabilities": CAPABILITIES, "serverInfo": SERVER_INFO}
    elif method == "server/discover":
        result = {"supportedVersions": [MODERN], "capabilities": CAPABILITIES}
    else:
        return _error(req_id, -32601, f"Method not found: {method}")
    if modern:
        # The 2026-07-28 wire: every result says it is complete and who answered; lists and
        # discovery carry caching directives.
        result["resultType"] = "complete"
        result["_meta"] = {SERVER_INFO_META_KEY: SERVER_INFO}
        if method in CACHEABLE:
            result["ttlMs"] = 0
            result["cacheScope"] = "private"
    return {"jsonrpc": "2.0", "id": req_id, "result": result}


def main() -> None:
    fd_in = sys.stdin.fileno()
    fd_out = sys.stdout.fileno()
    pending = b""
    while True:
        chunk = os.read(fd_in, 1 << 20)
        if not chunk:
            return
        pending += chunk
        if b"\n" not in chunk:
            continue
        *lines, pending = pending.split(b"\n")
        out: list[bytes] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                reply = respond(_loads(line))
            except ValueError:
                reply = _error(None, -32700, "Parse error")
            if reply is not None:
                out.append(_dumps(reply))
        if out:
            out.append(b"")
            data = memoryview(b"\n".join(out))
            while data:
                data = data[os.write(fd_out, data) :]


if __name__ == "__main__":
    main()

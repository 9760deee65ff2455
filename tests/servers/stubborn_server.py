"""A minimal stdio MCP server (no SDK) that answers every call, cancelled or not.

The SDK's servers drop the answer of a cancelled request, so a late answer never comes from them;
this one sends it anyway, when its time is up, to show that a bridge drops it instead of handing it
to whichever caller now uses the same id. Tools: ``echo`` (text), ``slow`` (answers after
``seconds``, whatever happened meanwhile), ``busy`` (works ``seconds`` before it answers with
``text``, one call at a time: calls queue up behind it).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

TOOLS = [
    {"name": "echo", "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}}},
    {"name": "slow", "inputSchema": {"type": "object", "properties": {"seconds": {"type": "number"}}}},
    {
        "name": "busy",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "seconds": {"type": "number"}},
        },
    },
]


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def text(rid: Any, value: str) -> None:
    send({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": value}]}})


async def late(rid: Any, seconds: float) -> None:
    await asyncio.sleep(seconds)
    text(rid, f"slept {seconds}")


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        message = json.loads(line)
        method, rid = message.get("method"), message.get("id")
        params = message.get("params") or {}
        if rid is None:
            continue  # notifications, cancellations included: ignored
        if method == "initialize":
            result = {
                "protocolVersion": params.get("protocolVersion", "2025-11-25"),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "stubborn", "version": "1"},
            }
            send({"jsonrpc": "2.0", "id": rid, "result": result})
        elif method == "tools/list":
            send({"jsonrpc": "2.0", "id": rid, "result": {"tools": TOOLS}})
        elif method == "tools/call" and params.get("name") == "echo":
            text(rid, str((params.get("arguments") or {}).get("text", "")))
        elif method == "tools/call" and params.get("name") == "slow":
            task = asyncio.create_task(late(rid, float((params.get("arguments") or {}).get("seconds", 1))))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif method == "tools/call" and params.get("name") == "busy":
            arguments = params.get("arguments") or {}
            time.sleep(float(arguments.get("seconds", 0.001)))  # noqa: ASYNC251 - holds the loop: one call at a time
            text(rid, str(arguments.get("text", "")))
        elif method == "ping":
            send({"jsonrpc": "2.0", "id": rid, "result": {}})
        else:
            send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": f"no {method}"}})


if __name__ == "__main__":
    asyncio.run(main())

"""A small MCP server (official SDK) for the gateway's tests: aggregation, faults, cancellation.

Run: python notes_server.py [stdio|http PORT]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from mcp.server.mcpserver import Context, MCPServer

mcp = MCPServer(name="notes-server", instructions="Keeps notes.")
NOTES: list[str] = []
CANCELLED_MARKER = os.environ.get("NOTES_CANCEL_FILE")


@mcp.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@mcp.tool()
async def add_note(text: str, ctx: Context) -> str:
    """Store a note; subscribers of notes://all hear of it."""
    NOTES.append(text)
    await ctx.notify_resource_updated("notes://all")  # 2026-07-28 subscriptions/listen
    with contextlib.suppress(Exception):  # handshake-era resources/subscribe
        await ctx.session.send_resource_updated("notes://all")
    return f"{len(NOTES)} notes"


@mcp.tool()
def pid() -> str:
    """The server's process id (to tell shared from isolated children)."""
    return str(os.getpid())


@mcp.tool()
async def slow(seconds: float, ctx: Context) -> str:
    """Sleep, reporting progress; records a cancellation in NOTES_CANCEL_FILE."""
    try:
        steps = max(1, int(seconds * 10))
        for i in range(steps):
            await ctx.report_progress(progress=i, total=steps)
            await asyncio.sleep(seconds / steps)
    except asyncio.CancelledError:
        if CANCELLED_MARKER:
            with open(CANCELLED_MARKER, "a") as fh:  # noqa: ASYNC230 - test fixture, tiny write
                fh.write("cancelled\n")
        raise
    return "done"


@mcp.tool()
async def chatter(count: int, size: int, delay: float, ctx: Context) -> str:
    """After ``delay`` seconds, report progress ``count`` times at once, each with a message of
    ``size`` bytes (a child that floods its client with notifications)."""
    await asyncio.sleep(delay)
    for i in range(count):
        await ctx.report_progress(progress=i, total=count, message="c" * size)
    return "chattered"


@mcp.tool()
def whoami() -> str:
    """The NOTES_ACCOUNT variable the gateway passed (to tell per-user credentials apart)."""
    return os.environ.get("NOTES_ACCOUNT", "")


@mcp.tool()
def crash() -> str:
    """Exit the process at once, mid-call."""
    os._exit(3)


@mcp.resource("notes://all")
def all_notes() -> str:
    """Every note, one per line."""
    return "\n".join(NOTES)


@mcp.prompt()
def summarize(topic: str) -> str:
    """Ask for a summary of the notes on a topic."""
    return f"Summarize the notes about {topic}."


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "http":
        mcp.run(transport="streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    elif len(sys.argv) > 2 and sys.argv[1] == "sse":
        mcp.run(transport="sse", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        mcp.run(transport="stdio")

"""Echo MCP server built on the MCP Python SDK (`mcp==2.3.0`).

Tools:
  - ``echo(text)`` returns ``text`` unchanged;
  - ``sized(n)`` returns ``n`` bytes of text (``"x" * n``).

Run over stdio (the default, the upstream for every bridge) or over Streamable
HTTP served by the SDK itself (the "direct" subject)::

    python sdk_echo.py                                   # stdio
    python sdk_echo.py --http --port 8000 [--json]       # http://127.0.0.1:8000/mcp
"""

from __future__ import annotations

import argparse
import logging

from mcp.server import MCPServer

server: MCPServer = MCPServer("bench-echo", log_level="WARNING")


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
def sized(n: int) -> str:
    """Return n bytes of text."""
    return "x" * n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--http", action="store_true", help="serve Streamable HTTP instead of stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--json", action="store_true", help="JSON response mode (default: SSE)")
    parser.add_argument("--max-sessions", type=int, default=100_000)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    if args.http:
        server.run(
            "streamable-http",
            host=args.host,
            port=args.port,
            json_response=args.json,
            max_sessions=args.max_sessions,
        )
    else:
        server.run("stdio")


if __name__ == "__main__":
    main()

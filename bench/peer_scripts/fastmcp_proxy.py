"""Run FastMCP's proxy (``fastmcp.server.create_proxy``) in front of a stdio server.

Runs in the ``fastmcp`` peer virtualenv (``bench/.peers/fastmcp``), with FastMCP's defaults::

    python fastmcp_proxy.py --port 8000 --config servers.json   # http://127.0.0.1:8000/mcp

``servers.json`` is ``{"mcpServers": {"echo": {"command": ..., "args": [...]}}}``.
"""

from __future__ import annotations

import argparse
import json

from fastmcp.server import create_proxy  # type: ignore[import-not-found]  # in the peer's venv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", required=True, help="JSON file with an mcpServers object")
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as fh:
        config = json.load(fh)
    create_proxy(config).run(transport="http", host=args.host, port=args.port, show_banner=False)


if __name__ == "__main__":
    main()

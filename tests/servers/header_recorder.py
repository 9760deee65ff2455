"""The notes server over Streamable HTTP, writing every request's headers to a file (one JSON line each).

Lets a test check what the gateway sends upstream, e.g. that a client's bearer never goes there.
Run: python header_recorder.py PORT OUTFILE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import uvicorn

sys.path.insert(0, str(Path(__file__).parent))
from notes_server import mcp


def recording(app: Any, out: Path) -> Any:
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
            line = {"method": scope["method"], "path": scope["path"], "headers": headers}
            with out.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
        await app(scope, receive, send)

    return wrapped


if __name__ == "__main__":
    port, out = int(sys.argv[1]), Path(sys.argv[2])
    uvicorn.run(recording(mcp.streamable_http_app(), out), host="127.0.0.1", port=port, log_level="warning")

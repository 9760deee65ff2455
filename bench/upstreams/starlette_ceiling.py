"""The same no-hop echo endpoint as ``asgi_ceiling.py``, written the usual way on Starlette.

Next to the bare-ASGI ceiling it shows what a web framework's request/response objects cost
per call on this machine (routing, ``Request.body()``, ``Response``)::

    python starlette_ceiling.py --port 8000     # http://127.0.0.1:8000/mcp
"""

from __future__ import annotations

import uuid

import orjson
from asgi_cli import parser, run  # type: ignore[import-not-found]  # a sibling script
from raw_echo import respond  # type: ignore[import-not-found]  # a sibling script
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SESSIONS: set[str] = set()
PARSE_ERROR = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}'
NO_SESSION = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32001,"message":"Session not found"}}'


async def mcp(request: Request) -> Response:
    session = request.headers.get("mcp-session-id")
    if request.method == "DELETE":
        SESSIONS.discard(session or "")
        return Response(status_code=200)
    modern = request.headers.get("mcp-protocol-version") == "2026-07-28"
    try:
        msg = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return Response(PARSE_ERROR, status_code=400, media_type="application/json")
    headers: dict[str, str] = {}
    if isinstance(msg, dict) and msg.get("method") == "initialize":
        session = uuid.uuid4().hex
        SESSIONS.add(session)
        headers["mcp-session-id"] = session
    elif not modern and (session is None or session not in SESSIONS):
        return Response(NO_SESSION, status_code=404, media_type="application/json")
    reply = respond(msg)
    if reply is None:
        return Response(status_code=202)
    return Response(orjson.dumps(reply), media_type="application/json", headers=headers)


app = Starlette(routes=[Route("/mcp", mcp, methods=["POST", "DELETE"])])


def main() -> None:
    run(app, parser(__doc__).parse_args(), lifespan="auto")


if __name__ == "__main__":
    main()

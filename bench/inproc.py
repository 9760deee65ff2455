"""An ASGI app driven in-process: its CPU per call with no sockets and no HTTP server.

The socket harness (``bench.run``, ``bench.loadgen``) measures a whole process and drifts by a few
per cent between runs on a shared VM, which hides a change of a microsecond or two per call. This
driver calls the app's ASGI callable directly (a scope, a ``receive`` that hands over the body, a
``send`` that collects the answer) from C callers in a closed loop, checks every answer (its unique
text, as the load generator does), and reports the CPU time of this process per call
(``time.process_time``: the app and the driver, not the stdio upstream, which runs as a child)::

    python -m bench.inproc                          # mcp-bastion, both eras, C=50, 5 rounds
    python -m bench.inproc --app ceiling floor bastion --eras handshake -c 50 -n 400
    python -m bench.inproc --profile 40             # and a cProfile of one more round, top 40

Apps: ``bastion`` (mcp-bastion's ``McpHttpApp`` in front of the raw or SDK stdio upstream, the
``expose`` path), ``ceiling`` (``asgi_ceiling.py``: answers in-process, no hop) and ``floor``
(``pipe_floor.py``: the hop alone, raw upstream). The driver's own share is in every figure, so read
them as differences: ceiling → floor is the hop, floor → bastion what mcp-bastion adds to it.
Spread between rounds is ~0.2 µs per call: fit for A/B of one change (alternate old and new trees
with ``--src``). Pin it (``taskset -c 0``) to keep the scheduler out.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson

from bench.loadgen import make_text, reply_text

BENCH = Path(__file__).resolve().parent
UPSTREAMS = BENCH / "upstreams"
APPS = ("bastion", "ceiling", "floor")
ERAS = ("handshake", "modern")
HANDSHAKE = "2025-11-25"
MODERN = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}

Message = MutableMapping[str, Any]
App = Callable[
    [Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


class Driven:
    """An app to drive, and what to close after."""

    def __init__(self, app: App, close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.app = app
        self.close = close


async def build(name: str, upstream: str) -> Driven:
    if str(UPSTREAMS) not in sys.path:
        sys.path.insert(0, str(UPSTREAMS))  # the bench apps import their sibling asgi_cli
    if name == "ceiling":
        import asgi_ceiling  # type: ignore[import-not-found]

        return Driven(asgi_ceiling.CeilingApp())
    if name == "floor":
        import pipe_floor  # type: ignore[import-not-found]

        floor = pipe_floor.PipeFloor()

        async def stop_floor() -> None:
            if floor.proc is not None and floor.proc.returncode is None:
                floor.proc.kill()
                await floor.proc.wait()

        return Driven(floor, stop_floor)
    from bench.subjects import servers_config
    from mcp_bastion import logs
    from mcp_bastion.config import GatewaySettings, parse_mcp_servers
    from mcp_bastion.gateway import Gateway

    logs.configure("warning", "json")
    servers = parse_mcp_servers(servers_config(upstream))
    data = tempfile.mkdtemp(prefix="bench-inproc-")
    settings = GatewaySettings(host="127.0.0.1", port=8000, data_dir=data).validated()
    gateway = Gateway(settings, servers, single=True)
    await gateway.start_upstreams()

    async def stop() -> None:
        await gateway.close()
        shutil.rmtree(data, ignore_errors=True)

    return Driven(gateway.app, stop)


def scope(headers: list[tuple[bytes, bytes]]) -> Message:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/mcp",
        "raw_path": b"/mcp",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def post(
    app: App, body: bytes, extra: list[tuple[bytes, bytes]]
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One POST through the app: its status, headers and whole body (JSON or SSE)."""
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"accept", b"application/json, text/event-stream"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    sent: list[Message] = []
    done = asyncio.get_running_loop().create_future()
    first = True

    async def receive() -> Message:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        await done  # the client stays connected until the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    try:
        await app(scope(headers), receive, send)
    finally:
        if not done.done():
            done.set_result(None)
    head = dict(sent[0].get("headers", [])) if sent else {}
    return (sent[0]["status"] if sent else 0), head, b"".join(m.get("body", b"") for m in sent[1:])


def answer_of(body: bytes) -> dict[str, Any]:
    """The JSON-RPC answer in a JSON body, or in the last ``data:`` line of an SSE body."""
    if body.startswith(b"{"):
        answer: dict[str, Any] = orjson.loads(body)
        return answer
    lines = [line[5:].strip() for line in body.splitlines() if line.startswith(b"data:")]
    answer = orjson.loads(lines[-1]) if lines else {}
    return answer


class Caller:
    """One closed-loop client: a session (handshake era) or none (2026-07-28), calls numbered."""

    def __init__(self, app: App, era: str, k: int, payload: int) -> None:
        self.app = app
        self.era = era
        self.k = k
        self.payload = payload
        self.extra: list[tuple[bytes, bytes]] = []
        self.calls = 0
        self.bad = 0

    async def open(self) -> None:
        if self.era == "modern":
            self.extra = [
                (b"mcp-protocol-version", MODERN.encode()),
                (b"mcp-method", b"tools/call"),
                (b"mcp-name", b"echo"),
            ]
            return
        init = {
            "protocolVersion": HANDSHAKE,
            "capabilities": {},
            "clientInfo": {"name": "inproc", "version": "1"},
        }
        msg = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init}
        status, head, body = await post(self.app, orjson.dumps(msg), [])
        if status != 200 or b"mcp-session-id" not in head:
            raise RuntimeError(f"initialize: HTTP {status} {body[:300]!r}")
        self.extra = [
            (b"mcp-session-id", head[b"mcp-session-id"]),
            (b"mcp-protocol-version", HANDSHAKE.encode()),
        ]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        await post(self.app, orjson.dumps(note), self.extra)

    async def run(self, n: int) -> None:
        for _ in range(n):
            self.calls += 1
            text = make_text("inproc", self.k, self.calls, self.payload)
            params: dict[str, Any] = {"name": "echo", "arguments": {"text": text}}
            if self.era == "modern":
                params["_meta"] = META
            msg = {"jsonrpc": "2.0", "id": self.calls, "method": "tools/call", "params": params}
            status, _, body = await post(self.app, orjson.dumps(msg), self.extra)
            answer = answer_of(body) if status == 200 else {}
            result = answer.get("result")
            if answer.get("id") != self.calls or not isinstance(result, dict) or reply_text(result) != text:
                self.bad += 1


async def drive(args: argparse.Namespace, name: str, era: str) -> dict[str, Any]:
    driven = await build(name, args.upstream)
    try:
        callers = [Caller(driven.app, era, k, args.payload) for k in range(args.concurrency)]
        for caller in callers:
            await caller.open()
        await asyncio.gather(*(c.run(args.warmup) for c in callers))
        gc.collect()
        gc.freeze()  # as the gateway does after start-up: the driver's start-up objects out of sight
        rounds: list[float] = []
        rates: list[float] = []
        for _ in range(args.rounds):
            cpu, wall = time.process_time(), time.perf_counter()
            await asyncio.gather(*(c.run(args.calls) for c in callers))
            calls = args.calls * len(callers)
            rounds.append((time.process_time() - cpu) / calls * 1e6)
            rates.append(calls / (time.perf_counter() - wall))
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            await asyncio.gather(*(c.run(args.calls) for c in callers))
            profile.disable()
            pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)
        bad = sum(c.bad for c in callers)
    finally:
        if driven.close is not None:
            await driven.close()
    return {
        "app": name,
        "upstream": args.upstream if name == "bastion" else "raw",
        "era": era,
        "concurrency": args.concurrency,
        "calls_per_round": args.calls * args.concurrency,
        "cpu_us_per_call": [round(x, 3) for x in rounds],
        "cpu_us_min": round(min(rounds), 3),
        "cpu_us_median": round(statistics.median(rounds), 3),
        "calls_per_s_median": round(statistics.median(rates)),
        "bad": bad,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--app", nargs="+", choices=APPS, default=["bastion"])
    p.add_argument("--eras", nargs="+", choices=ERAS, default=list(ERAS))
    p.add_argument("--upstream", choices=("raw", "sdk"), default="raw", help="bastion's stdio upstream")
    p.add_argument("-c", "--concurrency", type=int, default=50)
    p.add_argument("-n", "--calls", type=int, default=400, help="calls per caller and round")
    p.add_argument("--warmup", type=int, default=50, help="calls per caller before the rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--payload", type=int, default=32, help="bytes of text echoed")
    p.add_argument("--profile", type=int, default=0, help="cProfile one more round: top N by own time")
    p.add_argument("--src", help="import mcp_bastion from this source tree (an A/B against a worktree)")
    p.add_argument("--out", help="append the JSON lines here too")
    args = p.parse_args(argv)
    if args.src:
        sys.path.insert(0, os.path.abspath(args.src))
    import uvloop  # as the gateway runs

    failed = False
    for name in args.app:
        for era in args.eras:
            row = uvloop.run(drive(args, name, era))
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as out:
                    out.write(line + "\n")
            failed = failed or row["bad"] > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

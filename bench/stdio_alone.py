"""The stdio upstream alone: what it does with no bridge in front (the floor under every bridge).

Every bridge in the bench serves a stdio upstream, so none can be faster than that upstream driven
directly over its pipes. This driver does that, with the load generator's rules: the upstream pinned
to CPU 0 and the driver to CPU 1, C callers in a closed loop, every answer checked (its id and its
unique text), throughput, latency percentiles and the upstream's CPU per call::

    python -m bench.stdio_alone                          # sdk and raw, both eras, C = 1 and 50, 3 rounds
    python -m bench.stdio_alone --upstreams sdk --eras modern -c 50 --calls 20000 --rounds 5

Set against ``direct-json`` / ``direct-sse`` (the SDK serving the same tools over HTTP itself) it
tells whether a target against them is reachable for any bridge: in the 2026-07-28 era the SDK's
stdio transport alone (a thread hop per line read, two per line written) is slower than its own
HTTP server (bench/README.md, "Results").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

import orjson

from bench.loadgen import TreeMonitor, make_text, percentiles, reply_text
from bench.subjects import UPSTREAM_KINDS, upstream_command

UPSTREAM_CPU, DRIVER_CPU = 0, 1
META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


class Upstream:
    """One stdio upstream process and the calls in flight to it (answers matched by id)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, kind: str, pin: bool) -> Upstream:
        def pinned() -> None:
            if pin:
                os.sched_setaffinity(0, {UPSTREAM_CPU})

        proc = await asyncio.create_subprocess_exec(
            *upstream_command(kind),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            limit=1 << 24,
            preexec_fn=pinned,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            message = orjson.loads(line)
            fut = self.waiting.pop(message.get("id"), None) if "method" not in message else None
            if fut is not None and not fut.done():
                fut.set_result(message)
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the upstream exited"))

    async def request(self, rid: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[rid] = fut
        self.proc.stdin.write(
            orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}) + b"\n"
        )
        return await asyncio.wait_for(fut, 30)

    def notify(self, method: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps({"jsonrpc": "2.0", "method": method}) + b"\n")

    async def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self.reader.cancel()


async def cell(kind: str, era: str, concurrency: int, calls: int, pin: bool) -> dict[str, Any]:
    """One measured cell on a fresh upstream: C callers, ``calls`` verified calls in all."""
    up = await Upstream.start(kind, pin)
    ids = iter(range(1, 1 << 62))
    try:
        if era == "handshake":
            init = {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            }
            await up.request(next(ids), "initialize", init)
            up.notify("notifications/initialized")
        run = f"{os.getpid()}-{time.monotonic_ns()}"
        latencies: list[float] = []
        bad = 0

        async def call(caller: int, n: int, measured: bool) -> None:
            nonlocal bad
            text = make_text(run, caller, n, 32)
            params: dict[str, Any] = {"name": "echo", "arguments": {"text": text}}
            if era == "modern":
                params["_meta"] = META
            t0 = time.perf_counter()
            answer = await up.request(next(ids), "tools/call", params)
            took = time.perf_counter() - t0
            result = answer.get("result")
            if not isinstance(result, dict) or reply_text(result) != text:
                bad += 1
            elif measured:
                latencies.append(took)

        async def caller(c: int, n_calls: int) -> None:
            for n in range(n_calls):
                await call(c, n, measured=True)

        await asyncio.gather(*(call(c, -1, measured=False) for c in range(concurrency)))  # warm-up
        per_caller = max(1, calls // concurrency)
        tree = TreeMonitor(up.proc.pid)
        cpu0, t0 = tree.cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(caller(c, per_caller) for c in range(concurrency)))
        elapsed, cpu = time.perf_counter() - t0, tree.cpu_seconds() - cpu0
        done = len(latencies)
        return {
            "upstream": kind,
            "era": era,
            "concurrency": concurrency,
            "calls": per_caller * concurrency,
            "ok": done,
            "bad": bad,
            "throughput": round(done / elapsed, 2),
            "latency_ms": percentiles(latencies),
            "cpu_us_per_call": round(cpu / max(done, 1) * 1e6, 1),
        }
    finally:
        await up.stop()


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        for kind in args.upstreams:
            for era in args.eras:
                for c in args.concurrency:
                    calls = args.calls if c > 1 else max(1, args.calls // 5)
                    row = {"round": rnd, **await cell(kind, era, c, calls, args.pin)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| upstream alone | era | C | calls/s | p50 ms | upstream CPU µs/call |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["upstream"], r["era"], r["concurrency"]) for r in rows})
    for kind, era, c in keys:
        cells = [r for r in rows if (r["upstream"], r["era"], r["concurrency"]) == (kind, era, c)]

        def span(values: list[float], digits: int) -> str:
            med = statistics.median(values)
            return f"{med:,.{digits}f} [{min(values):,.{digits}f}–{max(values):,.{digits}f}]"

        out.append(
            f"| `{kind}` | {era} | {c} | {span([r['throughput'] for r in cells], 0)} "
            f"| {span([r['latency_ms']['p50'] for r in cells], 3)} "
            f"| {statistics.median(r['cpu_us_per_call'] for r in cells):,.0f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstreams", nargs="+", choices=UPSTREAM_KINDS, default=list(UPSTREAM_KINDS))
    parser.add_argument("--eras", nargs="+", choices=("handshake", "modern"), default=["handshake", "modern"])
    parser.add_argument("-c", "--concurrency", nargs="+", type=int, default=[1, 50])
    parser.add_argument("--calls", type=int, default=5000, help="verified calls per cell (C=1: a fifth)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin to CPUs 0 and 1")
    parser.add_argument("--out", help="also write the JSON lines to this file")
    args = parser.parse_args()
    args.pin = args.pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
    if args.pin:
        os.sched_setaffinity(0, {DRIVER_CPU})
    rows = asyncio.run(run(args))
    if args.out:
        with open(args.out, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(table(rows))
    if any(r["bad"] or r["ok"] < r["calls"] for r in rows):
        sys.exit("some answers were wrong or missing")


if __name__ == "__main__":
    main()

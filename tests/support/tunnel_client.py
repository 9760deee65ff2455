"""An MCP SDK client that the network tests run inside the ``client`` namespace; prints JSON.

    python -m tests.support.tunnel_client check URL
        one session (handshake era) and one 2026-07-28 client: tool names and an echo each, as one JSON line.

    python -m tests.support.tunnel_client notes URL
        the notes server's ``notes://all`` as a JSON list, read in both eras (one upstream child each).

    python -m tests.support.tunnel_client load URL --sessions 20 --deadline 90 --slow 2
        SESSIONS sessions (half handshake era, half 2026-07-28), each with three workers calling in a
        loop: ``echo`` with a payload unique to the run, session, worker and call; ``slow``; and
        ``add_note`` with a unique note (the notes read back afterwards show whether any call was
        executed twice).
        Prints ``ready`` once every session has had a call answered; from then on reads commands on
        stdin: ``mark NAME`` records the client's clock under NAME; ``await_ok NAME`` waits (up to the
        deadline) until every session has had a call answered that it *started* after mark NAME, and
        prints ``all ok after NAME`` or what is missing; ``stop`` (or EOF) lets the calls in flight
        finish and prints every call as one JSON document.

Every call gets an outcome: ``ok`` (the caller's own answer), ``wrong`` (an answer meant for someone
else: another payload, or an unexpected shape), ``error`` (a JSON-RPC error: code and message), ``tool_error``
(a result flagged ``isError``), ``deadline`` (no answer within ``--deadline`` seconds) or
``exception`` (the client transport broke). Only ``ok`` and ``error`` are acceptable to the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mcp import Client
from mcp.shared.exceptions import MCPError

WORKERS = ("echo", "slow", "note")
NOTE_COUNT = re.compile(r"\d+ notes")


@dataclass
class Call:
    session: int
    era: str
    worker: str
    seq: int
    payload: str
    started: float
    ended: float = 0.0
    outcome: str = ""
    code: int | None = None
    message: str = ""


@dataclass
class Load:
    tag: str
    deadline: float
    slow: float
    calls: list[Call] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    answered: set[int] = field(default_factory=set)
    all_answered: asyncio.Event = field(default_factory=asyncio.Event)
    sessions: int = 0
    failures: list[str] = field(default_factory=list)
    last_ok_start: dict[int, float] = field(default_factory=dict)  # session -> start of its latest ok call


def text_of(result: Any) -> str:
    content = getattr(result, "content", None) or []
    return "".join(getattr(block, "text", "") for block in content)


async def one_call(
    client: Client, load: Load, call: Call, tool: str, args: dict[str, Any], want: str | re.Pattern[str]
) -> None:
    try:
        async with asyncio.timeout(load.deadline):
            result = await client.call_tool(tool, args)
    except TimeoutError:
        call.outcome = "deadline"
    except MCPError as exc:
        call.outcome, call.code, call.message = "error", exc.code, str(exc)
    except Exception as exc:  # every other failure is recorded, never hidden
        call.outcome, call.message = "exception", f"{type(exc).__name__}: {exc}"
    else:
        text = text_of(result)
        if result.is_error:
            call.outcome, call.message = "tool_error", text[:300]
        elif text == want if isinstance(want, str) else want.fullmatch(text):
            call.outcome = "ok"
        else:
            call.outcome, call.message = "wrong", text[:300]
    call.ended = time.monotonic()


async def worker(client: Client, load: Load, session: int, era: str, kind: str) -> None:
    seq = 0
    while not load.stopping.is_set():
        seq += 1
        payload = f"{load.tag}:s{session}:{kind}:{seq}:{secrets.token_hex(6)}"
        call = Call(session, era, kind, seq, payload, time.monotonic())
        load.calls.append(call)
        if kind == "echo":
            await one_call(client, load, call, "echo", {"text": payload}, payload)
        elif kind == "note":
            await one_call(client, load, call, "add_note", {"text": payload}, NOTE_COUNT)
        else:
            await one_call(client, load, call, "slow", {"seconds": load.slow}, "done")
        if call.outcome == "ok":
            load.last_ok_start[session] = max(call.started, load.last_ok_start.get(session, 0.0))
        if call.outcome == "ok" and session not in load.answered:
            load.answered.add(session)
            if len(load.answered) == load.sessions:
                load.all_answered.set()
        if call.outcome != "ok":
            await asyncio.sleep(0.2)  # the link is down: do not spin on fast errors


async def session_task(url: str, load: Load, session: int) -> None:
    era = "handshake" if session % 2 == 0 else "2026-07-28"
    mode = "legacy" if era == "handshake" else "auto"
    try:
        async with Client(url, mode=mode) as client:
            await asyncio.gather(*(worker(client, load, session, era, kind) for kind in WORKERS))
    except Exception as exc:  # every other failure is recorded, never hidden
        load.failures.append(f"session {session}: {type(exc).__name__}: {exc}")
        load.all_answered.set()


async def read_commands(load: Load) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        words = line.split()
        if not words or words[0] == "stop":
            load.stopping.set()
            return
        if words[0] == "mark" and len(words) == 2:
            load.marks[words[1]] = time.monotonic()
            print(f"marked {words[1]}", flush=True)
        elif words[0] == "await_ok" and len(words) == 2:
            print(await await_ok(load, words[1]), flush=True)
        else:
            print(f"unknown command {line.strip()!r}", flush=True)


async def await_ok(load: Load, mark: str) -> str:
    """Every session answered a call it started after ``mark`` (sessions survive a reconnect)."""
    since = load.marks.get(mark)
    if since is None:
        return f"no mark {mark}"
    limit = time.monotonic() + load.deadline
    while True:
        behind = sorted(s for s in range(load.sessions) if load.last_ok_start.get(s, 0.0) < since)
        if not behind:
            return f"all ok after {mark}"
        if time.monotonic() > limit:
            return f"not ok after {mark}: sessions {behind}"
        await asyncio.sleep(0.1)


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    load = Load(tag=args.tag or secrets.token_hex(4), deadline=args.deadline, slow=args.slow)
    load.sessions = args.sessions
    sessions = [asyncio.create_task(session_task(args.url, load, i)) for i in range(args.sessions)]
    await load.all_answered.wait()
    print("ready" if not load.failures else "failed", flush=True)
    await read_commands(load)
    await asyncio.gather(*sessions)
    return {
        "tag": load.tag,
        "deadline": load.deadline,
        "marks": load.marks,
        "failures": load.failures,
        "calls": [asdict(c) for c in load.calls],
    }


async def run_check(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("legacy", "auto"):
        async with Client(args.url, mode=mode) as client:
            tools = await client.list_tools()
            payload = f"check-{mode}-{secrets.token_hex(4)}"
            result = await client.call_tool("echo", {"text": payload})
            out[mode] = {
                "protocol": client.protocol_version,
                "tools": sorted(t.name for t in tools.tools),
                "echo_ok": text_of(result) == payload,
            }
    return out


async def run_notes(args: argparse.Namespace) -> list[str]:
    """Read through both eras: the gateway runs a shared upstream child per era, each with its notes."""
    notes: list[str] = []
    for mode in ("legacy", "auto"):
        async with Client(args.url, mode=mode) as client:
            result = await client.read_resource("notes://all")
            text = "".join(getattr(c, "text", "") for c in result.contents)
        notes += [line for line in text.splitlines() if line]
    return notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check")
    check.add_argument("url")
    notes = sub.add_parser("notes")
    notes.add_argument("url")
    load = sub.add_parser("load")
    load.add_argument("url")
    load.add_argument("--sessions", type=int, default=20)
    load.add_argument("--deadline", type=float, default=90.0, help="seconds each call may take")
    load.add_argument("--slow", type=float, default=2.0, help="seconds each `slow` call sleeps")
    load.add_argument("--tag", default="", help="prefix of every payload (default: random)")
    args = p.parse_args()
    runs = {"check": run_check, "notes": run_notes, "load": run_load}
    result = asyncio.run(runs[args.command](args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

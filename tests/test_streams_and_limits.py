"""Resumable handshake-era streams, the standalone GET stream, limits from TOML and the environment."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson

from tests.conftest import NOTES_SERVER, GatewayFactory
from tests.test_faults import HEADERS, INIT, call, events, open_session


async def test_post_stream_resumes_after_disconnect(gateway: GatewayFactory) -> None:
    gw = gateway("expose", "--", *NOTES_SERVER)
    h = open_session(gw.url)
    body = {
        "jsonrpc": "2.0",
        "id": 42,
        "method": "tools/call",
        "params": {"name": "slow", "arguments": {"seconds": 2}, "_meta": {"progressToken": "tok"}},
    }
    last_id = None
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", gw.url, headers=h, json=body) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for line in resp.aiter_lines():
                if line.startswith("id: "):
                    last_id = line[4:]
                if line.startswith("data: {") and "progress" in line:
                    break  # drop the connection after the first progress event
        assert last_id is not None
        resumed = await client.get(
            gw.url, headers={**h, "Accept": "text/event-stream", "Last-Event-ID": last_id}
        )
    got = events(resumed.text)
    answer = [d for _, d in got if d.get("id") == 42]
    assert answer and answer[0]["result"]["content"][0]["text"] == "done"
    progress = [d["params"]["progress"] for _, d in got if d.get("method") == "notifications/progress"]
    assert progress == sorted(progress) and all(d["params"]["progressToken"] == "tok" for _, d in got[:-1])
    # Nothing the client already had is sent again.
    assert all(
        ev_id is None or ev_id > last_id
        for ev_id, _ in got
        if ev_id and ev_id.split("-")[0] == last_id.split("-")[0]
    )


def test_limits_from_toml_and_environment(gateway: GatewayFactory, tmp_path: Path) -> None:
    servers = tmp_path / "servers.json"
    servers.write_text(
        orjson.dumps(
            {"mcpServers": {"notes": {"command": NOTES_SERVER[0], "args": NOTES_SERVER[1:]}}}
        ).decode()
    )
    toml = tmp_path / "gateway.toml"
    toml.write_text(
        '[gateway]\nservers_file = "servers.json"\nprefix_mode = "on-collision"\n\n'
        "[limits]\nmax_sessions = 2\nmax_body_bytes = 2048\nsession_idle_seconds = 1.0\n"
    )
    gw = gateway("serve", "--config", str(toml), env={"MCP_BASTION_MAX_CONCURRENT_PER_SESSION": "1"})
    url = gw.url
    h1 = open_session(url)
    assert call(url, h1, "echo", {"text": "plain name"})["result"]["content"][0]["text"] == "plain name"
    h2 = open_session(url)
    third = httpx.post(url, headers=HEADERS, json=INIT)
    assert third.status_code == 503
    big = httpx.post(
        url, headers=h1, json={"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": "y" * 4096}}
    )
    assert big.status_code == 413

    async def two_at_once() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            slow = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "slow", "arguments": {"seconds": 1}},
            }
            first = asyncio.create_task(client.post(url, headers=h2, json=slow))
            await asyncio.sleep(0.3)
            second = await client.post(url, headers=h2, json={**slow, "id": 2})
            return [(await first).status_code, second.status_code]

    assert asyncio.run(two_at_once()) == [200, 429]
    # Idle sessions expire (1 s here), which frees room for new ones.
    time.sleep(2.5)  # untouched for longer than session_idle_seconds
    assert httpx.post(url, headers=h1, json={"jsonrpc": "2.0", "id": 9, "method": "ping"}).status_code == 404
    assert httpx.post(url, headers=HEADERS, json=INIT).status_code == 200


def test_health_endpoints(gateway: GatewayFactory) -> None:
    gw = gateway("expose", "--", *NOTES_SERVER)
    assert httpx.get(f"{gw.base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gw.base}/readyz").json()
    assert ready["ready"] is True and ready["servers"]["server"]["ready"] is True
    bad = gateway("expose", "--", "/nonexistent/command", ready=False)
    deadline = time.monotonic() + 20
    while True:
        try:
            resp = httpx.get(f"{bad.base}/readyz", timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert resp.status_code == 503 and resp.json()["ready"] is False
    assert httpx.get(f"{bad.base}/healthz").status_code == 200


async def test_a_slow_answer_turns_into_an_sse_stream_with_keepalives(gateway: GatewayFactory) -> None:
    """An answer slower than ``keepalive_seconds``, with nothing before it: a client that takes SSE
    gets the stream (handshake era: the priming event first) with ``: keep-alive`` comments, then
    the answer; a JSON-only client waits for its JSON. Both eras; the request runs in its handler,
    and the switch comes from a timer (timers.py), not from a message."""
    gw = gateway("expose", "--", *NOTES_SERVER, env={"MCP_BASTION_KEEPALIVE_SECONDS": "0.6"})
    slow = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "slow", "arguments": {}}}
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    modern = {**HEADERS, "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "slow"}
    legacy = open_session(gw.url)
    cases = [
        ("handshake", legacy, {**slow["params"]}),
        ("2026-07-28", modern, {**slow["params"], "_meta": meta}),
    ]
    async with httpx.AsyncClient(timeout=30) as client:
        for era, headers, params in cases:
            body = {**slow, "params": {**params, "arguments": {"seconds": 2.5}}}
            started = time.monotonic()
            arrivals: list[tuple[float, str]] = []
            async with client.stream("POST", gw.url, headers=headers, json=body) as resp:
                assert resp.status_code == 200, era
                assert resp.headers["content-type"].startswith("text/event-stream"), era
                head_at = time.monotonic() - started
                async for line in resp.aiter_lines():
                    arrivals.append((time.monotonic() - started, line))
            text = "\n".join(line for _, line in arrivals)
            got = events(text)
            assert [d["result"]["content"][0]["text"] for _, d in got if d.get("id") == 7] == ["done"], era
            answer_at = next(at for at, line in arrivals if line.startswith("data: {"))
            keepalives = [at for at, line in arrivals if line == ": keep-alive"]
            # Not before the keep-alive; the stream and a keep-alive before the answer, which
            # cannot come before the tool's 2.5 s (bounds that a slow machine cannot break).
            assert head_at >= 0.55 and answer_at >= 2.45, (era, head_at, answer_at)
            assert keepalives and head_at <= keepalives[0] < answer_at, (era, arrivals)
            if era == "handshake":
                assert arrivals[0][1].startswith("id: s") and arrivals[0][1].endswith("-0"), arrivals
            # A client that takes only JSON gets the answer alone, as JSON.
            json_only = {**headers, "Accept": "application/json"}
            resp = await client.post(gw.url, headers=json_only, json={**body, "id": 8})
            assert resp.status_code == 200 and resp.headers["content-type"] == "application/json", era
            assert resp.json()["id"] == 8 and resp.json()["result"]["content"][0]["text"] == "done"

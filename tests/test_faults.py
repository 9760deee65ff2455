"""Faults and bad input: each gets the right status and JSON-RPC error, and everyone else is still served."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from tests.conftest import NOTES_SERVER, GatewayFactory, RunningGateway, notes_entry, servers_file
from tests.support.external import free_port, start_process, stop_process, wait_for_port

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}


def events(text: str) -> list[tuple[str | None, Any]]:
    """The (id, message) of each SSE event that carries a message."""
    out: list[tuple[str | None, Any]] = []
    for block in text.split("\n\n"):
        ev_id, data = None, None
        for line in block.splitlines():
            if line.startswith("id: "):
                ev_id = line[4:]
            elif line.startswith("data: ") and line[6:]:
                data = orjson.loads(line[6:])
        if data is not None:
            out.append((ev_id, data))
    return out


def open_session(url: str) -> dict[str, str]:
    resp = httpx.post(url, headers=HEADERS, json=INIT)
    assert resp.status_code == 200
    return {**HEADERS, "Mcp-Session-Id": resp.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}


def call(url: str, headers: dict[str, str], name: str, args: dict[str, Any], rid: int = 2) -> dict[str, Any]:
    resp = httpx.post(
        url,
        headers=headers,
        json={
            "jsonrpc": "2.0",
            "id": rid,
            "method": "tools/call",
            "params": {"name": name, "arguments": args},
        },
        timeout=60,
    )
    if resp.headers["content-type"].startswith("text/event-stream"):
        return events(resp.text)[-1][1]  # type: ignore[no-any-return]
    return resp.json()  # type: ignore[no-any-return]


def still_serving(gw: RunningGateway) -> None:
    h = open_session(gw.url)
    assert call(gw.url, h, "echo", {"text": "alive"})["result"]["content"][0]["text"] == "alive"


@pytest.fixture
def notes_gateway(gateway: GatewayFactory) -> RunningGateway:
    return gateway("expose", "--", *NOTES_SERVER)


def test_bad_input_gets_clear_errors(notes_gateway: RunningGateway) -> None:
    gw = notes_gateway
    url = gw.url
    r = httpx.post(url, headers=HEADERS, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == -32700
    r = httpx.post(url, headers={**HEADERS, "Content-Type": "text/plain"}, content=b"{}")
    assert r.status_code == 415
    r = httpx.post(url, headers=HEADERS, json={"jsonrpc": "1.0", "id": 1, "method": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == -32600
    r = httpx.post(url, headers=HEADERS, json=[INIT])
    assert r.status_code == 400 and r.json()["error"]["code"] == -32600
    big = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "x" * (5 * 1024 * 1024)}}
    r = httpx.post(url, headers=HEADERS, json=big)
    assert r.status_code == 413
    ping = {"jsonrpc": "2.0", "id": 3, "method": "ping"}
    r = httpx.post(url, headers={**HEADERS, "Mcp-Session-Id": "no-such-session"}, json=ping)
    assert r.status_code == 404
    r = httpx.post(url, headers=HEADERS, json=ping)
    assert r.status_code == 400 and "Mcp-Session-Id" in r.json()["error"]["message"]
    r = httpx.post(url, headers={**HEADERS, "Origin": "http://evil.example.com"}, json=INIT)
    assert r.status_code == 403
    r = httpx.post(url, headers={**HEADERS, "Host": "evil.example.com"}, json=INIT)
    assert r.status_code == 403
    r = httpx.post(url, headers={**HEADERS, "Origin": f"http://localhost:{gw.port}"}, json=INIT)
    assert r.status_code == 200
    r = httpx.post(url, headers={**HEADERS, "Accept": "text/html"}, json=INIT)
    assert r.status_code == 406
    r = httpx.put(url, headers=HEADERS, json=INIT)
    assert r.status_code == 405
    # 2026-07-28: unknown method 404/-32601, unsupported version 400/-32022, header mismatch 400/-32020.
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    modern = {**HEADERS, "MCP-Protocol-Version": "2026-07-28"}
    body = {"jsonrpc": "2.0", "id": 9, "method": "no/such", "params": {"_meta": meta}}
    r = httpx.post(url, headers={**modern, "Mcp-Method": "no/such"}, json=body)
    assert r.status_code == 404 and r.json()["error"]["code"] == -32601 and r.json()["id"] == 9
    r = httpx.post(url, headers={**modern, "Mcp-Method": "tools/list"}, json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == -32020
    # A routing header sent twice is refused, even with equal values; other repeated headers are not.
    twice = [*modern.items(), ("Mcp-Method", "no/such"), ("mcp-method", "no/such")]
    r = httpx.post(url, headers=twice, json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == -32020
    assert "mcp-method" in r.json()["error"]["message"] and r.json()["id"] == 9
    repeated = [*modern.items(), ("Mcp-Method", "no/such"), ("X-Trace", "a"), ("X-Trace", "b")]
    r = httpx.post(url, headers=repeated, json=body)
    assert r.status_code == 404 and r.json()["error"]["code"] == -32601
    r = httpx.post(
        url, headers={**HEADERS, "MCP-Protocol-Version": "2099-01-01", "Mcp-Method": "no/such"}, json=body
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == -32022
    assert r.json()["error"]["data"]["supported"] == ["2026-07-28"]
    r = httpx.get(url, headers=modern)
    assert r.status_code == 405
    still_serving(gw)


def test_sessionless_requests_when_allowed(gateway: GatewayFactory) -> None:
    """ChatGPT sends tools/call without the session id it was given: answered if allowed."""
    gw = gateway("expose", "--", *NOTES_SERVER, env={"MCP_BASTION_ALLOW_SESSIONLESS": "true"})
    open_session(gw.url)
    reply = call(gw.url, {**HEADERS, "MCP-Protocol-Version": "2025-06-18"}, "echo", {"text": "no session"})
    assert reply["result"]["content"][0]["text"] == "no session"


def test_session_lifecycle(notes_gateway: RunningGateway) -> None:
    url = notes_gateway.url
    h = open_session(url)
    assert httpx.delete(url, headers=h).status_code == 200
    r = httpx.post(url, headers=h, json={"jsonrpc": "2.0", "id": 5, "method": "ping"})
    assert r.status_code == 404  # ended sessions are unknown


def child_pids(gw: RunningGateway) -> set[int]:
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == gw.proc.pid:
                out.add(int(pid))
    return out


def test_stdio_child_killed_mid_call(notes_gateway: RunningGateway) -> None:
    gw = notes_gateway
    h = open_session(gw.url)
    started = time.monotonic()
    reply = call(gw.url, h, "crash", {})
    assert time.monotonic() - started < 10  # an error at once, never a hang
    assert reply["error"]["code"] == -31000
    assert "exited" in reply["error"]["message"]
    # The supervisor restarts the child (with backoff); the same session works again.
    deadline = time.monotonic() + 20
    while True:
        reply = call(gw.url, h, "echo", {"text": "back"}, rid=3)
        if "result" in reply:
            break
        assert time.monotonic() < deadline, reply
        time.sleep(0.3)
    assert reply["result"]["content"][0]["text"] == "back"
    assert '"event": "upstream_exited"' in gw.logs()


def test_shutdown_leaves_no_orphans(gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = gateway("expose", "--", "sh", "-c", f"sleep 300 & exec {' '.join(NOTES_SERVER)}")
    still_serving(gw)
    children = child_pids(gw)
    assert children
    group = os.getpgid(next(iter(children)))
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(timeout=20)
    time.sleep(0.5)
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and _live_in_group(int(p), group)]
    assert leftovers == []


def _live_in_group(pid: int, group: int) -> bool:
    """A running (not zombie) process in the group."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] != "Z" and int(stat[2]) == group


def test_http_upstream_down_and_back(gateway: GatewayFactory, tmp_path: Path) -> None:
    port = free_port()
    upstream_cmd = [sys.executable, NOTES_SERVER[1], "http", str(port)]
    upstream = start_process(upstream_cmd, log=tmp_path / "up1.log")
    wait_for_port(port, proc=upstream)
    config = servers_file(
        tmp_path,
        {"remote": {"url": f"http://127.0.0.1:{port}/mcp", "type": "http"}, "local": notes_entry()},
    )
    gw = gateway("serve", "--config", str(config))
    url = gw.url
    h = open_session(url)
    assert call(url, h, "remote_echo", {"text": "one"})["result"]["content"][0]["text"] == "one"
    stop_process(upstream)
    reply = call(url, h, "remote_echo", {"text": "two"})
    assert reply["error"]["code"] == -31000
    # The other server is unaffected.
    assert call(url, h, "local_echo", {"text": "local"})["result"]["content"][0]["text"] == "local"
    # It comes back (a new process: it has forgotten the gateway's session, so 404 -> re-initialize).
    upstream = start_process(upstream_cmd, log=tmp_path / "up2.log")
    wait_for_port(port, proc=upstream)
    try:
        assert call(url, h, "remote_echo", {"text": "three"})["result"]["content"][0]["text"] == "three"
    finally:
        stop_process(upstream)


async def test_client_disconnect_cancels_upstream(gateway: GatewayFactory, tmp_path: Path) -> None:
    marker = tmp_path / "cancelled"
    gw = gateway("expose", "--env", f"NOTES_CANCEL_FILE={marker}", "--", *NOTES_SERVER)
    # 2026-07-28: closing the response stream is the cancellation.
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    headers = {
        **HEADERS,
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "slow",
    }
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "slow", "arguments": {"seconds": 30}, "_meta": meta},
    }
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", gw.url, headers=headers, json=body) as resp,
    ):
        assert resp.status_code == 200
        await asyncio.sleep(1.0)
    for _ in range(100):
        if marker.exists():
            break
        await asyncio.sleep(0.1)
    assert marker.read_text().strip() == "cancelled"
    # Handshake era: the client's notifications/cancelled reaches the upstream too.
    marker.unlink()
    async with Client(gw.url, mode="legacy") as client:
        task = asyncio.create_task(client.call_tool("slow", {"seconds": 30}))
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(BaseException):  # noqa: B017 - cancelled by us
            await task
        for _ in range(100):
            if marker.exists():
                break
            await asyncio.sleep(0.1)
    assert marker.exists()
    still_serving(gw)


async def test_cancel_and_session_end_finish_requests_in_flight(
    gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A handshake-era call the client cancels is answered at once (-32800, as the SDK's server
    does) and frees its slot; a session's end (DELETE) ends every request still running, in the
    shape each client took (JSON-only: 404; SSE: the stream ends), with no 500 and no traceback."""
    marker = tmp_path / "cancelled"
    gw = gateway(
        "expose",
        "--env",
        f"NOTES_CANCEL_FILE={marker}",
        "--",
        *NOTES_SERVER,
        env={"MCP_BASTION_MAX_CONCURRENT_PER_SESSION": "3"},
    )

    def slow(rid: int, token: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"name": "slow", "arguments": {"seconds": 60}}
        if token is not None:
            params["_meta"] = {"progressToken": token}
        return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}

    async def post(client: httpx.AsyncClient, headers: dict[str, str], body: Any) -> httpx.Response:
        return await asyncio.wait_for(client.post(gw.url, headers=headers, json=body), 30)

    async with httpx.AsyncClient(timeout=60) as client:
        h = open_session(gw.url)
        json_only = {**h, "Accept": "application/json"}
        calls = [
            asyncio.create_task(post(client, json_only, slow(10))),  # JSON
            asyncio.create_task(post(client, h, slow(11))),  # JSON fast path, not yet answered
            asyncio.create_task(post(client, h, slow(12, "p"))),  # an SSE stream of progress
        ]
        await asyncio.sleep(1.0)
        full = await post(client, h, {"jsonrpc": "2.0", "id": 13, "method": "ping"})
        assert full.status_code == 429  # three calls fill the session
        for rid in (10, 11, 12):
            note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": rid}}
            assert (await post(client, h, note)).status_code == 202
        first, second, third = await asyncio.gather(*calls)
        cancelled = {"code": -32800, "message": "Request cancelled"}
        assert first.json() == {"jsonrpc": "2.0", "id": 10, "error": cancelled}
        assert second.json()["error"]["code"] == -32800
        assert third.headers["content-type"].startswith("text/event-stream")
        streamed = [m for _, m in events(third.text)]
        assert streamed[0]["method"] == "notifications/progress"
        assert streamed[-1] == {"jsonrpc": "2.0", "id": 12, "error": cancelled}
        # The slots are free again, and the upstream stopped all three.
        assert call(gw.url, h, "echo", {"text": "after"})["result"]["content"][0]["text"] == "after"
        for _ in range(100):
            if marker.exists() and marker.read_text().count("cancelled") == 3:
                break
            await asyncio.sleep(0.1)
        assert marker.read_text().count("cancelled") == 3

        # A session ends (DELETE) while requests and its GET stream are open.
        marker.unlink()
        h = open_session(gw.url)
        json_only = {**h, "Accept": "application/json"}
        async with client.stream("GET", gw.url, headers=h) as get_stream:
            assert get_stream.status_code == 200
            calls = [
                asyncio.create_task(post(client, json_only, slow(20))),
                asyncio.create_task(post(client, h, slow(21))),
                asyncio.create_task(post(client, h, slow(22, "q"))),
            ]
            await asyncio.sleep(1.0)
            assert (await client.delete(gw.url, headers=h)).status_code == 200
            first, second, third = await asyncio.gather(*calls)
            assert first.status_code == 404
            assert first.json()["error"] == {"code": -32600, "message": "Session terminated"}
            assert second.status_code == 200 and second.text == ""  # an SSE stream with no message
            assert second.headers["content-type"].startswith("text/event-stream")
            streamed = [m for _, m in events(third.text)]
            assert streamed and all(e.get("method") == "notifications/progress" for e in streamed)
            await asyncio.wait_for(get_stream.aread(), 10)  # the GET stream ends too
        # The ended stream cannot be resumed: the session is gone.
        last = [ln for ln in third.text.splitlines() if ln.startswith("id: ")][-1][4:]
        resumed = await client.get(gw.url, headers={**h, "Last-Event-ID": last})
        assert resumed.status_code == 404
    for _ in range(100):
        if marker.exists() and marker.read_text().count("cancelled") == 3:
            break
        await asyncio.sleep(0.1)
    assert marker.read_text().count("cancelled") == 3
    assert "Traceback" not in gw.logs() and "Exception in ASGI" not in gw.logs()
    still_serving(gw)


async def test_aggregate_drops_and_restores_a_crashed_servers_tools(
    gateway: GatewayFactory, tmp_path: Path
) -> None:
    config = servers_file(tmp_path, {"notes": notes_entry(), "other": notes_entry()})
    gw = gateway("serve", "--config", str(config))
    seen: list[str] = []

    async def on_message(message: Any) -> None:
        method = getattr(getattr(message, "root", message), "method", None)
        if isinstance(method, str):
            seen.append(method)

    async with Client(gw.url, mode="legacy", message_handler=on_message) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"notes_echo", "other_echo"} <= names
        with pytest.raises(MCPError, match="exited"):
            await client.call_tool("notes_crash", {})
        names = {t.name for t in (await client.list_tools()).tools}
        assert "notes_echo" not in names and "other_echo" in names
        for _ in range(100):
            names = {t.name for t in (await client.list_tools()).tools}
            if "notes_echo" in names:
                break
            await asyncio.sleep(0.2)
        assert "notes_echo" in names
        await asyncio.sleep(0.5)
    assert "notifications/tools/list_changed" in seen

"""50 sessions x 200 calls through one shared stdio child: every reply is the caller's own."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.conftest import NOTES_SERVER, GatewayFactory

SESSIONS = 50
CALLS = 200
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def reply_text(resp: httpx.Response) -> Any:
    if resp.headers["content-type"].startswith("text/event-stream"):
        data = [ln[6:] for ln in resp.text.splitlines() if ln.startswith("data: ") and ln[6:]]
        body = httpx.Response(200, content=data[-1]).json()
    else:
        body = resp.json()
    return body["id"], body["result"]["content"][0]["text"]


async def legacy_session(client: httpx.AsyncClient, url: str, n: int) -> tuple[int, int]:
    init = await client.post(
        url,
        headers=HEADERS,
        json={
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": f"c{n}", "version": "1"},
            },
        },
    )
    sid = init.headers["mcp-session-id"]
    h = {**HEADERS, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    await client.post(url, headers=h, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    ok = wrong = 0
    for i in range(CALLS):
        payload = f"session-{n}-call-{i}"
        req_id = i % 3  # colliding ids across sessions on purpose
        resp = await client.post(
            url,
            headers=h,
            json={
                "jsonrpc": "2.0",
                "id": req_id,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": payload}},
            },
        )
        got_id, text = reply_text(resp)
        if got_id == req_id and text == payload:
            ok += 1
        else:
            wrong += 1
    await client.delete(url, headers=h)
    return ok, wrong


async def modern_caller(client: httpx.AsyncClient, url: str, n: int) -> tuple[int, int]:
    ok = wrong = 0
    for i in range(CALLS // 4):
        payload = f"modern-{n}-{i}"
        resp = await client.post(
            url,
            headers={
                **HEADERS,
                "MCP-Protocol-Version": "2026-07-28",
                "Mcp-Method": "tools/call",
                "Mcp-Name": "echo",
            },
            json={
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": payload}, "_meta": MODERN_META},
            },
        )
        got_id, text = reply_text(resp)
        ok, wrong = (ok + 1, wrong) if (got_id, text) == (7, payload) else (ok, wrong + 1)
    return ok, wrong


async def test_fifty_sessions_two_hundred_calls_each(gateway: GatewayFactory) -> None:
    gw = gateway("expose", "--", *NOTES_SERVER)
    limits = httpx.Limits(max_connections=SESSIONS + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        results = await asyncio.gather(
            *(legacy_session(client, gw.url, n) for n in range(SESSIONS)),
            *(modern_caller(client, gw.url, n) for n in range(5)),
        )
    ok = sum(r[0] for r in results)
    wrong = sum(r[1] for r in results)
    assert wrong == 0
    assert ok == SESSIONS * CALLS + 5 * (CALLS // 4)
    # One shared child served them all.
    assert gw.logs().count('"event": "upstream_started"') <= 2  # legacy child, plus the modern one

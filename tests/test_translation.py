"""Era translation: a client of one era in front of an upstream held to the other."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx
from mcp import Client

from mcp_bastion.core import jsonrpc as rpc
from tests.conftest import GatewayFactory, everything_entry, notes_entry, servers_file
from tests.test_clients import elicitation, sampling, text_of

MODERN = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2026-07-28",
    "Mcp-Method": "tools/call",
}
META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {"sampling": {}, "elicitation": {}},
}


async def test_modern_client_handshake_upstream(gateway: GatewayFactory, tmp_path: Path) -> None:
    """The upstream's sampling and elicitation requests reach a 2026-07-28 client as input_required."""
    config = servers_file(tmp_path, {"everything": everything_entry(era="legacy")})
    gw = gateway("serve", "--config", str(config))
    url = f"{gw.base}/servers/everything/mcp"
    async with Client(url, sampling_callback=sampling, elicitation_callback=elicitation) as client:
        assert client.protocol_version == "2026-07-28"
        res = await client.call_tool("test_sampling", {"prompt": "Capital of France?"})
        assert "LLM response: Paris" in text_of(res)
        res = await client.call_tool("test_elicitation", {"message": "Name?"})
        assert "action=accept" in text_of(res)
        tools = await client.list_tools()
        assert any(t.name == "test_simple_text" for t in tools.tools)
    # The requestState is sealed: a changed one is refused, and so is a replay after use.
    async with httpx.AsyncClient() as http:
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "test_elicitation", "arguments": {"message": "x"}, "_meta": META},
        }
        headers = {**MODERN, "Mcp-Name": "test_elicitation"}
        first = (await http.post(url, headers=headers, json=body, timeout=30)).json()["result"]
        assert first["resultType"] == "input_required"
        (key,) = first["inputRequests"]
        state = first["requestState"]
        tampered = state[:-2] + ("AA" if not state.endswith("AA") else "BB")
        retry = {
            **body,
            "id": 2,
            "params": {
                **body["params"],
                "requestState": tampered,
                "inputResponses": {key: {"action": "decline"}},
            },
        }
        bad = await http.post(url, headers=headers, json=retry, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == -32602
        retry["params"]["requestState"] = state
        ok = (await http.post(url, headers=headers, json=retry, timeout=30)).json()["result"]
        assert ok["resultType"] == "complete" and "action=decline" in ok["content"][0]["text"]
        again = await http.post(url, headers=headers, json={**retry, "id": 3}, timeout=30)
        assert again.json()["error"]["code"] == -32602
        # A client that did not declare sampling is told so (-32021), not asked.
        no_caps = {**META, "io.modelcontextprotocol/clientCapabilities": {}}
        sampling_call = {
            "jsonrpc": "2.0",
            "id": 4,
            "method": "tools/call",
            "params": {"name": "test_sampling", "arguments": {"prompt": "x"}, "_meta": no_caps},
        }
        refused = await http.post(url, headers={**MODERN, "Mcp-Name": "test_sampling"}, json=sampling_call)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == -32021
        assert "sampling" in refused.json()["error"]["data"]["requiredCapabilities"]


async def test_handshake_client_modern_upstream(gateway: GatewayFactory, tmp_path: Path) -> None:
    """A modern upstream's input_required reaches a handshake-era client as ordinary requests."""
    config = servers_file(tmp_path, {"everything": everything_entry(era="modern")})
    gw = gateway("serve", "--config", str(config))
    url = f"{gw.base}/servers/everything/mcp"
    async with Client(
        url, mode="legacy", sampling_callback=sampling, elicitation_callback=elicitation
    ) as client:
        assert client.protocol_version == "2025-11-25"
        res = await client.call_tool("test_input_required_result_elicitation", {})
        assert "Hello, Ada!" in text_of(res)
        res = await client.call_tool("test_input_required_result_sampling", {})
        assert "Model said: Paris" in text_of(res)
        assert "This is a simple text response" in text_of(await client.call_tool("test_simple_text", {}))
        prompts = await client.list_prompts()
        assert prompts.prompts


async def test_handshake_client_resource_subscription(gateway: GatewayFactory, tmp_path: Path) -> None:
    """resources/subscribe in front of a 2026-07-28 upstream: a held subscriptions/listen stands in.
    (In front of a handshake-era upstream it is forwarded; the conformance suite covers that.)"""
    config = servers_file(tmp_path, {"notes": notes_entry(era="modern")})
    gw = gateway("serve", "--config", str(config))
    updates: list[str] = []

    async def on_message(message: Any) -> None:
        root = getattr(message, "root", message)
        if getattr(root, "method", None) == "notifications/resources/updated":
            updates.append(str(root.params.uri))

    async with Client(gw.url, mode="legacy", message_handler=on_message) as client:
        await client.subscribe_resource("notes+notes://all")
        await asyncio.sleep(0.5)
        await client.call_tool("notes_add_note", {"text": "hello"})
        for _ in range(50):
            if updates:
                break
            await asyncio.sleep(0.1)
    assert updates and updates[0] == "notes+notes://all"


REGIONAL = """
import json, sys
TOOL = {"name": "where", "inputSchema": {"type": "object", "properties": {
    "region": {"type": "string", "x-mcp-header": "Region"},
    "size": {"type": "integer", "x-mcp-header": "Size"},
    "note": {"type": "string"}}}}
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    method, params = m.get("method"), m.get("params") or {}
    if method == "initialize":
        r = {"protocolVersion": params["protocolVersion"], "capabilities": {"tools": {}},
             "serverInfo": {"name": "regional", "version": "1"}}
    elif method == "tools/list":
        r = {"tools": [TOOL]}
    elif method == "tools/call":
        r = {"content": [{"type": "text", "text": json.dumps(params.get("arguments"))}]}
    else:
        r = {}
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}) + "\\n")
    sys.stdout.flush()
"""


async def test_param_headers_are_checked_against_the_listed_schema(
    gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A 2026-07-28 tools/call of a tool whose listed inputSchema declares ``x-mcp-header`` properties
    must carry matching Mcp-Param-* headers: missing, extra or different ones get -32020 (HTTP 400)
    and never reach the server; matching ones pass."""
    script = tmp_path / "regional.py"
    script.write_text(REGIONAL)
    gw = gateway(
        "serve",
        "--config",
        str(servers_file(tmp_path, {"regional": {"command": sys.executable, "args": [str(script)]}})),
    )
    url = f"{gw.base}/servers/regional/mcp"
    listed = {**MODERN, "Mcp-Method": "tools/list"}
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(url, headers=listed, json=rpc.request(1, "tools/list", {"_meta": META}))
        assert [t["name"] for t in r.json()["result"]["tools"]] == ["where"]

        async def call(args: dict[str, Any], extra: dict[str, str]) -> httpx.Response:
            params = {"name": "where", "arguments": args, "_meta": META}
            headers = {**MODERN, "Mcp-Name": "where", **extra}
            return await client.post(url, headers=headers, json=rpc.request(2, "tools/call", params))

        ok = await call(
            {"region": "eu-west", "size": 3, "note": "x"},
            {"Mcp-Param-Region": "eu-west", "Mcp-Param-Size": "3"},
        )
        assert ok.status_code == 200, ok.text
        assert json.loads(ok.json()["result"]["content"][0]["text"]) == {
            "region": "eu-west",
            "size": 3,
            "note": "x",
        }
        for args, extra in [
            ({"region": "eu-west", "size": 3}, {"Mcp-Param-Size": "3"}),  # Region missing
            ({"region": "eu-west", "size": 3}, {"Mcp-Param-Region": "us-east", "Mcp-Param-Size": "3"}),
            ({"region": "eu-west", "size": 3}, {"Mcp-Param-Region": "eu-west", "Mcp-Param-Size": "4"}),
            ({"size": 3}, {"Mcp-Param-Region": "eu-west", "Mcp-Param-Size": "3"}),  # header, no argument
        ]:
            bad = await call(args, extra)
            assert bad.status_code == 400, (extra, bad.text)
            assert bad.json()["error"]["code"] == -32020, bad.text

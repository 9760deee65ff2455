"""Real MCP clients through the gateway: the official SDK (both eras), openai-agents, the Inspector CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.types import (
    CreateMessageRequestParams,
    CreateMessageResult,
    ElicitRequestParams,
    ElicitResult,
    TextContent,
)

from tests.conftest import NOTES_SERVER, GatewayFactory, everything_entry, notes_entry, servers_file
from tests.support.external import everything_server_stdio_cmd, inspector_cli_cmd, node22_env


async def sampling(_ctx: Any, params: CreateMessageRequestParams) -> CreateMessageResult:
    return CreateMessageResult(role="assistant", content=TextContent(type="text", text="Paris"), model="test")


async def elicitation(_ctx: Any, params: ElicitRequestParams) -> ElicitResult:
    return ElicitResult(action="accept", content={"response": "yes", "name": "Ada"})


def text_of(result: Any) -> str:
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_sdk_client_both_eras(gateway: GatewayFactory, mode: str) -> None:
    gw = gateway("expose", "--", *everything_server_stdio_cmd())
    async with Client(
        gw.url, mode=mode, sampling_callback=sampling, elicitation_callback=elicitation
    ) as client:
        expected = "2026-07-28" if mode == "auto" else "2025-11-25"
        assert client.protocol_version == expected
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"test_simple_text", "test_sampling", "test_elicitation"} <= tools
        assert "This is a simple text response" in text_of(await client.call_tool("test_simple_text", {}))
        if mode == "legacy":  # server-to-client requests, over the session's streams
            assert "Paris" in text_of(
                await client.call_tool("test_sampling", {"prompt": "Capital of France?"})
            )
            res = await client.call_tool("test_elicitation", {"message": "ok?"})
            assert "action=accept" in text_of(res)
        else:  # the same through multi-round-trip requests
            res = await client.call_tool("test_input_required_result_sampling", {})
            assert "Model said: Paris" in text_of(res)
            res = await client.call_tool("test_input_required_result_elicitation", {})
            assert "Hello, Ada!" in text_of(res)
        read = await client.read_resource("test://static-text")
        assert read.contents


async def test_sdk_client_aggregated(gateway: GatewayFactory, tmp_path: Path) -> None:
    config = servers_file(tmp_path, {"everything": everything_entry(), "notes": notes_entry()})
    gw = gateway("serve", "--config", str(config))
    for mode in ("legacy", "auto"):
        async with Client(gw.url, mode=mode) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"notes_echo", "notes_add_note", "everything_test_simple_text"} <= tools
            assert text_of(await client.call_tool("notes_echo", {"text": "hi"})) == "hi"
            prompts = {p.name for p in (await client.list_prompts()).prompts}
            assert "notes_summarize" in prompts
            resources = {str(r.uri) for r in (await client.list_resources()).resources}
            assert "notes+notes://all" in resources
            assert (await client.read_resource("everything+test://static-text")).contents
    # Each server is also reachable on its own path, under its own names.
    async with Client(f"{gw.base}/servers/notes/mcp", mode="legacy") as client:
        assert text_of(await client.call_tool("echo", {"text": "solo"})) == "solo"


async def test_openai_agents(gateway: GatewayFactory) -> None:
    from agents.mcp import MCPServerSse, MCPServerStreamableHttp

    gw = gateway("expose", "--", *NOTES_SERVER)
    for server in (
        MCPServerStreamableHttp(params={"url": gw.url}, client_session_timeout_seconds=30),
        MCPServerSse(params={"url": f"{gw.base}/sse"}, client_session_timeout_seconds=30),
    ):
        async with server:
            names = {t.name for t in await server.list_tools()}
            assert {"echo", "add_note"} <= names
            result = await server.call_tool("echo", {"text": "from agents"})
            assert not result.is_error
            assert "from agents" in text_of(result)


@pytest.mark.parametrize("transport", ["mcp", "sse"])
def test_inspector_cli(gateway: GatewayFactory, tmp_path: Path, transport: str) -> None:
    gw = gateway("expose", "--", *NOTES_SERVER)
    url = f"{gw.base}/{transport}"

    def inspector(*args: str) -> Any:
        proc = subprocess.run(
            [*inspector_cli_cmd(), url, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=node22_env(home=tmp_path),
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
        return json.loads(proc.stdout)

    tools = inspector("--method", "tools/list")
    assert "echo" in {t["name"] for t in tools["tools"]}
    called = inspector("--method", "tools/call", "--tool-name", "echo", "--tool-arg", "text=inspected")
    assert "inspected" in json.dumps(called)

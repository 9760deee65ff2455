"""Remote upstreams (Streamable HTTP in both eras, legacy HTTP+SSE) and per-session isolation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from mcp import Client

from tests.conftest import NOTES_SERVER, GatewayFactory, notes_entry, servers_file
from tests.support.external import free_port, running, wait_for_port
from tests.test_clients import text_of

SECRET = "s3cr3t-upstream-token-value"


@pytest.mark.parametrize("kind", ["http", "sse"])
async def test_remote_upstream_both_client_eras(gateway: GatewayFactory, tmp_path: Path, kind: str) -> None:
    port = free_port()
    with running([sys.executable, NOTES_SERVER[1], kind, str(port)], log=tmp_path / "up.log") as upstream:
        wait_for_port(port, proc=upstream)
        path = "/mcp" if kind == "http" else "/sse"
        config = servers_file(
            tmp_path,
            {
                "remote": {
                    "url": f"http://127.0.0.1:{port}{path}",
                    "type": kind,
                    "headers": {"Authorization": "env:UPSTREAM_TOKEN"},
                }
            },
        )
        gw = gateway("serve", "--config", str(config), env={"UPSTREAM_TOKEN": f"Bearer {SECRET}"})
        for mode in ("legacy", "auto"):
            async with Client(gw.url, mode=mode) as client:
                assert text_of(await client.call_tool("remote_echo", {"text": f"via {kind} {mode}"})) == (
                    f"via {kind} {mode}"
                )
                assert (await client.read_resource("remote+notes://all")).contents is not None
    assert SECRET not in gw.logs()


async def test_session_isolation(gateway: GatewayFactory, tmp_path: Path) -> None:
    config = servers_file(tmp_path, {"shared": notes_entry(), "own": notes_entry(isolation="session")})
    gw = gateway("serve", "--config", str(config))
    pids: dict[str, set[str]] = {"shared": set(), "own": set()}
    for _ in range(3):
        async with Client(gw.url, mode="legacy") as client:
            for server in pids:
                pids[server].add(text_of(await client.call_tool(f"{server}_pid", {})))
    assert len(pids["shared"]) == 1  # one child for every session
    assert len(pids["own"]) == 3  # a child of its own per session

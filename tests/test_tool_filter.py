"""Per-server tool allow/deny lists: hidden tools are neither listed nor callable, in every mode and era."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_bastion.auth.identity import ANONYMOUS
from mcp_bastion.config import ConfigError, parse_server
from mcp_bastion.core import jsonrpc as rpc
from mcp_bastion.core.sealing import StateSealer
from mcp_bastion.hub import Hub, ServerEntry
from tests.conftest import NOTES_SERVER
from tests.test_identity_routing import Collector, call, tool_names


def notes(**extra: Any) -> dict[str, Any]:
    return {"command": NOTES_SERVER[0], "args": NOTES_SERVER[1:], **extra}


@pytest.fixture(params=[False, True], ids=["single", "aggregate"])
async def hub(request: pytest.FixtureRequest) -> AsyncIterator[Hub]:
    hub_ref: list[Hub] = []
    config = parse_server("notes", notes(tools={"allow": ["echo", "wh*", "pid"], "deny": ["whoami"]}))
    entry = ServerEntry(config, lambda ch, evs: hub_ref[0].on_events(ch, evs))
    h = Hub("/", [entry], prefix_mode="always", aggregate=request.param, sealer=StateSealer())
    hub_ref.append(h)
    yield h
    await entry.close()


@pytest.mark.parametrize("era", ["legacy", "modern"])
async def test_hidden_tools_are_not_listed_or_callable(hub: Hub, era: str) -> None:
    peer = Collector("p", ANONYMOUS, era)
    prefix = "" if hub.single else "notes_"
    assert await tool_names(hub, peer) == {f"{prefix}echo", f"{prefix}pid"}
    ok = await call(hub, peer, f"{prefix}pid")
    assert "result" in ok, ok
    for hidden in ("whoami", "crash", "add_note"):
        reply = await call(hub, peer, f"{prefix}{hidden}")
        assert reply["error"]["code"] == rpc.INVALID_PARAMS, reply
        assert reply["error"]["message"] == f"Unknown tool: {prefix}{hidden}"


def test_tool_patterns_are_validated() -> None:
    for bad in (
        {"tools": ["echo"]},
        {"tools": {"only": ["x"]}},
        {"tools": {"allow": "echo"}},
        {"tools": {"deny": [""]}},
    ):
        with pytest.raises(ConfigError):
            parse_server("s", notes(**bad))


@given(st.text(min_size=1, max_size=20), st.lists(st.text(min_size=1, max_size=8), max_size=3))
def test_deny_always_wins(name: str, others: list[str]) -> None:
    assert not parse_server("s", notes(tools={"allow": [name, "*"], "deny": [*others, name]})).tool_allowed(
        name
    )
    assert parse_server("s", notes(tools={"allow": [*others, name]})).tool_allowed(name) or "[" in name
    assert parse_server("s", notes()).tool_allowed(name)  # no lists: everything is offered

"""The hub as an identity sees it: only the servers it may use, with its own upstream credentials.

In process (hub + real stdio children of the notes server), both eras; the HTTP edge that sets
``peer.identity`` from a bearer is tested in test_auth_resource.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mcp_bastion.auth.identity import ANONYMOUS, Identity
from mcp_bastion.config import ConfigError, parse_server
from mcp_bastion.core import jsonrpc as rpc
from mcp_bastion.core.eras import LATEST_MODERN, META_CLIENT_CAPABILITIES, META_PROTOCOL_VERSION
from mcp_bastion.core.sealing import StateSealer
from mcp_bastion.hub import Hub, ServerEntry
from mcp_bastion.peers import Peer
from tests.conftest import NOTES_SERVER, GatewayFactory, servers_file


class Collector(Peer):
    def __init__(self, name: str, identity: Identity, era: str = "legacy") -> None:
        super().__init__(name, "2025-11-25" if era == "legacy" else LATEST_MODERN)
        self.era = "legacy" if era == "legacy" else "modern"
        self.identity = identity
        self.got: list[rpc.Message] = []

    def deliver(self, message: rpc.Message, related: rpc.RequestId | None, final: bool = False) -> None:
        self.got.append(message)


def user(name: str, servers: frozenset[str] | None = None) -> Identity:
    return Identity(
        subject=f"user:{name}", name=name, kind="user", scopes=frozenset({"mcp"}), servers=servers
    )


def notes(**extra: Any) -> dict[str, Any]:
    return {"command": NOTES_SERVER[0], "args": NOTES_SERVER[1:], "env": {"NOTES_ACCOUNT": "shared"}, **extra}


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    entries = [
        ServerEntry(
            parse_server(
                "mail",
                notes(
                    users={
                        "alice": {"env": {"NOTES_ACCOUNT": "alice-account"}},
                        "key:ci": {"env": {"NOTES_ACCOUNT": "ci-account"}},
                    }
                ),
            ),
            lambda ch, evs: hub_ref[0].on_events(ch, evs),
        ),
        ServerEntry(
            parse_server(
                "vault", notes(users={"alice": {"env": {"NOTES_ACCOUNT": "alice-vault"}}}, usersOnly=True)
            ),
            lambda ch, evs: hub_ref[0].on_events(ch, evs),
        ),
        ServerEntry(parse_server("wiki", notes()), lambda ch, evs: hub_ref[0].on_events(ch, evs)),
    ]
    hub_ref: list[Hub] = []
    h = Hub("/", entries, prefix_mode="always", aggregate=True, sealer=StateSealer())
    hub_ref.append(h)
    yield h
    for e in entries:
        await e.close()


async def call(hub: Hub, peer: Peer, tool: str, n: int = 1) -> rpc.Message:
    params: dict[str, Any] = {"name": tool, "arguments": {}}
    if peer.era == "modern":
        params["_meta"] = {META_PROTOCOL_VERSION: LATEST_MODERN, META_CLIENT_CAPABILITIES: {}}
    return await hub.request(peer, rpc.request(n, "tools/call", params))


def text(reply: rpc.Message) -> str:
    assert "result" in reply, reply
    return str(reply["result"]["content"][0]["text"])


async def tool_names(hub: Hub, peer: Peer) -> set[str]:
    params: dict[str, Any] = {}
    if peer.era == "modern":
        params["_meta"] = {META_PROTOCOL_VERSION: LATEST_MODERN, META_CLIENT_CAPABILITIES: {}}
    reply = await hub.request(peer, rpc.request(99, "tools/list", params))
    return {t["name"] for t in reply["result"]["tools"]}


@pytest.mark.parametrize("era", ["legacy", "modern"])
async def test_each_identity_reaches_upstreams_with_its_own_credentials(hub: Hub, era: str) -> None:
    alice = Collector("a", user("alice"), era)
    bob = Collector("b", user("bob"), era)
    ci = Collector(
        "c", Identity(subject="key:k1", name="key:ci", kind="key", servers=frozenset({"mail"})), era
    )
    anon = Collector("n", ANONYMOUS, era)

    assert text(await call(hub, alice, "mail_whoami")) == "alice-account"
    assert text(await call(hub, bob, "mail_whoami")) == "shared"
    assert text(await call(hub, anon, "mail_whoami")) == "shared"
    assert text(await call(hub, ci, "mail_whoami")) == "ci-account"
    assert text(await call(hub, alice, "vault_whoami")) == "alice-vault"
    assert text(await call(hub, alice, "wiki_whoami")) == "shared"
    # Separate children: one per credential set, shared by everyone on the server's own.
    pids = {text(await call(hub, p, "mail_pid")) for p in (alice, bob, anon, ci)}
    assert len(pids) == 3


@pytest.mark.parametrize("era", ["legacy", "modern"])
async def test_identities_see_only_the_servers_they_may_use(hub: Hub, era: str) -> None:
    alice = Collector("a", user("alice"), era)
    bob = Collector("b", user("bob"), era)
    ci = Collector(
        "c", Identity(subject="key:k1", name="key:ci", kind="key", servers=frozenset({"mail"})), era
    )

    alice_tools = await tool_names(hub, alice)
    assert {"mail_whoami", "vault_whoami", "wiki_whoami"} <= alice_tools
    bob_tools = await tool_names(hub, bob)  # vault is users-only and bob has no entry
    assert "mail_whoami" in bob_tools and "wiki_whoami" in bob_tools
    assert not any(t.startswith("vault_") for t in bob_tools)
    ci_tools = await tool_names(hub, ci)  # a key scoped to one server
    assert ci_tools and all(t.startswith("mail_") for t in ci_tools)

    for peer, tool in ((bob, "vault_whoami"), (ci, "wiki_echo"), (ci, "vault_pid")):
        reply = await call(hub, peer, tool)
        assert reply["error"]["code"] == rpc.INVALID_REQUEST
        assert "Not permitted" in reply["error"]["message"]
    # What a restricted identity listed did not shrink what others see.
    assert await tool_names(hub, alice) == alice_tools


def test_users_config_is_validated() -> None:
    ok = parse_server("s", notes(users={"a": {"headers": {}, "env": {"X": "env:Y"}}}))
    assert ok.credentials_key("a") == "a" and ok.credentials_key("b") == ""
    assert ok.for_credentials("a").env["X"] == "env:Y"
    assert "users" in ok.redacted() and "env:Y" not in str(ok.redacted())
    for bad in (
        {"users": ["a"]},
        {"users": {"a": {"password": "x"}}},
        {"users": {"a": {"env": {"X": 1}}}},
        {"usersOnly": True},
        {"users": {"a": {}}, "usersOnly": "yes"},
    ):
        with pytest.raises(ConfigError):
            parse_server("s", notes(**bad))


async def test_request_state_is_bound_to_the_identity_that_got_it() -> None:
    """A sealed requestState presented by another identity is refused like a tampered one."""
    from tests.conftest import everything_entry

    hub_ref: list[Hub] = []
    entry = ServerEntry(
        parse_server("everything", everything_entry(era="legacy")),
        lambda ch, evs: hub_ref[0].on_events(ch, evs),
    )
    hub = Hub("/", [entry], prefix_mode="always", aggregate=False, sealer=StateSealer())
    hub_ref.append(hub)
    alice = Collector("a", user("alice"), "modern")
    bob = Collector("b", user("bob"), "modern")
    for peer in (alice, bob):  # what the HTTP edge reads from each request's _meta
        peer.client_capabilities = {"elicitation": {}}
    meta = {META_PROTOCOL_VERSION: LATEST_MODERN, META_CLIENT_CAPABILITIES: {"elicitation": {}}}
    call_params = {"name": "test_elicitation", "arguments": {"message": "Name?"}, "_meta": meta}
    try:
        first = await hub.request(alice, rpc.request(1, "tools/call", call_params))
        assert "result" in first, first
        result = first["result"]
        assert result["resultType"] == "input_required"
        (key,) = result["inputRequests"]
        answer = {
            **call_params,
            "requestState": result["requestState"],
            "inputResponses": {key: {"action": "decline"}},
        }
        stolen = await hub.request(bob, rpc.request(2, "tools/call", answer))
        assert stolen["error"]["code"] == rpc.INVALID_PARAMS
        own = await hub.request(alice, rpc.request(3, "tools/call", answer))
        assert own["result"]["resultType"] == "complete"
        assert "action=decline" in own["result"]["content"][0]["text"]
    finally:
        await entry.close()


async def test_signed_in_identities_get_their_own_upstream_credentials_end_to_end(
    gateway: GatewayFactory, tmp_path: Path
) -> None:
    """Through the HTTP edge: the bearer's identity selects the env the upstream child runs with."""
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    from tests.test_auth_resource import keys_cli, mint, signer, text_of

    entry = notes(
        users={
            "alice": {"env": {"NOTES_ACCOUNT": "env:ALICE_ACCOUNT"}},
            "key:ci": {"env": {"NOTES_ACCOUNT": "ci"}},
        }
    )
    config = servers_file(tmp_path, {"mail": entry})
    gw = gateway("serve", "--auth", "--config", str(config), env={"ALICE_ACCOUNT": "alice-from-env"})
    created = keys_cli(tmp_path, "create", "--name", "ci")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    async with signer(tmp_path, gw) as ring:
        alice = mint(ring, gw, "/servers/mail/mcp", subject="user:alice")
        bob = mint(ring, gw, "/servers/mail/mcp", subject="user:bob")
    seen = {}
    for who, token in (("alice", alice), ("bob", bob), ("ci", key)):
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        async with (
            http,
            Client(streamable_http_client(f"{gw.base}/servers/mail/mcp", http_client=http)) as client,
        ):
            seen[who] = text_of(await client.call_tool("whoami", {}))
    assert seen == {"alice": "alice-from-env", "bob": "shared", "ci": "ci"}
    assert "alice-from-env" not in gw.logs()  # secret values never logged

"""The gateway as OAuth resource server, against a real gateway process started with ``--auth``.

Access tokens are minted in the test process by a KeyRing opened on the gateway's own SQLite store (the
same signing keys); API keys are made with the real ``mcp-bastion keys`` command. Covered: the 401
challenge and the protected resource metadata of every endpoint, audience binding, expiry, scope,
tokens in the query string, sessions bound to their subject, API keys scoped to servers and revoked,
both eras and legacy HTTP+SSE, the MCP SDK client with a bearer, and that no upstream sees the bearer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from mcp_bastion.auth.store import Store
from mcp_bastion.auth.tokens import KeyRing, new_family_id
from tests.conftest import BASTION, NOTES_SERVER, GatewayFactory, RunningGateway, notes_entry, servers_file
from tests.support.external import free_port, running, wait_for_port

HERE = Path(__file__).parent
RECORDER = [sys.executable, str(HERE / "servers" / "header_recorder.py")]
PRM = "/.well-known/oauth-protected-resource"
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
LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def store_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'bastion.db'}"


@contextlib.asynccontextmanager
async def signer(tmp_path: Path, gw: RunningGateway, url: str | None = None) -> AsyncIterator[KeyRing]:
    """A KeyRing on the gateway's store: it signs with the gateway's current key."""
    store = await Store.open(url or store_url(tmp_path))
    try:
        ring = KeyRing(store, 30.0, issuer=gw.base, access_token_seconds=3600)
        await ring.load()
        yield ring
    finally:
        await store.close()


def mint(
    ring: KeyRing,
    gw: RunningGateway,
    path: str = "/mcp",
    *,
    scope: str = "mcp",
    subject: str = "user:alice",
    ttl: int = 300,
) -> str:
    return ring.mint_access_token(
        subject=subject,
        name=subject.partition(":")[2],
        client_id="test-client",
        audience=f"{gw.base}{path}",
        scope=scope,
        family_id=new_family_id(),
        ttl=ttl,
    )


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def challenge(resp: httpx.Response) -> str:
    return resp.headers.get("www-authenticate", "")


async def initialize(client: httpx.AsyncClient, url: str, token: str) -> httpx.Response:
    return await client.post(url, json=INIT, headers={**ACCEPT, **bearer(token)})


def keys_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BASTION, "keys", *args, "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )


def two_servers(gateway: GatewayFactory, tmp_path: Path) -> RunningGateway:
    config = servers_file(tmp_path, {"a": notes_entry(), "b": notes_entry()})
    return gateway("serve", "--auth", "--config", str(config))


def text_of(result: Any) -> str:
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


# ---------------------------------------------------------------------- challenges and metadata


async def test_challenges_and_metadata_expose(gateway: GatewayFactory) -> None:
    gw = gateway("expose", "--auth", "--", *NOTES_SERVER)
    async with httpx.AsyncClient(base_url=gw.base) as http:
        # Handshake era, 2026-07-28 era, legacy HTTP+SSE: all refused without a token.
        resp = await http.post("/mcp", json=INIT, headers=ACCEPT)
        assert resp.status_code == 401
        assert challenge(resp) == f'Bearer resource_metadata="{gw.base}{PRM}/mcp", scope="mcp"'
        assert resp.json()["error"]["message"]
        modern = {**ACCEPT, "mcp-protocol-version": "2026-07-28", "mcp-method": "tools/list"}
        resp = await http.post("/mcp", json=LIST, headers=modern)
        assert resp.status_code == 401
        assert f'resource_metadata="{gw.base}{PRM}/mcp"' in challenge(resp)
        for method, path in (
            ("GET", "/mcp"),
            ("DELETE", "/mcp"),
            ("GET", "/sse"),
            ("POST", "/messages/?session_id=x"),
        ):
            resp = await http.request(method, path, headers={"accept": "text/event-stream"})
            assert resp.status_code == 401, (method, path)
            expected = "sse" if path != "/mcp" else "mcp"
            assert challenge(resp) == f'Bearer resource_metadata="{gw.base}{PRM}/{expected}", scope="mcp"'
        # Not a bearer, a malformed one, an unknown one.
        resp = await http.post("/mcp", json=INIT, headers={**ACCEPT, "authorization": "Basic YTpi"})
        assert resp.status_code == 401 and "error=" not in challenge(resp)
        for token in ("not a token", "eyJhbGciOiJub25lIn0.e30.", "mcpb_0123456789ab_" + "A" * 43):
            resp = await http.post("/mcp", json=INIT, headers={**ACCEPT, **bearer(token)})
            assert resp.status_code == 401
            assert challenge(resp).startswith('Bearer error="invalid_token"')
            assert f'resource_metadata="{gw.base}{PRM}/mcp"' in challenge(resp)
        # Protected resource metadata: root (the endpoint at /mcp) and path-inserted, per endpoint.
        for path, resource in ((PRM, "/mcp"), (f"{PRM}/mcp", "/mcp"), (f"{PRM}/sse", "/sse")):
            resp = await http.get(path)
            assert resp.status_code == 200, path
            doc = resp.json()
            assert doc["resource"] == f"{gw.base}{resource}"
            assert doc["authorization_servers"] == [gw.base]
            assert doc["scopes_supported"] == ["mcp"]
            assert doc["bearer_methods_supported"] == ["header"]
            assert doc["resource_name"]
        assert (await http.get(f"{PRM}/servers/server/mcp")).status_code == 404
        # The authorization server those documents name answers at the same origin.
        meta = (await http.get("/.well-known/oauth-authorization-server")).json()
        assert meta["issuer"] == gw.base
        # Health stays open.
        assert (await http.get("/healthz")).status_code == 200


async def test_public_url_turns_auth_on(gateway: GatewayFactory) -> None:
    """--public-url makes the issuer and resources public (a path prefix too); --no-auth is loud."""
    public = "https://gw.example.test/bastion"
    gw = gateway("expose", "--public-url", public, "--", *NOTES_SERVER)
    async with httpx.AsyncClient(base_url=gw.base) as http:
        resp = await http.post("/mcp", json=INIT, headers=ACCEPT)
        assert resp.status_code == 401
        prm = f"https://gw.example.test{PRM}/bastion/mcp"
        assert challenge(resp) == f'Bearer resource_metadata="{prm}", scope="mcp"'
        # Served whether or not the proxy strips the prefix.
        for path in (f"{PRM}/bastion/mcp", f"{PRM}/mcp", PRM, f"{PRM}/bastion"):
            doc = (await http.get(path)).json()
            assert doc["resource"] == f"{public}/mcp", path
            assert doc["authorization_servers"] == [public]
    logs = gw.logs()
    assert '"issuer": "https://gw.example.test/bastion"' in logs
    assert "auth_nobody_can_sign_in" in logs  # it starts anyway, and says how to add a user or key

    off = gateway("expose", "--public-url", public, "--no-auth", "--", *NOTES_SERVER)
    async with httpx.AsyncClient(base_url=off.base) as http:
        assert (await http.post("/mcp", json=INIT, headers=ACCEPT)).status_code == 200
        assert (await http.get(f"{PRM}/mcp")).status_code == 404
    assert "auth_off_beyond_loopback" in off.logs()


async def test_tokens_never_in_the_query(gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = gateway("expose", "--auth", "--", *NOTES_SERVER)
    async with signer(tmp_path, gw) as ring, httpx.AsyncClient(base_url=gw.base) as http:
        token = mint(ring, gw)
        for headers in ({}, bearer(token)):
            resp = await http.post(f"/mcp?access_token={token}", json=INIT, headers={**ACCEPT, **headers})
            assert resp.status_code == 400
            assert challenge(resp).startswith('Bearer error="invalid_request"')
        resp = await http.get(f"/sse?access_token={token}")
        assert resp.status_code == 400
        # Two Authorization headers are ambiguous: refused, not guessed at.
        two = httpx.Headers(
            [*ACCEPT.items(), ("authorization", f"Bearer {token}"), ("authorization", "Bearer x")]
        )
        resp = await http.post("/mcp", json=INIT, headers=two)
        assert resp.status_code == 400
        assert (await initialize(http, "/mcp", token)).status_code == 200


async def test_per_server_resources_audience_and_scope(gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = two_servers(gateway, tmp_path)
    async with signer(tmp_path, gw) as ring, httpx.AsyncClient(base_url=gw.base) as http:
        resp = await http.post("/servers/a/mcp", json=INIT, headers=ACCEPT)
        assert resp.status_code == 401
        assert challenge(resp) == f'Bearer resource_metadata="{gw.base}{PRM}/servers/a/mcp", scope="mcp:a"'
        resp = await http.get("/servers/b/sse")
        assert challenge(resp) == f'Bearer resource_metadata="{gw.base}{PRM}/servers/b/sse", scope="mcp:b"'
        for path, resource, scope in (
            (PRM, "/mcp", "mcp"),
            (f"{PRM}/mcp", "/mcp", "mcp"),
            (f"{PRM}/sse", "/sse", "mcp"),
            (f"{PRM}/servers/a/mcp", "/servers/a/mcp", "mcp:a"),
            (f"{PRM}/servers/b/sse", "/servers/b/sse", "mcp:b"),
        ):
            doc = (await http.get(path)).json()
            assert doc["resource"] == f"{gw.base}{resource}", path
            assert doc["scopes_supported"] == [scope]
            assert doc["authorization_servers"] == [gw.base]

        # A token is good only for the resource it was issued for (RFC 8707).
        for_a = mint(ring, gw, "/servers/a/mcp", scope="mcp:a")
        assert (await initialize(http, "/servers/a/mcp", for_a)).status_code == 200
        for other in ("/servers/b/mcp", "/mcp"):
            resp = await initialize(http, other, for_a)
            assert resp.status_code == 401, other
            assert challenge(resp).startswith('Bearer error="invalid_token"')
        # ...or its SSE sibling, or the whole gateway (the issuer).
        async with http.stream("GET", "/servers/a/sse", headers=bearer(for_a)) as stream:
            assert stream.status_code == 200
        whole = mint(ring, gw, "", scope="mcp")
        for path in ("/mcp", "/servers/a/mcp", "/servers/b/mcp"):
            assert (await initialize(http, path, whole)).status_code == 200, path

        # Enough audience, not enough scope: 403 naming the scope needed, so the client can step up.
        resp = await initialize(http, "/mcp", mint(ring, gw, "", scope="mcp:a"))
        assert resp.status_code == 403
        assert challenge(resp).startswith('Bearer error="insufficient_scope"')
        assert 'scope="mcp"' in challenge(resp)
        assert f'resource_metadata="{gw.base}{PRM}/mcp"' in challenge(resp)
        resp = await initialize(
            http, "/servers/b/mcp", mint(ring, gw, "/servers/b/mcp", scope="mcp:a openid")
        )
        assert resp.status_code == 403 and 'scope="mcp:b"' in challenge(resp)
        # "mcp" covers every server endpoint.
        assert (await initialize(http, "/servers/b/mcp", mint(ring, gw, "/servers/b/mcp"))).status_code == 200

        # Expired: 401 invalid_token.
        resp = await initialize(http, "/mcp", mint(ring, gw, ttl=-120))
        assert resp.status_code == 401
        assert challenge(resp).startswith('Bearer error="invalid_token"')


# ---------------------------------------------------------------------- sessions bound to subjects


async def test_sessions_bound_to_subject(gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = gateway("expose", "--auth", "--", *NOTES_SERVER)
    async with signer(tmp_path, gw) as ring, httpx.AsyncClient(base_url=gw.base) as http:
        alice, bob = mint(ring, gw), mint(ring, gw, subject="user:bob")
        resp = await initialize(http, "/mcp", alice)
        assert resp.status_code == 200
        sid = resp.headers["mcp-session-id"]
        session = {**ACCEPT, "mcp-session-id": sid, "mcp-protocol-version": "2025-11-25"}
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await http.post("/mcp", json=note, headers={**session, **bearer(alice)})).status_code == 202
        # Another subject's valid token on alice's session: as if the session did not exist.
        for method, body in (("POST", LIST), ("GET", None), ("DELETE", None)):
            resp = await http.request(method, "/mcp", json=body, headers={**session, **bearer(bob)})
            assert resp.status_code == 404, method
        resp = await http.post("/mcp", json={**INIT, "id": 9}, headers={**session, **bearer(bob)})
        assert resp.status_code == 200 and resp.headers["mcp-session-id"] != sid  # a new session of bob's
        # No token at all: 401 first (authentication comes before any session lookup).
        assert (await http.post("/mcp", json=LIST, headers=session)).status_code == 401
        # Alice still has her session.
        resp = await http.post("/mcp", json=LIST, headers={**session, **bearer(alice)})
        assert resp.status_code == 200 and "echo" in resp.text
        # A lost or unknown session with a valid token: 404 (initialize again), never 401.
        lost = {**session, "mcp-session-id": "no-such-session"}
        assert (await http.post("/mcp", json=LIST, headers={**lost, **bearer(alice)})).status_code == 404
        assert (await http.delete("/mcp", headers={**session, **bearer(alice)})).status_code == 200
        assert (await http.post("/mcp", json=LIST, headers={**session, **bearer(alice)})).status_code == 404

        # Legacy HTTP+SSE: the message endpoint of alice's stream is closed to bob.
        async with http.stream(
            "GET", "/sse", headers={"accept": "text/event-stream", **bearer(alice)}
        ) as sse:
            assert sse.status_code == 200
            lines = sse.aiter_lines()
            endpoint = ""
            async for line in lines:
                if line.startswith("data: "):
                    endpoint = line[6:]
                    break
            assert "session_id=" in endpoint
            resp = await http.post(endpoint, json=INIT, headers={**ACCEPT, **bearer(bob)})
            assert resp.status_code == 404
            resp = await http.post(endpoint, json=INIT, headers={**ACCEPT, **bearer(alice)})
            assert resp.status_code == 202


# ---------------------------------------------------------------------- API keys


async def test_api_key_scoped_and_revoked(gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = two_servers(gateway, tmp_path)
    made = keys_cli(tmp_path, "create", "--name", "ci", "--servers", "a")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("mcpb_") and "\n" not in key
    async with httpx.AsyncClient(base_url=gw.base) as http:
        assert (await initialize(http, "/servers/a/mcp", key)).status_code == 200
        # A server the key does not cover: 403 that no re-authorization can lift (no scope to ask for).
        resp = await initialize(http, "/servers/b/mcp", key)
        assert resp.status_code == 403
        assert "scope=" not in challenge(resp).replace("insufficient_scope", "")
        assert resp.json()["error"] == "forbidden" and "'b'" in resp.json()["error_description"]
        # The aggregate endpoint lets it in and shows only its servers.
        async with Client(
            streamable_http_client(gw.url, http_client=create_mcp_http_client(headers=bearer(key))),
            mode="legacy",
        ) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert "a_echo" in names and not any(n.startswith("b_") for n in names)
            assert text_of(await client.call_tool("a_echo", {"text": "keyed"})) == "keyed"

        revoked = keys_cli(tmp_path, "revoke", "ci")
        assert revoked.returncode == 0, revoked.stderr
        # Refused once the short positive cache has let go of it (5 s); waited for, not timed.
        deadline = time.monotonic() + 60
        while (status := (await initialize(http, "/servers/a/mcp", key)).status_code) == 200:
            assert time.monotonic() < deadline, "revoked key still accepted"
            await asyncio.sleep(0.5)
        assert status == 401


# ---------------------------------------------------------------------- real clients, upstream headers


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_sdk_client_with_bearer(gateway: GatewayFactory, tmp_path: Path, mode: str) -> None:
    """The SDK through --auth in both eras, to an HTTP upstream that records what it is sent."""
    port = free_port()
    record = tmp_path / "upstream-headers.jsonl"
    log = tmp_path / "upstream.log"
    with running([*RECORDER, str(port), str(record)], log=log) as proc:
        wait_for_port(port, proc=proc, log=log)
        gw = gateway("expose", "--auth", "--url", f"http://127.0.0.1:{port}/mcp")
        async with signer(tmp_path, gw) as ring:
            token = mint(ring, gw)
        async with Client(
            streamable_http_client(gw.url, http_client=create_mcp_http_client(headers=bearer(token))),
            mode=mode,
        ) as client:
            assert client.protocol_version == ("2026-07-28" if mode == "auto" else "2025-11-25")
            assert "echo" in {t.name for t in (await client.list_tools()).tools}
            assert text_of(await client.call_tool("echo", {"text": "signed in"})) == "signed in"
        # Without the bearer the same client gets nowhere.
        with pytest.raises(Exception):  # noqa: B017 - the SDK's error type differs by era
            async with Client(gw.url, mode=mode) as client:
                await client.list_tools()
        lines = [json.loads(line) for line in record.read_text().splitlines()]
        assert lines, "the upstream saw no request"
        for line in lines:
            names = {k.lower() for k, _ in line["headers"]}
            assert "authorization" not in names, line
            assert token not in json.dumps(line)


async def test_sdk_sse_client_with_bearer(gateway: GatewayFactory, tmp_path: Path) -> None:
    """Legacy HTTP+SSE with a bearer; the store is where --database-url says."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'elsewhere.db'}"
    gw = gateway("expose", "--auth", "--database-url", url, "--", *NOTES_SERVER)
    assert not (tmp_path / "data" / "bastion.db").exists()
    async with signer(tmp_path, gw, url) as ring:
        token = mint(ring, gw, "/sse")
    async with Client(sse_client(f"{gw.base}/sse", headers=bearer(token)), mode="legacy") as client:
        assert text_of(await client.call_tool("echo", {"text": "over sse"})) == "over sse"
    with pytest.raises(Exception):  # noqa: B017 - refused at the SSE GET
        async with Client(sse_client(f"{gw.base}/sse"), mode="legacy") as client:
            await client.list_tools()

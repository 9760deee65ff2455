"""What ChatGPT and Claude do to connect, replayed request by request against a real gateway; and the
API keys that the OpenAI Responses API and Anthropic Messages API connectors send as bearers.

The sequences follow the clients' documentation and observed traffic (see
``shared/reference/spec-and-clients.md`` sections 2.1-2.4): an unauthenticated request and its 401,
protected resource metadata (path-inserted, then root), both authorization server metadata
documents, registration with the client's real callback, ``/authorize`` with ``resource`` and S256
(ChatGPT reconnects without ``scope``), the code exchange, then MCP with the bearer. The final
redirect to claude.ai or chatgpt.com is captured, never followed: nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import TextContent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import NOTES_SERVER, GatewayFactory, RunningGateway
from tests.support.external import everything_server_stdio_cmd
from tests.support.signin import (
    INITIALIZED,
    Pkce,
    add_user,
    authorize_url,
    bastion_cli,
    create_api_key,
    initialize_message,
    mcp_post,
    request_message,
    sign_in,
    text_of,
    token_json,
    token_request,
    www_authenticate_params,
)
from tests.support.tls_server import LocalCA, TlsServer

CLAUDE_CALLBACK = "https://claude.ai/api/mcp/auth_callback"
CHATGPT_CALLBACK = "https://chatgpt.com/connector_platform_oauth_redirect"
KEY_REVOCATION_WAIT_S = 30.0


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def discover(http: httpx.Client, gw: RunningGateway, version: str) -> dict[str, Any]:
    """Steps 1-3 of every MCP client: 401, PRM (path-inserted, then root), both AS metadata documents."""
    first = mcp_post(http, gw.url, initialize_message(0, "probe", version), token=None)
    assert first.response.status_code == 401, first.response.text
    challenge = www_authenticate_params(first.response.headers["www-authenticate"])
    assert challenge["resource_metadata"] == f"{gw.base}/.well-known/oauth-protected-resource/mcp", challenge
    assert challenge.get("scope") == "mcp", challenge

    prm = http.get(challenge["resource_metadata"])
    assert prm.status_code == 200 and prm.headers["content-type"].startswith("application/json")
    prm_doc = prm.json()
    assert prm_doc["resource"] == gw.url, prm_doc
    assert prm_doc["authorization_servers"] == [gw.base], prm_doc
    assert "offline_access" not in prm_doc.get("scopes_supported", []), prm_doc
    root = http.get(f"{gw.base}/.well-known/oauth-protected-resource")
    assert root.status_code == 200, root.text
    assert root.json()["authorization_servers"] == [gw.base], root.text

    issuer = prm_doc["authorization_servers"][0]
    documents = []
    for well_known in ("oauth-authorization-server", "openid-configuration"):
        response = http.get(f"{issuer}/.well-known/{well_known}")
        assert response.status_code == 200, (well_known, response.text)
        documents.append(response.json())
    for doc in documents:
        assert doc["issuer"] == issuer
        assert doc["code_challenge_methods_supported"] == ["S256"]
        assert "none" in doc["token_endpoint_auth_methods_supported"]
        assert doc["authorization_response_iss_parameter_supported"] is True
        assert doc["registration_endpoint"] == f"{issuer}/register"
    metadata: dict[str, Any] = documents[0]
    return metadata


def register(http: httpx.Client, metadata: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(metadata["registration_endpoint"], json=body)
    assert response.status_code == 201, response.text
    client: dict[str, Any] = response.json()
    assert client["client_id"] and client["redirect_uris"] == body["redirect_uris"], client
    return client


def authorize(
    http: httpx.Client,
    metadata: dict[str, Any],
    client_id: str,
    redirect_uri: str,
    resource: str,
    state: str,
    scope: str | None,
) -> tuple[dict[str, str], Pkce]:
    """The browser part: /authorize, then sign-in and consent as needed; the captured redirect."""
    pkce = Pkce.new()
    url = authorize_url(
        metadata["issuer"],
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "scope": scope,
            "code_challenge": pkce.challenge,
            "code_challenge_method": "S256",
            "resource": resource,
        },
    )
    assert url.startswith(metadata["authorization_endpoint"] + "?")
    done = sign_in(http, url, username="alice")
    assert done.location.startswith(redirect_uri + "?"), done.location
    params = done.params
    assert params.get("state") == state and params.get("iss") == metadata["issuer"], params
    assert "error" not in params and params.get("code"), params
    return params, pkce


def call_tools(
    http: httpx.Client,
    gw: RunningGateway,
    token: str,
    version: str,
    tool: str,
    arguments: dict[str, Any],
    *,
    sessionless: bool = False,
) -> str:
    """initialize + tools/list + tools/call with the bearer; the tool's text."""
    init = mcp_post(http, gw.url, initialize_message(1, "replay", version), token=token)
    assert init.result["protocolVersion"] == version, init.result
    session = None if sessionless else init.response.headers["mcp-session-id"]
    if not sessionless:
        sent = mcp_post(http, gw.url, INITIALIZED, token=token, session=session, version=version)
        assert sent.response.status_code == 202, sent.response.text
    listed = mcp_post(
        http, gw.url, request_message(2, "tools/list"), token=token, session=session, version=version
    )
    assert tool in {t["name"] for t in listed.result["tools"]}, listed.result
    called = mcp_post(
        http,
        gw.url,
        request_message(3, "tools/call", {"name": tool, "arguments": arguments}),
        token=token,
        session=session,
        version=version,
    )
    assert not called.result.get("isError"), called.result
    return text_of(called.result)


# --- Claude.ai ----------------------------------------------------------------------------------


def test_claude_connector_flow(gateway: GatewayFactory, tmp_path: Path, http: httpx.Client) -> None:
    add_user(tmp_path / "data", "alice")
    gw = gateway("expose", "--auth", "--", *NOTES_SERVER, env={"MCP_BASTION_REDIRECT_PRESETS": "claude"})
    http.headers["User-Agent"] = "Claude-User"
    version = "2025-06-18"
    metadata = discover(http, gw, version)

    # Claude's observed registration: a confidential web client named "Claude" (client_secret_post).
    claude_registration = {
        "client_name": "Claude",
        "redirect_uris": [CLAUDE_CALLBACK],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_post",
    }
    client = register(http, metadata, claude_registration)
    client_id, secret = client["client_id"], client.get("client_secret")
    assert secret and client["token_endpoint_auth_method"] == "client_secret_post", client

    params, pkce = authorize(http, metadata, client_id, CLAUDE_CALLBACK, gw.url, "claude-state-1", "mcp")
    exchange = {
        "grant_type": "authorization_code",
        "code": params["code"],
        "redirect_uri": CLAUDE_CALLBACK,
        "code_verifier": pkce.verifier,
        "resource": gw.url,
    }
    tokens = token_json(
        token_request(http, gw.base, exchange, client_id=client_id, secret=secret, auth="post")
    )
    assert tokens.get("refresh_token"), tokens
    assert call_tools(http, gw, tokens["access_token"], version, "echo", {"text": "hi Claude"}) == "hi Claude"

    refreshed = token_json(
        token_request(
            http,
            gw.base,
            {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "resource": gw.url},
            client_id=client_id,
            secret=secret,
            auth="post",
        )
    )
    assert refreshed["refresh_token"] != tokens["refresh_token"]
    assert call_tools(http, gw, refreshed["access_token"], version, "echo", {"text": "again"}) == "again"

    # The operator removes the registration: the next refresh is a 401 invalid_client, Claude's signal
    # to register again; then the whole flow works with the new client.
    bastion_cli(["clients", "remove", client_id], tmp_path / "data")
    gone = token_request(
        http,
        gw.base,
        {"grant_type": "refresh_token", "refresh_token": refreshed["refresh_token"], "resource": gw.url},
        client_id=client_id,
        secret=secret,
        auth="post",
    )
    assert gone.status_code == 401, gone.text
    assert gone.json()["error"] == "invalid_client", gone.text

    again = register(http, metadata, claude_registration)
    assert again["client_id"] != client_id
    params, pkce = authorize(
        http, metadata, again["client_id"], CLAUDE_CALLBACK, gw.url, "claude-state-2", "mcp"
    )
    tokens = token_json(
        token_request(
            http,
            gw.base,
            {**exchange, "code": params["code"], "code_verifier": pkce.verifier},
            client_id=again["client_id"],
            secret=again["client_secret"],
            auth="post",
        )
    )
    assert call_tools(http, gw, tokens["access_token"], version, "echo", {"text": "back"}) == "back"


# --- ChatGPT ------------------------------------------------------------------------------------


def test_chatgpt_connector_flow(gateway: GatewayFactory, tmp_path: Path, http: httpx.Client) -> None:
    add_user(tmp_path / "data", "alice")
    gw = gateway(
        "expose",
        "--auth",
        "--",
        *everything_server_stdio_cmd(),
        env={"MCP_BASTION_REDIRECT_PRESETS": "chatgpt", "MCP_BASTION_ALLOW_SESSIONLESS": "true"},
    )
    http.headers["User-Agent"] = "openai-mcp/1.0.0"
    version = "2025-06-18"
    metadata = discover(http, gw, version)
    prm = http.get(f"{gw.base}/.well-known/oauth-protected-resource/mcp").json()

    client = register(
        http,
        metadata,
        {
            "client_name": "ChatGPT",
            "redirect_uris": [CHATGPT_CALLBACK],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        },
    )
    client_id = client["client_id"]
    assert "client_secret" not in client, client

    # First connection: the scopes the PRM lists, resource=<issuer>/mcp, state oauth_s_...
    scope = " ".join(prm["scopes_supported"])
    params, pkce = authorize(http, metadata, client_id, CHATGPT_CALLBACK, gw.url, "oauth_s_first0001", scope)
    exchange = {
        "grant_type": "authorization_code",
        "code": params["code"],
        "redirect_uri": CHATGPT_CALLBACK,
        "code_verifier": pkce.verifier,
        "resource": gw.url,
    }
    tokens = token_json(token_request(http, gw.base, exchange, client_id=client_id))
    simple = "This is a simple text response"
    assert simple in call_tools(http, gw, tokens["access_token"], version, "test_simple_text", {})

    # ChatGPT's habit: one initialize, then calls without Mcp-Session-Id (allow_sessionless).
    assert simple in call_tools(
        http, gw, tokens["access_token"], version, "test_simple_text", {}, sessionless=True
    )

    refreshed = token_json(
        token_request(
            http,
            gw.base,
            {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "resource": gw.url},
            client_id=client_id,
        )
    )
    assert simple in call_tools(http, gw, refreshed["access_token"], version, "test_simple_text", {})

    # Disconnect and connect again: /authorize without scope must work (it means the whole gateway).
    params, pkce = authorize(http, metadata, client_id, CHATGPT_CALLBACK, gw.url, "oauth_s_second0002", None)
    tokens = token_json(
        token_request(
            http,
            gw.base,
            {**exchange, "code": params["code"], "code_verifier": pkce.verifier},
            client_id=client_id,
        )
    )
    assert "mcp" in tokens.get("scope", "mcp").split(), tokens
    assert simple in call_tools(
        http, gw, tokens["access_token"], version, "test_simple_text", {}, sessionless=True
    )


# --- Either of them with a Client ID Metadata Document ------------------------------------------


@pytest.mark.parametrize(
    ("name", "callback", "preset"),
    [("Claude", CLAUDE_CALLBACK, "claude"), ("ChatGPT", CHATGPT_CALLBACK, "chatgpt")],
    ids=["claude", "chatgpt"],
)
def test_cimd_connector_flow(
    gateway: GatewayFactory, tmp_path: Path, http: httpx.Client, name: str, callback: str, preset: str
) -> None:
    """Both clients may identify themselves by a metadata document URL instead of registering: the
    gateway fetches it (HTTPS, trusted through ca_bundle; loopback allowed by fetch_allowed_hosts)."""
    add_user(tmp_path / "data", "alice")
    ca = LocalCA(tmp_path / "ca")
    fetched: list[str] = []

    async def document(request: Request) -> JSONResponse:
        fetched.append(request.headers.get("accept", ""))
        return JSONResponse(
            {
                "client_id": str(request.url),
                "client_name": name,
                "redirect_uris": [callback],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
            }
        )

    with TlsServer(Starlette(routes=[Route("/oauth/mcp-client-metadata", document)]), ca).running() as docs:
        client_id = f"{docs.base_url()}/oauth/mcp-client-metadata"
        gw = gateway(
            "expose",
            "--auth",
            "--",
            *NOTES_SERVER,
            env={
                "MCP_BASTION_REDIRECT_PRESETS": preset,
                "MCP_BASTION_CA_BUNDLE": str(ca.pem_path),
                "MCP_BASTION_FETCH_ALLOWED_HOSTS": "127.0.0.1",
            },
        )
        version = "2025-06-18"
        metadata = discover(http, gw, version)
        assert metadata["client_id_metadata_document_supported"] is True
        params, pkce = authorize(http, metadata, client_id, callback, gw.url, f"{preset}-cimd-state", None)
        tokens = token_json(
            token_request(
                http,
                gw.base,
                {
                    "grant_type": "authorization_code",
                    "code": params["code"],
                    "redirect_uri": callback,
                    "code_verifier": pkce.verifier,
                    "resource": gw.url,
                },
                client_id=client_id,
            )
        )
        refreshed = token_json(
            token_request(
                http,
                gw.base,
                {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "resource": gw.url},
                client_id=client_id,
            )
        )
    assert fetched, "the gateway never fetched the metadata document"
    assert call_tools(http, gw, refreshed["access_token"], version, "echo", {"text": name}) == name


# --- API keys: OpenAI Responses API and Anthropic Messages API connectors -------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_api_key_with_sdk_client(gateway: GatewayFactory, tmp_path: Path, mode: str) -> None:
    """The SDK client with a static ``Authorization: Bearer <key>``, in both protocol eras."""
    key = create_api_key(tmp_path / "data", "sdk-key")
    gw = gateway("expose", "--auth", "--", *NOTES_SERVER)
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http,
        Client(streamable_http_client(gw.url, http_client=http), mode=mode) as client,
    ):
        expected = "2026-07-28" if mode == "auto" else "2025-11-25"
        assert client.protocol_version == expected
        result = await client.call_tool("echo", {"text": f"key in {mode}"})
        assert "".join(c.text for c in result.content if isinstance(c, TextContent)) == f"key in {mode}"


@pytest.mark.parametrize("connector", ["openai-responses", "anthropic-messages"])
def test_api_key_as_hosted_connectors_send_it(
    gateway: GatewayFactory, tmp_path: Path, http: httpx.Client, connector: str
) -> None:
    """What the hosted connectors put on the wire: ``Authorization: Bearer <key>`` on every request
    (Responses ``authorization`` / ``headers``, Messages ``authorization_token``). Revocation ends it."""
    data = tmp_path / "data"
    key = create_api_key(data, connector)
    gw = gateway("expose", "--auth", "--", *NOTES_SERVER)
    http.headers["User-Agent"] = {
        "openai-responses": "openai-mcp/1.0.0",
        "anthropic-messages": "Claude-User",
    }[connector]
    version = "2025-06-18"
    assert call_tools(http, gw, key, version, "echo", {"text": connector}) == connector

    wrong = mcp_post(http, gw.url, initialize_message(1, connector, version), token=key[:-2] + "xx")
    assert wrong.response.status_code == 401, wrong.response.text
    assert "resource_metadata=" in wrong.response.headers["www-authenticate"]

    bastion_cli(["keys", "revoke", connector], data)
    deadline = time.monotonic() + KEY_REVOCATION_WAIT_S  # the gateway caches a good key for a few seconds
    while True:
        status = mcp_post(
            http, gw.url, initialize_message(1, connector, version), token=key
        ).response.status_code
        if status == 401:
            break
        assert status == 200, status
        assert time.monotonic() < deadline, f"a revoked key still worked after {KEY_REVOCATION_WAIT_S} s"
        time.sleep(0.25)

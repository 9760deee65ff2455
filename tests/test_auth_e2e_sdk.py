"""The official MCP Python SDK's ``OAuthClientProvider`` signs in to the gateway and calls a tool.

Once per way a client gets a client id: Dynamic Client Registration, a Client ID Metadata Document
(served over real HTTPS from 127.0.0.1, trusted by the gateway through ``ca_bundle``), and a client
pre-registered with ``mcp-bastion clients add`` (public and confidential). The person at the browser
is played by the provider's redirect handler, which answers the gateway's real sign-in and consent
pages. Each run then lets the short-lived access token expire and calls again: the SDK refreshes
(the gateway rotates the refresh token) without a second sign-in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from pydantic import AnyUrl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import NOTES_SERVER, GatewayFactory, RunningGateway
from tests.support.external import free_port
from tests.support.signin import SignIn, add_user, register_client, sign_in
from tests.support.tls_server import LocalCA, TlsServer

ACCESS_TOKEN_SECONDS = 5
EXPIRY_WAIT_S = 60.0
CLIENT_NAME = "SDK e2e client"


class MemoryStorage:
    """The SDK's TokenStorage, in memory; counts what the provider stores."""

    def __init__(self, client_info: OAuthClientInformationFull | None = None) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info = client_info
        self.token_writes: list[OAuthToken] = []

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens
        self.token_writes.append(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


class Person:
    """The user at the browser: signs in and approves at whatever URL the client opens."""

    def __init__(self, issuer: str, redirect_uri: str) -> None:
        self.issuer = issuer
        self.redirect_uri = redirect_uri
        self.browser = httpx.Client()  # keeps the gateway's cookies, like a browser
        self.visits: list[str] = []
        self.results: list[SignIn] = []

    async def redirect_handler(self, url: str) -> None:
        assert url.startswith(f"{self.issuer}/authorize?"), url
        self.visits.append(url)
        self.results.append(await asyncio.to_thread(sign_in, self.browser, url, username="alice"))

    async def callback_handler(self) -> AuthorizationCodeResult:
        done = self.results[-1]
        assert done.location.startswith(self.redirect_uri + "?"), done.location
        params = done.params
        assert "error" not in params, done.location
        return AuthorizationCodeResult(code=params["code"], state=params.get("state"), iss=params.get("iss"))

    def close(self) -> None:
        self.browser.close()


def _metadata(redirect_uri: str, **extra: Any) -> OAuthClientMetadata:
    return OAuthClientMetadata(
        client_name=CLIENT_NAME,
        redirect_uris=[AnyUrl(redirect_uri)],
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        **extra,
    )


@asynccontextmanager
async def sdk_client(gw: RunningGateway, provider: OAuthClientProvider, mode: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(auth=provider, timeout=httpx2.Timeout(30.0, read=60.0)) as http,
        Client(streamable_http_client(gw.url, http_client=http), mode=mode) as client,
    ):
        yield client


def _text(result: Any) -> str:
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def _wait_until_expired(provider: OAuthClientProvider) -> None:
    """Until the SDK counts its access token as expired (it then refreshes before the next request).

    The gateway itself accepts its tokens for a little clock-skew leeway past ``exp``; the client's
    view is what makes it refresh.
    """
    deadline = time.monotonic() + EXPIRY_WAIT_S
    while True:
        expiry = provider.context.token_expiry_time
        assert expiry is not None, "the token response had no expires_in"
        if time.time() > expiry:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the access token did not expire within {EXPIRY_WAIT_S} s")
        await asyncio.sleep(min(0.25, max(0.01, expiry - time.time())))


async def _sign_in_call_refresh(
    gw: RunningGateway, provider: OAuthClientProvider, storage: MemoryStorage, person: Person, mode: str
) -> None:
    async with sdk_client(gw, provider, mode) as client:
        assert _text(await client.call_tool("echo", {"text": "first"})) == "first"
    assert len(person.visits) == 1, person.visits
    consent = person.results[0].consent
    assert CLIENT_NAME in consent.text and "mcp" in consent.text, consent.text
    first = storage.tokens
    assert first is not None and first.refresh_token, first
    assert first.expires_in is not None and first.expires_in <= ACCESS_TOKEN_SECONDS, first.expires_in
    writes = len(storage.token_writes)

    await _wait_until_expired(provider)

    async with sdk_client(gw, provider, mode) as client:
        assert _text(await client.call_tool("echo", {"text": "after refresh"})) == "after refresh"
    assert len(person.visits) == 1, f"signed in again instead of refreshing: {person.visits}"
    second = storage.tokens
    assert second is not None and len(storage.token_writes) > writes, storage.token_writes
    assert second.access_token != first.access_token
    assert second.refresh_token and second.refresh_token != first.refresh_token  # rotated


def _start(gateway: GatewayFactory, env: dict[str, str] | None = None) -> RunningGateway:
    return gateway(
        "expose",
        "--auth",
        "--",
        *NOTES_SERVER,
        env={"MCP_BASTION_ACCESS_TOKEN_SECONDS": str(ACCESS_TOKEN_SECONDS), **(env or {})},
    )


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_sdk_dynamic_client_registration(gateway: GatewayFactory, tmp_path: Path, mode: str) -> None:
    add_user(tmp_path / "data", "alice")
    gw = _start(gateway)
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
    storage = MemoryStorage()
    person = Person(gw.base, redirect_uri)
    provider = OAuthClientProvider(
        server_url=gw.url,
        client_metadata=_metadata(redirect_uri, token_endpoint_auth_method="none"),
        storage=storage,
        redirect_handler=person.redirect_handler,
        callback_handler=person.callback_handler,
    )
    try:
        await _sign_in_call_refresh(gw, provider, storage, person, mode)
    finally:
        person.close()
    info = storage.client_info
    assert info is not None and info.client_id and info.client_secret is None, info
    assert info.issuer == gw.base, info  # the SDK bound the registration to our issuer
    assert '"client_registered"' in gw.logs()
    listed = person.results[0].consent
    assert "registered itself" in listed.text or "not verified" in listed.text, listed.text


async def test_sdk_client_id_metadata_document(gateway: GatewayFactory, tmp_path: Path) -> None:
    add_user(tmp_path / "data", "alice")
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
    ca = LocalCA(tmp_path / "ca")
    served: list[str] = []

    async def document(request: Request) -> JSONResponse:
        served.append(request.url.path)
        return JSONResponse(
            {
                "client_id": str(request.url),
                "client_name": CLIENT_NAME,
                "redirect_uris": [redirect_uri],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
                "application_type": "native",
            },
            headers={"Cache-Control": "max-age=300"},
        )

    app = Starlette(routes=[Route("/oauth/client.json", document)])
    with TlsServer(app, ca).running() as docs:
        client_id = f"{docs.base_url()}/oauth/client.json"
        gw = _start(
            gateway,
            {
                "MCP_BASTION_CA_BUNDLE": str(ca.pem_path),
                "MCP_BASTION_FETCH_ALLOWED_HOSTS": "127.0.0.1",
            },
        )
        storage = MemoryStorage()
        person = Person(gw.base, redirect_uri)
        provider = OAuthClientProvider(
            server_url=gw.url,
            client_metadata=_metadata(redirect_uri, token_endpoint_auth_method="none"),
            storage=storage,
            redirect_handler=person.redirect_handler,
            callback_handler=person.callback_handler,
            client_metadata_url=client_id,
        )
        try:
            await _sign_in_call_refresh(gw, provider, storage, person, "auto")
        finally:
            person.close()
    assert storage.client_info is not None and storage.client_info.client_id == client_id
    assert served, "the gateway never fetched the client metadata document"
    consent = person.results[0].consent
    assert client_id in consent.text, consent.text  # a CIMD client is named by its URL too


@pytest.mark.parametrize("confidential", [False, True], ids=["public", "confidential"])
async def test_sdk_pre_registered_client(gateway: GatewayFactory, tmp_path: Path, confidential: bool) -> None:
    data = tmp_path / "data"
    add_user(data, "alice")
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
    client_id, secret = register_client(data, CLIENT_NAME, redirect_uri, confidential=confidential)
    gw = _start(gateway)
    info = OAuthClientInformationFull(
        client_id=client_id,
        client_secret=secret,
        redirect_uris=[AnyUrl(redirect_uri)],
        token_endpoint_auth_method="client_secret_basic" if confidential else "none",
        grant_types=["authorization_code", "refresh_token"],
    )
    storage = MemoryStorage(info)
    person = Person(gw.base, redirect_uri)
    provider = OAuthClientProvider(
        server_url=gw.url,
        client_metadata=_metadata(
            redirect_uri, token_endpoint_auth_method="client_secret_basic" if confidential else "none"
        ),
        storage=storage,
        redirect_handler=person.redirect_handler,
        callback_handler=person.callback_handler,
    )
    try:
        await _sign_in_call_refresh(gw, provider, storage, person, "legacy" if confidential else "auto")
    finally:
        person.close()
    assert storage.client_info is info  # no registration happened
    assert '"client_registered"' not in gw.logs()
    consent = person.results[0].consent
    assert "set up by your operator" in consent.text, consent.text

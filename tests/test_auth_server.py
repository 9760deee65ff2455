"""The embedded authorization server, driven over real loopback sockets through its real HTML forms.

Each test runs the auth app with uvicorn on 127.0.0.1 (a free port) on a SQLite store in tmp_path and
talks to it with httpx, the way a browser and an OAuth client would: discovery, sign-in and consent
pages (the forms are parsed, not guessed), the token endpoint, registration, revocation, delegated
sign-in to an upstream OpenID provider (a second instance of this same server), and the attacks the
issue lists, each refused with the right error.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import orjson
import pytest
import uvicorn
from hypothesis import given
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import KeySet
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mcp_bastion.auth.server import (
    AuthorizationServer,
    build_auth_app,
    canonical_resource,
    is_loopback_redirect,
    redirect_uri_matches,
    redirect_uri_permitted,
    uri_pattern_matches,
)
from mcp_bastion.auth.store import ClientRecord, Store
from mcp_bastion.auth.tokens import KeyRing
from mcp_bastion.config import GatewaySettings
from tests.support import postgres
from tests.support.tls_server import LocalCA, TlsServer

PASSWORD = "correct horse battery staple"
NATIVE_REDIRECT = "http://127.0.0.1:33418/callback"


# ---- HTML forms --------------------------------------------------------------------------------------


@dataclass
class Form:
    action: str
    method: str
    fields: dict[str, str] = field(default_factory=dict)
    buttons: list[tuple[str, str]] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)
    inputs_with_id: set[str] = field(default_factory=set)


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self.lang: str | None = None
        self.h1: list[str] = []
        self._in_h1 = False
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "html":
            self.lang = a.get("lang")
        elif tag == "script":
            self.scripts += 1
        elif tag == "h1":
            self._in_h1 = True
        elif tag == "form":
            self.forms.append(Form(a.get("action", ""), a.get("method", "get").lower()))
        elif tag == "input" and self.forms:
            if a.get("name"):
                self.forms[-1].fields[a["name"]] = a.get("value", "")
            if a.get("id"):
                self.forms[-1].inputs_with_id.add(a["id"])
        elif tag == "label" and self.forms and a.get("for"):
            self.forms[-1].labels.add(a["for"])
        elif tag == "button" and self.forms and a.get("name"):
            self.forms[-1].buttons.append((a["name"], a.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "h1":
            self._in_h1 = False

    def handle_data(self, data: str) -> None:
        if self._in_h1:
            self.h1.append(data)


def only_form(html: str) -> Form:
    """The page's one form; also checks the page is plain accessible HTML (lang, h1, labels, no JS)."""
    parser = _Forms()
    parser.feed(html)
    assert parser.lang == "en"
    assert "".join(parser.h1).strip()
    assert parser.scripts == 0
    assert len(parser.forms) == 1, html
    form = parser.forms[0]
    visible = form.inputs_with_id
    assert visible <= form.labels, "every visible field has a label"
    return form


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query, keep_blank_values=True).items()}


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


# ---- a running authorization server ------------------------------------------------------------------


@dataclass
class AS:
    settings: GatewaySettings
    store: Store
    keyring: KeyRing
    base: str
    http: httpx.AsyncClient

    @property
    def mcp(self) -> str:
        return f"{self.base}/mcp"

    def browser(self) -> httpx.AsyncClient:
        """Another browser: its own cookie jar."""
        return httpx.AsyncClient(follow_redirects=False, timeout=30)


@contextlib.asynccontextmanager
async def serve(app: Any, sock: socket.socket) -> AsyncIterator[None]:
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, name: str = "as", *, database_url: str | None = None, **overrides: Any
) -> AsyncIterator[AS]:
    sock = free_socket()
    port = sock.getsockname()[1]
    settings = replace(GatewaySettings(host="127.0.0.1", port=port, auth="on"), **overrides).validated()
    store = await Store.open(database_url or f"sqlite+aiosqlite:///{tmp_path / (name + '.db')}")
    keyring = KeyRing.for_settings(settings, store)
    await keyring.load()
    base = f"http://127.0.0.1:{port}"
    resources = {
        f"{base}/mcp": {"mcp"},
        f"{base}/sse": {"mcp"},
        f"{base}/servers/notes/mcp": {"mcp", "mcp:notes"},
        f"{base}/servers/notes/sse": {"mcp", "mcp:notes"},
    }
    app = build_auth_app(settings, store, keyring, resources)
    try:
        async with serve(app, sock), httpx.AsyncClient(follow_redirects=False, timeout=30) as http:
            yield AS(settings, store, keyring, base, http)
    finally:
        await store.close()


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[AS]:
    async with running(tmp_path, redirect_presets=("claude",)) as a:
        await a.store.add_user("alice", PASSWORD)
        await a.store.add_client(
            ClientRecord(
                client_id="static-app",
                name="Static App",
                redirect_uris=[NATIVE_REDIRECT],
                kind="static",
                application_type="native",
            )
        )
        yield a


@dataclass
class Started:
    """An authorization request as a client starts it."""

    verifier: str
    challenge: str
    state: str
    params: dict[str, str]


def start(
    client_id: str = "static-app", redirect_uri: str | None = NATIVE_REDIRECT, **params: str | None
) -> Started:
    verifier, challenge = pkce()
    state = secrets.token_urlsafe(16)
    query: dict[str, str | None] = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": state,
    }
    query.update(params)
    return Started(verifier, challenge, state, {k: v for k, v in query.items() if v is not None})


async def sign_in(
    a: AS, http: httpx.AsyncClient, req: Started, *, approve: bool = True, seen: list[str] | None = None
) -> httpx.Response:
    """Walk the real pages: /authorize, the sign-in form, the consent form. Returns the final redirect
    (and the pages' HTML in ``seen``)."""
    seen = [] if seen is None else seen
    page = await http.get(f"{a.base}/authorize", params=req.params)
    if page.status_code == 303:  # this browser is signed in and has consented to this client
        return page
    assert page.status_code == 200, page.text
    form = only_form(page.text)
    assert form.method == "post" and form.action == f"{a.base}/authorize/login"
    assert {"username", "password"} <= form.labels
    form.fields.update(username="alice", password=PASSWORD)
    after_login = await http.post(form.action, data=form.fields)
    assert after_login.status_code == 303, after_login.text
    page = await http.get(after_login.headers["location"])
    assert page.status_code == 200, page.text
    seen.append(page.text)
    form = only_form(page.text)
    assert form.action == f"{a.base}/authorize/consent"
    assert ("decision", "approve") in form.buttons and ("decision", "deny") in form.buttons
    form.fields["decision"] = "approve" if approve else "deny"
    done = await http.post(form.action, data=form.fields)
    assert done.status_code == 303, done.text
    return done


async def exchange(
    a: AS, code: str, req: Started, client_id: str = "static-app", **extra: str
) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": req.params.get("redirect_uri", ""),
        "code_verifier": req.verifier,
        "client_id": client_id,
        **extra,
    }
    return await a.http.post(f"{a.base}/token", data={k: v for k, v in form.items() if v})


async def tokens_for(a: AS, req: Started | None = None, **params: str) -> tuple[Started, dict[str, Any]]:
    req = req or start(resource=f"{a.base}/mcp", **params)
    done = await sign_in(a, a.http, req)
    code = query_of(done.headers["location"])["code"]
    response = await exchange(a, code, req)
    assert response.status_code == 200, response.text
    return req, response.json()


def assert_oauth_error(response: httpx.Response, error: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert response.headers["cache-control"] == "no-store"


def assert_error_page(response: httpx.Response, status: int = 400) -> None:
    """Refused without redirecting anywhere: an HTML page, no Location."""
    assert response.status_code == status, response.text
    assert "location" not in response.headers
    assert response.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


# ---- discovery ---------------------------------------------------------------------------------------


async def test_discovery_documents(auth: AS) -> None:
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        r = await auth.http.get(auth.base + path)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "*"
        doc = r.json()
        assert doc["issuer"] == auth.base
        assert doc["authorization_endpoint"] == f"{auth.base}/authorize"
        assert doc["token_endpoint"] == f"{auth.base}/token"
        assert doc["registration_endpoint"] == f"{auth.base}/register"
        assert doc["revocation_endpoint"] == f"{auth.base}/revoke"
        assert doc["jwks_uri"] == f"{auth.base}/jwks.json"
        assert doc["response_types_supported"] == ["code"]
        assert doc["grant_types_supported"] == ["authorization_code", "refresh_token"]
        assert doc["code_challenge_methods_supported"] == ["S256"]
        assert set(doc["token_endpoint_auth_methods_supported"]) == {
            "none",
            "client_secret_basic",
            "client_secret_post",
        }
        assert (
            doc["revocation_endpoint_auth_methods_supported"] == doc["token_endpoint_auth_methods_supported"]
        )
        assert doc["client_id_metadata_document_supported"] is True
        assert doc["authorization_response_iss_parameter_supported"] is True
        assert doc["subject_types_supported"] == ["public"]
        assert doc["id_token_signing_alg_values_supported"] == ["ES256"]
        assert {"mcp", "mcp:notes", "openid", "offline_access"} <= set(doc["scopes_supported"])
    jwks = (await auth.http.get(f"{auth.base}/jwks.json")).json()
    assert [k["kty"] for k in jwks["keys"]] == ["EC"]
    assert "d" not in jwks["keys"][0]
    preflight = await auth.http.options(
        f"{auth.base}/token",
        headers={"Origin": "http://localhost:6274", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"


async def test_no_registration_endpoint_when_dcr_is_off(tmp_path: Path) -> None:
    async with running(tmp_path, dynamic_registration=False, client_metadata_documents=False) as a:
        doc = (await a.http.get(f"{a.base}/.well-known/oauth-authorization-server")).json()
        assert "registration_endpoint" not in doc
        assert doc["client_id_metadata_document_supported"] is False
        r = await a.http.post(f"{a.base}/register", json={"redirect_uris": [NATIVE_REDIRECT]})
        assert r.status_code in (404, 405)


# ---- the code flow through the real pages -------------------------------------------------------------


async def test_full_code_flow_through_login_and_consent(auth: AS) -> None:
    req = start(resource=f"{auth.base}/mcp", scope="mcp openid profile", nonce="n-0S6_WzA2Mj")
    page = await auth.http.get(f"{auth.base}/authorize", params=req.params)
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "no-referrer"
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "form-action 'self' http://127.0.0.1:33418" in csp
    assert "Static App" in page.text
    assert "mcpb-csrf" in page.cookies  # plain name on an http loopback issuer

    form = only_form(page.text)
    form.fields.update(username="alice", password="wrong")
    wrong = await auth.http.post(form.action, data=form.fields)
    assert wrong.status_code == 400 and "not right" in wrong.text
    assert "mcpb-session" not in auth.http.cookies

    done = await sign_in(auth, auth.http, req)
    location = done.headers["location"]
    assert location.startswith(NATIVE_REDIRECT + "?")
    params = query_of(location)
    assert params["state"] == req.state
    assert params["iss"] == auth.base
    token = await exchange(auth, params["code"], req)
    assert token.status_code == 200, token.text
    assert token.headers["cache-control"] == "no-store"
    body = token.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == auth.settings.access_token_seconds
    assert body["scope"] == "mcp openid profile"
    assert body["refresh_token"]
    claims = await auth.keyring.verify_access_token(body["access_token"], {f"{auth.base}/mcp"})
    assert claims is not None
    assert claims["sub"] == "user:alice" and claims["name"] == "alice"
    assert claims["aud"] == f"{auth.base}/mcp" and claims["client_id"] == "static-app"
    assert (
        await auth.keyring.verify_access_token(body["access_token"], {f"{auth.base}/servers/notes/mcp"})
        is None
    )

    # the id token: signed with the published keys, for the client, with the nonce
    keys = KeySet.import_key_set((await auth.http.get(f"{auth.base}/jwks.json")).json())
    id_token = jwt.decode(body["id_token"], keys, algorithms=["ES256"]).claims
    assert id_token["iss"] == auth.base and id_token["aud"] == "static-app"
    assert id_token["sub"] == "user:alice" and id_token["nonce"] == "n-0S6_WzA2Mj"
    assert id_token["name"] == "alice" and "auth_time" in id_token

    # signed in and consented: the next authorization goes straight back with a code
    again = start(resource=f"{auth.base}/mcp", scope="mcp")
    r = await auth.http.get(f"{auth.base}/authorize", params=again.params)
    assert r.status_code == 303
    second = query_of(r.headers["location"])
    assert second["iss"] == auth.base and second["state"] == again.state
    assert (await exchange(auth, second["code"], again)).status_code == 200


async def test_native_loopback_redirect_matches_on_any_port(auth: AS) -> None:
    other_port = "http://127.0.0.1:51234/callback"
    req = start(redirect_uri=other_port)
    done = await sign_in(auth, auth.http, req)
    assert done.headers["location"].startswith(other_port + "?")
    code = query_of(done.headers["location"])["code"]
    assert (await exchange(auth, code, req)).status_code == 200


async def test_authorize_without_scope_or_resource_grants_the_whole_gateway(auth: AS) -> None:
    req = start()  # as ChatGPT on reconnect: no scope
    done = await sign_in(auth, auth.http, req)
    body = (await exchange(auth, query_of(done.headers["location"])["code"], req)).json()
    assert body["scope"] == "mcp"
    claims = await auth.keyring.verify_access_token(body["access_token"], {auth.base})
    assert claims is not None and claims["aud"] == auth.base


async def test_authorize_by_post(auth: AS) -> None:
    req = start()
    page = await auth.http.post(f"{auth.base}/authorize", data=req.params)
    assert page.status_code == 200
    assert only_form(page.text).action == f"{auth.base}/authorize/login"


async def test_consent_denied_redirects_access_denied_with_iss(auth: AS) -> None:
    req = start()
    done = await sign_in(auth, auth.http, req, approve=False)
    params = query_of(done.headers["location"])
    assert params["error"] == "access_denied"
    assert params["iss"] == auth.base and params["state"] == req.state
    assert "code" not in params


async def test_prompt_none_without_a_session(auth: AS) -> None:
    req = start(prompt="none")
    r = await auth.http.get(f"{auth.base}/authorize", params=req.params)
    assert r.status_code == 303
    params = query_of(r.headers["location"])
    assert params["error"] == "login_required" and params["iss"] == auth.base


async def test_code_flow_refresh_and_replay_on_postgresql(tmp_path: Path) -> None:
    """The same grant lifecycle on the real PostgreSQL (several gateway processes share one)."""
    async with postgres.database() as url, running(tmp_path, database_url=url) as a:
        await a.store.add_user("alice", PASSWORD)
        await a.store.add_client(
            ClientRecord("static-app", "Static App", [NATIVE_REDIRECT], application_type="native")
        )
        req = start(resource=a.mcp, scope="mcp openid")
        done = await sign_in(a, a.http, req)
        code = query_of(done.headers["location"])["code"]
        first = await exchange(a, code, req)
        assert first.status_code == 200, first.text
        tokens = first.json()
        rotated = await refresh(a, tokens["refresh_token"])
        assert rotated.status_code == 200, rotated.text
        assert_oauth_error(await refresh(a, tokens["refresh_token"]), "invalid_grant")
        assert await a.keyring.verify_access_token(rotated.json()["access_token"], {a.mcp}) is None
        assert_oauth_error(await exchange(a, code, req), "invalid_grant")


# ---- refresh tokens -----------------------------------------------------------------------------------


async def refresh(a: AS, token: str, client_id: str = "static-app", **extra: str) -> httpx.Response:
    data = {"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id, **extra}
    return await a.http.post(f"{a.base}/token", data=data)


async def test_refresh_rotation_and_reuse_detection(auth: AS) -> None:
    _req, first = await tokens_for(auth)
    second = await refresh(auth, first["refresh_token"])
    assert second.status_code == 200, second.text
    rotated = second.json()
    assert rotated["refresh_token"] != first["refresh_token"]
    assert rotated["scope"] == first["scope"]
    assert await auth.keyring.verify_access_token(rotated["access_token"], {auth.mcp}) is not None

    # the spent token again: reuse, so the whole grant is revoked
    assert_oauth_error(await refresh(auth, first["refresh_token"]), "invalid_grant")
    assert_oauth_error(await refresh(auth, rotated["refresh_token"]), "invalid_grant")
    assert await auth.keyring.verify_access_token(rotated["access_token"], {auth.mcp}) is None
    assert await auth.keyring.verify_access_token(first["access_token"], {auth.mcp}) is None


async def test_refresh_cannot_widen_scope_or_change_resource(auth: AS) -> None:
    _req, first = await tokens_for(auth)
    assert_oauth_error(await refresh(auth, first["refresh_token"], scope="mcp openid"), "invalid_scope")
    _req, other = await tokens_for(auth)
    r = await refresh(auth, other["refresh_token"], resource=f"{auth.base}/servers/notes/mcp")
    assert_oauth_error(r, "invalid_target")


async def test_refresh_by_another_client_is_refused(auth: AS) -> None:
    await auth.store.add_client(
        ClientRecord("other-app", "Other", [NATIVE_REDIRECT], application_type="native")
    )
    _req, first = await tokens_for(auth)
    assert_oauth_error(await refresh(auth, first["refresh_token"], client_id="other-app"), "invalid_grant")


# ---- client authentication and registration -------------------------------------------------------


async def test_unknown_client_at_token_is_401_invalid_client(auth: AS) -> None:
    r = await auth.http.post(
        f"{auth.base}/token",
        data={
            "grant_type": "authorization_code",
            "code": "x",
            "client_id": "gone",
            "code_verifier": "v" * 43,
        },
    )
    assert_oauth_error(r, "invalid_client", 401)
    r = await auth.http.post(
        f"{auth.base}/token",
        data={"grant_type": "refresh_token", "refresh_token": "x"},
        auth=("gone", "secret"),
    )
    assert_oauth_error(r, "invalid_client", 401)
    assert r.headers["www-authenticate"].startswith("Basic")


async def test_token_endpoint_errors_are_rfc6749_json(auth: AS) -> None:
    r = await auth.http.post(f"{auth.base}/token", json={"grant_type": "authorization_code"})
    assert_oauth_error(r, "invalid_request")
    r = await auth.http.post(f"{auth.base}/token", data={"grant_type": "password", "client_id": "static-app"})
    assert_oauth_error(r, "unsupported_grant_type")
    r = await auth.http.post(
        f"{auth.base}/token",
        content="grant_type=refresh_token&grant_type=refresh_token&client_id=static-app",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert_oauth_error(r, "invalid_request")


async def test_dcr_native_public_client(auth: AS) -> None:
    r = await auth.http.post(
        f"{auth.base}/register",
        json={
            "client_name": "Claude Code",
            "redirect_uris": ["http://localhost:8765/callback"],
            "application_type": "native",
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
        },
    )
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    reg = r.json()
    assert "client_secret" not in reg
    assert reg["application_type"] == "native" and reg["token_endpoint_auth_method"] == "none"
    stored = await auth.store.get_client(reg["client_id"])
    assert stored is not None and stored.kind == "dcr" and stored.secret_hash is None

    req = start(reg["client_id"], "http://localhost:9999/callback", resource=f"{auth.base}/mcp")
    done = await sign_in(auth, auth.http, req)
    code = query_of(done.headers["location"])["code"]
    body = (await exchange(auth, code, req, client_id=reg["client_id"])).json()
    assert body["refresh_token"]
    page = await auth.http.get(
        f"{auth.base}/authorize", params=start(reg["client_id"], "http://localhost:1/x").params
    )
    assert_error_page(page)  # another path is another redirect URI


async def test_dcr_web_confidential_client_with_preset(auth: AS) -> None:
    claude = "https://claude.ai/api/mcp/auth_callback"
    r = await auth.http.post(
        f"{auth.base}/register",
        json={
            "client_name": "Claude",
            "redirect_uris": [claude],
            "grant_types": ["authorization_code", "refresh_token"],
        },
    )
    assert r.status_code == 201, r.text
    reg = r.json()
    assert reg["application_type"] == "web"
    assert reg["token_endpoint_auth_method"] == "client_secret_basic"  # the RFC 7591 default
    secret = reg["client_secret"]

    req = start(reg["client_id"], claude, resource=f"{auth.base}/mcp")
    pages: list[str] = []
    done = await sign_in(auth, auth.http, req, seen=pages)
    assert "claude.ai" in pages[0] and "not verified" in pages[0]
    location = done.headers["location"]
    assert location.startswith(claude + "?")
    code = query_of(location)["code"]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": claude,
        "code_verifier": req.verifier,
    }
    no_secret = await auth.http.post(f"{auth.base}/token", data={**form, "client_id": reg["client_id"]})
    assert_oauth_error(no_secret, "invalid_client", 401)
    bad = await auth.http.post(f"{auth.base}/token", data=form, auth=(reg["client_id"], "wrong"))
    assert_oauth_error(bad, "invalid_client", 401)
    # the failed attempts spent nothing: the code was never consumed by an unauthenticated client
    ok = await auth.http.post(f"{auth.base}/token", data=form, auth=(reg["client_id"], secret))
    assert ok.status_code == 200, ok.text
    both = await auth.http.post(
        f"{auth.base}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": ok.json()["refresh_token"],
            "client_secret": secret,
        },
        auth=(reg["client_id"], secret),
    )
    assert_oauth_error(both, "invalid_request")
    post = await auth.http.post(
        f"{auth.base}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": ok.json()["refresh_token"],
            "client_id": reg["client_id"],
            "client_secret": secret,
        },
    )
    assert post.status_code == 200, post.text


@pytest.mark.parametrize(
    ("metadata", "error"),
    [
        ({"redirect_uris": ["https://evil.example/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": [NATIVE_REDIRECT], "application_type": "web"}, "invalid_redirect_uri"),
        (
            {"redirect_uris": ["https://claude.ai/other"], "application_type": "native"},
            "invalid_redirect_uri",
        ),
        ({"redirect_uris": ["http://192.168.1.5/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["javascript:alert(1)"], "application_type": "native"}, "invalid_redirect_uri"),
        ({"redirect_uris": ["http://127.0.0.1:1/cb#frag"]}, "invalid_redirect_uri"),
        ({"redirect_uris": []}, "invalid_redirect_uri"),
        ({}, "invalid_redirect_uri"),
        ({"redirect_uris": [NATIVE_REDIRECT], "application_type": "desktop"}, "invalid_client_metadata"),
        (
            {"redirect_uris": [NATIVE_REDIRECT], "token_endpoint_auth_method": "private_key_jwt"},
            "invalid_client_metadata",
        ),
        (
            {"redirect_uris": [NATIVE_REDIRECT], "grant_types": ["client_credentials"]},
            "invalid_client_metadata",
        ),
        ({"redirect_uris": [NATIVE_REDIRECT], "response_types": ["token"]}, "invalid_client_metadata"),
        ({"redirect_uris": [NATIVE_REDIRECT], "client_name": "\x1b[31mred"}, "invalid_client_metadata"),
    ],
)
async def test_dcr_refusals(auth: AS, metadata: dict[str, Any], error: str) -> None:
    r = await auth.http.post(f"{auth.base}/register", json=metadata)
    assert_oauth_error(r, error)


async def test_dcr_needs_json(auth: AS) -> None:
    r = await auth.http.post(
        f"{auth.base}/register", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_oauth_error(r, "invalid_client_metadata")
    r = await auth.http.post(f"{auth.base}/register", data={"redirect_uris": NATIVE_REDIRECT})
    assert_oauth_error(r, "invalid_client_metadata")


# ---- revocation ----------------------------------------------------------------------------------------


async def test_revoking_a_refresh_token_revokes_the_grant(auth: AS) -> None:
    _req, body = await tokens_for(auth)
    r = await auth.http.post(
        f"{auth.base}/revoke", data={"token": body["refresh_token"], "client_id": "static-app"}
    )
    assert r.status_code == 200
    assert_oauth_error(await refresh(auth, body["refresh_token"]), "invalid_grant")
    assert await auth.keyring.verify_access_token(body["access_token"], {auth.mcp}) is None


async def test_revoking_an_access_token(auth: AS) -> None:
    _req, body = await tokens_for(auth)
    r = await auth.http.post(
        f"{auth.base}/revoke",
        data={"token": body["access_token"], "token_type_hint": "access_token", "client_id": "static-app"},
    )
    assert r.status_code == 200
    assert await auth.keyring.verify_access_token(body["access_token"], {auth.mcp}) is None
    assert (await refresh(auth, body["refresh_token"])).status_code == 200  # the grant lives on
    unknown = await auth.http.post(
        f"{auth.base}/revoke", data={"token": "nonsense", "client_id": "static-app"}
    )
    assert unknown.status_code == 200
    anonymous = await auth.http.post(f"{auth.base}/revoke", data={"token": "nonsense"})
    assert_oauth_error(anonymous, "invalid_client", 401)


async def test_another_client_cannot_revoke(auth: AS) -> None:
    await auth.store.add_client(
        ClientRecord("other-app", "Other", [NATIVE_REDIRECT], application_type="native")
    )
    _req, body = await tokens_for(auth)
    for token in (body["refresh_token"], body["access_token"]):
        r = await auth.http.post(f"{auth.base}/revoke", data={"token": token, "client_id": "other-app"})
        assert r.status_code == 200
    assert await auth.keyring.verify_access_token(body["access_token"], {auth.mcp}) is not None
    assert (await refresh(auth, body["refresh_token"])).status_code == 200


# ---- attacks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "https://evil.example/callback",  # unregistered
        "http://127.0.0.1:33418/callback/../evil",  # altered path
        "http://127.0.0.1:33418/callback?next=https://evil.example",  # altered query
        "http://127.0.0.1:33418/Callback",
        "http://localhost:33418/callback",  # another loopback host is another URI
        "http://127.0.0.1:33418@evil.example/callback",  # userinfo trick
        "https://127.0.0.1:33418/callback",
        "javascript:alert(document.domain)//",
        "//evil.example/callback",
        "",
    ],
)
async def test_unregistered_or_altered_redirect_uri_gets_an_error_page(auth: AS, redirect_uri: str) -> None:
    r = await auth.http.get(f"{auth.base}/authorize", params=start(redirect_uri=redirect_uri).params)
    assert_error_page(r)
    assert "evil" not in r.headers.get("location", "")


@pytest.mark.parametrize(
    "params",
    [
        {"client_id": None},
        {"client_id": "no-such-client"},
        {"client_id": "https://127.0.0.1:1/not-a-cimd-host.json"},
    ],
)
async def test_errors_before_the_client_is_known_are_never_redirected(
    auth: AS, params: dict[str, Any]
) -> None:
    query = start(**{k: v for k, v in params.items() if k != "client_id"}).params
    if params["client_id"] is None:
        del query["client_id"]
    else:
        query["client_id"] = params["client_id"]
    assert_error_page(await auth.http.get(f"{auth.base}/authorize", params=query))


async def test_duplicate_client_or_redirect_parameters_get_an_error_page(auth: AS) -> None:
    query = urlencode([*start().params.items(), ("redirect_uri", "https://evil.example/cb")])
    assert_error_page(await auth.http.get(f"{auth.base}/authorize?{query}"))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge": "short"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"resource": "https://elsewhere.example/mcp"}, "invalid_target"),
        ({"scope": "mcp admin"}, "invalid_scope"),
        ({"scope": "mcp:nope"}, "invalid_scope"),
        ({"request_uri": "urn:x"}, "request_uri_not_supported"),
    ],
)
async def test_bad_requests_redirect_with_error_state_and_iss(
    auth: AS, change: dict[str, str | None], error: str
) -> None:
    req = start(**change)
    r = await auth.http.get(f"{auth.base}/authorize", params=req.params)
    assert r.status_code == 303, r.text
    location = r.headers["location"]
    assert location.startswith(NATIVE_REDIRECT + "?")
    params = query_of(location)
    assert params["error"] == error
    assert params["state"] == req.state
    assert params["iss"] == auth.base
    assert "code" not in params


async def test_scope_for_another_server_than_the_resource(auth: AS) -> None:
    await auth.store.add_consent("user:alice", "static-app", "mcp")
    req = start(resource=f"{auth.base}/mcp", scope="mcp:notes")
    r = await auth.http.get(f"{auth.base}/authorize", params=req.params)
    assert query_of(r.headers["location"])["error"] == "invalid_scope"
    req = start(resource=f"{auth.base}/servers/notes/mcp", scope="mcp:notes")
    done = await sign_in(auth, auth.http, req)
    body = (await exchange(auth, query_of(done.headers["location"])["code"], req)).json()
    assert body["scope"] == "mcp:notes"


async def test_wrong_or_missing_verifier(auth: AS) -> None:
    req = start()
    done = await sign_in(auth, auth.http, req)
    code = query_of(done.headers["location"])["code"]
    wrong = replace(req, verifier=pkce()[0])
    assert_oauth_error(await exchange(auth, code, wrong), "invalid_grant")
    # the code was spent by the failed attempt
    assert_oauth_error(await exchange(auth, code, req), "invalid_grant")

    req = start()
    done = await sign_in(auth, auth.http, req)
    code = query_of(done.headers["location"])["code"]
    assert_oauth_error(await exchange(auth, code, replace(req, verifier="")), "invalid_request")


async def test_code_replay_revokes_what_the_code_issued(auth: AS) -> None:
    req = start()
    done = await sign_in(auth, auth.http, req)
    code = query_of(done.headers["location"])["code"]
    first = await exchange(auth, code, req)
    assert first.status_code == 200
    tokens = first.json()
    assert await auth.keyring.verify_access_token(tokens["access_token"], {auth.base}) is not None
    assert_oauth_error(await exchange(auth, code, req), "invalid_grant")
    assert await auth.keyring.verify_access_token(tokens["access_token"], {auth.base}) is None
    assert_oauth_error(await refresh(auth, tokens["refresh_token"]), "invalid_grant")


async def test_code_bound_to_client_redirect_and_resource(auth: AS) -> None:
    await auth.store.add_client(
        ClientRecord("other-app", "Other", [NATIVE_REDIRECT], application_type="native")
    )
    for attempt, error in (
        ({"client_id": "other-app"}, "invalid_grant"),
        ({"redirect_uri": "http://127.0.0.1:33418/other"}, "invalid_grant"),
        ({"resource": f"{auth.base}/servers/notes/mcp"}, "invalid_target"),
        ({"resource": "https://elsewhere.example/mcp"}, "invalid_target"),
    ):
        req = start(resource=f"{auth.base}/mcp")
        done = await sign_in(auth, auth.http, req)
        code = query_of(done.headers["location"])["code"]
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": NATIVE_REDIRECT,
            "code_verifier": req.verifier,
            "client_id": "static-app",
            **attempt,
        }
        assert_oauth_error(await auth.http.post(f"{auth.base}/token", data=form), error)


async def test_token_resource_may_be_repeated_canonically(auth: AS) -> None:
    req = start(resource=f"{auth.base}/mcp")
    done = await sign_in(auth, auth.http, req)
    code = query_of(done.headers["location"])["code"]
    r = await exchange(auth, code, req, resource=f"{auth.base}/mcp/")
    assert r.status_code == 200, r.text


async def test_tampered_transaction_id(auth: AS) -> None:
    req = start()
    page = await auth.http.get(f"{auth.base}/authorize", params=req.params)
    form = only_form(page.text)
    form.fields.update(username="alice", password=PASSWORD, tx=form.fields["tx"] + "x")
    assert_error_page(await auth.http.post(form.action, data=form.fields), 403)
    assert_error_page(await auth.http.get(f"{auth.base}/authorize/continue", params={"tx": "forged"}))


async def test_consent_without_csrf_token_or_cookie(auth: AS) -> None:
    req = start()
    page = await auth.http.get(f"{auth.base}/authorize", params=req.params)
    login = only_form(page.text)
    login.fields.update(username="alice", password=PASSWORD)
    after = await auth.http.post(login.action, data=login.fields)
    consent = only_form((await auth.http.get(after.headers["location"])).text)
    fields = {**consent.fields, "decision": "approve"}

    no_token = {k: v for k, v in fields.items() if k != "csrf"}
    assert_error_page(await auth.http.post(consent.action, data=no_token), 403)
    assert_error_page(await auth.http.post(consent.action, data={**fields, "csrf": "A" * 43}), 403)
    # the same form posted from a browser that lacks the CSRF cookie (a cross-site forgery)
    async with auth.browser() as attacker:
        assert_error_page(await attacker.post(consent.action, data=fields), 403)
    # and the real one still works: the refusals did not spend the transaction
    done = await auth.http.post(consent.action, data=fields)
    assert done.status_code == 303 and "code" in query_of(done.headers["location"])
    replay = await auth.http.post(consent.action, data=fields)
    assert_error_page(replay)


async def test_login_without_csrf(auth: AS) -> None:
    req = start()
    page = await auth.http.get(f"{auth.base}/authorize", params=req.params)
    form = only_form(page.text)
    async with auth.browser() as attacker:
        r = await attacker.post(form.action, data={**form.fields, "username": "alice", "password": PASSWORD})
        assert_error_page(r, 403)


async def test_consent_is_per_client(auth: AS) -> None:
    await tokens_for(auth)
    await auth.store.add_client(
        ClientRecord("second-app", "Second App", [NATIVE_REDIRECT], application_type="native")
    )
    r = await auth.http.get(f"{auth.base}/authorize", params=start("second-app").params)
    assert r.status_code == 200  # signed in, but this client has no consent yet: the consent page
    assert "Second App" in r.text and only_form(r.text).action.endswith("/authorize/consent")


async def test_security_headers_on_every_answer(auth: AS) -> None:
    for response in (
        await auth.http.get(f"{auth.base}/authorize"),
        await auth.http.post(f"{auth.base}/token", data={}),
        await auth.http.get(f"{auth.base}/.well-known/oauth-authorization-server"),
    ):
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


async def test_host_prefixed_secure_cookies_on_an_https_issuer(tmp_path: Path) -> None:
    settings = GatewaySettings(public_url="https://gateway.example", auth="on")
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'https.db'}")
    try:
        keyring = KeyRing.for_settings(settings, store)
        await keyring.load()
        await store.add_client(ClientRecord("app", "App", [NATIVE_REDIRECT], application_type="native"))
        app = build_auth_app(settings, store, keyring, ["https://gateway.example/mcp"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://gateway.example") as http:
            page = await http.get("/authorize", params=start("app").params)
            cookie = page.headers["set-cookie"]
            assert cookie.startswith("__Host-mcpb-csrf=")
            assert "Secure" in cookie and "HttpOnly" in cookie and "Path=/" in cookie
            assert "samesite=lax" in cookie.lower() and "domain" not in cookie.lower()
            assert only_form(page.text).action == "https://gateway.example/authorize/login"
    finally:
        await store.close()


# ---- delegated sign-in (an upstream OpenID provider: another instance of this server) -------------


async def test_delegated_sign_in_consent_first_and_single_use_state(tmp_path: Path) -> None:
    async with running(tmp_path, "upstream") as upstream:
        await upstream.store.add_user("bob", PASSWORD)
        sock = free_socket()
        port = sock.getsockname()[1]
        gateway_base = f"http://127.0.0.1:{port}"
        await upstream.store.add_client(
            ClientRecord(
                "gateway",
                "The gateway",
                [f"{gateway_base}/oauth/callback"],
                secret_hash=hashlib.sha256(b"s3cret").hexdigest(),
                token_endpoint_auth_method="client_secret_basic",
            )
        )
        settings = GatewaySettings(
            host="127.0.0.1",
            port=port,
            auth="on",
            oidc_issuer=upstream.base,
            oidc_client_id="gateway",
            oidc_client_secret="s3cret",
        ).validated()
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
        try:
            keyring = KeyRing.for_settings(settings, store)
            await keyring.load()
            await store.add_client(
                ClientRecord("app", "Delegating App", [NATIVE_REDIRECT], application_type="native")
            )
            app = build_auth_app(settings, store, keyring, [f"{gateway_base}/mcp"])
            async with serve(app, sock), httpx.AsyncClient(follow_redirects=False, timeout=30) as browser:
                await _delegated_flow(browser, gateway_base, upstream, keyring)
        finally:
            await store.close()


async def _delegated_flow(browser: httpx.AsyncClient, base: str, upstream: AS, keyring: KeyRing) -> None:
    req = start("app", resource=f"{base}/mcp")
    # consent comes first, naming the client and its redirect host, before anything goes upstream
    page = await browser.get(f"{base}/authorize", params=req.params)
    assert page.status_code == 200
    assert "Delegating App" in page.text and "127.0.0.1" in page.text
    assert (
        f"form-action 'self' http://127.0.0.1:33418 {upstream.base}"
        in page.headers["content-security-policy"]
    )
    consent = only_form(page.text)
    assert consent.action == f"{base}/authorize/consent"
    assert "username" not in consent.fields  # no local sign-in form
    to_upstream = await browser.post(consent.action, data={**consent.fields, "decision": "approve"})
    assert to_upstream.status_code == 303
    upstream_url = to_upstream.headers["location"]
    assert upstream_url.startswith(f"{upstream.base}/authorize?")
    state = query_of(upstream_url)["state"]

    # sign in at the upstream provider with its own pages
    login = await browser.get(upstream_url)
    form = only_form(login.text)
    form.fields.update(username="bob", password=PASSWORD)
    after = await browser.post(form.action, data=form.fields)
    upstream_consent = only_form((await browser.get(after.headers["location"])).text)
    back = await browser.post(
        upstream_consent.action, data={**upstream_consent.fields, "decision": "approve"}
    )
    callback = back.headers["location"]
    assert callback.startswith(f"{base}/oauth/callback?")
    cb = query_of(callback)
    assert cb["iss"] == upstream.base

    # a tampered state is refused, without a redirect
    tampered = callback.replace(f"state={state}", f"state={state[:-2]}xx")
    assert_error_page(await browser.get(tampered))
    # the same answer in another browser (login CSRF) is refused
    async with httpx.AsyncClient(follow_redirects=False) as other:
        assert_error_page(await other.get(callback), 403)

    done = await browser.get(callback)
    assert done.status_code == 303, done.text
    params = query_of(done.headers["location"])
    assert params["state"] == req.state and params["iss"] == base
    # the state was single use
    assert_error_page(await browser.get(callback))

    token = await browser.post(
        f"{base}/token",
        data={
            "grant_type": "authorization_code",
            "code": params["code"],
            "redirect_uri": NATIVE_REDIRECT,
            "code_verifier": req.verifier,
            "client_id": "app",
        },
    )
    assert token.status_code == 200, token.text
    claims = await keyring.verify_access_token(token.json()["access_token"], {f"{base}/mcp"})
    assert claims is not None and claims["sub"] == "oidc:user:bob"

    # consent is remembered for this client in this browser: the next sign-in goes straight upstream
    again = await browser.get(f"{base}/authorize", params=start("app").params)
    assert again.status_code == 303
    assert again.headers["location"].startswith(NATIVE_REDIRECT + "?")
    assert "code" in query_of(again.headers["location"])


# ---- client ID metadata documents -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> Iterator[LocalCA]:
    authority = LocalCA()
    yield authority
    authority.close()


async def test_cimd_client_through_the_pages(tmp_path: Path, ca: LocalCA) -> None:
    documents: dict[str, Any] = {}

    async def document(request: Request) -> Response:
        return Response(orjson.dumps(documents[request.url.path]), media_type="application/json")

    tls = TlsServer(Starlette(routes=[Route("/{path:path}", document)]), ca, names=("localhost",))
    client_id = f"https://localhost:{tls.port}/oauth/client.json"
    documents["/oauth/client.json"] = {
        "client_id": client_id,
        "client_name": "Metadata Client",
        "redirect_uris": [NATIVE_REDIRECT],
        "application_type": "native",
        "token_endpoint_auth_method": "none",
    }
    documents["/oauth/web.json"] = {
        "client_id": f"https://localhost:{tls.port}/oauth/web.json",
        "client_name": "Web Client",
        "redirect_uris": ["https://app.example/callback"],
    }
    with tls.running():
        async with running(tmp_path, fetch_allowed_hosts=("localhost",), ca_bundle=str(ca.pem_path)) as a:
            await a.store.add_user("alice", PASSWORD)
            req = start(client_id, resource=f"{a.base}/mcp")
            page = await a.http.get(f"{a.base}/authorize", params=req.params)
            assert page.status_code == 200, page.text
            done = await sign_in(a, a.http, req)
            consent_seen = (await a.store.get_client(client_id)) is not None
            assert consent_seen
            code = query_of(done.headers["location"])["code"]
            body = (await exchange(a, code, req, client_id=client_id)).json()
            assert (await refresh(a, body["refresh_token"], client_id=client_id)).status_code == 200
            # a web redirect URI the operator did not allow is refused, on a page
            web = start(f"https://localhost:{tls.port}/oauth/web.json", "https://app.example/callback")
            assert_error_page(await a.http.get(f"{a.base}/authorize", params=web.params))


# ---- keys and tokens ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).timestamp()

    def __call__(self) -> float:
        return self.now


async def test_key_rotation_keeps_recent_tokens_valid(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")
    try:
        clock = Clock()
        ring = KeyRing(store, 0.01, issuer="http://127.0.0.1:1", access_token_seconds=3600, clock=clock)
        await ring.load()
        aud = "http://127.0.0.1:1/mcp"
        old = ring.mint_access_token(
            subject="user:a", name="a", client_id="c", audience=aud, scope="mcp", family_id="f", ttl=3600
        )
        first_kid = ring.jwks()["keys"][0]["kid"]
        assert not await ring.maybe_rotate()
        clock.now += 0.01 * 86400 + 1
        assert await ring.maybe_rotate()
        kids = [k["kid"] for k in ring.jwks()["keys"]]
        assert len(kids) == 2 and kids[1] == first_kid  # newest first; the retired one still published
        assert await ring.verify_access_token(old, {aud}) is not None
        # a second process sharing the store signs with the new key and still accepts the old one
        other = KeyRing(store, 0.01, issuer="http://127.0.0.1:1", access_token_seconds=3600, clock=clock)
        await other.load()
        assert [k["kid"] for k in other.jwks()["keys"]] == kids
        assert await other.verify_access_token(old, {aud}) is not None
        new = other.mint_access_token(
            subject="user:a", name="a", client_id="c", audience=aud, scope="mcp", family_id="f", ttl=60
        )
        assert await ring.verify_access_token(new, {aud}) is not None
        # past a token lifetime after retirement, the old key is gone
        clock.now += 3600 + 600
        await other.load()
        assert first_kid not in [k["kid"] for k in other.jwks()["keys"]]
    finally:
        await store.close()


async def test_verify_refuses_bad_tokens(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'verify.db'}")
    try:
        clock = Clock()
        ring = KeyRing(store, 30, issuer="http://127.0.0.1:1", clock=clock)
        await ring.load()
        aud = "http://127.0.0.1:1/mcp"
        await store.add_refresh_token(
            family_id="f",
            client_id="c",
            subject="user:a",
            name="a",
            resource=aud,
            scope="mcp",
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        )

        def mint(**kw: Any) -> str:
            args: dict[str, Any] = dict(
                subject="user:a", name="a", client_id="c", audience=aud, scope="mcp", family_id="f", ttl=60
            )
            args.update(kw)
            return ring.mint_access_token(**args)

        good = mint()
        assert await ring.verify_access_token(good, {aud}) is not None
        head, body, sig = good.split(".")
        assert await ring.verify_access_token(f"{head}.{body}.{sig[:-4]}AAAA", {aud}) is None
        assert await ring.verify_access_token(f"{head}.{body[:-2]}xx.{sig}", {aud}) is None
        assert await ring.verify_access_token("not.a.jwt", {aud}) is None
        assert await ring.verify_access_token("", {aud}) is None
        assert await ring.verify_access_token(good, {"http://127.0.0.1:1/other"}) is None
        id_token = ring.mint_id_token(subject="user:a", client_id=aud, auth_time=0, ttl=60)
        assert await ring.verify_access_token(id_token, {aud}) is None  # typ at+jwt only
        other_issuer = KeyRing(store, 30, issuer="http://127.0.0.1:2", clock=clock)
        await other_issuer.load()
        foreign = other_issuer.mint_access_token(
            subject="user:a", name="a", client_id="c", audience=aud, scope="mcp", family_id="f", ttl=60
        )
        assert await ring.verify_access_token(foreign, {aud}) is None
        short = mint(ttl=5)
        clock.now += 5 + 31  # past exp and the leeway
        assert await ring.verify_access_token(short, {aud}) is None
        assert await ring.verify_access_token(good, {aud}) is not None  # cached, still valid
        await ring.revoke_family("f")
        assert await ring.verify_access_token(good, {aud}) is None
    finally:
        await store.close()


# ---- property tests for the parsers -----------------------------------------------------------------

_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~", min_size=1, max_size=12)
_hosts = st.sampled_from(["127.0.0.1", "localhost", "[::1]"])
_ports = st.integers(min_value=1, max_value=65535)


@given(_hosts, _ports, _ports, st.lists(_segment, max_size=3))
def test_native_loopback_matches_any_port(host: str, p1: int, p2: int, path: list[str]) -> None:
    a = f"http://{host}:{p1}/" + "/".join(path)
    b = f"http://{host}:{p2}/" + "/".join(path)
    assert redirect_uri_matches(a, b, native=True)
    assert redirect_uri_matches(a, b, native=False) == (a == b)


@given(_hosts, _ports, st.lists(_segment, min_size=1, max_size=3), _segment)
def test_loopback_path_host_and_query_changes_never_match(
    host: str, port: int, path: list[str], extra: str
) -> None:
    a = f"http://{host}:{port}/" + "/".join(path)
    for b in (a + "/" + extra, a + "?" + extra, a.replace(host, "127.0.0.2"), a.replace("http:", "https:")):
        assert not redirect_uri_matches(a, b, native=True)


@given(st.text(max_size=60), st.text(max_size=60))
def test_non_loopback_redirects_match_only_exactly(a: str, b: str) -> None:
    assert redirect_uri_matches(a, a, native=True)
    if a != b and not (is_loopback_redirect(a) and is_loopback_redirect(b)):
        assert not redirect_uri_matches(a, b, native=True)


@given(_segment)
def test_pattern_id_matches_one_segment(segment: str) -> None:
    pattern = "https://chatgpt.com/connector/oauth/{id}"
    expected = segment not in (".", "..")
    assert uri_pattern_matches(pattern, f"https://chatgpt.com/connector/oauth/{segment}") == expected


@given(_segment, st.sampled_from(["/", "?", "#", "%2F", "@", "/../x"]), _segment)
def test_pattern_id_never_spans_segments(a: str, sep: str, b: str) -> None:
    pattern = "https://chatgpt.com/connector/oauth/{id}"
    assert not uri_pattern_matches(pattern, f"https://chatgpt.com/connector/oauth/{a}{sep}{b}")
    assert not uri_pattern_matches(pattern, f"https://chatgpt.com.evil.example/connector/oauth/{a}")
    assert not uri_pattern_matches(pattern, f"https://evil.example/connector/oauth/{a}")


def test_presets_and_allowlist() -> None:
    settings = GatewaySettings(
        redirect_presets=("chatgpt",), allowed_redirect_uris=("https://app.example/cb",)
    )
    assert (
        redirect_uri_permitted("https://chatgpt.com/connector_platform_oauth_redirect", "web", settings)
        is None
    )
    assert redirect_uri_permitted("https://chatgpt.com/connector/oauth/abc123", "web", settings) is None
    assert redirect_uri_permitted("https://app.example/cb", "web", settings) is None
    assert redirect_uri_permitted("https://app.example/cb2", "web", settings)
    assert redirect_uri_permitted("https://claude.ai/api/mcp/auth_callback", "web", settings)
    assert redirect_uri_permitted("http://127.0.0.1:5/cb", "native", settings) is None
    assert redirect_uri_permitted("com.example.app:/oauth", "native", settings) is None
    assert redirect_uri_permitted("http://127.0.0.1:5/cb", "web", settings)
    assert redirect_uri_permitted("javascript:alert(1)", "native", settings)


@given(st.text(max_size=80))
def test_canonical_resource_is_idempotent(value: str) -> None:
    canon = canonical_resource(value)
    if canon is not None:
        assert canonical_resource(canon) == canon
        assert not canon.endswith("/") and "#" not in canon


def test_canonical_resource_examples() -> None:
    assert canonical_resource("HTTPS://Gateway.Example/mcp/") == "https://gateway.example/mcp"
    assert canonical_resource("https://gateway.example") == "https://gateway.example"
    assert canonical_resource("https://gateway.example/mcp#x") is None
    assert canonical_resource("ftp://gateway.example/mcp") is None
    assert canonical_resource("https://user@gateway.example/mcp") is None


async def test_auth_codes_expire(auth: AS) -> None:
    """A code past its lifetime is refused (the store's clock, no waiting: issued already expired)."""
    req = start()
    code = await auth.store.add_code(
        client_id="static-app",
        redirect_uri=NATIVE_REDIRECT,
        code_challenge=req.challenge,
        resource=auth.base,
        scope="mcp",
        subject="user:alice",
        name="alice",
        expires_at=datetime.now(UTC) - timedelta(seconds=1),
    )
    assert_oauth_error(await exchange(auth, code, req), "invalid_grant")


async def test_removed_user_loses_the_session(auth: AS) -> None:
    await tokens_for(auth)
    r = await auth.http.get(f"{auth.base}/authorize", params=start().params)
    assert r.status_code == 303  # signed in and consented
    await auth.store.set_user_disabled("alice", True)
    r = await auth.http.get(f"{auth.base}/authorize", params=start().params)
    assert r.status_code == 200 and only_form(r.text).action.endswith("/authorize/login")


async def test_resource_compared_canonically_and_issued_as_the_gateway_spells_it(tmp_path: Path) -> None:
    settings = GatewaySettings(public_url="https://Gateway.Example/", auth="on")
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'canon.db'}")
    try:
        keyring = KeyRing.for_settings(settings, store)
        await keyring.load()
        srv = AuthorizationServer(settings, store, keyring, ["https://Gateway.Example/servers/notes/mcp"])
        target = srv.resource("HTTPS://gateway.example/servers/notes/mcp/")
        assert target is not None and target.uri == "https://Gateway.Example/servers/notes/mcp"
        assert target.accepted == {"mcp", "mcp:notes"}
        whole = srv.resource("https://gateway.example")
        assert whole is not None and whole.uri == "https://Gateway.Example" and whole.accepted is None
        assert srv.resource("https://gateway.example/servers/other/mcp") is None
        assert "mcp:notes" in srv.metadata()["scopes_supported"]
    finally:
        await store.close()


def test_oidc_allowed_users() -> None:
    from mcp_bastion.auth.server import oidc_user_allowed

    assert oidc_user_allowed((), "s1", None)  # no list: everyone the provider signs in
    allowed = ("alice@example.com", "@corp.example", "sub:Xy-9")
    assert oidc_user_allowed(allowed, "s1", "Alice@Example.com")
    assert oidc_user_allowed(allowed, "s1", "bob@corp.example")
    assert oidc_user_allowed(allowed, "Xy-9", None)
    assert not oidc_user_allowed(allowed, "xy-9", None)  # subjects are case-sensitive
    assert not oidc_user_allowed(allowed, "s1", "bob@evilcorp.example")
    assert not oidc_user_allowed(allowed, "s1", "bob@sub.corp.example")
    assert not oidc_user_allowed(allowed, "s1", None)  # an unverified address arrives as None

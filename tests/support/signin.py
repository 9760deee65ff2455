"""Drive a real gateway's sign-in the way clients and people do: the admin CLI, the HTML pages, the
token endpoint and bearer-authenticated MCP requests.

Everything here talks to real processes over 127.0.0.1 sockets. The pages are read with the standard
library's HTML parser (the forms are plain HTML by design), so a change of markup that a browser
would still handle keeps working, and a page without the expected form fails with its text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urljoin, urlsplit

import httpx

BASTION = [sys.executable, "-m", "mcp_bastion"]
CLI_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 30.0
PASSWORD = "correct horse battery staple"
LEGACY_VERSION = "2025-11-25"


# --- the admin command line ---------------------------------------------------------------------


def bastion_cli(args: Sequence[str], data_dir: Path, *, stdin: str | None = None) -> str:
    """Run ``mcp-bastion ARGS --data-dir D``; its stdout, or an AssertionError with what it said."""
    argv = [*BASTION, *args, "--data-dir", str(data_dir)]
    try:
        done = subprocess.run(
            argv, input=stdin or "", capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(args)} did not finish in {CLI_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        raise AssertionError(
            f"mcp-bastion {' '.join(args)} exited {done.returncode}\n"
            f"stdout: {done.stdout}\nstderr: {done.stderr}"
        )
    return done.stdout


def register_client(
    data_dir: Path, name: str, redirect_uri: str, *, confidential: bool = False, auth_method: str = ""
) -> tuple[str, str | None]:
    """``clients add``: the client id, and the secret of a confidential client (one per line)."""
    args = ["clients", "add", name, "--redirect-uri", redirect_uri]
    if confidential:
        args.append("--confidential")
    if auth_method:
        args += ["--auth-method", auth_method]
    lines = bastion_cli(args, data_dir).splitlines()
    if confidential:
        assert len(lines) == 2, f"expected client id and secret on stdout, got {lines!r}"
        return lines[0], lines[1]
    assert len(lines) == 1, f"expected only the client id on stdout, got {lines!r}"
    return lines[0], None


def add_user(data_dir: Path, username: str, password: str = PASSWORD) -> None:
    bastion_cli(["users", "add", username, "--password-stdin"], data_dir, stdin=password + "\n")


def create_api_key(data_dir: Path, name: str, servers: Sequence[str] = ()) -> str:
    """``keys create``: the key is the only line on stdout."""
    args = ["keys", "create", "--name", name]
    if servers:
        args += ["--servers", ",".join(servers)]
    lines = bastion_cli(args, data_dir).splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcpb_"), f"expected one key line, got {lines!r}"
    return lines[0]


# --- PKCE and authorization requests ------------------------------------------------------------


@dataclass(frozen=True)
class Pkce:
    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        verifier = secrets.token_urlsafe(48)
        digest = hashlib.sha256(verifier.encode()).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).decode().rstrip("="))


def authorize_url(issuer: str, params: Mapping[str, str | None]) -> str:
    """``<issuer>/authorize?...`` without the parameters whose value is None."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{issuer}/authorize?{query}"


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def query_params(url: str) -> dict[str, str]:
    """The query of a redirect, each parameter exactly once (a repeated one is a protocol error)."""
    multi = parse_qs(urlsplit(url).query, keep_blank_values=True)
    repeated = [k for k, v in multi.items() if len(v) != 1]
    assert not repeated, f"parameters repeated in {url}: {repeated}"
    return {k: v[0] for k, v in multi.items()}


# --- the HTML pages -----------------------------------------------------------------------------


@dataclass
class HtmlForm:
    action: str
    method: str
    fields: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # name -> type
    buttons: list[tuple[str, str]] = field(default_factory=list)  # (name, value) of submit buttons


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[HtmlForm] = []
        self.text: list[str] = []
        self._skip = 0  # inside <style>, <script> or <title>: not page text

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "title") and self._skip:
            self._skip -= 1

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("style", "script", "title"):
            self._skip += 1
        elif tag == "form":
            self.forms.append(HtmlForm(a.get("action", ""), a.get("method", "get").lower()))
        elif tag == "input" and self.forms and a.get("name"):
            kind = a.get("type", "text").lower()
            form = self.forms[-1]
            if kind == "submit":
                form.buttons.append((a["name"], a.get("value", "")))
            else:
                form.inputs[a["name"]] = kind
                form.fields[a["name"]] = a.get("value", "")
        elif tag == "button" and self.forms and a.get("type", "submit").lower() == "submit":
            self.forms[-1].buttons.append((a.get("name", ""), a.get("value", "")))

    def handle_data(self, data: str) -> None:
        if data.strip() and not self._skip:
            self.text.append(data.strip())


@dataclass
class Page:
    url: str
    status: int
    html: str
    forms: list[HtmlForm]
    text: str
    headers: httpx.Headers


def parse_page(response: httpx.Response) -> Page:
    parser = _FormParser()
    parser.feed(response.text)
    return Page(
        str(response.url),
        response.status_code,
        response.text,
        parser.forms,
        " ".join(parser.text),
        response.headers,
    )


@dataclass
class SignIn:
    """Where the gateway finally sent the browser (the client's redirect URI), and the pages on the way."""

    location: str
    pages: list[Page]

    @property
    def params(self) -> dict[str, str]:
        return query_params(self.location)

    @property
    def consent(self) -> Page:
        """The consent page (the one whose form has an Allow button)."""
        for page in self.pages:
            if any(v == "approve" for form in page.forms for _, v in form.buttons):
                return page
        raise AssertionError(f"no consent page: {[p.text[:200] for p in self.pages]}")

    @property
    def login(self) -> Page:
        """The sign-in page (the one with a password field)."""
        for page in self.pages:
            if any("password" in form.inputs.values() for form in page.forms):
                return page
        raise AssertionError(f"no sign-in page: {[p.text[:200] for p in self.pages]}")


def sign_in(
    http: httpx.Client,
    url: str,
    *,
    username: str,
    password: str = PASSWORD,
    approve: bool = True,
    max_steps: int = 12,
) -> SignIn:
    """Open ``url`` (an authorization request) and answer the gateway's pages like a person would:
    the sign-in form with the credentials, the consent form with Allow (or Deny). Redirects within the
    gateway are followed; the first one that leaves it is returned, not followed.

    ``http`` keeps the cookies, as a browser does (a second sign-in in the same client may skip the
    sign-in page, or the consent page once consent was given).
    """
    home = origin(url)
    pages: list[Page] = []
    method, target, data = "GET", url, None
    for _ in range(max_steps):
        response = http.request(method, target, data=data, follow_redirects=False, timeout=HTTP_TIMEOUT_S)
        if response.is_redirect:
            location = urljoin(target, response.headers["location"])
            if origin(location) != home:
                return SignIn(location, pages)
            method, target, data = "GET", location, None
            continue
        page = parse_page(response)
        pages.append(page)
        if response.status_code != 200 or len(page.forms) != 1:
            raise AssertionError(
                f"{method} {target} -> {response.status_code}, {len(page.forms)} forms: {page.text[:1500]}"
            )
        form = page.forms[0]
        fields = dict(form.fields)
        if "password" in form.inputs.values():
            user_field = next(n for n, kind in form.inputs.items() if kind in ("text", "email"))
            pass_field = next(n for n, kind in form.inputs.items() if kind == "password")
            fields[user_field] = username
            fields[pass_field] = password
        else:
            wanted = "approve" if approve else "deny"
            button = next(((n, v) for n, v in form.buttons if v == wanted), None)
            if button is None:
                raise AssertionError(f"no {wanted!r} button on {target}: {form.buttons} {page.text[:800]}")
            fields[button[0]] = button[1]
        assert form.method == "post", f"the form on {target} is sent with {form.method}, not post"
        method, target, data = "POST", urljoin(target, form.action), fields
    raise AssertionError(f"sign-in did not leave the gateway after {max_steps} steps: {target}")


# --- the token endpoint -------------------------------------------------------------------------


def token_request(
    http: httpx.Client,
    issuer: str,
    form: Mapping[str, str | None],
    *,
    client_id: str,
    secret: str | None = None,
    auth: str = "basic",
) -> httpx.Response:
    """POST /token as a client does: a public client sends its id, a confidential one authenticates
    with HTTP Basic (``auth="basic"``) or in the body (``auth="post"``)."""
    data = {k: v for k, v in form.items() if v is not None}
    headers: dict[str, str] = {}
    if secret is None:
        data["client_id"] = client_id
    elif auth == "basic":
        pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    else:
        data["client_id"] = client_id
        data["client_secret"] = secret
    return http.post(f"{issuer}/token", data=data, headers=headers, timeout=HTTP_TIMEOUT_S)


def token_json(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"/token -> {response.status_code}: {response.text}"
    assert "no-store" in response.headers.get("cache-control", ""), response.headers
    body: dict[str, Any] = response.json()
    assert body.get("token_type", "").lower() == "bearer", body
    assert isinstance(body.get("access_token"), str), body
    return body


# --- MCP over HTTP, request by request ----------------------------------------------------------


@dataclass
class RpcReply:
    response: httpx.Response
    message: dict[str, Any] | None  # the JSON-RPC response to our request (None for a notification)

    @property
    def result(self) -> dict[str, Any]:
        assert self.message is not None and "result" in self.message, (
            f"{self.response.status_code} {self.response.headers.get('content-type')}: {self.response.text}"
        )
        result: dict[str, Any] = self.message["result"]
        return result


def _sse_messages(text: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    data: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            payload = "\n".join(data)
            data = []
            if payload.strip():
                messages.append(json.loads(payload))
    return messages


def mcp_post(
    http: httpx.Client,
    url: str,
    message: dict[str, Any],
    *,
    token: str | None,
    session: str | None = None,
    version: str | None = LEGACY_VERSION,
    headers: Mapping[str, str] | None = None,
) -> RpcReply:
    """POST one JSON-RPC message to a Streamable HTTP endpoint; the reply (JSON or an SSE stream)."""
    h = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if session is not None:
        h["Mcp-Session-Id"] = session
    if version is not None and message.get("method") != "initialize":
        h["MCP-Protocol-Version"] = version
    h.update(headers or {})
    response = http.post(url, json=message, headers=h, timeout=HTTP_TIMEOUT_S)
    if "id" not in message or response.status_code >= 300:
        return RpcReply(response, None)
    ctype = response.headers.get("content-type", "")
    candidates = _sse_messages(response.text) if ctype.startswith("text/event-stream") else [response.json()]
    found = next((m for m in candidates if m.get("id") == message["id"] and "method" not in m), None)
    return RpcReply(response, found)


def initialize_message(rid: int, client_name: str, version: str = LEGACY_VERSION) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": client_name, "version": "1.0.0"},
        },
    }


def request_message(rid: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def text_of(result: Mapping[str, Any]) -> str:
    return "".join(c.get("text", "") for c in result.get("content", []) if c.get("type") == "text")


def www_authenticate_params(header: str) -> dict[str, str]:
    """The auth-params of a ``Bearer`` challenge (quoted-string values unquoted)."""
    scheme, _, rest = header.strip().partition(" ")
    assert scheme.lower() == "bearer", header
    return {
        m.group(1).lower(): (
            m.group(2)[1:-1].replace('\\"', '"') if m.group(2).startswith('"') else m.group(2)
        )
        for m in re.finditer(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]+)', rest)
    }

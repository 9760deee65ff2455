"""A real browser signs in: headless Chromium (Debian's package, driven by Playwright through its
``executable_path``) walks the authorization-code flow through the gateway's sign-in and consent
pages to a loopback callback, with the gateway's CSP, cookies and redirects applied by the browser.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import sync_playwright

from tests.conftest import NOTES_SERVER, GatewayFactory
from tests.support.signin import (
    INITIALIZED,
    PASSWORD,
    Pkce,
    add_user,
    authorize_url,
    initialize_message,
    mcp_post,
    query_params,
    register_client,
    request_message,
    text_of,
    token_json,
    token_request,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_TIMEOUT_MS = 30_000


class _Callback(BaseHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = b"<!DOCTYPE html><title>Signed in</title><p>You can close this window.</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def loopback_callback() -> Iterator[tuple[int, list[str]]]:
    """A native app's redirect target: an HTTP server on 127.0.0.1 that records what it receives."""
    hits: list[str] = []
    handler = type("Callback", (_Callback,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_browser_signs_in_and_consents(gateway: GatewayFactory, tmp_path: Path) -> None:
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: run scripts/setup-test-tools.sh (as root)"
    data = tmp_path / "data"
    add_user(data, "alice")
    with loopback_callback() as (port, hits):
        redirect_uri = f"http://127.0.0.1:{port}/callback"
        client_id, _ = register_client(data, "Browser test app", redirect_uri)
        gw = gateway("expose", "--auth", "--", *NOTES_SERVER)
        issuer, resource = gw.base, f"{gw.base}/mcp"
        pkce = Pkce.new()
        url = authorize_url(
            issuer,
            {
                "response_type": "code",
                "client_id": client_id,
                "redirect_uri": redirect_uri,
                "state": "browser-state-1",
                "code_challenge": pkce.challenge,
                "code_challenge_method": "S256",
                "scope": "mcp",
                "resource": resource,
            },
        )
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                context = browser.new_context()
                page = context.new_page()
                page.set_default_timeout(PAGE_TIMEOUT_MS)
                blocked: list[str] = []
                page.on("console", lambda m: blocked.append(m.text) if "Content Security" in m.text else None)

                page.goto(url)
                assert page.get_by_role("heading", name="Sign in to mcp-bastion").is_visible()
                assert "Browser test app" in page.inner_text("main")
                page.get_by_label("User name").fill("alice")
                page.get_by_label("Password").fill(PASSWORD)
                page.get_by_role("button", name="Sign in").click()

                page.get_by_role("heading", name="Allow Browser test app?").wait_for()
                consent_text = page.inner_text("main")
                assert "127.0.0.1" in consent_text and "mcp" in consent_text, consent_text
                assert resource in consent_text, consent_text
                shot = tmp_path / "consent.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 1000

                page.get_by_role("button", name="Allow").click()
                page.wait_for_url(f"{redirect_uri}?**")
                landed = page.url
                assert "You can close this window" in page.inner_text("body")
                assert not blocked, blocked
                cookies = {c["name"] for c in context.cookies(issuer)}
            finally:
                browser.close()
        callbacks = [h for h in hits if h.startswith("/callback")]  # the browser also asks for a favicon
        assert len(callbacks) == 1 and landed.endswith(callbacks[0]), (landed, hits)

    params = query_params(landed)
    assert params["state"] == "browser-state-1" and params["iss"] == issuer, params
    assert cookies, "the gateway set no cookie in the browser"
    with httpx.Client() as http:
        tokens = token_json(
            token_request(
                http,
                issuer,
                {
                    "grant_type": "authorization_code",
                    "code": params["code"],
                    "redirect_uri": redirect_uri,
                    "code_verifier": pkce.verifier,
                    "resource": resource,
                },
                client_id=client_id,
            )
        )
        token = tokens["access_token"]
        init = mcp_post(http, gw.url, initialize_message(1, "browser-test"), token=token)
        session = init.response.headers["mcp-session-id"]
        assert init.result["serverInfo"]["name"] == "notes-server"
        mcp_post(http, gw.url, INITIALIZED, token=token, session=session)
        call = mcp_post(
            http,
            gw.url,
            request_message(2, "tools/call", {"name": "echo", "arguments": {"text": "from the browser"}}),
            token=token,
            session=session,
        )
        assert text_of(call.result) == "from the browser"

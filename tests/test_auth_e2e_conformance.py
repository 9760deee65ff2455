"""The MCP conformance suite's authorization-server scenarios against the gateway's embedded AS.

``conformance authorization`` checks the metadata, then prints an authorization URL and waits for a
person to sign in at it (its own loopback server receives the callback). The test is that person: it
reads the URL from the suite's output, signs in through the gateway's real sign-in and consent pages,
and lets the gateway's redirect reach the suite's callback, as a browser would. All checks must pass.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import NOTES_SERVER, GatewayFactory, RunningGateway
from tests.support.external import conformance_cmd, free_port, node22_env, stop_process, wait_for_port
from tests.support.signin import add_user, origin, register_client, sign_in

URL_WAIT_S = 90.0  # the metadata scenario runs first; then the URL is printed
SUITE_EXIT_WAIT_S = 90.0


def _pump(stream: IO[bytes], lines: queue.Queue[str | None], sink: list[str]) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        sink.append(line)
        lines.put(line)
    lines.put(None)


def _wait_for_line(lines: queue.Queue[str | None], prefix: str, output: list[str]) -> str:
    deadline = time.monotonic() + URL_WAIT_S
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"the suite printed no {prefix}... URL in {URL_WAIT_S} s:\n{''.join(output)}"
            )
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            raise AssertionError(f"the suite exited before printing the URL:\n{''.join(output)}")
        if line.strip().startswith(prefix):
            return line.strip()


def _checks(out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(out_dir.rglob("checks.json")):
        found[path.parent.name] = json.loads(path.read_text())
    return found


@dataclass
class SuiteRun:
    returncode: int
    output: str
    checks: dict[str, list[dict[str, Any]]]  # result directory name -> its checks.json

    def failed(self) -> list[tuple[str, Any, Any]]:
        return [
            (scenario, c.get("id"), c.get("errorMessage"))
            for scenario, items in self.checks.items()
            for c in items
            if c.get("status") != "SUCCESS"
        ]

    def check(self, check_id: str) -> dict[str, Any]:
        found = [c for items in self.checks.values() for c in items if c.get("id") == check_id]
        assert len(found) == 1, f"{check_id}: {found}\n{self.output}"
        return found[0]


def run_suite(
    gw: RunningGateway, tmp_path: Path, client_id: str, secret: str | None, callback_port: int, resource: bool
) -> SuiteRun:
    """Run ``conformance authorization`` and sign in at the URL it prints, through the real pages."""
    metadata = httpx.get(f"{gw.base}/.well-known/oauth-authorization-server", timeout=10).json()
    issuer = metadata["issuer"]
    assert issuer == gw.base  # the suite compares the metadata issuer with --url exactly
    out_dir = tmp_path / "conformance"
    argv = [*conformance_cmd(), "authorization", "--url", issuer, "--client-id", client_id]
    if secret is not None:
        argv += ["--client-secret", secret]
    if resource:
        argv += ["--resource", f"{issuer}/mcp"]
    argv += ["-p", str(callback_port), "-o", str(out_dir)]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=node22_env(),
        start_new_session=True,
    )
    output: list[str] = []
    lines: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines, output), daemon=True)
    reader.start()
    try:
        auth_url = _wait_for_line(lines, f"{issuer}/authorize?", output)
        with httpx.Client() as browser:
            done = sign_in(browser, auth_url, username="alice")
            assert origin(done.location) == f"http://127.0.0.1:{callback_port}", done.location
            assert "code" in done.params and done.params.get("iss") == issuer, done.location
            # The browser follows the redirect to the suite's callback server (started as it printed
            # the URL: make sure it listens before delivering).
            wait_for_port(callback_port, proc=proc, timeout=30)
            delivered = browser.get(done.location, timeout=30)
            assert delivered.status_code == 200, delivered.text
        try:
            proc.wait(timeout=SUITE_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the suite did not finish:\n{''.join(output)}") from None
        reader.join(timeout=10)
    finally:
        stop_process(proc)
    run = SuiteRun(proc.returncode, "".join(output), _checks(out_dir))
    assert run.checks, f"no checks.json under {out_dir}:\n{run.output}"
    return run


@pytest.mark.parametrize("resource", [False, True], ids=["no-resource", "resource"])
def test_conformance_authorization_public_client(
    gateway: GatewayFactory, tmp_path: Path, resource: bool
) -> None:
    data = tmp_path / "data"
    callback_port = free_port()
    add_user(data, "alice")
    client_id, _ = register_client(data, "Conformance suite", f"http://127.0.0.1:{callback_port}/callback")
    gw = gateway("expose", "--auth", "--", *NOTES_SERVER)
    run = run_suite(gw, tmp_path, client_id, None, callback_port, resource)
    assert not run.failed(), f"checks not green: {run.failed()}\n{run.output}\n{gw.logs()[-3000:]}"
    assert run.check("authorization-server-metadata")["status"] == "SUCCESS"
    assert run.check("authorization-server-metadata-cimd")["status"] == "SUCCESS"
    grant = run.check("authorization-code-grant")
    assert grant["status"] == "SUCCESS", grant
    if resource:
        assert f"resource={quote(gw.base + '/mcp', safe='')}" in grant["details"]["authorizationRequest"]
    assert run.returncode == 0, run.output


def test_conformance_authorization_confidential_client(gateway: GatewayFactory, tmp_path: Path) -> None:
    """A confidential client through the suite: sign-in, consent and the code are green; the token
    request is refused, rightly.

    conformance 0.2.0-alpha.12 picks the token endpoint auth method with ``!clientSecret ||
    methods.includes("none") ? "none" : ...``: since the gateway advertises ``none`` (public clients:
    Claude, ChatGPT, the SDKs), the suite sends the confidential client's id without its secret. The
    gateway must refuse that (OAuth 2.1 section 3.2.1: a confidential client authenticates) with 401
    invalid_client, so this scenario cannot pass against a correct server. This test pins that exact
    outcome; when a suite release authenticates confidential clients, the pin fails and must become
    the same all-green assertion as the public client's.
    """
    data = tmp_path / "data"
    callback_port = free_port()
    add_user(data, "alice")
    client_id, secret = register_client(
        data,
        "Conformance suite (confidential)",
        f"http://127.0.0.1:{callback_port}/callback",
        confidential=True,
    )
    gw = gateway("expose", "--auth", "--", *NOTES_SERVER)
    run = run_suite(gw, tmp_path, client_id, secret, callback_port, False)
    assert run.check("authorization-server-metadata")["status"] == "SUCCESS"
    assert run.check("authorization-server-metadata-cimd")["status"] == "SUCCESS"
    grant = run.check("authorization-code-grant")
    assert (grant["status"], grant.get("errorMessage")) == ("FAILURE", "Invalid status code: 401"), grant
    assert [f[1] for f in run.failed()] == ["authorization-code-grant"], run.failed()
    refusals = [
        json.loads(line)
        for line in gw.logs().splitlines()
        if line.startswith("{") and '"token_request_refused"' in line
    ]
    assert [r.get("error") for r in refusals] == ["invalid_client"], refusals

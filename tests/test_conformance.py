"""The official MCP conformance suite, run through the gateway against the SDK's reference server.

Single-server path (``expose``) and aggregated path (``serve`` in on-collision mode with a
second server beside it), each with the 2025-11-25 and the 2026-07-28 requirement sets.
Zero failures, no expected-failures file: the suite's exit code decides.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import GatewayFactory, everything_entry, notes_entry, servers_file
from tests.support.external import (
    conformance_cmd,
    everything_server_http_cmd,
    everything_server_stdio_cmd,
    free_port,
    node22_env,
    running,
    wait_for_port,
)

REQUIREMENTS = ["2025-11-25", "2026-07-28"]


def run_suite(url: str, requirements: str, out: Path) -> None:
    time.sleep(2.5)  # the reference server adds its dynamic tool ~2 s after start
    proc = subprocess.run(
        [*conformance_cmd(), "server", "--url", url, "--requirements", requirements, "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=node22_env(),
        cwd=out.parent,
    )
    summary = "\n".join(line for line in proc.stdout.splitlines() if line.startswith(("✓", "✗", "Total")))
    assert proc.returncode == 0, f"conformance {requirements} failed:\n{summary}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("requirements", REQUIREMENTS)
def test_single_server_path(gateway: GatewayFactory, tmp_path: Path, requirements: str) -> None:
    gw = gateway("expose", "--", *everything_server_stdio_cmd())
    run_suite(gw.url, requirements, tmp_path / "results")


@pytest.mark.parametrize("requirements", REQUIREMENTS)
def test_aggregated_path_on_collision(gateway: GatewayFactory, tmp_path: Path, requirements: str) -> None:
    config = servers_file(tmp_path, {"everything": everything_entry(), "notes": notes_entry()})
    gw = gateway("serve", "--config", str(config), "--prefix-mode", "on-collision")
    run_suite(gw.url, requirements, tmp_path / "results")


@pytest.mark.parametrize("requirements", REQUIREMENTS)
def test_remote_http_upstream(gateway: GatewayFactory, tmp_path: Path, requirements: str) -> None:
    """The same suite through a Streamable HTTP upstream (the reference server over HTTP)."""
    port = free_port()
    with running(everything_server_http_cmd(port), log=tmp_path / "upstream.log") as upstream:
        wait_for_port(port, proc=upstream)
        gw = gateway("expose", "--url", f"http://127.0.0.1:{port}/mcp")
        run_suite(gw.url, requirements, tmp_path / "results")

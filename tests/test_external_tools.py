"""The external test toolchain works: Node 22, the conformance suite, the Inspector CLI and the
SDK's everything-server, and the suite passes against that reference server on its own.

This is the baseline for the gateway's conformance tests, which run the same suite through
mcp-bastion. Missing tools make these tests fail (run scripts/setup-test-tools.sh), never skip.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import external

# Scored scenarios the pinned suite runs against the reference server (2025-11-25: 30 scenarios,
# 70 checks; 2026-07-28: 37 scenarios, 120 checks). Minima guard against a run that tests nothing.
MIN_SCORED_SCENARIOS = {"2025-11-25": 30, "2026-07-28": 37}


@pytest.fixture
def everything_url(tmp_path: Path) -> Iterator[str]:
    with external.everything_server_http(tmp_path / "everything-server.log") as url:
        yield url


def test_node22_and_npm_tools_are_installed() -> None:
    version = subprocess.run(
        [external.node22(), "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    major, minor, *_ = (int(x) for x in version.lstrip("v").split("."))
    assert (major, minor) >= (22, 19), version  # Inspector 2.12.0 declares node >= 22.19.0

    out = subprocess.run(
        [*external.conformance_cmd(), "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == external.CONFORMANCE_VERSION

    assert external.inspector_cli_cmd()[-1] == "--cli"
    assert external.free_port() > 0


def test_everything_server_over_stdio() -> None:
    """The stdio command answers initialize and tools/list with the suite's fixtures."""
    requests = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "mcp-bastion-tests", "version": "0"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
    ]
    proc = subprocess.Popen(
        external.everything_server_stdio_cmd(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        # Keep stdin open until both answers are in: on EOF the server drops in-flight requests.
        proc.stdin.write(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
        proc.stdin.flush()
        answers: dict[int, dict[str, Any]] = {}
        while len(answers) < 2:
            line = proc.stdout.readline()
            assert line, "everything-server closed stdout early"
            msg = json.loads(line)
            if "id" in msg:
                answers[msg["id"]] = msg
        assert answers[1]["result"]["serverInfo"]["name"] == "mcp-conformance-test-server"
        names = {t["name"] for t in answers[2]["result"]["tools"]}
        assert "test_simple_text" in names
    finally:
        external.stop_process(proc)


def test_inspector_cli_lists_and_calls_tools(everything_url: str, tmp_path: Path) -> None:
    env = external.node22_env(home=tmp_path / "home")
    listed = subprocess.run(
        [*external.inspector_cli_cmd(), everything_url, "--method", "tools/list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        start_new_session=True,
    )
    assert listed.returncode == 0, listed.stderr
    assert "test_simple_text" in {t["name"] for t in json.loads(listed.stdout)["tools"]}

    called = subprocess.run(
        [
            *external.inspector_cli_cmd(),
            everything_url,
            "--method",
            "tools/call",
            "--tool-name",
            "test_simple_text",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        start_new_session=True,
    )
    assert called.returncode == 0, called.stderr
    result = json.loads(called.stdout)
    assert result["isError"] is False
    assert result["content"][0]["text"] == "This is a simple text response for testing."


@pytest.mark.timeout(120)
@pytest.mark.parametrize("requirements", ["2025-11-25", "2026-07-28"])
def test_conformance_suite_passes_on_reference_server(
    requirements: str, everything_url: str, tmp_path: Path
) -> None:
    run = external.run_conformance_server(everything_url, requirements, tmp_path / "conformance", timeout=100)
    print(f"conformance --requirements {requirements}: {run.summary.describe()} in {run.duration_s:.1f} s")
    assert run.returncode == 0, run.output[-6000:]
    assert not run.summary.failing_scored, run.output[-6000:]
    assert len(run.summary.scored) >= MIN_SCORED_SCENARIOS[requirements], run.output[-6000:]

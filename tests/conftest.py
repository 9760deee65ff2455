"""Fixtures: a real gateway process on a free loopback port, in front of real MCP servers."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.external import (
    everything_server_stdio_cmd,
    free_port,
    start_process,
    stop_process,
)

HERE = Path(__file__).parent
NOTES_SERVER = [sys.executable, str(HERE / "servers" / "notes_server.py")]
BASTION = [sys.executable, "-m", "mcp_bastion"]


@dataclass
class RunningGateway:
    port: int
    proc: Any
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def wait_ready(base: str, proc: Any, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"gateway exited ({proc.returncode}):\n{log.read_text(errors='replace')[-4000:]}"
            )
        try:
            if httpx.get(f"{base}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway not ready in {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")


GatewayFactory = Callable[..., RunningGateway]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start ``mcp-bastion ARGS``; the port and data dir are added; stopped at teardown."""
    started: list[RunningGateway] = []

    def start(*args: str, ready: bool = True, env: dict[str, str] | None = None) -> RunningGateway:
        port = free_port()
        log = tmp_path / f"gateway-{port}.log"
        argv = [*BASTION, args[0], "--port", str(port), "--data-dir", str(tmp_path / "data"), *args[1:]]
        import os

        proc = start_process(argv, log=log, env={**os.environ, **(env or {})})
        gw = RunningGateway(port, proc, log)
        started.append(gw)
        if ready:
            wait_ready(gw.base, proc, log)
        return gw

    yield start
    for gw in started:
        stop_process(gw.proc)


def servers_file(tmp_path: Path, servers: dict[str, Any]) -> Path:
    path = tmp_path / "servers.json"
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


def everything_entry(**extra: Any) -> dict[str, Any]:
    cmd = everything_server_stdio_cmd()
    return {"command": cmd[0], "args": cmd[1:], **extra}


def notes_entry(**extra: Any) -> dict[str, Any]:
    return {"command": NOTES_SERVER[0], "args": NOTES_SERVER[1:], **extra}

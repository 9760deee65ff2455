"""The subjects of the benchmark: what serves Streamable HTTP in front of the echo upstream.

A subject is started fresh on a free loopback port, pinned (with every process it spawns) to one
CPU, probed until it answers a verified echo call, measured, and stopped with its whole process
group. A subject that cannot start is reported with the error and the tail of its log; the run
goes on with the others.

Subjects:
  * ``direct-sse`` / ``direct-json``: the SDK echo server served over HTTP by the SDK itself;
  * ``asgi-ceiling``: a bare ASGI app answering the calls itself (no hop) on uvicorn;
  * ``starlette-ceiling``: the same written on Starlette (what the framework costs);
  * ``pipe-floor``: the leanest forwarder of mcp-bastion's shape (uvicorn app, one pipe to the raw
    child, ids rewritten, nothing else): what the hop itself costs, a bound for any real bridge;
  * ``bastion-expose/U``: ``mcp-bastion expose --port P -- CMD``;
  * ``bastion-agg/U`` / ``bastion-single/U``: ``mcp-bastion serve --config FILE --port P``,
    aggregated endpoint ``/mcp`` (tool ``echo_echo``) and single-server path ``/servers/echo/mcp``;
  * ``bastion-tunnel/U``: the same path ``/servers/echo/mcp`` on a gateway that runs no server itself:
    ``mcp-bastion connect`` (on loopback) brings ``echo`` through the tunnel; compared with
    ``bastion-single/U`` it shows what the tunnel adds;
  * peers, installed by ``bench/setup_peers.sh`` under ``bench/.peers/``: ``mcp-proxy-py/U``
    (sparfenyuk), ``fastmcp/U``, ``supergateway/U``, ``mcp-proxy-js/U`` (punkpeye);

where ``U`` is the stdio upstream: ``sdk`` (echo server on the MCP SDK) or ``raw`` (no SDK).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.loadgen import HttpError, McpError, probe

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / ".peers"
UPSTREAMS = BENCH / "upstreams"
UPSTREAM_KINDS = ("sdk", "raw")


# ``run.py --upstream-cpu N``: every stdio upstream (and the tunnel's connector, which is the private
# side too) runs pinned to CPU N instead of sharing the subject's CPU: the gateway measured alone on
# its core, as deployed with the upstream on other machines. None: all on the subject's CPU.
UPSTREAM_CPU: int | None = None


def apart(argv: list[str]) -> list[str]:
    """``argv`` pinned to ``UPSTREAM_CPU`` when it is set (``taskset`` re-pins what inherited CPU 0)."""
    return argv if UPSTREAM_CPU is None else ["taskset", "-c", str(UPSTREAM_CPU), *argv]


def upstream_command(kind: str) -> list[str]:
    """The stdio upstream every bridge runs, in the bench's own interpreter (it has ``mcp``)."""
    script = {"sdk": "sdk_echo.py", "raw": "raw_echo.py"}[kind]
    return apart([sys.executable, str(UPSTREAMS / script)])


def bastion_command() -> list[str]:
    """How to run ``mcp-bastion``: ``$BENCH_BASTION`` (a command line), the venv's script, or the module."""
    override = os.environ.get("BENCH_BASTION")
    if override:
        return shlex.split(override)
    beside = Path(sys.executable).with_name("mcp-bastion")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mcp-bastion")
    if found:
        return [found]
    code = "import sys; from mcp_bastion.cli import main; sys.argv[0] = 'mcp-bastion'; sys.exit(main())"
    return [sys.executable, "-c", code]


def servers_config(kind: str) -> dict[str, Any]:
    cmd = upstream_command(kind)
    return {"mcpServers": {"echo": {"command": cmd[0], "args": cmd[1:]}}}


@dataclass
class Launch:
    argv: list[str]
    path: str = "/mcp"
    files: dict[str, str] = field(default_factory=dict)  # name -> content, written to the work dir
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Subject:
    name: str
    family: str  # direct | ceiling | bastion | peer
    upstream: str | None
    build: Callable[[int, Path], Launch]
    requires: Path | None = None  # an installed peer; missing -> the subject is skipped
    note: str = ""

    def missing(self) -> str | None:
        if self.requires is not None and not self.requires.exists():
            return f"not installed: {self.requires} (run bench/setup_peers.sh)"
        return None


def _direct(json_mode: bool) -> Callable[[int, Path], Launch]:
    def build(port: int, work: Path) -> Launch:
        argv = [sys.executable, str(UPSTREAMS / "sdk_echo.py"), "--http", "--port", str(port)]
        return Launch([*argv, "--json"] if json_mode else argv)

    return build


def _ceiling(script: str) -> Callable[[int, Path], Launch]:
    def build(port: int, work: Path) -> Launch:
        return Launch([sys.executable, str(UPSTREAMS / script), "--port", str(port)])

    return build


def _bastion_expose(kind: str) -> Callable[[int, Path], Launch]:
    def build(port: int, work: Path) -> Launch:
        return Launch([*bastion_command(), "expose", "--port", str(port), "--", *upstream_command(kind)])

    return build


def _bastion_serve(kind: str, path: str) -> Callable[[int, Path], Launch]:
    def build(port: int, work: Path) -> Launch:
        cfg = work / "bastion.json"
        return Launch(
            [*bastion_command(), "serve", "--config", str(cfg), "--port", str(port)],
            path=path,
            files={cfg.name: json.dumps(servers_config(kind), indent=2)},
        )

    return build


TUNNEL_CONNECTOR = "bench"


def _bastion_tunnel(kind: str) -> Callable[[int, Path], Launch]:
    """Gateway and connector as one subject: ``sh`` starts the connector, then becomes the gateway.

    So the connector (and the upstream it runs) is a child of the gateway's process: the whole tree
    is measured, pinned and stopped as one, like ``bastion-single`` with its upstream. The connector
    token is made here, in a data directory of this start's own (``connectors add`` prints it).
    """

    def build(port: int, work: Path) -> Launch:
        data = work / f"tunnel-{port}"
        gateway_cfg = work / f"tunnel-gateway-{port}.json"
        connector_cfg = work / f"tunnel-connector-{port}.json"
        work.mkdir(parents=True, exist_ok=True)
        made = subprocess.run(
            [*bastion_command(), "connectors", "add", TUNNEL_CONNECTOR, "--data-dir", str(data)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        token = made.stdout.decode().strip()
        if made.returncode != 0 or not token or "\n" in token:
            raise SubjectError(f"connectors add failed ({made.returncode}): {made.stderr.decode()[-400:]}")
        serve = [
            *bastion_command(),
            "serve",
            "--config",
            str(gateway_cfg),
            "--port",
            str(port),
            "--data-dir",
            str(data),
        ]
        connect = apart(
            [*bastion_command(), "connect", f"http://127.0.0.1:{port}", "--config", str(connector_cfg)]
        )
        return Launch(
            ["sh", "-c", f"{shlex.join(connect)} & exec {shlex.join(serve)}"],
            path="/servers/echo/mcp",
            files={
                gateway_cfg.name: json.dumps({"mcpServers": {}}),
                connector_cfg.name: json.dumps(servers_config(kind), indent=2),
            },
            env={"MCP_BASTION_CONNECTOR_TOKEN": token},  # not on a command line
        )

    return build


def _mcp_proxy_py(kind: str) -> Callable[[int, Path], Launch]:
    def build(port: int, work: Path) -> Launch:
        exe = PEERS / "mcp-proxy-py" / "bin" / "mcp-proxy"
        return Launch([str(exe), "--host", "127.0.0.1", "--port", str(port), "--", *upstream_command(kind)])

    return build


def _fastmcp(kind: str) -> Callable[[int, Path], Launch]:
    def build(port: int, work: Path) -> Launch:
        cfg = work / "fastmcp.json"
        py = PEERS / "fastmcp" / "bin" / "python"
        script = BENCH / "peer_scripts" / "fastmcp_proxy.py"
        return Launch(
            [str(py), str(script), "--port", str(port), "--config", str(cfg)],
            files={cfg.name: json.dumps(servers_config(kind), indent=2)},
        )

    return build


def _supergateway(kind: str) -> Callable[[int, Path], Launch]:
    def build(port: int, work: Path) -> Launch:
        exe = PEERS / "supergateway" / "node_modules" / ".bin" / "supergateway"
        return Launch(
            [
                str(exe),
                "--stdio",
                shlex.join(upstream_command(kind)),
                "--outputTransport",
                "streamableHttp",
                "--stateful",
                "--port",
                str(port),
                "--streamableHttpPath",
                "/mcp",
            ]
        )

    return build


def _mcp_proxy_js(kind: str) -> Callable[[int, Path], Launch]:
    def build(port: int, work: Path) -> Launch:
        exe = PEERS / "mcp-proxy-js" / "node_modules" / ".bin" / "mcp-proxy"
        argv = [str(exe), "--host", "127.0.0.1", "--port", str(port), "--server", "stream"]
        return Launch([*argv, "--", *upstream_command(kind)])

    return build


def catalog() -> list[Subject]:
    subjects = [
        Subject("direct-sse", "direct", None, _direct(False), note="SDK echo server over HTTP, SSE mode"),
        Subject("direct-json", "direct", None, _direct(True), note="SDK echo server over HTTP, JSON mode"),
        Subject(
            "asgi-ceiling", "ceiling", None, _ceiling("asgi_ceiling.py"), note="bare ASGI on uvicorn, no hop"
        ),
        Subject(
            "starlette-ceiling",
            "ceiling",
            None,
            _ceiling("starlette_ceiling.py"),
            note="Starlette app, no hop",
        ),
        Subject(
            "pipe-floor",
            "ceiling",
            None,
            _ceiling("pipe_floor.py"),
            note="the hop alone: uvicorn app forwarding to the raw child, ids rewritten, nothing else",
        ),
    ]
    for kind in UPSTREAM_KINDS:
        subjects += [
            Subject(
                f"bastion-expose/{kind}", "bastion", kind, _bastion_expose(kind), note="mcp-bastion expose"
            ),
            Subject(
                f"bastion-agg/{kind}",
                "bastion",
                kind,
                _bastion_serve(kind, "/mcp"),
                note="mcp-bastion serve, aggregated /mcp",
            ),
            Subject(
                f"bastion-single/{kind}",
                "bastion",
                kind,
                _bastion_serve(kind, "/servers/echo/mcp"),
                note="mcp-bastion serve, /servers/echo/mcp",
            ),
            Subject(
                f"bastion-tunnel/{kind}",
                "bastion",
                kind,
                _bastion_tunnel(kind),
                note="mcp-bastion via tunnel: serve + connect on loopback, /servers/echo/mcp",
            ),
            Subject(
                f"mcp-proxy-py/{kind}",
                "peer",
                kind,
                _mcp_proxy_py(kind),
                PEERS / "mcp-proxy-py" / ".installed",
                "PyPI mcp-proxy 0.13.0 (sparfenyuk)",
            ),
            Subject(
                f"fastmcp/{kind}",
                "peer",
                kind,
                _fastmcp(kind),
                PEERS / "fastmcp" / ".installed",
                "PyPI fastmcp 4.0.11, create_proxy",
            ),
            Subject(
                f"supergateway/{kind}",
                "peer",
                kind,
                _supergateway(kind),
                PEERS / "supergateway" / ".installed",
                "npm supergateway 4.0.0 --stateful",
            ),
            Subject(
                f"mcp-proxy-js/{kind}",
                "peer",
                kind,
                _mcp_proxy_js(kind),
                PEERS / "mcp-proxy-js" / ".installed",
                "npm mcp-proxy 6.7.19 (punkpeye)",
            ),
        ]
    return subjects


def select(patterns: Sequence[str], upstreams: Sequence[str] = UPSTREAM_KINDS) -> list[Subject]:
    """Subjects whose name matches any glob pattern (``direct-*``, ``*/raw``, ``supergateway/*``)."""
    chosen = []
    for subject in catalog():
        if subject.upstream is not None and subject.upstream not in upstreams:
            continue
        if any(fnmatch.fnmatchcase(subject.name, p) or subject.name.split("/")[0] == p for p in patterns):
            chosen.append(subject)
    return chosen


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_rss(pid: int) -> list[dict[str, Any]]:
    """RSS of a process and of each of its descendants: ``[{pid, name, rss_mb}]``, root first."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    out = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            cmd = proc.cmdline()
            name = " ".join(Path(c).name if i < 2 else c for i, c in enumerate(cmd[:3])) or proc.name()
            out.append({"pid": proc.pid, "name": name[:80], "rss_mb": round(proc.memory_info().rss / 1e6, 2)})
    return out


class SubjectError(Exception):
    """The subject did not start or did not answer its probe."""


class Running:
    """A started subject: its process group, URL and what the probe found."""

    def __init__(self, subject: Subject, work: Path, cpu: int | None) -> None:
        self.subject = subject
        self.work = work
        self.cpu = cpu
        self.port = free_port()
        self.launch = subject.build(self.port, work)
        self.url = f"http://127.0.0.1:{self.port}{self.launch.path}"
        self.log_path = work / f"{subject.name.replace('/', '_')}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tool = "echo"
        self.ready_s = 0.0
        self.idle_rss_mb = 0.0
        self.idle_root_rss_mb = 0.0
        self.idle_procs = 0
        self.idle_tree: list[dict[str, Any]] = []
        self.modern_error: str | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> Running:
        self.work.mkdir(parents=True, exist_ok=True)
        for name, content in self.launch.files.items():
            (self.work / name).write_text(content, encoding="utf-8")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.launch.env}
        cpu = self.cpu

        def pin() -> None:  # runs in the child: it and everything it spawns stay on one CPU
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(
                    self.launch.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.work,
                    env=env,
                    start_new_session=True,
                    preexec_fn=pin if cpu is not None else None,  # run.py starts no threads
                )
            except OSError as exc:
                raise SubjectError(f"cannot execute {self.launch.argv[0]}: {exc}") from exc
        try:
            asyncio.run(self._wait_ready(t0, timeout))
        except SubjectError:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0
        time.sleep(0.5)
        self.idle_tree = tree_rss(self.pid)
        self.idle_rss_mb = round(sum(p["rss_mb"] for p in self.idle_tree), 2)
        self.idle_root_rss_mb = self.idle_tree[0]["rss_mb"] if self.idle_tree else 0.0
        self.idle_procs = len(self.idle_tree)
        return self

    async def _wait_ready(self, t0: float, limit_s: float) -> None:
        last = "no answer"
        while time.perf_counter() - t0 < limit_s:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SubjectError(f"exited with code {self.proc.returncode}: {self.log_tail()}")
            try:
                found = await probe(self.url, "handshake", wait_s=5.0)
            except (HttpError, McpError) as exc:
                last = str(exc)
                await asyncio.sleep(0.2)
                continue
            self.tool = str(found["tool"])
            try:
                await probe(self.url, "modern", wait_s=10.0)
            except (HttpError, McpError) as exc:
                self.modern_error = str(exc)[:300]
            return
        raise SubjectError(f"not ready after {limit_s:.0f}s: {last}; log: {self.log_tail()}")

    def log_tail(self, chars: int = 600) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-chars:].strip()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def leftovers(self) -> str | None:
        """Why the subject should be restarted before the next cell: more processes than when idle.

        (supergateway --stateful keeps one upstream per session, and the sessions of a cell whose
        set-up timed out are never deleted: they would weigh on every later cell.)
        """
        procs = len(tree_rss(self.pid)) if self.alive() else 0
        if procs > self.idle_procs:
            return f"{procs} processes in the tree, {self.idle_procs} when it was idle"
        return None

    def stop(self) -> None:
        """Terminate the subject's process group and any descendant that left it."""
        proc = self.proc
        if proc is None:
            return
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            family = []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        _, still = psutil.wait_procs(family, timeout=3)
        for child in still:
            with contextlib.suppress(psutil.Error):
                child.kill()
        self.proc = None

    def describe(self) -> dict[str, Any]:
        return {
            "subject": self.subject.name,
            "family": self.subject.family,
            "upstream": self.subject.upstream,
            "url": self.url,
            "tool": self.tool,
            "ready_s": round(self.ready_s, 3),
            "idle_rss_mb": self.idle_rss_mb,
            "idle_root_rss_mb": self.idle_root_rss_mb,
            "idle_procs": self.idle_procs,
            "idle_tree": self.idle_tree,
            "modern_error": self.modern_error,
        }

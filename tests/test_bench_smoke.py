"""Smoke run of the benchmark harness (``bench/``) so that it cannot rot.

A few verified calls per subject that needs no extra install (the SDK's own HTTP server in SSE and
JSON mode, the no-hop ceilings, the pipe floor, mcp-bastion's single-server and aggregated paths in
front of both upstreams, and the tunnel path: gateway plus connector), in both protocol eras, plus a
tiny set-up storm and idle-session test; the two stdio upstreams on their own; the apps driven
in-process (``bench.inproc``); and the load generator's
misrouting detector against a server that misroutes on purpose. The peers
(``bench/setup_peers.sh``) and the full run are not part of it.

Needs the bench's ``psutil`` and ``matplotlib`` (``bench/requirements.txt``): missing, they fail the run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib  # noqa: F401 - the bench's plots; a missing requirement fails, never skips
import psutil  # noqa: F401 - the load generator samples the subject's process tree with it
import pytest

ROOT = Path(__file__).resolve().parents[1]
UPSTREAMS = ROOT / "bench" / "upstreams"

BASELINE_SUBJECTS = ["direct-sse", "direct-json", "asgi-ceiling", "starlette-ceiling", "pipe-floor"]
BASTION_SUBJECTS = [
    "bastion-expose/sdk",
    "bastion-expose/raw",
    "bastion-agg/sdk",
    "bastion-agg/raw",
    "bastion-single/sdk",
    "bastion-single/raw",
]


def run_bench(out: Path, *subjects: str, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    cmd = [
        sys.executable,
        "-m",
        "bench.run",
        "--smoke",
        "--no-report",
        "--out",
        str(out),
        "--subjects",
        *subjects,
        *extra,
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    raw = out / "raw.jsonl"
    return [json.loads(line) for line in raw.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_subject(rows: list[dict[str, Any]], subject: str) -> None:
    """Every reply verified, none misrouted or lost, in every cell of both eras."""
    mine = [r for r in rows if r.get("subject") == subject]
    starts = [r for r in mine if r["scenario"] == "start"]
    assert starts, f"{subject}: not run"
    for r in starts:
        assert r["status"] == "ok", f"{subject} did not start: {r.get('error')}"
        assert r.get("modern_error") is None, f"{subject} does not answer 2026-07-28: {r['modern_error']}"
    cells = [r for r in mine if r["scenario"] == "calls"]
    assert {r["era"] for r in cells} == {"handshake", "modern"}
    for r in cells:
        where = f"{subject} {r['era']} C={r['concurrency']}"
        assert r["status"] == "ok", (
            f"{where}: {r.get('error') or r.get('error_samples') or r.get('setup_samples')}"
        )
        assert r["misrouted"] == 0, f"{where}: misrouted replies: {r['error_samples']}"
        assert r["lost"] == 0 and r["errors"] == 0, f"{where}: {r['error_samples']}"
        assert r["ok"] == r["calls_expected"] > 0, f"{where}: {r['ok']}/{r['calls_expected']} verified"
        assert r["monitored"] and r["rss_peak_mb"] > 0
    storm = [r for r in mine if r["scenario"] == "storm"]
    assert storm and all(r["ok"] == r["sessions"] and r["misrouted"] == 0 for r in storm), storm
    idle = [r for r in mine if r["scenario"] == "idle"]
    assert idle, f"{subject}: no idle-session result"
    for r in idle:
        assert r["opened"] == r["sessions"] and r["alive"] == r["alive_checked"] > 0, r
        assert r["misrouted"] == 0


@pytest.mark.parametrize("subject", BASELINE_SUBJECTS)
def test_bench_baseline_subject(tmp_path: Path, subject: str) -> None:
    check_subject(run_bench(tmp_path / "out", subject), subject)


# mcp-bastion's own subjects: these assertions run (no skip, no xfail) and hold the gateway to
# the benchmark's bar: zero misrouted replies and every call verified, both eras, both upstreams.
@pytest.mark.parametrize("subject", BASTION_SUBJECTS)
def test_bench_bastion_subject(tmp_path: Path, subject: str) -> None:
    check_subject(run_bench(tmp_path / "out", subject), subject)


def test_bench_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_bench(out, "asgi-ceiling", "direct-json")
    cmd = [sys.executable, "-m", "bench.report", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=120)
    text = (out / "results.md").read_text(encoding="utf-8")
    assert "`asgi-ceiling`" in text and "`direct-json`" in text
    assert (out / "throughput_handshake.png").exists()


@pytest.mark.parametrize("upstream", ["sdk", "raw"])
def test_bench_tunnel_subject(tmp_path: Path, upstream: str) -> None:
    """``bastion-tunnel/U`` (serve + connect on loopback) and the report's comparison with the direct path;
    with the raw upstream also ``--upstream-cpu`` (upstreams and the connector pinned apart)."""
    out = tmp_path / "out"
    tunnel, direct = f"bastion-tunnel/{upstream}", f"bastion-single/{upstream}"
    apart = upstream == "raw"
    rows = run_bench(out, tunnel, direct, extra=("--upstream-cpu", "0") if apart else ())
    check_subject(rows, tunnel)
    check_subject(rows, direct)
    start = next(r for r in rows if r["subject"] == tunnel and r["scenario"] == "start")
    assert "connect" in start["argv"][-1]  # the connector runs in the subject's own process tree
    assert ("taskset -c 0" in start["argv"][-1]) == apart
    assert len(start["idle_tree"]) >= 3  # gateway, connector, upstream
    subprocess.run(
        [sys.executable, "-m", "bench.report", str(out), "--no-plots"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    text = (out / "results.md").read_text(encoding="utf-8")
    assert ("upstreams and the tunnel's connector on CPU 0" in text) == apart
    section = text.split("## The tunnel path (issue 5)", 1)[1].split("\n## ", 1)[0]
    for era in ("handshake", "modern"):
        assert f"| `{tunnel}` | {era} |" in section, section


def stdio_exchange(script: str, messages: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    payload = "".join(json.dumps(m) + "\n" for m in messages).encode()
    proc = subprocess.Popen(
        [sys.executable, str(UPSTREAMS / script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(payload)
    proc.stdin.flush()
    wanted = {m["id"] for m in messages if "id" in m}
    replies: dict[Any, dict[str, Any]] = {}
    try:
        while wanted - replies.keys():
            line = proc.stdout.readline()
            assert line, f"{script} closed stdout; got {sorted(map(str, replies))}"
            msg = json.loads(line)
            replies[msg.get("id")] = msg
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    return replies


@pytest.mark.parametrize("script", ["sdk_echo.py", "raw_echo.py"])
def test_stdio_upstream(script: str) -> None:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    replies = stdio_exchange(
        script,
        [
            {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}},
            {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "hé"}},
            },
            {
                "jsonrpc": "2.0",
                "id": 4,
                "method": "tools/call",
                "params": {"name": "sized", "arguments": {"n": 65536}},
            },
            {"jsonrpc": "2.0", "id": 5, "method": "ping"},
        ],
    )
    assert replies[1]["result"]["protocolVersion"] == "2025-11-25"
    assert {t["name"] for t in replies[2]["result"]["tools"]} == {"echo", "sized"}
    assert replies[3]["result"]["content"][0]["text"] == "hé"
    assert replies[3]["result"]["structuredContent"] == {"result": "hé"}
    assert len(replies[4]["result"]["content"][0]["text"]) == 65536
    assert replies[5]["result"] == {}
    modern = stdio_exchange(
        script,
        [
            {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": meta}},
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "modern"}, "_meta": meta},
            },
        ],
    )
    assert "2026-07-28" in modern[1]["result"]["supportedVersions"]
    assert modern[2]["result"]["content"][0]["text"] == "modern"


def test_stdio_alone_drives_both_upstreams_in_both_eras(tmp_path: Path) -> None:
    """``bench.stdio_alone`` (the upstream with no bridge: the floor under every bridge) runs, and
    verifies what it counts."""
    out = tmp_path / "alone.jsonl"
    cmd = [sys.executable, "-m", "bench.stdio_alone", "--rounds", "1", "--calls", "30", "-c", "1", "3"]
    done = subprocess.run([*cmd, "--no-pin", "--out", str(out)], cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cells = {(r["upstream"], r["era"], r["concurrency"]) for r in rows}
    assert cells == {(u, e, c) for u in ("sdk", "raw") for e in ("handshake", "modern") for c in (1, 3)}
    for row in rows:
        assert row["ok"] == row["calls"] > 0 and row["bad"] == 0 and row["throughput"] > 0, row
    assert "| `sdk` | modern | 3 |" in done.stdout.decode()


def test_inproc_drives_the_apps_in_both_eras(tmp_path: Path) -> None:
    """``bench.inproc`` (an app's CPU per call with no sockets) drives mcp-bastion, the ceiling and the
    floor in both eras, checks every answer, and can import mcp-bastion from another tree (``--src``)."""
    out = tmp_path / "inproc.jsonl"
    cmd = [sys.executable, "-m", "bench.inproc", "--app", *("bastion", "ceiling", "floor")]
    args = [
        "-c",
        "3",
        "-n",
        "10",
        "--warmup",
        "2",
        "--rounds",
        "2",
        "--src",
        str(ROOT / "src"),
        "--out",
        str(out),
    ]
    done = subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["app"], r["era"]) for r in rows} == {
        (a, e) for a in ("bastion", "ceiling", "floor") for e in ("handshake", "modern")
    }
    for row in rows:
        assert row["bad"] == 0 and row["calls_per_round"] == 30 and len(row["cpu_us_per_call"]) == 2, row
        assert row["cpu_us_min"] > 0 and row["calls_per_s_median"] > 0, row


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_loadgen_counts_misrouted_replies() -> None:
    """Against a server that hands every 3rd caller the previous call's reply, nothing passes as ok."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(UPSTREAMS / "asgi_ceiling.py"), "--port", str(port), "--misroute-every", "3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and server.poll() is None, "ceiling did not start"
            time.sleep(0.1)
        for era in ("handshake", "modern"):
            cmd = [
                sys.executable,
                "-m",
                "bench.loadgen",
                "--url",
                f"http://127.0.0.1:{port}/mcp",
                "--era",
                era,
                "-c",
                "4",
                "-n",
                "15",
                "--warmup",
                "0",
                "--pid",
                str(server.pid),
            ]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=60, check=True)
            r = json.loads(done.stdout.decode().strip().splitlines()[-1])
            assert r["misrouted"] == r["calls_expected"] // 3, r
            assert r["ok"] + r["misrouted"] == r["calls_expected"], r
            assert r["errors"] == r["lost"] == 0, r
    finally:
        server.terminate()
        server.wait(timeout=10)

"""Run the benchmark: every subject, every scenario, interleaved round by round.

    python -m bench.run                 # the full run (>= 3 rounds; about an hour or two)
    python -m bench.run --quick         # a short run: one round, fewer calls, C = 1, 10, 50
    python -m bench.run --smoke         # a few calls per subject (what the test suite runs)
    python -m bench.run --subjects 'direct-*' asgi-ceiling 'mcp-proxy-js/*' --quick

Subject and upstream are pinned to CPU 0, the load generator (and this driver) to CPU 1. In each
round every subject is started fresh, runs every ``calls`` cell (era x payload x concurrency)
and the session set-up storm, and is stopped; then it is started again for the idle-session test
(so the per-session RSS is not hidden by memory freed in earlier cells). The order of subjects
rotates from round to round. Results go to ``bench/results/<date>/``: ``raw.jsonl`` (one line per
cell and per subject start, written as it goes), ``meta.json``, ``results.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from bench import report
from bench import subjects as subjects_module
from bench.subjects import BENCH, PEERS, ROOT, UPSTREAM_KINDS, Running, Subject, SubjectError, select

SUBJECT_CPU = 0
LOADGEN_CPU = 1
PAYLOADS = {"32B": 32, "64KiB": 65536}


@dataclass(frozen=True)
class Plan:
    rounds: int = 3
    concurrency: tuple[int, ...] = (1, 10, 50, 200)
    payloads: tuple[int, ...] = (32, 65536)
    eras: tuple[str, ...] = ("handshake", "modern")
    calls_small: int = 3000  # measured calls per cell, split over the sessions (32 B)
    calls_large: int = 1000  # the same for 64 KiB payloads
    min_calls: int = 10  # per session
    warmup_total: int = 200  # warm-up calls per cell, split over the sessions (at least 2 each)
    storm_sessions: int = 500
    storm_concurrency: int = 50
    idle_sessions: int = 10_000
    idle_hold: float = 2.0
    fresh_idle: bool = True  # restart the subject for the idle test (clean per-session RSS)
    max_seconds: float = 300.0
    max_rss_mb: float = 8192.0
    timeout: float = 30.0
    min_rate: float = 20.0  # a subject slower than this (calls/s) in a cell that ran out of time
    # is not measured further in that era in that round

    def calls_per_session(self, payload: int, concurrency: int) -> int:
        total = self.calls_small if payload <= 1024 else self.calls_large
        return max(self.min_calls, total // concurrency)

    def warmup(self, concurrency: int) -> int:
        return max(2, self.warmup_total // concurrency)


PRESETS: dict[str, Plan] = {
    "full": Plan(),
    "quick": Plan(
        rounds=1,
        concurrency=(1, 10, 50),
        calls_small=600,
        calls_large=200,
        min_calls=5,
        warmup_total=50,
        storm_sessions=100,
        storm_concurrency=20,
        idle_sessions=500,
        max_seconds=120.0,
    ),
    "smoke": Plan(
        rounds=1,
        concurrency=(2,),
        payloads=(32,),
        calls_small=6,
        calls_large=6,
        min_calls=3,
        warmup_total=2,
        storm_sessions=4,
        storm_concurrency=2,
        idle_sessions=10,
        idle_hold=0.3,
        fresh_idle=False,
        max_seconds=60.0,
        timeout=15.0,
    ),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Recorder:
    """Appends result lines to raw.jsonl as they come, so a crash keeps what was measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh: TextIO = path.open("a", encoding="utf-8")

    def write(self, line: dict[str, Any]) -> None:
        # Paths inside the checkout (command lines, logs) are written relative to it: a committed
        # run names no directory of the machine it ran on.
        text = json.dumps(line, separators=(",", ":")).replace(f"{ROOT}/", "")
        self.fh.write(text + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class Bench:
    def __init__(self, plan: Plan, out: Path, pin: bool, work: Path) -> None:
        self.plan = plan
        self.out = out
        self.pin = pin
        self.work = work
        self.rec = Recorder(out / "raw.jsonl")

    # -- one loadgen invocation ------------------------------------------------------------
    def loadgen(self, running: Running, label: dict[str, Any], args: list[str]) -> dict[str, Any]:
        plan = self.plan
        cmd = [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--url",
            running.url,
            "--tool",
            running.tool,
            "--pid",
            str(running.pid),
            "--timeout",
            str(plan.timeout),
            "--max-seconds",
            str(plan.max_seconds),
            "--max-rss-mb",
            str(plan.max_rss_mb),
            "--label",
            json.dumps(label),
            *args,
        ]
        if self.pin:
            cmd += ["--cpu", str(LOADGEN_CPU)]
        try:
            done = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, timeout=plan.max_seconds * 3 + 120, check=False
            )
        except subprocess.TimeoutExpired:
            return {**label, "status": "failed", "error": "load generator timed out"}
        lines = done.stdout.decode(errors="replace").strip().splitlines()
        if done.returncode != 0 or not lines:
            err = done.stderr.decode(errors="replace").strip()[-800:]
            return {**label, "status": "failed", "error": f"load generator exit {done.returncode}: {err}"}
        result: dict[str, Any] = json.loads(lines[-1])
        result["status"] = status_of(result)
        if not running.alive():
            result["status"] = "failed"
            result["error"] = f"subject died: {running.log_tail()}"
        return result

    def start(self, subject: Subject, rnd: int, phase: str, reason: str | None = None) -> Running | None:
        base = {"scenario": "start", "round": rnd, "phase": phase, "reason": reason, **subject_label(subject)}
        missing = subject.missing()
        if missing is not None:
            self.rec.write({**base, "status": "skipped", "error": missing})
            log(f"{subject.name}: skipped ({missing})")
            return None
        try:  # building the launch may already fail (the tunnel subject makes its connector token)
            running = Running(subject, self.work / f"round{rnd}", SUBJECT_CPU if self.pin else None)
        except SubjectError as exc:
            self.rec.write({**base, "status": "failed", "error": str(exc)[:2000]})
            log(f"{subject.name}: failed to prepare: {str(exc)[:300]}")
            return None
        try:
            running.start()
        except SubjectError as exc:
            self.rec.write(
                {**base, "status": "failed", "error": str(exc)[:2000], "argv": running.launch.argv}
            )
            log(f"{subject.name}: failed to start: {str(exc)[:300]}")
            return None
        self.rec.write({**base, "status": "ok", **running.describe(), "argv": running.launch.argv})
        modern = "no" if running.modern_error else "yes"
        log(
            f"{subject.name}: up in {running.ready_s:.1f}s, {running.idle_rss_mb:.0f} MB idle, "
            f"tool {running.tool}, 2026-07-28: {modern}"
        )
        return running

    # -- per subject -------------------------------------------------------------------------
    def run_subject(self, subject: Subject, rnd: int) -> None:
        plan = self.plan
        running = self.start(subject, rnd, "calls")
        if running is None:
            return
        try:
            for era in plan.eras:
                too_slow: str | None = None
                for payload in plan.payloads:
                    for conc in plan.concurrency:
                        label = {
                            "round": rnd,
                            **subject_label(subject),
                            "scenario": "calls",
                            "era": era,
                            "payload": payload,
                            "concurrency": conc,
                        }
                        if era == "modern" and running.modern_error:
                            self.rec.write({**label, "status": "unsupported", "error": running.modern_error})
                            continue
                        if too_slow:
                            self.rec.write({**label, "status": "skipped", "error": too_slow})
                            continue
                        restarted = self.clean(running, subject, rnd)
                        if restarted is None:
                            return
                        running = restarted
                        result = self.loadgen(
                            running,
                            label,
                            [
                                "--scenario",
                                "calls",
                                "--era",
                                era,
                                "-c",
                                str(conc),
                                "-n",
                                str(plan.calls_per_session(payload, conc)),
                                "--warmup",
                                str(plan.warmup(conc)),
                                "--payload",
                                str(payload),
                            ],
                        )
                        self.rec.write(result)
                        log(summary(result))
                        rate = float(result.get("throughput") or 0.0)
                        if rate < plan.min_rate and (result.get("skipped") or result.get("aborted")):
                            too_slow = (
                                f"too slow: {rate:.1f} calls/s at {payload_name(payload)} C={conc} "
                                f"with calls left undone"
                            )
            restarted = self.clean(running, subject, rnd)
            if restarted is None:
                return
            running = restarted
            if running.alive():
                self.storm(running, subject, rnd)
            if not plan.fresh_idle and running.alive():
                self.idle(running, subject, rnd)
        finally:
            running.stop()
        if not plan.fresh_idle:
            return
        running = self.start(subject, rnd, "idle")
        if running is None:
            return
        try:
            self.idle(running, subject, rnd)
        finally:
            running.stop()

    def clean(self, running: Running, subject: Subject, rnd: int) -> Running | None:
        """The subject as it was when idle: restarted if it died or kept processes from the last cell."""
        reason = "it died" if not running.alive() else running.leftovers()
        if reason is None:
            return running
        log(f"{subject.name}: restarting: {reason}")
        running.stop()
        return self.start(subject, rnd, "restart", reason)

    def storm(self, running: Running, subject: Subject, rnd: int) -> None:
        plan = self.plan
        result = self.loadgen(
            running,
            {"round": rnd, **subject_label(subject), "scenario": "storm", "era": "handshake"},
            [
                "--scenario",
                "storm",
                "--sessions",
                str(plan.storm_sessions),
                "-c",
                str(plan.storm_concurrency),
            ],
        )
        self.rec.write(result)
        log(summary(result))

    def idle(self, running: Running, subject: Subject, rnd: int) -> None:
        plan = self.plan
        result = self.loadgen(
            running,
            {"round": rnd, **subject_label(subject), "scenario": "idle", "era": "handshake"},
            ["--scenario", "idle", "--sessions", str(plan.idle_sessions), "--hold", str(plan.idle_hold)],
        )
        result["idle_rss_mb"] = running.idle_rss_mb
        self.rec.write(result)
        log(summary(result))

    def run(self, subjects: list[Subject]) -> None:
        for rnd in range(self.plan.rounds):
            shift = rnd % len(subjects)
            order = subjects[shift:] + subjects[:shift]
            log(f"round {rnd + 1}/{self.plan.rounds}: {', '.join(s.name for s in order)}")
            for subject in order:
                self.run_subject(subject, rnd)
        self.rec.close()


def payload_name(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def subject_label(subject: Subject) -> dict[str, Any]:
    return {"subject": subject.name, "family": subject.family, "upstream": subject.upstream}


def status_of(result: dict[str, Any]) -> str:
    if result.get("aborted"):
        return "aborted"
    bad = sum(int(result.get(k) or 0) for k in ("misrouted", "errors", "lost", "skipped", "setup_failures"))
    if result.get("scenario") == "idle" and result.get("alive") != result.get("alive_checked"):
        bad += 1
    return "ok" if bad == 0 else "errors"


def summary(r: dict[str, Any]) -> str:
    head = f"{r.get('subject')} {r.get('scenario')}"
    if r.get("status") == "failed":
        return f"{head}: FAILED {str(r.get('error'))[:300]}"
    flags = (
        f"misrouted={r.get('misrouted', 0)} errors={r.get('errors', 0)} lost={r.get('lost', 0)}"
        f" skipped={r.get('skipped', 0)} setup_failures={r.get('setup_failures', 0)}"
    )
    if r.get("aborted"):
        flags += f" ABORTED: {r['aborted']}"
    if r.get("scenario") == "calls":
        lat = r.get("latency_ms") or {}
        return (
            f"{head} {r['era']} {r['payload']}B C={r['concurrency']}: {r.get('throughput', 0):.0f}/s "
            f"p50={lat.get('p50', float('nan')):.2f}ms p99={lat.get('p99', float('nan')):.2f}ms "
            f"cpu={r.get('cpu_us_per_call')}us/call rss={r.get('rss_peak_mb')}MB {flags}"
        )
    if r.get("scenario") == "storm":
        return f"{head}: {r.get('sessions_per_s', 0):.0f} sessions/s, {r.get('opened')} opened, {flags}"
    return (
        f"{head}: {r.get('opened')} sessions, {r.get('rss_per_session_kb')} KB/session, "
        f"alive {r.get('alive')}/{r.get('alive_checked')}, {flags}"
    )


def command_version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).decode(errors="replace").strip()
    return text.splitlines()[-1] if text else None


def environment() -> dict[str, Any]:
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    peers: dict[str, str | None] = {}
    for name, dist in (("mcp-proxy-py", "mcp_proxy"), ("fastmcp", "fastmcp")):
        infos = sorted((PEERS / name).glob(f"lib/python*/site-packages/{dist}-*.dist-info"))
        peers[name] = infos[0].name[len(dist) + 1 : -len(".dist-info")] if infos else None
    for name, pkg in (("supergateway", "supergateway"), ("mcp-proxy-js", "mcp-proxy")):
        pkg_json = PEERS / name / "node_modules" / pkg / "package.json"
        peers[name] = json.loads(pkg_json.read_text())["version"] if pkg_json.exists() else None
    git = command_version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "node": command_version(["node", "--version"]),
        "packages": {d: version(d) for d in ("mcp", "uvicorn", "starlette", "httptools", "uvloop", "orjson")},
        "mcp_bastion": version("mcp-bastion"),
        "peers": peers,
        "git": git,
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
    }


def output_dir(preset: str, out: str | None) -> Path:
    if out:
        # Absolute: subjects run in their own work directory under it and are given file paths.
        path = Path(out).resolve()
    else:
        stamp = dt.date.today().isoformat()
        name = stamp if preset == "full" else f"{stamp}-{preset}"
        path = BENCH / "results" / name
        n = 2
        while (path / "raw.jsonl").exists():
            path = BENCH / "results" / f"{name}.{n}"
            n += 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short run: 1 round, fewer calls, C <= 50")
    mode.add_argument("--smoke", action="store_true", help="a few calls per subject")
    p.add_argument("--subjects", nargs="+", default=["*"], help="glob patterns of subject names")
    p.add_argument("--upstreams", nargs="+", choices=UPSTREAM_KINDS, default=list(UPSTREAM_KINDS))
    p.add_argument("--rounds", type=int, help="override the preset's number of rounds")
    p.add_argument("--concurrency", type=int, nargs="+", help="override the concurrency levels")
    p.add_argument("--payloads", nargs="+", choices=sorted(PAYLOADS), help="override the payload sizes")
    p.add_argument("--eras", nargs="+", choices=("handshake", "modern"), help="override the eras")
    p.add_argument("--idle-sessions", type=int, help="override the idle-session count")
    p.add_argument(
        "--calls",
        type=int,
        help="measured calls per cell (32 B; 64 KiB cells a third of it): more for steadier ratios",
    )
    p.add_argument("--out", help="output directory (default bench/results/<date>[-quick|-smoke])")
    p.add_argument("--no-pin", action="store_true", help="do not pin subject and load generator to CPUs")
    p.add_argument(
        "--upstream-cpu",
        type=int,
        help="pin every stdio upstream (and the tunnel's connector) to this CPU instead of the subject's: "
        "the gateway alone on its core, as deployed (1 shares the load generator's)",
    )
    p.add_argument("--no-report", action="store_true", help="only write raw.jsonl")
    p.add_argument("--list", action="store_true", help="list the subjects and exit")
    a = p.parse_args(argv)

    preset = "quick" if a.quick else "smoke" if a.smoke else "full"
    plan = PRESETS[preset]
    if a.rounds:
        plan = replace(plan, rounds=a.rounds)
    if a.concurrency:
        plan = replace(plan, concurrency=tuple(a.concurrency))
    if a.payloads:
        plan = replace(plan, payloads=tuple(PAYLOADS[x] for x in a.payloads))
    if a.eras:
        plan = replace(plan, eras=tuple(a.eras))
    if a.idle_sessions:
        plan = replace(plan, idle_sessions=a.idle_sessions)
    if a.calls:
        plan = replace(plan, calls_small=a.calls, calls_large=max(1, a.calls // 3))

    subjects = select(a.subjects, a.upstreams)
    if a.list:
        for s in subjects:
            print(f"{s.name:24} {s.note}{'  [' + m + ']' if (m := s.missing()) else ''}")
        return 0
    if not subjects:
        p.error(f"no subject matches {a.subjects}")

    # SIGTERM and SIGINT (ignored by default in background jobs) unwind through the `finally`
    # blocks, which stop the subject's process group and the load generator.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    pin = not a.no_pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {LOADGEN_CPU})
    out = output_dir(preset, a.out)
    work = out / "logs"
    if a.upstream_cpu is not None:
        subjects_module.UPSTREAM_CPU = a.upstream_cpu
    meta = {"preset": preset, "plan": asdict(plan), "pinned": pin, "subjects": [s.name for s in subjects]}
    meta["upstream_cpu"] = a.upstream_cpu
    meta["environment"] = environment()
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log(f"{preset} run of {len(subjects)} subjects, {plan.rounds} round(s) -> {out}")
    Bench(plan, out, pin, work).run(subjects)
    if not a.no_report:
        report.build(out)
        log(f"report: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

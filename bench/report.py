"""Turn a run's ``raw.jsonl`` into ``results.md`` and PNG plots.

    python -m bench.report bench/results/<date>/

Every figure is the median over rounds with the min-max range, and (for throughput and latency)
also relative to ``direct-sse`` / ``direct-json`` measured in the same round: absolute numbers
drift between rounds on a shared machine, ratios hold.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.subjects import catalog

Row = dict[str, Any]
CellKey = tuple[str, str, int, int]  # subject, era, payload, concurrency

BASELINE = "direct-sse"
BASELINE_JSON = "direct-json"
CEILING = "asgi-ceiling"
FLOOR = "pipe-floor"  # the hop alone (bench/upstreams/pipe_floor.py)
TARGET_C = 50
TUNNEL = "bastion-tunnel/"  # compared with the direct gateway path, bastion-single/<same upstream>
TUNNEL_MAX_ADDED_P50_MS = 1.0  # issue 5: at most 1 ms added per call (p50, loopback)
TUNNEL_MIN_THROUGHPUT = 0.8  # issue 5: at least 80 % of the direct path's throughput at C=50


def load(path: Path) -> list[Row]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def payload_name(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "–"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def med_range(values: list[float], digits: int = 0) -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med, digits)
    return f"{fmt(med, digits)} [{fmt(min(values), digits)}–{fmt(max(values), digits)}]"


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


class Results:
    def __init__(self, rows: list[Row], meta: dict[str, Any]) -> None:
        self.rows = rows
        self.meta = meta
        self.calls: dict[CellKey, list[Row]] = defaultdict(list)
        self.by_round: dict[tuple[CellKey, int], Row] = {}
        self.subjects: list[str] = []
        self.upstream: dict[str, str | None] = {}
        for r in rows:
            name = str(r.get("subject") or "")
            if name and name not in self.upstream:
                self.subjects.append(name)
                self.upstream[name] = r.get("upstream")
            if r.get("scenario") == "calls" and r.get("status") in ("ok", "errors", "aborted"):
                key = (name, r["era"], r["payload"], r["concurrency"])
                self.calls[key].append(r)
                self.by_round[(key, r["round"])] = r
        index = {s.name: i for i, s in enumerate(catalog())}
        self.notes = {s.name: s.note for s in catalog()}
        self.subjects.sort(key=lambda s: (index.get(s, len(index)), s))
        self.eras = sorted({k[1] for k in self.calls}, key=lambda e: (e != "handshake", e))
        self.payloads = sorted({k[2] for k in self.calls})
        self.concurrency = sorted({k[3] for k in self.calls})

    def values(self, key: CellKey, get: Callable[[Row], float | None]) -> list[float]:
        out = []
        for r in self.calls.get(key, []):
            v = get(r)
            if v is not None:
                out.append(float(v))
        return out

    def _paired(
        self, key: CellKey, base: str, get: Callable[[Row], float | None]
    ) -> list[tuple[float, float]]:
        """(value, the baseline's value in the same round and cell), for rounds where both exist."""
        out = []
        base_key = (base, key[1], key[2], key[3])
        for r in self.calls.get(key, []):
            b = self.by_round.get((base_key, r["round"]))
            v, bv = get(r), get(b) if b else None
            if v is not None and bv is not None:
                out.append((float(v), float(bv)))
        return out

    def ratios(self, key: CellKey, base: str, get: Callable[[Row], float | None]) -> list[float]:
        """Per-round value / the baseline's value in the same round and cell."""
        return [v / bv for v, bv in self._paired(key, base, get) if bv]

    def deltas(self, key: CellKey, base: str, get: Callable[[Row], float | None]) -> list[float]:
        """Per-round value - the baseline's value in the same round and cell."""
        return [v - bv for v, bv in self._paired(key, base, get)]

    def scenario_rows(self, scenario: str, subject: str) -> list[Row]:
        return [r for r in self.rows if r.get("scenario") == scenario and r.get("subject") == subject]


def thr(r: Row | None) -> float | None:
    return None if r is None else r.get("throughput")


def lat(p: str) -> Callable[[Row | None], float | None]:
    def get(r: Row | None) -> float | None:
        return None if r is None else (r.get("latency_ms") or {}).get(p)

    return get


def ratio_text(values: list[float]) -> str:
    if not values:
        return ""
    med = statistics.median(values)
    if len(values) == 1:
        return f"×{med:.2f}"
    return f"×{med:.2f} [{min(values):.2f}–{max(values):.2f}]"


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def throughput_tables(res: Results) -> list[str]:
    out = []
    for era in res.eras:
        for payload in res.payloads:
            rows = []
            for s in res.subjects:
                cells = []
                for c in res.concurrency:
                    key = (s, era, payload, c)
                    vals = res.values(key, thr)
                    text = med_range(vals)
                    ratio = ratio_text(res.ratios(key, BASELINE, thr)) if vals and s != BASELINE else ""
                    if ratio:
                        text += " " + ratio
                    cells.append(text)
                if any(c != "–" for c in cells):
                    rows.append([f"`{s}`", *cells])
            if rows:
                out.append(f"#### {era} era, {payload_name(payload)} payload\n")
                out.append(table(["subject", *[f"C={c}" for c in res.concurrency]], rows) + "\n")
    return out


def latency_tables(res: Results) -> list[str]:
    out = []
    small = res.payloads[0] if res.payloads else 32
    for c in (1, TARGET_C):
        if c not in res.concurrency:
            continue
        for era in res.eras:
            rows = []
            for s in res.subjects:
                key = (s, era, small, c)
                if not res.calls.get(key):
                    continue
                delta = res.deltas(key, BASELINE_JSON, lat("p50"))
                rows.append(
                    [
                        f"`{s}`",
                        med_range(res.values(key, lat("p50")), 3),
                        med_range(res.values(key, lat("p90")), 3),
                        med_range(res.values(key, lat("p99")), 3),
                        med_range(res.values(key, lat("max")), 3),
                        f"{statistics.median(delta):+.3f}" if delta else "–",
                    ]
                )
            if rows:
                out.append(f"#### C={c}, {era} era, {payload_name(small)}: latency (ms)\n")
                header = ["subject", "p50", "p90", "p99", "max", "Δp50 vs direct-json"]
                out.append(table(header, rows) + "\n")
    return out


def cost_table(res: Results) -> list[str]:
    out = []
    small = res.payloads[0] if res.payloads else 32
    c = TARGET_C if TARGET_C in res.concurrency else (res.concurrency[-1] if res.concurrency else 0)
    for era in res.eras:
        rows = []
        for s in res.subjects:
            key = (s, era, small, c)
            if not res.calls.get(key):
                continue
            rows.append(
                [
                    f"`{s}`",
                    med_range(res.values(key, lambda r: r.get("cpu_us_per_call")), 0),
                    med_range(res.values(key, lambda r: r.get("rss_peak_mb")), 1),
                    med_range(res.values(key, lambda r: r.get("procs_peak")), 0),
                    med_range(res.values(key, lambda r: (r.get("setup_ms") or {}).get("p50")), 2),
                    med_range(res.values(key, lambda r: (r.get("setup_ms") or {}).get("p99")), 2),
                ]
            )
        if rows:
            out.append(f"#### C={c}, {era} era, {payload_name(small)}: cost of the subject's process tree\n")
            header = ["subject", "CPU µs/call", "peak RSS MB", "processes", "set-up p50 ms", "set-up p99 ms"]
            out.append(table(header, rows) + "\n")
    return out


def session_table(res: Results) -> list[str]:
    rows = []
    for s in res.subjects:
        starts = [
            r for r in res.scenario_rows("start", s) if r.get("status") == "ok" and r.get("phase") == "idle"
        ]
        idle = [r for r in res.scenario_rows("idle", s) if r.get("status") != "failed"]
        storm = [r for r in res.scenario_rows("storm", s) if r.get("status") != "failed"]
        if not (starts or idle or storm):
            continue
        rows.append(
            [
                f"`{s}`",
                med_range([r["idle_rss_mb"] for r in starts], 1),
                med_range([r["ready_s"] for r in starts], 2),
                med_range([r["opened"] for r in idle], 0),
                med_range(
                    [r["rss_per_session_kb"] for r in idle if r.get("rss_per_session_kb") is not None], 2
                )
                + (" (with set-up failures)" if any(r.get("setup_failures") for r in idle) else ""),
                " ".join(f"{r.get('alive')}/{r.get('alive_checked')}" for r in idle) or "–",
                med_range([r["sessions_per_s"] for r in storm], 0),
                med_range([r["setup_ms"]["p50"] for r in storm if r.get("setup_ms")], 2),
                med_range([r["setup_ms"]["p99"] for r in storm if r.get("setup_ms")], 2),
                med_range([r["rss_peak_mb"] for r in storm], 0),
            ]
        )
    if not rows:
        return []
    header = [
        "subject",
        "RSS idle MB",
        "start s",
        "idle sessions",
        "KB/idle session",
        "alive",
        "storm sessions/s",
        "storm set-up p50 ms",
        "p99 ms",
        "storm peak RSS MB",
    ]
    return [table(header, rows) + "\n"]


def subjects_table(res: Results) -> list[str]:
    rows = []
    for s in res.subjects:
        starts = res.scenario_rows("start", s)
        ok = [r for r in starts if r.get("status") == "ok"]
        failed = [r for r in starts if r.get("status") == "failed"]
        skipped = [r for r in starts if r.get("status") == "skipped"]
        if skipped and not ok:
            state = "not installed"
        else:
            state = f"{len(ok)} ok" + (f", **{len(failed)} failed**" if failed else "")
        modern = "–"
        if ok:
            modern = "yes" if all(not r.get("modern_error") for r in ok) else "no"
        rows.append(
            [
                f"`{s}`",
                res.notes.get(s, ""),
                state,
                med_range([r["ready_s"] for r in ok], 2),
                med_range([r["idle_rss_mb"] for r in ok], 1),
                med_range([r.get("idle_root_rss_mb") or 0.0 for r in ok], 1),
                med_range([r["idle_procs"] for r in ok], 0),
                modern,
            ]
        )
    header = [
        "subject",
        "what",
        "starts",
        "start s",
        "idle RSS MB, tree",
        "own process",
        "processes",
        "answers 2026-07-28",
    ]
    return [table(header, rows) + "\n"] if rows else []


def problems(res: Results) -> list[str]:
    lines = []
    for r in res.rows:
        status = r.get("status")
        if status in (None, "ok"):
            continue
        where = f"round {r.get('round', 0) + 1}, `{r.get('subject')}`, {r.get('scenario')}"
        if r.get("scenario") == "calls":
            where += f" {r.get('era')} {payload_name(r.get('payload', 0))} C={r.get('concurrency')}"
        elif r.get("scenario") == "start":
            where += f" ({r.get('phase')})"
        if status in ("failed", "skipped", "unsupported"):
            detail = str(r.get("error", ""))[:300].replace("\n", " ").replace("|", "\\|")
            lines.append(f"- {where}: **{status}**: {detail}")
            continue
        counts = ", ".join(
            f"{k} {r[k]}" for k in ("misrouted", "errors", "lost", "skipped", "setup_failures") if r.get(k)
        )
        if r.get("aborted"):
            counts += f"; aborted: {r['aborted']}"
        samples = "; ".join(str(x) for x in (r.get("error_samples") or []) + (r.get("setup_samples") or []))
        samples = samples[:400].replace("\n", " ").replace("|", "\\|")
        lines.append(f"- {where}: **{status}**: {counts}" + (f" — {samples}" if samples else ""))
    return lines


def correctness_table(res: Results) -> list[str]:
    rows = []
    for s in res.subjects:
        cells = [
            r for r in res.rows if r.get("subject") == s and r.get("scenario") in ("calls", "storm", "idle")
        ]
        if not cells:
            continue
        ok = sum(int(r.get("ok") or 0) for r in cells)
        total = {
            k: sum(int(r.get(k) or 0) for r in cells) for k in ("misrouted", "errors", "lost", "skipped")
        }
        unsupported = sum(1 for r in cells if r.get("status") == "unsupported")
        failed = sum(1 for r in cells if r.get("status") == "failed")
        rows.append(
            [
                f"`{s}`",
                fmt(ok),
                *(fmt(total[k]) for k in ("misrouted", "errors", "lost", "skipped")),
                str(unsupported),
                str(failed),
            ]
        )
    header = ["subject", "verified", "misrouted", "errors", "lost", "skipped", "cells unsupported", "failed"]
    return [table(header, rows) + "\n"] if rows else []


def targets(res: Results) -> list[str]:
    """The issue's targets, checked for every mcp-bastion subject (handshake era, 32 B)."""
    era, small = "handshake", 32
    if TARGET_C not in res.concurrency or small not in res.payloads or era not in res.eras:
        return []
    lines = []
    for s in res.subjects:
        if not s.startswith("bastion-") or s.startswith(TUNNEL):
            continue  # the tunnel has targets of its own, against the direct gateway path
        up = res.upstream.get(s)
        key = (s, era, small, TARGET_C)
        mine = median(res.values(key, thr))
        if mine is None:
            lines.append(f"- `{s}`: no measurement")
            continue
        peers = [p for p in res.subjects if res.upstream.get(p) == up and not p.startswith(("bastion-",))]
        peers = [p for p in peers if res.upstream.get(p) is not None]
        best_peer = max(
            ((p, median(res.values((p, era, small, TARGET_C), thr)) or 0.0) for p in peers),
            key=lambda x: x[1],
            default=None,
        )
        checks = []
        if best_peer and best_peer[1]:
            need = 1.5 if up == "raw" else 1.25
            ok = mine >= need * best_peer[1]
            checks.append(f"{mine / best_peer[1]:.2f}× best peer `{best_peer[0]}` (need {need}×) {tick(ok)}")
        if up == "raw":
            ceiling = median(res.values((CEILING, era, small, TARGET_C), thr))
            if ceiling:
                checks.append(f"{mine / ceiling:.2f}× ceiling (need 0.5×) {tick(mine >= 0.5 * ceiling)}")
            floor = median(res.values((FLOOR, era, small, TARGET_C), thr))
            if ceiling and floor:
                hop = f"{floor / ceiling:.2f}× ceiling; this path {mine / floor:.2f}× it"
                checks.append(f"(`{FLOOR}`, the hop alone: {hop})")
        else:
            ratio = median(res.ratios(key, BASELINE, thr))
            if ratio:
                checks.append(f"{ratio:.2f}× direct-sse (need 1×) {tick(ratio >= 1)}")
            if 1 in res.concurrency:
                delta = res.deltas((s, era, small, 1), BASELINE_JSON, lat("p50"))
                if delta:
                    d = statistics.median(delta)
                    checks.append(f"C=1 p50 {d:+.3f} ms vs direct-json (need ≤ +0.3) {tick(d <= 0.3)}")
        lines.append(f"- `{s}` at C={TARGET_C}: " + "; ".join(checks))
    for s in res.subjects:
        if s.startswith("bastion-expose"):
            starts = [
                r.get("idle_root_rss_mb") or r["idle_rss_mb"]
                for r in res.scenario_rows("start", s)
                if r.get("status") == "ok"
            ]
            per = [
                r["rss_per_session_kb"] for r in res.scenario_rows("idle", s) if r.get("rss_per_session_kb")
            ]
            if starts:
                m = statistics.median(starts)
                lines.append(
                    f"- `{s}` idle RSS of the gateway process {m:.1f} MB (need ≤ 60) {tick(m <= 60)}"
                )
            if per:
                m = statistics.median(per)
                lines.append(f"- `{s}` {m:.2f} KB per idle session (need ≤ 10) {tick(m <= 10)}")
    return lines


def direct_path(subject: str) -> str:
    """The gateway path a tunnel subject is compared with: the same URL, the server run locally."""
    return "bastion-single/" + subject.split("/", 1)[1]


def tunnel_section(res: Results) -> list[str]:
    """What the tunnel adds over the direct gateway path, measured in the same round and cell."""
    small = res.payloads[0] if res.payloads else 32
    if not res.concurrency:
        return []
    # Latency alone (the lowest C, 1 in a full run) and under load (C=50, or the highest C run).
    top = TARGET_C if TARGET_C in res.concurrency else res.concurrency[-1]
    levels = sorted({res.concurrency[0], top})
    rows, checks = [], []
    for s in res.subjects:
        if not s.startswith(TUNNEL):
            continue
        base = direct_path(s)
        for era in res.eras:
            cells = []
            for c in levels:
                key = (s, era, small, c)
                delta = res.deltas(key, base, lat("p50"))
                cells.append(med_range(res.values(key, lat("p50")), 3))
                cells.append(med_range(res.values((base, era, small, c), lat("p50")), 3))
                cells.append(f"{statistics.median(delta):+.3f}" if delta else "–")
            key = (s, era, small, top)
            ratio = res.ratios(key, base, thr)
            cells.append(med_range(res.values(key, thr)))
            cells.append(ratio_text(ratio) or "–")
            if any(c != "–" for c in cells):
                rows.append([f"`{s}`", era, *cells])
            parts = []
            added = res.deltas((s, era, small, 1), base, lat("p50"))
            if added:
                d = statistics.median(added)
                ok = d <= TUNNEL_MAX_ADDED_P50_MS
                parts.append(f"C=1 p50 {d:+.3f} ms (need ≤ +{TUNNEL_MAX_ADDED_P50_MS:g}) {tick(ok)}")
            if ratio and top == TARGET_C:
                r = statistics.median(ratio)
                ok = r >= TUNNEL_MIN_THROUGHPUT
                parts.append(
                    f"C={TARGET_C} throughput ×{r:.2f} (need ≥ ×{TUNNEL_MIN_THROUGHPUT:g}) {tick(ok)}"
                )
            if parts:
                checks.append(f"- `{s}` vs `{base}`, {era} era: " + "; ".join(parts))
    if not rows:
        return []
    header = ["subject", "era"]
    for c in levels:
        header += [f"p50 C={c}", "direct path", "Δ"]
    header += [f"calls/s C={top}", "× direct path"]
    intro = (
        f"Latency p50 in ms ({payload_name(small)} payload) and throughput of `{TUNNEL}U` against the "
        "direct gateway path `bastion-single/U` (same URL, same upstream, the server run by the gateway "
        "itself); Δ and × are per-round differences and ratios, median [min–max].\n"
    )
    return [intro, table(header, rows) + "\n", *checks, ""]


def tick(ok: bool) -> str:
    return "✅" if ok else "❌"


def markdown(res: Results) -> str:
    env = res.meta.get("environment", {})
    plan = res.meta.get("plan", {})
    rounds = plan.get("rounds", "?")
    parts = [
        "# mcp-bastion benchmark results\n",
        f"- date: {env.get('date')}; git {env.get('git')}; "
        f"preset `{res.meta.get('preset')}`, {rounds} round(s)",
        f"- machine: {env.get('cpus')} × {env.get('cpu')}; pinned: {res.meta.get('pinned')}"
        + (
            " (subject + upstream on CPU 0, load generator on CPU 1)"
            if res.meta.get("upstream_cpu") is None
            else " (subject on CPU 0; upstreams and the tunnel's connector on CPU "
            f"{res.meta['upstream_cpu']}, load generator on CPU 1)"
        ),
        f"- Python {env.get('python')}, Node {env.get('node')}; packages {env.get('packages')}",
        f"- peers: {env.get('peers')}",
        f"- command: `{env.get('command')}`\n",
        "Medians over rounds with [min–max]; `×` = ratio to `direct-sse` in the same round and cell "
        "(median [min–max] of the per-round ratios). Throughput = verified calls per second.\n",
    ]
    parts += ["## Subjects\n", *subjects_table(res)]
    tgt = targets(res)
    if tgt:
        parts += ["## Targets (issue 3)\n", *tgt, ""]
    tunnel = tunnel_section(res)
    if tunnel:
        parts += ["## The tunnel path (issue 5)\n", *tunnel]
    parts += ["## Throughput (verified calls/s)\n", *throughput_tables(res)]
    parts += ["## Latency\n", *latency_tables(res)]
    parts += ["## CPU, memory and session set-up under load\n", *cost_table(res)]
    parts += ["## Sessions: idle RSS and the set-up storm\n", *session_table(res)]
    parts += ["## Correctness\n", *correctness_table(res)]
    probs = problems(res)
    if probs:
        parts += ["### Everything that was not clean\n", *probs, ""]
    plots = (
        sorted(p.name for p in res.meta.get("_dir", Path(".")).glob("*.png")) if res.meta.get("_dir") else []
    )
    if plots:
        parts += ["## Plots\n", *(f"![{p}]({p})" for p in plots), ""]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


_FIXED_STYLE = {
    "direct-sse": ("black", "-"),
    "direct-json": ("dimgray", "--"),
    CEILING: ("gray", ":"),
    "starlette-ceiling": ("darkgray", "-."),
    FLOOR: ("silver", "--"),
}
_BRIDGE_COLORS = {
    "bastion-expose": "tab:red",
    "bastion-agg": "tab:orange",
    "bastion-single": "tab:brown",
    "bastion-tunnel": "tab:pink",
    "mcp-proxy-py": "tab:blue",
    "fastmcp": "tab:purple",
    "supergateway": "tab:green",
    "mcp-proxy-js": "tab:cyan",
}


def _style(subject: str) -> dict[str, Any]:
    """The same colour for a subject in every panel and plot."""
    if subject in _FIXED_STYLE:
        color, ls = _FIXED_STYLE[subject]
        return {"color": color, "linestyle": ls, "linewidth": 2}
    bridge = subject.split("/")[0]
    return {
        "color": _BRIDGE_COLORS.get(bridge, "tab:olive"),
        "linestyle": "-",
        "marker": "o",
        "markersize": 4,
    }


def plots(res: Results, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    ups = sorted({u for u in res.upstream.values() if u is not None}) or ["-"]
    for era in res.eras:
        fig, axes = plt.subplots(
            len(res.payloads), len(ups), figsize=(6.5 * len(ups), 4.5 * len(res.payloads)), squeeze=False
        )
        for i, payload in enumerate(res.payloads):
            for j, up in enumerate(ups):
                ax = axes[i][j]
                for s in res.subjects:
                    if res.upstream.get(s) not in (None, up):
                        continue
                    xs, ys, lo, hi = [], [], [], []
                    for c in res.concurrency:
                        vals = res.values((s, era, payload, c), thr)
                        if vals:
                            m = statistics.median(vals)
                            xs.append(c)
                            ys.append(m)
                            lo.append(m - min(vals))
                            hi.append(max(vals) - m)
                    if xs:
                        ax.errorbar(xs, ys, yerr=[lo, hi], label=s, capsize=3, **_style(s))
                ax.set_xscale("log")
                ax.set_xticks(res.concurrency)
                ax.set_xticklabels([str(c) for c in res.concurrency])
                ax.set_yscale("log")
                ax.set_xlabel("concurrent sessions (C)")
                ax.set_ylabel("verified calls/s (log)")
                ax.set_title(f"{era} era, {payload_name(payload)}, upstream: {up}")
                ax.grid(True, alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
        fig.suptitle("Throughput against concurrency (median, min–max bars)")
        fig.tight_layout()
        path = out / f"throughput_{era}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if TARGET_C in res.concurrency and res.payloads:
        small = res.payloads[0]
        fig, axes = plt.subplots(
            len(res.eras), len(ups), figsize=(6.5 * len(ups), 4.5 * len(res.eras)), squeeze=False
        )
        for i, era in enumerate(res.eras):
            for j, up in enumerate(ups):
                ax = axes[i][j]
                for s in res.subjects:
                    if res.upstream.get(s) not in (None, up):
                        continue
                    cdfs = [r["latency_cdf_ms"] for r in res.calls.get((s, era, small, TARGET_C), [])]
                    cdfs = [c for c in cdfs if c]
                    if not cdfs:
                        continue
                    n = min(len(c) for c in cdfs)
                    xs = [statistics.median(c[k] for c in cdfs) for k in range(n)]
                    pts = [*range(0, 100), 99.9, 100][:n]
                    ax.plot(
                        xs,
                        pts,
                        label=s,
                        **{k: v for k, v in _style(s).items() if k not in ("marker", "markersize")},
                    )
                ax.set_xscale("log")
                ax.set_xlabel("latency (ms, log)")
                ax.set_ylabel("percentile")
                ax.set_title(f"C={TARGET_C}, {era} era, {payload_name(small)}, upstream: {up}")
                ax.grid(True, alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
        fig.suptitle(f"Latency CDF at C={TARGET_C} (median of each percentile over rounds)")
        fig.tight_layout()
        path = out / f"latency_cdf_c{TARGET_C}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def build(out: Path, with_plots: bool = True) -> Path:
    rows = load(out / "raw.jsonl")
    meta_path = out / "meta.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    res = Results(rows, meta)
    if with_plots:
        plots(res, out)
    res.meta["_dir"] = out
    path = out / "results.md"
    path.write_text(markdown(res), encoding="utf-8")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="a results directory with raw.jsonl")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args()
    print(build(a.dir, not a.no_plots))


if __name__ == "__main__":
    main()

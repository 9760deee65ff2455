"""The tunnel over a real network: namespaces, veth links, a cut cable, a black hole, a slow path.

    client ns: MCP SDK ──▶ gateway ns: mcp-bastion serve ◀── tunnel ── private ns: mcp-bastion connect
                                                                              └ notes server (stdio)

``client`` reaches only the gateway and ``private`` is reachable from nowhere (nftables drops every new
inbound connection): the notes server's tools are served to the client through the connection that
``private`` dialled out. Then, in the middle of a load of concurrent calls (20 sessions, both eras,
``echo`` with unique payloads, ``slow``, ``add_note``), the private link is cut (``ip link set down``)
or black-holed (nftables drop: packets vanish, nothing is reset) and restored:

* every call is answered, a result or a clear JSON-RPC error, within its deadline;
* no reply reaches the wrong caller (every echo is the caller's own payload);
* no call is executed twice (each note appears at most once; each acknowledged note exactly once);
* the connector notices the dead link by its heartbeats and reconnects by itself (same process);
* the sessions that were open work again afterwards.

A third run puts the test's fault relay in the path (delay and jitter, then a reset of the link).
Needs root: without namespaces these tests fail, they never skip.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from tests.support.external import REPO_ROOT, stop_process
from tests.support.fault_relay import RelayControl, relay_process
from tests.support.netns import Network, network

pytestmark = pytest.mark.timeout(600)

BASTION = [sys.executable, "-m", "mcp_bastion"]
NOTES_SERVER = [sys.executable, str(REPO_ROOT / "tests" / "servers" / "notes_server.py")]
PORT = 8080  # inside the gateway namespace: nothing else listens there
CONNECTOR = "laptop"
HEARTBEAT = 1.0  # the connector's; 3 missed heartbeats: the link is dead
SESSIONS = 20
DEADLINE = 90.0  # seconds each call of the load may take, answer or error
SLOW = 2.0  # seconds each `slow` call takes


# --------------------------------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------------------------------

# Prints the status and JSON body of /readyz; exit status 3 while nothing answers (still starting).
READYZ = """
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        status, body = r.status, r.read()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
except urllib.error.URLError:
    sys.exit(3)
print(json.dumps({"status": status, "body": json.loads(body or b"null")}))
"""


@dataclass
class Chain:
    net: Network
    tmp: Path
    gateway: subprocess.Popen[bytes]
    gateway_log: Path
    connector: subprocess.Popen[bytes] | None = None
    connector_log: Path | None = None
    connect_url: str = ""

    @property
    def client_url(self) -> str:
        return f"http://{self.net.address('gateway', 'client')}:{PORT}/servers/notes/mcp"

    def readyz(self) -> dict[str, Any]:
        """The gateway's /readyz, asked from inside its namespace (the host cannot reach it)."""
        done = self.net.run("gateway", [sys.executable, "-c", READYZ, f"http://127.0.0.1:{PORT}/readyz"])
        if done.returncode == 3:
            return {"status": None}
        assert done.returncode == 0, done.stderr
        reply: dict[str, Any] = json.loads(done.stdout)["body"]
        return reply

    def attached(self) -> dict[str, Any] | None:
        """The connector's entry in /readyz (``since``, ``from``, ``servers``), None when detached."""
        connectors: dict[str, Any] = self.readyz().get("connectors") or {}
        return connectors.get(CONNECTOR)

    def wait(self, what: str, ok: Callable[[], bool], limit: float = 120.0) -> None:
        """Poll until ``ok()``; the limit only keeps a broken run from hanging."""
        deadline = time.monotonic() + limit
        while not ok():
            for proc, log in ((self.gateway, self.gateway_log), (self.connector, self.connector_log)):
                if proc is not None and proc.poll() is not None:
                    text = log.read_text(errors="replace")[-4000:] if log else ""
                    raise AssertionError(f"waiting for {what}: a process exited ({proc.returncode}):\n{text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {limit:.0f} s:\n{self.logs()}")
            time.sleep(0.25)

    def start_connector(self, url: str) -> None:
        config = self.tmp / "connector.json"
        config.write_text(
            json.dumps({"mcpServers": {"notes": {"command": NOTES_SERVER[0], "args": NOTES_SERVER[1:]}}})
        )
        token = (self.tmp / "token").read_text().strip()
        self.connect_url = url
        self.connector_log = self.tmp / "connector.log"
        argv = [
            *BASTION,
            "connect",
            url,
            "--config",
            str(config),
            "--insecure-http",
            "--heartbeat",
            str(HEARTBEAT),
        ]
        env = {**os.environ, "MCP_BASTION_CONNECTOR_TOKEN": token}
        self.connector = self.net.start("private", argv, log=self.connector_log, env=env, cwd=REPO_ROOT)
        self.wait(
            "connector attached", lambda: self.attached() is not None and self.readyz().get("ready") is True
        )

    def connector_events(self, event: str) -> list[dict[str, Any]]:
        assert self.connector_log is not None
        out = []
        for line in self.connector_log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == event:
                out.append(entry)
        return out

    def client(self, *args: str) -> Any:
        done = self.net.run(
            "client", [sys.executable, "-m", "tests.support.tunnel_client", *args], timeout=180, env=None
        )
        assert done.returncode == 0, f"client {args}: {done.stderr[-3000:]}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    def logs(self) -> str:
        parts = [f"--- gateway:\n{self.gateway_log.read_text(errors='replace')[-3000:]}"]
        if self.connector_log is not None:
            parts.append(f"--- connector:\n{self.connector_log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    """The network, a gateway in ``gateway`` with a connector token; the test starts the connector."""
    with network() as net:
        data = tmp_path / "gateway-data"
        made = subprocess.run(
            [*BASTION, "connectors", "add", CONNECTOR, "--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        assert len(made.stdout.splitlines()) == 1  # the token, alone on stdout
        (tmp_path / "token").write_text(made.stdout.strip())
        config = tmp_path / "gateway.json"
        config.write_text(json.dumps({"mcpServers": {}}))  # connectors only: no server of its own
        log = tmp_path / "gateway.log"
        argv = [
            *BASTION,
            "serve",
            "--config",
            str(config),
            "--host",
            "0.0.0.0",  # inside the gateway namespace: its loopback and its two links
            "--port",
            str(PORT),
            "--data-dir",
            str(data),
            "--no-auth",
            "--allow-host",
            f"{net.address('gateway', 'client')}:*",
            "--allow-host",
            f"{net.address('gateway', 'private')}:*",
        ]
        gateway = net.start("gateway", argv, log=log, cwd=REPO_ROOT)
        chain = Chain(net, tmp_path, gateway, log)
        try:
            chain.wait("gateway up", lambda: "servers" in chain.readyz())
            yield chain
        finally:
            if chain.connector is not None:
                stop_process(chain.connector)
            stop_process(gateway)


# --------------------------------------------------------------------------------------------------
# The load, run by the MCP SDK in the client namespace
# --------------------------------------------------------------------------------------------------


class Load:
    """``tunnel_client load`` running in ``client``: commands on stdin, answers line by line."""

    def __init__(self, chain: Chain) -> None:
        argv = [
            sys.executable,
            "-m",
            "tests.support.tunnel_client",
            "load",
            chain.client_url,
            "--sessions",
            str(SESSIONS),
            "--deadline",
            str(DEADLINE),
            "--slow",
            str(SLOW),
        ]
        self.stderr = (chain.tmp / "load.stderr").open("wb")
        self.proc = subprocess.Popen(
            chain.net.argv("client", argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            cwd=REPO_ROOT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()

    def _pump(self, out: IO[str]) -> None:
        for line in out:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, limit: float = DEADLINE + 60) -> str:
        try:
            line = self.lines.get(timeout=limit)
        except queue.Empty:
            raise AssertionError(f"the load client said nothing for {limit:.0f} s") from None
        if line is None:
            raise AssertionError(f"the load client exited ({self.proc.wait()})")
        return line

    def say(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.expect()

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.close()
        result: dict[str, Any] = json.loads(self.expect())
        assert self.proc.wait(timeout=60) == 0
        self.stderr.close()
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


@dataclass
class Verdict:
    calls: list[dict[str, Any]]
    errors: Counter[tuple[int | None, str]]
    in_flight_at_fault: int


def judge(result: dict[str, Any], fault_mark: str) -> Verdict:
    """Every call answered within its deadline, by its own answer or a clear error; none misrouted."""
    assert not result["failures"], result["failures"]
    calls: list[dict[str, Any]] = result["calls"]
    outcomes = Counter(c["outcome"] for c in calls)
    bad = [c for c in calls if c["outcome"] not in ("ok", "error")]
    assert not bad, f"{outcomes}; e.g. {bad[:5]}"  # deadline, wrong, tool_error or exception
    for c in calls:
        assert c["ended"] - c["started"] <= result["deadline"], c
        if c["outcome"] == "error":
            assert isinstance(c["code"], int) and c["message"].strip(), c  # a clear JSON-RPC error
    fault = result["marks"][fault_mark]
    in_flight = sum(1 for c in calls if c["started"] < fault < c["ended"])
    errors = Counter((c["code"], c["message"]) for c in calls if c["outcome"] == "error")
    return Verdict(calls, errors, in_flight)


def check_no_replay(chain: Chain, calls: list[dict[str, Any]]) -> None:
    """``add_note`` ran at most once per call, and exactly once for each call that was acknowledged."""
    notes = Counter(chain.client("notes", chain.client_url))
    mine = {c["payload"]: c for c in calls if c["worker"] == "note"}
    assert mine, "the load made no add_note calls"
    twice = [n for n, k in notes.items() if k > 1]
    assert not twice, f"executed more than once: {twice[:5]}"
    missing = [p for p, c in mine.items() if c["outcome"] == "ok" and p not in notes]
    assert not missing, f"acknowledged but not stored: {missing[:5]}"
    strangers = [n for n in notes if n not in mine]
    assert not strangers, f"notes nobody sent: {strangers[:5]}"


def run_fault(chain: Chain, break_link: Callable[[], None], mend_link: Callable[[], None]) -> Verdict:
    """Load, break the private link, wait for both ends to notice, mend it, wait for the reconnect."""
    pid = chain.connector.pid if chain.connector else None
    before = chain.attached()
    assert before is not None
    lost_before = len(chain.connector_events("link_lost"))
    load = Load(chain)
    try:
        assert load.expect() == "ready"
        assert load.say("mark fault") == "marked fault"
        break_link()
        # The connector notices by its heartbeats (nothing else tells it: no RST, no FIN)...
        chain.wait(
            "connector noticing the dead link", lambda: len(chain.connector_events("link_lost")) > lost_before
        )
        lost = chain.connector_events("link_lost")[lost_before]
        assert "no frame from the peer" in lost["reason"], lost
        # ...and so does the gateway: its own heartbeats time out, the connector is detached.
        chain.wait("gateway noticing the dead link", lambda: chain.attached() is None)
        assert load.say("mark mended") == "marked mended"
        mend_link()
        chain.wait("connector back", lambda: chain.attached() is not None)
        assert load.say("mark back") == "marked back"
        # The sessions opened before the fault work again, through the new link.
        assert load.say("await_ok back") == "all ok after back"
        result = load.stop()
    finally:
        load.kill()
    after = chain.attached()
    assert after is not None and after["since"] != before["since"]
    assert chain.connector is not None and chain.connector.poll() is None and chain.connector.pid == pid
    verdict = judge(result, "fault")
    # The fault hit calls in flight (each session's `slow` call nearly always is: 2 s each, back to back).
    assert verdict.in_flight_at_fault >= SESSIONS // 2, verdict.in_flight_at_fault
    check_no_replay(chain, verdict.calls)
    report(verdict)
    return verdict


def report(verdict: Verdict) -> None:
    """What the run saw (shown with ``pytest -s``, and in the output of a failure)."""
    outcomes = Counter(c["outcome"] for c in verdict.calls)
    print(
        f"\n{len(verdict.calls)} calls {dict(outcomes)}; {verdict.in_flight_at_fault} in flight at the fault"
    )
    for (code, message), n in verdict.errors.most_common():
        print(f"  {n} x {code}: {message[:160]}")


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------


def test_private_servers_reach_the_client_through_the_tunnel(chain: Chain) -> None:
    net = chain.net
    # Nothing reaches private: not the client, not the gateway (the connector dials out).
    private = net.address("private")
    assert net.tcp_probe("client", private, PORT) == "unreachable"
    assert net.tcp_probe("gateway", private, PORT) == "timeout"
    chain.start_connector(f"http://{net.address('gateway', 'private')}:{PORT}")
    attached = chain.attached()
    assert attached is not None and attached["servers"] == ["notes"]
    assert attached["from"].startswith(net.address("private"))
    seen = chain.client("check", chain.client_url)
    for era, protocol in (("legacy", "2025-11-25"), ("auto", "2026-07-28")):
        assert seen[era]["protocol"] == protocol
        assert "echo" in seen[era]["tools"] and "slow" in seen[era]["tools"]
        assert seen[era]["echo_ok"] is True


def test_cut_link_under_load(chain: Chain) -> None:
    chain.start_connector(f"http://{chain.net.address('gateway', 'private')}:{PORT}")
    verdict = run_fault(
        chain,
        lambda: chain.net.cut("private", end="private"),
        lambda: chain.net.restore("private", end="private"),
    )
    assert verdict.errors, "the cut failed no call: it did not happen under load"


def test_blackholed_link_under_load(chain: Chain) -> None:
    chain.start_connector(f"http://{chain.net.address('gateway', 'private')}:{PORT}")
    verdict = run_fault(
        chain, lambda: chain.net.blackhole("private"), lambda: chain.net.unblackhole("private")
    )
    assert verdict.errors, "the black hole failed no call: it did not happen under load"


def test_slow_jittery_path_through_the_fault_relay(chain: Chain) -> None:
    """Through the relay (20 ms ± 10 ms each way): everything is correct, only slower; then a reset."""
    net = chain.net
    gw_private = net.address("gateway", "private")
    with relay_process(
        ("127.0.0.1", PORT),
        listen=(gw_private, 0),
        control=chain.tmp / "relay.sock",
        log=chain.tmp / "relay.log",
        wrap=lambda argv: net.argv("gateway", argv),
        delay=0.02,
        jitter=0.01,
    ) as relay:
        chain.start_connector(f"http://{gw_private}:{relay.port}")
        load = Load(chain)
        try:
            assert load.expect() == "ready"
            for mark in ("first", "second"):  # every session through the slow path, twice over
                assert load.say(f"mark {mark}") == f"marked {mark}"
                assert load.say(f"await_ok {mark}") == f"all ok after {mark}"
            result = load.stop()
        finally:
            load.kill()
        calls = result["calls"]
        assert {c["outcome"] for c in calls} == {"ok"}, Counter(c["outcome"] for c in calls)
        # Each call crossed the relay twice, held at least delay - jitter = 10 ms each way.
        assert min(c["ended"] - c["started"] for c in calls if c["worker"] == "echo") >= 0.02
        assert relay.stats()["bytes_down"] > 0
        check_no_replay(chain, calls)
        reset_under_load(chain, relay)


def reset_under_load(chain: Chain, relay: RelayControl) -> None:
    """A reset link fails the calls in flight at once with a clear error; the connector reconnects."""
    before = chain.attached()
    assert before is not None
    load = Load(chain)
    try:
        assert load.expect() == "ready"
        assert load.say("mark fault") == "marked fault"
        assert relay.reset()["resets"] >= 1
        chain.wait(
            "connector back after the reset", lambda: (chain.attached() or before)["since"] != before["since"]
        )
        assert load.say("mark back") == "marked back"
        assert load.say("await_ok back") == "all ok after back"
        result = load.stop()
    finally:
        load.kill()
    verdict = judge(result, "fault")
    report(verdict)
    assert verdict.in_flight_at_fault >= SESSIONS // 2
    assert verdict.errors, "the reset failed no call in flight"

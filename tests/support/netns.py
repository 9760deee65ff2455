"""A real network for tests, built from Linux network namespaces, veth pairs and nftables.

Three namespaces, named ``<prefix>-<pid>-<random>-{client,gateway,private}`` so that concurrent runs
never collide and a later run can sweep what a killed one left behind::

    client 10.231.1.2 ─ c0 ══ gc0 ─ gateway 10.231.1.1 | 10.231.2.1 ─ gp0 ══ p0 ─ private 10.231.2.2
                   link "client"                                   link "private"

* ``client`` has a route to its own link only, so it reaches the ``gateway`` and nothing else;
* the ``gateway`` does not forward (``ip_forward`` 0), so nothing crosses it;
* ``private`` dials out to the ``gateway``, and an nftables table in ``private`` drops every *new*
  inbound connection (only replies to its own connections and loopback get in), so nothing reaches it;
* no namespace has a default route, and no address outside these namespaces is ever used.

Faults on a link, the way a real network fails:

* :meth:`Network.cut` takes the link down (``ip link set DEV down``), :meth:`Network.restore` up again;
* :meth:`Network.blackhole` adds an nftables rule on both ends that drops every packet arriving over
  the link (they vanish: no RST, no ICMP), :meth:`Network.unblackhole` removes it.

Needs root, ``ip`` (iproute2) and ``nft`` (Debian's ``nftables``, installed by
``scripts/setup-test-tools.sh``). Where a namespace cannot be made, :func:`network` raises
:class:`NetnsUnavailable`: the test fails loudly, it never skips.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from tests.support.external import start_process

Role = Literal["client", "gateway", "private"]
LinkName = Literal["client", "private"]
ROLES: tuple[Role, ...] = ("client", "gateway", "private")
PREFIX = "mbt"

GUARD_TABLE = "mbt_guard"  # in `private`: drop new inbound connections
BLACKHOLE_TABLE = "mbt_blackhole"  # on both ends of a black-holed link


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be built here (not root, no iproute2 or nftables, kernel refused)."""


@dataclass(frozen=True)
class Link:
    """One veth pair: ``outer`` (client or private) on one end, ``gateway`` on the other."""

    name: LinkName
    outer: Role
    outer_dev: str
    outer_ip: str
    gateway_dev: str
    gateway_ip: str
    prefix_len: int = 24


LINKS: dict[LinkName, Link] = {
    "client": Link("client", "client", "c0", "10.231.1.2", "gc0", "10.231.1.1"),
    "private": Link("private", "private", "p0", "10.231.2.2", "gp0", "10.231.2.1"),
}


def _ip_binary() -> str:
    found = shutil.which("ip") or ("/usr/sbin/ip" if os.access("/usr/sbin/ip", os.X_OK) else None)
    if found is None:
        raise NetnsUnavailable("no `ip` command: install Debian's iproute2")
    return found


def _nft_binary() -> str:
    found = shutil.which("nft") or ("/usr/sbin/nft" if os.access("/usr/sbin/nft", os.X_OK) else None)
    if found is None:
        raise NetnsUnavailable(
            "no `nft` command: run scripts/setup-test-tools.sh (installs Debian's nftables)"
        )
    return found


def _run(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 30.0) -> str:
    """Run a set-up command; any failure is a loud :class:`NetnsUnavailable` with what it said."""
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsUnavailable(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(ip: str, ns: str) -> None:
    """SIGKILL whatever still runs in ``ns`` (a namespace is only freed when its last process leaves)."""
    done = subprocess.run([ip, "netns", "pids", ns], capture_output=True, text=True, check=False)
    for word in done.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(word), signal.SIGKILL)


def _delete_namespace(ip: str, ns: str) -> None:
    _kill_namespace_processes(ip, ns)
    subprocess.run([ip, "netns", "delete", ns], capture_output=True, check=False)


def list_namespaces() -> list[str]:
    ip = _ip_binary()
    out = subprocess.run([ip, "netns", "list"], capture_output=True, text=True, check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces of ``prefix`` whose creating process is gone (a run killed with SIGKILL)."""
    ip = _ip_binary()
    removed = []
    for ns in list_namespaces():
        parts = ns.split("-")
        if len(parts) >= 4 and parts[0] == prefix and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            _delete_namespace(ip, ns)
            removed.append(ns)
    return removed


_open_networks: dict[str, Network] = {}


@atexit.register
def _close_all() -> None:
    for net in list(_open_networks.values()):
        net.close()


class Network:
    """The three namespaces of one test, the two links between them, and the faults to inject."""

    def __init__(self, prefix: str = PREFIX) -> None:
        self.ip = _ip_binary()
        self.nft = _nft_binary()
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (CI runs the tests as root)")
        self.run_id = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.names: dict[Role, str] = {role: f"{self.run_id}-{role}" for role in ROLES}
        self._made: list[str] = []
        self._blackholed: set[LinkName] = set()
        _open_networks[self.run_id] = self
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction ------------------------------------------------------------------------------
    def _build(self) -> None:
        for role in ROLES:
            ns = self.names[role]
            _run([self.ip, "netns", "add", ns])
            self._made.append(ns)
            _run([self.ip, "-n", ns, "link", "set", "lo", "up"])
        gw = self.names["gateway"]
        for link in LINKS.values():
            outer = self.names[link.outer]
            # Created directly inside the namespaces: nothing ever appears in the host's namespace.
            _run(
                [
                    self.ip,
                    "link",
                    "add",
                    link.outer_dev,
                    "netns",
                    outer,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    link.gateway_dev,
                    "netns",
                    gw,
                ]
            )
            for ns, dev, addr in (
                (outer, link.outer_dev, link.outer_ip),
                (gw, link.gateway_dev, link.gateway_ip),
            ):
                _run([self.ip, "-n", ns, "addr", "add", f"{addr}/{link.prefix_len}", "dev", dev])
                _run([self.ip, "-n", ns, "link", "set", dev, "up"])
        # The gateway is an endpoint, never a router: nothing crosses it from client to private.
        self._sysctl("gateway", "net/ipv4/ip_forward", "0")
        self._sysctl("gateway", "net/ipv6/conf/all/forwarding", "0")
        # private: replies to its own (outbound) connections get in, nothing new does.
        self._nft(
            "private",
            f"""
table inet {GUARD_TABLE} {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "lo" accept
        ct state established,related accept
        drop
    }}
}}
""",
        )

    def _sysctl(self, role: Role, key: str, value: str) -> None:
        # /proc/sys/net is per namespace for a process inside it.
        _run(self.argv(role, ["sh", "-c", f"echo {value} > /proc/sys/{key}"]))

    def _nft(self, role: Role, script: str) -> None:
        _run(self.argv(role, [self.nft, "-f", "-"]), stdin=script)

    # -- running things inside -------------------------------------------------------------------
    def ns(self, role: Role) -> str:
        return self.names[role]

    def argv(self, role: Role, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace of ``role`` (``ip netns exec`` execs it: same pid)."""
        return [self.ip, "netns", "exec", self.names[role], *argv]

    def run(
        self,
        role: Role,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside ``role``; the caller checks the result."""
        return subprocess.run(
            self.argv(role, argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else dict(env),
            check=False,
        )

    def start(
        self,
        role: Role,
        argv: Sequence[str],
        *,
        log: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``role`` in its own process group (stop it with ``stop_process``)."""
        return start_process(self.argv(role, argv), log=log, env=env, cwd=cwd, stdin=stdin)

    def address(self, role: Role, toward: LinkName | None = None) -> str:
        """The address of ``role`` (the gateway has one per link: say which with ``toward``)."""
        if role == "gateway":
            if toward is None:
                raise ValueError("the gateway has an address on each link: pass toward='client' or 'private'")
            return LINKS[toward].gateway_ip
        return LINKS[role].outer_ip

    # -- faults ------------------------------------------------------------------------------------
    def cut(self, link: LinkName, end: Role = "gateway") -> None:
        """Take the link down at one end (the veth peer loses its carrier too)."""
        self._set_link(link, end, "down")

    def restore(self, link: LinkName, end: Role = "gateway") -> None:
        self._set_link(link, end, "up")

    def _set_link(self, link: LinkName, end: Role, state: str) -> None:
        spec = LINKS[link]
        if end == "gateway":
            dev = spec.gateway_dev
        elif end == spec.outer:
            dev = spec.outer_dev
        else:
            raise ValueError(f"{end} is not an end of link {link}")
        _run([self.ip, "-n", self.names[end], "link", "set", dev, state])

    def link_state(self, link: LinkName) -> dict[str, str]:
        """``{namespace role: operstate}`` of both ends, e.g. ``{"private": "UP", "gateway": "DOWN"}``."""
        spec = LINKS[link]
        out: dict[str, str] = {}
        for role, dev in ((spec.outer, spec.outer_dev), ("gateway", spec.gateway_dev)):
            text = _run([self.ip, "-n", self.names[role], "-o", "link", "show", dev])
            out[role] = text.split(" state ", 1)[1].split()[0] if " state " in text else "UNKNOWN"
        return out

    def blackhole(self, link: LinkName) -> None:
        """Drop every packet arriving over ``link`` at both ends: traffic vanishes, nothing is reset."""
        spec = LINKS[link]
        for role, dev in ((spec.outer, spec.outer_dev), ("gateway", spec.gateway_dev)):
            self._nft(
                role,
                f"""
table inet {BLACKHOLE_TABLE} {{
    chain input {{
        type filter hook input priority -10; policy accept;
        iifname "{dev}" drop
    }}
}}
""",
            )
        self._blackholed.add(link)

    def unblackhole(self, link: LinkName) -> None:
        spec = LINKS[link]
        for role in (spec.outer, "gateway"):
            _run(self.argv(role, [self.nft, "delete", "table", "inet", BLACKHOLE_TABLE]))
        self._blackholed.discard(link)

    def ruleset(self, role: Role) -> str:
        return _run(self.argv(role, [self.nft, "list", "ruleset"]))

    # -- probes --------------------------------------------------------------------------------------
    def tcp_probe(self, role: Role, host: str, port: int, timeout: float = 2.0) -> str:
        """Connect from ``role`` and read the greeting.

        Returns ``connected``, ``refused``, ``reset``, ``timeout`` or ``unreachable``.
        """
        done = self.run(
            role, [sys.executable, "-c", _PROBE, host, str(port), str(timeout)], timeout=timeout + 30
        )
        if done.returncode != 0:
            raise RuntimeError(f"probe in {role} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    @contextlib.contextmanager
    def listener(self, role: Role, host: str, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
        """A TCP server in ``role``: greets each connection with ``hello``, then echoes (reachability)."""
        from tests.support.external import stop_process

        proc = self.start(role, [sys.executable, "-c", _LISTENER, host, str(port)], log=log)
        try:
            deadline = time.monotonic() + 20
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"listener in {role} exited: {log.read_text(errors='replace')}")
                if "listening" in log.read_text(errors="replace"):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"listener in {role} did not start")
                time.sleep(0.05)
            yield proc
        finally:
            stop_process(proc)

    # -- teardown ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Kill every process left in the namespaces and delete them (safe to call twice)."""
        _open_networks.pop(self.run_id, None)
        for ns in reversed(self._made):
            _delete_namespace(self.ip, ns)
        self._made.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PROBE = """
import errno, socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(timeout)
try:
    s.connect((host, port))
    greeting = s.recv(6)
except TimeoutError:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except ConnectionResetError:
    print("reset")
except OSError as exc:
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        print("unreachable")
    else:
        raise
else:
    print("connected" if greeting == b"hello\\n" else f"connected, but it said {greeting!r}")
finally:
    s.close()
"""

_LISTENER = """
import socket, sys, threading
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(64)
print("listening", flush=True)

def serve(conn):
    with conn:
        conn.sendall(b"hello\\n")
        while data := conn.recv(65536):
            conn.sendall(data)

while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@contextlib.contextmanager
def network(prefix: str = PREFIX) -> Iterator[Network]:
    """Build the three-namespace network; always torn down, also when the test fails."""
    sweep_stale(prefix)
    net = Network(prefix)
    try:
        yield net
    finally:
        net.close()

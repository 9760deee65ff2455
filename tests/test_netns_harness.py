"""The test network and the fault relay themselves: the tunnel tests are only as good as these.

* the namespaces really isolate: ``private`` is unreachable from ``client`` and ``gateway``, ``client``
  reaches only the ``gateway``, ``private`` dials out to the ``gateway``; the namespaces go away after
  the test, also when it fails;
* a cut link refuses, a black-holed one swallows packets without a reset (an open connection
  survives and carries on once it is restored);
* the relay forwards faithfully, delays (with jitter, never reordering), caps bandwidth, stalls
  (sockets stay open) and resets; as a process in a namespace it is driven over its control socket.

Root is required (CI runs as root): without namespaces these tests fail, they do not skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.fault_relay import FaultRelay, relay_process
from tests.support.netns import list_namespaces, network

PORT = 9000  # inside the test's own namespaces: no clash with anything on the host


def test_private_is_reachable_from_nowhere(tmp_path: Path) -> None:
    with network() as net:
        gw_client, gw_private = net.address("gateway", "client"), net.address("gateway", "private")
        private, client = net.address("private"), net.address("client")
        with net.listener("private", "0.0.0.0", PORT, tmp_path / "private.log"):
            assert net.tcp_probe("private", "127.0.0.1", PORT) == "connected"  # its own loopback works
            assert net.tcp_probe("gateway", private, PORT) == "timeout"  # dropped by the guard, no reset
            assert net.tcp_probe("client", private, PORT) == "unreachable"  # no route at all
        with net.listener("gateway", "0.0.0.0", PORT, tmp_path / "gateway.log"):
            assert net.tcp_probe("client", gw_client, PORT) == "connected"
            assert net.tcp_probe("private", gw_private, PORT) == "connected"  # outbound, and replies get in
            assert net.tcp_probe("client", gw_private, PORT) == "unreachable"  # only its own link
            assert net.tcp_probe("private", gw_client, PORT) == "unreachable"
        with net.listener("client", "0.0.0.0", PORT, tmp_path / "client.log"):
            assert net.tcp_probe("private", client, PORT) == "unreachable"
        for role in ("client", "gateway", "private"):
            routes = net.run(role, ["ip", "route"]).stdout
            assert "default" not in routes, routes
        forwarding = net.run("gateway", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()
        assert forwarding == "0"
        assert "ct state established,related accept" in net.ruleset("private")


def test_namespaces_are_removed_even_when_the_test_fails(tmp_path: Path) -> None:
    made: list[str] = []
    leftover: subprocess.Popen[bytes] | None = None
    with pytest.raises(RuntimeError, match="boom"), network() as net:
        made = list(net.names.values())
        assert set(made) <= set(list_namespaces())
        assert all(name.startswith(f"mbt-{os.getpid()}-") for name in made)
        leftover = net.start("private", ["sleep", "300"])
        raise RuntimeError("boom")
    assert made and not set(made) & set(list_namespaces())
    assert leftover is not None
    assert leftover.wait(timeout=10) is not None  # killed with its namespace


def test_cut_link_refuses_and_restores(tmp_path: Path) -> None:
    with network() as net, net.listener("gateway", "0.0.0.0", PORT, tmp_path / "gw.log"):
        target = net.address("gateway", "private")
        assert net.tcp_probe("private", target, PORT) == "connected"
        net.cut("private", end="private")
        assert net.link_state("private")["private"] == "DOWN"
        assert net.tcp_probe("private", target, PORT) == "unreachable"
        net.restore("private", end="private")
        assert net.tcp_probe("private", target, PORT, timeout=10) == "connected"
        net.cut("private")  # the gateway's end: the private end loses its carrier
        assert net.link_state("private") == {"private": "DOWN", "gateway": "DOWN"}
        assert net.tcp_probe("private", target, PORT) in ("timeout", "unreachable")
        net.restore("private")
        assert net.tcp_probe("private", target, PORT, timeout=10) == "connected"
        assert net.tcp_probe("client", net.address("gateway", "client"), PORT) == "connected"


HELD_CONNECTION = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120)
assert s.recv(6) == b"hello\\n"
print("ready", flush=True)
sys.stdin.readline()
s.sendall(b"ping\\n")
sent = time.monotonic()
print("sent", flush=True)
got = b""
while not got.endswith(b"\\n"):
    got += s.recv(100)
print(f"echo {got.decode().strip()} after {time.monotonic() - sent:.3f}", flush=True)
"""


def test_blackhole_swallows_packets_without_reset(tmp_path: Path) -> None:
    hold = 1.5
    with network() as net, net.listener("gateway", "0.0.0.0", PORT, tmp_path / "gw.log"):
        target = net.address("gateway", "private")
        held = subprocess.Popen(
            net.argv("private", [sys.executable, "-c", HELD_CONNECTION, target, str(PORT)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert held.stdin is not None and held.stdout is not None
        try:
            assert held.stdout.readline().strip() == "ready"
            net.blackhole("private")
            assert "iifname" in net.ruleset("gateway") and "iifname" in net.ruleset("private")
            # New connections vanish too: no RST, no ICMP, only a timeout.
            assert net.tcp_probe("private", target, PORT, timeout=1.0) == "timeout"
            held.stdin.write("go\n")
            held.stdin.flush()
            assert held.stdout.readline().strip() == "sent"
            time.sleep(hold)
            net.unblackhole("private")
            assert "iifname" not in net.ruleset("gateway")
            word, text, _, elapsed = held.stdout.readline().split()
            # The held connection was neither reset nor lost: TCP retransmitted once the path was back.
            assert (word, text) == ("echo", "ping")
            assert float(elapsed) >= hold
            assert held.wait(timeout=30) == 0, held.stderr.read() if held.stderr else ""
        finally:
            if held.poll() is None:
                held.kill()
                held.wait()
        assert net.tcp_probe("private", target, PORT, timeout=10) == "connected"


def test_relay_process_in_a_namespace(tmp_path: Path) -> None:
    """The relay as the tunnel tests run it: in ``gateway``, driven from the host over a Unix socket."""
    with network() as net, net.listener("gateway", "127.0.0.1", PORT, tmp_path / "echo.log"):
        listen = (net.address("gateway", "private"), 0)
        with relay_process(
            ("127.0.0.1", PORT),
            listen=listen,
            control=tmp_path / "relay.sock",
            log=tmp_path / "relay.log",
            wrap=lambda argv: net.argv("gateway", argv),
        ) as relay:
            port = relay.port
            assert net.tcp_probe("private", listen[0], port) == "connected"
            assert net.tcp_probe("client", listen[0], port) == "unreachable"
            relay.set_mode("reset")
            assert net.tcp_probe("private", listen[0], port) == "reset"
            relay.resume()
            relay.configure(delay=0.3)
            started = time.monotonic()
            assert net.tcp_probe("private", listen[0], port, timeout=10) == "connected"
            assert time.monotonic() - started >= 0.3  # the greeting was held on its way back
            stats = relay.stats()
            assert stats["accepted"] == 3 and stats["resets"] >= 1 and stats["delay"] == 0.3


# --------------------------------------------------------------------------------------------------
# The relay in-process, in front of an echo server on loopback
# --------------------------------------------------------------------------------------------------


@dataclass
class Echo:
    port: int
    errors: list[BaseException] = field(default_factory=list)
    failed: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[Echo]:
    """An echo server on loopback that records the connection errors it sees (resets)."""
    echo = Echo(0)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()
        except ConnectionError as exc:
            echo.errors.append(exc)
            echo.failed.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    echo.port = int(server.sockets[0].getsockname()[1])
    try:
        yield echo
    finally:
        server.close()


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


async def test_relay_forwards_faithfully() -> None:
    async with echo_server() as echo, FaultRelay(("127.0.0.1", echo.port)) as relay:
        payload = os.urandom(3 * 1024 * 1024 + 17)
        results = await asyncio.gather(*(roundtrip(relay.port, payload[i:]) for i in range(5)))
        assert results == [payload[i:] for i in range(5)]
        stats = relay.snapshot()
        assert stats["accepted"] == 5 and stats["bytes_up"] == stats["bytes_down"] == sum(map(len, results))


async def test_relay_delay_and_jitter_keep_order() -> None:
    async with echo_server() as echo, FaultRelay(("127.0.0.1", echo.port), seed=7) as relay:
        relay.configure(delay=0.1)
        started = time.monotonic()
        assert await roundtrip(relay.port, b"x") == b"x"
        assert time.monotonic() - started >= 0.2  # held once each way
        relay.configure(delay=0.02, jitter=0.02)
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        lines = [f"{i:05d}\n".encode() for i in range(300)]
        for line in lines:  # small writes spread in time, so they are read as separate chunks
            writer.write(line)
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write_eof()
        assert await reader.read() == b"".join(lines)
        writer.close()


async def test_relay_caps_bandwidth() -> None:
    async with echo_server() as echo, FaultRelay(("127.0.0.1", echo.port)) as relay:
        relay.configure(rate=256 * 1024)
        payload = os.urandom(512 * 1024)
        started = time.monotonic()
        assert await roundtrip(relay.port, payload) == payload
        # 512 KiB at 256 KiB/s per direction: at least 2 s for the echo to be back in full.
        assert time.monotonic() - started >= 2.0
        relay.configure(rate=None)
        assert relay.rate is None


async def test_relay_stall_holds_data_and_keeps_sockets_open() -> None:
    async with echo_server() as echo, FaultRelay(("127.0.0.1", echo.port)) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"before\n")
        assert await reader.readline() == b"before\n"
        relay.stall()
        writer.write(b"during\n")
        await writer.drain()
        late_reader, late_writer = await asyncio.open_connection("127.0.0.1", relay.port)
        late_writer.write(b"late\n")
        with pytest.raises(TimeoutError):  # nothing comes back, and no EOF or reset either
            await asyncio.wait_for(reader.readline(), 0.5)
        assert not reader.at_eof() and not late_reader.at_eof()
        assert relay.snapshot()["active"] == 2
        relay.resume()
        assert await reader.readline() == b"during\n"
        assert await late_reader.readline() == b"late\n"
        for w in (writer, late_writer):
            w.close()


async def test_relay_resets_both_sides() -> None:
    async with echo_server() as echo, FaultRelay(("127.0.0.1", echo.port)) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"hi\n")
        assert await reader.readline() == b"hi\n"
        assert relay.reset_all() == 1
        with pytest.raises(ConnectionResetError):
            await reader.read()
        await echo.failed.wait()  # the upstream side got its RST too
        assert isinstance(echo.errors[0], ConnectionResetError)
        relay.set_mode("reset")
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        with pytest.raises(ConnectionResetError):
            await reader.read()
        relay.resume()
        assert await roundtrip(relay.port, b"again") == b"again"
        writer.close()

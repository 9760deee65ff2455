"""The tunnel on loopback: a real gateway process, connectors made with the real CLI, ``mcp-bastion
connect`` as real subprocesses in front of the notes server and the everything-server, real clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import uvicorn
from mcp import Client
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from mcp_bastion.tunnel import protocol as p
from mcp_bastion.tunnel.link import AsgiWire, ClientWire, Link, TunnelStream
from tests.conftest import (
    BASTION,
    GatewayFactory,
    RunningGateway,
    everything_entry,
    notes_entry,
    servers_file,
)
from tests.support.external import start_process, stop_process
from tests.test_concurrency import HEADERS, legacy_session
from tests.test_conformance import REQUIREMENTS, run_suite
from tests.test_core_pacing import queue_up

ConnectorFactory = Callable[..., subprocess.Popen[bytes]]
# A stdio server that answers cancelled calls too, late (the SDK's never do): tests/servers/.
STUBBORN = str(Path(__file__).parent / "servers" / "stubborn_server.py")


def text_of(result: Any) -> str:
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def bastion(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BASTION, *args, "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def add_connector(tmp_path: Path, name: str) -> str:
    out = bastion(tmp_path, "connectors", "add", name)
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcpbc_"), out.stdout
    return lines[0]


def readyz(gw: RunningGateway) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{gw.base}/readyz", timeout=5).json()
    return body


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll until ``predicate`` holds (a guard against hangs, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g}s: {what}")


def attached(gw: RunningGateway, connector: str, *servers: str) -> bool:
    report = readyz(gw)
    if connector not in report.get("connectors", {}):
        return False
    return all(report["servers"].get(s, {}).get("ready") for s in servers)


@pytest.fixture
def connector(tmp_path: Path) -> Iterator[ConnectorFactory]:
    """Start ``mcp-bastion connect`` for a gateway with servers; stopped at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        gw: RunningGateway, token: str, servers: dict[str, Any], *extra: str
    ) -> subprocess.Popen[bytes]:
        n = len(procs)
        config = tmp_path / f"connector-{n}.json"
        config.write_text(json.dumps({"mcpServers": servers}))
        argv = [*BASTION, "connect", gw.base, "--token", token, "--config", str(config), *extra]
        proc = start_process(argv, log=tmp_path / f"connector-{n}.log")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop_process(proc)


def connector_log(tmp_path: Path, n: int) -> str:
    return (tmp_path / f"connector-{n}.log").read_text(errors="replace")


@pytest.fixture
def tunnel(
    gateway: GatewayFactory, connector: ConnectorFactory, tmp_path: Path
) -> tuple[RunningGateway, subprocess.Popen[bytes]]:
    """A gateway with one local server and a connector bringing notes and everything."""
    gw = gateway("serve", "--config", str(servers_file(tmp_path, {"local": notes_entry()})))
    token = add_connector(tmp_path, "laptop")
    proc = connector(gw, token, {"notes": notes_entry(), "everything": everything_entry()})
    wait_until(lambda: attached(gw, "laptop", "notes", "everything"), "the connector attached")
    return gw, proc


async def legacy_call(client: httpx.AsyncClient, url: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """A handshake-era session with one tools/call; returns the JSON-RPC answer."""
    init = await client.post(
        url,
        headers=HEADERS,
        json={
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        },
    )
    if "mcp-session-id" not in init.headers:  # the server could not be reached to begin with
        refused: dict[str, Any] = init.json()
        return refused
    h = {**HEADERS, "Mcp-Session-Id": init.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
    await client.post(url, headers=h, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    resp = await client.post(
        url,
        headers={**h, "Accept": "application/json"},
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": args}},
    )
    answer: dict[str, Any] = resp.json()
    return answer


# ---- clients through the tunnel ------------------------------------------------------------------------


async def test_sdk_client_both_eras(tunnel: tuple[RunningGateway, Any]) -> None:
    gw, _ = tunnel
    for mode, version in (("legacy", "2025-11-25"), ("auto", "2026-07-28")):
        async with Client(f"{gw.base}/servers/notes/mcp", mode=mode) as client:
            assert client.protocol_version == version
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"echo", "pid", "slow"} <= tools
            assert (
                text_of(await client.call_tool("echo", {"text": "through the tunnel"}))
                == "through the tunnel"
            )
            assert (await client.read_resource("notes://all")).contents is not None
            # Large answers, many at once: more than the stream's credit window in flight.
            texts = [f"{i}:" + "x" * 100_000 for i in range(12)]
            answers = await asyncio.wait_for(
                asyncio.gather(*(client.call_tool("echo", {"text": t}) for t in texts)), 60
            )
            assert [text_of(a) for a in answers] == texts
        async with Client(f"{gw.base}/servers/everything/mcp", mode=mode) as client:
            assert "simple text" in text_of(await client.call_tool("test_simple_text", {}))
        async with Client(gw.url, mode=mode) as client:  # the aggregate: local and tunnelled side by side
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"local_echo", "notes_echo", "everything_test_simple_text"} <= tools
            assert text_of(await client.call_tool("notes_echo", {"text": "agg"})) == "agg"
            assert text_of(await client.call_tool("local_echo", {"text": "here"})) == "here"


@pytest.mark.parametrize("requirements", REQUIREMENTS)
def test_conformance_through_the_tunnel(
    tunnel: tuple[RunningGateway, Any], tmp_path: Path, requirements: str
) -> None:
    gw, _ = tunnel
    run_suite(f"{gw.base}/servers/everything/mcp", requirements, tmp_path / "results")


async def test_fifty_concurrent_sessions_are_never_misrouted(tunnel: tuple[RunningGateway, Any]) -> None:
    gw, _ = tunnel
    url = f"{gw.base}/servers/notes/mcp"
    # Idle pooled connections expire before the server's 5 s keep-alive does: no reuse-vs-close race.
    limits = httpx.Limits(max_connections=100, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        results = await asyncio.gather(*(legacy_session(client, url, n) for n in range(50)))
    assert sum(w for _, w in results) == 0
    assert sum(ok for ok, _ in results) == 50 * 200


# ---- drops, reconnects, children ---------------------------------------------------------------------------


async def test_connector_killed_mid_call_then_back(
    tunnel: tuple[RunningGateway, subprocess.Popen[bytes]], connector: ConnectorFactory, tmp_path: Path
) -> None:
    gw, proc = tunnel
    url = f"{gw.base}/servers/notes/mcp"
    async with httpx.AsyncClient(timeout=120) as client:
        call = asyncio.create_task(legacy_call(client, url, "slow", {"seconds": 60}))
        await asyncio.sleep(1.0)  # let the call reach the notes server
        assert not call.done()
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGKILL)
        answer = await asyncio.wait_for(call, 30)
        assert time.monotonic() - started < 30  # far below the call's own 60 s: it failed at once
        assert answer["error"]["code"] == -31000
        assert "connector 'laptop' is offline" in answer["error"]["message"]
        # Offline: a new session or call fails at once too (with the error), and readiness says so.
        answer = await legacy_call(client, url, "echo", {"text": "x"})
        assert answer["error"]["code"] == -31000
        assert "offline" in answer["error"]["message"]
        report = readyz(gw)
        assert report["servers"]["notes"]["ready"] is False
        assert "laptop" not in report["connectors"]
    # The same connector comes back (same token): its servers work again.
    argv = [str(a) for a in cast(list[str], proc.args)]
    token = argv[argv.index("--token") + 1]
    connector(gw, token, {"notes": notes_entry(), "everything": everything_entry()})
    wait_until(lambda: attached(gw, "laptop", "notes"), "the connector re-attached")
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await legacy_call(client, url, "echo", {"text": "back"})
    assert answer["result"]["content"][0]["text"] == "back"


async def test_children_kept_across_reconnects(
    gateway: GatewayFactory, connector: ConnectorFactory, tmp_path: Path
) -> None:
    """The gateway restarts (the link drops); the connector reconnects by itself, same children."""
    config = servers_file(tmp_path, {"local": notes_entry()})
    gw = gateway("serve", "--config", str(config))
    token = add_connector(tmp_path, "laptop")
    connector(gw, token, {"notes": notes_entry()})
    wait_until(lambda: attached(gw, "laptop", "notes"), "the connector attached")
    pids: dict[str, str] = {}  # the connector runs one child per protocol era
    for mode in ("legacy", "auto"):
        async with Client(f"{gw.base}/servers/notes/mcp", mode=mode) as client:
            pids[mode] = text_of(await client.call_tool("pid", {}))
    stop_process(gw.proc)
    argv = [
        *BASTION,
        "serve",
        "--port",
        str(gw.port),
        "--data-dir",
        str(tmp_path / "data"),
        "--config",
        str(config),
    ]
    again = RunningGateway(
        gw.port, start_process(argv, log=tmp_path / "gateway-again.log"), tmp_path / "gateway-again.log"
    )
    try:
        wait_until(lambda: _safe(lambda: attached(again, "laptop", "notes")), "the connector reconnected")
        for mode in ("legacy", "auto"):
            async with Client(f"{again.base}/servers/notes/mcp", mode=mode) as client:
                assert text_of(await client.call_tool("pid", {})) == pids[mode]
        assert "link_lost" in connector_log(tmp_path, 0)
    finally:
        stop_process(again.proc)


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except httpx.HTTPError:
        return False


# ---- refusals ----------------------------------------------------------------------------------------


def test_wrong_token_is_refused_and_nothing_exposed(
    gateway: GatewayFactory, connector: ConnectorFactory, tmp_path: Path
) -> None:
    gw = gateway("serve", "--config", str(servers_file(tmp_path, {"local": notes_entry()})))
    add_connector(tmp_path, "laptop")
    proc = connector(gw, "mcpbc_000000000000_" + "x" * 43, {"notes": notes_entry()})
    assert proc.wait(timeout=60) == 1
    assert "unknown or revoked connector token" in connector_log(tmp_path, 0)
    assert readyz(gw)["connectors"] == {}
    assert "notes" not in readyz(gw)["servers"]
    assert httpx.post(f"{gw.base}/servers/notes/mcp", json={}).status_code == 404

    async def raw(headers: dict[str, str]) -> int:
        try:
            async with ws_connect(
                f"ws://127.0.0.1:{gw.port}/connect", additional_headers=headers, proxy=None
            ):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(raw({})) == 401
    assert asyncio.run(raw({"Authorization": "Bearer nope"})) == 401
    token = add_connector(tmp_path, "other")
    assert asyncio.run(raw({"Authorization": f"Bearer {token}", "Origin": "https://evil.example"})) == 403
    assert asyncio.run(upgrade_status(gw.port, "evil.example", token)) == 403  # DNS rebinding
    assert asyncio.run(upgrade_status(gw.port, f"127.0.0.1:{gw.port}", token)) == 101


async def upgrade_status(port: int, host: str, token: str) -> int:
    """A hand-written WebSocket upgrade (a client library would not send a foreign Host)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"GET /connect HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


async def test_revoked_connector_is_cut_off(
    gateway: GatewayFactory, connector: ConnectorFactory, tmp_path: Path
) -> None:
    gw = gateway("serve", "--config", str(servers_file(tmp_path, {"local": notes_entry()})))
    token = add_connector(tmp_path, "laptop")
    proc = connector(gw, token, {"notes": notes_entry()})
    wait_until(lambda: attached(gw, "laptop", "notes"), "the connector attached")
    listed = json.loads(bastion(tmp_path, "connectors", "list", "--json").stdout)
    assert listed[0]["name"] == "laptop" and listed[0]["attached"] is True
    assert listed[0]["servers"] == ["notes"] and listed[0]["from"].startswith("127.0.0.1:")
    bastion(tmp_path, "connectors", "revoke", "laptop")
    # The live link is closed by the gateway; the connector's reconnect is refused: it stops.
    assert proc.wait(timeout=60) == 1
    log = connector_log(tmp_path, 0)
    assert "the connector was revoked" in log and "unknown or revoked connector token" in log
    assert "laptop" not in readyz(gw)["connectors"]
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await legacy_call(client, f"{gw.base}/servers/notes/mcp", "echo", {"text": "x"})
    assert answer["error"]["code"] == -31000
    listed = json.loads(bastion(tmp_path, "connectors", "list", "--json").stdout)
    assert listed[0]["attached"] is False and listed[0]["revoked_at"]
    # Its server is no longer its own: not ready, and another connector may bring it.
    notes = readyz(gw)["servers"]["notes"]
    assert notes == {"ready": False, "error": "no connector offers this server now"}, notes
    connector(gw, add_connector(tmp_path, "desk"), {"notes": notes_entry()})
    wait_until(lambda: attached(gw, "desk", "notes"), "another connector brought the revoked one's server")
    assert readyz(gw)["servers"]["notes"]["connector"] == "desk"
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await legacy_call(client, f"{gw.base}/servers/notes/mcp", "echo", {"text": "desk"})
    assert answer["result"]["content"][0]["text"] == "desk"


async def test_a_connector_revoked_while_offline_releases_its_servers(
    gateway: GatewayFactory, connector: ConnectorFactory, tmp_path: Path
) -> None:
    """Revoked while its link is down: its servers are released all the same (before, a name stayed
    owned by a revoked connector until the gateway restarted)."""
    gw = gateway("serve", "--config", str(servers_file(tmp_path, {"local": notes_entry()})))
    proc = connector(gw, add_connector(tmp_path, "laptop"), {"notes": notes_entry()})
    wait_until(lambda: attached(gw, "laptop", "notes"), "the connector attached")
    stop_process(proc)
    wait_until(lambda: "laptop" not in readyz(gw)["connectors"], "the connector went away")
    assert readyz(gw)["servers"]["notes"] == {
        "ready": False,
        "connector": "laptop",
        "error": "connector 'laptop' is offline",
    }
    bastion(tmp_path, "connectors", "revoke", "laptop")
    wait_until(lambda: "connector" not in readyz(gw)["servers"]["notes"], "the server was released")
    connector(gw, add_connector(tmp_path, "desk"), {"notes": notes_entry()})
    wait_until(lambda: attached(gw, "desk", "notes"), "another connector brought the server")
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await legacy_call(client, f"{gw.base}/servers/notes/mcp", "echo", {"text": "desk"})
    assert answer["result"]["content"][0]["text"] == "desk"


def test_duplicate_server_names_are_refused(
    gateway: GatewayFactory, connector: ConnectorFactory, tmp_path: Path
) -> None:
    gw = gateway("serve", "--config", str(servers_file(tmp_path, {"local": notes_entry()})))
    first = add_connector(tmp_path, "first")
    second = add_connector(tmp_path, "second")
    connector(gw, first, {"notes": notes_entry()})
    wait_until(lambda: attached(gw, "first", "notes"), "the first connector attached")
    connector(gw, second, {"notes": notes_entry(), "local": notes_entry(), "extra": notes_entry()})
    wait_until(lambda: attached(gw, "second", "extra"), "the second connector attached")
    log = connector_log(tmp_path, 1)
    assert "server 'notes' is already offered by connector 'first'" in log
    assert "the gateway already has a server named 'local' (configured locally)" in log
    report = readyz(gw)
    assert report["servers"]["notes"]["connector"] == "first"
    assert report["connectors"]["second"]["servers"] == ["extra"]
    assert "connector" not in report["servers"]["local"]


# ---- flow control on a real socket ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def link_pair(
    on_open: Callable[[TunnelStream], Awaitable[None]],
    wire: Callable[[ClientConnection], ClientWire] = ClientWire,
) -> AsyncIterator[tuple[Link, list[p.Mux]]]:
    """A gateway-side Link over a real loopback WebSocket to a connector-side Link serving streams with
    ``on_open``, past HELLO and WELCOME; yields the gateway's link and the connector's multiplexer."""
    serving: list[p.Mux] = []

    async def handler(ws: ServerConnection) -> None:
        mux = p.Mux("connector")
        serving.append(mux)
        link = Link(ClientWire(cast(ClientConnection, ws)), mux, on_open=on_open)
        running = asyncio.create_task(link.run())
        await link.send_frames(mux.hello("test", ["x"]))
        await running

    async with serve(handler, "127.0.0.1", 0, max_size=p.MAX_MESSAGE, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with ws_connect(
            f"ws://127.0.0.1:{port}", max_size=p.MAX_MESSAGE, compression=None, proxy=None
        ) as ws:
            hello: asyncio.Future[p.Event] = asyncio.get_running_loop().create_future()

            def control(ev: p.Event) -> None:
                if not hello.done():
                    hello.set_result(ev)

            link = Link(wire(ws), p.Mux("gateway"), on_control=control)
            running = asyncio.create_task(link.run())
            await asyncio.wait_for(hello, 10)
            await link.send_frames(link.mux.welcome(["x"], {}))
            try:
                yield link, serving
            finally:
                link.stop("done")
                await running


async def test_the_gateways_wire_pauses_uvicorns_transport_for_a_hold() -> None:
    """``AsgiWire.hold`` reaches the transport uvicorn's WebSocket protocol keeps (ASGI itself has no
    way to pause reading): during a hold the socket is not read, so a message the connector sends
    meanwhile waits in the kernel and is read once the hold ends. Run on uvicorn as the gateway runs
    it (``ws="auto"``), so an uvicorn that stops keeping its transport there fails here."""
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        wire = AsgiWire(receive, send)
        seen["first"] = await wire.recv()
        transport = receive.__self__.transport
        seen["before"] = transport.is_reading()
        hold = asyncio.create_task(wire.hold(0.5))
        await asyncio.sleep(0)
        await wire.send(b"holding")  # the client sends its second message now, during the hold
        await asyncio.sleep(0.2)
        seen["during"] = transport.is_reading()
        await hold
        seen["after"] = transport.is_reading()
        seen["second"] = await wire.recv()
        await wire.close(1000, "done")

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", ws="auto")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with ws_connect(f"ws://127.0.0.1:{port}", proxy=None) as ws:
            await ws.send(b"one")
            assert await asyncio.wait_for(ws.recv(), 10) == b"holding"
            await ws.send(b"two")
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
    finally:
        server.should_exit = True
        await serving
    assert seen == {"first": b"one", "before": True, "during": False, "after": True, "second": b"two"}


async def test_a_slow_consumer_does_not_stall_another_stream() -> None:
    """Stream A's body (8 MiB) is not read; stream B on the same link completes; then A does too."""
    big = bytes(range(256)) * (32 * 1024)

    async def answer(stream: TunnelStream) -> None:
        assert stream.opened is not None
        while await stream.read():
            pass
        body = big if stream.opened.path == "/big" else b"small"
        await stream.respond(200, [("content-type", "application/octet-stream")])
        await stream.write(body)
        await stream.end()

    async with link_pair(answer) as (link, serving):
        a = await link.open("GET", "/big", [])
        await a.end()
        await asyncio.wait_for(a.response, 10)
        b = await link.open("GET", "/small", [])
        await b.end()
        await asyncio.wait_for(b.response, 10)
        body = b""
        while chunk := await asyncio.wait_for(b.read(), 10):
            body += chunk
        assert body == b"small"
        # A's sender holds the rest of its 8 MiB back: only the credit went out.
        assert serving[0].queued(a.id) >= len(big) - 2 * p.INITIAL_WINDOW
        received = b""
        while chunk := await asyncio.wait_for(a.read(), 10):
            received += chunk
        assert received == big


async def test_frames_queued_during_a_send_are_not_left_behind() -> None:
    """Data queued with ``send_soon`` while an earlier kicked send is still on the wire leaves with the
    sender's next turn, not with whatever frame happens to be sent next (a heartbeat, 10 s later)."""

    class GatedWire(ClientWire):
        """The real WebSocket, with a gate the test closes to hold a send mid-way."""

        def __init__(self, ws: ClientConnection) -> None:
            super().__init__(ws)
            self.gate = asyncio.Event()
            self.gate.set()
            self.held = asyncio.Event()

        async def send(self, data: bytes) -> None:
            if not self.gate.is_set():
                self.held.set()
                await self.gate.wait()
            await super().send(data)

    async def echo(stream: TunnelStream) -> None:
        await stream.respond(200, [])
        while chunk := await stream.read():
            await stream.write(chunk)
        await stream.end()

    wires: list[GatedWire] = []

    def gated(ws: ClientConnection) -> ClientWire:
        wires.append(GatedWire(ws))
        return wires[0]

    async with link_pair(echo, gated) as (link, _):
        wire = wires[0]
        stream = await link.open("PIPE", "/echo", [])
        await asyncio.wait_for(stream.response, 10)
        wire.gate.clear()
        stream.send_soon(b"one;")
        await asyncio.wait_for(wire.held.wait(), 10)  # the kicked send is on the wire, held
        stream.send_soon(b"two;")
        await asyncio.sleep(0.05)
        wire.gate.set()
        got = b""
        while got != b"one;two;":  # without the fix "two;" came with the next PING/PONG, ~1 s later
            got += await asyncio.wait_for(stream.read(), 0.5)


async def test_many_writers_beyond_the_credit_on_one_stream() -> None:
    """Twenty writers share one stream (a PIPE carries every call in flight), each with more than a
    quarter of the window: all of them finish, and the bytes arrive whole and in order."""

    async def echo(stream: TunnelStream) -> None:
        await stream.respond(200, [])
        while chunk := await stream.read():
            await stream.write(chunk)
        await stream.end()

    async def writer(stream: TunnelStream, n: int) -> None:
        if stream.send_soon(bytes([65 + n]) * (96 * 1024)):
            await stream.drained()

    async with link_pair(echo) as (link, _):
        stream = await link.open("PIPE", "/echo", [])
        await asyncio.wait_for(stream.response, 10)
        writers = [asyncio.create_task(writer(stream, n)) for n in range(20)]
        got = b""
        while len(got) < 20 * 96 * 1024:
            got += await asyncio.wait_for(stream.read(), 10)
        await asyncio.wait_for(asyncio.gather(*writers), 10)  # a writer left waiting hangs here
        assert got == b"".join(bytes([65 + n]) * (96 * 1024) for n in range(20))


async def test_token_goes_only_to_the_configured_origin(connector: ConnectorFactory, tmp_path: Path) -> None:
    """A gateway URL that redirects elsewhere: the connector does not follow; the other host sees nothing."""
    reached: list[bytes] = []

    async def elsewhere(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reached.append(await reader.read(4096))
        writer.close()

    other = await asyncio.start_server(elsewhere, "127.0.0.1", 0)
    other_port = other.sockets[0].getsockname()[1]

    async def redirector(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        location = f"ws://127.0.0.1:{other_port}/connect"
        writer.write(f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    front = await asyncio.start_server(redirector, "127.0.0.1", 0)
    front_port = front.sockets[0].getsockname()[1]
    async with other, front:
        fake = RunningGateway(front_port, None, tmp_path / "none.log")
        proc = connector(fake, "mcpbc_000000000000_" + "x" * 43, {"notes": notes_entry()})
        assert await asyncio.to_thread(proc.wait, 60) == 1
    assert "redirect" in connector_log(tmp_path, 0) and "not followed" in connector_log(tmp_path, 0)
    assert reached == []


def test_plain_http_beyond_loopback_is_refused(tmp_path: Path) -> None:
    config = servers_file(tmp_path, {"notes": notes_entry()})
    out = subprocess.run(
        [*BASTION, "connect", "http://gateway.example.com", "--token", "t", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "plain http would send the token in clear" in out.stderr


# ---- sign-in in front of a connector's servers ----------------------------------------------------------


async def test_tunnel_servers_are_protected_like_local_ones(
    gateway: GatewayFactory, connector: ConnectorFactory, tmp_path: Path
) -> None:
    """With auth on, a connector's server gets its own resource, metadata and scope, as a local one does."""
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    from tests.test_auth_resource import mint, signer

    gw = gateway("serve", "--auth", "--config", str(servers_file(tmp_path, {"local": notes_entry()})))
    proc = connector(gw, add_connector(tmp_path, "laptop"), {"notes": notes_entry()})
    wait_until(lambda: attached(gw, "laptop", "notes"), "the connector attached")
    url = f"{gw.base}/servers/notes/mcp"
    async with httpx.AsyncClient() as http:
        resp = await http.post(url, json={}, headers=HEADERS)
        assert resp.status_code == 401
        prm_url = f"{gw.base}/.well-known/oauth-protected-resource/servers/notes/mcp"
        assert resp.headers["www-authenticate"] == f'Bearer resource_metadata="{prm_url}", scope="mcp:notes"'
        prm = (await http.get(prm_url)).json()
        assert prm["resource"] == url and prm["scopes_supported"] == ["mcp:notes"]
        # The authorization server knows the new resource and its scope.
        metadata = (await http.get(f"{gw.base}/.well-known/oauth-authorization-server")).json()
        assert "mcp:notes" in metadata["scopes_supported"]
    async with signer(tmp_path, gw) as ring:
        own = mint(ring, gw, "/servers/notes/mcp", scope="mcp:notes")
        other = mint(ring, gw, "/servers/local/mcp", scope="mcp:local")
    async with httpx.AsyncClient() as http:
        refused = await http.post(url, json={}, headers={**HEADERS, "Authorization": f"Bearer {other}"})
        assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["www-authenticate"]
    client_http = create_mcp_http_client(headers={"Authorization": f"Bearer {own}"})
    async with client_http, Client(streamable_http_client(url, http_client=client_http)) as client:
        assert text_of(await client.call_tool("echo", {"text": "through the tunnel"})) == "through the tunnel"
    assert proc.poll() is None


async def as_fake_gateway(
    connector: ConnectorFactory,
    tmp_path: Path,
    servers: dict[str, Any],
    scenario: Callable[[Link, p.Hello], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """Be the gateway a real connector (with ``servers``) attaches to: our own fake on /connect that
    takes any token, as a compromised or misbehaving gateway would; returns what ``scenario`` found."""
    from websockets.asyncio.server import Request
    from websockets.asyncio.server import Response as WsResponse

    found: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def gateway(ws: ServerConnection) -> None:
        hello: asyncio.Future[p.Event] = asyncio.get_running_loop().create_future()

        def control(ev: p.Event) -> None:
            if isinstance(ev, p.Hello) and not hello.done():
                hello.set_result(ev)

        link = Link(ClientWire(cast(ClientConnection, ws)), p.Mux("gateway"), on_control=control)
        running = asyncio.create_task(link.run())
        try:
            offered = await asyncio.wait_for(hello, 30)
            assert isinstance(offered, p.Hello)
            await link.send_frames(link.mux.welcome(offered.servers, {}))
            if not found.done():
                found.set_result(await scenario(link, offered))
        except Exception as exc:  # surface in the test, not in the server's log
            if not found.done():
                found.set_exception(exc)
        finally:
            link.stop("done")
            await running

    def accept_any(connection: ServerConnection, request: Request) -> WsResponse | None:
        return None

    async with serve(
        gateway, "127.0.0.1", 0, max_size=p.MAX_MESSAGE, compression=None, process_request=accept_any
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        fake = RunningGateway(port, None, tmp_path / "none.log")
        connector(fake, "mcpbc_000000000000_" + "x" * 43, servers)
        return await asyncio.wait_for(found, 90)


class GatewayPipe:
    """The gateway's end of one PIPE stream, spoken by hand (a hostile or a stalled gateway's)."""

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def open(cls, link: Link, server: str = "notes") -> GatewayPipe:
        stream = await link.open("PIPE", f"/servers/{server}/pipe", [("mcp-era", "legacy")])
        head = await asyncio.wait_for(stream.response, 30)
        assert head.status == 200
        return cls(stream)

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.write(json.dumps(message).encode() + b"\n")

    async def next(self, wait: float = 20) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = await asyncio.wait_for(self.stream.read(), wait)
            assert chunk, "the connector ended the stream"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    async def call(self, rid: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        await self.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        while True:
            message = await self.next()
            if message.get("id") == rid and "method" not in message:
                return message


@pytest.mark.parametrize("lists", [True, False], ids=["tool-lists", "late-answers"])
async def test_a_compromised_gateway_reaches_only_what_the_connector_offers(
    connector: ConnectorFactory, tmp_path: Path, lists: bool
) -> None:
    """A hostile gateway (here: our own fake on /connect, accepting every token) asks the connector for
    streams and tools it does not offer: 404 for every other stream, hidden tools stay hidden and
    unknown; and a call cut off by a dropped stream, or cancelled, never answers a later caller with
    the same id: also when the child sends those late answers (the SDK's servers drop them)."""

    async def status_of(link: Link, method: str, path: str, *headers: tuple[str, str]) -> int:
        stream = await link.open(method, path, list(headers))
        await stream.end()
        head = await asyncio.wait_for(stream.response, 20)
        while await asyncio.wait_for(stream.read(), 20):
            pass
        return head.status

    async def scenario(link: Link, offered: p.Hello) -> dict[str, Any]:
        got: dict[str, Any] = {"offered": offered.servers, "statuses": {}}
        era = ("mcp-era", "legacy")
        for method, path in (
            ("POST", "/mcp"),
            ("GET", "/readyz"),
            ("POST", "/servers/notes/mcp"),
            ("PIPE", "/servers/other/pipe"),
            ("PIPE", "/servers/notes/../x/pipe"),
            ("PIPE", "/servers/notes/pipe/x"),
            ("POST", "/servers/notes/pipe"),
        ):
            got["statuses"][f"{method} {path}"] = await status_of(link, method, path, era)
        got["statuses"]["no era"] = await status_of(link, "PIPE", "/servers/notes/pipe")
        first = await GatewayPipe.open(link)
        init = await first.call(
            1, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {}}
        )
        got["server"] = init["result"]["serverInfo"]["name"]
        await first.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        tools = await first.call(2, "tools/list", {})
        got["tools"] = sorted(t["name"] for t in tools["result"]["tools"])
        if lists:  # refused by the connector; without lists it would stop the child
            got["crash"] = await first.call(3, "tools/call", {"name": "crash", "arguments": {}})
        # A slow call as id 7, then the stream drops; the next stream's id 7 must get its own answer.
        await first.send(
            {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {"name": "slow", "arguments": {"seconds": 1}},
            }
        )
        await asyncio.sleep(0.3)
        first.stream.reset("the gateway went away")
        second = await GatewayPipe.open(link)
        await second.call(
            1, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {}}
        )
        # The new call with the old id is still running when the old one's answer would come
        # (the stubborn child sends it; the SDK's drops it): only its own answer may arrive.
        mine = {"name": "echo", "arguments": {"text": "mine"}}
        if not lists:
            mine = {"name": "slow", "arguments": {"seconds": 1.5}}
        answer = await second.call(7, "tools/call", mine)
        got["mine"] = answer["result"]["content"][0]["text"]
        # A call the gateway cancels, then its id reused at once: the new call gets its own answer.
        slow = {"name": "slow", "arguments": {"seconds": 1}}
        await second.send({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": slow})
        await asyncio.sleep(0.2)
        await second.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 9}})
        again = await second.call(9, "tools/call", mine)
        got["again"] = again["result"]["content"][0]["text"]
        with contextlib.suppress(TimeoutError):  # the slow call's late answer must not come through
            got["late"] = await second.next(wait=2.5)
        return got

    entry = notes_entry(tools={"deny": ["crash"]})
    if not lists:  # this child answers even cancelled calls, late
        entry = {"command": sys.executable, "args": [STUBBORN]}
    got = await as_fake_gateway(connector, tmp_path, {"notes": entry}, scenario)
    assert got["offered"] == ["notes"]
    statuses = got["statuses"]
    assert statuses.pop("no era") == 400
    for what, status in statuses.items():
        assert status == 404, (what, status)
    assert {"echo", "slow"} <= set(got["tools"])
    if lists:
        assert "crash" not in got["tools"]
        crash = got["crash"]
        assert crash["error"]["code"] == -32602, crash
        assert crash["error"]["message"] == "Unknown tool: crash"
    expected = "mine" if lists else "slept 1.5"
    assert got["mine"] == expected
    assert got["again"] == expected
    assert "late" not in got, got["late"]


async def test_a_gateway_that_stops_reading_is_held_off(connector: ConnectorFactory, tmp_path: Path) -> None:
    """A gateway that sends calls but reads no answers (stalled, or hostile) cannot make the connector
    hold more than a bounded backlog: once its outbox is full the connector reads no more requests, so
    the gateway's writes stop for lack of credit, and a child's flood of notifications is cut at 1 MiB.
    No answer is lost: when the gateway reads again, every call it managed to send is answered, and
    the stream goes on."""
    text = "x" * (64 * 1024)  # each answer carries it back

    async def scenario(link: Link, offered: p.Hello) -> dict[str, Any]:
        pipe = await GatewayPipe.open(link)
        await pipe.call(
            1, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {}}
        )
        await pipe.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        # In a second, 3 MiB of notifications at once: they meet a gateway that reads nothing.
        flood = {"count": 3000, "size": 1024, "delay": 1.0}
        chatter = {"name": "chatter", "arguments": flood, "_meta": {"progressToken": "p"}}
        await pipe.send({"jsonrpc": "2.0", "id": 10, "method": "tools/call", "params": chatter})
        sent = 0
        for rid in range(100, 500):  # 25 MiB of answers, were they all taken
            call = {"name": "echo", "arguments": {"text": f"{rid}:{text}"}}
            write = pipe.send({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": call})
            sent += 1  # once written it is queued on the link, credit or not: it will arrive
            try:
                await asyncio.wait_for(write, 3)
            except TimeoutError:
                break
        answered: dict[int, str] = {}
        progress = 0
        while len(answered) < sent + 1:
            message = await pipe.next()
            if "id" in message:
                answered[message["id"]] = message["result"]["content"][0]["text"]
            elif message.get("method") == "notifications/progress":
                progress += 1
        after = await pipe.call(2, "tools/call", {"name": "echo", "arguments": {"text": "after"}})
        answer = after["result"]["content"][0]["text"]
        return {"sent": sent, "answered": answered, "progress": progress, "after": answer}

    got = await as_fake_gateway(connector, tmp_path, {"notes": notes_entry()}, scenario)
    # Held off after the outbox's 4 MiB, the PIPE's 4 MiB window, the pipes' buffers and the calls
    # the child took meanwhile (their answers are never dropped): 112-240 seen, far below 400. The
    # calls the child takes vary with the timing; the read coalescing under load (core/pacing.py)
    # reads its answers later, so it takes a few more.
    assert 40 <= got["sent"] < 320, got["sent"]
    echoed = {rid: f"{rid}:{text}" for rid in range(100, 100 + got["sent"])}
    assert got["answered"] == {**echoed, 10: "chattered"}
    assert got["after"] == "after"
    # Behind the stalled write at most 1 MiB of them waited; the rest was dropped, and said so.
    assert 0 < got["progress"] < 2000, got["progress"]
    assert "tunnel_notifications_dropped" in connector_log(tmp_path, 0)


@pytest.mark.parametrize("window_ms", [5, 0])
async def test_reads_are_coalesced_while_a_server_queues(
    connector: ConnectorFactory, tmp_path: Path, window_ms: int
) -> None:
    """While calls queue at a server (one that works 4 ms per call, one at a time, and 12 callers in a
    closed loop), the connector leaves the link and the child's output unread for a window after a
    read (core/pacing.py) and says how often when it stops; every call still gets its own answer.
    With --coalesce-ms 0 it never holds a read."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: Any) -> subprocess.Popen[bytes]:
        proc = connector(*args, "--coalesce-ms", str(window_ms))
        started.append(proc)
        return proc

    async def scenario(link: Link, offered: p.Hello) -> dict[str, Any]:
        pipe = await GatewayPipe.open(link, "busy")
        init = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        }
        await pipe.call(1, "initialize", init)
        await pipe.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}

        async def read() -> None:
            while True:
                message = await pipe.next()
                future = waiting.pop(message.get("id", -1), None)
                if future is not None:
                    future.set_result(message)

        async def caller(n: int) -> list[str]:
            texts = []
            for k in range(8):
                rid = 1000 + 100 * n + k
                waiting[rid] = asyncio.get_running_loop().create_future()
                busy = {"name": "busy", "arguments": {"text": f"{n}.{k}", "seconds": 0.004}}
                await pipe.send({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": busy})
                answer = await asyncio.wait_for(waiting[rid], 30)
                texts.append(answer["result"]["content"][0]["text"])
            return texts

        reader = asyncio.create_task(read())
        try:
            texts = await asyncio.gather(*(caller(n) for n in range(12)))
        finally:
            reader.cancel()
        return {"texts": texts}

    got = await as_fake_gateway(
        start, tmp_path, {"busy": {"command": sys.executable, "args": [STUBBORN]}}, scenario
    )
    assert got["texts"] == [[f"{n}.{k}" for k in range(8)] for n in range(12)]
    stop_process(started[0])
    stopped = [
        json.loads(line) for line in connector_log(tmp_path, 0).splitlines() if '"connector_stopped"' in line
    ]
    assert len(stopped) == 1, connector_log(tmp_path, 0)[-2000:]
    held = stopped[0]["reads_held"]
    if window_ms:
        assert held["link"] > 0 and held["servers"] > 0, held
    else:
        assert held == {"link": 0, "servers": 0}, held


@pytest.mark.parametrize("coalesce_ms", ["2", "0"])
async def test_the_gateway_holds_the_link_while_a_tunnel_server_queues(
    gateway: GatewayFactory, connector: ConnectorFactory, tmp_path: Path, coalesce_ms: str
) -> None:
    """The gateway's end paces the link as the connector's does (core/pacing.py): while a server
    behind the connector queues, the gateway leaves the link unread for a hold after each message,
    so the answers come to it in batches, and says how often when the link ends (``reads_held``);
    every call still gets its own answer. With ``coalesce_ms = 0`` it never holds the link. (The
    connector holds nothing here: only the gateway's end is under test.)"""
    gw = gateway(
        "serve",
        "--config",
        str(servers_file(tmp_path, {})),
        env={"MCP_BASTION_COALESCE_MS": coalesce_ms},
    )
    token = add_connector(tmp_path, "laptop")
    proc = connector(
        gw, token, {"busy": {"command": sys.executable, "args": [STUBBORN]}}, "--coalesce-ms", "0"
    )
    wait_until(lambda: attached(gw, "laptop", "busy"), "the connector attached")
    await queue_up(f"{gw.base}/servers/busy/mcp")
    stop_process(proc)

    def detached() -> list[dict[str, Any]]:
        lines = gw.logs().splitlines()
        return [json.loads(line) for line in lines if '"connector_detached"' in line]

    wait_until(lambda: len(detached()) == 1, "the gateway saw the link end")
    held = detached()[0]["reads_held"]
    if coalesce_ms == "0":
        assert held == 0
    else:
        assert held > 0  # 96 calls, 12 waiting at a time: the rule engaged (not a speed target)


async def test_tls_is_verified_against_the_given_ca(gateway: GatewayFactory, tmp_path: Path) -> None:
    """Behind a TLS-terminating proxy (a CA of the test's own): with --ca-bundle the connector attaches
    over wss://; without it the certificate is refused and nothing is offered."""
    import ssl

    from tests.support.external import free_port
    from tests.support.tls_server import LocalCA

    ca = LocalCA(tmp_path / "ca")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(ca.issue("localhost")))
    proxy_port = free_port()
    gw = gateway(
        "serve",
        "--no-auth",
        "--public-url",
        f"https://localhost:{proxy_port}",
        "--config",
        str(servers_file(tmp_path, {"local": notes_entry()})),
    )

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def terminate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", gw.port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    proxy = await asyncio.start_server(terminate, "127.0.0.1", proxy_port, ssl=server_ctx)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    procs: list[subprocess.Popen[bytes]] = []

    def connect(name: str, server: str, *extra: str) -> subprocess.Popen[bytes]:
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps({"mcpServers": {server: notes_entry()}}))
        token = add_connector(tmp_path, name)
        argv = [
            *BASTION,
            "connect",
            f"https://localhost:{proxy_port}",
            "--token",
            token,
            "--config",
            str(config),
        ]
        proc = start_process([*argv, *extra], log=tmp_path / f"{name}.log", env=env)
        procs.append(proc)
        return proc

    async with proxy:
        try:
            untrusted = connect("untrusted", "a")
            connect("trusted", "b", "--ca-bundle", str(ca.pem_path))
            await asyncio.to_thread(
                wait_until, lambda: attached(gw, "trusted", "b"), "the trusted connector attached"
            )
            async with Client(f"{gw.base}/servers/b/mcp") as client:
                assert text_of(await client.call_tool("echo", {"text": "over wss"})) == "over wss"
            # The other one does not trust the proxy's certificate: it never attaches and says why.
            await asyncio.to_thread(
                wait_until,
                lambda: (
                    "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "untrusted.log").read_text(errors="replace")
                ),
                "the untrusted connector reported the certificate",
            )
            assert "untrusted" not in readyz(gw).get("connectors", {})
            assert untrusted.poll() is None or untrusted.returncode != 0
        finally:
            for proc in procs:
                stop_process(proc)

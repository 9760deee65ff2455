"""A fault-injecting TCP relay of the tests' own (``tc netem`` is not available on these machines).

Put it between two real endpoints to give the path a slow, jittery, narrow or broken link:

* ``delay`` and ``jitter`` (seconds): every chunk is held for ``delay ± U(0, jitter)`` after it was
  read, never overtaking an earlier chunk of the same direction (TCP is a byte stream: jitter changes
  the spacing, never the order);
* ``rate`` (bytes per second, each direction, shared by all connections): a bandwidth cap;
* ``stall``: stop forwarding, keep every socket open (a link that silently stops carrying data); new
  connections are accepted but carry nothing either; ``resume`` lets the held data go on;
* ``reset``: abort every connection with a TCP RST now; mode ``reset`` also resets each new one.

In-process (async tests)::

    relay = FaultRelay(("127.0.0.1", upstream_port))
    await relay.start()          # relay.port
    relay.configure(delay=0.05, jitter=0.02)

As a process (in a network namespace, or anywhere a test cannot share its event loop), controlled
over a Unix socket, which a namespace does not isolate::

    python -m tests.support.fault_relay --listen 10.231.2.1:0 --target 127.0.0.1:8080 --control /tmp/r.sock

    with relay_process(target, listen=..., control=path, wrap=lambda a: net.argv("gateway", a)) as ctl:
        ctl.configure(delay=0.05); ctl.stall(); ctl.resume(); ctl.reset(); ctl.stats()
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import os
import random
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Mode = Literal["pass", "stall", "reset"]
Direction = Literal["up", "down"]  # up: accepted side -> target; down: target -> accepted side
MODES: tuple[Mode, ...] = ("pass", "stall", "reset")

CHUNK = 64 * 1024  # bytes read at a time
PACE_PIECE = 16 * 1024  # the bandwidth cap meters writes in pieces of at most this much
QUEUE_CHUNKS = 64  # chunks held per direction and connection before reading stops (backpressure)


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP  # configure(rate=KEEP): leave the bandwidth cap as it is


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Pacer:
    """A shared bandwidth cap for one direction: reserves a transmission slot per piece."""

    def __init__(self) -> None:
        self.next_free = 0.0

    def reserve(self, now: float, size: int, rate: float) -> float:
        start = max(now, self.next_free)
        self.next_free = start + size / rate
        return self.next_free


@dataclass
class _Conn:
    cid: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass
class RelayStats:
    accepted: int = 0
    active: int = 0
    resets: int = 0
    upstream_failures: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class FaultRelay:
    """The relay itself: one asyncio server, two pumps per connection, faults set at any time."""

    def __init__(
        self,
        target: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        *,
        delay: float = 0.0,
        jitter: float = 0.0,
        rate: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.target = target
        self.listen = listen
        self.delay = 0.0
        self.jitter = 0.0
        self.rate: float | None = None
        self.configure(delay=delay, jitter=jitter, rate=rate)
        self.mode: Mode = "pass"
        self.stats = RelayStats()
        self._random = random.Random(seed)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._pacers: dict[Direction, _Pacer] = {"up": _Pacer(), "down": _Pacer()}
        self._conns: dict[int, _Conn] = {}
        self._next_id = 0
        self._server: asyncio.Server | None = None

    # -- control -----------------------------------------------------------------------------------
    def configure(
        self, *, delay: float | None = None, jitter: float | None = None, rate: float | _Keep | None = KEEP
    ) -> None:
        """Change delay/jitter (seconds; ``None`` keeps) and rate (bytes/s; ``None`` lifts the cap)."""
        if delay is not None:
            if delay < 0:
                raise ValueError("delay must be >= 0")
            self.delay = delay
        if jitter is not None:
            if jitter < 0:
                raise ValueError("jitter must be >= 0")
            self.jitter = jitter
        if rate is not KEEP:
            if rate is not None and rate <= 0:
                raise ValueError("rate must be > 0 bytes/s, or None for no cap")
            self.rate = rate

    def set_mode(self, mode: Mode) -> int:
        """``pass``, ``stall`` (hold everything) or ``reset`` (RST all, and every new connection)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode
        if mode == "stall":
            self._flowing.clear()
        else:
            self._flowing.set()
        return self.reset_all() if mode == "reset" else 0

    def stall(self) -> None:
        self.set_mode("stall")

    def resume(self) -> None:
        self.set_mode("pass")

    def reset_all(self) -> int:
        """Abort every open connection, both sides, with an RST; returns how many."""
        conns = list(self._conns.values())
        for conn in conns:
            self._abort(conn)
        return len(conns)

    def snapshot(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "mode": self.mode,
            "delay": self.delay,
            "jitter": self.jitter,
            "rate": self.rate,
            "accepted": self.stats.accepted,
            "active": len(self._conns),
            "resets": self.stats.resets,
            "upstream_failures": self.stats.upstream_failures,
            "bytes_up": self.stats.bytes_up,
            "bytes_down": self.stats.bytes_down,
        }

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return 0
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> FaultRelay:
        self._server = await asyncio.start_server(self._accept, self.listen[0], self.listen[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset_all()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultRelay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the relay -------------------------------------------------------------------------------------
    def _abort(self, conn: _Conn) -> None:
        if self._conns.pop(conn.cid, None) is None:
            return
        self.stats.resets += 1
        _rst(conn.client)
        if conn.upstream is not None:
            _rst(conn.upstream)
        current = asyncio.current_task()
        for task in conn.tasks:
            if task is not current:
                task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        if self.mode == "reset":
            self.stats.resets += 1
            _rst(writer)
            return
        self._next_id += 1
        conn = _Conn(self._next_id, writer)
        self._conns[conn.cid] = conn
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.stats.upstream_failures += 1
            self._abort(conn)
            return
        if conn.cid not in self._conns:  # reset while connecting
            _rst(up_writer)
            return
        conn.upstream = up_writer
        up = asyncio.create_task(self._pump(conn, reader, up_writer, "up"))
        down = asyncio.create_task(self._pump(conn, up_reader, writer, "down"))
        conn.tasks += [up, down]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(up, down)
        if self._conns.pop(conn.cid, None) is not None:
            for w in (writer, up_writer):
                w.close()

    def _due(self, now: float, last_due: float) -> float:
        """When a chunk read ``now`` may leave: ``delay ± jitter``, never before the previous one."""
        hold = self.delay
        if self.jitter:
            hold += self._random.uniform(-self.jitter, self.jitter)
        return max(now + max(hold, 0.0), last_due)

    async def _pump(
        self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: Direction
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=QUEUE_CHUNKS)

        async def read() -> None:
            last_due = 0.0
            try:
                while True:
                    data = await src.read(CHUNK)
                    if not data:
                        break
                    last_due = self._due(loop.time(), last_due)
                    await queue.put((last_due, data))
            except (ConnectionError, OSError):
                self._abort(conn)  # the peer reset us: pass the reset on
                return
            await queue.put(None)

        reading = asyncio.create_task(read())
        try:
            while True:
                item = await queue.get()
                await self._flowing.wait()
                if item is None:
                    with contextlib.suppress(OSError):
                        if dst.can_write_eof():
                            dst.write_eof()  # half-close: the other direction goes on
                    return
                due, data = item
                step = PACE_PIECE if self.rate else len(data)
                for start in range(0, len(data), step):
                    piece = data[start : start + step]
                    wait_until = due
                    if self.rate:
                        wait_until = max(
                            due, self._pacers[direction].reserve(loop.time(), len(piece), self.rate)
                        )
                    if wait_until > loop.time():
                        await asyncio.sleep(wait_until - loop.time())
                    await self._flowing.wait()  # a stall that began while this piece was held
                    dst.write(piece)
                    if direction == "up":
                        self.stats.bytes_up += len(piece)
                    else:
                        self.stats.bytes_down += len(piece)
                    await dst.drain()
        except (ConnectionError, OSError):
            self._abort(conn)
        finally:
            reading.cancel()


# --------------------------------------------------------------------------------------------------
# Control over a Unix socket (JSON lines), for a relay running as its own process
# --------------------------------------------------------------------------------------------------


def _handle(relay: FaultRelay, request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "configure":
        kwargs: dict[str, Any] = {k: request[k] for k in ("delay", "jitter") if k in request}
        if "rate" in request:
            kwargs["rate"] = request["rate"]
        relay.configure(**kwargs)
    elif op == "mode":
        relay.set_mode(request["mode"])
    elif op == "reset":
        relay.reset_all()
    elif op != "stats":
        raise ValueError(f"unknown op {op!r}")
    return {"ok": True, **relay.snapshot()}


async def serve_control(relay: FaultRelay, path: str) -> asyncio.Server:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = _handle(relay, json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_unix_server(client, path)


class RelayControl:
    """Drives a relay process from a (synchronous) test over its control socket."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(self.path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("relay closed the control connection")
                buf += chunk
        reply: dict[str, Any] = json.loads(buf)
        if not reply.get("ok"):
            raise RuntimeError(f"relay refused {request}: {reply.get('error')}")
        return reply

    def stats(self) -> dict[str, Any]:
        return self._ask({"op": "stats"})

    @property
    def port(self) -> int:
        return int(self.stats()["port"])

    def configure(self, **settings: float | None) -> dict[str, Any]:
        return self._ask({"op": "configure", **settings})

    def stall(self) -> dict[str, Any]:
        return self._ask({"op": "mode", "mode": "stall"})

    def resume(self) -> dict[str, Any]:
        return self._ask({"op": "mode", "mode": "pass"})

    def reset(self) -> dict[str, Any]:
        """RST every open connection now."""
        return self._ask({"op": "reset"})

    def set_mode(self, mode: Mode) -> dict[str, Any]:
        return self._ask({"op": "mode", "mode": mode})


@contextlib.contextmanager
def relay_process(
    target: tuple[str, int],
    *,
    control: Path,
    listen: tuple[str, int] = ("127.0.0.1", 0),
    log: Path | None = None,
    wrap: Callable[[Sequence[str]], list[str]] | None = None,
    delay: float = 0.0,
    jitter: float = 0.0,
    rate: float | None = None,
) -> Iterator[RelayControl]:
    """Run the relay as a process (``wrap`` puts it in a namespace); yields its control, once it is up."""
    from tests.support.external import REPO_ROOT, start_process, stop_process

    argv = [
        sys.executable,
        "-m",
        "tests.support.fault_relay",
        "--listen",
        f"{listen[0]}:{listen[1]}",
        "--target",
        f"{target[0]}:{target[1]}",
        "--control",
        str(control),
        "--delay",
        str(delay),
        "--jitter",
        str(jitter),
    ]
    if rate is not None:
        argv += ["--rate", str(rate)]
    proc = start_process(wrap(argv) if wrap else argv, log=log, cwd=REPO_ROOT)
    ctl = RelayControl(control)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log else ""
                raise RuntimeError(f"fault relay exited with {proc.returncode}: {tail}")
            with contextlib.suppress(OSError):
                if ctl.port:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("fault relay did not come up")
            time.sleep(0.05)
        yield ctl
    finally:
        stop_process(proc)
        with contextlib.suppress(FileNotFoundError):
            control.unlink()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def _main(args: argparse.Namespace) -> None:
    relay = FaultRelay(
        _addr(args.target), _addr(args.listen), delay=args.delay, jitter=args.jitter, rate=args.rate
    )
    await relay.start()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.control)
    control = await serve_control(relay, args.control)
    print(json.dumps({"listening": relay.port}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        control.close()
        await relay.close()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="fault-injecting TCP relay (tests)")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept on (port 0: any free)")
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--control", required=True, help="Unix socket path for the JSON-lines control")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--jitter", type=float, default=0.0)
    p.add_argument("--rate", type=float, default=None, help="bytes/s per direction (default: no cap)")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()

"""A supervised stdio child: newline-delimited JSON-RPC, restarted with backoff when it dies.

The child runs in its own process group so shutdown (close stdin, then SIGTERM, then
SIGKILL) reaches everything it started: no orphans. It gets an allow-listed
environment plus its configured ``env``; its stderr goes to the log under its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from typing import Any

import orjson
import structlog

from ..core import jsonrpc as rpc
from ..core.lines import MAX_LINE, Lines
from .base import Channel, Era, Sink, UpstreamUnavailable, hold_reading

log = structlog.get_logger("mcp_bastion.stdio")

ENV_ALLOWLIST = (
    "HOME",
    "LOGNAME",
    "PATH",
    "SHELL",
    "TERM",
    "USER",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
)
LINE_LIMIT = MAX_LINE
READ_CHUNK = 256 * 1024
WRITE_BACKLOG = 256 * 1024  # bytes waiting for the child's stdin before a writer waits


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
    env.update(extra)
    return env


class StdioChannel(Channel):
    def __init__(
        self,
        server: str,
        era: Era,
        sink: Sink,
        command: str,
        args: list[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        *,
        handshake_timeout: float = 30.0,
        restart_initial: float = 0.5,
        restart_max: float = 30.0,
        term_grace: float = 3.0,
    ) -> None:
        super().__init__(server, era, sink, handshake_timeout=handshake_timeout)
        self.command = command
        self.args = args
        self.env = dict(env or {})
        self.cwd = cwd
        self.restart_initial = restart_initial
        self.restart_max = restart_max
        self.term_grace = term_grace
        self.proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._failure: BaseException | None = None
        self._write_lock = asyncio.Lock()
        self._out: list[bytes] = []  # messages for the child, written together at the end of the turn
        self.restarts = 0

    async def _connect(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name=f"stdio:{self.label}")
        await self._started.wait()
        if not self.ready.is_set():
            raise UpstreamUnavailable(str(self._failure or "did not start"))

    async def _spawn(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            self.command,
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_environment(self.env),
            cwd=self.cwd,
            start_new_session=True,
            limit=LINE_LIMIT,
        )

    async def _supervise(self) -> None:
        delay = self.restart_initial
        while not self.closed:
            try:
                proc = await self._spawn()
            except OSError as exc:
                self._failure = exc
                log.error("upstream_spawn_failed", server=self.server, error=str(exc))
                self._started.set()
            else:
                self.proc = proc
                log.info("upstream_started", server=self.server, era=self.era, pid=proc.pid)
                assert proc.stdout is not None and proc.stderr is not None
                reader = asyncio.create_task(self._read(proc.stdout))
                errors = asyncio.create_task(self._stderr(proc.stderr))
                try:
                    await self.handshake()
                    delay = self.restart_initial
                except UpstreamUnavailable as exc:
                    self._failure = exc
                    log.error("upstream_handshake_failed", server=self.server, era=self.era, error=str(exc))
                self._started.set()
                if self.ready.is_set():
                    await proc.wait()
                else:
                    await self._terminate(proc)
                reader.cancel()
                await asyncio.gather(reader, errors, return_exceptions=True)
                self.proc = None
                if not self.closed:
                    log.warning(
                        "upstream_exited", server=self.server, era=self.era, returncode=proc.returncode
                    )
                self.lost(f"exited (code {proc.returncode})")
            if self.closed:
                return
            self.restarts += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.restart_max)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        # Whole chunks split here, not readline() per message: a coroutine round per line was a
        # measured cost at C=50 (bench/README.md); an overlong line is skipped, as before.
        lines = Lines(LINE_LIMIT)
        dropped = 0
        while chunk := await stream.read(READ_CHUNK):
            for line in lines.feed(chunk):
                try:
                    msg = rpc.validate(orjson.loads(line))
                except (orjson.JSONDecodeError, rpc.ProtocolError) as exc:
                    log.warning("upstream_bad_message", server=self.server, error=str(exc)[:200])
                    continue
                self.count_answer(msg)
                self.received(msg)
            if lines.dropped != dropped:
                dropped = lines.dropped
                log.error("upstream_line_too_long", server=self.server, limit=LINE_LIMIT)
            if self.pace is not None and (delay := self.pace(len(chunk))) > 0:
                # asyncio has no public handle on a StreamReader's transport (uvloop's pipe transport
                # is no asyncio.ReadTransport subclass either): the reader's own, as it has it.
                await hold_reading(getattr(stream, "_transport", None), delay)

    async def _stderr(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not line:
                return
            log.info(
                "upstream_stderr", server=self.server, line=line.decode("utf-8", "replace").rstrip()[:2000]
            )

    async def _write(self, message: rpc.Message) -> None:
        data = orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)
        out = self._out
        stdin = None
        if not out:  # the first message of this turn: checked, and the turn's flush scheduled
            proc = self.proc
            if proc is None or proc.stdin is None or proc.returncode is not None:
                raise UpstreamUnavailable("is not running")  # not in flight: the pacer never hears of it
            stdin = proc.stdin
            asyncio.get_running_loop().call_soon(self._flush, stdin)
        out.append(data)
        self.count_sent(message)
        if stdin is not None and stdin.transport.get_write_buffer_size() > WRITE_BACKLOG:
            async with self._write_lock:  # the child reads slower than we write: wait for it
                await stdin.drain()

    def _flush(self, stdin: asyncio.StreamWriter) -> None:
        """What was written in one turn of the loop goes to the child in one write: at C=50 a write
        (a syscall) per message was ~14 % of the gateway's CPU (bench/README.md, profile notes)."""
        data = b"".join(self._out)
        self._out.clear()
        with contextlib.suppress(Exception):  # the child is gone: its supervisor fails the calls
            stdin.write(data)

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """Close stdin, then SIGTERM, then SIGKILL: to the whole process group."""
        if proc.returncode is None and proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), self.term_grace)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), self.term_grace)
        # The leader is gone; make sure nothing it started outlives it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def _disconnect(self) -> None:
        proc = self.proc
        if proc is not None:
            await self._terminate(proc)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor

    def describe(self) -> dict[str, Any]:
        return {"pid": self.proc.pid if self.proc else None, "restarts": self.restarts}

"""Newline-delimited JSON-RPC out of a byte stream's chunks: a stdio child's stdout, a tunnel's PIPE.

Sans-IO: bytes in, whole lines out. Reading big chunks and splitting them here costs a fraction of
``StreamReader.readline`` per message (one coroutine round per line; bench/README.md, profile
notes), and it bounds the memory one unfinished line may take.
"""

from __future__ import annotations

MAX_LINE = 64 * 1024 * 1024  # one JSON-RPC message: larger ones are dropped


class Lines:
    """Whole, non-blank lines from chunks that may hold several lines, or part of one.

    A line that grows past ``limit`` is dropped as it arrives (never buffered whole): ``dropped``
    counts them, and the splitter goes on with the line after it."""

    __slots__ = ("_parts", "_size", "_skipping", "dropped", "limit")

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self.dropped = 0
        self._parts: list[bytes] = []  # the unfinished line, in pieces (joined once, when it ends)
        self._size = 0
        self._skipping = False  # inside a line that was too long: discard up to its newline

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._skipping:
            at = chunk.find(b"\n")
            if at < 0:
                return []
            self._skipping = False
            chunk = chunk[at + 1 :]
        if b"\n" not in chunk:
            if chunk:
                self._hold(chunk)
            return []
        if not self._parts and chunk.endswith(b"\n") and chunk.count(b"\n") == 1:
            if len(chunk) > self.limit + 1:
                return self._drop_whole()
            return [] if chunk.isspace() else [chunk]
        out: list[bytes] = []
        if self._parts:  # the held line ends here: joined in one copy (a big message spans chunks)
            at = chunk.find(b"\n")
            if self._size + at > self.limit:
                self.dropped += 1
            else:
                line = b"".join([*self._parts, memoryview(chunk)[:at]])
                if not line.isspace():
                    out.append(line)
            self._parts, self._size = [], 0
            chunk = chunk[at + 1 :]
            if b"\n" not in chunk:
                if chunk:
                    self._hold(chunk)
                return out
        *lines, rest = chunk.split(b"\n")
        if rest:
            self._hold(rest)
        for line in lines:
            if len(line) > self.limit:
                self.dropped += 1
            elif line and not line.isspace():
                out.append(line)
        return out

    def _hold(self, piece: bytes) -> None:
        self._parts.append(piece)
        self._size += len(piece)
        if self._size > self.limit:
            self._parts, self._size = [], 0
            self._skipping = True
            self.dropped += 1

    def _drop_whole(self) -> list[bytes]:
        self.dropped += 1
        return []

"""Newline-delimited JSON-RPC out of a byte stream's chunks: a stdio child's stdout, a tunnel's PIPE.

Sans-IO: bytes in, whole lines out. Reading big chunks and splitting them here costs a fraction of
``StreamReader.readline`` per message (one coroutine round per line; bench/README.md, profile
notes), and it bounds the memory one unfinished line may take.
"""

from __future__ import annotations

MAX_LINE = 64 * 1024 * 1024  # one JSON-RPC message: larger ones are dropped


Line = bytes | memoryview  # a view into the chunk it came in, or bytes (what orjson.loads takes)
COPY_BELOW = 16 * 1024  # chunks smaller than this are split by copying: cheaper than a loop of views
_SPACE = frozenset(b" \t\n\r\x0b\x0c")  # what bytes.isspace() counts as space


class Lines:
    """Whole, non-blank lines from chunks that may hold several lines, or part of one.

    A line that grows past ``limit`` is dropped as it arrives (never buffered whole): ``dropped``
    counts them, and the splitter goes on with the line after it. Lines of a big chunk come out as
    memoryviews of it, not copies (an answer of 128 KiB copied by ``bytes.split`` cost ~60 µs of the
    gateway's CPU in a 64 KiB echo call); a line held across chunks is joined in one copy."""

    __slots__ = ("_parts", "_size", "_skipping", "copy_below", "dropped", "limit")

    def __init__(self, limit: int = MAX_LINE, copy_below: int = COPY_BELOW) -> None:
        self.limit = limit
        self.copy_below = copy_below
        self.dropped = 0
        self._parts: list[Line] = []  # the unfinished line, in pieces (joined once, when it ends)
        self._size = 0
        self._skipping = False  # inside a line that was too long: discard up to its newline

    def feed(self, chunk: bytes) -> list[Line]:
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
        out: list[Line] = []
        start = 0
        if self._parts:  # the held line ends here: joined in one copy (a big message spans chunks)
            at = chunk.find(b"\n")
            if self._size + at > self.limit:
                self.dropped += 1
            else:
                line = b"".join([*self._parts, memoryview(chunk)[:at]])
                if not line.isspace():
                    out.append(line)
            self._parts, self._size = [], 0
            start = at + 1
        if len(chunk) - start < self.copy_below:
            *lines, rest = chunk[start:].split(b"\n")  # chunk[0:] is chunk itself, not a copy
            for line in lines:
                if len(line) > self.limit:
                    self.dropped += 1
                elif line and not line.isspace():
                    out.append(line)
            if rest:
                self._hold(rest)
            return out
        view = memoryview(chunk)
        while (end := chunk.find(b"\n", start)) >= 0:
            if end - start > self.limit:
                self.dropped += 1
            elif end > start and (chunk[start] not in _SPACE or not chunk[start:end].isspace()):
                out.append(view[start:end])
            start = end + 1
        if start < len(chunk):
            self._hold(view[start:])
        return out

    def _hold(self, piece: Line) -> None:
        self._parts.append(piece)
        self._size += len(piece)
        if self._size > self.limit:
            self._parts, self._size = [], 0
            self._skipping = True
            self.dropped += 1

    def _drop_whole(self) -> list[Line]:
        self.dropped += 1
        return []

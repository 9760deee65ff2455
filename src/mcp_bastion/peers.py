"""Downstream parties: a handshake-era session, or one 2026-07-28 request exchange.

A peer is whatever the transports deliver messages to. Transports subclass it and
implement :meth:`Peer.deliver`; the hub only ever calls that.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .auth.identity import ANONYMOUS, Identity
from .core import jsonrpc as rpc
from .timers import later

if TYPE_CHECKING:
    from .upstream.base import Channel

LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


def level_index(level: Any) -> int:
    return LOG_LEVELS.index(level) if level in LOG_LEVELS else 0


class Peer:
    """Base for sessions and exchanges."""

    era: Literal["legacy", "modern"] = "legacy"  # an HTTP+SSE session can turn modern

    def __init__(self, peer_id: str, protocol_version: str) -> None:
        self.id = peer_id
        self.protocol_version = protocol_version
        self.client_capabilities: dict[str, Any] = {}
        self.client_info: Any = None
        self.log_level: str | None = None
        self.subscriptions: set[str] = set()
        self.listen: dict[rpc.RequestId, dict[str, Any]] = {}  # modern listen id -> what it wants
        # In-flight requests of this peer: downstream id -> (channel, upstream id).
        self.inflight: dict[rpc.RequestId, tuple[Channel, rpc.RequestId]] = {}
        # Requests an upstream made of this peer: downstream id -> (channel, upstream id) or future.
        self.server_requests: dict[rpc.RequestId, tuple[Channel, rpc.RequestId] | asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self.closed = False
        self.hub_channels: dict[str, Channel] = {}  # isolated channels owned by this peer
        # Upstream subscriptions/listen requests held for this peer: "server|uri" -> (channel, id).
        self.upstream_listens: dict[str, tuple[Channel, rpc.RequestId]] = {}
        # Who this peer acts for (set by the transport from the verified bearer; anonymous when auth is
        # off). The hub shows and reaches only the servers it may use, with that identity's credentials.
        self.identity: Identity = ANONYMOUS

    def next_request_id(self) -> str:
        return f"b{next(self._ids)}"

    def deliver(self, message: rpc.Message, related: rpc.RequestId | None, final: bool = False) -> None:
        raise NotImplementedError

    def wants_log(self, level: Any) -> bool:
        if self.log_level is None:
            return False
        return level_index(level) >= level_index(self.log_level)


class Stream:
    """Messages for one waiter, and a future that says when there are some: a response stream's
    messages, or what comes back to the handler of one forwarded request (its answer, or a request the
    upstream makes of the client meanwhile).

    A deque and one waiter future, the deadline a coarse timer (``timers.py``): no task per wait
    (task creation was the largest single cost per forwarded call), and ``asyncio.Queue.get`` under
    ``asyncio.timeout`` was about a tenth of the gateway's samples per call at C=50 (py-spy)."""

    __slots__ = ("_waiter", "items")

    def __init__(self) -> None:
        self.items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Any) -> None:
        self.items.append(item)
        self.wake()

    def signal(self) -> asyncio.Future[None]:
        """A future done once a message is waiting (at once if one already is), or on :meth:`wake`."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.items:
            fut.set_result(None)
        self._waiter = fut
        return fut

    def wake(self, *_: object) -> None:
        """Wake whoever waits on :meth:`signal` (a done callback or timer: the caller looks why)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, seconds: float) -> Any:
        """The next item; TimeoutError when none came within ``seconds``."""
        if not self.items:
            waiter = self.signal()
            deadline = later(seconds, self.wake)  # a coarse timer: this wait almost never times out
            try:
                await waiter
            finally:
                deadline.cancel()
            if not self.items:
                raise TimeoutError
        return self.items.popleft()


@dataclass
class CallRoute:
    """The route of one forwarded request: progress goes straight to the peer,
    the final answer and any server request come back to the awaiting handler."""

    peer: Peer
    down_id: rpc.RequestId
    mailbox: Stream = field(default_factory=Stream)  # ("final" | "request", payload)
    modern_log_level: str | None = None
    owner: Any = None  # the hub that forwarded the request

    def deliver(self, message: rpc.Message, related: rpc.RequestId | None) -> None:
        if message.get("method") == "notifications/message" and self.peer.era == "modern":
            wanted = self.modern_log_level
            level = rpc.params_of(message).get("level")
            if wanted is None or level_index(level) < level_index(wanted):
                return
        elif (
            message.get("method") == "notifications/message"
            and self.peer.log_level is not None
            and not self.peer.wants_log(rpc.params_of(message).get("level"))
        ):
            return
        self.peer.deliver(message, self.down_id)

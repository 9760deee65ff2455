"""Forwarding state of one upstream channel: id rewriting, progress tokens, server requests.

Sans-IO: messages in, deliveries out. A channel is one JSON-RPC connection to an
upstream (a stdio child, an HTTP session) that many downstream callers share, so every
request id and progress token is rewritten to one the channel alone hands out; the
reply is matched back by that id alone, so a reply can never reach another caller.
Who a delivery is for (``route``) is opaque here: the I/O layer decides what it is.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from . import jsonrpc as rpc
from .eras import META_SUBSCRIPTION_ID


@dataclass(slots=True)
class Pending:
    """A request this channel forwarded and still owes an answer for."""

    route: Any
    down_id: rpc.RequestId
    method: str
    seq: int
    down_token: rpc.RequestId | None = None
    up_token: str | None = None
    wants_logs: bool = True
    accepts_requests: bool = True


@dataclass(slots=True)
class Delivery:
    """A message for a downstream route; ``final`` when it answers the route's request."""

    route: Any
    message: rpc.Message
    related: rpc.RequestId | None
    final: bool = False


@dataclass(slots=True)
class ServerRequest:
    """A request the upstream made of its client (sampling, elicitation, roots).

    ``route`` is the caller whose request is in flight (None if nobody is); the
    answer goes back with :meth:`ChannelState.answer_server_request` and ``up_id``.
    """

    route: Any
    related: rpc.RequestId | None
    up_id: rpc.RequestId
    message: rpc.Message


@dataclass(slots=True)
class Broadcast:
    """A notification not tied to any request (list_changed, resources/updated, stray logs)."""

    message: rpc.Message


Event = Delivery | ServerRequest | Broadcast


@dataclass
class ChannelState:
    """The id and token maps of one upstream channel."""

    name: str
    pending: dict[rpc.RequestId, Pending] = field(default_factory=dict)
    tokens: dict[str, rpc.RequestId] = field(default_factory=dict)  # up token -> up request id
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def next_id(self) -> int:
        return next(self._ids)

    def forward_request(
        self,
        route: Any,
        message: rpc.Message,
        *,
        wants_logs: bool = True,
        accepts_requests: bool = True,
    ) -> rpc.Message:
        """Rewrite a downstream request for this channel and remember who asked."""
        up_id = self.next_id()
        pend = Pending(
            route=route,
            down_id=message["id"],
            method=message["method"],
            seq=next(self._seq),
            wants_logs=wants_logs,
            accepts_requests=accepts_requests,
        )
        out = {**message, "id": up_id}
        params = message.get("params")
        if isinstance(params, dict):
            meta = params.get("_meta")
            if isinstance(meta, dict) and "progressToken" in meta:
                token = meta["progressToken"]
                up_token = f"{self.name}:{up_id}"
                pend.down_token = token
                pend.up_token = up_token
                self.tokens[up_token] = up_id
                out["params"] = {**params, "_meta": {**meta, "progressToken": up_token}}
        self.pending[up_id] = pend
        return out

    def reroute(self, up_id: rpc.RequestId, route: Any, down_id: rpc.RequestId) -> bool:
        """Hand a pending request to another caller (a multi-round-trip retry)."""
        pend = self.pending.get(up_id)
        if pend is None:
            return False
        pend.route = route
        pend.down_id = down_id
        pend.seq = next(self._seq)
        return True

    def cancel(self, up_id: rpc.RequestId, reason: str | None = None) -> rpc.Message | None:
        """Forget a pending request and give the notification that tells the upstream."""
        pend = self._pop(up_id)
        if pend is None:
            return None
        params: dict[str, Any] = {"requestId": up_id}
        if reason:
            params["reason"] = reason
        return rpc.notification("notifications/cancelled", params)

    def fail_all(self, code: int, message: str) -> list[Delivery]:
        """The channel is gone: every caller gets an error now, none waits."""
        out = [
            Delivery(p.route, rpc.error(p.down_id, code, message), p.down_id, final=True)
            for p in self.pending.values()
        ]
        self.pending.clear()
        self.tokens.clear()
        return out

    def _pop(self, up_id: rpc.RequestId) -> Pending | None:
        pend = self.pending.pop(up_id, None)
        if pend is not None and pend.up_token is not None:
            self.tokens.pop(pend.up_token, None)
        return pend

    def _latest(self, *, logs: bool = False, requests: bool = False) -> Pending | None:
        best: Pending | None = None
        for p in self.pending.values():
            if logs and not p.wants_logs:
                continue
            if requests and not p.accepts_requests:
                continue
            if best is None or p.seq > best.seq:
                best = p
        return best

    def answer_server_request(self, up_id: rpc.RequestId, reply: rpc.Message) -> rpc.Message:
        """A downstream client's answer to a server request, readdressed to the upstream."""
        out = {k: v for k, v in reply.items() if k != "id"}
        out["id"] = up_id
        return out

    def receive(self, message: rpc.Message) -> list[Event]:
        """One message from the upstream: what to deliver, and to whom."""
        if "method" not in message:  # a response (the usual message)
            pend = self._pop(message["id"])
            if pend is None:
                return []  # answer to a cancelled or timed-out request: dropped on purpose
            out = {**message, "id": pend.down_id}
            return [Delivery(pend.route, out, pend.down_id, final=True)]
        method = message["method"]
        params = rpc.params_of(message)
        if "id" in message:
            target = self._latest(requests=True)
            if target is None:
                return [ServerRequest(None, None, message["id"], message)]
            return [ServerRequest(target.route, target.down_id, message["id"], message)]
        if method == "notifications/progress":
            up_req = self.tokens.get(str(params.get("progressToken")))
            pend = self.pending.get(up_req) if up_req is not None else None
            if pend is None:
                return []
            out = {**message, "params": {**params, "progressToken": pend.down_token}}
            return [Delivery(pend.route, out, pend.down_id)]
        meta = params.get("_meta")
        if isinstance(meta, dict) and META_SUBSCRIPTION_ID in meta:
            sub_id = meta[META_SUBSCRIPTION_ID]
            pend = self.pending.get(sub_id) if isinstance(sub_id, str | int) else None
            if pend is None:
                return []
            out = {**message, "params": {**params, "_meta": {**meta, META_SUBSCRIPTION_ID: pend.down_id}}}
            return [Delivery(pend.route, out, pend.down_id)]
        if method == "notifications/cancelled":
            # The upstream gave up on one of its own requests to a client.
            return [Broadcast(message)]
        if method == "notifications/message":
            target = self._latest(logs=True)
            if target is not None:
                return [Delivery(target.route, message, target.down_id)]
        return [Broadcast(message)]

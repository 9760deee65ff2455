"""ChannelState: many callers share one upstream channel; every answer must find its way home.

Routes are opaque to the state machine, so the tests use identity-compared objects:
a delivery is right only if it reaches the very route object that sent the request,
with that route's own request id and progress token restored.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mcp_bastion.core import jsonrpc as rpc
from mcp_bastion.core.eras import META_SUBSCRIPTION_ID
from mcp_bastion.core.forward import Broadcast, ChannelState, Delivery, ServerRequest


class Route:
    """A downstream caller; compared by identity only."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __eq__(self, other: object) -> bool:  # identity, even against a same-labelled twin
        return self is other

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"Route({self.label})"


def req(down_id: rpc.RequestId, method: str = "tools/call", token: Any = None, **params: Any) -> rpc.Message:
    p: dict[str, Any] = dict(params)
    if token is not None:
        p["_meta"] = {"progressToken": token}
    return rpc.request(down_id, method, p)


def progress(up_token: Any, value: float = 1.0, **extra: Any) -> rpc.Message:
    return rpc.notification("notifications/progress", {"progressToken": up_token, "progress": value, **extra})


def only(events: list[Any]) -> Any:
    assert len(events) == 1, events
    return events[0]


# --- unit tests ---------------------------------------------------------------------------


def test_ids_are_channel_local_and_increasing() -> None:
    a, b = ChannelState("a"), ChannelState("b")
    assert [a.next_id() for _ in range(3)] == [1, 2, 3]
    assert b.next_id() == 1
    r = Route("r")
    assert a.forward_request(r, req(1))["id"] == 4


def test_forward_rewrites_only_the_id_without_mutating_the_input() -> None:
    state = ChannelState("up")
    r = Route("r")
    msg = req("abc", "tools/call", name="echo", arguments={"x": 1})
    before = copy.deepcopy(msg)
    out = state.forward_request(r, msg)
    assert msg == before
    assert out == {**before, "id": out["id"]}
    assert isinstance(out["id"], int)
    pend = state.pending[out["id"]]
    assert (pend.route, pend.down_id, pend.method) == (r, "abc", "tools/call")
    assert pend.down_token is None and pend.up_token is None
    assert state.tokens == {}


def test_forward_rewrites_the_progress_token_and_keeps_other_meta() -> None:
    state = ChannelState("up")
    msg = rpc.request(7, "tools/call", {"name": "x", "_meta": {"progressToken": "tok", "other": 1}})
    before = copy.deepcopy(msg)
    out = state.forward_request(Route("r"), msg)
    assert msg == before
    up_id = out["id"]
    assert out["params"] == {"name": "x", "_meta": {"progressToken": f"up:{up_id}", "other": 1}}
    assert state.tokens == {f"up:{up_id}": up_id}
    assert state.pending[up_id].down_token == "tok"


def test_forward_without_params_or_with_odd_meta() -> None:
    state = ChannelState("up")
    r = Route("r")
    out = state.forward_request(r, rpc.request(1, "ping"))
    assert "params" not in out
    out = state.forward_request(r, rpc.request(2, "m", {"_meta": "junk"}))
    assert out["params"] == {"_meta": "junk"}
    assert state.tokens == {}


def test_colliding_ids_and_tokens_are_told_apart() -> None:
    state = ChannelState("up")
    a, b = Route("a"), Route("b")
    out_a = state.forward_request(a, req(1, token="t"))
    out_b = state.forward_request(b, req(1, token="t"))
    assert out_a["id"] != out_b["id"]
    tok_a = out_a["params"]["_meta"]["progressToken"]
    tok_b = out_b["params"]["_meta"]["progressToken"]
    assert tok_a != tok_b

    ev = only(state.receive(progress(tok_b, 0.5)))
    assert isinstance(ev, Delivery) and ev.route is b and not ev.final
    assert ev.message["params"] == {"progressToken": "t", "progress": 0.5}
    assert ev.related == 1

    ev = only(state.receive(rpc.result(out_b["id"], {"from": "b"})))
    assert ev.route is b and ev.final and ev.message == rpc.result(1, {"from": "b"})
    ev = only(state.receive(rpc.result(out_a["id"], {"from": "a"})))
    assert ev.route is a and ev.final and ev.message == rpc.result(1, {"from": "a"})
    assert state.pending == {} and state.tokens == {}


def test_error_replies_are_routed_like_results() -> None:
    state = ChannelState("up")
    r = Route("r")
    out = state.forward_request(r, req("x"))
    ev = only(state.receive(rpc.error(out["id"], -32601, "nope", {"d": 1})))
    assert ev.route is r and ev.final and ev.related == "x"
    assert ev.message == rpc.error("x", -32601, "nope", {"d": 1})


def test_unknown_and_duplicate_answers_are_dropped() -> None:
    state = ChannelState("up")
    r = Route("r")
    out = state.forward_request(r, req(1))
    assert state.receive(rpc.result(999, {})) == []
    assert state.receive(rpc.result(str(out["id"]), {})) == []  # "1" is not 1
    assert len(state.receive(rpc.result(out["id"], {}))) == 1
    assert state.receive(rpc.result(out["id"], {})) == []


def test_progress_edge_cases_are_dropped() -> None:
    state = ChannelState("up")
    r = Route("r")
    out = state.forward_request(r, req(1, token="t"))
    up_token = out["params"]["_meta"]["progressToken"]
    assert state.receive(progress("t")) == []  # the caller's own token means nothing upstream
    assert state.receive(progress("up:999")) == []
    assert state.receive(rpc.notification("notifications/progress", {"progress": 1})) == []
    assert state.receive(rpc.notification("notifications/progress")) == []
    assert len(state.receive(progress(up_token))) == 1
    state.receive(rpc.result(out["id"], {}))
    assert state.receive(progress(up_token)) == []  # after the answer


def test_progress_keeps_the_original_token_type() -> None:
    state = ChannelState("up")
    r = Route("r")
    for token in (0, 5, "5", "up:1"):
        out = state.forward_request(r, req(1, token=token))
        ev = only(state.receive(progress(out["params"]["_meta"]["progressToken"], total=10, message="m")))
        assert ev.message["params"] == {"progressToken": token, "progress": 1.0, "total": 10, "message": "m"}
        assert type(ev.message["params"]["progressToken"]) is type(token)


def test_cancel() -> None:
    state = ChannelState("up")
    r = Route("r")
    out = state.forward_request(r, req(1, token="t"))
    up_id, up_token = out["id"], out["params"]["_meta"]["progressToken"]
    assert state.cancel(up_id, "user gave up") == rpc.notification(
        "notifications/cancelled", {"requestId": up_id, "reason": "user gave up"}
    )
    assert state.pending == {} and state.tokens == {}
    assert state.cancel(up_id) is None
    assert state.receive(rpc.result(up_id, {})) == []  # the late answer
    assert state.receive(progress(up_token)) == []
    out = state.forward_request(r, req(2))
    assert state.cancel(out["id"]) == rpc.notification("notifications/cancelled", {"requestId": out["id"]})
    out = state.forward_request(r, req(3))
    assert state.cancel(out["id"], "") == rpc.notification(
        "notifications/cancelled", {"requestId": out["id"]}
    )


def test_fail_all_answers_each_caller_once() -> None:
    state = ChannelState("up")
    routes = [Route(str(i)) for i in range(4)]
    for n, r in enumerate(routes):
        state.forward_request(r, req(1, token="t" if n % 2 else None))
    done = state.forward_request(routes[0], req(2))
    state.receive(rpc.result(done["id"], {}))
    gone = state.forward_request(routes[1], req(3))
    state.cancel(gone["id"])

    out = state.fail_all(rpc.UPSTREAM_UNAVAILABLE, "upstream 'up' exited")
    assert Counter(id(d.route) for d in out) == Counter(id(r) for r in routes)
    for d in out:
        assert d.final and d.related == 1
        assert d.message == rpc.error(1, rpc.UPSTREAM_UNAVAILABLE, "upstream 'up' exited")
    assert state.pending == {} and state.tokens == {}
    assert state.fail_all(rpc.UPSTREAM_UNAVAILABLE, "again") == []


def test_server_requests_go_to_the_latest_caller_that_accepts_them() -> None:
    state = ChannelState("up")
    a, b, c = Route("a"), Route("b"), Route("c")
    sampling = rpc.request(1, "sampling/createMessage", {"messages": []})

    ev = only(state.receive(sampling))
    assert ev == ServerRequest(None, None, 1, sampling)

    out_a = state.forward_request(a, req("A"))
    out_b = state.forward_request(b, req("B"))
    state.forward_request(c, req("C"), accepts_requests=False)
    ev = only(state.receive(sampling))
    assert isinstance(ev, ServerRequest)
    assert ev.route is b and ev.related == "B" and ev.up_id == 1 and ev.message is sampling

    state.receive(rpc.result(out_b["id"], {}))
    assert only(state.receive(sampling)).route is a
    # A re-routed request becomes the most recent one.
    d = Route("d")
    out_d = state.forward_request(d, req("D"))
    assert only(state.receive(sampling)).route is d
    assert state.reroute(out_a["id"], a, "A2")
    ev = only(state.receive(sampling))
    assert ev.route is a and ev.related == "A2"
    state.cancel(out_a["id"])
    state.cancel(out_d["id"])
    assert only(state.receive(sampling)).route is None  # only c is left, and it declined


def test_server_request_ids_are_not_confused_with_pending_ids() -> None:
    state = ChannelState("up")
    r = Route("r")
    out = state.forward_request(r, req(1))
    # The upstream's own request id space may reuse our numbers.
    ev = only(state.receive(rpc.request(out["id"], "roots/list")))
    assert isinstance(ev, ServerRequest) and ev.up_id == out["id"]
    assert out["id"] in state.pending


def test_answer_server_request_readdresses_the_reply() -> None:
    state = ChannelState("up")
    assert state.answer_server_request("s-1", rpc.result(42, {"roots": []})) == rpc.result(
        "s-1", {"roots": []}
    )
    assert state.answer_server_request(9, rpc.error("x", -1, "no")) == rpc.error(9, -1, "no")
    reply = rpc.result(1, {})
    state.answer_server_request(2, reply)
    assert reply["id"] == 1  # not mutated


def test_reroute() -> None:
    state = ChannelState("up")
    a, b = Route("a"), Route("b")
    out = state.forward_request(a, req("first", token="t"))
    assert state.reroute(out["id"], b, "second")
    assert not state.reroute(12345, b, "x")
    ev = only(state.receive(progress(out["params"]["_meta"]["progressToken"])))
    assert ev.route is b and ev.related == "second"
    ev = only(state.receive(rpc.result(out["id"], {"ok": 1})))
    assert ev.route is b and ev.message == rpc.result("second", {"ok": 1})
    assert not state.reroute(out["id"], a, "third")


def test_subscription_notifications_go_to_the_listen_caller() -> None:
    state = ChannelState("up")
    a, b = Route("a"), Route("b")
    out_a = state.forward_request(a, req("L", "subscriptions/listen"))
    out_b = state.forward_request(b, req("L", "subscriptions/listen"))
    note = rpc.notification(
        "notifications/resources/updated",
        {"uri": "x://1", "_meta": {META_SUBSCRIPTION_ID: out_a["id"], "keep": True}},
    )
    ev = only(state.receive(note))
    assert isinstance(ev, Delivery) and ev.route is a and not ev.final and ev.related == "L"
    assert ev.message["params"] == {"uri": "x://1", "_meta": {META_SUBSCRIPTION_ID: "L", "keep": True}}
    assert note["params"]["_meta"][META_SUBSCRIPTION_ID] == out_a["id"]  # input untouched

    ev = only(
        state.receive(
            rpc.notification(
                "notifications/tools/list_changed", {"_meta": {META_SUBSCRIPTION_ID: out_b["id"]}}
            )
        )
    )
    assert ev.route is b

    # Unknown subscription, and one whose listen request has ended: dropped.
    assert state.receive(rpc.notification("n", {"_meta": {META_SUBSCRIPTION_ID: 999}})) == []
    state.receive(rpc.result(out_a["id"], {}))
    assert state.receive(note) == []


@pytest.mark.parametrize("sub_id", [[1], {"id": 1}])
def test_malformed_subscription_id_is_dropped_not_raised(sub_id: Any) -> None:
    # An upstream notification carrying a non-scalar subscriptionId must not crash the
    # channel's reader (receive() is called straight from the upstream read loop).
    state = ChannelState("up")
    state.forward_request(Route("r"), req(1, "subscriptions/listen"))
    note = rpc.notification("notifications/resources/updated", {"_meta": {META_SUBSCRIPTION_ID: sub_id}})
    assert state.receive(note) == []


def test_log_messages_go_to_the_latest_caller_that_wants_them() -> None:
    state = ChannelState("up")
    log = rpc.notification("notifications/message", {"level": "info", "data": "x"})
    assert state.receive(log) == [Broadcast(log)]
    a, b = Route("a"), Route("b")
    out_a = state.forward_request(a, req("A"))
    state.forward_request(b, req("B"), wants_logs=False)
    ev = only(state.receive(log))
    assert isinstance(ev, Delivery) and ev.route is a and ev.related == "A" and not ev.final
    assert ev.message is log
    state.cancel(out_a["id"])
    assert state.receive(log) == [Broadcast(log)]


@pytest.mark.parametrize(
    "note",
    [
        rpc.notification("notifications/tools/list_changed"),
        rpc.notification("notifications/resources/updated", {"uri": "x://y"}),
        rpc.notification("notifications/cancelled", {"requestId": 1}),
        rpc.notification("notifications/whatever", {"_meta": "not-an-object"}),
    ],
)
def test_unrelated_notifications_are_broadcast(note: rpc.Message) -> None:
    state = ChannelState("up")
    state.forward_request(Route("r"), req(1))
    assert state.receive(note) == [Broadcast(note)]


def test_routes_are_opaque() -> None:
    state = ChannelState("up")
    route: Any = ["unhashable", {"route": True}]
    out = state.forward_request(route, req(1))
    assert only(state.receive(rpc.result(out["id"], {}))).route is route


# --- randomized: many callers, one channel, answers in any order --------------------------

down_ids = st.sampled_from([1, 2, 0, "1", "a", "up:1"])
tokens = st.sampled_from([None, 1, "t", "1", 0, "up:1", "up:2"])


@given(
    calls=st.lists(
        st.tuples(st.integers(0, 4), down_ids, tokens, st.integers(0, 3)), min_size=1, max_size=25
    ),
    data=st.data(),
)
@settings(max_examples=150, deadline=None)
def test_every_reply_and_progress_returns_to_its_sender(calls: list[Any], data: st.DataObject) -> None:
    state = ChannelState("up")
    routes = [Route(f"r{i}") for i in range(5)]
    sent: dict[int, tuple[Route, Any, Any]] = {}
    upstream_events: list[tuple[str, int, int]] = []
    for who, down_id, token, n_progress in calls:
        out = state.forward_request(routes[who], req(down_id, token=token))
        sent[out["id"]] = (routes[who], down_id, token)
        upstream_events.append(("answer", out["id"], 0))
        if token is not None:
            upstream_events.extend(("progress", out["id"], k) for k in range(n_progress))
    order = data.draw(st.permutations(upstream_events))

    answered: set[int] = set()
    got: list[tuple[str, Route, Any, Any]] = []
    expected: list[tuple[str, Route, Any, Any]] = []
    for kind, up_id, k in order:
        route, down_id, token = sent[up_id]
        if kind == "answer":
            events = state.receive(rpc.result(up_id, {"up": up_id}))
            expected.append(("final", route, down_id, up_id))
            answered.add(up_id)
        else:
            events = state.receive(progress(f"up:{up_id}", k))
            if up_id not in answered:
                expected.append(("progress", route, token, k))
        for ev in events:
            assert isinstance(ev, Delivery)
            if ev.final:
                assert ev.related == ev.message["id"]
                got.append(("final", ev.route, ev.message["id"], ev.message["result"]["up"]))
            else:
                params = ev.message["params"]
                got.append(("progress", ev.route, params["progressToken"], params["progress"]))
    assert got == expected
    assert state.pending == {} and state.tokens == {}


# --- stateful: everything interleaved -------------------------------------------------------


@dataclass
class Rec:
    route: Route
    down_id: Any
    token: Any  # the caller's progress token, None when it sent none
    up_token: str | None
    seq: int
    wants_logs: bool
    accepts_requests: bool


class ChannelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = ChannelState("up")
        self.routes = [Route(f"r{i}") for i in range(4)]
        self.live: dict[int, Rec] = {}
        self.dead: dict[int, Rec] = {}
        self.issued_ids: set[int] = set()
        self.issued_tokens: set[str] = set()
        self.seq = 0

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _kill(self, up_id: int) -> None:
        self.dead[up_id] = self.live.pop(up_id)

    def _latest(self, attr: str) -> Rec | None:
        candidates = [r for r in self.live.values() if getattr(r, attr)]
        return max(candidates, key=lambda r: r.seq) if candidates else None

    @rule(
        who=st.integers(0, 3),
        down_id=down_ids,
        token=tokens,
        wants_logs=st.booleans(),
        accepts_requests=st.booleans(),
        method=st.sampled_from(["tools/call", "resources/read", "subscriptions/listen"]),
    )
    def send(
        self, who: int, down_id: Any, token: Any, wants_logs: bool, accepts_requests: bool, method: str
    ) -> None:
        msg = req(down_id, method, token=token, arg=who)
        before = copy.deepcopy(msg)
        out = self.state.forward_request(
            self.routes[who], msg, wants_logs=wants_logs, accepts_requests=accepts_requests
        )
        assert msg == before
        up_id = out["id"]
        assert isinstance(up_id, int) and up_id not in self.issued_ids
        self.issued_ids.add(up_id)
        assert out["method"] == method and out["params"]["arg"] == who
        up_token = None
        if token is not None:
            up_token = out["params"]["_meta"]["progressToken"]
            assert isinstance(up_token, str) and up_token not in self.issued_tokens
            self.issued_tokens.add(up_token)
        else:
            assert "_meta" not in out["params"]
        self.live[up_id] = Rec(
            self.routes[who], down_id, token, up_token, self._next_seq(), wants_logs, accepts_requests
        )

    @precondition(lambda self: self.live)
    @rule(data=st.data(), is_error=st.booleans())
    def answer(self, data: st.DataObject, is_error: bool) -> None:
        up_id = data.draw(st.sampled_from(sorted(self.live)))
        rec = self.live[up_id]
        reply = rpc.error(up_id, -32000, f"e{up_id}") if is_error else rpc.result(up_id, {"v": up_id})
        ev = only(self.state.receive(reply))
        assert isinstance(ev, Delivery) and ev.final
        assert ev.route is rec.route and ev.related == rec.down_id
        assert ev.message == {**reply, "id": rec.down_id}
        self._kill(up_id)

    @precondition(lambda self: any(r.up_token for r in self.live.values()))
    @rule(data=st.data(), value=st.integers(0, 100))
    def progress_live(self, data: st.DataObject, value: int) -> None:
        up_id = data.draw(st.sampled_from(sorted(k for k, r in self.live.items() if r.up_token)))
        rec = self.live[up_id]
        ev = only(self.state.receive(progress(rec.up_token, value, total=100)))
        assert isinstance(ev, Delivery) and not ev.final
        assert ev.route is rec.route and ev.related == rec.down_id
        assert ev.message["params"] == {"progressToken": rec.token, "progress": value, "total": 100}

    @precondition(lambda self: self.dead)
    @rule(data=st.data())
    def late_messages_are_dropped(self, data: st.DataObject) -> None:
        up_id = data.draw(st.sampled_from(sorted(self.dead)))
        rec = self.dead[up_id]
        assert self.state.receive(rpc.result(up_id, {"late": True})) == []
        assert self.state.receive(rpc.error(up_id, -1, "late")) == []
        if rec.up_token:
            assert self.state.receive(progress(rec.up_token)) == []
        assert self.state.receive(rpc.notification("n", {"_meta": {META_SUBSCRIPTION_ID: up_id}})) == []
        assert self.state.cancel(up_id) is None
        assert not self.state.reroute(up_id, self.routes[0], "x")

    @precondition(lambda self: self.live)
    @rule(data=st.data(), reason=st.sampled_from([None, "", "bored"]))
    def cancel(self, data: st.DataObject, reason: str | None) -> None:
        up_id = data.draw(st.sampled_from(sorted(self.live)))
        note = self.state.cancel(up_id, reason)
        assert note is not None and note["method"] == "notifications/cancelled"
        assert note["params"]["requestId"] == up_id
        assert note["params"].get("reason") == (reason or None)
        self._kill(up_id)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), who=st.integers(0, 3), down_id=down_ids)
    def reroute(self, data: st.DataObject, who: int, down_id: Any) -> None:
        up_id = data.draw(st.sampled_from(sorted(self.live)))
        assert self.state.reroute(up_id, self.routes[who], down_id)
        rec = self.live[up_id]
        rec.route, rec.down_id, rec.seq = self.routes[who], down_id, self._next_seq()

    @rule(up_req_id=st.sampled_from([1, 2, "s1"]))
    def server_request(self, up_req_id: Any) -> None:
        msg = rpc.request(up_req_id, "elicitation/create", {"message": "?"})
        ev = only(self.state.receive(msg))
        assert isinstance(ev, ServerRequest) and ev.up_id == up_req_id and ev.message is msg
        target = self._latest("accepts_requests")
        if target is None:
            assert ev.route is None and ev.related is None
        else:
            assert ev.route is target.route and ev.related == target.down_id

    @rule()
    def log(self) -> None:
        msg = rpc.notification("notifications/message", {"level": "info", "data": "hi"})
        ev = only(self.state.receive(msg))
        target = self._latest("wants_logs")
        if target is None:
            assert ev == Broadcast(msg)
        else:
            assert isinstance(ev, Delivery) and not ev.final
            assert ev.route is target.route and ev.related == target.down_id

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def subscription_event(self, data: st.DataObject) -> None:
        up_id = data.draw(st.sampled_from(sorted(self.live)))
        rec = self.live[up_id]
        msg = rpc.notification(
            "notifications/resources/updated", {"uri": "a://b", "_meta": {META_SUBSCRIPTION_ID: up_id}}
        )
        ev = only(self.state.receive(msg))
        assert isinstance(ev, Delivery) and not ev.final
        assert ev.route is rec.route and ev.related == rec.down_id
        assert ev.message["params"] == {"uri": "a://b", "_meta": {META_SUBSCRIPTION_ID: rec.down_id}}

    @rule()
    def broadcast(self) -> None:
        msg = rpc.notification("notifications/tools/list_changed")
        assert self.state.receive(msg) == [Broadcast(msg)]

    @rule(code=st.sampled_from([rpc.UPSTREAM_UNAVAILABLE, rpc.INTERNAL_ERROR]))
    def fail_all(self, code: int) -> None:
        out = self.state.fail_all(code, "gone")
        expected = Counter((id(r.route), repr(r.down_id)) for r in self.live.values())
        assert Counter((id(d.route), repr(d.related)) for d in out) == expected
        for d in out:
            assert d.final and d.message == rpc.error(d.related, code, "gone")
        for up_id in list(self.live):
            self._kill(up_id)

    @invariant()
    def maps_match_the_model(self) -> None:
        assert set(self.state.pending) == set(self.live)
        assert self.state.tokens == {r.up_token: k for k, r in self.live.items() if r.up_token}
        for up_id, rec in self.live.items():
            pend = self.state.pending[up_id]
            assert pend.route is rec.route and pend.down_id == rec.down_id
            assert pend.down_token == rec.token


ChannelMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
TestChannelMachine = ChannelMachine.TestCase

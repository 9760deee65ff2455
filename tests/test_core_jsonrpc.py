"""The JSON-RPC envelope: parsing, validation, classification and builders (sans-IO)."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_bastion.core import jsonrpc as rpc

# --- strategies -----------------------------------------------------------------------

# orjson encodes 64-bit integers; JSON-RPC ids are strings or integers (never bool / null).
ints64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
json_scalars = (
    st.none() | st.booleans() | ints64 | st.floats(allow_nan=False, allow_infinity=False) | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
ids = st.text(max_size=20) | ints64
methods = st.text(min_size=1, max_size=30)
params = st.none() | json_objects

ENVELOPE_KEYS = ["jsonrpc", "id", "method", "params", "result", "error"]
# Values that are sometimes right and often wrong for each envelope key.
envelope_values = st.one_of(
    st.just("2.0"),
    st.just("1.0"),
    st.just(""),
    st.just(2.0),
    ids,
    st.booleans(),
    st.none(),
    json_objects,
    st.lists(json_values, max_size=3),
    json_values,
)
envelope_like = st.dictionaries(st.sampled_from(ENVELOPE_KEYS), envelope_values, max_size=6)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": draw(ids), "method": draw(methods)}
    p = draw(st.none() | st.just("absent") | json_objects)
    if p != "absent":
        msg["params"] = p
    return msg


@st.composite
def notifications(draw: st.DrawFn) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": draw(methods)}
    if draw(st.booleans()):
        msg["params"] = draw(json_objects)
    return msg


@st.composite
def responses(draw: st.DrawFn) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": draw(ids)}
    if draw(st.booleans()):
        msg["result"] = draw(json_objects)
    else:
        err: dict[str, Any] = {"code": draw(ints64), "message": draw(st.text(max_size=20))}
        if draw(st.booleans()):
            err["data"] = draw(json_values)
        msg["error"] = err
    return msg


def assert_invalid(message: Any) -> rpc.ProtocolError:
    with pytest.raises(rpc.ProtocolError) as info:
        rpc.validate(message)
    assert info.value.code == rpc.INVALID_REQUEST == -32600
    assert info.value.http_status == 400
    assert info.value.message.startswith("Invalid Request")
    return info.value


# --- constants and ProtocolError --------------------------------------------------------


def test_error_codes_are_the_spec_values() -> None:
    assert rpc.PARSE_ERROR == -32700
    assert rpc.INVALID_REQUEST == -32600
    assert rpc.METHOD_NOT_FOUND == -32601
    assert rpc.INVALID_PARAMS == -32602
    assert rpc.INTERNAL_ERROR == -32603
    assert rpc.HEADER_MISMATCH == -32020
    assert rpc.MISSING_CLIENT_CAPABILITY == -32021
    assert rpc.UNSUPPORTED_PROTOCOL_VERSION == -32022
    # The gateway's own codes stay outside the range JSON-RPC reserves.
    for code in (rpc.UPSTREAM_UNAVAILABLE, rpc.REQUEST_TIMEOUT, rpc.TOO_MANY_REQUESTS):
        assert not -32768 <= code <= -32000


def test_protocol_error_carries_code_message_data_and_status() -> None:
    exc = rpc.ProtocolError(rpc.INVALID_PARAMS, "bad", {"x": 1}, http_status=422)
    assert str(exc) == "bad"
    assert (exc.code, exc.message, exc.data, exc.http_status) == (-32602, "bad", {"x": 1}, 422)
    assert exc.to_message(7) == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": -32602, "message": "bad", "data": {"x": 1}},
    }
    plain = rpc.ProtocolError(rpc.INTERNAL_ERROR, "oops")
    assert plain.http_status == 400
    assert plain.data is None
    assert plain.to_message(None) == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32603, "message": "oops"},
    }


# --- builders ---------------------------------------------------------------------------


def test_request_builder() -> None:
    assert rpc.request(1, "tools/list") == {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    assert rpc.request("a", "tools/call", {"name": "x"}) == {
        "jsonrpc": "2.0",
        "id": "a",
        "method": "tools/call",
        "params": {"name": "x"},
    }
    # An empty params object is kept: only None means "no params".
    assert rpc.request(1, "m", {})["params"] == {}


def test_notification_builder() -> None:
    assert rpc.notification("notifications/initialized") == {
        "jsonrpc": "2.0",
        "method": "notifications/initialized",
    }
    assert rpc.notification("n", {"a": 1}) == {"jsonrpc": "2.0", "method": "n", "params": {"a": 1}}


def test_result_and_error_builders() -> None:
    assert rpc.result(3, {"ok": True}) == {"jsonrpc": "2.0", "id": 3, "result": {"ok": True}}
    assert rpc.result(None, {}) == {"jsonrpc": "2.0", "id": None, "result": {}}
    assert rpc.error(3, -1, "m") == {"jsonrpc": "2.0", "id": 3, "error": {"code": -1, "message": "m"}}
    # Falsy but present data is kept; only None is omitted.
    assert rpc.error(3, -1, "m", 0)["error"]["data"] == 0
    assert rpc.error(3, -1, "m", [])["error"]["data"] == []
    assert "data" not in rpc.error(3, -1, "m", None)["error"]


@given(requests() | notifications() | responses())
@settings(max_examples=100, deadline=None)
def test_builders_produce_messages_that_validate(message: dict[str, Any]) -> None:
    if "method" in message and "id" in message:
        built = rpc.request(message["id"], message["method"], message.get("params"))
    elif "method" in message:
        built = rpc.notification(message["method"], message.get("params"))
    elif "result" in message:
        built = rpc.result(message["id"], message["result"])
    else:
        err = message["error"]
        built = rpc.error(message["id"], err["code"], err["message"], err.get("data"))
    assert rpc.validate(built) is built
    assert rpc.loads(rpc.dumps(built)) == built


# --- loads / dumps ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"   ",
        b"{",
        b"}",
        b"[1,]",
        b'{"a":1}x',
        b"{'a': 1}",
        b"NaN",
        b"Infinity",
        b"undefined",
        b'{"a":}',
        b"\xff\xfe",
        b'"\xed\xa0\x80"',  # an encoded lone surrogate
        "\ud800",
        "nul",
        "tru",
        '"unterminated',
    ],
)
def test_loads_garbage_is_parse_error(garbage: bytes | str) -> None:
    with pytest.raises(rpc.ProtocolError) as info:
        rpc.loads(garbage)
    assert info.value.code == rpc.PARSE_ERROR == -32700
    assert info.value.message.startswith("Parse error")
    assert info.value.http_status == 400


@pytest.mark.parametrize("text", ["{}", "[]", "1", '"s"', "null", "true", '{"jsonrpc":"2.0"}'])
def test_loads_accepts_any_json_document(text: str) -> None:
    assert rpc.loads(text) == orjson.loads(text)
    assert rpc.loads(text.encode()) == orjson.loads(text)


@given(json_values)
@settings(max_examples=100, deadline=None)
def test_dumps_loads_round_trip(value: Any) -> None:
    assert rpc.loads(rpc.dumps(value)) == value


@given(st.binary(max_size=64) | st.text(max_size=64))
@settings(max_examples=150, deadline=None)
def test_loads_of_arbitrary_input_raises_only_parse_error(data: bytes | str) -> None:
    try:
        rpc.loads(data)
    except rpc.ProtocolError as exc:
        assert exc.code == rpc.PARSE_ERROR


@given(json_values | envelope_like)
@settings(max_examples=150, deadline=None)
def test_loads_then_validate_raises_only_protocol_errors(value: Any) -> None:
    raw = rpc.dumps(value)
    # Chop the document at an arbitrary point too: both halves must only ever be ProtocolErrors.
    for body in (raw, raw[: len(raw) // 2]):
        try:
            rpc.validate(rpc.loads(body))
        except rpc.ProtocolError as exc:
            assert exc.code in (rpc.PARSE_ERROR, rpc.INVALID_REQUEST)


# --- validate: well-formed messages -------------------------------------------------------


@given(requests())
@settings(max_examples=100, deadline=None)
def test_validate_accepts_requests(message: dict[str, Any]) -> None:
    before = copy.deepcopy(message)
    assert rpc.validate(message) is message
    assert message == before  # validation never rewrites
    assert rpc.is_request(message)
    assert not rpc.is_notification(message)
    assert not rpc.is_response(message)


@given(notifications())
@settings(max_examples=100, deadline=None)
def test_validate_accepts_notifications(message: dict[str, Any]) -> None:
    assert rpc.validate(message) is message
    assert rpc.is_notification(message)
    assert not rpc.is_request(message)
    assert not rpc.is_response(message)


@given(responses())
@settings(max_examples=100, deadline=None)
def test_validate_accepts_responses(message: dict[str, Any]) -> None:
    assert rpc.validate(message) is message
    assert rpc.is_response(message)
    assert not rpc.is_request(message)
    assert not rpc.is_notification(message)


@pytest.mark.parametrize(
    "message",
    [
        {"jsonrpc": "2.0", "id": 0, "method": "ping"},
        {"jsonrpc": "2.0", "id": -1, "method": "ping"},
        {"jsonrpc": "2.0", "id": "", "method": "ping"},
        {"jsonrpc": "2.0", "id": 2**63 - 1, "method": "ping"},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": None},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1}},
        {"jsonrpc": "2.0", "id": 1, "result": {}},
        {"jsonrpc": "2.0", "id": "x", "result": {"content": []}},
        {"jsonrpc": "2.0", "id": 1, "error": {"code": -32601, "message": "Method not found"}},
        # Unknown extra members are tolerated.
        {"jsonrpc": "2.0", "id": 1, "method": "ping", "extra": True},
    ],
)
def test_validate_accepts_examples(message: dict[str, Any]) -> None:
    assert rpc.validate(message) is message


# --- validate: malformed messages ---------------------------------------------------------


@pytest.mark.parametrize("message", [None, 1, 1.5, "x", "", True, [], [{"jsonrpc": "2.0", "method": "m"}]])
def test_validate_rejects_non_objects(message: Any) -> None:
    assert_invalid(message)


@pytest.mark.parametrize(
    "message",
    [
        {},
        {"id": 1, "method": "ping"},
        {"jsonrpc": "1.0", "id": 1, "method": "ping"},
        {"jsonrpc": 2.0, "id": 1, "method": "ping"},
        {"jsonrpc": "2", "id": 1, "method": "ping"},
        {"jsonrpc": None, "id": 1, "method": "ping"},
        {"jsonrpc": "2.0 ", "id": 1, "method": "ping"},
    ],
)
def test_validate_rejects_wrong_jsonrpc_member(message: dict[str, Any]) -> None:
    err = assert_invalid(message)
    assert '"jsonrpc"' in err.message


@pytest.mark.parametrize("method", ["", None, 1, True, [], {}, ["ping"]])
def test_validate_rejects_bad_method(method: Any) -> None:
    for msg in ({"jsonrpc": "2.0", "id": 1, "method": method}, {"jsonrpc": "2.0", "method": method}):
        err = assert_invalid(msg)
        assert '"method"' in err.message


@pytest.mark.parametrize("params", [[], [1, 2], "x", 1, True, 0.5])
def test_validate_rejects_non_object_params(params: Any) -> None:
    for msg in (
        {"jsonrpc": "2.0", "id": 1, "method": "m", "params": params},
        {"jsonrpc": "2.0", "method": "m", "params": params},
    ):
        err = assert_invalid(msg)
        assert '"params"' in err.message


@pytest.mark.parametrize("bad_id", [None, True, False, 1.0, 1.5, [], [1], {}, {"id": 1}])
def test_validate_rejects_bad_request_ids(bad_id: Any) -> None:
    err = assert_invalid({"jsonrpc": "2.0", "id": bad_id, "method": "m"})
    assert '"id"' in err.message


@pytest.mark.parametrize("bad_id", [None, True, False, 1.0, [], {}])
def test_validate_rejects_bad_response_ids(bad_id: Any) -> None:
    assert_invalid({"jsonrpc": "2.0", "id": bad_id, "result": {}})
    assert_invalid({"jsonrpc": "2.0", "id": bad_id, "error": {"code": 1, "message": "m"}})


def test_validate_rejects_response_without_id() -> None:
    assert_invalid({"jsonrpc": "2.0", "result": {}})
    assert_invalid({"jsonrpc": "2.0", "error": {"code": 1, "message": "m"}})


@pytest.mark.parametrize("err", ["boom", 1, None, [], ["code"], True])
def test_validate_rejects_non_object_error(err: Any) -> None:
    e = assert_invalid({"jsonrpc": "2.0", "id": 1, "error": err})
    assert '"error"' in e.message


@pytest.mark.parametrize(
    "message", [{"jsonrpc": "2.0"}, {"jsonrpc": "2.0", "id": 1}, {"jsonrpc": "2.0", "params": {}}]
)
def test_validate_rejects_neither_request_nor_response(message: dict[str, Any]) -> None:
    err = assert_invalid(message)
    assert "neither" in err.message


def test_validate_rejects_response_with_both_result_and_error() -> None:
    # JSON-RPC 2.0 §5: "Either the result member or error member MUST be included,
    # but both members MUST NOT be included."
    assert_invalid({"jsonrpc": "2.0", "id": 1, "result": {}, "error": {"code": -32603, "message": "x"}})


@pytest.mark.parametrize(
    "err",
    [{}, {"message": "no code"}, {"code": "-32603", "message": "m"}],
)
def test_validate_rejects_error_object_without_integer_code_and_string_message(err: dict[str, Any]) -> None:
    # JSON-RPC 2.0 §5.1: the error object's "code" MUST be an integer, "message" a string.
    assert_invalid({"jsonrpc": "2.0", "id": 1, "error": err})


# --- validate: arbitrary input ------------------------------------------------------------


@given(json_values | envelope_like)
@settings(max_examples=250, deadline=None)
def test_validate_of_arbitrary_json_raises_only_invalid_request(value: Any) -> None:
    try:
        out = rpc.validate(value)
    except rpc.ProtocolError as exc:
        assert exc.code == rpc.INVALID_REQUEST
        assert exc.http_status == 400
        assert rpc.error(None, exc.code, exc.message, exc.data)  # buildable answer
        return
    # Whatever passes is a well-formed envelope.
    assert out is value
    assert out["jsonrpc"] == "2.0"
    if "method" in out:
        assert isinstance(out["method"], str) and out["method"]
        assert out.get("params") is None or isinstance(out["params"], dict)
        if "id" in out:
            assert isinstance(out["id"], str | int) and not isinstance(out["id"], bool)
    else:
        assert "result" in out or "error" in out
        assert isinstance(out["id"], str | int) and not isinstance(out["id"], bool)
        if "error" in out:
            assert isinstance(out["error"], dict)


@given(envelope_like, st.sampled_from(ENVELOPE_KEYS), envelope_values)
@settings(max_examples=150, deadline=None)
def test_validate_is_consistent_with_classifiers(message: dict[str, Any], key: str, value: Any) -> None:
    message = {**message, "jsonrpc": "2.0", key: value}
    try:
        rpc.validate(message)
    except rpc.ProtocolError as exc:
        assert exc.code == rpc.INVALID_REQUEST
        return
    kinds = [rpc.is_request(message), rpc.is_notification(message), rpc.is_response(message)]
    assert kinds.count(True) == 1


# --- params_of / meta_of ------------------------------------------------------------------


def test_params_of_and_meta_of() -> None:
    assert rpc.params_of({"params": {"a": 1}}) == {"a": 1}
    assert rpc.params_of({}) == {}
    assert rpc.params_of({"params": None}) == {}
    assert rpc.params_of({"params": [1]}) == {}
    assert rpc.meta_of({"params": {"_meta": {"k": 1}}}) == {"k": 1}
    assert rpc.meta_of({"params": {"_meta": "x"}}) == {}
    assert rpc.meta_of({"params": {}}) == {}
    assert rpc.meta_of({"params": 5}) == {}
    assert rpc.meta_of({}) == {}


@given(json_values)
@settings(max_examples=100, deadline=None)
def test_params_of_and_meta_of_always_give_dicts(value: Any) -> None:
    for msg in ({"params": value}, {"params": {"_meta": value}}):
        assert isinstance(rpc.params_of(msg), dict)
        assert isinstance(rpc.meta_of(msg), dict)


@pytest.mark.parametrize(
    "message",
    [
        {"jsonrpc": "2.0", "id": 1, "method": None, "result": {}},
        {"jsonrpc": "2.0", "id": 1, "method": None},
        {"jsonrpc": "2.0", "id": True, "result": {}},
        {"jsonrpc": "2.0", "id": 1.5, "method": "x"},
        {"jsonrpc": "2.0", "id": 1, "method": "x", "params": []},
        {"jsonrpc": "2.0", "id": 1, "result": {}, "error": {"code": 1, "message": "m"}},
    ],
)
def test_validate_fast_path_lets_nothing_malformed_through(message: dict[str, Any]) -> None:
    with pytest.raises(rpc.ProtocolError) as exc:
        rpc.validate(message)
    assert exc.value.code == rpc.INVALID_REQUEST


_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5), st.just([])
)


@given(
    st.dictionaries(
        st.sampled_from(["jsonrpc", "id", "method", "params", "result", "error"]),
        st.one_of(_values, st.just("2.0"), st.dictionaries(st.sampled_from(["code", "message"]), _values)),
    )
)
def test_validate_fast_path_agrees_with_the_full_check(message: dict[str, Any]) -> None:
    """The exact-type fast path accepts only what the full check accepts."""
    try:
        full: Any = rpc._validate(message)
    except rpc.ProtocolError:
        full = None
    try:
        fast: Any = rpc.validate(message)
    except rpc.ProtocolError:
        fast = None
    assert fast is full

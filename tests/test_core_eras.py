"""Protocol eras: versions, the 2026-07-28 validation ladder, Mcp-Param-* checks, header codec."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from mcp.shared import inbound as sdk

from mcp_bastion.core import eras
from mcp_bastion.core import jsonrpc as rpc
from mcp_bastion.core.eras import (
    H_METHOD,
    H_NAME,
    H_PROTOCOL_VERSION,
    META_CLIENT_CAPABILITIES,
    META_CLIENT_INFO,
    META_PROTOCOL_VERSION,
    check_modern_request,
    check_param_headers,
    decode_header_value,
    encode_header_value,
)

MODERN = "2026-07-28"
FAST = settings(max_examples=100, deadline=None)


def modern(
    method: str = "tools/list",
    *,
    version: Any = MODERN,
    caps: Any = None,
    info: Any = None,
    drop: tuple[str, ...] = (),
    **params: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {META_PROTOCOL_VERSION: version, META_CLIENT_CAPABILITIES: caps or {}}
    if info is not None:
        meta[META_CLIENT_INFO] = info
    for key in drop:
        meta.pop(key)
    return rpc.request(1, method, {**params, "_meta": meta})


def headers_for(message: dict[str, Any], **over: str | None) -> dict[str, str]:
    """The headers a conforming client sends with ``message`` (lower-cased), then overrides."""
    params = message.get("params") or {}
    meta = params.get("_meta") or {}
    h: dict[str, str] = {
        H_PROTOCOL_VERSION: str(meta.get(META_PROTOCOL_VERSION)),
        H_METHOD: message["method"],
    }
    key = eras.NAME_BEARING.get(message["method"])
    if key is not None and isinstance(params.get(key), str):
        h[H_NAME] = encode_header_value(params[key])
    for name, value in over.items():
        name = name.replace("_", "-")
        if value is None:
            h.pop(name, None)
        else:
            h[name] = value
    return h


def ladder_error(message: Any, headers: dict[str, str] | None) -> rpc.ProtocolError:
    with pytest.raises(rpc.ProtocolError) as info:
        check_modern_request(message, headers)
    return info.value


# --- versions -----------------------------------------------------------------------------


def test_version_sets() -> None:
    assert eras.LATEST_HANDSHAKE == "2025-11-25"
    assert eras.LATEST_MODERN == MODERN
    assert eras.DEFAULT_UNANNOUNCED == "2025-03-26"
    for v in eras.HANDSHAKE_VERSIONS:
        assert eras.is_handshake(v) and not eras.is_modern(v)
    assert eras.is_modern(MODERN) and not eras.is_handshake(MODERN)
    for v in ("", "2026-07-29", "2025-11-25 ", "latest"):
        assert not eras.is_modern(v) and not eras.is_handshake(v)


@pytest.mark.parametrize("version", eras.HANDSHAKE_VERSIONS)
def test_negotiate_handshake_keeps_a_known_version(version: str) -> None:
    assert eras.negotiate_handshake(version) == version


@pytest.mark.parametrize("requested", [None, 1, "", "1999-01-01", MODERN, ["2025-06-18"], "2025-06-18 "])
def test_negotiate_handshake_falls_back_to_latest(requested: Any) -> None:
    assert eras.negotiate_handshake(requested) == eras.LATEST_HANDSHAKE


def test_modern_error_status_table() -> None:
    assert eras.MODERN_ERROR_STATUS[rpc.METHOD_NOT_FOUND] == 404
    for code in (
        rpc.PARSE_ERROR,
        rpc.INVALID_REQUEST,
        rpc.INVALID_PARAMS,
        rpc.HEADER_MISMATCH,
        rpc.MISSING_CLIENT_CAPABILITY,
        rpc.UNSUPPORTED_PROTOCOL_VERSION,
    ):
        assert eras.MODERN_ERROR_STATUS[code] == 400


def test_unsupported_version_error() -> None:
    err = eras.unsupported_version("2099-01-01")
    assert err.code == rpc.UNSUPPORTED_PROTOCOL_VERSION == -32022
    assert err.data == {"supported": [MODERN], "requested": "2099-01-01"}


# --- the ladder: success ------------------------------------------------------------------


@pytest.mark.parametrize("with_headers", [True, False])
def test_ladder_accepts_a_well_formed_request(with_headers: bool) -> None:
    msg = modern("tools/call", caps={"sampling": {}}, info={"name": "c", "version": "1"}, name="echo")
    env = check_modern_request(msg, headers_for(msg) if with_headers else None)
    assert env == eras.ModernEnvelope(MODERN, {"sampling": {}}, {"name": "c", "version": "1"})


def test_ladder_client_info_is_optional_and_non_object_capabilities_read_as_empty() -> None:
    msg = modern()
    msg["params"]["_meta"][META_CLIENT_CAPABILITIES] = "nonsense"
    env = check_modern_request(msg, headers_for(msg))
    assert env.client_capabilities == {}
    assert env.client_info is None


@pytest.mark.parametrize(
    ("method", "key", "value"),
    [
        ("tools/call", "name", "echo"),
        ("prompts/get", "name", "greet"),
        ("resources/read", "uri", "file:///tmp/a b.txt"),
        ("resources/read", "uri", "notes://ünïcode/naïve"),
        ("tools/call", "name", " leading-space"),
        ("tools/call", "name", "=?base64?looks-wrapped?="),
    ],
)
def test_ladder_accepts_matching_names(method: str, key: str, value: str) -> None:
    msg = modern(method, **{key: value})
    assert check_modern_request(msg, headers_for(msg)).protocol_version == MODERN


def test_ladder_accepts_a_plain_name_that_equals_its_header_literally() -> None:
    msg = modern("tools/call", name="echo")
    assert check_modern_request(msg, headers_for(msg, mcp_name="echo"))


def test_ladder_accepts_a_base64_wrapped_plain_name() -> None:
    # A client may wrap any value, even one that would be fine as-is.
    msg = modern("tools/call", name="echo")
    wrapped = "=?base64?" + base64.b64encode(b"echo").decode() + "?="
    assert check_modern_request(msg, headers_for(msg, mcp_name=wrapped))


def test_ladder_ignores_mcp_name_for_methods_without_a_name() -> None:
    msg = modern("tools/list")
    assert check_modern_request(msg, headers_for(msg, mcp_name="anything"))


def test_ladder_skips_the_name_check_when_the_body_has_no_name() -> None:
    msg = modern("tools/call")  # no "name": the tool call is malformed, but not the ladder's business
    assert check_modern_request(msg, headers_for(msg))


# --- the ladder: rung 1, the _meta envelope (-32602) --------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": None},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": []},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": None}},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": "x"}},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": [1]}},
    ],
)
@pytest.mark.parametrize("headers", [None, {}, {H_PROTOCOL_VERSION: "bogus", H_METHOD: "other"}])
def test_ladder_missing_meta_is_invalid_params(
    message: dict[str, Any], headers: dict[str, str] | None
) -> None:
    # Rung 1 runs first: even mismatching headers are not looked at.
    err = ladder_error(message, headers)
    assert err.code == rpc.INVALID_PARAMS == -32602
    assert "_meta" in err.message


@pytest.mark.parametrize(
    ("drop", "named"),
    [
        ((META_PROTOCOL_VERSION,), [META_PROTOCOL_VERSION]),
        ((META_CLIENT_CAPABILITIES,), [META_CLIENT_CAPABILITIES]),
        (
            (META_PROTOCOL_VERSION, META_CLIENT_CAPABILITIES),
            [META_PROTOCOL_VERSION, META_CLIENT_CAPABILITIES],
        ),
    ],
)
@pytest.mark.parametrize("with_headers", [True, False])
def test_ladder_missing_meta_keys_are_named(
    drop: tuple[str, ...], named: list[str], with_headers: bool
) -> None:
    msg = modern(drop=drop)
    headers = {H_PROTOCOL_VERSION: "nope"} if with_headers else None
    err = ladder_error(msg, headers)
    assert err.code == rpc.INVALID_PARAMS
    for key in named:
        assert key in err.message


# --- the ladder: rung 2, headers against the body (-32020) --------------------------------


@pytest.mark.parametrize(
    "override",
    [
        {H_PROTOCOL_VERSION: None},
        {H_PROTOCOL_VERSION: "2025-11-25"},
        {H_PROTOCOL_VERSION: MODERN + " "},
        {H_PROTOCOL_VERSION: ""},
    ],
)
def test_ladder_version_header_mismatch(override: dict[str, str | None]) -> None:
    msg = modern()
    err = ladder_error(msg, headers_for(msg, **override))
    assert err.code == rpc.HEADER_MISMATCH == -32020
    assert "MCP-Protocol-Version" in err.message


@pytest.mark.parametrize("value", [None, "tools/call", "TOOLS/LIST", "", "tools/list "])
def test_ladder_method_header_mismatch(value: str | None) -> None:
    msg = modern("tools/list")
    err = ladder_error(msg, headers_for(msg, mcp_method=value))
    assert err.code == rpc.HEADER_MISMATCH
    assert "Mcp-Method" in err.message


@pytest.mark.parametrize(
    ("method", "key"), [("tools/call", "name"), ("prompts/get", "name"), ("resources/read", "uri")]
)
@pytest.mark.parametrize(
    "header",
    [
        None,  # absent
        "other",
        "Echo",  # case matters
        " echo",
        "=?base64?" + base64.b64encode(b"other").decode() + "?=",  # wrapped, but a different value
        "=?base64?!!!?=",  # malformed base64
        "=?base64?" + base64.b64encode(b"\xff\xfe").decode() + "?=",  # not UTF-8
    ],
)
def test_ladder_name_header_mismatch(method: str, key: str, header: str | None) -> None:
    msg = modern(method, **{key: "echo"})
    err = ladder_error(msg, headers_for(msg, mcp_name=header))
    assert err.code == rpc.HEADER_MISMATCH
    assert "Mcp-Name" in err.message
    assert repr(key) in err.message


def test_ladder_non_string_name_never_matches_a_header() -> None:
    msg = modern("tools/call", name=5)
    err = ladder_error(msg, headers_for(msg, mcp_name="5"))
    assert err.code == rpc.HEADER_MISMATCH


def test_ladder_rung_order_version_header_before_method_before_name() -> None:
    msg = modern("tools/call", name="echo")
    all_wrong = headers_for(msg, mcp_protocol_version="x", mcp_method="y", mcp_name="z")
    assert "MCP-Protocol-Version" in ladder_error(msg, all_wrong).message
    two_wrong = headers_for(msg, mcp_method="y", mcp_name="z")
    assert "Mcp-Method" in ladder_error(msg, two_wrong).message
    assert "Mcp-Name" in ladder_error(msg, headers_for(msg, mcp_name="z")).message


# --- the ladder: rung 3, the version itself -----------------------------------------------


@pytest.mark.parametrize("version", ["2025-11-25", "2025-06-18", "2099-01-01", "", "latest"])
@pytest.mark.parametrize("with_headers", [True, False])
def test_ladder_unsupported_version(version: str, with_headers: bool) -> None:
    msg = modern(version=version)
    err = ladder_error(msg, headers_for(msg) if with_headers else None)
    assert err.code == rpc.UNSUPPORTED_PROTOCOL_VERSION == -32022
    assert err.data == {"supported": list(eras.MODERN_VERSIONS), "requested": version}
    assert eras.MODERN_ERROR_STATUS[err.code] == 400


def test_ladder_header_mismatch_wins_over_unsupported_version() -> None:
    # A client that disagrees with itself is told so, not that its body version is unsupported.
    msg = modern(version="2099-01-01")
    err = ladder_error(msg, headers_for(msg, mcp_protocol_version=MODERN))
    assert err.code == rpc.HEADER_MISMATCH


@pytest.mark.parametrize("version", [None, 20260728, ["2026-07-28"], {"v": MODERN}, True])
def test_ladder_non_string_version(version: Any) -> None:
    msg = modern(version=version)
    # Without headers (stdio) it is a shape defect ...
    assert ladder_error(msg, None).code == rpc.INVALID_PARAMS
    # ... with headers no header string can equal it.
    assert ladder_error(msg, headers_for(msg)).code == rpc.HEADER_MISMATCH


@given(st.text(max_size=20))
@FAST
def test_ladder_any_other_version_string_is_unsupported(version: str) -> None:
    assume(version not in eras.MODERN_VERSIONS)
    msg = modern(version=version)
    for headers in (None, headers_for(msg)):
        err = ladder_error(msg, headers)
        assert err.code == rpc.UNSUPPORTED_PROTOCOL_VERSION
        assert err.data["requested"] == version


@given(
    name=st.text(max_size=40), other=st.text(max_size=40), method=st.sampled_from(sorted(eras.NAME_BEARING))
)
@FAST
def test_ladder_names_round_trip_through_the_header(name: str, other: str, method: str) -> None:
    msg = modern(method, **{eras.NAME_BEARING[method]: name})
    assert check_modern_request(msg, headers_for(msg)).protocol_version == MODERN
    if other != name:
        bad = headers_for(msg, mcp_name=encode_header_value(other))
        assert ladder_error(msg, bad).code == rpc.HEADER_MISMATCH


# --- duplicated routing headers -----------------------------------------------------------


def test_duplicated_routing_header() -> None:
    assert eras.duplicated_routing_header([]) is None
    assert eras.duplicated_routing_header([("Mcp-Method", "a"), ("MCP-Protocol-Version", MODERN)]) is None
    assert eras.duplicated_routing_header([("Mcp-Method", "a"), ("mcp-method", "a")]) == "mcp-method"
    assert eras.duplicated_routing_header([("Mcp-Name", "a"), ("x", "1"), ("MCP-NAME", "b")]) == "mcp-name"
    assert (
        eras.duplicated_routing_header([("mcp-protocol-version", "a"), ("Mcp-Protocol-Version", "a")])
        == "mcp-protocol-version"
    )
    # Other headers may repeat freely.
    assert (
        eras.duplicated_routing_header([("Accept", "a"), ("accept", "b"), ("Mcp-Param-X", "1")] * 2) is None
    )


# --- header value codec -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["echo", "a b", "file:///x?y=1&z", "~!@#$%^&*()", "", "x=?base64?YQ==?="])
def test_encode_leaves_plain_visible_ascii_alone(value: str) -> None:
    assert encode_header_value(value) == value
    assert decode_header_value(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "héllo",
        "日本",
        " lead",
        "trail ",
        "\t",
        "tab\tinside",
        "line\nbreak",
        "\x7f",
        "=?x",
        "=?base64?YQ==?=",
    ],
)
def test_encode_wraps_everything_else(value: str) -> None:
    encoded = encode_header_value(value)
    assert encoded.startswith("=?base64?") and encoded.endswith("?=")
    assert decode_header_value(encoded) == value


def test_decode_edge_cases() -> None:
    assert decode_header_value(None) is None
    assert decode_header_value("=?base64??=") == ""
    assert decode_header_value("=?base64?YQ==?=") == "a"
    assert decode_header_value("=?base64?YQ?=") is None  # missing padding
    assert decode_header_value("=?base64?Y*Q=?=") == "=?base64?Y*Q=?="  # not the sentinel shape: verbatim
    assert decode_header_value("=?base64?" + base64.b64encode(b"\xc3").decode() + "?=") is None
    assert decode_header_value("prefix=?base64?YQ==?=") == "prefix=?base64?YQ==?="
    assert decode_header_value("=?BASE64?YQ==?=") == "=?BASE64?YQ==?="


def _header_safe(value: str) -> bool:
    return all(0x20 <= ord(c) <= 0x7E for c in value) and value == value.strip()


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_encode_decode_round_trip(value: str) -> None:
    encoded = encode_header_value(value)
    assert _header_safe(encoded)
    assert decode_header_value(encoded) == value


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
@FAST
def test_encode_is_identity_on_header_safe_text(value: str) -> None:
    assume(value == value.strip() and not value.startswith("=?"))
    assert encode_header_value(value) == value


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_decode_never_raises(value: str) -> None:
    out = decode_header_value(value)
    assert out is None or isinstance(out, str)
    out = decode_header_value("=?base64?" + value + "?=")
    assert out is None or isinstance(out, str)


@given(st.text())
@FAST
def test_codec_interoperates_with_the_sdk(value: str) -> None:
    assert decode_header_value(sdk.encode_header_value(value)) == value
    assert sdk.decode_header_value(encode_header_value(value)) == value


# --- x-mcp-header annotations and Mcp-Param-* checks --------------------------------------


def schema(**props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": props}


def hdr(type_: str, name: str) -> dict[str, Any]:
    return {"type": type_, "x-mcp-header": name}


def param_error(sch: Any, args: Any, headers: dict[str, str]) -> rpc.ProtocolError:
    with pytest.raises(rpc.ProtocolError) as info:
        check_param_headers(sch, args, headers)
    assert info.value.code == rpc.HEADER_MISMATCH
    return info.value


def test_x_mcp_headers() -> None:
    assert eras.x_mcp_headers(None) == {}
    assert eras.x_mcp_headers([]) == {}
    assert eras.x_mcp_headers({"properties": []}) == {}
    assert eras.x_mcp_headers(schema(a={"type": "string"})) == {}
    assert eras.x_mcp_headers(schema(a=hdr("string", "Region"), b={"x-mcp-header": 5}, c="junk")) == {
        "a": "Region"
    }
    # Only top-level properties are annotations this gateway checks.
    nested = schema(o={"type": "object", "properties": {"x": hdr("string", "X")}})
    assert eras.x_mcp_headers(nested) == {}


def test_param_headers_no_annotations_is_a_no_op() -> None:
    check_param_headers(None, None, {"mcp-param-x": "1"})
    check_param_headers(schema(a={"type": "string"}), {"a": "v"}, {"mcp-param-a": "other"})


@pytest.mark.parametrize(
    ("value", "header"),
    [
        ("us-west", "us-west"),
        ("", ""),
        ("a b", "a b"),
        ("ünï", encode_header_value("ünï")),
        (" pad ", encode_header_value(" pad ")),
        ("plain", "=?base64?" + base64.b64encode(b"plain").decode() + "?="),
    ],
)
def test_param_string_matches(value: str, header: str) -> None:
    check_param_headers(
        schema(region=hdr("string", "Region")), {"region": value}, {"mcp-param-region": header}
    )


@pytest.mark.parametrize(
    ("value", "header"),
    [
        ("us-west", "us-east"),
        ("us-west", "US-WEST"),
        ("us-west", " us-west"),
        ("ünï", "ünï-x"),
        ("x", "=?base64?@@?="),
    ],
)
def test_param_string_mismatches(value: str, header: str) -> None:
    err = param_error(schema(region=hdr("string", "Region")), {"region": value}, {"mcp-param-region": header})
    assert "Mcp-Param-Region" in err.message


@pytest.mark.parametrize(
    ("value", "header"),
    [
        (42, "42"),
        (42, "42.0"),
        (42, "+42"),
        (-7, "-7"),
        (0, "0"),
        (0, "-0"),
        (1.5, "1.5"),
        (2**40, str(2**40)),
    ],
)
def test_param_numbers_compare_numerically(value: float, header: str) -> None:
    check_param_headers(schema(n=hdr("integer", "N")), {"n": value}, {"mcp-param-n": header})


@pytest.mark.parametrize(
    ("value", "header"), [(42, "43"), (42, "forty-two"), (42, ""), (42, "42x"), (1, "true")]
)
def test_param_number_mismatches(value: int, header: str) -> None:
    param_error(schema(n=hdr("integer", "N")), {"n": value}, {"mcp-param-n": header})


def test_param_int_beyond_float_precision_mismatch_rejected() -> None:
    # 2**53 + 1 is not representable as a float: comparing through float() makes
    # the header "9007199254740992" equal to the argument 9007199254740993.
    value = 2**53 + 1
    param_error(schema(n=hdr("integer", "N")), {"n": value}, {"mcp-param-n": str(value - 1)})


@pytest.mark.parametrize(("value", "header"), [(True, "true"), (False, "false")])
def test_param_booleans_match(value: bool, header: str) -> None:
    check_param_headers(schema(f=hdr("boolean", "Flag")), {"f": value}, {"mcp-param-flag": header})


@pytest.mark.parametrize(
    ("value", "header"),
    [(True, "True"), (True, "1"), (True, "false"), (False, "0"), (False, "False"), (False, "")],
)
def test_param_boolean_mismatches(value: bool, header: str) -> None:
    param_error(schema(f=hdr("boolean", "Flag")), {"f": value}, {"mcp-param-flag": header})


def test_param_missing_header_for_present_argument() -> None:
    err = param_error(schema(region=hdr("string", "Region")), {"region": "x"}, {})
    assert "missing" in err.message


@pytest.mark.parametrize("args", [{}, {"region": None}, None, "not-an-object", [1]])
def test_param_header_without_argument(args: Any) -> None:
    err = param_error(schema(region=hdr("string", "Region")), args, {"mcp-param-region": "x"})
    assert "absent" in err.message


@pytest.mark.parametrize("args", [{}, {"region": None}, None, {"other": 1}])
def test_param_absent_argument_and_absent_header_is_fine(args: Any) -> None:
    check_param_headers(schema(region=hdr("string", "Region")), args, {"mcp-param-other": "ignored"})


@pytest.mark.parametrize("value", [[1], {"a": 1}])
def test_param_unrenderable_value_never_matches(value: Any) -> None:
    param_error(schema(region=hdr("string", "Region")), {"region": value}, {"mcp-param-region": str(value)})


def test_param_header_names_are_case_insensitive_in_the_schema() -> None:
    # The transport hands lower-cased names; the schema may spell the token any way.
    check_param_headers(schema(r=hdr("string", "X-Region-ID")), {"r": "a"}, {"mcp-param-x-region-id": "a"})
    param_error(schema(r=hdr("string", "X-Region-ID")), {"r": "a"}, {"mcp-param-X-Region-ID": "a"})


def test_param_every_annotated_property_is_checked() -> None:
    sch = schema(a=hdr("string", "A"), b=hdr("integer", "B"), c=hdr("boolean", "C"), d={"type": "string"})
    args = {"a": "x", "b": 3, "c": True, "d": "free"}
    good = {"mcp-param-a": "x", "mcp-param-b": "3", "mcp-param-c": "true"}
    check_param_headers(sch, args, good)
    for key in good:
        param_error(sch, args, {k: v for k, v in good.items() if k != key})
        param_error(sch, args, {**good, key: "wrong"})


@given(st.text())
@FAST
def test_param_any_string_round_trips(value: str) -> None:
    sch = schema(s=hdr("string", "S"))
    check_param_headers(sch, {"s": value}, {"mcp-param-s": encode_header_value(value)})
    param_error(sch, {"s": value}, {"mcp-param-s": encode_header_value(value + "x")})


@given(st.integers(min_value=-(2**52), max_value=2**52), st.integers(min_value=1, max_value=1000))
@FAST
def test_param_ints_compare_numerically(value: int, delta: int) -> None:
    sch = schema(n=hdr("integer", "N"))
    check_param_headers(sch, {"n": value}, {"mcp-param-n": str(value)})
    check_param_headers(sch, {"n": value}, {"mcp-param-n": f"{value}.0"})
    param_error(sch, {"n": value}, {"mcp-param-n": str(value + delta)})


@given(st.booleans())
@FAST
def test_param_booleans_render_lowercase(value: bool) -> None:
    sch = schema(b=hdr("boolean", "B"))
    check_param_headers(sch, {"b": value}, {"mcp-param-b": str(value).lower()})
    param_error(sch, {"b": value}, {"mcp-param-b": str(not value).lower()})


@given(
    st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), st.text(max_size=10), max_size=4),
    st.data(),
)
@FAST
def test_param_headers_agree_with_the_sdk_on_string_arguments(
    args: dict[str, str], data: st.DataObject
) -> None:
    sch = schema(**{k: hdr("string", f"H-{k}") for k in args})
    headers = {k.lower(): v for k, v in sdk.mcp_param_headers(sdk.x_mcp_header_map(sch), args).items()}
    check_param_headers(sch, args, headers)
    if headers:
        victim = data.draw(st.sampled_from(sorted(headers)))
        tampered = {**headers, victim: encode_header_value(decode_header_value(headers[victim]) + "!")}
        param_error(sch, args, tampered)

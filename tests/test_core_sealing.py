"""Sealed requestState: what the gateway hands out must come back unchanged, bound and fresh."""

from __future__ import annotations

import base64
import hashlib
import hmac
import string
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_bastion.core.sealing import StateSealer

KEY = b"k" * 32
NOW = 1_700_000_000.0
FAST = settings(max_examples=100, deadline=None)
# Every character a token is made of, plus a few it never contains.
REPLACEMENTS = string.ascii_letters + string.digits + "-_=.+/ é\x00"


def forge(key: bytes, payload: Any, raw_body: bytes | None = None) -> str:
    """A token signed with ``key`` around any payload: passes the MAC, tests what comes after."""
    body = base64.urlsafe_b64encode(raw_body if raw_body is not None else orjson.dumps(payload))
    mac = hmac.new(key, body, hashlib.sha256).digest()
    return "mb1." + body.decode() + "." + base64.urlsafe_b64encode(mac).decode().rstrip("=")


def test_round_trip() -> None:
    sealer = StateSealer(KEY)
    token = sealer.seal("handle-1", "/mcp|tools/call|echo", NOW + 60)
    assert token.startswith("mb1.")
    assert sealer.open(token, "/mcp|tools/call|echo", NOW) == "handle-1"
    # Opening does not consume: the client may retry with the same state.
    assert sealer.open(token, "/mcp|tools/call|echo", NOW + 59) == "handle-1"


def test_token_is_url_and_header_safe() -> None:
    token = StateSealer(KEY).seal("h" * 50, "b" * 50, NOW)
    assert set(token) <= set(string.ascii_letters + string.digits + "-_=.")


def test_sealing_is_deterministic_for_a_key() -> None:
    assert StateSealer(KEY).seal("h", "b", NOW) == StateSealer(KEY).seal("h", "b", NOW)


def test_two_sealers_with_the_same_key_agree() -> None:
    token = StateSealer(KEY).seal("h", "b", NOW + 5)
    assert StateSealer(KEY).open(token, "b", NOW) == "h"


@pytest.mark.parametrize("other", [b"K" * 32, b"k" * 31, b"k" * 33, None])
def test_wrong_key(other: bytes | None) -> None:
    token = StateSealer(KEY).seal("h", "b", NOW + 5)
    assert StateSealer(other).open(token, "b", NOW) is None


def test_default_keys_are_random() -> None:
    a, b = StateSealer(), StateSealer()
    token = a.seal("h", "b", NOW + 5)
    assert a.open(token, "b", NOW) == "h"
    assert b.open(token, "b", NOW) is None


@pytest.mark.parametrize(
    "binding", ["", "/mcp|tools/call|Echo", "/mcp|tools/call|echo ", "/other|tools/call|echo"]
)
def test_wrong_binding(binding: str) -> None:
    sealer = StateSealer(KEY)
    token = sealer.seal("h", "/mcp|tools/call|echo", NOW + 5)
    assert sealer.open(token, binding, NOW) is None


def test_expiry() -> None:
    sealer = StateSealer(KEY)
    token = sealer.seal("h", "b", NOW + 10)
    assert sealer.open(token, "b", NOW + 10) == "h"  # the last valid instant
    assert sealer.open(token, "b", NOW + 10.001) is None
    assert sealer.open(token, "b", NOW + 3600) is None
    assert sealer.open(sealer.seal("h", "b", NOW - 1), "b", NOW) is None
    # Expiry is kept in whole seconds, rounded down: never later than asked for.
    fractional = sealer.seal("h", "b", NOW + 10.9)
    assert sealer.open(fractional, "b", NOW + 10) == "h"
    assert sealer.open(fractional, "b", NOW + 10.5) is None


@given(
    handle=st.text(),
    binding=st.text(),
    expires=st.integers(min_value=0, max_value=2**40),
    before=st.integers(min_value=0, max_value=10**6),
)
@FAST
def test_round_trip_arbitrary(handle: str, binding: str, expires: int, before: int) -> None:
    sealer = StateSealer(KEY)
    token = sealer.seal(handle, binding, expires)
    assert token.isascii()
    assert sealer.open(token, binding, expires - before) == handle
    assert sealer.open(token, binding, expires + 1) is None
    assert sealer.open(token, binding + "x", expires - before) is None


def _mutations(token: str) -> list[tuple[int, str]]:
    return [(i, c) for i in range(len(token)) for c in REPLACEMENTS if c != token[i]]


def test_any_single_character_change_is_rejected() -> None:
    sealer = StateSealer(KEY)
    token = sealer.seal("handle-123", "/mcp|tools/call|echo", NOW + 60)
    accepted = [
        (i, token[i], c)
        for i, c in _mutations(token)
        if sealer.open(token[:i] + c + token[i + 1 :], "/mcp|tools/call|echo", NOW) is not None
    ]
    assert accepted == []


def test_any_single_character_change_of_the_body_is_rejected() -> None:
    sealer = StateSealer(KEY)
    token = sealer.seal("handle-123", "b", NOW + 60)
    end = token.index(".", 4)
    for i, c in _mutations(token):
        if i <= end:  # prefix, body, and the dot after it
            assert sealer.open(token[:i] + c + token[i + 1 :], "b", NOW) is None, (i, c)


@given(handle=st.text(max_size=20), binding=st.text(max_size=20), data=st.data())
@FAST
def test_random_single_character_changes_of_the_body_are_rejected(
    handle: str, binding: str, data: st.DataObject
) -> None:
    sealer = StateSealer(KEY)
    token = sealer.seal(handle, binding, NOW + 60)
    end = token.index(".", 4)
    i = data.draw(st.integers(0, end))
    c = data.draw(st.sampled_from(REPLACEMENTS).filter(lambda ch: ch != token[i]))
    assert sealer.open(token[:i] + c + token[i + 1 :], binding, NOW) is None


def test_truncation_is_rejected() -> None:
    sealer = StateSealer(KEY)
    token = sealer.seal("h", "b", NOW + 60)
    for n in range(len(token)):
        assert sealer.open(token[:n], "b", NOW) is None


def test_extension_is_rejected() -> None:
    sealer = StateSealer(KEY)
    token = sealer.seal("h", "b", NOW + 60)
    accepted = [
        extra
        for extra in ("A", ".", "!", " ", ".x", "AAAA", "=", "==", "=A")
        if sealer.open(token + extra, "b", NOW) is not None
    ]
    assert accepted == []


@pytest.mark.parametrize(
    "token",
    [
        None,
        0,
        1.5,
        b"mb1.x.y",
        ["mb1."],
        {"t": 1},
        "",
        "mb1.",
        "mb1..",
        "mb2.abc.def",
        "mb1.abc",
        "mb1.abc.",
        "mb1.é.x",
        "mb1.x.é",
        "mb1.\ud800.x",
        "mb1.x.\ud800",
        "mb1.YQ==.!!!!",
    ],
)
def test_garbage_tokens(token: Any) -> None:
    assert StateSealer(KEY).open(token, "b", NOW) is None


@pytest.mark.parametrize(
    ("payload", "raw"),
    [
        ([1, 2], None),
        ("just a string", None),
        ({"h": "x", "b": "b"}, None),  # no expiry
        ({"h": "x", "b": "b", "e": "9999999999"}, None),
        ({"h": "x", "b": "b", "e": 9999999999.5}, None),
        ({"h": 5, "b": "b", "e": 9999999999}, None),
        ({"b": "b", "e": 9999999999}, None),
        ({"h": "x", "e": 9999999999}, None),
        ({"h": "x", "b": None, "e": 9999999999}, None),
        (None, b"not json"),
        (None, b"\xff\xfe"),
    ],
)
def test_validly_signed_but_malformed_payloads(payload: Any, raw: bytes | None) -> None:
    assert StateSealer(KEY).open(forge(KEY, payload, raw), "b", NOW) is None


def test_validly_signed_well_formed_payload_opens() -> None:
    # The forge helper matches the real format, so the tests above really do pass the MAC.
    assert StateSealer(KEY).open(forge(KEY, {"h": "x", "b": "b", "e": 9999999999}), "b", NOW) == "x"


def test_body_re_signed_with_another_key_is_rejected() -> None:
    token = forge(b"attacker" * 4, {"h": "victim-handle", "b": "b", "e": 9999999999})
    assert StateSealer(KEY).open(token, "b", NOW) is None


def test_swapping_bodies_between_tokens_is_rejected() -> None:
    sealer = StateSealer(KEY)
    a = sealer.seal("a", "b", NOW + 60)
    b = sealer.seal("other", "b", NOW + 60)
    prefix_a, body_a, mac_a = a.split(".")
    _, body_b, mac_b = b.split(".")
    assert sealer.open(f"{prefix_a}.{body_b}.{mac_a}", "b", NOW) is None
    assert sealer.open(f"{prefix_a}.{body_a}.{mac_b}", "b", NOW) is None


@given(st.text(max_size=120))
@settings(max_examples=200, deadline=None)
def test_open_never_raises(token: str) -> None:
    sealer = StateSealer(KEY)
    assert sealer.open(token, "b", NOW) is None
    assert sealer.open("mb1." + token, "b", NOW) is None

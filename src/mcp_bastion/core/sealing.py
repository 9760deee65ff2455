"""Sealed ``requestState`` for multi-round-trip requests the gateway translates.

The client must echo the state unchanged and may not read it; the gateway must not
trust it. It is an HMAC-SHA256-signed token naming a held upstream call, the method
and target it belongs to, and an expiry. Sans-IO: the caller passes the time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import orjson

_PREFIX = "mb1."


class StateSealer:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def seal(self, handle: str, binding: str, expires_at: float) -> str:
        body = base64.urlsafe_b64encode(orjson.dumps({"h": handle, "b": binding, "e": int(expires_at)}))
        mac = hmac.new(self._key, body, hashlib.sha256).digest()
        return _PREFIX + body.decode() + "." + base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def open(self, token: object, binding: str, now: float) -> str | None:
        """The handle inside a valid, unexpired state for this binding; None otherwise."""
        if not isinstance(token, str) or not token.startswith(_PREFIX):
            return None
        try:
            body_s, mac_s = token[len(_PREFIX) :].split(".", 1)
            body = body_s.encode("ascii")
        except (ValueError, UnicodeEncodeError):
            return None
        # Compare the encoded MAC as text: lenient base64 decoding would let several
        # spellings of one MAC through, and the state must not be malleable.
        expected = (
            base64.urlsafe_b64encode(hmac.new(self._key, body, hashlib.sha256).digest()).decode().rstrip("=")
        )
        if not hmac.compare_digest(mac_s.encode("utf-8", "surrogatepass"), expected.encode()):
            return None
        try:
            data = orjson.loads(base64.urlsafe_b64decode(body))
        except (ValueError, orjson.JSONDecodeError):
            return None
        if not isinstance(data, dict) or data.get("b") != binding or not isinstance(data.get("h"), str):
            return None
        if not isinstance(data.get("e"), int) or data["e"] < now:
            return None
        return str(data["h"])

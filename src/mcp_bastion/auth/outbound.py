"""Outbound HTTP shared by the CIMD fetcher and the upstream OpenID Connect client.

Both fetch small JSON documents from other servers: they share the TLS trust rules
(``ca_bundle`` or the system's store), a hard cap on body size, the JSON content-type test
and cache lifetimes taken from HTTP caching headers, clamped to bounds we choose.
"""

from __future__ import annotations

import email.utils
import re
import ssl
import time
from collections.abc import Mapping
from datetime import UTC

import httpx


class OutboundError(Exception):
    """A fetched response cannot be used; the message is safe to show and log."""


def tls_context(ca_bundle: str) -> ssl.SSLContext:
    """Verification context: only ``ca_bundle`` when set (private PKI), else the system's store.

    Falls back to certifi when the system store is empty (minimal containers, some Python builds).
    """
    if ca_bundle:
        try:
            return ssl.create_default_context(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise OutboundError(f"ca_bundle {ca_bundle}: cannot load: {exc}") from None
    ctx = ssl.create_default_context()
    if not ctx.cert_store_stats().get("x509_ca"):
        import certifi

        ctx.load_verify_locations(cafile=certifi.where())
    return ctx


_JSON_TYPE = re.compile(r"^application/(?:[a-z0-9!#$&^_.+-]+\+)?json$")


def is_json_content_type(value: str | None) -> bool:
    """``application/json`` or ``application/<x>+json``, parameters (charset) ignored."""
    if not value:
        return False
    return bool(_JSON_TYPE.match(value.split(";", 1)[0].strip().lower()))


_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache)\s*(?:[=,]|$)", re.IGNORECASE)


def cache_lifetime(headers: Mapping[str, str], *, default: float, minimum: float, maximum: float) -> float:
    """Seconds a response may be reused, from Cache-Control (then Expires), within the bounds.

    ``no-store``/``no-cache`` and past dates give ``minimum``: refetching on every request would let
    anyone make us hammer a server (or be hammered), so some reuse always applies.
    """
    lifetime: float = default
    cache_control = headers.get("cache-control", "")
    if _NO_CACHE.search(cache_control):
        lifetime = minimum
    elif match := _MAX_AGE.search(cache_control):
        lifetime = float(match.group(1)) - _age(headers)
    elif expires := headers.get("expires"):
        try:
            when = email.utils.parsedate_to_datetime(expires)
        except (TypeError, ValueError):
            lifetime = minimum  # RFC 9111 §5.3: an invalid Expires means already expired
        else:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            lifetime = when.timestamp() - time.time()
    return max(minimum, min(maximum, lifetime))


def _age(headers: Mapping[str, str]) -> float:
    try:
        return max(0.0, float(headers.get("age", "0")))
    except ValueError:
        return 0.0


async def read_limited(response: httpx.Response, limit: int) -> bytes:
    """The body of a streamed response, refusing (and not reading) more than ``limit`` bytes."""
    declared = response.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise OutboundError(f"response is larger than {limit} bytes")
        except ValueError:
            raise OutboundError("response has an invalid Content-Length") from None
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise OutboundError(f"response is larger than {limit} bytes")
    return bytes(body)


def describe_http_error(exc: httpx.HTTPError) -> str:
    """A short reason for a failed request, naming untrusted certificates plainly."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return "the server's TLS certificate is not trusted"
    return text or type(exc).__name__

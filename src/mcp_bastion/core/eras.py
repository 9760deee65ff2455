"""Protocol eras: which revision a request speaks, and the 2026-07-28 validation ladder.

The MCP SDK has the same ladder in ``mcp.shared.inbound``, but importing it pulls in
the whole SDK (measured: 63 MB RSS against 30 MB for the gateway's own imports), which
alone would break the idle-memory budget of ``expose``; the rules are short, so they
live here, written against the spec text (basic/transports/streamable-http.mdx).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from . import jsonrpc as rpc

HANDSHAKE_VERSIONS: Final = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MODERN_VERSIONS: Final = ("2026-07-28",)
LATEST_HANDSHAKE: Final = HANDSHAKE_VERSIONS[-1]
LATEST_MODERN: Final = MODERN_VERSIONS[-1]
DEFAULT_UNANNOUNCED: Final = "2025-03-26"  # spec: no MCP-Protocol-Version header means 2025-03-26

META_PROTOCOL_VERSION: Final = "io.modelcontextprotocol/protocolVersion"
META_CLIENT_CAPABILITIES: Final = "io.modelcontextprotocol/clientCapabilities"
META_CLIENT_INFO: Final = "io.modelcontextprotocol/clientInfo"
META_SERVER_INFO: Final = "io.modelcontextprotocol/serverInfo"
META_LOG_LEVEL: Final = "io.modelcontextprotocol/logLevel"
META_SUBSCRIPTION_ID: Final = "io.modelcontextprotocol/subscriptionId"

H_PROTOCOL_VERSION: Final = "mcp-protocol-version"
H_METHOD: Final = "mcp-method"
H_NAME: Final = "mcp-name"
H_PARAM_PREFIX: Final = "mcp-param-"
H_SESSION: Final = "mcp-session-id"

# Methods whose target travels in Mcp-Name, and the body parameter it mirrors.
NAME_BEARING: Final[Mapping[str, str]] = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
}

# Which error codes map to which HTTP status on the 2026-07-28 leg (spec status table).
MODERN_ERROR_STATUS: Final[Mapping[int, int]] = {
    rpc.PARSE_ERROR: 400,
    rpc.INVALID_REQUEST: 400,
    rpc.INVALID_PARAMS: 400,
    rpc.HEADER_MISMATCH: 400,
    rpc.MISSING_CLIENT_CAPABILITY: 400,
    rpc.UNSUPPORTED_PROTOCOL_VERSION: 400,
    rpc.METHOD_NOT_FOUND: 404,
}


def is_modern(version: str) -> bool:
    return version in MODERN_VERSIONS


def is_handshake(version: str) -> bool:
    return version in HANDSHAKE_VERSIONS


def negotiate_handshake(requested: Any) -> str:
    """The version an initialize answer names: the client's, if we speak it, else our latest."""
    return requested if isinstance(requested, str) and requested in HANDSHAKE_VERSIONS else LATEST_HANDSHAKE


_B64_WRAPPED = re.compile(r"^=\?base64\?([A-Za-z0-9+/=]*)\?=$")


def decode_header_value(value: str | None) -> str | None:
    """Undo the spec's ``=?base64?...?=`` wrapping of Mcp-Name / Mcp-Param-* values."""
    if value is None or value[:2] != "=?":
        return value
    match = _B64_WRAPPED.match(value)
    if not match:
        return value
    try:
        return base64.b64decode(match.group(1), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def encode_header_value(value: str) -> str:
    """Encode a value for an Mcp-Name / Mcp-Param-* header (base64 when not plain visible ASCII)."""
    plain = value.isascii() and value.isprintable() and value == value.strip() and not value.startswith("=?")
    if plain:
        return value
    return "=?base64?" + base64.b64encode(value.encode("utf-8")).decode("ascii") + "?="


@dataclass(frozen=True)
class ModernEnvelope:
    protocol_version: str
    client_capabilities: dict[str, Any]
    client_info: Any


def unsupported_version(requested: Any) -> rpc.ProtocolError:
    return rpc.ProtocolError(
        rpc.UNSUPPORTED_PROTOCOL_VERSION,
        "Unsupported protocol version",
        {"supported": list(MODERN_VERSIONS), "requested": requested},
    )


def duplicated_routing_header(raw_headers: Iterable[tuple[str, str]]) -> str | None:
    seen: set[str] = set()
    for name, _ in raw_headers:
        key = name.lower()
        if key in (H_PROTOCOL_VERSION, H_METHOD, H_NAME):
            if key in seen:
                return key
            seen.add(key)
    return None


def check_modern_request(message: rpc.Message, headers: Mapping[str, str] | None) -> ModernEnvelope:
    """Run the 2026-07-28 ladder: _meta envelope, then headers against the body, then version.

    ``headers`` are lower-cased names; ``None`` skips the header rung (stdio).
    Raises ProtocolError with the spec's code; HTTP status comes from MODERN_ERROR_STATUS.
    """
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict):
        raise rpc.ProtocolError(
            rpc.INVALID_PARAMS,
            "params._meta must be an object carrying "
            f"{META_PROTOCOL_VERSION!r} and {META_CLIENT_CAPABILITIES!r}",
        )
    missing = [k for k in (META_PROTOCOL_VERSION, META_CLIENT_CAPABILITIES) if k not in meta]
    if missing:
        raise rpc.ProtocolError(
            rpc.INVALID_PARAMS, f"params._meta is missing the required key(s): {', '.join(missing)}"
        )
    version = meta[META_PROTOCOL_VERSION]
    if headers is not None:
        header_version = headers.get(H_PROTOCOL_VERSION)
        if header_version is None or header_version != version:
            raise rpc.ProtocolError(
                rpc.HEADER_MISMATCH, "MCP-Protocol-Version header does not match params._meta protocolVersion"
            )
        method = message.get("method")
        if headers.get(H_METHOD) != method:
            raise rpc.ProtocolError(rpc.HEADER_MISMATCH, "Mcp-Method header does not match the body's method")
        name_key = NAME_BEARING.get(str(method))
        if name_key is not None and isinstance(params, dict):
            body_value = params.get(name_key)
            if body_value is not None and decode_header_value(headers.get(H_NAME)) != body_value:
                raise rpc.ProtocolError(
                    rpc.HEADER_MISMATCH, f"Mcp-Name header does not match the body's {name_key!r}"
                )
    if not isinstance(version, str):
        raise rpc.ProtocolError(rpc.INVALID_PARAMS, "the protocolVersion in params._meta must be a string")
    if version not in MODERN_VERSIONS:
        raise unsupported_version(version)
    caps = meta[META_CLIENT_CAPABILITIES]
    return ModernEnvelope(version, caps if isinstance(caps, dict) else {}, meta.get(META_CLIENT_INFO))


def x_mcp_headers(input_schema: Any) -> dict[str, str]:
    """Top-level ``inputSchema`` properties annotated with ``x-mcp-header``: property -> header name."""
    out: dict[str, str] = {}
    if not isinstance(input_schema, dict):
        return out
    props = input_schema.get("properties")
    if not isinstance(props, dict):
        return out
    for prop, schema in props.items():
        if isinstance(schema, dict) and isinstance(schema.get("x-mcp-header"), str):
            out[prop] = schema["x-mcp-header"]
    return out


_DECIMAL = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


def _render(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    return None


def check_param_headers(input_schema: Any, arguments: Any, headers: Mapping[str, str]) -> None:
    """Check Mcp-Param-* headers a tool's schema declares against the call's arguments (-32020)."""
    check_param_values(x_mcp_headers(input_schema), arguments, headers)


def check_param_values(mapping: Mapping[str, str], arguments: Any, headers: Mapping[str, str]) -> None:
    """:func:`check_param_headers` with the schema's ``x_mcp_headers`` already taken (a gateway
    keeps them per tool as it lists the tools, rather than walking the schema on every call)."""
    if not mapping:
        return
    args = arguments if isinstance(arguments, dict) else {}
    for prop, header in mapping.items():
        sent = headers.get(H_PARAM_PREFIX + header.lower())
        value = args.get(prop)
        if value is None:
            if sent is not None:
                raise rpc.ProtocolError(
                    rpc.HEADER_MISMATCH, f"Mcp-Param-{header} header sent but argument {prop!r} is absent"
                )
            continue
        if sent is None:
            raise rpc.ProtocolError(rpc.HEADER_MISMATCH, f"Mcp-Param-{header} header is missing")
        decoded = decode_header_value(sent)
        rendered = _render(value)
        if decoded is None or rendered is None:
            raise rpc.ProtocolError(rpc.HEADER_MISMATCH, f"Mcp-Param-{header} header does not match {prop!r}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            # Numbers compare numerically, and exactly: no float rounding of large integers.
            if not _DECIMAL.fullmatch(decoded):
                same = False
            elif isinstance(value, int):
                same = Decimal(decoded) == value
            else:
                same = float(decoded) == value
        else:
            same = decoded == rendered
        if not same:
            raise rpc.ProtocolError(rpc.HEADER_MISMATCH, f"Mcp-Param-{header} header does not match {prop!r}")

"""JSON-RPC 2.0 envelope: parse, classify and build messages without models.

The data plane only looks at the envelope (``id``, ``method``, ``result``/``error``)
and at the few parameters it must rewrite, so messages stay plain dicts decoded by
orjson; pydantic models would cost more than the whole hop.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

Message = dict[str, Any]
RequestId = str | int

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
# Application codes used by the gateway itself (outside -32768..-32000 per the spec).
UPSTREAM_UNAVAILABLE: Final = -31000
REQUEST_TIMEOUT: Final = -31001
TOO_MANY_REQUESTS: Final = -31002
# 2026-07-28 codes.
HEADER_MISMATCH: Final = -32020
MISSING_CLIENT_CAPABILITY: Final = -32021
UNSUPPORTED_PROTOCOL_VERSION: Final = -32022
# A handshake-era request the client cancelled: its POST stream still ends with a response for
# its id (so a resumed stream's replay ends too), with the code the MCP SDK's server uses.
REQUEST_CANCELLED: Final = -32800


class ProtocolError(Exception):
    """A JSON-RPC error to send back, with the HTTP status the transport should use."""

    def __init__(self, code: int, message: str, data: Any = None, http_status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.http_status = http_status

    def to_message(self, request_id: RequestId | None) -> Message:
        return error(request_id, self.code, self.message, self.data)


def dumps(message: Message) -> bytes:
    return orjson.dumps(message)


def loads(body: bytes | str) -> Any:
    """Decode JSON; raise ProtocolError(-32700) on anything that is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(PARSE_ERROR, f"Parse error: {exc}") from None


def _valid_id(value: Any) -> bool:
    # Exact types: bool is an int subclass in Python but never a valid JSON-RPC id (and an
    # ``isinstance(value, str | int)`` builds a union per call: ~4 % of a gateway's samples).
    kind = type(value)
    return kind is str or kind is int


def validate(message: Any) -> Message:
    """Check one decoded JSON-RPC message's envelope; raise ProtocolError(-32600) if malformed."""
    # The shapes almost every message has, checked first with exact types (every forwarded message
    # passes here, on the gateway and on a connector); anything else gets the full check below.
    if type(message) is dict and message.get("jsonrpc") == "2.0":
        method = message.get("method")
        if method is None:
            if "result" in message and "error" not in message and "method" not in message:
                kind = type(message.get("id"))
                if kind is str or kind is int:
                    return message
        elif type(method) is str and method:
            params = message.get("params")
            if params is None or type(params) is dict:
                if "id" not in message:
                    return message
                kind = type(message["id"])
                if kind is str or kind is int:
                    return message
    return _validate(message)


def _validate(message: Any) -> Message:
    if not isinstance(message, dict):
        raise ProtocolError(INVALID_REQUEST, "Invalid Request: a JSON-RPC message must be an object")
    if message.get("jsonrpc") != "2.0":
        raise ProtocolError(INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"')
    if "method" in message:
        if not isinstance(message["method"], str) or not message["method"]:
            raise ProtocolError(INVALID_REQUEST, 'Invalid Request: "method" must be a non-empty string')
        params = message.get("params")
        if params is not None and not isinstance(params, dict):
            raise ProtocolError(INVALID_REQUEST, 'Invalid Request: "params" must be an object')
        if "id" in message and not _valid_id(message["id"]):
            raise ProtocolError(INVALID_REQUEST, 'Invalid Request: "id" must be a string or an integer')
        return message
    if "result" in message or "error" in message:
        if not _valid_id(message.get("id")):
            raise ProtocolError(INVALID_REQUEST, 'Invalid Request: a response needs a string or integer "id"')
        if "result" in message and "error" in message:
            raise ProtocolError(
                INVALID_REQUEST, 'Invalid Request: a response has "result" or "error", not both'
            )
        if "error" in message:
            err = message["error"]
            if (
                not isinstance(err, dict)
                or not isinstance(err.get("code"), int)
                or isinstance(err.get("code"), bool)
                or not isinstance(err.get("message"), str)
            ):
                raise ProtocolError(
                    INVALID_REQUEST,
                    'Invalid Request: "error" must be an object with an integer code and a message',
                )
        return message
    raise ProtocolError(INVALID_REQUEST, "Invalid Request: neither a request, a notification nor a response")


def is_request(message: Message) -> bool:
    return "method" in message and "id" in message


def is_notification(message: Message) -> bool:
    return "method" in message and "id" not in message


def is_response(message: Message) -> bool:
    return "method" not in message


def request(request_id: RequestId, method: str, params: dict[str, Any] | None = None) -> Message:
    msg: Message = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def notification(method: str, params: dict[str, Any] | None = None) -> Message:
    msg: Message = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def result(request_id: RequestId | None, value: dict[str, Any]) -> Message:
    return {"jsonrpc": "2.0", "id": request_id, "result": value}


def error(request_id: RequestId | None, code: int, message: str, data: Any = None) -> Message:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": err}


def params_of(message: Message) -> dict[str, Any]:
    params = message.get("params")
    return params if isinstance(params, dict) else {}


def meta_of(message: Message) -> dict[str, Any]:
    meta = params_of(message).get("_meta")
    return meta if isinstance(meta, dict) else {}

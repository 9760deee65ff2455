"""The gateway as OAuth 2.1 resource server: protected resource metadata, bearer checks, challenges.

Every MCP endpoint is a resource with a canonical URI (RFC 8707) under the issuer. A request carries a
bearer in the ``Authorization`` header only: an access token (a JWT from our own authorization server,
accepted only if its ``aud`` names this endpoint, its sibling, or the whole gateway) or an API key
(``mcpb_...``). The answer is an :class:`Identity`, or the :class:`Challenge` to send instead: 401 with a
``WWW-Authenticate`` that points at the endpoint's metadata document (RFC 9728), 403
``insufficient_scope`` naming the scope needed, or 400 ``invalid_request``.

API keys scoped to servers: on an endpoint of one server the key does not cover, the answer is a 403
*without* ``insufficient_scope``: re-authorizing cannot widen a key, so an OAuth client must not be sent
round a step-up loop. On the aggregate ``/mcp`` the key is let in and the hub shows it only its servers.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import structlog
from sqlalchemy.exc import SQLAlchemyError

from ..core import jsonrpc as rpc
from .identity import Identity
from .tokens import issuer_of

if TYPE_CHECKING:
    from ..config import GatewaySettings
    from .store import ApiKeyRecord, Store
    from .tokens import KeyRing

__all__ = ["PRM_PATH", "Challenge", "Protected", "ResourceGuard"]

log = structlog.get_logger("mcp_bastion.auth")

PRM_PATH = "/.well-known/oauth-protected-resource"
API_KEY_PREFIX = "mcpb_"
# A found API key is trusted this long without asking the store again (revocation takes effect after it).
KEY_CACHE_SECONDS = 5.0
KEY_CACHE_MAX = 10_000
# RFC 6750 b64token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

Scope = MutableMapping[str, Any]


@dataclass(frozen=True, slots=True)
class Challenge:
    """An HTTP answer refusing the request (status, headers, body), ready for the transport to send."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Protected:
    """How one endpoint path is protected.

    ``resource`` is the endpoint's canonical URI; ``audiences`` the token audiences accepted there (the
    endpoint, its /mcp or /sse sibling, and the issuer meaning the whole gateway); ``scope`` the scope
    a challenge asks for and ``accepted`` the scopes that suffice; ``server`` the one server behind the
    endpoint (None: the aggregate of all of them).
    """

    resource: str
    audiences: frozenset[str]
    scope: str
    accepted: frozenset[str]
    server: str | None
    prm_url: str
    prm_document: bytes


@dataclass(slots=True)
class _CachedKey:
    record: ApiKeyRecord
    until: float


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _body(message: str) -> bytes:
    return orjson.dumps(rpc.error(None, rpc.INVALID_REQUEST, message))


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


class ResourceGuard:
    """Protected resource metadata and the bearer check for every MCP endpoint of one gateway.

    ``servers`` are the configured server names; ``single`` is the server ``expose`` serves at ``/mcp``
    (None for ``serve``, where ``/mcp`` aggregates and each server is at ``/servers/<name>/mcp``).
    """

    def __init__(
        self,
        settings: GatewaySettings,
        keyring: KeyRing,
        store: Store,
        *,
        servers: Iterable[str] = (),
        single: str | None = None,
    ) -> None:
        self.keyring = keyring
        self.store = store
        self.issuer = issuer_of(settings)
        parts = urlsplit(self.issuer)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._issuer_path = parts.path.rstrip("/")
        self._keys: OrderedDict[bytes, _CachedKey] = OrderedDict()
        self.paths: dict[str, Protected] = {}  # endpoint path (as the app sees it) -> protection
        self.documents: dict[str, bytes] = {}  # well-known path -> PRM document
        if single is not None:
            self._add("", single, "mcp", frozenset({"mcp", f"mcp:{single}"}), f"the MCP server {single!r}")
        else:
            self._add("", None, "mcp", frozenset({"mcp"}), "every MCP server of this gateway")
            for name in servers:
                scope = f"mcp:{name}"
                self._add(
                    f"/servers/{name}", name, scope, frozenset({"mcp", scope}), f"the MCP server {name!r}"
                )
        root = self.documents[f"{PRM_PATH}{self._issuer_path}/mcp"]
        self.documents[PRM_PATH] = root
        if self._issuer_path:
            self.documents[f"{PRM_PATH}{self._issuer_path}"] = root

    def _add(self, base: str, server: str | None, scope: str, accepted: frozenset[str], what: str) -> None:
        mcp_uri = f"{self.issuer}{base}/mcp"
        sse_uri = f"{self.issuer}{base}/sse"
        audiences = frozenset({mcp_uri, sse_uri, self.issuer})
        for leaf, uri in (("mcp", mcp_uri), ("sse", sse_uri)):
            well_known = f"{PRM_PATH}{self._issuer_path}{base}/{leaf}"
            document = {
                "resource": uri,
                "authorization_servers": [self.issuer],
                "scopes_supported": [scope],
                "bearer_methods_supported": ["header"],
                "resource_name": f"mcp-bastion: {what}",
            }
            body = orjson.dumps(document)
            protected = Protected(
                uri, audiences, scope, accepted, server, f"{self._origin}{well_known}", body
            )
            self.documents[well_known] = body
            if self._issuer_path:  # a proxy that strips the issuer's path before the gateway
                self.documents[f"{PRM_PATH}{base}/{leaf}"] = body
            if leaf == "mcp":
                self.paths[f"{base}/mcp"] = protected
            else:
                self.paths[f"{base}/sse"] = protected
                self.paths[f"{base}/messages"] = protected
                self.paths[f"{base}/messages/"] = protected

    def add_server(self, name: str) -> dict[str, frozenset[str]]:
        """Protect a server that joined while the gateway runs, exactly as a configured one; returns
        its resources for the authorization server."""
        scope = f"mcp:{name}"
        self._add(f"/servers/{name}", name, scope, frozenset({"mcp", scope}), f"the MCP server {name!r}")
        prefix = f"{self.issuer}/servers/{name}/"
        return {uri: accepted for uri, accepted in self.resources().items() if uri.startswith(prefix)}

    # ------------------------------------------------------------------ metadata
    def resources(self) -> dict[str, frozenset[str]]:
        """Every endpoint's canonical resource URI and the scopes that suffice there, for the
        authorization server (which adds the issuer, meaning the whole gateway)."""
        return {p.resource: p.accepted for p in sorted(self.paths.values(), key=lambda p: p.resource)}

    def prm_document(self, path: str) -> bytes | None:
        """The protected resource metadata served at a well-known path, or None."""
        return self.documents.get(path)

    def protection(self, path: str) -> Protected | None:
        return self.paths.get(path)

    # ------------------------------------------------------------------ challenges
    def _challenge(
        self,
        p: Protected,
        status: int,
        message: str,
        error: str | None = None,
        *,
        scope: bool = True,
    ) -> Challenge:
        params = []
        if error is not None:
            params.append(f'error="{error}"')
            params.append(f'error_description="{_quote(message)}"')
        params.append(f'resource_metadata="{p.prm_url}"')
        if scope:
            params.append(f'scope="{p.scope}"')
        headers = [
            (b"content-type", b"application/json"),
            (b"www-authenticate", ("Bearer " + ", ".join(params)).encode()),
            (b"cache-control", b"no-store"),
        ]
        return Challenge(status, headers, _body(message))

    def _bad_request(self, message: str) -> Challenge:
        header = f'Bearer error="invalid_request", error_description="{_quote(message)}"'
        return Challenge(
            400,
            [
                (b"content-type", b"application/json"),
                (b"www-authenticate", header.encode()),
                (b"cache-control", b"no-store"),
            ],
            _body(message),
        )

    def _unavailable(self) -> Challenge:
        return Challenge(
            503,
            [(b"content-type", b"application/json"), (b"retry-after", b"5"), (b"cache-control", b"no-store")],
            _body("Sign-in is unavailable right now; try again shortly"),
        )

    def _forbidden(self, p: Protected, message: str) -> Challenge:
        """A 403 no re-authorization can lift: not JSON-RPC, no ``scope`` to step up to."""
        header = f'Bearer error="insufficient_scope", error_description="{_quote(message)}"'
        return Challenge(
            403,
            [
                (b"content-type", b"application/json"),
                (b"www-authenticate", header.encode()),
                (b"cache-control", b"no-store"),
            ],
            orjson.dumps({"error": "forbidden", "error_description": message}),
        )

    # ------------------------------------------------------------------ the check
    async def authenticate(self, scope: Scope, p: Protected) -> Identity | Challenge:
        """Who an MCP request acts for, or the refusal to send. A header read and a cached verify."""
        query = scope.get("query_string", b"")
        if b"access_token" in query and any(
            k == "access_token" for k, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        ):
            return self._bad_request("Access tokens are accepted only in the Authorization header")
        value: bytes | None = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                if value is not None:
                    return self._bad_request("More than one Authorization header")
                value = v
        if value is None:
            return self._challenge(p, 401, "Unauthorized: sign in to use this MCP server")
        scheme, _, token = value.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer":
            return self._challenge(p, 401, "Unauthorized: use a Bearer token")
        token = token.strip()
        if not _B64TOKEN.fullmatch(token):
            return self._challenge(p, 401, "The bearer token is malformed", "invalid_token")
        try:
            if token.startswith(API_KEY_PREFIX):
                return await self._api_key(token, p)
            claims = await self.keyring.verify_access_token(token, p.audiences)
        except (SQLAlchemyError, OSError) as exc:  # the store is down: not the caller's fault
            log.error("auth_store_error", error=type(exc).__name__, resource=p.resource)
            return self._unavailable()
        if claims is None:
            log.info("bearer_refused", reason="invalid_token", resource=p.resource)
            return self._challenge(
                p,
                401,
                "The access token is invalid, expired, revoked or not for this resource",
                "invalid_token",
            )
        return self._token_identity(claims, p)

    def _token_identity(self, claims: Mapping[str, Any], p: Protected) -> Identity | Challenge:
        scopes = frozenset(str(claims.get("scope") or "").split())
        if not scopes & p.accepted:
            log.info(
                "bearer_refused", reason="insufficient_scope", subject=claims["sub"], resource=p.resource
            )
            return self._challenge(p, 403, f"This endpoint needs the scope {p.scope!r}", "insufficient_scope")
        listed = claims.get("servers")
        servers = frozenset(str(s) for s in listed) if isinstance(listed, list) else None
        if "mcp" not in scopes:  # only per-server scopes: those servers and no others
            granted = frozenset(s[4:] for s in scopes if s.startswith("mcp:"))
            servers = granted if servers is None else servers & granted
        if p.server is not None and servers is not None and p.server not in servers:
            log.info(
                "bearer_refused", reason="server_not_allowed", subject=claims["sub"], resource=p.resource
            )
            return self._forbidden(p, f"This sign-in may not use the server {p.server!r}")
        subject = str(claims["sub"])
        client_id = claims.get("client_id")
        return Identity(
            subject=subject,
            name=str(claims.get("name") or subject),
            kind="user",
            client_id=str(client_id) if client_id is not None else None,
            scopes=scopes,
            servers=servers,
        )

    async def _api_key(self, token: str, p: Protected) -> Identity | Challenge:
        digest = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        cached = self._keys.get(digest)
        record: ApiKeyRecord | None
        if cached is not None and cached.until > now:
            record = cached.record
        else:
            record = await self.store.find_api_key(token)
            if record is None:
                self._keys.pop(digest, None)
                log.info("api_key_refused", reason="unknown, revoked or expired", resource=p.resource)
                return self._challenge(p, 401, "The API key is unknown, revoked or expired", "invalid_token")
            self._keys[digest] = _CachedKey(record, now + KEY_CACHE_SECONDS)
            self._keys.move_to_end(digest)
            while len(self._keys) > KEY_CACHE_MAX:
                self._keys.popitem(last=False)
        if record.expires_at is not None and _aware(record.expires_at) <= datetime.now(UTC):
            self._keys.pop(digest, None)
            return self._challenge(p, 401, "The API key is unknown, revoked or expired", "invalid_token")
        servers = frozenset(record.servers) if record.servers is not None else None
        if p.server is not None and servers is not None and p.server not in servers:
            log.info("api_key_refused", reason="server_not_allowed", key=record.name, resource=p.resource)
            return self._forbidden(p, f"This API key may not use the server {p.server!r}")
        return Identity(
            subject=f"key:{record.key_id}",
            name=f"key:{record.name}",
            kind="key",
            scopes=frozenset({"mcp"}),
            servers=servers,
        )

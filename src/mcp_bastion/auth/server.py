"""The embedded OAuth 2.1 authorization server (and minimal OpenID provider) of the gateway.

Endpoints: RFC 8414 and OpenID discovery, ``/authorize`` (code flow, PKCE S256 only, RFC 8707
``resource``, RFC 9207 ``iss`` on every response), the sign-in and consent pages, ``/token``
(authorization code and refresh token with rotation and reuse detection), ``/register`` (RFC 7591),
``/revoke`` (RFC 7009), ``/jwks.json``, and ``/oauth/callback`` for delegated sign-in to an upstream
OpenID Connect provider.

Rules that shape the code:

- Nothing is redirected to a client before its ``client_id`` and ``redirect_uri`` are validated; until
  then errors are an HTML page (no open redirect).
- The authorization request waits in the store's ``pending`` table (the transaction id travels in
  forms, bound to a CSRF cookie); codes, transactions and upstream ``state`` are single use.
- With delegation the gateway is an MCP proxy with a static client id upstream, so each client gets a
  consent page *before* the browser is sent upstream (confused-deputy rules), and the upstream
  ``state`` only exists after that consent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets as _random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

import orjson
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from ..config import GatewaySettings
from . import pages
from .cimd import CimdError, ClientMetadataFetcher
from .oidc import OidcError, UpstreamOidc
from .secrets import hash_secret, new_secret, same_secret
from .store import ClientRecord, CodeRecord, Store
from .tokens import KeyRing, issuer_of, new_family_id

__all__ = [
    "PRESETS",
    "build_auth_app",
    "canonical_resource",
    "is_loopback_redirect",
    "redirect_uri_matches",
    "redirect_uri_permitted",
    "uri_pattern_matches",
]

log = structlog.get_logger("mcp_bastion.auth")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PRESETS: dict[str, tuple[str, ...]] = {
    "claude": ("https://claude.ai/api/mcp/auth_callback", "https://claude.com/api/mcp/auth_callback"),
    "chatgpt": (
        "https://chatgpt.com/connector_platform_oauth_redirect",
        "https://chatgpt.com/connector/oauth/{id}",
    ),
}

# An authorization request waits this long for the person to sign in and consent.
TRANSACTION_SECONDS = 600
# The ``state`` sent upstream expires after 10 minutes (MCP security best practices).
UPSTREAM_STATE_SECONDS = 600
# How long a browser remembers its per-client consents before delegated sign-in (OIDC).
CONSENT_COOKIE_SECONDS = 30 * 86400
ID_TOKEN_SECONDS = 3600
MAX_FORM_BYTES = 64 * 1024
MAX_REGISTRATION_BYTES = 64 * 1024
MAX_REDIRECT_URIS = 32
MAX_URI_LENGTH = 2048
MAX_STATE_LENGTH = 2048
MAX_NAME_LENGTH = 200

MCP_SCOPE = "mcp"
OIDC_SCOPES = ("openid", "email", "profile", "offline_access")
AUTH_METHODS = ("none", "client_secret_basic", "client_secret_post")
GRANT_TYPES = ("authorization_code", "refresh_token")

_PKCE = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_SEGMENT = re.compile(r"[A-Za-z0-9\-._~]+")
_PRIVATE_SCHEME = re.compile(r"[a-z][a-z0-9+\-]*(\.[a-z0-9+\-]+)+")
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=%]*")
_FORBIDDEN_SCHEMES = frozenset({"javascript", "data", "file", "vbscript", "about", "blob", "view-source"})
_PASSED_THROUGH_UPSTREAM_ERRORS = frozenset(
    {"access_denied", "login_required", "consent_required", "interaction_required", "temporarily_unavailable"}
)

SCOPE_MEANINGS = {
    "openid": "know who you are (your user id)",
    "email": "see your e-mail address",
    "profile": "see your name",
    "offline_access": "stay signed in when you are away",
}


# ---- redirect URIs and resources (pure functions, property-tested) ---------------------------------


def is_loopback_redirect(uri: str) -> bool:
    """``http://127.0.0.1``, ``http://[::1]`` or ``http://localhost`` with any port (RFC 8252 §7.3)."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    if parts.scheme != "http" or "@" in parts.netloc or parts.fragment or "#" in uri:
        return False
    return parts.hostname in ("127.0.0.1", "::1", "localhost")


def _without_port(uri: str) -> tuple[str, str, str, str, str] | None:
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018
    except ValueError:
        return None
    return (parts.scheme, parts.hostname or "", parts.path, parts.query, parts.fragment)


def redirect_uri_matches(registered: str, presented: str, *, native: bool) -> bool:
    """Exact string match; for native clients a loopback redirect URI matches on any port (RFC 8252)."""
    if hmac.compare_digest(registered.encode(), presented.encode()):
        return True
    if not (native and is_loopback_redirect(registered) and is_loopback_redirect(presented)):
        return False
    a, b = _without_port(registered), _without_port(presented)
    return a is not None and a == b


def uri_pattern_matches(pattern: str, uri: str) -> bool:
    """An allowed redirect URI: exact, where each ``{id}`` matches one non-empty path segment of
    unreserved characters (never ``.`` or ``..``, never a ``/``, ``?`` or ``%``)."""
    if "{id}" not in pattern:
        return pattern == uri
    scheme_host, _sep, rest = pattern.partition("://")
    if "{id}" in scheme_host or "{id}" in rest.split("/", 1)[0]:
        return False  # only in the path: the host is never a wildcard
    regex = "".join(
        f"(?:{_SEGMENT.pattern})" if piece == "{id}" else re.escape(piece)
        for piece in re.split(r"(\{id\})", pattern)
    )
    if not re.fullmatch(regex, uri):
        return False
    return all(seg not in (".", "..") for seg in urlsplit(uri).path.split("/"))


def redirect_uri_syntax_error(uri: str) -> str | None:
    """Why ``uri`` can never be a redirect URI (RFC 6749 §3.1.2), or None."""
    if not isinstance(uri, str) or not uri:
        return "redirect URIs must be non-empty strings"
    if len(uri) > MAX_URI_LENGTH or not _URI_CHARS.fullmatch(uri):
        return f"redirect URI {uri[:100]!r} is not a valid URI"
    if "#" in uri:
        return f"redirect URI {uri!r} must not have a fragment"
    scheme, colon, _rest = uri.partition(":")
    if not colon or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        return f"redirect URI {uri!r} is not an absolute URI"
    scheme = scheme.lower()
    if scheme in _FORBIDDEN_SCHEMES:
        return f"redirect URI scheme {scheme!r} is not allowed"
    if scheme in ("http", "https"):
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018
        except ValueError:
            return f"redirect URI {uri!r} has an invalid port"
        if not parts.hostname or "@" in parts.netloc:
            return f"redirect URI {uri!r} must have a host and no user name or password"
        if scheme == "http" and not is_loopback_redirect(uri):
            return f"redirect URI {uri!r}: plain http is allowed only for loopback addresses"
    return None


def redirect_uri_permitted(uri: str, application_type: str, settings: GatewaySettings) -> str | None:
    """Why a registered (DCR) or self-described (CIMD) client may not use ``uri``, or None.

    Native clients may use loopback (any port) and private-use schemes (``com.example.app:/cb``,
    RFC 8252 §7.1); anything else must be one of the operator's presets or allowed URIs.
    """
    problem = redirect_uri_syntax_error(uri)
    if problem:
        return problem
    patterns = [*settings.allowed_redirect_uris]
    for preset in settings.redirect_presets:
        patterns.extend(PRESETS.get(preset, ()))
    if any(uri_pattern_matches(p, uri) for p in patterns):
        return None
    scheme = uri.split(":", 1)[0].lower()
    if application_type == "native":
        if is_loopback_redirect(uri):
            return None
        if scheme not in ("http", "https") and _PRIVATE_SCHEME.fullmatch(scheme):
            return None
        return (
            f"redirect URI {uri!r} is not allowed: native clients use loopback "
            "(http://127.0.0.1, http://[::1], http://localhost) or a private-use scheme"
        )
    if is_loopback_redirect(uri):
        return f"redirect URI {uri!r} is a loopback address: register with application_type 'native'"
    return (
        f"redirect URI {uri!r} is not allowed by this gateway "
        "(the operator allows redirect URIs with redirect_presets or allowed_redirect_uris)"
    )


def canonical_resource(value: str) -> str | None:
    """RFC 8707 / MCP canonical form: absolute http(s), no fragment, lowercase scheme and host, no
    trailing slash. None when ``value`` is not a usable resource indicator."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.fragment or "#" in value:
        return None
    if "@" in parts.netloc:
        return None
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, ""))


def _origin(uri: str) -> str:
    """The CSP source expression for a redirect target (its origin, or its scheme for private-use)."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return f"{parts.scheme}://{parts.netloc}"
    return f"{parts.scheme}:"


def _with_params(uri: str, params: Iterable[tuple[str, str]]) -> str:
    parts = urlsplit(uri)
    query = parts.query
    extra = urlencode(list(params))
    query = f"{query}&{extra}" if query else extra
    return urlunsplit(parts._replace(query=query))


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ---- errors -----------------------------------------------------------------------------------------


def oidc_user_allowed(allowed: tuple[str, ...], sub: str, email: str | None) -> bool:
    """Whether a user the upstream provider signed in may use the gateway.

    Empty: everyone the provider signs in. Else each entry is a verified e-mail address
    (``alice@example.com``), a whole domain (``@example.com``) or a subject (``sub:1234``).
    """
    if not allowed:
        return True
    address = (email or "").lower()
    domain = address.rpartition("@")[2] if "@" in address else None
    for entry in allowed:
        e = entry.strip().lower()
        if e.startswith("sub:") and entry.strip()[4:] == sub:
            return True
        if address and e == address:
            return True
        if domain and e.startswith("@") and e[1:] == domain:
            return True
    return False


class OAuthError(Exception):
    """An RFC 6749 error for a JSON endpoint (``/token``, ``/register``, ``/revoke``)."""

    def __init__(
        self, error: str, description: str, status: int = 400, headers: dict[str, str] | None = None
    ):
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.headers = headers or {}


class PageError(Exception):
    """A sign-in step that cannot continue and must not redirect: shown as an HTML page."""

    def __init__(self, title: str, message: str, status: int = 400):
        super().__init__(message)
        self.title = title
        self.message = message
        self.status = status


class RedirectError(Exception):
    """An authorization error to send back to a validated client redirect URI (``data`` holds it)."""

    def __init__(self, error: str, description: str, data: Mapping[str, Any]):
        super().__init__(description)
        self.error = error
        self.description = description
        self.data = data


NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body), status, headers={**NO_STORE, **(headers or {})}, media_type="application/json"
    )


def _oauth_error(exc: OAuthError) -> Response:
    return _json({"error": exc.error, "error_description": exc.description}, exc.status, exc.headers)


# ---- cookies ----------------------------------------------------------------------------------------


class _Signer:
    """HMAC-SHA256 signed, expiring cookie values; the key lives in the store (shared by processes)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def mac(self, *parts: str) -> str:
        msg = "\x1f".join(parts).encode()
        return _b64(hmac.new(self._key, msg, hashlib.sha256).digest())

    def sign(self, purpose: str, payload: dict[str, Any]) -> str:
        body = _b64(orjson.dumps(payload))
        return f"{body}.{self.mac(purpose, body)}"

    def unsign(self, purpose: str, value: str | None) -> dict[str, Any] | None:
        if not value or value.count(".") != 1:
            return None
        body, mac = value.split(".")
        if not hmac.compare_digest(mac, self.mac(purpose, body)):
            return None
        try:
            payload = orjson.loads(_unb64(body))
        except (ValueError, orjson.JSONDecodeError):
            return None
        if not isinstance(payload, dict) or not isinstance(payload.get("exp"), int | float):
            return None
        return payload if payload["exp"] > time.time() else None


@dataclass(frozen=True)
class _Session:
    subject: str
    name: str
    email: str | None
    auth_time: int


@dataclass(frozen=True)
class _Resource:
    uri: str
    accepted: frozenset[str] | None  # scopes that suffice there; None: any MCP scope (the issuer)


# ---- the server -------------------------------------------------------------------------------------


class AuthorizationServer:
    """State shared by the endpoints: settings, store, keys, resources, cookie signer, upstream."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: Store,
        keyring: KeyRing,
        resources: Mapping[str, Iterable[str]] | Iterable[str],
    ) -> None:
        self.settings = settings
        self.store = store
        self.keyring = keyring
        self.issuer = issuer_of(settings)
        self.secure = urlsplit(self.issuer).scheme == "https"
        # Browsers accept a __Host- cookie only with Secure, which needs https. On a loopback http
        # issuer (development and tests) the cookies go without the prefix and without Secure; they are
        # still host-only (no Domain), HttpOnly and SameSite=Lax.
        prefix = "__Host-mcpb-" if self.secure else "mcpb-"
        self.cookie_session = prefix + "session"
        self.cookie_csrf = prefix + "csrf"
        self.cookie_consent = prefix + "consent"
        self.cookie_upstream = prefix + "oidc"
        self.resources = self._resources(resources)
        self.servers = sorted(
            {s[4:] for r in self.resources.values() if r.accepted for s in r.accepted if s.startswith("mcp:")}
        )
        self.fetcher = ClientMetadataFetcher(settings) if settings.client_metadata_documents else None
        self.upstream = UpstreamOidc(settings) if settings.oidc_issuer else None
        self._signer: _Signer | None = None
        self.callback_uri = f"{self.issuer}/oauth/callback"

    def _resources(self, given: Mapping[str, Iterable[str]] | Iterable[str]) -> dict[str, _Resource]:
        """Keyed by canonical form (what a client's ``resource`` is compared in); each keeps the URI as
        the gateway spelled it, which becomes the token's ``aud`` the resource server checks."""
        out: dict[str, _Resource] = {
            canonical_resource(self.issuer) or self.issuer: _Resource(self.issuer, None)
        }
        items: Iterable[tuple[str, Iterable[str] | None]] = (
            given.items() if isinstance(given, Mapping) else ((uri, None) for uri in given)
        )
        for uri, scopes in items:
            canon = canonical_resource(uri)
            if canon is None or canon in out:
                continue
            accepted = frozenset(scopes) if scopes is not None else self._derive_scopes(uri)
            out[canon] = _Resource(uri, accepted)
        return out

    def add_resources(self, resources: Mapping[str, Iterable[str]]) -> None:
        """Resources of a server that joined while the gateway runs (a connector's)."""
        for canon, resource in self._resources(resources).items():
            self.resources.setdefault(canon, resource)
        self.servers = sorted(
            {s[4:] for r in self.resources.values() if r.accepted for s in r.accepted if s.startswith("mcp:")}
        )

    def resource(self, value: str) -> _Resource | None:
        """The resource a client's ``resource`` parameter names, compared canonically (RFC 8707)."""
        canon = canonical_resource(value)
        return None if canon is None else self.resources.get(canon)

    def _derive_scopes(self, uri: str) -> frozenset[str]:
        rest = uri[len(self.issuer) :] if uri.startswith(self.issuer) else ""
        match = re.fullmatch(r"/servers/([^/]+)/(?:mcp|sse)", rest)
        if match:
            return frozenset({MCP_SCOPE, f"mcp:{match.group(1)}"})
        return frozenset({MCP_SCOPE})

    @property
    def scopes_supported(self) -> list[str]:
        return [MCP_SCOPE, *(f"mcp:{s}" for s in self.servers), *OIDC_SCOPES]

    async def signer(self) -> _Signer:
        if self._signer is None:
            self._signer = _Signer(await self.store.get_or_create_secret("cookie-hmac"))
        return self._signer

    # ---- metadata ---------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        iss = self.issuer
        doc: dict[str, Any] = {
            "issuer": iss,
            "authorization_endpoint": f"{iss}/authorize",
            "token_endpoint": f"{iss}/token",
            "jwks_uri": f"{iss}/jwks.json",
            "revocation_endpoint": f"{iss}/revoke",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": list(GRANT_TYPES),
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "revocation_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "scopes_supported": self.scopes_supported,
            "client_id_metadata_document_supported": self.fetcher is not None,
            "authorization_response_iss_parameter_supported": True,
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "email", "name"],
            "prompt_values_supported": ["none", "login", "consent"],
            "request_parameter_supported": False,
            "request_uri_parameter_supported": False,
        }
        if self.settings.dynamic_registration:
            doc["registration_endpoint"] = f"{iss}/register"
        return doc

    # ---- clients ----------------------------------------------------------------------------------

    async def client(self, client_id: str) -> ClientRecord | None:
        """A registered client, or the one a client ID metadata document describes (CimdError)."""
        if self.fetcher is not None and client_id.startswith("https://"):
            record = await self.fetcher.fetch(client_id)
            stored = await self.store.get_client(client_id)
            if stored is None or stored.metadata != record.metadata:
                await self.store.add_client(record, replace=True)
            return record
        return await self.store.get_client(client_id)

    async def token_client(self, client_id: str) -> ClientRecord | None:
        """The client at the token endpoint: the stored copy first (no fetch on every refresh)."""
        record = await self.store.get_client(client_id)
        if record is not None or self.fetcher is None or not client_id.startswith("https://"):
            return record
        try:
            return await self.client(client_id)
        except CimdError:
            return None

    def redirect_allowed(self, client: ClientRecord, uri: str) -> str | None:
        """Why this client may not be sent to ``uri``, or None (registered, and within the policy)."""
        native = client.application_type == "native"
        if not any(redirect_uri_matches(r, uri, native=native) for r in client.redirect_uris):
            return "The redirect URI is not registered for this application."
        if client.kind in ("dcr", "cimd"):
            problem = redirect_uri_permitted(uri, client.application_type, self.settings)
            if problem:
                return f"The application's redirect URI is not allowed here: {problem}."
        return None

    async def authenticate_client(self, request: Request, form: Mapping[str, str]) -> ClientRecord:
        """RFC 6749 §2.3 client authentication (none, client_secret_basic, client_secret_post)."""
        header = request.headers.get("authorization")
        basic_id: str | None = None
        basic_secret: str | None = None
        if header:
            scheme, _, credentials = header.partition(" ")
            if scheme.lower() != "basic":
                raise OAuthError("invalid_client", "Unsupported client authentication scheme", 401, _BASIC)
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode()
                raw_id, sep, raw_secret = decoded.partition(":")
                if not sep:
                    raise ValueError
            except (ValueError, UnicodeDecodeError):
                raise OAuthError("invalid_client", "Malformed Basic credentials", 401, _BASIC) from None
            basic_id, basic_secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        form_id = form.get("client_id") or None
        form_secret = form.get("client_secret") or None
        if basic_id is not None and form_secret is not None:
            raise OAuthError("invalid_request", "Use one client authentication method, not two")
        if basic_id is not None and form_id is not None and form_id != basic_id:
            raise OAuthError("invalid_request", "client_id does not match the Basic credentials")
        client_id = basic_id if basic_id is not None else form_id
        headers = _BASIC if basic_id is not None else {}
        if not client_id:
            raise OAuthError("invalid_client", "Client authentication is required (client_id)", 401, headers)
        client = await self.token_client(client_id)
        if client is None:
            # Claude (and other DCR clients) re-register on this answer.
            raise OAuthError("invalid_client", "Unknown client: register again", 401, headers)
        secret = basic_secret if basic_id is not None else form_secret
        if client.secret_hash is None:
            if secret:
                raise OAuthError(
                    "invalid_client", "This client is public: send no client secret", 401, headers
                )
            return client
        if not secret:
            raise OAuthError("invalid_client", "This client must authenticate with its secret", 401, headers)
        if not same_secret(client.secret_hash, secret):
            raise OAuthError("invalid_client", "Client authentication failed", 401, headers)
        return client

    # ---- sessions and cookies ---------------------------------------------------------------------

    def _set_cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name, value, max_age=max_age, path="/", secure=self.secure, httponly=True, samesite="lax"
        )

    async def session(self, request: Request) -> _Session | None:
        payload = (await self.signer()).unsign("session", request.cookies.get(self.cookie_session))
        if payload is None:
            return None
        try:
            session = _Session(
                str(payload["sub"]), str(payload["name"]), payload.get("email"), int(payload["auth_time"])
            )
        except (KeyError, TypeError, ValueError):
            return None
        if session.subject.startswith("user:"):
            # A local user removed, disabled or re-created since signing in no longer has a session.
            user = await self.store.get_user(session.subject[5:])
            if user is None or user.disabled or user.created_at.timestamp() > session.auth_time + 1:
                return None
        return session

    async def start_session(self, response: Response, session: _Session) -> None:
        ttl = self.settings.login_session_seconds
        value = (await self.signer()).sign(
            "session",
            {
                "sub": session.subject,
                "name": session.name,
                "email": session.email,
                "auth_time": session.auth_time,
                "exp": int(time.time()) + ttl,
            },
        )
        self._set_cookie(response, self.cookie_session, value, ttl)

    async def consented_clients(self, request: Request) -> set[str]:
        payload = (await self.signer()).unsign("consent", request.cookies.get(self.cookie_consent))
        clients = payload.get("clients") if payload else None
        return {c for c in clients if isinstance(c, str)} if isinstance(clients, list) else set()

    async def remember_consent(self, request: Request, response: Response, client_id: str) -> None:
        clients = sorted((await self.consented_clients(request)) | {client_id})[-50:]
        value = (await self.signer()).sign(
            "consent", {"clients": clients, "exp": int(time.time()) + CONSENT_COOKIE_SECONDS}
        )
        self._set_cookie(response, self.cookie_consent, value, CONSENT_COOKIE_SECONDS)

    def csrf_cookie(self, request: Request) -> tuple[str, bool]:
        """The browser's CSRF cookie value, and whether it must be set on this response."""
        value = request.cookies.get(self.cookie_csrf)
        if value and re.fullmatch(r"[A-Za-z0-9_\-]{32,64}", value):
            return value, False
        return _random.token_urlsafe(32), True

    async def csrf_token(self, cookie: str, tx: str) -> str:
        """A form's CSRF token: bound to the browser's cookie and to the transaction."""
        return (await self.signer()).mac("csrf", cookie, tx)

    async def check_csrf(self, request: Request, form: Mapping[str, str]) -> str:
        tx = form.get("tx", "")
        cookie = request.cookies.get(self.cookie_csrf)
        token = form.get("csrf", "")
        if (
            not tx
            or not cookie
            or not token
            or not hmac.compare_digest(token, await self.csrf_token(cookie, tx))
        ):
            raise PageError(
                "This form cannot be accepted",
                "The form was not sent from this sign-in page, or your browser blocked its cookie "
                "(CSRF check failed).",
                403,
            )
        return tx

    # ---- responses --------------------------------------------------------------------------------

    def page(self, body: str, status: int = 200, form_targets: Iterable[str] = ()) -> HTMLResponse:
        # The form posts to us; the answer may redirect to the client or the upstream provider, and
        # browsers apply form-action to those redirects too.
        targets = " ".join(dict.fromkeys(_origin(t) for t in form_targets))
        csp = (
            "default-src 'none'; style-src 'unsafe-inline'; "
            f"form-action 'self'{' ' + targets if targets else ''}; "
            "frame-ancestors 'none'; base-uri 'none'"
        )
        return HTMLResponse(body, status, headers={"Content-Security-Policy": csp})

    def error_page(self, exc: PageError) -> HTMLResponse:
        return self.page(pages.error_page(exc.title, exc.message), exc.status)

    def redirect(self, data: Mapping[str, Any], params: Iterable[tuple[str, str]]) -> RedirectResponse:
        """The authorization response: ``state`` (if the client sent one) and ``iss`` always (RFC 9207)."""
        extra = list(params)
        if data.get("state") is not None:
            extra.append(("state", str(data["state"])))
        extra.append(("iss", self.issuer))
        return RedirectResponse(_with_params(str(data["redirect_uri"]), extra), 303)

    def redirect_error(self, data: Mapping[str, Any], error: str, description: str) -> RedirectResponse:
        log.info("authorization_refused", client_id=data.get("client_id"), error=error, reason=description)
        return self.redirect(data, [("error", error), ("error_description", description)])

    # ---- the authorization request ----------------------------------------------------------------

    async def authorization_request(self, params: list[tuple[str, str]]) -> dict[str, Any]:
        """Validate an authorization request into the transaction to store; raises PageError before the
        client and redirect URI are trusted, RedirectError (with ``data``) after."""
        multi: dict[str, list[str]] = {}
        for k, v in params:
            multi.setdefault(k, []).append(v)

        def one(name: str) -> str | None:
            values = multi.get(name)
            if not values:
                return None
            if len(values) > 1:
                raise ValueError(name)
            return values[0]

        try:
            client_id = one("client_id")
            redirect_param = one("redirect_uri")
        except ValueError as exc:
            raise PageError(
                "Invalid sign-in request", f"The parameter {exc} appears more than once."
            ) from None
        if not client_id:
            raise PageError("Invalid sign-in request", "The request names no application (client_id).")
        try:
            client = await self.client(client_id)
        except CimdError as exc:
            raise PageError(
                "Unknown application", f"The application's client metadata document cannot be used: {exc}"
            ) from None
        if client is None:
            raise PageError(
                "Unknown application",
                "This application is not registered with this gateway (or its registration expired). "
                "Remove the connection in the application and add it again.",
            )
        if redirect_param is None:
            if len(client.redirect_uris) != 1:
                raise PageError("Invalid sign-in request", "The request has no redirect_uri.")
            redirect_param = client.redirect_uris[0]
        problem = self.redirect_allowed(client, redirect_param)
        if problem:
            raise PageError("Invalid redirect URI", problem)

        # The client's name and kind travel with the request: the pages must not depend on a CIMD
        # registration that may age out of the store while the person signs in.
        data: dict[str, Any] = {
            "client_id": client.client_id,
            "client_name": client.name,
            "client_kind": client.kind,
            "redirect_uri": redirect_param,
            "state": None,
        }
        try:
            state = one("state")
        except ValueError:
            raise RedirectError("invalid_request", "state appears more than once", data) from None
        if state is not None and len(state) > MAX_STATE_LENGTH:
            raise RedirectError("invalid_request", "state is too long", data)
        data["state"] = state
        try:
            response_type = one("response_type")
            challenge = one("code_challenge")
            method = one("code_challenge_method")
            scope_param = one("scope")
            nonce = one("nonce")
            prompt = one("prompt")
            max_age = one("max_age")
            response_mode = one("response_mode")
        except ValueError as exc:
            raise RedirectError("invalid_request", f"{exc} appears more than once", data) from None
        if "request" in multi:
            raise RedirectError("request_not_supported", "Request objects are not supported", data)
        if "request_uri" in multi:
            raise RedirectError("request_uri_not_supported", "request_uri is not supported", data)
        if response_type != "code":
            raise RedirectError("unsupported_response_type", "Only response_type=code is supported", data)
        if response_mode not in (None, "query"):
            raise RedirectError("invalid_request", "Only response_mode=query is supported", data)
        if "authorization_code" not in client.grant_types:
            raise RedirectError(
                "unauthorized_client", "This client may not use the authorization code grant", data
            )
        if not challenge:
            raise RedirectError("invalid_request", "PKCE is required: send code_challenge (S256)", data)
        if method != "S256":
            raise RedirectError(
                "invalid_request", "code_challenge_method must be S256 (plain is not supported)", data
            )
        if not re.fullmatch(r"[A-Za-z0-9\-_]{43}", challenge):
            raise RedirectError("invalid_request", "code_challenge is not a base64url SHA-256 digest", data)

        resources = multi.get("resource", [])
        if len(resources) > 1:
            raise RedirectError("invalid_target", "Ask for one resource per authorization", data)
        target = self.resource(resources[0] if resources else self.issuer)
        if target is None:
            raise RedirectError("invalid_target", "The resource is not served by this gateway", data)
        resource = target.uri

        requested = scope_param.split() if scope_param else []
        scopes = list(dict.fromkeys(requested))
        unknown = [s for s in scopes if s not in self.scopes_supported]
        if unknown:
            raise RedirectError("invalid_scope", f"Unknown scope: {' '.join(unknown)}", data)
        mcp_scopes = {s for s in scopes if s == MCP_SCOPE or s.startswith("mcp:")}
        if not mcp_scopes:
            scopes.insert(0, MCP_SCOPE)  # no scope at all (ChatGPT on reconnect): the whole gateway
            mcp_scopes = {MCP_SCOPE}
        accepted = target.accepted
        if accepted is not None and not mcp_scopes & accepted:
            raise RedirectError(
                "invalid_scope", f"The resource needs one of the scopes {' '.join(sorted(accepted))}", data
            )
        prompts = set(prompt.split()) if prompt else set()
        if not prompts <= {"none", "login", "consent", "select_account"} or (
            "none" in prompts and len(prompts) > 1
        ):
            raise RedirectError("invalid_request", "Unsupported prompt value", data)
        if max_age is not None and not max_age.isdigit():
            raise RedirectError("invalid_request", "max_age must be a number of seconds", data)
        if nonce is not None and len(nonce) > 512:
            raise RedirectError("invalid_request", "nonce is too long", data)
        data.update(
            {
                "code_challenge": challenge,
                "resource": resource,
                "scope": " ".join(scopes),
                "nonce": nonce,
                "prompt": sorted(prompts),
                "max_age": int(max_age) if max_age is not None else None,
                "created": int(time.time()),
            }
        )
        return data

    async def proceed(self, request: Request, tx: str, data: dict[str, Any]) -> Response:
        """The next step of a waiting authorization: sign-in, consent, upstream, or the code."""
        session = await self.session(request)
        prompts = set(data.get("prompt") or ())
        if session is not None:
            stale = "login" in prompts and session.auth_time < int(data["created"])
            max_age = data.get("max_age")
            if max_age is not None and time.time() - session.auth_time > int(max_age):
                stale = True
            if stale:
                session = None
        if session is not None:
            if "consent" not in prompts and await self.store.has_consent(
                session.subject, data["client_id"], data["scope"]
            ):
                if await self.store.take_pending(tx, "authorize") is None:
                    raise PageError("Sign-in expired", "This sign-in was already completed or has expired.")
                return await self.issue_code(data, session)
            if "none" in prompts:
                await self.store.take_pending(tx, "authorize")
                return self.redirect_error(data, "consent_required", "The application needs your consent")
            return await self.consent(request, tx, data, session)
        if "none" in prompts:
            await self.store.take_pending(tx, "authorize")
            return self.redirect_error(data, "login_required", "Sign in is required")
        if self.upstream is not None:
            if "consent" not in prompts and data["client_id"] in await self.consented_clients(request):
                if await self.store.take_pending(tx, "authorize") is None:
                    raise PageError("Sign-in expired", "This sign-in was already completed or has expired.")
                return await self.go_upstream(request, data)
            return await self.consent(request, tx, data, None)
        return await self.login(request, tx, data)

    async def _form_page(
        self,
        request: Request,
        tx: str,
        render: Callable[[str], str],
        targets: Iterable[str],
        status: int = 200,
    ) -> Response:
        cookie, fresh = self.csrf_cookie(request)
        response = self.page(render(await self.csrf_token(cookie, tx)), status, targets)
        if fresh:
            self._set_cookie(response, self.cookie_csrf, cookie, TRANSACTION_SECONDS * 6)
        return response

    async def login(
        self,
        request: Request,
        tx: str,
        data: Mapping[str, Any],
        *,
        username: str = "",
        error: str | None = None,
    ) -> Response:
        name = str(data.get("client_name") or data["client_id"])
        return await self._form_page(
            request,
            tx,
            lambda csrf: pages.login_page(
                action=f"{self.issuer}/authorize/login",
                tx=tx,
                csrf=csrf,
                client_name=name,
                username=username,
                error=error,
            ),
            [data["redirect_uri"]],
            400 if error else 200,
        )

    async def consent(
        self, request: Request, tx: str, data: Mapping[str, Any], session: _Session | None
    ) -> Response:
        redirect = str(data["redirect_uri"])
        host = urlsplit(redirect).hostname or redirect.split(":", 1)[0] + ":"
        view = pages.ConsentView(
            client_name=str(data.get("client_name") or data["client_id"]),
            client_id=str(data["client_id"]),
            client_kind=str(data.get("client_kind") or "static"),
            redirect_uri=redirect,
            redirect_host=host,
            loopback=is_loopback_redirect(redirect),
            scopes=tuple((s, self.scope_meaning(s)) for s in str(data["scope"]).split()),
            resource=str(data["resource"]),
            user=session.name if session else None,
            upstream=urlsplit(self.upstream.issuer).hostname if self.upstream else None,
        )
        targets = [redirect]
        if self.upstream is not None and session is None:
            meta = await self.upstream_metadata()
            targets.append(meta)
        return await self._form_page(
            request,
            tx,
            lambda csrf: pages.consent_page(
                action=f"{self.issuer}/authorize/consent", tx=tx, csrf=csrf, view=view
            ),
            targets,
        )

    def scope_meaning(self, scope: str) -> str:
        if scope == MCP_SCOPE:
            return "use every MCP server of this gateway that you may use, as you"
        if scope.startswith("mcp:"):
            return f"use the MCP server {scope[4:]!r}, as you"
        return SCOPE_MEANINGS.get(scope, scope)

    async def upstream_metadata(self) -> str:
        """The upstream authorization endpoint (discovered once); PageError when it is unreachable."""
        assert self.upstream is not None
        try:
            return (await self.upstream.discover()).authorization_endpoint
        except OidcError as exc:
            log.error("oidc_discovery_failed", error=str(exc))
            raise PageError(
                "Sign-in is unavailable",
                "The identity provider cannot be reached right now. Try again later.",
                502,
            ) from None

    async def go_upstream(self, request: Request, data: Mapping[str, Any]) -> Response:
        """After consent: a fresh single-use ``state``, PKCE and nonce, and off to the provider."""
        assert self.upstream is not None
        await self.upstream_metadata()
        verifier = _random.token_urlsafe(48)
        nonce = _random.token_urlsafe(24)
        binding = request.cookies.get(self.cookie_upstream)
        if not binding or not re.fullmatch(r"[A-Za-z0-9_\-]{32,64}", binding):
            binding = _random.token_urlsafe(32)
        state = await self.store.put_pending(
            "oidc_state",
            {
                "request": dict(data),
                "verifier": verifier,
                "nonce": nonce,
                "browser": hashlib.sha256(binding.encode()).hexdigest(),
            },
            UPSTREAM_STATE_SECONDS,
        )
        url = self.upstream.authorization_url(state, nonce, self.callback_uri, _s256(verifier))
        response = RedirectResponse(url, 303)
        self._set_cookie(response, self.cookie_upstream, binding, UPSTREAM_STATE_SECONDS)
        return response

    async def issue_code(self, data: Mapping[str, Any], session: _Session) -> Response:
        code = await self.store.add_code(
            client_id=data["client_id"],
            redirect_uri=data["redirect_uri"],
            code_challenge=data["code_challenge"],
            resource=data["resource"],
            scope=data["scope"],
            subject=session.subject,
            name=session.name,
            nonce=data.get("nonce"),
            expires_at=datetime.now(UTC) + timedelta(seconds=self.settings.auth_code_seconds),
            family_id=new_family_id(),
        )
        log.info(
            "authorization_granted", client_id=data["client_id"], subject=session.subject, scope=data["scope"]
        )
        return self.redirect(data, [("code", code)])

    # ---- tokens -----------------------------------------------------------------------------------

    async def token_response(
        self,
        *,
        subject: str,
        name: str,
        client: ClientRecord,
        resource: str,
        scope: str,
        family_id: str,
        refresh_token: str | None,
        id_token: str | None = None,
    ) -> Response:
        ttl = self.settings.access_token_seconds
        access = self.keyring.mint_access_token(
            subject=subject,
            name=name,
            client_id=client.client_id,
            audience=resource,
            scope=scope,
            family_id=family_id,
            ttl=ttl,
        )
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ttl,
            "scope": scope,
        }
        if refresh_token is not None:
            body["refresh_token"] = refresh_token
        if id_token is not None:
            body["id_token"] = id_token
        return _json(body)

    async def code_grant(self, client: ClientRecord, form: Mapping[str, str]) -> Response:
        code = form.get("code")
        if not code:
            raise OAuthError("invalid_request", "code is required")
        if "authorization_code" not in client.grant_types:
            raise OAuthError("unauthorized_client", "This client may not use the authorization code grant")
        record = await self.store.consume_code(code)
        if record is None:
            raise OAuthError("invalid_grant", "The authorization code is invalid or expired")
        if record.replayed:
            # RFC 6749 §4.1.2 / OAuth 2.1: revoke what the first use issued.
            await self.keyring.revoke_family(record.family_id)
            log.warning("authorization_code_replayed", client_id=record.client_id, family=record.family_id)
            raise OAuthError("invalid_grant", "The authorization code was already used")
        if record.client_id != client.client_id:
            raise OAuthError("invalid_grant", "The authorization code was issued to another client")
        if record.expires_at <= datetime.now(UTC):
            raise OAuthError("invalid_grant", "The authorization code expired")
        redirect_uri = form.get("redirect_uri")
        if redirect_uri is not None and redirect_uri != record.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri does not match the authorization request")
        verifier = form.get("code_verifier")
        if not verifier:
            raise OAuthError("invalid_request", "code_verifier is required (PKCE)")
        if not _PKCE.fullmatch(verifier) or not hmac.compare_digest(_s256(verifier), record.code_challenge):
            raise OAuthError("invalid_grant", "The code_verifier does not match the code_challenge")
        resource = self.requested_resource(form, record.resource)
        if resource != record.resource:
            raise OAuthError("invalid_target", "The resource differs from the one authorized")
        refresh = None
        if "refresh_token" in client.grant_types:
            refresh = await self.store.add_refresh_token(
                family_id=record.family_id,
                client_id=client.client_id,
                subject=record.subject,
                name=record.name,
                resource=record.resource,
                scope=record.scope,
                expires_at=datetime.now(UTC) + timedelta(seconds=self.settings.refresh_token_seconds),
            )
        id_token = self.id_token(record, client) if "openid" in record.scope.split() else None
        log.info(
            "tokens_issued", client_id=client.client_id, subject=record.subject, resource=record.resource
        )
        return await self.token_response(
            subject=record.subject,
            name=record.name,
            client=client,
            resource=record.resource,
            scope=record.scope,
            family_id=record.family_id,
            refresh_token=refresh,
            id_token=id_token,
        )

    def id_token(self, record: CodeRecord, client: ClientRecord) -> str:
        scopes = record.scope.split()
        oidc_user = record.subject.startswith("oidc:")
        email = record.name if "email" in scopes and oidc_user and "@" in record.name else None
        name = record.name if "profile" in scopes else None
        return self.keyring.mint_id_token(
            subject=record.subject,
            client_id=client.client_id,
            # The code is issued at the end of the sign-in, so its time stands for the authentication.
            auth_time=int(record.created_at.timestamp()),
            ttl=ID_TOKEN_SECONDS,
            nonce=record.nonce,
            email=email,
            name=name,
        )

    def requested_resource(self, form: Mapping[str, str], default: str) -> str:
        """The token request's ``resource`` (default: the authorized one), as the gateway spells it."""
        value = form.get("resource")
        if value is None:
            return default
        target = self.resource(value)
        if target is None:
            raise OAuthError("invalid_target", "The resource is not served by this gateway")
        return target.uri

    async def refresh_grant(self, client: ClientRecord, form: Mapping[str, str]) -> Response:
        token = form.get("refresh_token")
        if not token:
            raise OAuthError("invalid_request", "refresh_token is required")
        if "refresh_token" not in client.grant_types:
            raise OAuthError("unauthorized_client", "This client may not use refresh tokens")
        # Check the request against the grant before spending the token: a refused request must not
        # cost the client its (rotated) refresh token.
        granted = await self.store.peek_refresh_token(token)
        scope: str | None = None
        if granted is not None and granted.client_id == client.client_id:
            if self.requested_resource(form, granted.resource) != granted.resource:
                raise OAuthError("invalid_target", "The resource differs from the one authorized")
            if form.get("scope"):
                narrowed = form["scope"].split()
                if not set(narrowed) <= set(granted.scope.split()):
                    raise OAuthError("invalid_scope", "A refresh cannot widen the scope")
                scope = " ".join(dict.fromkeys(narrowed))
        result = await self.store.rotate_refresh_token(
            token, client.client_id, ttl=self.settings.refresh_token_seconds
        )
        if not result.ok or result.record is None or result.token is None:
            if result.reason == "reused" and result.record is not None:
                self.keyring.forget(family_id=result.record.family_id)
                log.warning(
                    "refresh_token_reused",
                    client_id=client.client_id,
                    family=result.record.family_id,
                    action="grant revoked",
                )
            raise OAuthError("invalid_grant", f"The refresh token is invalid ({result.reason or 'unknown'})")
        record = result.record
        scope = scope or record.scope
        log.info(
            "tokens_refreshed", client_id=client.client_id, subject=record.subject, family=record.family_id
        )
        return await self.token_response(
            subject=record.subject,
            name=record.name,
            client=client,
            resource=record.resource,
            scope=scope,
            family_id=record.family_id,
            refresh_token=result.token,
        )


_BASIC = {"WWW-Authenticate": 'Basic realm="mcp-bastion"'}


def _pairs(body: bytes) -> list[tuple[str, str]]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise OAuthError("invalid_request", "The body is not UTF-8") from None
    return parse_qsl(text, keep_blank_values=True)


def _single(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """A form as a dict; repeated parameters are an error (RFC 6749 §3.1)."""
    out: dict[str, str] = {}
    for k, v in pairs:
        if k in out:
            raise OAuthError("invalid_request", f"{k} appears more than once")
        out[k] = v
    return out


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise OAuthError("invalid_request", "The request body is too large", 413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise OAuthError("invalid_request", "The request body is too large", 413)
    return body


async def _form(request: Request) -> list[tuple[str, str]]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "Send the parameters as application/x-www-form-urlencoded")
    return _pairs(await _read_body(request, MAX_FORM_BYTES))


# ---- endpoints --------------------------------------------------------------------------------------


def build_auth_app(
    settings: GatewaySettings,
    store: Store,
    keyring: KeyRing,
    resources: Mapping[str, Iterable[str]] | Iterable[str],
) -> Starlette:
    """The authorization server as an ASGI app, for the gateway to mount for every non-MCP path.

    ``resources`` are the canonical resource URIs tokens may be asked for: a mapping to the scopes
    that suffice at each, or just the URIs (scopes then follow the ``/servers/<name>/`` layout).
    """
    srv = AuthorizationServer(settings, store, keyring, resources)

    async def metadata(request: Request) -> Response:
        return Response(
            orjson.dumps(srv.metadata()),
            headers={"Cache-Control": "public, max-age=300"},
            media_type="application/json",
        )

    async def jwks(request: Request) -> Response:
        return Response(
            orjson.dumps(keyring.jwks()),
            headers={"Cache-Control": "public, max-age=300"},
            media_type="application/jwk-set+json",
        )

    async def authorize(request: Request) -> Response:
        try:
            if request.method == "POST":
                params = await _form(request)
            else:
                params = parse_qsl(request.url.query, keep_blank_values=True)
        except OAuthError as exc:
            return srv.error_page(PageError("Invalid sign-in request", exc.description))
        try:
            data = await srv.authorization_request(params)
        except PageError as exc:
            log.info("authorization_request_refused", reason=exc.message)
            return srv.error_page(exc)
        except RedirectError as exc:
            return srv.redirect_error(exc.data, exc.error, exc.description)
        tx = await store.put_pending("authorize", data, TRANSACTION_SECONDS)
        try:
            return await srv.proceed(request, tx, data)
        except PageError as exc:
            return srv.error_page(exc)

    async def resume(request: Request) -> Response:
        tx = request.query_params.get("tx", "")
        data = await store.peek_pending(tx, "authorize") if tx else None
        if data is None:
            return srv.error_page(
                PageError("Sign-in expired", "This sign-in request has expired or was already completed.")
            )
        try:
            return await srv.proceed(request, tx, data)
        except PageError as exc:
            return srv.error_page(exc)

    async def login(request: Request) -> Response:
        try:
            form = _single(await _form(request))
            tx = await srv.check_csrf(request, form)
        except OAuthError as exc:
            return srv.error_page(PageError("Invalid form", exc.description))
        except PageError as exc:
            return srv.error_page(exc)
        if srv.upstream is not None:
            return srv.error_page(
                PageError("Not available", "Sign-in happens at your identity provider.", 404)
            )
        data = await store.peek_pending(tx, "authorize")
        if data is None:
            return srv.error_page(
                PageError("Sign-in expired", "This sign-in request has expired or was already completed.")
            )
        username = form.get("username", "").strip()
        password = form.get("password", "")
        if not username or not password or not await store.verify_user(username, password):
            log.info("sign_in_failed", client_id=data["client_id"])
            return await srv.login(
                request, tx, data, username=username, error="The user name or password is not right."
            )
        log.info("signed_in", subject=f"user:{username}")
        response = RedirectResponse(f"{srv.issuer}/authorize/continue?{urlencode({'tx': tx})}", 303)
        await srv.start_session(response, _Session(f"user:{username}", username, None, int(time.time())))
        return response

    async def consent(request: Request) -> Response:
        try:
            form = _single(await _form(request))
            tx = await srv.check_csrf(request, form)
        except OAuthError as exc:
            return srv.error_page(PageError("Invalid form", exc.description))
        except PageError as exc:
            return srv.error_page(exc)
        decision = form.get("decision")
        if decision not in ("approve", "deny"):
            return srv.error_page(PageError("Invalid form", "Choose Allow or Deny."))
        data = await store.take_pending(tx, "authorize")
        if data is None:
            return srv.error_page(
                PageError("Sign-in expired", "This sign-in request has expired or was already completed.")
            )
        if decision == "deny":
            return srv.redirect_error(data, "access_denied", "The user denied the request")
        session = await srv.session(request)
        try:
            if session is not None:
                await store.add_consent(session.subject, data["client_id"], data["scope"])
                return await srv.issue_code(data, session)
            if srv.upstream is not None:
                response = await srv.go_upstream(request, data)
                await srv.remember_consent(request, response, data["client_id"])
                return response
        except PageError as exc:
            return srv.error_page(exc)
        # The sign-in lapsed between the pages: start this request's sign-in again.
        fresh = await store.put_pending("authorize", data, TRANSACTION_SECONDS)
        return RedirectResponse(f"{srv.issuer}/authorize/continue?{urlencode({'tx': fresh})}", 303)

    async def callback(request: Request) -> Response:
        if srv.upstream is None:
            return srv.error_page(PageError("Not available", "Delegated sign-in is not configured.", 404))
        query = request.query_params
        state = query.get("state", "")
        expired = PageError(
            "Sign-in expired",
            "This sign-in answer is unknown, expired or was already used (state). Start again.",
        )
        pending = await store.peek_pending(state, "oidc_state") if state else None
        if pending is None:
            return srv.error_page(expired)
        # Bound to the browser that consented (no login CSRF); checked before the state is spent so
        # another browser cannot use up someone else's sign-in.
        binding = request.cookies.get(srv.cookie_upstream, "")
        if not hmac.compare_digest(hashlib.sha256(binding.encode()).hexdigest(), str(pending["browser"])):
            return srv.error_page(
                PageError("Sign-in refused", "This sign-in was started in another browser.", 403)
            )
        if await store.take_pending(state, "oidc_state") is None:
            return srv.error_page(expired)
        data = pending["request"]
        upstream_iss = query.get("iss")
        if upstream_iss is not None and upstream_iss != srv.upstream.issuer:
            return srv.redirect_error(
                data, "access_denied", "The identity provider's answer has the wrong issuer"
            )
        if "error" in query:
            error = query["error"] if query["error"] in _PASSED_THROUGH_UPSTREAM_ERRORS else "access_denied"
            log.info("upstream_sign_in_refused", error=query["error"])
            return srv.redirect_error(data, error, "The identity provider did not sign you in")
        code = query.get("code")
        if not code:
            return srv.redirect_error(data, "access_denied", "The identity provider sent no code")
        try:
            user = await srv.upstream.exchange(code, srv.callback_uri, pending["verifier"], pending["nonce"])
        except OidcError as exc:
            log.error("upstream_sign_in_failed", error=str(exc))
            return srv.redirect_error(data, "server_error", "The sign-in at the identity provider failed")
        if not oidc_user_allowed(settings.oidc_allowed_users, user.sub, user.email):
            log.warning("upstream_user_not_allowed", subject=user.sub)
            return srv.redirect_error(
                data, "access_denied", "This account may not use this gateway (oidc_allowed_users)"
            )
        session = _Session(f"oidc:{user.sub}", user.email or user.sub, user.email, int(time.time()))
        await store.add_consent(session.subject, data["client_id"], data["scope"])
        response = await srv.issue_code(data, session)
        await srv.start_session(response, session)
        response.delete_cookie(
            srv.cookie_upstream, path="/", secure=srv.secure, httponly=True, samesite="lax"
        )
        return response

    async def token(request: Request) -> Response:
        try:
            form = _single(await _form(request))
            client = await srv.authenticate_client(request, form)
            grant = form.get("grant_type")
            # Sign with the database's newest key: another process may have rotated since we looked.
            await keyring.maybe_rotate()
            if grant == "authorization_code":
                return await srv.code_grant(client, form)
            if grant == "refresh_token":
                return await srv.refresh_grant(client, form)
            if not grant:
                raise OAuthError("invalid_request", "grant_type is required")
            raise OAuthError("unsupported_grant_type", f"grant_type {grant!r} is not supported")
        except OAuthError as exc:
            log.info("token_request_refused", error=exc.error, reason=exc.description)
            return _oauth_error(exc)

    async def revoke(request: Request) -> Response:
        try:
            form = _single(await _form(request))
            client = await srv.authenticate_client(request, form)
            value = form.get("token")
            if not value:
                raise OAuthError("invalid_request", "token is required")
        except OAuthError as exc:
            return _oauth_error(exc)
        hint = form.get("token_type_hint")
        # RFC 7009 §2.2: unknown, invalid or foreign tokens get 200 as well (nothing is revealed).
        if hint != "access_token":
            family = await store.revoke_refresh_token(value, client.client_id)
            if family is not None:
                keyring.forget(family_id=family)
                log.info("grant_revoked", client_id=client.client_id)
                return _json({})
        claims = await keyring.verify_access_token(value, [r.uri for r in srv.resources.values()])
        if claims is not None and claims.get("client_id") == client.client_id:
            await keyring.revoke_access_token(claims)
            log.info("access_token_revoked", client_id=client.client_id)
        elif hint == "access_token":
            family = await store.revoke_refresh_token(value, client.client_id)
            if family is not None:
                keyring.forget(family_id=family)
        return _json({})

    async def register(request: Request) -> Response:
        try:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise OAuthError("invalid_client_metadata", "Send the client metadata as application/json")
            try:
                body = orjson.loads(await _read_body(request, MAX_REGISTRATION_BYTES))
            except orjson.JSONDecodeError:
                raise OAuthError("invalid_client_metadata", "The body is not valid JSON") from None
            if not isinstance(body, dict):
                raise OAuthError("invalid_client_metadata", "The client metadata must be a JSON object")
            client, secret = registration(settings, body)
        except OAuthError as exc:
            log.info("registration_refused", error=exc.error, reason=exc.description)
            return _oauth_error(exc)
        await store.add_client(client)
        log.info("client_registered", client_id=client.client_id, name=client.name, kind="dcr")
        reply: dict[str, Any] = {
            **{k: v for k, v in client.metadata.items() if k not in ("client_secret",)},
            "client_id": client.client_id,
            "client_id_issued_at": int(client.created_at.timestamp()),
            "client_name": client.name,
            "redirect_uris": client.redirect_uris,
            "token_endpoint_auth_method": client.token_endpoint_auth_method,
            "grant_types": client.grant_types,
            "response_types": ["code"],
            "application_type": client.application_type,
        }
        if secret is not None:
            reply["client_secret"] = secret
            reply["client_secret_expires_at"] = 0
        return _json(reply, 201)

    iss_path = urlsplit(srv.issuer).path.rstrip("/")
    routes = [
        Route("/.well-known/oauth-authorization-server", metadata, methods=["GET"]),
        Route("/.well-known/openid-configuration", metadata, methods=["GET"]),
        Route("/jwks.json", jwks, methods=["GET"]),
        Route("/authorize", authorize, methods=["GET", "POST"]),
        Route("/authorize/continue", resume, methods=["GET"]),
        Route("/authorize/login", login, methods=["POST"]),
        Route("/authorize/consent", consent, methods=["POST"]),
        Route("/oauth/callback", callback, methods=["GET"]),
        Route("/token", token, methods=["POST"]),
        Route("/revoke", revoke, methods=["POST"]),
    ]
    if iss_path:  # issuer with a path (RFC 8414 §3.1 path insertion; OIDC appends)
        routes += [
            Route(f"/.well-known/oauth-authorization-server{iss_path}", metadata, methods=["GET"]),
            Route(f"/.well-known/openid-configuration{iss_path}", metadata, methods=["GET"]),
            Route(f"{iss_path}/.well-known/openid-configuration", metadata, methods=["GET"]),
        ]
    if settings.dynamic_registration:
        routes.append(Route("/register", register, methods=["POST"]))
    app = Starlette(routes=routes)
    app.add_middleware(_SecurityHeaders)
    app.state.authorization_server = srv  # servers that join at run time add their resources here
    return app


def registration(settings: GatewaySettings, body: Mapping[str, Any]) -> tuple[ClientRecord, str | None]:
    """An RFC 7591 registration request as the client to store (and its secret, for confidential ones)."""

    def bad(message: str, error: str = "invalid_client_metadata") -> OAuthError:
        return OAuthError(error, message)

    uris = body.get("redirect_uris")
    if not isinstance(uris, list) or not uris or not all(isinstance(u, str) for u in uris):
        raise bad("redirect_uris must be a non-empty list of URIs", "invalid_redirect_uri")
    if len(uris) > MAX_REDIRECT_URIS:
        raise bad(f"at most {MAX_REDIRECT_URIS} redirect_uris", "invalid_redirect_uri")
    uris = list(dict.fromkeys(uris))
    application_type: Literal["web", "native"]
    given_type = body.get("application_type")
    if given_type in ("web", "native"):
        application_type = given_type
    elif given_type is None:
        # OIDC's default is "web"; clients from before the MCP rule that only list loopback
        # redirects are desktop or CLI apps.
        application_type = "native" if all(is_loopback_redirect(u) for u in uris) else "web"
    else:
        raise bad("application_type must be 'web' or 'native'")
    for uri in uris:
        problem = redirect_uri_permitted(uri, application_type, settings)
        if problem:
            raise bad(problem, "invalid_redirect_uri")
    method = body.get("token_endpoint_auth_method", "client_secret_basic")
    if method not in AUTH_METHODS:
        raise bad(f"token_endpoint_auth_method must be one of {', '.join(AUTH_METHODS)}")
    # RFC 7591's default is authorization_code alone; a client that says nothing gets refresh tokens too
    # (rotated, so harmless for public clients), as Claude and ChatGPT expect to refresh.
    grant_types = body.get("grant_types", list(GRANT_TYPES))
    if not isinstance(grant_types, list) or not all(isinstance(g, str) for g in grant_types):
        raise bad("grant_types must be a list of strings")
    unsupported = [g for g in grant_types if g not in GRANT_TYPES]
    if unsupported or "authorization_code" not in grant_types:
        raise bad(f"grant_types: this server supports {', '.join(GRANT_TYPES)} (authorization_code required)")
    response_types = body.get("response_types", ["code"])
    if response_types != ["code"]:
        raise bad("response_types must be ['code']")
    name = body.get("client_name")
    if name is None:
        name = urlsplit(uris[0]).hostname or "Unnamed application"
    if not isinstance(name, str) or not name.strip() or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise bad("client_name must be a non-empty string without control characters")
    for field in ("client_uri", "logo_uri", "tos_uri", "policy_uri"):
        value = body.get(field)
        if value is not None and (not isinstance(value, str) or not value.startswith("https://")):
            raise bad(f"{field} must be an https URL")
    if "scope" in body and not isinstance(body["scope"], str):
        raise bad("scope must be a space-separated string")
    secret = None if method == "none" else new_secret("mcpbcs_")
    allowed = (
        "client_name",
        "client_uri",
        "logo_uri",
        "tos_uri",
        "policy_uri",
        "contacts",
        "scope",
        "software_id",
        "software_version",
    )
    metadata = {k: body[k] for k in allowed if k in body}

    client = ClientRecord(
        client_id=new_secret("mcpbc_")[:38],
        name=name.strip()[:MAX_NAME_LENGTH],
        redirect_uris=uris,
        secret_hash=hash_secret(secret) if secret else None,
        kind="dcr",
        application_type=application_type,
        token_endpoint_auth_method=method,
        grant_types=list(dict.fromkeys(grant_types)),
        metadata=metadata,
    )
    return client, secret


# ---- headers ----------------------------------------------------------------------------------------

_CORS_PATHS = ("/.well-known/", "/jwks.json", "/token", "/register", "/revoke")


class _SecurityHeaders:
    """Security headers on every answer; CORS for the endpoints browser-based clients call directly.

    Pages set their own CSP (with their form targets); everything else gets a CSP that allows nothing.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        cors = path.startswith(_CORS_PATHS)
        if cors and scope["method"] == "OPTIONS":
            headers = [
                (b"access-control-allow-origin", b"*"),
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", b"authorization, content-type, mcp-protocol-version"),
                (b"access-control-max-age", b"86400"),
                (b"cache-control", b"no-store"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def wrapped(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                defaults = [
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
                    (b"cache-control", b"no-store"),
                ]
                if cors:
                    defaults.append((b"access-control-allow-origin", b"*"))
                headers += [(k, v) for k, v in defaults if k not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, wrapped)

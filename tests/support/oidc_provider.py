"""A small but real OpenID Connect provider for tests (delegated sign-in).

Starlette over HTTPS (uvicorn, trustme certificates) on 127.0.0.1 with discovery, JWKS, ``/authorize``
(no login page: it signs in a chosen test user and redirects straight back with a code), ``/token``
(client_secret_basic and/or client_secret_post, PKCE S256, single-use codes, an ES256 id_token signed
with joserfc) and ``/userinfo``.

Knobs for tests that need a misbehaving provider: :attr:`OidcProvider.id_token_overrides` (claims
to replace, ``None`` deletes one), :attr:`discovery_overrides`, :attr:`sign_with_unpublished_key`
(a bad signature under a published kid), :attr:`sign_with_unknown_kid` (a kid never published),
:meth:`rotate_key` (a new published kid the client has not cached yet),
``email_in_id_token=False`` (the client must ask userinfo). Counters in :attr:`hits` and the client
authentication of each token request in :attr:`token_auth` let tests see what the client did.

Usage::

    ca = LocalCA()
    with OidcProvider(ca, users=[ProviderUser("u1", "alice@example.com", "Alice")]).running() as idp:
        settings = GatewaySettings(oidc_issuer=idp.issuer, oidc_client_id=idp.client_id,
                                   oidc_client_secret=idp.client_secret, ca_bundle=str(ca.pem_path))
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import secrets
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus, urlencode, urlsplit, urlunsplit

from joserfc import jwt
from joserfc.jwk import ECKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from tests.support.tls_server import LocalCA, TlsServer


@dataclass
class ProviderUser:
    """A user the provider signs in; ``extra`` claims go into the id_token and userinfo."""

    sub: str
    email: str | None = None
    name: str | None = None
    email_verified: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def claims(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sub": self.sub, **self.extra}
        if self.email is not None:
            out["email"] = self.email
            out["email_verified"] = self.email_verified
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    code_challenge: str
    nonce: str | None
    scope: str
    user: ProviderUser


def _new_key() -> ECKey:
    kid = secrets.token_hex(8)
    return ECKey.generate_key("P-256", parameters={"kid": kid, "alg": "ES256", "use": "sig"})


def _error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


class OidcProvider:
    """One provider with one client. ``issuer_path`` puts it under a path (``/realms/test``)."""

    def __init__(
        self,
        ca: LocalCA,
        *,
        client_id: str = "mcp-bastion",
        client_secret: str = "provider-secret-" + "x" * 16,
        users: Sequence[ProviderUser] = (ProviderUser("user-1", "alice@example.com", "Alice Example"),),
        redirect_uris: Sequence[str] | None = None,
        auth_methods: Sequence[str] = ("client_secret_basic", "client_secret_post"),
        issuer_path: str = "",
        port: int = 0,
        id_token_seconds: int = 300,
        jwks_max_age: int = 3600,
        email_in_id_token: bool = True,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.users = {u.sub: u for u in users}
        self.current_user = users[0].sub  # who /authorize signs in (unless login_hint names another)
        self.redirect_uris = list(redirect_uris) if redirect_uris is not None else None  # None: any
        self.auth_methods = tuple(auth_methods)
        self.id_token_seconds = id_token_seconds
        self.jwks_max_age = jwks_max_age
        self.email_in_id_token = email_in_id_token
        self.id_token_overrides: dict[str, Any] = {}
        self.discovery_overrides: dict[str, Any] = {}
        self.sign_with_unpublished_key = False  # same kid as the published key: a bad signature
        self.sign_with_unknown_kid = False  # a kid the JWKS never publishes
        self.keys: list[ECKey] = [_new_key()]
        self.hits: Counter[str] = Counter()
        self.token_auth: list[str] = []  # "client_secret_basic" | "client_secret_post" per token request
        self._grants: dict[str, _Grant] = {}
        self._access_tokens: dict[str, ProviderUser] = {}
        self._path = issuer_path.rstrip("/")
        routes = [
            Route("/.well-known/openid-configuration", self._discovery),
            Route("/jwks", self._jwks),
            Route("/authorize", self._authorize),
            Route("/token", self._token, methods=["POST"]),
            Route("/userinfo", self._userinfo, methods=["GET", "POST"]),
        ]
        app = Starlette(routes=[Mount(self._path, routes=routes)] if self._path else routes)
        self.server = TlsServer(app, ca, port=port)
        self.issuer = f"https://127.0.0.1:{self.server.port}{self._path}"

    # ---- control ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self) -> Iterator[OidcProvider]:
        with self.server.running():
            yield self

    def start(self) -> OidcProvider:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def url(self, path: str) -> str:
        return self.issuer + path

    def rotate_key(self, *, keep_old: bool = False) -> str:
        """Sign from now on with a new key (kid); the old one stays published only if ``keep_old``."""
        key = _new_key()
        self.keys = [key, *self.keys] if keep_old else [key]
        return str(key.kid)

    def discovery(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": self.url("/authorize"),
            "token_endpoint": self.url("/token"),
            "jwks_uri": self.url("/jwks"),
            "userinfo_endpoint": self.url("/userinfo"),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": list(self.auth_methods),
            "scopes_supported": ["openid", "email", "profile"],
            "claims_supported": ["sub", "email", "email_verified", "name"],
        }
        doc.update(self.discovery_overrides)
        return doc

    # ---- endpoints -------------------------------------------------------------------------

    async def _discovery(self, request: Request) -> Response:
        self.hits["discovery"] += 1
        return JSONResponse(self.discovery(), headers={"Cache-Control": "max-age=3600"})

    async def _jwks(self, request: Request) -> Response:
        self.hits["jwks"] += 1
        keys = [k.as_dict(private=False) for k in self.keys]
        return JSONResponse({"keys": keys}, headers={"Cache-Control": f"max-age={self.jwks_max_age}"})

    async def _authorize(self, request: Request) -> Response:
        self.hits["authorize"] += 1
        q = request.query_params
        if q.get("client_id") != self.client_id:
            return PlainTextResponse("unknown client_id", status_code=400)
        redirect_uri = q.get("redirect_uri", "")
        if not redirect_uri or (self.redirect_uris is not None and redirect_uri not in self.redirect_uris):
            return PlainTextResponse("redirect_uri is not registered", status_code=400)
        state = q.get("state")

        def back(**params: str) -> Response:
            if state is not None:
                params["state"] = state
            params["iss"] = self.issuer
            parts = urlsplit(redirect_uri)
            query = "&".join(x for x in (parts.query, urlencode(params)) if x)
            return RedirectResponse(urlunsplit(parts._replace(query=query)), status_code=302)

        if q.get("response_type") != "code":
            return back(error="unsupported_response_type")
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return back(error="invalid_request", error_description="PKCE S256 is required")
        scope = q.get("scope", "")
        if "openid" not in scope.split():
            return back(error="invalid_scope", error_description="openid is required")
        user = self.users.get(q.get("login_hint") or self.current_user)
        if user is None:
            return back(error="access_denied", error_description="no such user")
        code = secrets.token_urlsafe(32)
        self._grants[code] = _Grant(
            client_id=self.client_id,
            redirect_uri=redirect_uri,
            code_challenge=q["code_challenge"],
            nonce=q.get("nonce"),
            scope=scope,
            user=user,
        )
        return back(code=code)

    def _client_auth(self, request: Request, form: dict[str, str]) -> str | None:
        """The method the client authenticated with, or None if it did not (correctly)."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                raw = base64.b64decode(header[6:], validate=True).decode()
                client_id, secret = (unquote_plus(x) for x in raw.split(":", 1))
            except ValueError:
                return None
            method = "client_secret_basic"
        elif "client_secret" in form:
            client_id, secret, method = form.get("client_id", ""), form["client_secret"], "client_secret_post"
        else:
            return None
        if method not in self.auth_methods or client_id != self.client_id:
            return None
        if not secrets.compare_digest(secret.encode(), self.client_secret.encode()):
            return None
        return method

    async def _token(self, request: Request) -> Response:
        self.hits["token"] += 1
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        method = self._client_auth(request, form)
        if method is None:
            return _error(401, "invalid_client", "client authentication failed")
        self.token_auth.append(method)
        if form.get("grant_type") != "authorization_code":
            return _error(400, "unsupported_grant_type", "only authorization_code")
        grant = self._grants.pop(form.get("code", ""), None)
        if grant is None:
            return _error(400, "invalid_grant", "unknown or used code")
        if form.get("redirect_uri") != grant.redirect_uri:
            return _error(400, "invalid_grant", "redirect_uri does not match")
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not verifier or not secrets.compare_digest(challenge, grant.code_challenge):
            return _error(400, "invalid_grant", "PKCE verification failed")
        access_token = secrets.token_urlsafe(32)
        self._access_tokens[access_token] = grant.user
        body = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": grant.scope,
            "id_token": self.id_token(grant.user, nonce=grant.nonce),
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def id_token(self, user: ProviderUser, *, nonce: str | None) -> str:
        """An ES256 id_token for ``user``, with :attr:`id_token_overrides` applied."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.client_id,
            "exp": now + self.id_token_seconds,
            "iat": now,
            "auth_time": now,
        }
        user_claims = user.claims()
        if not self.email_in_id_token:
            user_claims.pop("email", None)
            user_claims.pop("email_verified", None)
        claims.update(user_claims)
        if nonce is not None:
            claims["nonce"] = nonce
        for name, value in self.id_token_overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        key = self.keys[0]
        if self.sign_with_unpublished_key:
            key = ECKey.generate_key("P-256", parameters={"kid": str(key.kid), "alg": "ES256"})
        elif self.sign_with_unknown_kid:
            key = _new_key()
        return jwt.encode({"alg": "ES256", "kid": key.kid, "typ": "JWT"}, claims, key)

    async def _userinfo(self, request: Request) -> Response:
        self.hits["userinfo"] += 1
        header = request.headers.get("authorization", "")
        user = self._access_tokens.get(header[7:]) if header.lower().startswith("bearer ") else None
        if user is None:
            return Response(status_code=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return JSONResponse(user.claims())

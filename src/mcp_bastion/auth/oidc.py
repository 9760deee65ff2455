"""Delegated sign-in: the gateway as a client of an upstream OpenID Connect provider.

The operator configures the provider (issuer, client id, secret reference, scopes). We use the
authorization code flow with PKCE S256 and a nonce, authenticate to the token endpoint with the
client secret (basic or post, as the provider supports), and accept the user only from an id_token
verified against the provider's JWKS: signature (asymmetric algorithms only), ``iss``, ``aud``,
``azp``, ``exp``, ``iat`` and ``nonce``.

The provider may live on a private network (it is the operator's choice, not a client's), so unlike
the CIMD fetcher there is no address filtering; TLS trust follows ``ca_bundle``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx
import orjson
import structlog
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ClaimError,
    ExpiredTokenError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet

from ..config import ConfigError, GatewaySettings, is_loopback_host, resolve_secret
from .outbound import OutboundError, cache_lifetime, describe_http_error, read_limited, tls_context

log = structlog.get_logger("mcp_bastion.auth")

HTTP_TIMEOUT_SECONDS = 10.0
MAX_RESPONSE_BYTES = 1024 * 1024
CACHE_DEFAULT_SECONDS = 3600.0
CACHE_MIN_SECONDS = 60.0
CACHE_MAX_SECONDS = 86400.0
CLOCK_LEEWAY_SECONDS = 60
# Only public-key signatures: an HMAC id_token would be keyed by our own client secret, and
# "none" is never acceptable.
ACCEPTED_ALGORITHMS = (
    "ES256",
    "ES384",
    "ES512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "EdDSA",
)


class OidcError(Exception):
    """Delegated sign-in failed; the message says why and carries no secret."""


@dataclass(frozen=True, slots=True)
class OidcUser:
    """The upstream user, from a verified id_token (and userinfo when the token lacks the e-mail).

    ``email`` is None when the provider did not give one or marked it unverified.
    """

    sub: str
    email: str | None
    name: str | None


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """The parts of the provider's discovery document we use."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    token_endpoint_auth_methods: tuple[str, ...]
    id_token_algorithms: tuple[str, ...]


def _check_endpoint(name: str, value: object, *, allow_query: bool = True) -> str:
    """https (http only on loopback, for development), absolute, no fragment or credentials."""
    if not isinstance(value, str) or not value:
        raise OidcError(f"the provider's {name} is missing")
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise OidcError(f"the provider's {name} must be an https URL")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise OidcError(f"the provider's {name} must use https")
    if parts.fragment or "#" in value or "@" in parts.netloc:
        raise OidcError(f"the provider's {name} must not have a fragment or credentials")
    if parts.query and not allow_query:
        raise OidcError(f"the provider's {name} must not have a query")
    return value


class UpstreamOidc:
    """One configured OpenID Connect provider: discovery, the authorization URL, the code exchange."""

    def __init__(self, settings: GatewaySettings, *, timeout: float = HTTP_TIMEOUT_SECONDS) -> None:
        if not settings.oidc_issuer or not settings.oidc_client_id or not settings.oidc_client_secret:
            raise ConfigError("oidc_issuer needs oidc_client_id and oidc_client_secret")
        try:
            self.issuer = _check_endpoint("issuer", settings.oidc_issuer, allow_query=False)
            self._tls = tls_context(settings.ca_bundle)
        except (OidcError, OutboundError) as exc:
            raise ConfigError(f"oidc_issuer: {exc}") from None
        self.client_id = settings.oidc_client_id
        self._secret_ref = settings.oidc_client_secret
        scopes = list(dict.fromkeys(settings.oidc_scopes))
        self.scopes = tuple(scopes if "openid" in scopes else ["openid", *scopes])
        self._timeout = timeout
        self._metadata: ProviderMetadata | None = None
        self._metadata_expires = 0.0
        self._keys: KeySet | None = None
        self._keys_expires = 0.0
        self._lock = asyncio.Lock()

    # ---- discovery -------------------------------------------------------------------------

    async def discover(self) -> ProviderMetadata:
        """The provider's metadata (OIDC Discovery), cached per its caching headers (1 h default)."""
        if self._metadata is not None and self._metadata_expires > time.monotonic():
            return self._metadata
        async with self._lock:
            if self._metadata is not None and self._metadata_expires > time.monotonic():
                return self._metadata
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            document, lifetime = await self._get_json(url, "discovery document")
            self._metadata = self._parse_metadata(document)
            self._metadata_expires = time.monotonic() + lifetime
            log.info("oidc provider discovered", issuer=self.issuer, cache_seconds=lifetime)
            return self._metadata

    def _parse_metadata(self, doc: dict[str, Any]) -> ProviderMetadata:
        if doc.get("issuer") != self.issuer:
            raise OidcError(
                f"the discovery document names issuer {doc.get('issuer')!r},"
                f" not the configured {self.issuer!r}"
            )
        challenge_methods = doc.get("code_challenge_methods_supported")
        if isinstance(challenge_methods, list) and "S256" not in challenge_methods:
            raise OidcError("the provider does not support PKCE S256")
        response_types = doc.get("response_types_supported")
        if isinstance(response_types, list) and "code" not in response_types:
            raise OidcError("the provider does not support the authorization code flow")
        auth_methods = _string_list(doc.get("token_endpoint_auth_methods_supported"), ["client_secret_basic"])
        if not {"client_secret_basic", "client_secret_post"} & set(auth_methods):
            raise OidcError("the provider supports neither client_secret_basic nor client_secret_post")
        algorithms = tuple(
            a
            for a in _string_list(doc.get("id_token_signing_alg_values_supported"), ["RS256"])
            if a in ACCEPTED_ALGORITHMS
        )
        if not algorithms:
            raise OidcError("the provider signs id_tokens with no algorithm we accept (public-key ones only)")
        userinfo = doc.get("userinfo_endpoint")
        return ProviderMetadata(
            issuer=self.issuer,
            authorization_endpoint=_check_endpoint(
                "authorization_endpoint", doc.get("authorization_endpoint")
            ),
            token_endpoint=_check_endpoint("token_endpoint", doc.get("token_endpoint")),
            jwks_uri=_check_endpoint("jwks_uri", doc.get("jwks_uri")),
            userinfo_endpoint=_check_endpoint("userinfo_endpoint", userinfo) if userinfo else None,
            token_endpoint_auth_methods=tuple(auth_methods),
            id_token_algorithms=algorithms,
        )

    # ---- authorization request -------------------------------------------------------------

    def authorization_url(self, state: str, nonce: str, redirect_uri: str, code_challenge: str) -> str:
        """Where to send the browser; needs :meth:`discover` to have succeeded once."""
        if self._metadata is None:
            raise OidcError("the provider has not been discovered yet")
        parts = urlsplit(self._metadata.authorization_endpoint)
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(self.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
        query = [(k, v) for k, v in query if k not in ours] + list(ours.items())
        return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))

    # ---- code exchange ---------------------------------------------------------------------

    async def exchange(self, code: str, redirect_uri: str, code_verifier: str, nonce: str) -> OidcUser:
        """Redeem the code, verify the id_token, and return who signed in."""
        meta = await self.discover()
        try:
            secret = resolve_secret(self._secret_ref)
        except ConfigError as exc:
            raise OidcError(f"oidc_client_secret: {exc}") from None
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        auth: httpx.BasicAuth | None = None
        if "client_secret_basic" in meta.token_endpoint_auth_methods:
            # RFC 6749 §2.3.1: the id and secret are form-encoded before they go into Basic.
            auth = httpx.BasicAuth(quote(self.client_id, safe=""), quote(secret, safe=""))
        else:
            form |= {"client_id": self.client_id, "client_secret": secret}
        response = await self._post_form(meta.token_endpoint, form, auth)
        id_token = response.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise OidcError("the provider returned no id_token (is the 'openid' scope granted?)")
        claims = await self._verify_id_token(id_token, meta, nonce)
        email, name = _email(claims), _display_name(claims)
        access_token = response.get("access_token")
        if (
            email is None
            and "email" in self.scopes
            and "email" not in claims
            and meta.userinfo_endpoint
            and isinstance(access_token, str)
            and str(response.get("token_type", "")).lower() == "bearer"
        ):
            info = await self._userinfo(meta.userinfo_endpoint, access_token)
            if info.get("sub") != claims["sub"]:
                raise OidcError("the userinfo response is about another subject")
            email, name = _email(info), name or _display_name(info)
        log.info("oidc sign-in verified", issuer=self.issuer, sub=claims["sub"])
        return OidcUser(sub=claims["sub"], email=email, name=name)

    async def _verify_id_token(self, id_token: str, meta: ProviderMetadata, nonce: str) -> dict[str, Any]:
        keys = await self._jwks(meta, refresh=False)
        try:
            try:
                token = jwt.decode(id_token, keys, algorithms=list(meta.id_token_algorithms))
            except InvalidKeyIdError:
                # The provider may have rotated its keys since we cached them: refetch once.
                keys = await self._jwks(meta, refresh=True)
                token = jwt.decode(id_token, keys, algorithms=list(meta.id_token_algorithms))
        except InvalidKeyIdError:
            raise OidcError("the id_token is signed with a key the provider does not publish") from None
        except BadSignatureError:
            raise OidcError("the id_token signature is invalid") from None
        except JoseError as exc:
            raise OidcError(f"the id_token cannot be decoded: {exc.description or exc.error}") from None
        claims = token.claims
        registry = jwt.JWTClaimsRegistry(
            leeway=CLOCK_LEEWAY_SECONDS,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.client_id},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise OidcError("the id_token has expired") from None
        except MissingClaimError as exc:
            raise OidcError(f"the id_token lacks the claim(s) {exc.claim}") from None
        except ClaimError as exc:
            raise OidcError(
                _CLAIM_ERRORS.get(exc.claim, f"the id_token claim {exc.claim} is invalid")
            ) from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        azp = claims.get("azp")
        if (len(audiences) > 1 or azp is not None) and azp != self.client_id:
            raise OidcError("the id_token was issued to another party (azp)")
        return claims

    async def _jwks(self, meta: ProviderMetadata, *, refresh: bool) -> KeySet:
        if not refresh and self._keys is not None and self._keys_expires > time.monotonic():
            return self._keys
        document, lifetime = await self._get_json(meta.jwks_uri, "JWKS")
        raw_keys = document.get("keys")
        if not isinstance(raw_keys, list):
            raise OidcError("the provider's JWKS has no keys list")
        usable = [
            k
            for k in raw_keys
            if isinstance(k, dict) and k.get("use", "sig") == "sig" and k.get("kty") in ("RSA", "EC", "OKP")
        ]
        if not usable:
            raise OidcError("the provider's JWKS has no signing keys")
        try:
            keys = KeySet.import_key_set({"keys": usable})
        except (JoseError, ValueError, TypeError) as exc:
            raise OidcError(f"the provider's JWKS cannot be read: {exc}") from None
        self._keys, self._keys_expires = keys, time.monotonic() + lifetime
        return keys

    async def _userinfo(self, url: str, access_token: str) -> dict[str, Any]:
        status, _headers, body = await self._request(
            "GET", url, "userinfo endpoint", headers={"Authorization": f"Bearer {access_token}"}
        )
        if status != 200:
            raise OidcError(f"the provider's userinfo endpoint answered HTTP {status}")
        return _json_object(body, "userinfo response")

    # ---- HTTP ------------------------------------------------------------------------------

    async def _request(
        self, method: str, url: str, what: str, **kwargs: Any
    ) -> tuple[int, httpx.Headers, bytes]:
        """One request, redirects not followed, the body capped at MAX_RESPONSE_BYTES."""
        async with httpx.AsyncClient(
            verify=self._tls,
            follow_redirects=False,
            timeout=httpx.Timeout(self._timeout),
            headers={"Accept": "application/json", "User-Agent": "mcp-bastion (openid connect client)"},
        ) as client:
            try:
                async with client.stream(method, url, **kwargs) as resp:
                    body = await read_limited(resp, MAX_RESPONSE_BYTES)
                    return resp.status_code, resp.headers, body
            except OutboundError as exc:
                raise OidcError(f"the provider's {what}: {exc}") from None
            except httpx.HTTPError as exc:
                raise OidcError(f"the provider's {what} ({url}) failed: {describe_http_error(exc)}") from None

    async def _get_json(self, url: str, what: str) -> tuple[dict[str, Any], float]:
        status, headers, body = await self._request("GET", url, what)
        if status != 200:
            raise OidcError(f"the provider's {what} answered HTTP {status} ({url})")
        lifetime = cache_lifetime(
            headers, default=CACHE_DEFAULT_SECONDS, minimum=CACHE_MIN_SECONDS, maximum=CACHE_MAX_SECONDS
        )
        return _json_object(body, what), lifetime

    async def _post_form(
        self, url: str, form: dict[str, str], auth: httpx.BasicAuth | None
    ) -> dict[str, Any]:
        status, _headers, body = await self._request("POST", url, "token endpoint", data=form, auth=auth)
        if status != 200:
            detail = ""
            try:
                error = orjson.loads(body)
            except orjson.JSONDecodeError:
                error = None
            if isinstance(error, dict) and isinstance(error.get("error"), str):
                detail = f": {error['error'][:100]}"
                if isinstance(error.get("error_description"), str):
                    detail += f" ({error['error_description'][:200]})"
            raise OidcError(f"the provider refused the code exchange (HTTP {status}){detail}")
        return _json_object(body, "token response")


_CLAIM_ERRORS = {
    "iss": "the id_token was issued by another issuer",
    "aud": "the id_token is not meant for this client (aud)",
    "nonce": "the id_token nonce does not match this sign-in",
    "iat": "the id_token was issued in the future",
    "nbf": "the id_token is not valid yet",
    "sub": "the id_token has no valid subject",
}


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise OidcError(f"the provider's {what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise OidcError(f"the provider's {what} is not a JSON object")
    return value


def _string_list(value: object, default: list[str]) -> list[str]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return default


def _email(claims: dict[str, Any]) -> str | None:
    """The e-mail, unless the provider says it is unverified (it would let anyone claim any address)."""
    email = claims.get("email")
    if not isinstance(email, str) or not email:
        return None
    if claims.get("email_verified") in (False, "false"):
        return None
    return email


def _display_name(claims: dict[str, Any]) -> str | None:
    for key in ("name", "preferred_username"):
        value = claims.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None

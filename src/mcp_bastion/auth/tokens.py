"""Signing keys, access tokens and id tokens.

Access tokens are short-lived ES256 JWTs (RFC 9068 ``at+jwt``) so the resource server can check them
without a database round trip on every request; revocation (RFC 7009 and refresh-token reuse) is
still honoured through a short re-check interval of the verification cache. Keys live in the store so
every gateway process sharing a database signs with, and accepts, the same keys.
"""

from __future__ import annotations

import hashlib
import secrets as _random
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from .secrets import hash_secret, new_secret

if TYPE_CHECKING:
    from ..config import GatewaySettings
    from .store import Store

__all__ = ["KeyRing", "hash_secret", "issuer_of", "new_secret"]

log = structlog.get_logger("mcp_bastion.auth")

ALG = "ES256"
ACCESS_TOKEN_TYPE = "at+jwt"
# Clock skew tolerated on exp/nbf/iat between gateway replicas sharing a store (NTP keeps them within
# a second or two); small, because a token is then accepted that long past its ``expires_in``.
LEEWAY_SECONDS = 5
# Verified tokens kept in memory; beyond this the least recently used are dropped.
CACHE_MAX_ENTRIES = 10_000
# A cached token is re-checked against the revocation tables this often, so a revocation made by
# another process sharing the database takes effect within seconds (same-process ones: at once).
RECHECK_SECONDS = 5.0
# Unknown ``kid``s make the ring re-read the store (another process may have rotated), at most this often.
RELOAD_MIN_SECONDS = 10.0


def issuer_of(settings: GatewaySettings) -> str:
    """The issuer and base of every canonical resource URI: ``public_url``, else the loopback listener."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


@dataclass
class _Key:
    kid: str
    key: ECKey
    created_at: datetime
    retired_at: datetime | None


@dataclass
class _Cached:
    claims: dict[str, Any]
    checked_at: float


def _new_key() -> tuple[str, ECKey, str]:
    key = ECKey.generate_key("P-256", private=True)
    kid = key.thumbprint()
    pem = key.as_pem(private=True).decode()
    return kid, key, pem


def _import(kid: str, pem: str) -> ECKey:
    return ECKey.import_key(pem, {"kid": kid, "use": "sig", "alg": ALG})


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


class KeyRing:
    """The gateway's ES256 signing keys: one current key, plus retired keys still published and accepted
    for one access-token lifetime so tokens signed just before a rotation stay valid."""

    def __init__(
        self,
        store: Store,
        rotation_days: float,
        *,
        issuer: str,
        access_token_seconds: int = 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.rotation = timedelta(days=rotation_days)
        self.issuer = issuer
        self.grace = timedelta(seconds=access_token_seconds + LEEWAY_SECONDS)
        self._clock = clock
        self._keys: dict[str, _Key] = {}
        self._current: _Key | None = None
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._loaded_at = 0.0

    @classmethod
    def for_settings(cls, settings: GatewaySettings, store: Store) -> KeyRing:
        return cls(
            store,
            settings.signing_key_rotation_days,
            issuer=issuer_of(settings),
            access_token_seconds=settings.access_token_seconds,
        )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    # ---- keys -------------------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the keys from the store; create the first key, or rotate one that is too old."""
        await self.maybe_rotate()

    async def _read(self) -> None:
        now = self._now()
        keys: dict[str, _Key] = {}
        for rec in await self.store.signing_keys():
            retired = _aware(rec.retired_at) if rec.retired_at else None
            if retired is not None and now - retired > self.grace:
                continue
            keys[rec.kid] = _Key(rec.kid, _import(rec.kid, rec.private_pem), _aware(rec.created_at), retired)
        self._keys = keys
        active = [k for k in keys.values() if k.retired_at is None]
        self._current = max(active, key=lambda k: k.created_at) if active else None
        self._loaded_at = self._clock()

    async def maybe_rotate(self) -> bool:
        """Start a new key when the current one is older than the rotation period; True if rotated.

        Re-reads the store first, so processes sharing a database converge on the newest key and
        drop keys retired by the others."""
        await self._read()
        now = self._now()
        current = self._current
        if current is not None and now - current.created_at < self.rotation:
            return False
        kid, key, pem = _new_key()
        await self.store.add_signing_key(kid, pem, created_at=now)
        retired = [k.kid for k in self._keys.values() if k.retired_at is None]
        for old in retired:
            await self.store.retire_signing_key(old)
        await self._read()
        if kid not in self._keys:  # clock or storage disagreement: still never sign with nothing
            self._keys[kid] = _Key(kid, key, now, None)
            self._current = self._keys[kid]
        log.info("signing_key_rotated", kid=kid, retired=retired)
        return True

    def current(self) -> ECKey:
        if self._current is None:
            raise RuntimeError("KeyRing.load() has not been awaited")
        return self._current.key

    def jwks(self) -> dict[str, Any]:
        """Public keys of the current key and of keys retired less than a token lifetime ago."""
        keys = []
        for k in sorted(self._keys.values(), key=lambda k: k.created_at, reverse=True):
            public = k.key.as_dict(private=False)
            public.update({"kid": k.kid, "use": "sig", "alg": ALG})
            keys.append(public)
        return {"keys": keys}

    # ---- minting ----------------------------------------------------------------------------------

    def _sign(self, claims: Mapping[str, Any], typ: str) -> str:
        if self._current is None:
            raise RuntimeError("KeyRing.load() has not been awaited")
        header = {"alg": ALG, "kid": self._current.kid, "typ": typ}
        return jwt.encode(header, dict(claims), self._current.key, algorithms=[ALG])

    def mint_access_token(
        self,
        *,
        subject: str,
        name: str,
        client_id: str,
        audience: str,
        scope: str,
        family_id: str,
        ttl: int,
        servers: Collection[str] | None = None,
    ) -> str:
        """An access token for one resource (``aud``), bound to its grant family (``fam``) so revoking
        the family (code replay, refresh reuse, RFC 7009) revokes it too."""
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "exp": now + ttl,
            "iat": now,
            "nbf": now,
            "jti": _random.token_urlsafe(16),
            "scope": scope,
            "client_id": client_id,
            "fam": family_id,
            "name": name,
        }
        if servers is not None:
            claims["servers"] = sorted(servers)
        return self._sign(claims, ACCESS_TOKEN_TYPE)

    def mint_id_token(
        self,
        *,
        subject: str,
        client_id: str,
        auth_time: int,
        ttl: int,
        nonce: str | None = None,
        email: str | None = None,
        name: str | None = None,
    ) -> str:
        """An OpenID Connect id token (audience: the client), so the gateway can be an OIDC provider."""
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": client_id,
            "azp": client_id,
            "exp": now + ttl,
            "iat": now,
            "auth_time": auth_time,
        }
        if nonce:
            claims["nonce"] = nonce
        if email:
            claims["email"] = email
        if name:
            claims["name"] = name
        return self._sign(claims, "JWT")

    # ---- verification -----------------------------------------------------------------------------

    async def verify_access_token(self, token: str, audiences: Collection[str]) -> dict[str, Any] | None:
        """The claims of a valid, unrevoked access token whose ``aud`` is one of ``audiences``; else None.

        Signature and claims are verified once and cached until ``exp``; revocation is re-checked
        every few seconds.
        """
        now = self._clock()
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            claims = cached.claims
            if claims["exp"] + LEEWAY_SECONDS <= now:
                del self._cache[digest]
                return None
            self._cache.move_to_end(digest)
            if now - cached.checked_at >= RECHECK_SECONDS:
                if await self._revoked(claims):
                    del self._cache[digest]
                    return None
                cached.checked_at = now
            return claims if _audience_ok(claims, audiences) else None
        verified = await self._verify(token, now)
        if verified is None or await self._revoked(verified):
            return None
        self._cache[digest] = _Cached(verified, now)
        while len(self._cache) > CACHE_MAX_ENTRIES:
            self._cache.popitem(last=False)
        return verified if _audience_ok(verified, audiences) else None

    async def _verify(self, token: str, now: float) -> dict[str, Any] | None:
        try:
            header = jws.extract_compact(token.encode()).headers()
        except (JoseError, ValueError, UnicodeError):
            return None
        kid = header.get("kid")
        if header.get("alg") != ALG or header.get("typ") != ACCESS_TOKEN_TYPE or not isinstance(kid, str):
            return None
        key = self._keys.get(kid)
        if key is None and now - self._loaded_at >= RELOAD_MIN_SECONDS:
            await self._read()  # another process may have rotated
            key = self._keys.get(kid)
        if key is None:
            return None
        try:
            decoded = jwt.decode(token, key.key, algorithms=[ALG])
            registry = jwt.JWTClaimsRegistry(
                now=int(now),
                leeway=LEEWAY_SECONDS,
                iss={"essential": True, "value": self.issuer},
                sub={"essential": True},
                aud={"essential": True},
                exp={"essential": True},
                jti={"essential": True},
                fam={"essential": True},
            )
            registry.validate(decoded.claims)
        except (JoseError, ValueError):
            return None
        claims = dict(decoded.claims)
        if not isinstance(claims["aud"], str) or not isinstance(claims.get("scope", ""), str):
            return None
        return claims

    async def _revoked(self, claims: Mapping[str, Any]) -> bool:
        return bool(
            await self.store.access_token_revoked(claims["jti"])
            or await self.store.family_revoked(claims["fam"])
        )

    def forget(self, *, jti: str | None = None, family_id: str | None = None) -> None:
        """Drop cached verifications after a revocation made in this process, so it applies at once."""
        for digest, entry in list(self._cache.items()):
            if (jti is not None and entry.claims.get("jti") == jti) or (
                family_id is not None and entry.claims.get("fam") == family_id
            ):
                del self._cache[digest]

    async def revoke_access_token(self, claims: Mapping[str, Any]) -> None:
        """Revoke one access token (RFC 7009) until it would have expired anyway."""
        expires = datetime.fromtimestamp(int(claims["exp"]) + LEEWAY_SECONDS, UTC)
        await self.store.revoke_access_token(str(claims["jti"]), expires)
        self.forget(jti=str(claims["jti"]))

    async def revoke_family(self, family_id: str) -> None:
        """Revoke a grant: its refresh tokens and every access token minted from it."""
        await self.store.revoke_family(family_id)
        self.forget(family_id=family_id)


def _audience_ok(claims: Mapping[str, Any], audiences: Collection[str]) -> bool:
    return claims.get("aud") in audiences


def new_family_id() -> str:
    """A grant family: one authorization and every token refreshed from it."""
    return new_secret("fam")

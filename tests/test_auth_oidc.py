"""Delegated sign-in against a real OpenID Connect provider over HTTPS (tests/support/oidc_provider.py)."""

from __future__ import annotations

import base64
import hashlib
import secrets
import ssl
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from mcp_bastion.auth.oidc import OidcError, OidcUser, UpstreamOidc
from mcp_bastion.config import ConfigError, GatewaySettings
from tests.support.oidc_provider import OidcProvider, ProviderUser
from tests.support.tls_server import LocalCA

# Where the gateway would receive the browser; never contacted (the test reads the Location header).
CALLBACK = "http://127.0.0.1:8080/oauth/callback"

ALICE = ProviderUser("user-alice", "alice@example.com", "Alice Example")
BOB = ProviderUser("user-bob", "bob@example.com", "Bob", email_verified=False)
CAROL = ProviderUser("user-carol", None, None, extra={"preferred_username": "carol"})


@pytest.fixture(scope="module")
def ca() -> Iterator[LocalCA]:
    authority = LocalCA()
    yield authority
    authority.close()


@pytest.fixture
def idp(ca: LocalCA) -> Iterator[OidcProvider]:
    with OidcProvider(ca, users=[ALICE, BOB, CAROL], redirect_uris=[CALLBACK]).running() as provider:
        yield provider


def settings_for(idp: OidcProvider, ca: LocalCA, tmp_path: Path, **changes: Any) -> GatewaySettings:
    secret_file = tmp_path / "oidc-secret"
    secret_file.write_text(idp.client_secret + "\n")
    base = GatewaySettings(
        oidc_issuer=idp.issuer,
        oidc_client_id=idp.client_id,
        oidc_client_secret=f"file:{secret_file}",
        ca_bundle=str(ca.pem_path),
    )
    return replace(base, **changes)


@pytest.fixture
def oidc(idp: OidcProvider, ca: LocalCA, tmp_path: Path) -> UpstreamOidc:
    return UpstreamOidc(settings_for(idp, ca, tmp_path))


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


async def authorize(
    oidc: UpstreamOidc, ca: LocalCA, *, nonce: str, login_hint: str | None = None
) -> tuple[str, str]:
    """Act as the browser: follow the authorization URL to the provider, return (code, verifier)."""
    await oidc.discover()
    verifier, challenge = pkce()
    url = oidc.authorization_url("state-1", nonce, CALLBACK, challenge)
    if login_hint:
        url += f"&login_hint={login_hint}"
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca.pem_path))) as browser:
        response = await browser.get(url)
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(CALLBACK + "?")
    params = parse_qs(urlsplit(location).query)
    assert params["state"] == ["state-1"]
    return params["code"][0], verifier


async def sign_in(oidc: UpstreamOidc, ca: LocalCA, *, login_hint: str | None = None) -> OidcUser:
    nonce = secrets.token_urlsafe(16)
    code, verifier = await authorize(oidc, ca, nonce=nonce, login_hint=login_hint)
    return await oidc.exchange(code, CALLBACK, verifier, nonce)


# ---- discovery ----------------------------------------------------------------------------


async def test_discovery_is_read_and_cached(oidc: UpstreamOidc, idp: OidcProvider) -> None:
    meta = await oidc.discover()
    assert meta.issuer == idp.issuer
    assert meta.token_endpoint == idp.url("/token")
    assert meta.jwks_uri == idp.url("/jwks")
    assert meta.id_token_algorithms == ("ES256",)
    assert await oidc.discover() is meta
    assert idp.hits["discovery"] == 1


async def test_issuer_with_a_path(ca: LocalCA, tmp_path: Path) -> None:
    with OidcProvider(ca, issuer_path="/realms/test").running() as provider:
        oidc = UpstreamOidc(settings_for(provider, ca, tmp_path))
        assert (await oidc.discover()).authorization_endpoint == provider.issuer + "/authorize"
        user = await sign_in(oidc, ca)
        assert user.sub == "user-1"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"issuer": "https://127.0.0.1:1/other"}, "not the configured"),
        ({"code_challenge_methods_supported": ["plain"]}, "PKCE S256"),
        ({"id_token_signing_alg_values_supported": ["HS256", "none"]}, "no algorithm we accept"),
        ({"token_endpoint_auth_methods_supported": ["private_key_jwt"]}, "neither client_secret_basic"),
        ({"authorization_endpoint": "http://idp.example/authorize"}, "must use https"),
        ({"token_endpoint": None}, "token_endpoint is missing"),
    ],
)
async def test_discovery_refusals(
    oidc: UpstreamOidc, idp: OidcProvider, overrides: dict[str, Any], reason: str
) -> None:
    idp.discovery_overrides = overrides
    with pytest.raises(OidcError, match=reason):
        await oidc.discover()


async def test_issuer_trailing_slash_must_match_exactly(
    idp: OidcProvider, ca: LocalCA, tmp_path: Path
) -> None:
    oidc = UpstreamOidc(settings_for(idp, ca, tmp_path, oidc_issuer=idp.issuer + "/"))
    with pytest.raises(OidcError, match="not the configured"):
        await oidc.discover()


async def test_untrusted_certificate(idp: OidcProvider, ca: LocalCA, tmp_path: Path) -> None:
    oidc = UpstreamOidc(settings_for(idp, ca, tmp_path, ca_bundle=""))
    with pytest.raises(OidcError, match="not trusted"):
        await oidc.discover()


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        UpstreamOidc(GatewaySettings(oidc_issuer="https://idp.example"))
    with pytest.raises(ConfigError, match="https"):
        UpstreamOidc(
            GatewaySettings(oidc_issuer="http://idp.example", oidc_client_id="c", oidc_client_secret="s")
        )
    with pytest.raises(ConfigError, match="ca_bundle"):
        UpstreamOidc(
            GatewaySettings(
                oidc_issuer="https://idp.example",
                oidc_client_id="c",
                oidc_client_secret="s",
                ca_bundle=str(tmp_path / "missing.pem"),
            )
        )


# ---- authorization URL --------------------------------------------------------------------


async def test_authorization_url(oidc: UpstreamOidc, idp: OidcProvider) -> None:
    with pytest.raises(OidcError, match="not been discovered"):
        oidc.authorization_url("s", "n", CALLBACK, "c")
    idp.discovery_overrides = {"authorization_endpoint": idp.url("/authorize?tenant=t1&scope=ignored")}
    await oidc.discover()
    url = oidc.authorization_url("the-state", "the-nonce", CALLBACK, "the-challenge")
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == idp.url("/authorize")
    params = parse_qs(parts.query)
    assert params == {
        "tenant": ["t1"],
        "response_type": ["code"],
        "client_id": [idp.client_id],
        "redirect_uri": [CALLBACK],
        "scope": ["openid email profile"],
        "state": ["the-state"],
        "nonce": ["the-nonce"],
        "code_challenge": ["the-challenge"],
        "code_challenge_method": ["S256"],
    }


async def test_openid_scope_is_always_requested(idp: OidcProvider, ca: LocalCA, tmp_path: Path) -> None:
    oidc = UpstreamOidc(settings_for(idp, ca, tmp_path, oidc_scopes=("email",)))
    await oidc.discover()
    assert parse_qs(urlsplit(oidc.authorization_url("s", "n", CALLBACK, "c")).query)["scope"] == [
        "openid email"
    ]


# ---- exchange -----------------------------------------------------------------------------


async def test_exchange_with_client_secret_basic(oidc: UpstreamOidc, idp: OidcProvider, ca: LocalCA) -> None:
    user = await sign_in(oidc, ca)
    assert user == OidcUser(sub="user-alice", email="alice@example.com", name="Alice Example")
    assert idp.token_auth == ["client_secret_basic"]


async def test_exchange_with_client_secret_post(ca: LocalCA, tmp_path: Path) -> None:
    with OidcProvider(ca, auth_methods=("client_secret_post",)).running() as provider:
        user = await sign_in(UpstreamOidc(settings_for(provider, ca, tmp_path)), ca)
        assert user.sub == "user-1"
        assert provider.token_auth == ["client_secret_post"]


async def test_secret_with_reserved_characters_survives_basic(ca: LocalCA, tmp_path: Path) -> None:
    with OidcProvider(ca, client_id="id:with space", client_secret="s3cr:t+/= %").running() as provider:
        user = await sign_in(UpstreamOidc(settings_for(provider, ca, tmp_path)), ca)
        assert user.sub == "user-1"
        assert provider.token_auth == ["client_secret_basic"]


async def test_unverified_email_is_dropped(oidc: UpstreamOidc, ca: LocalCA) -> None:
    user = await sign_in(oidc, ca, login_hint=BOB.sub)
    assert user == OidcUser(sub="user-bob", email=None, name="Bob")


async def test_name_falls_back_to_preferred_username(oidc: UpstreamOidc, ca: LocalCA) -> None:
    user = await sign_in(oidc, ca, login_hint=CAROL.sub)
    assert user == OidcUser(sub="user-carol", email=None, name="carol")


async def test_email_from_userinfo_when_the_id_token_lacks_it(ca: LocalCA, tmp_path: Path) -> None:
    with OidcProvider(ca, email_in_id_token=False).running() as provider:
        user = await sign_in(UpstreamOidc(settings_for(provider, ca, tmp_path)), ca)
        assert user.email == "alice@example.com"
        assert provider.hits["userinfo"] == 1


async def test_wrong_client_secret(idp: OidcProvider, ca: LocalCA, tmp_path: Path) -> None:
    oidc = UpstreamOidc(settings_for(idp, ca, tmp_path))
    (tmp_path / "oidc-secret").write_text("not-the-secret")
    with pytest.raises(OidcError, match="invalid_client"):
        await sign_in(oidc, ca)


async def test_unresolvable_secret_reference(idp: OidcProvider, ca: LocalCA, tmp_path: Path) -> None:
    oidc = UpstreamOidc(settings_for(idp, ca, tmp_path, oidc_client_secret="env:MCPB_TEST_NO_SUCH_VARIABLE"))
    with pytest.raises(OidcError, match="MCPB_TEST_NO_SUCH_VARIABLE"):
        await sign_in(oidc, ca)


async def test_code_is_single_use(oidc: UpstreamOidc, ca: LocalCA) -> None:
    code, verifier = await authorize(oidc, ca, nonce="n1")
    await oidc.exchange(code, CALLBACK, verifier, "n1")
    with pytest.raises(OidcError, match="invalid_grant"):
        await oidc.exchange(code, CALLBACK, verifier, "n1")


async def test_wrong_verifier(oidc: UpstreamOidc, ca: LocalCA) -> None:
    code, _verifier = await authorize(oidc, ca, nonce="n1")
    with pytest.raises(OidcError, match="invalid_grant"):
        await oidc.exchange(code, CALLBACK, pkce()[0], "n1")


# ---- id_token checks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"iss": "https://127.0.0.1:1/evil"}, "another issuer"),
        ({"aud": "someone-else"}, r"not meant for this client \(aud\)"),
        ({"aud": ["someone-else", "another"]}, r"not meant for this client \(aud\)"),
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"iat": int(time.time()) + 3600}, "issued in the future"),
        ({"nonce": "replayed-nonce"}, "nonce does not match"),
        ({"nonce": None}, "lacks the claim"),
        ({"sub": None}, "lacks the claim"),
        ({"exp": None}, "lacks the claim"),
    ],
)
async def test_id_token_claims_are_checked(
    oidc: UpstreamOidc, idp: OidcProvider, ca: LocalCA, overrides: dict[str, Any], reason: str
) -> None:
    idp.id_token_overrides = overrides
    with pytest.raises(OidcError, match=reason):
        await sign_in(oidc, ca)


async def test_several_audiences_need_azp(oidc: UpstreamOidc, idp: OidcProvider, ca: LocalCA) -> None:
    idp.id_token_overrides = {"aud": [idp.client_id, "another-api"]}
    with pytest.raises(OidcError, match="azp"):
        await sign_in(oidc, ca)
    idp.id_token_overrides = {"aud": [idp.client_id, "another-api"], "azp": "another-api"}
    with pytest.raises(OidcError, match="azp"):
        await sign_in(oidc, ca)
    idp.id_token_overrides = {"aud": [idp.client_id, "another-api"], "azp": idp.client_id}
    assert (await sign_in(oidc, ca)).sub == "user-alice"


async def test_bad_signature(oidc: UpstreamOidc, idp: OidcProvider, ca: LocalCA) -> None:
    idp.sign_with_unpublished_key = True
    with pytest.raises(OidcError, match="signature is invalid"):
        await sign_in(oidc, ca)


async def test_unknown_kid_refetches_the_jwks_once(
    oidc: UpstreamOidc, idp: OidcProvider, ca: LocalCA
) -> None:
    assert (await sign_in(oidc, ca)).sub == "user-alice"
    assert idp.hits["jwks"] == 1
    idp.rotate_key()
    assert (await sign_in(oidc, ca)).sub == "user-alice"  # new kid: the cached JWKS lacks it
    assert idp.hits["jwks"] == 2
    assert (await sign_in(oidc, ca)).sub == "user-alice"  # the refetched JWKS is cached again
    assert idp.hits["jwks"] == 2


async def test_kid_missing_even_after_refetch(oidc: UpstreamOidc, idp: OidcProvider, ca: LocalCA) -> None:
    await sign_in(oidc, ca)
    idp.sign_with_unknown_kid = True
    with pytest.raises(OidcError, match="does not publish"):
        await sign_in(oidc, ca)
    assert idp.hits["jwks"] == 2  # refetched exactly once


async def test_token_endpoint_error_is_reported(oidc: UpstreamOidc, idp: OidcProvider, ca: LocalCA) -> None:
    idp.discovery_overrides = {"token_endpoint": idp.url("/userinfo")}  # answers 401: not a token endpoint
    with pytest.raises(OidcError, match="refused the code exchange"):
        await sign_in(oidc, ca)

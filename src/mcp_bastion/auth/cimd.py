"""Client ID Metadata Documents (draft-ietf-oauth-client-id-metadata-document; MCP client registration).

A client may use an https URL as its ``client_id``; the document at that URL is its registration.
Anyone can make us fetch any URL this way, so the fetch is an SSRF surface and is fenced in:

- the URL must be ``https://`` with a path, without fragment, credentials or dot segments;
- the host is resolved once and every address must be public (not private, loopback, link-local,
  multicast, reserved, unique-local, or one of those embedded in IPv6) unless the host is listed in
  ``fetch_allowed_hosts``; the connection goes to that checked address (SNI and Host stay the name),
  so a second DNS answer cannot steer it elsewhere;
- no redirects, a 5 s deadline for the whole fetch, a 64 KiB body cap, JSON only;
- the document's ``client_id`` must equal the URL exactly.

Valid documents are cached per their caching headers (60 s to 24 h, 5 min by default) in a
bounded LRU; concurrent fetches of one URL share a single request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import httpx
import orjson
import structlog

from ..config import ConfigError, GatewaySettings, is_loopback_host
from .outbound import (
    OutboundError,
    cache_lifetime,
    describe_http_error,
    is_json_content_type,
    read_limited,
    tls_context,
)
from .store import ClientRecord

log = structlog.get_logger("mcp_bastion.auth")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

FETCH_TIMEOUT_SECONDS = 5.0
MAX_DOCUMENT_BYTES = 64 * 1024
MAX_URL_LENGTH = 2048
CACHE_DEFAULT_SECONDS = 300.0
CACHE_MIN_SECONDS = 60.0
CACHE_MAX_SECONDS = 86400.0
CACHE_ENTRIES = 1024
MAX_REDIRECT_URIS = 32
MAX_NAME_LENGTH = 200
DEFAULT_GRANT_TYPES = ("authorization_code", "refresh_token")

# Schemes a browser must never be sent to as an OAuth redirect (script execution, local files).
_FORBIDDEN_REDIRECT_SCHEMES = frozenset({"javascript", "data", "file", "vbscript", "about", "blob"})
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class CimdError(Exception):
    """The client ID URL or its document cannot be used; the message says why (safe to show)."""


@dataclass(frozen=True, slots=True)
class ClientIdUrl:
    """A client ID URL that passed the syntax rules, split into what the fetch needs."""

    url: str
    host: str  # lowercase, IPv6 without brackets
    port: int
    netloc: str  # for the Host header
    ip: IPAddress | None  # set when the host is an IP literal


def parse_client_id_url(value: object) -> ClientIdUrl:
    """Check a client ID URL's syntax (draft §3); raise :class:`CimdError` naming the broken rule."""
    if not isinstance(value, str) or not value:
        raise CimdError("client_id must be an https URL")
    if len(value) > MAX_URL_LENGTH:
        raise CimdError(f"client_id URL is longer than {MAX_URL_LENGTH} characters")
    if not _URI_CHARS.fullmatch(value) or _BAD_PERCENT.search(value):
        raise CimdError("client_id URL contains characters not allowed in a URL")
    if not value.startswith("https://"):
        raise CimdError("client_id URL must use the https scheme")
    if "#" in value:
        raise CimdError("client_id URL must not have a fragment")
    try:
        parts = urlsplit(value)
        if "@" in parts.netloc:
            raise CimdError("client_id URL must not contain a user name or password")
        port = parts.port or 443
    except ValueError:
        raise CimdError("client_id URL has an invalid host or port") from None
    if port == 0:
        raise CimdError("client_id URL has an invalid port")
    host = (parts.hostname or "").lower()
    ip = _host_ip(parts.netloc, host)
    if ip is None and not _valid_dns_name(host):
        raise CimdError("client_id URL has no valid host name")
    if parts.path in ("", "/"):
        raise CimdError("client_id URL must have a path")
    if any(unquote(segment) in (".", "..") for segment in parts.path.split("/")):
        raise CimdError("client_id URL must not contain '.' or '..' path segments")
    return ClientIdUrl(url=value, host=host, port=port, netloc=parts.netloc, ip=ip)


def _host_ip(netloc: str, host: str) -> IPAddress | None:
    hostport = netloc.rsplit("@", 1)[-1]
    if hostport.startswith("["):
        if "%" in host:
            raise CimdError("client_id URL must not carry an IPv6 zone")
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise CimdError("client_id URL has an invalid IPv6 address") from None
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        return None


def _valid_dns_name(host: str) -> bool:
    """LDH labels; the last one not all digits (so legacy IPv4 spellings like ``127.1`` are refused)."""
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return all(_DNS_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses, IPv4 embedded in IPv6 included."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:  # the IPv4 address the packets end up at decides
            return is_public_address(embedded)
        if ip.is_site_local:
            return False
    return bool(
        ip.is_global
        and not (
            ip.is_private
            or ip.is_loopback
            or ip.is_link_local
            or ip.is_multicast
            or ip.is_reserved
            or ip.is_unspecified
        )
    )


class ClientMetadataFetcher:
    """Fetches, validates and caches client ID metadata documents as :class:`ClientRecord`."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        timeout: float = FETCH_TIMEOUT_SECONDS,
        max_bytes: int = MAX_DOCUMENT_BYTES,
        cache_entries: int = CACHE_ENTRIES,
    ) -> None:
        self._allowed_hosts = frozenset(
            h.strip("[]").lower().rstrip(".") for h in settings.fetch_allowed_hosts
        )
        try:
            self._tls = tls_context(settings.ca_bundle)
        except OutboundError as exc:
            raise ConfigError(str(exc)) from None
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._cache_entries = cache_entries
        self._cache: OrderedDict[str, tuple[float, ClientRecord]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[tuple[float, ClientRecord]]] = {}

    async def fetch(self, client_id: str) -> ClientRecord:
        """The client registered by the document at ``client_id``; :class:`CimdError` if unusable."""
        hit = self._cache.get(client_id)
        if hit is not None:
            if hit[0] > time.monotonic():
                self._cache.move_to_end(client_id)
                return hit[1]
            del self._cache[client_id]
        task = self._inflight.get(client_id)
        if task is None:
            task = asyncio.ensure_future(self._load(client_id))
            self._inflight[client_id] = task
            task.add_done_callback(lambda t: self._settle(client_id, t))
        # shield: one caller giving up must not cancel the fetch the others are waiting for
        _expires, record = await asyncio.shield(task)
        return record

    def _settle(self, client_id: str, task: asyncio.Task[tuple[float, ClientRecord]]) -> None:
        self._inflight.pop(client_id, None)
        if task.cancelled() or task.exception() is not None:  # also marks the exception retrieved
            return
        self._cache[client_id] = task.result()
        self._cache.move_to_end(client_id)
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)

    def forget(self, client_id: str) -> None:
        """Drop a cached document (the next use refetches it)."""
        self._cache.pop(client_id, None)

    async def _load(self, client_id: str) -> tuple[float, ClientRecord]:
        url = parse_client_id_url(client_id)
        try:
            async with asyncio.timeout(self._timeout):
                addresses = await self._resolve(url)
                headers, body = await self._get(url, addresses)
        except TimeoutError:
            log.info("cimd fetch timed out", client_id=client_id)
            raise CimdError(
                f"fetching the client metadata document took longer than {self._timeout:g} s"
            ) from None
        document = _parse_json(body)
        lifetime = cache_lifetime(
            headers, default=CACHE_DEFAULT_SECONDS, minimum=CACHE_MIN_SECONDS, maximum=CACHE_MAX_SECONDS
        )
        record = client_record(url, document, lifetime)
        log.info("cimd document fetched", client_id=client_id, cache_seconds=lifetime)
        return time.monotonic() + lifetime, record

    async def _resolve(self, url: ClientIdUrl) -> list[IPAddress]:
        """The addresses to connect to, every one of them checked (unless the host is exempt)."""
        if url.ip is not None:
            addresses = [url.ip]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    url.host, url.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                )
            except (socket.gaierror, UnicodeError):
                raise CimdError(f"cannot resolve host {url.host}") from None
            addresses = []
            for info in infos:
                ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                if ip not in addresses:
                    addresses.append(ip)
            if not addresses:
                raise CimdError(f"cannot resolve host {url.host}")
        if url.host.rstrip(".") not in self._allowed_hosts:
            for ip in addresses:
                if not is_public_address(ip):
                    log.info("cimd fetch refused: non-public address", client_id=url.url, address=str(ip))
                    raise CimdError(
                        f"host {url.host} resolves to a non-public address ({ip}); refused"
                        " (an operator may allow it with fetch_allowed_hosts)"
                    )
        return addresses

    async def _get(self, url: ClientIdUrl, addresses: list[IPAddress]) -> tuple[httpx.Headers, bytes]:
        """GET the document from the checked addresses in turn; SNI and Host carry the name."""
        headers = {
            "Host": url.netloc,
            "Accept": "application/json",
            "Accept-Encoding": "identity",  # the size cap then bounds what we hold, not a zip bomb
            "User-Agent": "mcp-bastion (client-id-metadata-document fetcher)",
        }
        extensions: dict[str, Any] = {} if url.ip is not None else {"sni_hostname": url.host.rstrip(".")}
        last_error = ""
        # A new client per fetch: a pooled connection to one IP must never serve another host name.
        async with httpx.AsyncClient(
            verify=self._tls,
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(self._timeout),
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as client:
            for ip in addresses:
                target = httpx.URL(url.url).copy_with(host=str(ip))
                try:
                    async with client.stream("GET", target, headers=headers, extensions=extensions) as resp:
                        if resp.is_redirect:
                            raise CimdError(
                                "the client metadata document URL answered with a redirect"
                                f" ({resp.status_code}); redirects are not followed"
                            )
                        if resp.status_code != 200:
                            raise CimdError(
                                f"the client metadata document URL answered HTTP {resp.status_code}"
                            )
                        if not is_json_content_type(resp.headers.get("content-type")):
                            raise CimdError("the client metadata document is not served as application/json")
                        try:
                            body = await read_limited(resp, self._max_bytes)
                        except OutboundError as exc:
                            raise CimdError(f"the client metadata document {exc}") from None
                        return resp.headers, body
                except httpx.ConnectError as exc:
                    last_error = describe_http_error(exc)
                    continue  # another checked address of the same host may answer
                except httpx.HTTPError as exc:
                    raise CimdError(
                        f"fetching the client metadata document failed: {describe_http_error(exc)}"
                    ) from None
        raise CimdError(f"cannot connect to {url.host}: {last_error}")


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise CimdError("the client metadata document is not valid JSON") from None
    if not isinstance(document, dict):
        raise CimdError("the client metadata document must be a JSON object")
    return document


def client_record(url: ClientIdUrl, document: dict[str, Any], lifetime: float) -> ClientRecord:
    """Validate a fetched document (draft §4) and turn it into the client it registers."""
    if document.get("client_id") != url.url:
        raise CimdError("the document's client_id does not equal the URL it was fetched from")
    for forbidden in ("client_secret", "client_secret_expires_at"):
        if forbidden in document:
            raise CimdError(f"a client metadata document must not contain {forbidden}")
    method = document.get("token_endpoint_auth_method", "none")
    if method == "private_key_jwt":
        raise CimdError("token_endpoint_auth_method private_key_jwt is not supported; use 'none'")
    if method in ("client_secret_basic", "client_secret_post", "client_secret_jwt"):
        raise CimdError(f"token_endpoint_auth_method {method} needs a shared secret, which CIMD cannot have")
    if method != "none":
        raise CimdError(f"token_endpoint_auth_method {method!r} is not supported; use 'none'")
    redirect_uris = _redirect_uris(document.get("redirect_uris"))
    name = _client_name(document.get("client_name"), url.host)
    declared = document.get("application_type")
    application_type: Literal["web", "native"]
    if declared is None:
        application_type = "native" if all(_is_native_redirect(u) for u in redirect_uris) else "web"
    elif declared == "web" or declared == "native":
        application_type = declared
    else:
        raise CimdError("application_type must be 'web' or 'native'")
    grant_types = document.get("grant_types", list(DEFAULT_GRANT_TYPES))
    if not isinstance(grant_types, list) or not all(isinstance(g, str) for g in grant_types):
        raise CimdError("grant_types must be a list of strings")
    response_types = document.get("response_types", ["code"])
    if not isinstance(response_types, list) or "code" not in response_types:
        raise CimdError("response_types must include 'code'")
    now = datetime.now(UTC)
    return ClientRecord(
        client_id=url.url,
        name=name,
        redirect_uris=redirect_uris,
        secret_hash=None,
        kind="cimd",
        application_type=application_type,
        token_endpoint_auth_method="none",
        grant_types=grant_types,
        metadata=document,
        created_at=now,
        expires_at=now + timedelta(seconds=lifetime),
    )


def _client_name(value: object, host: str) -> str:
    if value is None:
        return host  # the consent page still names something the user can check
    if not isinstance(value, str) or not value.strip():
        raise CimdError("client_name must be a non-empty string")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise CimdError("client_name must not contain control characters")
    return value.strip()[:MAX_NAME_LENGTH]


def _redirect_uris(value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        raise CimdError("redirect_uris must be a non-empty list of URIs")
    if len(value) > MAX_REDIRECT_URIS:
        raise CimdError(f"redirect_uris has more than {MAX_REDIRECT_URIS} entries")
    for uri in value:
        if not isinstance(uri, str):
            raise CimdError("redirect_uris must be a list of strings")
        _check_redirect_uri(uri)
    return list(value)


def _check_redirect_uri(uri: str) -> None:
    """Absolute, no fragment (RFC 6749 §3.1.2), https or loopback http or a private-use scheme."""
    if len(uri) > MAX_URL_LENGTH or not _URI_CHARS.fullmatch(uri) or _BAD_PERCENT.search(uri):
        raise CimdError(f"redirect URI {uri[:100]!r} is not a valid URI")
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if not _SCHEME.fullmatch(scheme):
        raise CimdError(f"redirect URI {uri!r} is not an absolute URI")
    if "#" in uri:
        raise CimdError(f"redirect URI {uri!r} must not have a fragment")
    scheme = scheme.lower()
    if scheme in _FORBIDDEN_REDIRECT_SCHEMES:
        raise CimdError(f"redirect URI scheme {scheme!r} is not allowed")
    if scheme in ("http", "https"):
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 (validates it)
        except ValueError:
            raise CimdError(f"redirect URI {uri!r} has an invalid host or port") from None
        if not parts.hostname or "@" in parts.netloc:
            raise CimdError(f"redirect URI {uri!r} must have a host and no user name or password")
        if scheme == "http" and not is_loopback_host(parts.hostname):
            raise CimdError(f"redirect URI {uri!r}: http is allowed only for loopback addresses")


def _is_native_redirect(uri: str) -> bool:
    """Loopback http or a private-use scheme: only an app on the user's device can receive it."""
    parts = urlsplit(uri)  # already validated by _check_redirect_uri
    if parts.scheme.lower() == "https":
        return False
    return parts.scheme.lower() != "http" or is_loopback_host(parts.hostname or "")

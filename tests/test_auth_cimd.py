"""Client ID Metadata Documents: fetched over real HTTPS (trustme CA) on 127.0.0.1, every refusal checked."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from mcp_bastion.auth.cimd import (
    MAX_DOCUMENT_BYTES,
    CimdError,
    ClientMetadataFetcher,
    is_public_address,
    parse_client_id_url,
)
from mcp_bastion.auth.outbound import cache_lifetime
from mcp_bastion.config import GatewaySettings
from tests.support.tls_server import LocalCA, TlsServer

REDIRECT = "http://127.0.0.1:33418/callback"


class DocumentServer:
    """Serves client metadata documents; ``docs[path]`` is a document (dict) or a callable response."""

    def __init__(self) -> None:
        self.docs: dict[str, Any] = {}
        self.hits: Counter[str] = Counter()
        self.hosts: list[str] = []
        self.headers: dict[str, dict[str, str]] = {}  # extra response headers per path
        self.base = ""
        # Handlers that park a request wait on this event, in the server thread's loop.
        self.release = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    def release_waiters(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.release.set)

    def doc(self, path: str, **fields: Any) -> str:
        """Publish a valid document at ``path`` (fields override) and return its client_id URL."""
        url = self.base + path
        self.docs[path] = {
            "client_id": url,
            "client_name": "Test Client",
            "redirect_uris": [REDIRECT],
            **fields,
        }
        return url

    async def handle(self, request: Request) -> Response:
        path = request.url.path
        self.hits[path] += 1
        self.hosts.append(request.headers.get("host", ""))
        entry = self.docs.get(path)
        if entry is None:
            return Response("not found", status_code=404)
        if callable(entry):
            result: Response = await entry(request)
            return result
        return Response(
            orjson.dumps(entry), media_type="application/json", headers=self.headers.get(path, {})
        )


@pytest.fixture(scope="module")
def ca() -> Iterator[LocalCA]:
    authority = LocalCA()
    yield authority
    authority.close()


@pytest.fixture
def docs(ca: LocalCA) -> Iterator[DocumentServer]:
    server = DocumentServer()
    tls = TlsServer(Starlette(routes=[Route("/{path:path}", server.handle)]), ca)
    server.base = tls.base_url()
    with tls.running():
        yield server
        server.release_waiters()  # a request parked by a slow handler must end for the server to stop


def fetcher(
    ca: LocalCA, *, allowed: tuple[str, ...] = ("127.0.0.1",), **kwargs: Any
) -> ClientMetadataFetcher:
    settings = GatewaySettings(ca_bundle=str(ca.pem_path), fetch_allowed_hosts=allowed)
    return ClientMetadataFetcher(settings, **kwargs)


# ---- success and cache --------------------------------------------------------------------


async def test_fetch_returns_the_client(ca: LocalCA, docs: DocumentServer) -> None:
    url = docs.doc("/clients/app.json", client_uri="https://app.example", grant_types=["authorization_code"])
    record = await fetcher(ca).fetch(url)
    assert record.client_id == url
    assert record.kind == "cimd"
    assert record.name == "Test Client"
    assert record.redirect_uris == [REDIRECT]
    assert record.token_endpoint_auth_method == "none"
    assert record.secret_hash is None
    assert record.application_type == "native"  # loopback-only redirects
    assert record.grant_types == ["authorization_code"]
    assert record.metadata["client_uri"] == "https://app.example"
    assert record.expires_at is not None and record.expires_at > record.created_at


async def test_web_client_and_declared_application_type(ca: LocalCA, docs: DocumentServer) -> None:
    web = docs.doc("/web.json", redirect_uris=["https://claude.ai/api/mcp/auth_callback"])
    declared = docs.doc("/declared.json", application_type="web")
    f = fetcher(ca)
    assert (await f.fetch(web)).application_type == "web"
    assert (await f.fetch(declared)).application_type == "web"


async def test_second_fetch_is_served_from_cache(ca: LocalCA, docs: DocumentServer) -> None:
    url = docs.doc("/cached.json")
    docs.headers["/cached.json"] = {"Cache-Control": "max-age=0"}  # still kept for the 60 s minimum
    f = fetcher(ca)
    first = await f.fetch(url)
    second = await f.fetch(url)
    assert second is first
    assert docs.hits["/cached.json"] == 1


async def test_concurrent_fetches_share_one_request(ca: LocalCA, docs: DocumentServer) -> None:
    url = docs.doc("/shared.json")
    f = fetcher(ca)
    records = await asyncio.gather(*(f.fetch(url) for _ in range(8)))
    assert len({id(r) for r in records}) == 1
    assert docs.hits["/shared.json"] == 1


async def test_cache_is_a_bounded_lru(ca: LocalCA, docs: DocumentServer) -> None:
    a, b, c = (docs.doc(f"/lru/{n}.json") for n in "abc")
    f = fetcher(ca, cache_entries=2)
    await f.fetch(a)
    await f.fetch(b)
    await f.fetch(a)  # a is now the most recently used
    await f.fetch(c)  # evicts b
    await f.fetch(a)
    await f.fetch(b)
    assert docs.hits["/lru/a.json"] == 1
    assert docs.hits["/lru/b.json"] == 2


async def test_host_name_is_resolved_and_sent_as_sni_and_host(ca: LocalCA) -> None:
    """A certificate for "localhost" only: verification passes only if SNI carries the name."""
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo("localhost", 443, type=socket.SOCK_STREAM)}
    except socket.gaierror:
        resolved = set()
    if resolved != {"127.0.0.1"}:
        pytest.skip(f"localhost resolves to {sorted(resolved)} here; tests connect to 127.0.0.1 only")
    server = DocumentServer()
    tls = TlsServer(Starlette(routes=[Route("/{path:path}", server.handle)]), ca, names=("localhost",))
    server.base = tls.base_url("localhost")
    with tls.running():
        url = server.doc("/named.json")
        record = await fetcher(ca, allowed=("localhost",)).fetch(url)
        assert record.client_id == url
        assert server.hosts == [f"localhost:{tls.port}"]
        with pytest.raises(CimdError, match=r"non-public address \(127\.0\.0\.1\)"):
            await fetcher(ca, allowed=()).fetch(server.doc("/named2.json"))
        assert server.hits["/named2.json"] == 0


# ---- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8443/client.json", "https"),
        ("https://127.0.0.1:8443", "path"),
        ("https://127.0.0.1:8443/", "path"),
        ("https://127.0.0.1:8443/client.json#frag", "fragment"),
        ("https://127.0.0.1:8443/client.json#", "fragment"),
        ("https://user:pw@127.0.0.1:8443/client.json", "user name or password"),
        ("https://user@127.0.0.1:8443/client.json", "user name or password"),
        ("https://127.0.0.1:8443/a/../client.json", r"'\.\.'"),
        ("https://127.0.0.1:8443/a/%2e%2E/client.json", r"'\.\.'"),
        ("https://127.0.0.1:8443/./client.json", r"'\.'"),
        ("https://127.0.0.1:99999/client.json", "port"),
        ("https://[::1/client.json", "host or port"),
        ("https://127.1/client.json", "host"),
        ("https:///client.json", "host"),
        ("https://exa mple.com/client.json", "characters"),
        ("https://example.com/cl\\ient.json", "characters"),
        ("https://[fe80::1%25eth0]/client.json", "zone"),
        ("", "https URL"),
    ],
)
async def test_bad_urls_are_refused_without_a_request(ca: LocalCA, url: str, reason: str) -> None:
    with pytest.raises(CimdError, match=reason):
        await fetcher(ca).fetch(url)


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """A TCP listener on 127.0.0.1 that never accepts: any connection attempt would be queued."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
async def test_private_address_is_refused_before_connecting(
    ca: LocalCA, silent_listener: socket.socket, host: str
) -> None:
    port = silent_listener.getsockname()[1]
    with pytest.raises(CimdError, match="non-public address"):
        await fetcher(ca, allowed=()).fetch(f"https://{host}:{port}/client.json")
    with pytest.raises(BlockingIOError):
        silent_listener.accept()  # nothing ever connected


async def test_private_address_is_fetched_when_the_host_is_allowed(ca: LocalCA, docs: DocumentServer) -> None:
    url = docs.doc("/allowed.json")
    with pytest.raises(CimdError, match="non-public"):
        await fetcher(ca, allowed=("example.com",)).fetch(url)
    assert (await fetcher(ca, allowed=("127.0.0.1",)).fetch(url)).client_id == url


async def test_untrusted_certificate_is_refused(docs: DocumentServer) -> None:
    url = docs.doc("/tls.json")
    other = LocalCA()
    try:
        with pytest.raises(CimdError, match="not trusted"):
            await fetcher(other).fetch(url)
    finally:
        other.close()


async def test_client_id_mismatch(ca: LocalCA, docs: DocumentServer) -> None:
    url = docs.doc("/mismatch.json")
    docs.docs["/mismatch.json"]["client_id"] = url + "?x=1"
    with pytest.raises(CimdError, match="does not equal the URL"):
        await fetcher(ca).fetch(url)
    url2 = docs.doc("/missing-id.json")
    del docs.docs["/missing-id.json"]["client_id"]
    with pytest.raises(CimdError, match="does not equal the URL"):
        await fetcher(ca).fetch(url2)


async def _too_large(request: Request) -> Response:
    doc = {"client_id": str(request.url), "redirect_uris": [REDIRECT], "pad": "x" * MAX_DOCUMENT_BYTES}
    return Response(orjson.dumps(doc), media_type="application/json")


async def _too_large_chunked(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"client_id": "' + str(request.url).encode() + b'", "pad": "'
        for _ in range(100):
            yield b"x" * 4096
        yield b'"}'

    return StreamingResponse(body(), media_type="application/json")


@pytest.mark.parametrize("handler", [_too_large, _too_large_chunked], ids=["content-length", "chunked"])
async def test_too_large(ca: LocalCA, docs: DocumentServer, handler: Any) -> None:
    docs.docs["/big.json"] = handler
    with pytest.raises(CimdError, match="larger than 65536 bytes"):
        await fetcher(ca).fetch(docs.base + "/big.json")


async def test_wrong_content_type(ca: LocalCA, docs: DocumentServer) -> None:
    url = docs.base + "/html.json"

    async def html(request: Request) -> Response:
        body = orjson.dumps({"client_id": url, "redirect_uris": [REDIRECT]})
        return Response(body, media_type="text/html")

    docs.docs["/html.json"] = html
    with pytest.raises(CimdError, match="application/json"):
        await fetcher(ca).fetch(url)


async def test_json_subtype_is_accepted(ca: LocalCA, docs: DocumentServer) -> None:
    url = docs.base + "/sub.json"

    async def subtype(request: Request) -> Response:
        body = orjson.dumps({"client_id": url, "redirect_uris": [REDIRECT]})
        return Response(body, headers={"Content-Type": "application/oauth-client+json; charset=utf-8"})

    docs.docs["/sub.json"] = subtype
    record = await fetcher(ca).fetch(url)
    assert record.name == "127.0.0.1"  # no client_name: the host stands in


async def test_redirect_is_not_followed(ca: LocalCA, docs: DocumentServer) -> None:
    target = docs.doc("/target.json")

    async def redirect(request: Request) -> Response:
        return Response(status_code=302, headers={"Location": target})

    docs.docs["/moved.json"] = redirect
    with pytest.raises(CimdError, match="redirect"):
        await fetcher(ca).fetch(docs.base + "/moved.json")
    assert docs.hits["/target.json"] == 0


async def test_timeout(ca: LocalCA, docs: DocumentServer) -> None:
    async def slow(request: Request) -> Response:
        docs.loop = asyncio.get_running_loop()
        await docs.release.wait()
        return Response(status_code=503)

    docs.docs["/slow.json"] = slow
    with pytest.raises(CimdError, match=r"took longer than 0\.5 s"):
        await fetcher(ca, timeout=0.5).fetch(docs.base + "/slow.json")


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [(404, b"{}", "HTTP 404"), (200, b"{not json", "not valid JSON"), (200, b"[1, 2]", "JSON object")],
)
async def test_bad_responses(
    ca: LocalCA, docs: DocumentServer, status: int, body: bytes, reason: str
) -> None:
    async def answer(request: Request) -> Response:
        return Response(body, status_code=status, media_type="application/json")

    docs.docs["/bad.json"] = answer
    with pytest.raises(CimdError, match=reason):
        await fetcher(ca).fetch(docs.base + "/bad.json")


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"redirect_uris": []}, "non-empty list"),
        ({"redirect_uris": "http://127.0.0.1/cb"}, "non-empty list"),
        ({"redirect_uris": [42]}, "list of strings"),
        ({"redirect_uris": ["javascript:alert(1)"]}, "scheme 'javascript'"),
        ({"redirect_uris": ["http://evil.example/cb"]}, "only for loopback"),
        ({"redirect_uris": ["https://app.example/cb#x"]}, "fragment"),
        ({"redirect_uris": ["/relative"]}, "absolute"),
        ({"token_endpoint_auth_method": "private_key_jwt", "jwks": {"keys": []}}, "private_key_jwt"),
        ({"token_endpoint_auth_method": "client_secret_basic"}, "shared secret"),
        ({"token_endpoint_auth_method": "tls_client_auth"}, "not supported"),
        ({"client_secret": "s3cret"}, "must not contain client_secret"),
        ({"application_type": "desktop"}, "application_type"),
        ({"client_name": ""}, "client_name"),
        ({"client_name": "Evil\nName"}, "control characters"),
        ({"grant_types": "authorization_code"}, "grant_types"),
        ({"response_types": ["token"]}, "response_types"),
    ],
)
async def test_bad_documents(ca: LocalCA, docs: DocumentServer, fields: dict[str, Any], reason: str) -> None:
    url = docs.doc("/bad-doc.json", **fields)
    with pytest.raises(CimdError, match=reason):
        await fetcher(ca).fetch(url)


async def test_failures_are_not_cached(ca: LocalCA, docs: DocumentServer) -> None:
    url = docs.doc("/later.json", redirect_uris=[])
    f = fetcher(ca)
    with pytest.raises(CimdError):
        await f.fetch(url)
    docs.docs["/later.json"]["redirect_uris"] = [REDIRECT]
    assert (await f.fetch(url)).redirect_uris == [REDIRECT]
    assert docs.hits["/later.json"] == 2


# ---- pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, 300),
        ({"cache-control": "public, max-age=600"}, 600),
        ({"cache-control": "max-age=600", "age": "100"}, 500),
        ({"cache-control": "max-age=5"}, 60),
        ({"cache-control": "max-age=9999999"}, 86400),
        ({"cache-control": "no-store"}, 60),
        ({"cache-control": "no-cache, max-age=600"}, 60),
        ({"expires": "Thu, 01 Jan 1970 00:00:00 GMT"}, 60),
        ({"expires": "garbage"}, 60),
    ],
)
def test_cache_lifetime(headers: dict[str, str], expected: float) -> None:
    assert cache_lifetime(headers, default=300, minimum=60, maximum=86400) == expected


PRIVATE_NETWORKS = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
    "fec0::/10",
]


@settings(max_examples=300, deadline=None)
@given(network=st.sampled_from(PRIVATE_NETWORKS), offset=st.integers(min_value=0))
def test_private_addresses_are_never_public(network: str, offset: int) -> None:
    net = ipaddress.ip_network(network)
    ip = net[offset % net.num_addresses]
    assert not is_public_address(ip)
    if isinstance(ip, ipaddress.IPv4Address):
        for embedded in (
            ipaddress.IPv6Address(f"::ffff:{ip}"),  # IPv4-mapped
            ipaddress.IPv6Address((0x2002 << 112) | (int(ip) << 80)),  # 6to4
            ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(ip)),  # NAT64
        ):
            assert not is_public_address(embedded), embedded


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808"])
def test_public_addresses(ip: str) -> None:
    assert is_public_address(ipaddress.ip_address(ip))


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
HOSTS = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(LABEL, min_size=1, max_size=3),
    st.from_regex(r"[a-z]{2,6}", fullmatch=True),
)
SEGMENT = st.from_regex(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,15}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)
PATHS = st.lists(SEGMENT, min_size=1, max_size=4).map(lambda segs: "/" + "/".join(segs))
PORTS = st.one_of(st.none(), st.integers(min_value=1, max_value=65535))
QUERIES = st.one_of(st.just(""), st.from_regex(r"\?[a-z]{1,5}=[a-z0-9]{0,5}", fullmatch=True))


def _url(host: str, port: int | None, path: str, query: str = "") -> str:
    return f"https://{host}{'' if port is None else f':{port}'}{path}{query}"


@settings(max_examples=300, deadline=None)
@given(host=HOSTS, port=PORTS, path=PATHS, query=QUERIES)
def test_valid_urls_are_accepted(host: str, port: int | None, path: str, query: str) -> None:
    url = _url(host, port, path, query)
    parsed = parse_client_id_url(url)
    assert parsed.url == url
    assert parsed.host == host
    assert parsed.port == (port or 443)
    assert parsed.ip is None


@settings(max_examples=300, deadline=None)
@given(
    host=HOSTS,
    port=PORTS,
    path=PATHS,
    breakage=st.sampled_from(["scheme", "fragment", "userinfo", "no-path", "dot", "dotdot", "space"]),
    extra=st.from_regex(r"[a-z0-9]{0,8}", fullmatch=True),
)
def test_broken_urls_are_refused(host: str, port: int | None, path: str, breakage: str, extra: str) -> None:
    url = _url(host, port, path)
    broken = {
        "scheme": url.replace("https://", "http://", 1),
        "fragment": url + "#" + extra,
        "userinfo": url.replace("https://", f"https://{extra or 'u'}@", 1),
        "no-path": _url(host, port, ""),
        "dot": _url(host, port, path + "/./x"),
        "dotdot": _url(host, port, "/.." + path),
        "space": url + " " + extra,
    }[breakage]
    with pytest.raises(CimdError):
        parse_client_id_url(broken)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), st.text().map(lambda t: "https://" + t)))
def test_arbitrary_text_fails_only_with_cimd_error(text: str) -> None:
    try:
        parsed = parse_client_id_url(text)
    except CimdError:
        return
    assert parsed.url.startswith("https://") and "#" not in parsed.url and "@" not in parsed.netloc
    assert parsed.host and len(parsed.url) <= 2048

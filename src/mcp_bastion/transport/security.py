"""DNS-rebinding protection: the Host allowlist and the Origin check, on by default."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


class HostPolicy:
    """Which Host and Origin values the gateway answers to.

    Defaults: the loopback names on the listening port, plus the public URL's host.
    ``*`` in ``allowed_hosts`` or ``allowed_origins`` switches that check off (for a
    proxy that already controls them); ``host:*`` allows any port of that host.
    """

    def __init__(
        self,
        port: int,
        public_url: str | None = None,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
        bind_host: str = "127.0.0.1",
    ) -> None:
        hosts = {f"{n}:{port}" for n in LOOPBACK_NAMES} | set(LOOPBACK_NAMES)
        origins = {f"{scheme}://{n}:{port}" for n in LOOPBACK_NAMES for scheme in ("http", "https")}
        origins |= {f"{scheme}://{n}" for n in LOOPBACK_NAMES for scheme in ("http", "https")}
        if bind_host not in ("127.0.0.1", "0.0.0.0", "::", "localhost", "::1"):
            hosts |= {bind_host, f"{bind_host}:{port}"}
        if public_url:
            parts = urlsplit(public_url)
            if parts.netloc:
                hosts.add(parts.netloc.lower())
                origins.add(f"{parts.scheme}://{parts.netloc}".lower())
        self.any_host = "*" in allowed_hosts
        self.any_origin = "*" in allowed_origins
        self.hosts = hosts | {h.lower() for h in allowed_hosts if not h.endswith(":*")}
        self.host_wildcards = {h[:-2].lower() for h in allowed_hosts if h.endswith(":*")}
        self.origins = origins | {o.lower().rstrip("/") for o in allowed_origins}

    def host_ok(self, host: str | None) -> bool:
        if self.any_host:
            return True
        if not host:
            return False
        host = host.lower()
        if host in self.hosts:
            return True
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in self.host_wildcards

    def origin_ok(self, origin: str | None) -> bool:
        # Requests from non-browser clients carry no Origin; only browsers can be rebound.
        if origin is None or self.any_origin:
            return True
        return origin.lower().rstrip("/") in self.origins

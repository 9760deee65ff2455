"""Aggregation names: tools, prompts and resource URIs of many servers behind one endpoint.

Sans-IO. Names are mapped by table (built from each server's lists) so that a name
shortened to fit the spec's 128-character limit still maps back; URIs are rewritten
to ``<server>+<scheme>:...``, which stays a valid URI and reverses without a table.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

PrefixMode = Literal["always", "on-collision", "none"]
MAX_NAME = 128
_SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")


def valid_server_name(name: str) -> bool:
    """Server names become URI scheme prefixes and path segments, so they are kept plain."""
    return bool(_SERVER_NAME.fullmatch(name))


def fit_name(name: str) -> str:
    """Keep a name within 128 characters; a shortened one ends with a stable hash."""
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return name[: MAX_NAME - 11] + "-" + digest


def hashed_name(name: str, key: str) -> str:
    """A name made unique by a hash of ``key``, within 128 characters."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return name[: MAX_NAME - 11] + "-" + digest


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]*\})", template)
    rx = "".join(".+?" if p.startswith("{") and p.endswith("}") else re.escape(p) for p in parts)
    return re.compile("^" + rx + "$")


@dataclass
class NameMap:
    """Exposed name <-> (server, upstream name) for one kind (tools or prompts)."""

    mode: PrefixMode
    separator: str
    exposed: dict[str, tuple[str, str]] = field(default_factory=dict)
    by_server: dict[str, dict[str, str]] = field(default_factory=dict)

    def rebuild(self, lists: Mapping[str, Iterable[str]]) -> None:
        """Recompute every mapping from the current lists (servers sorted: deterministic)."""
        names = {server: sorted(set(items)) for server, items in lists.items()}
        counts: dict[str, int] = {}
        for items in names.values():
            for n in items:
                counts[n] = counts.get(n, 0) + 1
        first = min(names) if names else ""
        plain: list[tuple[str, str]] = []
        prefixed: list[tuple[str, str]] = []
        for server in sorted(names):
            for n in names[server]:
                if self.mode == "always":
                    wants_prefix = True
                elif self.mode == "on-collision":
                    wants_prefix = counts[n] > 1
                else:  # "none": one server in practice; on a clash the first server keeps the name
                    wants_prefix = counts[n] > 1 and server != first
                (prefixed if wants_prefix else plain).append((server, n))
        self.exposed = {}
        self.by_server = {server: {} for server in names}
        # Prefixed names are claimed first; a plain name that one of them already holds
        # is prefixed in turn, and a name still taken gets a hash of its own: no tool is
        # ever lost, and none resolves to another server's.
        for server, n in prefixed:
            self._claim(self._free(fit_name(f"{server}{self.separator}{n}"), server, n), server, n)
        for server, n in plain:
            out = n if n not in self.exposed else fit_name(f"{server}{self.separator}{n}")
            self._claim(self._free(out, server, n), server, n)

    def _free(self, out: str, server: str, name: str) -> str:
        salt = 0
        while out in self.exposed:
            out = hashed_name(f"{server}{self.separator}{name}", f"{server}\0{name}\0{salt}")
            salt += 1
        return out

    def _claim(self, out: str, server: str, name: str) -> None:
        self.exposed[out] = (server, name)
        self.by_server[server][name] = out

    def expose(self, server: str, name: str) -> str:
        table = self.by_server.get(server)
        if table is not None and name in table:
            return table[name]
        if self.mode == "always":
            return fit_name(f"{server}{self.separator}{name}")
        return name

    def resolve(self, name: str, servers: Iterable[str]) -> tuple[str, str] | None:
        hit = self.exposed.get(name)
        if hit is not None:
            return hit
        if self.mode != "none":
            for server in sorted(servers, key=len, reverse=True):
                prefix = f"{server}{self.separator}"
                if name.startswith(prefix) and len(name) > len(prefix):
                    return server, name[len(prefix) :]
        return None


@dataclass
class UriMap:
    """Exposed resource URI <-> (server, upstream URI)."""

    mode: PrefixMode
    plain: dict[str, str] = field(default_factory=dict)  # unprefixed exposed uri -> server
    templates: dict[str, list[re.Pattern[str]]] = field(default_factory=dict)
    prefixed: set[tuple[str, str]] = field(default_factory=set)

    def rebuild(self, uris: Mapping[str, Iterable[str]], templates: Mapping[str, Iterable[str]]) -> None:
        counts: dict[str, int] = {}
        for items in uris.values():
            for u in set(items):
                counts[u] = counts.get(u, 0) + 1
        for items in templates.values():
            for u in set(items):
                counts[u] = counts.get(u, 0) + 1
        self.plain = {}
        self.prefixed = set()
        for server in sorted(uris):
            for u in uris[server]:
                if self._prefixed(counts.get(u, 0)):
                    self.prefixed.add((server, u))
                else:
                    self.plain[u] = server
        self.templates = {s: [_template_regex(t) for t in ts] for s, ts in templates.items()}
        for server in sorted(templates):
            for t in templates[server]:
                if self._prefixed(counts.get(t, 0)):
                    self.prefixed.add((server, t))

    def _prefixed(self, count: int) -> bool:
        return self.mode == "always" or (self.mode == "on-collision" and count > 1)

    def expose(self, server: str, uri: str) -> str:
        if self.mode == "always" or (server, uri) in self.prefixed:
            return f"{server}+{uri}"
        return uri

    def resolve(self, uri: str, servers: Iterable[str]) -> tuple[str, str] | None:
        known = list(servers)
        if self.mode == "on-collision" and uri in self.plain:
            return self.plain[uri], uri
        if self.mode != "none":
            for server in sorted(known, key=len, reverse=True):
                prefix = f"{server}+"
                if uri.startswith(prefix) and len(uri) > len(prefix):
                    return server, uri[len(prefix) :]
        if self.mode == "always":
            return None
        if uri in self.plain:
            return self.plain[uri], uri
        matches = [s for s in sorted(self.templates) if any(rx.match(uri) for rx in self.templates[s])]
        if len(matches) == 1:
            return matches[0], uri
        if len(known) == 1:
            return known[0], uri
        return None

"""Configuration: the ``mcpServers`` JSON users already have, a TOML gateway file, the environment.

Precedence: command-line flags > environment (``MCP_BASTION_*``) > TOML > defaults.
Secret values are written as references (``env:NAME``, ``file:PATH``) and resolved
only when a child is spawned or a request is sent, so they never sit in config dumps
or logs.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import platformdirs

from .core.names import valid_server_name


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


def resolve_secret(value: str) -> str:
    """Resolve ``env:NAME`` and ``file:PATH`` references; any other value is literal."""
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ConfigError(f"secret reference env:{name}: variable is not set")
        return os.environ[name]
    if value.startswith("file:"):
        path = Path(value[5:]).expanduser()
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"secret reference file:{path}: {exc.strerror}") from None
    return value


def resolve_mapping(values: Mapping[str, str]) -> dict[str, str]:
    return {k: resolve_secret(v) for k, v in values.items()}


@dataclass(frozen=True)
class UserCredentials:
    """What one identity passes to an upstream: env for a stdio child, headers for HTTP (secret refs)."""

    env: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)


Isolation = Literal["shared", "session"]
EraSetting = Literal["auto", "legacy", "modern"]


@dataclass(frozen=True)
class ServerConfig:
    """One upstream server, from an ``mcpServers`` entry."""

    name: str
    transport: Literal["stdio", "http", "sse", "tunnel"]  # tunnel: added by a connector, never parsed
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    isolation: Isolation = "shared"
    era: EraSetting = "auto"
    timeout: float = 30.0
    # Per-user upstream credentials: the signed-in identity's name (user name, OIDC e-mail or
    # subject, "key:<name>" for API keys) selects env/headers that override the server's own.
    users: Mapping[str, UserCredentials] = field(default_factory=dict)
    # True: identities without an entry in ``users`` cannot use this server at all.
    users_only: bool = False
    # Which of the server's tools are offered (shell-style patterns; empty allow: all), the rest are
    # hidden from lists and refused as unknown: the operator's curation, and on a connector, a
    # limit no gateway can widen.
    tools_allow: tuple[str, ...] = ()
    tools_deny: tuple[str, ...] = ()

    @property
    def filters_tools(self) -> bool:
        """Whether an allow or deny list applies (usually not: then every tool is offered)."""
        return bool(self.tools_allow or self.tools_deny)

    def tool_allowed(self, name: str) -> bool:
        if not self.filters_tools:
            return True  # the usual case, on every tools/call: no pattern matching at all
        if self.tools_allow and not any(fnmatch.fnmatchcase(name, p) for p in self.tools_allow):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.tools_deny)

    def credentials_key(self, identity_name: str) -> str | None:
        """Which credentials an identity uses: its own name, "" for the server's own, None for none."""
        if identity_name in self.users:
            return identity_name
        return None if self.users_only else ""

    def for_credentials(self, key: str) -> ServerConfig:
        """This server as one identity reaches it (its env/headers laid over the server's)."""
        if not key:
            return self
        creds = self.users[key]
        return replace(self, env={**self.env, **creds.env}, headers={**self.headers, **creds.headers})

    def redacted(self) -> dict[str, Any]:
        """What may be logged: no env or header values."""
        out: dict[str, Any] = {"name": self.name, "transport": self.transport}
        if self.command:
            out["command"] = self.command
        if self.url:
            out["url"] = self.url
        if self.env:
            out["env"] = sorted(self.env)
        if self.headers:
            out["headers"] = sorted(self.headers)
        if self.users:
            out["users"] = sorted(self.users)
        return out


def parse_server(name: str, entry: Any) -> ServerConfig:
    where = f"server {name!r}"
    if not valid_server_name(name):
        raise ConfigError(
            f"{where}: names are 1-64 letters, digits, '-' or '.', starting with a letter or digit"
        )
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be an object")
    kind = entry.get("transport", entry.get("type"))
    isolation = entry.get("isolation", "shared")
    if isolation not in ("shared", "session"):
        raise ConfigError(f"{where}: isolation must be 'shared' or 'session'")
    era = entry.get("era", "auto")
    if era not in ("auto", "legacy", "modern"):
        raise ConfigError(f"{where}: era must be 'auto', 'legacy' or 'modern'")
    timeout = entry.get("timeout", 30.0)
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"{where}: timeout must be a positive number of seconds")
    env = entry.get("env") or {}
    headers = entry.get("headers") or {}
    for label, mapping in (("env", env), ("headers", headers)):
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            raise ConfigError(f"{where}: {label} must map strings to strings")
    users_raw = entry.get("users") or {}
    if not isinstance(users_raw, dict):
        raise ConfigError(f"{where}: users must map identity names to {{env, headers}}")
    users: dict[str, UserCredentials] = {}
    for user, creds in users_raw.items():
        if not isinstance(creds, dict) or set(creds) - {"env", "headers"}:
            raise ConfigError(f"{where}: users.{user} must be an object with 'env' and/or 'headers'")
        parts: dict[str, dict[str, str]] = {}
        for label in ("env", "headers"):
            mapping = creds.get(label) or {}
            if not isinstance(mapping, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
            ):
                raise ConfigError(f"{where}: users.{user}.{label} must map strings to strings")
            parts[label] = mapping
        users[str(user)] = UserCredentials(env=parts["env"], headers=parts["headers"])
    users_only = entry.get("usersOnly", entry.get("users_only", False))
    if not isinstance(users_only, bool):
        raise ConfigError(f"{where}: usersOnly must be true or false")
    if users_only and not users:
        raise ConfigError(f"{where}: usersOnly needs a 'users' map")
    tools = entry.get("tools") or {}
    if not isinstance(tools, dict) or set(tools) - {"allow", "deny"}:
        raise ConfigError(f"{where}: tools must be an object with 'allow' and/or 'deny' lists")
    patterns: dict[str, tuple[str, ...]] = {}
    for label in ("allow", "deny"):
        raw = tools.get(label) or []
        if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
            raise ConfigError(f"{where}: tools.{label} must be a list of tool names or patterns")
        patterns[label] = tuple(raw)
    common: dict[str, Any] = {
        "tools_allow": patterns["allow"],
        "tools_deny": patterns["deny"],
        "isolation": isolation,
        "era": era,
        "timeout": float(timeout),
        "users": users,
        "users_only": users_only,
    }
    if "command" in entry:
        if kind not in (None, "stdio"):
            raise ConfigError(f"{where}: a 'command' entry is a stdio server, not {kind!r}")
        args = entry.get("args") or []
        if not isinstance(entry["command"], str) or not entry["command"]:
            raise ConfigError(f"{where}: command must be a non-empty string")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ConfigError(f"{where}: args must be a list of strings")
        cwd = entry.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise ConfigError(f"{where}: cwd must be a string")
        return ServerConfig(
            name, "stdio", command=entry["command"], args=tuple(args), env=env, cwd=cwd, **common
        )
    if "url" in entry:
        url = entry["url"]
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: url must be an http:// or https:// URL")
        transport: Literal["http", "sse"]
        if kind in ("sse",):
            transport = "sse"
        elif kind in (None, "http", "streamable-http", "streamableHttp", "streamable_http"):
            transport = "http"
        else:
            raise ConfigError(f"{where}: type/transport must be 'http' or 'sse', not {kind!r}")
        return ServerConfig(name, transport, url=url, headers=headers, **common)
    raise ConfigError(f"{where}: needs either 'command' (stdio) or 'url' (remote)")


def parse_mcp_servers(data: Any, source: str = "config") -> list[ServerConfig]:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected an object")
    servers = data.get("mcpServers", data.get("servers"))
    if not isinstance(servers, dict):
        raise ConfigError(f'{source}: expected {{"mcpServers": {{...}}}}')
    return [parse_server(name, entry) for name, entry in servers.items()]


MAX_COALESCE_MS = 50.0  # a longer hold would add more to a call than any batch saves


@dataclass(frozen=True)
class GatewaySettings:
    """Settings of the public edge; every field also reads MCP_BASTION_<FIELD> from the environment."""

    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    prefix_mode: Literal["always", "on-collision"] = "always"
    separator: str = "_"
    data_dir: str = ""
    max_body_bytes: int = 4 * 1024 * 1024
    max_sessions: int = 10_000
    session_idle_seconds: float = 1800.0
    max_concurrent_per_session: int = 64
    request_timeout_seconds: float = 300.0
    keepalive_seconds: float = 15.0
    # Read coalescing under load: while a stdio server queues, its output is left unread for this
    # window after a read, so each wake-up carries a batch (core/pacing.py). 0: never.
    coalesce_ms: float = 2.0
    # Answer handshake-era requests that carry no Mcp-Session-Id (as ChatGPT sends after its
    # first initialize) statelessly instead of with 400. Off: the spec's SHOULD is 400.
    allow_sessionless: bool = False
    log_level: str = "info"
    log_format: Literal["json", "console"] = "json"
    # ---- sign-in ([auth] in TOML). "auto": on when listening beyond loopback or public_url is set.
    auth: Literal["auto", "on", "off"] = "auto"
    # SQLAlchemy URL of the auth store; empty: SQLite file <data_dir>/bastion.db.
    database_url: str = ""
    access_token_seconds: int = 3600
    refresh_token_seconds: int = 30 * 86400
    auth_code_seconds: int = 120
    login_session_seconds: int = 12 * 3600
    signing_key_rotation_days: float = 30.0
    # Redirect URIs that dynamically registered (DCR) and CIMD clients may use besides loopback:
    # presets "claude" and "chatgpt", and exact URIs ("{id}" matches one path segment).
    redirect_presets: tuple[str, ...] = ()
    allowed_redirect_uris: tuple[str, ...] = ()
    dynamic_registration: bool = True
    client_metadata_documents: bool = True
    # Hosts exempt from the CIMD fetcher's refusal of private and loopback addresses (the OIDC
    # provider is operator-configured and may be private: it is never refused).
    fetch_allowed_hosts: tuple[str, ...] = ()
    # PEM bundle trusted by those fetchers (private PKI); empty: the system's.
    ca_bundle: str = ""
    # Delegated sign-in to an upstream OpenID Connect provider (empty: local users).
    oidc_issuer: str = ""
    oidc_client_id: str = ""
    oidc_client_secret: str = ""  # a secret reference: env:NAME or file:PATH
    oidc_scopes: tuple[str, ...] = ("openid", "email", "profile")
    # Who the upstream provider may sign in: e-mail addresses, "@domain", "sub:<subject>";
    # empty: everyone it signs in (unverified e-mail addresses never match).
    oidc_allowed_users: tuple[str, ...] = ()

    def validated(self) -> GatewaySettings:
        if self.prefix_mode not in ("always", "on-collision"):
            raise ConfigError("prefix_mode must be 'always' or 'on-collision'")
        if not self.separator or len(self.separator) > 4:
            raise ConfigError("separator must be 1-4 characters")
        for name in ("max_body_bytes", "max_sessions", "max_concurrent_per_session", "port"):
            if getattr(self, name) < (0 if name == "port" else 1):
                raise ConfigError(f"{name} must be positive")
        if not 0 <= self.coalesce_ms <= MAX_COALESCE_MS:
            raise ConfigError(f"coalesce_ms must be between 0 and {MAX_COALESCE_MS:g}")
        if self.auth not in ("auto", "on", "off"):
            raise ConfigError("auth must be 'auto', 'on' or 'off'")
        unknown = set(self.redirect_presets) - {"claude", "chatgpt"}
        if unknown:
            raise ConfigError(f"redirect_presets: unknown {sorted(unknown)}; known: claude, chatgpt")
        if self.oidc_issuer and not (self.oidc_client_id and self.oidc_client_secret):
            raise ConfigError("oidc_issuer needs oidc_client_id and oidc_client_secret")
        for name in ("access_token_seconds", "refresh_token_seconds", "auth_code_seconds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive")
        return self

    def auth_enabled(self) -> bool:
        """Auth is on when asked for, or by default whenever the gateway is reachable beyond loopback."""
        if self.auth != "auto":
            return self.auth == "on"
        return bool(self.public_url) or not is_loopback_host(self.host)

    def store_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{Path(self.data_dir or default_data_dir()) / 'bastion.db'}"


def is_loopback_host(host: str) -> bool:
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_data_dir() -> str:
    return os.environ.get("MCP_BASTION_DATA_DIR") or platformdirs.user_data_dir("mcp-bastion")


def _coerce(name: str, current: Any, raw: Any) -> Any:
    if isinstance(current, tuple):
        if isinstance(raw, str):
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if isinstance(raw, list):
            return tuple(str(x) for x in raw)
        raise ConfigError(f"{name}: expected a list")
    if isinstance(current, bool):
        return str(raw).lower() in ("1", "true", "yes", "on") if isinstance(raw, str) else bool(raw)
    try:
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    return None if raw is None else str(raw)


def apply(settings: GatewaySettings, values: Mapping[str, Any], source: str) -> GatewaySettings:
    known = {f.name: f for f in fields(GatewaySettings)}
    changes: dict[str, Any] = {}
    for key, raw in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        changes[name] = _coerce(name, getattr(settings, name), raw)
    return replace(settings, **changes)


def from_environment(settings: GatewaySettings, environ: Mapping[str, str] | None = None) -> GatewaySettings:
    env = os.environ if environ is None else environ
    values = {}
    for f in fields(GatewaySettings):
        key = "MCP_BASTION_" + f.name.upper()
        if key in env:
            values[f.name] = env[key]
    return apply(settings, values, "environment")


@dataclass(frozen=True)
class LoadedConfig:
    settings: GatewaySettings
    servers: list[ServerConfig]


def load_config_file(path: Path) -> LoadedConfig:
    """Read a ``mcpServers`` JSON file or a TOML gateway file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        settings = GatewaySettings()
        for table in ("gateway", "limits", "auth"):
            if table in data and not isinstance(data[table], dict):
                raise ConfigError(f"{path}: [{table}] must be a table")
        gateway = dict(data.get("gateway") or {})
        gateway.update(data.get("limits") or {})
        gateway.update(data.get("auth") or {})
        servers_file = gateway.pop("servers_file", None) or gateway.pop("mcp_servers_file", None)
        settings = apply(settings, gateway, str(path))
        servers: list[ServerConfig] = []
        if servers_file:
            json_path = (path.parent / str(servers_file)).resolve()
            servers.extend(load_config_file(json_path).servers)
        inline = data.get("servers") or data.get("mcpServers") or {}
        servers.extend(parse_mcp_servers({"mcpServers": inline}, str(path)) if inline else [])
        return LoadedConfig(settings, servers)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    return LoadedConfig(GatewaySettings(), parse_mcp_servers(data, str(path)))

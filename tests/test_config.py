"""Configuration: mcpServers JSON in every client's shape, TOML gateway files, environment, secrets.

Everything is parsed from in-memory values, except ``load_config_file`` and ``file:``
secrets, which read small files written to pytest's ``tmp_path``.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_bastion.config import (
    ConfigError,
    GatewaySettings,
    ServerConfig,
    apply,
    from_environment,
    load_config_file,
    parse_mcp_servers,
    parse_server,
    resolve_mapping,
    resolve_secret,
)
from mcp_bastion.core.names import valid_server_name

FAST = settings(max_examples=100, deadline=None)


def config_error(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --- mcpServers entries: the shapes clients write --------------------------------------------


def test_claude_desktop_stdio_entry() -> None:
    data = {
        "mcpServers": {
            "filesystem": {
                "command": "npx",
                "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"],
                "env": {"TOKEN": "env:GITHUB_TOKEN", "PLAIN": "x"},
            }
        }
    }
    [server] = parse_mcp_servers(data)
    assert server == ServerConfig(
        "filesystem",
        "stdio",
        command="npx",
        args=("-y", "@modelcontextprotocol/server-filesystem", "/tmp"),
        env={"TOKEN": "env:GITHUB_TOKEN", "PLAIN": "x"},
    )
    # Secret references stay references until use.
    assert server.env["TOKEN"] == "env:GITHUB_TOKEN"
    assert (server.isolation, server.era, server.timeout, server.url, server.cwd) == (
        "shared",
        "auto",
        30.0,
        None,
        None,
    )


def test_cursor_remote_entries() -> None:
    data = {
        "mcpServers": {
            "remote": {"url": "https://example.com/mcp", "headers": {"Authorization": "env:AUTH"}},
            "legacy": {"url": "http://localhost:3000/sse", "type": "sse"},
        }
    }
    remote, legacy = parse_mcp_servers(data)
    assert remote == ServerConfig(
        "remote", "http", url="https://example.com/mcp", headers={"Authorization": "env:AUTH"}
    )
    assert legacy.transport == "sse" and legacy.url == "http://localhost:3000/sse"


def test_vs_code_shape() -> None:
    data = {
        "inputs": [{"type": "promptString", "id": "key"}],
        "servers": {
            "local": {"type": "stdio", "command": "python", "args": ["server.py"], "cwd": "/srv"},
            "web": {"type": "http", "url": "https://example.com/mcp"},
            "old": {"type": "sse", "url": "https://example.com/sse"},
        },
    }
    local, web, old = parse_mcp_servers(data)
    assert (local.transport, local.command, local.args, local.cwd) == (
        "stdio",
        "python",
        ("server.py",),
        "/srv",
    )
    assert (web.transport, old.transport) == ("http", "sse")


def test_mcp_servers_key_wins_over_servers() -> None:
    data = {"mcpServers": {"a": {"command": "x"}}, "servers": {"b": {"command": "y"}}}
    assert [s.name for s in parse_mcp_servers(data)] == ["a"]


def test_servers_keep_file_order() -> None:
    names = ["zeta", "alpha", "mid"]
    data = {"mcpServers": {n: {"command": "run"} for n in names}}
    assert [s.name for s in parse_mcp_servers(data)] == names


@pytest.mark.parametrize("kind", [None, "http", "streamable-http", "streamableHttp", "streamable_http"])
@pytest.mark.parametrize("key", ["type", "transport"])
def test_http_spellings(kind: str | None, key: str) -> None:
    entry: dict[str, Any] = {"url": "https://x.example/mcp"}
    if kind is not None:
        entry[key] = kind
    assert parse_server("s", entry).transport == "http"


@pytest.mark.parametrize("key", ["type", "transport"])
def test_sse_spelling(key: str) -> None:
    assert parse_server("s", {"url": "https://x.example/sse", key: "sse"}).transport == "sse"


def test_transport_takes_precedence_over_type() -> None:
    assert parse_server("s", {"url": "https://x/mcp", "type": "http", "transport": "sse"}).transport == "sse"
    assert parse_server("s", {"url": "https://x/mcp", "type": "sse", "transport": "http"}).transport == "http"


def test_options() -> None:
    server = parse_server("s", {"command": "x", "isolation": "session", "era": "modern", "timeout": 5})
    assert (server.isolation, server.era, server.timeout) == ("session", "modern", 5.0)
    assert isinstance(server.timeout, float)
    assert parse_server("s", {"command": "x", "era": "legacy", "timeout": 0.5}).era == "legacy"
    assert parse_server("s", {"command": "x", "env": None, "args": None}).env == {}


def test_redacted_hides_values() -> None:
    server = parse_server(
        "s", {"command": "run", "env": {"SECRET": "hunter2"}, "headers": {"X-Key": "hunter3"}}
    )
    red = server.redacted()
    assert red == {"name": "s", "transport": "stdio", "command": "run", "env": ["SECRET"]}
    assert "hunter2" not in json.dumps(red)
    remote = parse_server("r", {"url": "https://x/mcp", "headers": {"B": "v2", "A": "v1"}})
    assert remote.redacted() == {
        "name": "r",
        "transport": "http",
        "url": "https://x/mcp",
        "headers": ["A", "B"],
    }


# --- mcpServers entries: errors -----------------------------------------------------------


@pytest.mark.parametrize("name", ["", "-x", "has space", "under_score", "a/b", "é", "x" * 65])
def test_bad_server_names(name: str) -> None:
    msg = config_error(parse_server, name, {"command": "x"})
    assert repr(name) in msg and "names are 1-64" in msg


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("npx", "must be an object"),
        (["npx"], "must be an object"),
        (None, "must be an object"),
        ({}, "needs either 'command' (stdio) or 'url' (remote)"),
        ({"args": ["x"]}, "needs either"),
        ({"command": ""}, "command must be a non-empty string"),
        ({"command": ["npx"]}, "command must be a non-empty string"),
        ({"command": "x", "args": "a b"}, "args must be a list of strings"),
        ({"command": "x", "args": [1]}, "args must be a list of strings"),
        ({"command": "x", "cwd": 5}, "cwd must be a string"),
        ({"command": "x", "type": "http"}, "a 'command' entry is a stdio server, not 'http'"),
        ({"command": "x", "transport": "sse"}, "a 'command' entry is a stdio server, not 'sse'"),
        ({"url": "ftp://x"}, "url must be an http:// or https:// URL"),
        ({"url": "example.com/mcp"}, "url must be an http:// or https:// URL"),
        ({"url": 5}, "url must be an http:// or https:// URL"),
        (
            {"url": "https://x", "type": "websocket"},
            "type/transport must be 'http' or 'sse', not 'websocket'",
        ),
        ({"url": "https://x", "type": "stdio"}, "type/transport must be 'http' or 'sse'"),
        ({"command": "x", "isolation": "per-user"}, "isolation must be 'shared' or 'session'"),
        ({"command": "x", "era": "2025"}, "era must be 'auto', 'legacy' or 'modern'"),
        ({"command": "x", "timeout": 0}, "timeout must be a positive number"),
        ({"command": "x", "timeout": -1}, "timeout must be a positive number"),
        ({"command": "x", "timeout": "30"}, "timeout must be a positive number"),
        ({"command": "x", "env": ["A=1"]}, "env must map strings to strings"),
        ({"command": "x", "env": {"A": 1}}, "env must map strings to strings"),
        ({"url": "https://x", "headers": {"A": None}}, "headers must map strings to strings"),
        ({"url": "https://x", "headers": "Authorization: x"}, "headers must map strings to strings"),
    ],
)
def test_bad_entries(entry: Any, fragment: str) -> None:
    msg = config_error(parse_server, "srv", entry)
    assert msg.startswith("server 'srv': ")
    assert fragment in msg


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([], "expected an object"),
        ("x", "expected an object"),
        ({}, 'expected {"mcpServers": {...}}'),
        ({"mcpServers": []}, 'expected {"mcpServers": {...}}'),
        ({"mcpServers": None}, 'expected {"mcpServers": {...}}'),
        ({"servers": "x"}, 'expected {"mcpServers": {...}}'),
    ],
)
def test_bad_documents(data: Any, fragment: str) -> None:
    msg = config_error(parse_mcp_servers, data, "/etc/claude.json")
    assert msg.startswith("/etc/claude.json: ") and fragment in msg


def test_first_bad_server_is_named() -> None:
    data = {"mcpServers": {"good": {"command": "x"}, "bad": {"url": "nope"}}}
    assert "server 'bad'" in config_error(parse_mcp_servers, data)


def test_empty_server_table_is_allowed_here() -> None:
    assert parse_mcp_servers({"mcpServers": {}}) == []


# --- property tests -------------------------------------------------------------------------

ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
good_names = st.builds(
    lambda h, t: h + t, st.sampled_from(ALNUM), st.text(alphabet=ALNUM + ".-", max_size=63)
)
str_maps = st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)


@st.composite
def entries(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    kind = draw(st.sampled_from(["stdio", "http", "sse"]))
    entry: dict[str, Any]
    if kind == "stdio":
        entry = {
            "command": draw(st.text(min_size=1, max_size=10)),
            "args": draw(st.lists(st.text(max_size=5))),
        }
        entry["env"] = draw(str_maps)
        if draw(st.booleans()):
            entry["type"] = "stdio"
    else:
        scheme = draw(st.sampled_from(["http://", "https://"]))
        entry = {"url": scheme + draw(st.text(max_size=10)), "headers": draw(str_maps)}
        spelled = draw(st.sampled_from(["sse"] if kind == "sse" else [None, "http", "streamable-http"]))
        if spelled is not None:
            entry[draw(st.sampled_from(["type", "transport"]))] = spelled
    if draw(st.booleans()):
        entry["isolation"] = draw(st.sampled_from(["shared", "session"]))
    if draw(st.booleans()):
        entry["timeout"] = draw(st.floats(min_value=0.001, max_value=1e6) | st.integers(1, 10**6))
    return entry, kind


@given(st.dictionaries(good_names, entries(), max_size=5))
@FAST
def test_any_well_formed_document_parses(servers: dict[str, tuple[dict[str, Any], str]]) -> None:
    data = {"mcpServers": {name: entry for name, (entry, _) in servers.items()}}
    parsed = parse_mcp_servers(json.loads(json.dumps(data)))
    assert [s.name for s in parsed] == list(servers)
    for server in parsed:
        entry, kind = servers[server.name]
        assert server.transport == kind
        if kind == "stdio":
            assert server.command == entry["command"] and server.args == tuple(entry["args"])
            assert dict(server.env) == entry["env"]
        else:
            assert server.url == entry["url"] and dict(server.headers) == entry["headers"]
        assert server.isolation == entry.get("isolation", "shared")
        assert server.timeout == float(entry.get("timeout", 30.0))


@given(st.text(max_size=70))
@FAST
def test_server_names_are_checked_with_the_shared_rule(name: str) -> None:
    if valid_server_name(name):
        assert parse_server(name, {"command": "x"}).name == name
    else:
        assert "names are 1-64" in config_error(parse_server, name, {"command": "x"})


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=5),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "command",
                        "url",
                        "args",
                        "env",
                        "type",
                        "transport",
                        "timeout",
                        "headers",
                        "cwd",
                        "era",
                        "isolation",
                    ]
                ),
                c,
                max_size=5,
            )
        ),
        max_leaves=10,
    )
)
@settings(max_examples=200, deadline=None)
def test_arbitrary_entries_raise_only_config_errors(entry: Any) -> None:
    try:
        server = parse_server("s", entry)
    except ConfigError as exc:
        assert str(exc).startswith("server 's': ")
    else:
        assert server.transport in ("stdio", "http", "sse")


# --- secret references ----------------------------------------------------------------------


def test_literal_secrets_pass_through() -> None:
    for value in ("", "hunter2", "ENV:X", "envy", "file", "https://x"):
        assert resolve_secret(value) == value


def test_env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_TEST_TOKEN", "s3cret")
    assert resolve_secret("env:BASTION_TEST_TOKEN") == "s3cret"
    monkeypatch.setenv("BASTION_TEST_EMPTY", "")
    assert resolve_secret("env:BASTION_TEST_EMPTY") == ""


def test_env_secret_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASTION_TEST_MISSING", raising=False)
    msg = config_error(resolve_secret, "env:BASTION_TEST_MISSING")
    assert msg == "secret reference env:BASTION_TEST_MISSING: variable is not set"


def test_file_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "token"
    secret.write_text("  abc123\n\n")
    assert resolve_secret(f"file:{secret}") == "abc123"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_secret("file:~/token") == "abc123"


def test_file_secret_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    msg = config_error(resolve_secret, f"file:{missing}")
    assert msg.startswith(f"secret reference file:{missing}: ")
    assert "No such file" in msg


def test_resolve_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_TEST_A", "1")
    assert resolve_mapping({"A": "env:BASTION_TEST_A", "B": "lit"}) == {"A": "1", "B": "lit"}
    assert resolve_mapping({}) == {}


# --- gateway settings ---------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    s = GatewaySettings().validated()
    assert (s.host, s.port, s.prefix_mode, s.separator) == ("127.0.0.1", 8080, "always", "_")


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"prefix_mode": "none"}, "prefix_mode must be 'always' or 'on-collision'"),
        ({"separator": ""}, "separator must be 1-4 characters"),
        ({"separator": "_____"}, "separator must be 1-4 characters"),
        ({"port": -1}, "port must be positive"),
        ({"max_body_bytes": 0}, "max_body_bytes must be positive"),
        ({"max_sessions": 0}, "max_sessions must be positive"),
        ({"max_concurrent_per_session": -5}, "max_concurrent_per_session must be positive"),
        ({"coalesce_ms": -1}, "coalesce_ms must be between 0 and 50"),
        ({"coalesce_ms": 50.5}, "coalesce_ms must be between 0 and 50"),
    ],
)
def test_invalid_settings(changes: dict[str, Any], fragment: str) -> None:
    assert fragment in config_error(apply(GatewaySettings(), changes, "test").validated)


def test_port_zero_and_short_separators_are_fine() -> None:
    assert apply(
        GatewaySettings(), {"port": 0, "separator": "::", "prefix_mode": "on-collision"}, "t"
    ).validated()


def test_apply_coerces_values() -> None:
    s = apply(
        GatewaySettings(),
        {
            "port": "9000",
            "max-body-bytes": 10,  # dashes are accepted for underscores
            "session_idle_seconds": "60",
            "keepalive_seconds": 5,
            "allowed_hosts": "a.example, b.example:*,,",
            "allowed_origins": ["https://x", 5],
            "public_url": "https://gw.example",
            "log_level": "debug",
        },
        "test",
    )
    assert s.port == 9000 and s.max_body_bytes == 10
    assert s.session_idle_seconds == 60.0 and isinstance(s.keepalive_seconds, float)
    assert s.allowed_hosts == ("a.example", "b.example:*")
    assert s.allowed_origins == ("https://x", "5")
    assert s.public_url == "https://gw.example" and s.log_level == "debug"


def test_apply_errors() -> None:
    assert config_error(apply, GatewaySettings(), {"prot": 1}, "gw.toml") == "gw.toml: unknown setting 'prot'"
    assert (
        config_error(apply, GatewaySettings(), {"port": "eighty"}, "x")
        == "port: expected a number, got 'eighty'"
    )
    assert "expected a number" in config_error(apply, GatewaySettings(), {"session_idle_seconds": [1]}, "x")
    assert (
        config_error(apply, GatewaySettings(), {"allowed_hosts": 5}, "x") == "allowed_hosts: expected a list"
    )


def test_apply_does_not_mutate() -> None:
    base = GatewaySettings()
    apply(base, {"port": 1}, "t")
    assert base.port == 8080


def test_environment_overrides() -> None:
    env = {
        "MCP_BASTION_PORT": "9100",
        "MCP_BASTION_HOST": "0.0.0.0",
        "MCP_BASTION_ALLOWED_HOSTS": "a,b",
        "MCP_BASTION_PREFIX_MODE": "on-collision",
        "MCP_BASTION_REQUEST_TIMEOUT_SECONDS": "12.5",
        "MCP_BASTION_NOT_A_SETTING": "ignored",
        "OTHER": "ignored",
    }
    s = from_environment(GatewaySettings(), env)
    assert (s.port, s.host, s.allowed_hosts, s.prefix_mode) == (9100, "0.0.0.0", ("a", "b"), "on-collision")
    assert s.request_timeout_seconds == 12.5
    assert from_environment(GatewaySettings(), {}) == GatewaySettings()


def test_every_setting_has_an_environment_variable() -> None:
    env = {"MCP_BASTION_" + f.name.upper(): "7" for f in fields(GatewaySettings)}
    s = from_environment(GatewaySettings(), env)
    assert s.port == 7 and s.max_sessions == 7 and s.keepalive_seconds == 7.0
    assert s.host == "7" and s.allowed_hosts == ("7",) and s.public_url == "7"


def test_environment_errors_are_config_errors() -> None:
    assert "port: expected a number" in config_error(
        from_environment, GatewaySettings(), {"MCP_BASTION_PORT": "x"}
    )
    msg = config_error(
        from_environment(GatewaySettings(), {"MCP_BASTION_PREFIX_MODE": "sometimes"}).validated
    )
    assert "prefix_mode" in msg


def test_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_BASTION_PORT", "9200")
    assert from_environment(GatewaySettings()).port == 9200


def test_precedence_flags_over_environment_over_file(tmp_path: Path) -> None:
    toml = tmp_path / "gw.toml"
    toml.write_text("[gateway]\nport = 9000\nhost = '0.0.0.0'\nlog_level = 'warning'\n")
    from_file = load_config_file(toml).settings
    from_env = from_environment(from_file, {"MCP_BASTION_PORT": "9001", "MCP_BASTION_LOG_LEVEL": "debug"})
    final = apply(from_env, {"port": 9002}, "command line")
    assert (final.port, final.log_level, final.host) == (9002, "debug", "0.0.0.0")


# --- files ----------------------------------------------------------------------------------


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "claude_desktop_config.json"
    path.write_text(json.dumps({"mcpServers": {"a": {"command": "x"}, "b": {"url": "https://b/mcp"}}}))
    loaded = load_config_file(path)
    assert loaded.settings == GatewaySettings()
    assert [(s.name, s.transport) for s in loaded.servers] == [("a", "stdio"), ("b", "http")]


def test_json_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    assert config_error(load_config_file, missing).startswith(f"{missing}: ")
    broken = tmp_path / "broken.json"
    broken.write_text("{ nope")
    assert config_error(load_config_file, broken).startswith(f"{broken}: invalid JSON: ")
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"mcp": {}}')
    assert config_error(load_config_file, wrong) == f'{wrong}: expected {{"mcpServers": {{...}}}}'
    bad_server = tmp_path / "bad.json"
    bad_server.write_text('{"mcpServers": {"x y": {"command": "c"}}}')
    assert "server 'x y'" in config_error(load_config_file, bad_server)


def test_toml_gateway_file(tmp_path: Path) -> None:
    path = tmp_path / "bastion.toml"
    path.write_text(
        """
[gateway]
host = "0.0.0.0"
port = 9000
public_url = "https://gw.example.com"
allowed_hosts = ["gw.example.com", "localhost:*"]
prefix_mode = "on-collision"
separator = "__"

[limits]
max_body_bytes = 1048576
max_sessions = 50
request_timeout_seconds = 60

[servers.notes]
command = "python"
args = ["notes.py"]
env = { NOTES_DIR = "/data", TOKEN = "env:NOTES_TOKEN" }

[servers.remote]
url = "https://remote.example/mcp"
transport = "sse"
headers = { Authorization = "file:/run/secrets/remote" }
isolation = "session"
"""
    )
    loaded = load_config_file(path)
    s = loaded.settings
    assert (s.host, s.port, s.public_url) == ("0.0.0.0", 9000, "https://gw.example.com")
    assert s.allowed_hosts == ("gw.example.com", "localhost:*")
    assert (s.prefix_mode, s.separator) == ("on-collision", "__")
    assert (s.max_body_bytes, s.max_sessions, s.request_timeout_seconds) == (1048576, 50, 60.0)
    assert s.validated() is s
    notes, remote = loaded.servers
    assert (notes.name, notes.transport, notes.args) == ("notes", "stdio", ("notes.py",))
    assert notes.env == {"NOTES_DIR": "/data", "TOKEN": "env:NOTES_TOKEN"}
    assert (remote.transport, remote.isolation, remote.headers) == (
        "sse",
        "session",
        {"Authorization": "file:/run/secrets/remote"},
    )


def test_toml_servers_file_is_relative_to_the_toml(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "servers.json").write_text(
        json.dumps({"mcpServers": {"fromjson": {"command": "a"}}})
    )
    toml = tmp_path / "conf" / "gw.toml"
    toml.write_text(
        '[gateway]\nservers_file = "servers.json"\nport = 1234\n\n[servers.inline]\nurl = "https://i/mcp"\n'
    )
    loaded = load_config_file(toml)
    assert [s.name for s in loaded.servers] == ["fromjson", "inline"]
    assert loaded.settings.port == 1234


@pytest.mark.parametrize("table", ["gateway", "limits"])
def test_toml_mcp_servers_file_alias(tmp_path: Path, table: str) -> None:
    (tmp_path / "s.json").write_text(
        json.dumps({"servers": {"vs": {"type": "http", "url": "https://v/mcp"}}})
    )
    toml = tmp_path / "gw.toml"
    toml.write_text(f'[{table}]\nmcp_servers_file = "s.json"\n')
    assert [s.name for s in load_config_file(toml).servers] == ["vs"]


def test_toml_mcp_servers_table_and_no_servers(tmp_path: Path) -> None:
    toml = tmp_path / "a.TOML"  # the suffix is matched case-insensitively
    toml.write_text('[mcpServers.x]\ncommand = "run"\n')
    assert [s.name for s in load_config_file(toml).servers] == ["x"]
    empty = tmp_path / "empty.toml"
    empty.write_text("[gateway]\nport = 1\n")
    assert load_config_file(empty).servers == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[gateway\nport = 1", "gw.toml: "),
        ("[gateway]\nprot = 1\n", "unknown setting 'prot'"),
        ("[limits]\nmax_sessions = 'many'\n", "max_sessions: expected a number, got 'many'"),
        ("[gateway]\nservers_file = 'nope.json'\n", "nope.json: "),
        ("[servers.bad]\nurl = 'gopher://x'\n", "server 'bad': url must be an http:// or https:// URL"),
        ("[servers.'bad name']\ncommand = 'x'\n", "server 'bad name'"),
        ("servers = 5\n", 'expected {"mcpServers": {...}}'),
    ],
)
def test_toml_errors(tmp_path: Path, text: str, fragment: str) -> None:
    toml = tmp_path / "gw.toml"
    toml.write_text(text)
    assert fragment in config_error(load_config_file, toml)


@pytest.mark.parametrize("text", ['gateway = "0.0.0.0"\n', "gateway = [1, 2]\n", "limits = 5\n"])
def test_toml_non_table_sections_are_config_errors(tmp_path: Path, text: str) -> None:
    toml = tmp_path / "gw.toml"
    toml.write_text(text)
    config_error(load_config_file, toml)

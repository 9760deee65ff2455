"""The admin commands (``clients``, ``users``, ``keys``) run as real ``python -m mcp_bastion`` processes.

Standard output is a contract (scripts capture a client id, a secret, an API key), so each test checks
it line by line, and then checks the effect through the store itself, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_bastion.admin import MAX_EXPIRY, parse_expiry, redirect_uri_problem
from mcp_bastion.auth.secrets import hash_secret
from mcp_bastion.auth.store import Store
from tests.support import postgres

pytestmark = pytest.mark.timeout(300)

BASTION = [sys.executable, "-m", "mcp_bastion"]
KEY = re.compile(r"mcpb_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")
T = TypeVar("T")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_BASTION_")}
    env.update(extra)
    return env


def run(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """One CLI invocation; without ``stdin`` its standard input is /dev/null (no terminal)."""
    return subprocess.run(
        [*BASTION, *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=120,
        env=env or clean_env(),
        check=False,
    )


def lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.stdout.endswith("\n"), proc.stdout
    return proc.stdout.splitlines()


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def fails(proc: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.stdout == ""
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@dataclass
class Backend:
    args: list[str]  # how the CLI is pointed at the store
    url: str  # the same store, for checking from this process

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(*args, *self.args, stdin=stdin)

    def check(self, action: Callable[[Store], Awaitable[T]]) -> T:
        async def go() -> T:
            store = await Store.open(self.url)
            try:
                return await action(store)
            finally:
                await store.close()

        return asyncio.run(go())


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        data = tmp_path / "data"
        yield Backend(["--data-dir", str(data)], f"sqlite+aiosqlite:///{data / 'bastion.db'}")
        return
    with postgres.database_sync() as url:
        yield Backend(["--database-url", url], url)


# ---- clients ----------------------------------------------------------------------------------------


def test_clients(backend: Backend) -> None:
    public = ok(backend.cli("clients", "add", "Inspector", "--redirect-uri", "http://127.0.0.1:6274/cb"))
    [public_id] = lines(public)
    assert re.fullmatch(r"[0-9a-f]{32}", public_id)
    assert "Inspector" in public.stderr

    conf = ok(
        backend.cli(
            "clients",
            "add",
            "Conformance suite",
            "--redirect-uri",
            "https://app.example.com/callback",
            "--redirect-uri",
            "http://localhost:3000/callback",
            "--confidential",
        )
    )
    conf_id, conf_secret = lines(conf)  # exactly two lines: client id, then client secret
    assert re.fullmatch(r"[0-9a-f]{32}", conf_id) and re.fullmatch(r"[A-Za-z0-9_-]{43}", conf_secret)

    pub_rec = backend.check(lambda s: s.get_client(public_id))
    assert pub_rec is not None
    assert pub_rec.name == "Inspector" and pub_rec.kind == "static" and pub_rec.is_public
    assert pub_rec.application_type == "native" and pub_rec.secret_hash is None
    conf_rec = backend.check(lambda s: s.get_client(conf_id))
    assert conf_rec is not None
    assert conf_rec.redirect_uris == ["https://app.example.com/callback", "http://localhost:3000/callback"]
    assert conf_rec.token_endpoint_auth_method == "client_secret_basic"
    assert conf_rec.application_type == "web"
    assert conf_rec.secret_hash == hash_secret(conf_secret)

    listed = ok(backend.cli("clients", "list"))
    table = lines(listed)
    assert table[0].split() == ["ID", "NAME", "KIND", "REDIRECT", "URIS", "CREATED"]
    assert any(row.startswith(public_id) and "Inspector" in row for row in table[1:])
    assert conf_secret not in listed.stdout
    as_json = json.loads(ok(backend.cli("clients", "list", "--json")).stdout)
    assert {c["client_id"] for c in as_json} == {public_id, conf_id}

    ok(backend.cli("clients", "remove", public_id))
    fails(backend.cli("clients", "remove", public_id), 1, "no client")
    assert backend.check(lambda s: s.get_client(public_id)) is None
    assert public_id not in ok(backend.cli("clients", "list")).stdout


# ---- users ------------------------------------------------------------------------------------------


def test_users(backend: Backend) -> None:
    added = ok(backend.cli("users", "add", "alice", "--password-stdin", stdin="correct horse\n"))
    assert added.stdout == ""
    assert backend.check(lambda s: s.verify_user("alice", "correct horse"))

    # no terminal and no --password-stdin: a clear error, nothing stored
    fails(backend.cli("users", "add", "bob"), 2, "--password-stdin")
    assert backend.check(lambda s: s.get_user("bob")) is None

    fails(backend.cli("users", "add", "alice", "--password-stdin", stdin="another one\n"), 1, "exists")

    ok(backend.cli("users", "passwd", "alice", "--password-stdin", stdin="battery staple\n"))
    assert backend.check(lambda s: s.verify_user("alice", "battery staple"))
    assert not backend.check(lambda s: s.verify_user("alice", "correct horse"))
    fails(backend.cli("users", "passwd", "nobody", "--password-stdin", stdin="whatever12\n"), 1, "no user")

    table = lines(ok(backend.cli("users", "list")))
    assert table[0].split() == ["USERNAME", "CREATED", "STATUS"]
    assert [row.split()[0] for row in table[1:]] == ["alice"]

    ok(backend.cli("users", "remove", "alice"))
    fails(backend.cli("users", "remove", "alice"), 1, "no user")
    assert backend.check(lambda s: s.list_users()) == []


# ---- keys -------------------------------------------------------------------------------------------


def test_keys(backend: Backend) -> None:
    created = ok(
        backend.cli("keys", "create", "--name", "ci", "--servers", "notes,files", "--expires", "30d")
    )
    [key] = lines(created)  # the key, as the only line
    assert KEY.fullmatch(key)
    assert key not in created.stderr
    record = backend.check(lambda s: s.find_api_key(key))
    assert record is not None and record.name == "ci" and record.servers == ["files", "notes"]
    assert record.expires_at is not None
    assert timedelta(days=29, hours=23) < record.expires_at - datetime.now(UTC) <= timedelta(days=30)

    [everything] = lines(ok(backend.cli("keys", "create", "--name", "all-servers")))
    assert KEY.fullmatch(everything)
    rec_all = backend.check(lambda s: s.find_api_key(everything))
    assert rec_all is not None and rec_all.servers is None and rec_all.expires_at is None

    fails(backend.cli("keys", "create", "--name", "ci"), 1, "exists")

    listed = ok(backend.cli("keys", "list"))
    table = lines(listed)
    assert table[0].split() == ["NAME", "ID", "SERVERS", "CREATED", "EXPIRES", "REVOKED", "LAST", "USED"]
    assert key not in listed.stdout and everything not in listed.stdout
    rows = {row.split()[0]: row.split() for row in table[1:]}
    assert rows["ci"][1] == record.key_id and rows["ci"][2] == "files,notes"
    assert rows["all-servers"][2] == "all" and rows["all-servers"][4] == "never"
    as_json = {k["name"]: k for k in json.loads(ok(backend.cli("keys", "list", "--json")).stdout)}
    assert as_json["ci"]["id"] == record.key_id and as_json["ci"]["last_used_at"] is not None
    assert as_json["all-servers"]["revoked_at"] is None

    ok(backend.cli("keys", "revoke", "ci"))
    assert backend.check(lambda s: s.find_api_key(key)) is None
    ok(backend.cli("keys", "revoke", rec_all.key_id))
    assert backend.check(lambda s: s.find_api_key(everything)) is None
    fails(backend.cli("keys", "revoke", "nope"), 1, "no key")
    # a revoked key's name can be used again
    [again] = lines(ok(backend.cli("keys", "create", "--name", "ci", "--expires", "never")))
    assert backend.check(lambda s: s.find_api_key(again)) is not None


# ---- bad usage, configuration, unreachable store ----------------------------------------------------


def test_bad_usage_exits_2_and_stores_nothing(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    fails(run("keys", "create", "--name", "bad name", *data), 2, "invalid key name")
    fails(run("keys", "create", "--name", "k", "--expires", "30x", *data), 2, "--expires")
    fails(run("keys", "create", "--name", "k", "--expires", "0d", *data), 2, "--expires")
    fails(run("keys", "create", "--name", "k", "--servers", "a/b", *data), 2, "not a server name")
    fails(run("keys", "create", "--name", "k", "--servers", ",", *data), 2, "--servers")
    fails(run("clients", "add", "App", "--redirect-uri", "http://example.com/cb", *data), 2, "loopback")
    fails(run("clients", "add", "App", "--redirect-uri", "https://x.example/cb#frag", *data), 2, "fragment")
    fails(run("clients", "add", "App", "--redirect-uri", "/relative", *data), 2, "absolute")
    fails(run("clients", "add", " ", "--redirect-uri", "https://x.example/cb", *data), 2, "client name")
    missing = run("clients", "add", "App", *data)
    assert missing.returncode == 2 and missing.stdout == "" and "--redirect-uri" in missing.stderr
    fails(run("users", "add", "no spaces", "--password-stdin", *data, stdin="password12\n"), 2, "user name")
    fails(run("users", "add", "carol", "--password-stdin", *data, stdin="short\n"), 2, "at least")
    fails(run("users", "add", "carol", "--password-stdin", *data, stdin=""), 2, "no password")
    assert not (tmp_path / "data" / "bastion.db").exists()


def test_config_file_and_environment_choose_the_store(tmp_path: Path) -> None:
    from_toml, from_env, from_flag = tmp_path / "toml", tmp_path / "env", tmp_path / "flag"
    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\ndata_dir = "{from_toml}"\n\n[servers.notes]\ncommand = "true"\n')

    [k1] = lines(ok(run("keys", "create", "--name", "one", "--config", str(config))))
    assert (from_toml / "bastion.db").exists()
    # the environment beats the file, a flag beats both
    env = clean_env(MCP_BASTION_DATA_DIR=str(from_env))
    ok(run("keys", "create", "--name", "two", "--config", str(config), env=env))
    assert (from_env / "bastion.db").exists()
    ok(
        run(
            "keys",
            "create",
            "--name",
            "three",
            "--config",
            str(config),
            "--data-dir",
            str(from_flag),
            env=env,
        )
    )
    assert (from_flag / "bastion.db").exists()
    url_env = clean_env(MCP_BASTION_DATABASE_URL=f"sqlite:///{from_toml / 'bastion.db'}")
    table = ok(run("keys", "list", env=url_env)).stdout
    assert "one" in table and "two" not in table

    # with --config, servers the file does not define are warned about (the key is still made)
    warned = ok(run("keys", "create", "--name", "four", "--servers", "notes,other", "--config", str(config)))
    assert len(lines(warned)) == 1
    assert re.search(r"^warning: not in .*gateway\.toml: other$", warned.stderr, re.MULTILINE), warned.stderr
    assert KEY.fullmatch(k1)


def test_unreachable_database_is_a_clear_error() -> None:
    proc = run("keys", "list", "--database-url", "postgresql+asyncpg://postgres:s3cret@127.0.0.1:1/x")
    fails(proc, 1, "cannot use the store at postgresql+asyncpg://postgres:***@127.0.0.1:1/x")
    assert "s3cret" not in proc.stderr


# ---- parsers ----------------------------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["d", "h", "m"]))
def test_expires_parses_every_valid_lifetime(n: int, unit: str) -> None:
    delta = {"d": timedelta(days=n), "h": timedelta(hours=n), "m": timedelta(minutes=n)}[unit]
    if delta > MAX_EXPIRY:
        with pytest.raises(ValueError, match="at most"):
            parse_expiry(f"{n}{unit}")
    else:
        assert parse_expiry(f"{n}{unit}") == delta
        assert parse_expiry(f" {n}{unit.upper()} ") == delta


@given(st.text())
def test_expires_refuses_everything_else(text: str) -> None:
    value = text.strip().lower()
    if value == "never":
        assert parse_expiry(text) is None
        return
    if re.fullmatch(r"[0-9]{1,9}[dhm]", value) and int(value[:-1]) >= 1:
        return  # valid lifetimes are the test above
    with pytest.raises(ValueError):
        parse_expiry(text)


@given(
    st.sampled_from(["127.0.0.1", "[::1]", "localhost", "127.5.6.7"]),
    st.one_of(st.none(), st.integers(min_value=1, max_value=65535)),
    st.from_regex(r"(/[a-z0-9_-]{0,12}){0,3}", fullmatch=True),
)
def test_loopback_redirect_uris_are_accepted(host: str, port: int | None, path: str) -> None:
    uri = f"http://{host}{'' if port is None else f':{port}'}{path}"
    assert redirect_uri_problem(uri) is None
    assert redirect_uri_problem(uri.replace("http://", "https://", 1)) is None
    assert redirect_uri_problem(uri + "#x") is not None


def test_redirect_uri_rules() -> None:
    assert redirect_uri_problem("https://claude.ai/api/mcp/auth_callback") is None
    assert redirect_uri_problem("com.example.app:/oauth/callback") is None
    assert redirect_uri_problem("http://192.168.1.2/cb") is not None
    assert redirect_uri_problem("http://localhost.evil.example/cb") is not None
    assert redirect_uri_problem("javascript:alert(1)") is not None
    assert redirect_uri_problem("https:///nohost") is not None
    assert redirect_uri_problem("https://a.example/c b") is not None
    assert redirect_uri_problem("") is not None

"""Admin commands on the auth store: ``clients`` (pre-registered OAuth clients), ``users``, ``keys``.

Standard output carries only what scripts capture (a client id and secret, an API key, list tables);
everything meant for a person goes to standard error. Exit status: 0 done, 1 not found or already
exists (or the store is unreachable), 2 bad usage.
"""

from __future__ import annotations

import asyncio
import getpass
import ipaddress
import json
import re
import secrets as _random
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional, TypeVar
from urllib.parse import urlsplit

import typer
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from .auth.secrets import hash_secret, new_secret
from .auth.store import (
    AlreadyExists,
    AuthMethod,
    ClientRecord,
    Store,
    normalize_url,
    valid_key_name,
    valid_username,
)
from .config import ConfigError, GatewaySettings, apply, default_data_dir, from_environment, load_config_file
from .core.names import valid_server_name

T = TypeVar("T")

EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
MIN_PASSWORD_CHARS = 8
MAX_CLIENT_NAME_CHARS = 200
# --expires is bounded so the date stays representable (and a typo does not mean "forever").
MAX_EXPIRY = timedelta(days=36_500)
_EXPIRY = re.compile(r"^([0-9]{1,9})([dhm])$")
_UNITS = {"d": timedelta(days=1), "h": timedelta(hours=1), "m": timedelta(minutes=1)}

_HELP = {"help_option_names": ["-h", "--help"]}
clients_app = typer.Typer(
    help="Pre-registered OAuth clients of the authorization server.",
    no_args_is_help=True,
    context_settings=_HELP,
)
users_app = typer.Typer(
    help="Local users who sign in with a password.", no_args_is_help=True, context_settings=_HELP
)
keys_app = typer.Typer(
    help="API keys: bearer tokens for API connectors and scripts.",
    no_args_is_help=True,
    context_settings=_HELP,
)

ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional here
    typer.Option(
        "--config",
        "-c",
        help="Read data_dir and database_url from this TOML gateway file (as serve does).",
        exists=True,
        dir_okay=False,
    ),
]
DataDirOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--data-dir", help="Where state is kept (env MCP_BASTION_DATA_DIR); the store is bastion.db."
    ),
]
DatabaseUrlOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--database-url",
        help="SQLAlchemy URL of the store, e.g. postgresql+asyncpg://user@host/db "
        "(env MCP_BASTION_DATABASE_URL; default: SQLite in the data dir).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
PasswordStdinOpt = Annotated[
    bool,
    typer.Option("--password-stdin", help="Read the password from the first line of standard input."),
]


# ---- plumbing ---------------------------------------------------------------------------------------


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"mcp-bastion: {message}", err=True)
    raise typer.Exit(code)


@dataclass(frozen=True)
class _Target:
    url: str
    servers: list[str] | None  # the configured server names, when --config was given


def _target(config: Path | None, data_dir: Path | None, database_url: str | None) -> _Target:
    """The store URL by the same precedence as serve: flags > environment > config file > defaults."""
    try:
        loaded = load_config_file(config) if config else None
        settings = from_environment(loaded.settings if loaded else GatewaySettings())
        flags = {"data_dir": str(data_dir) if data_dir else None, "database_url": database_url}
        settings = apply(settings, {k: v for k, v in flags.items() if v}, "command line")
        if not settings.data_dir:
            settings = apply(settings, {"data_dir": default_data_dir()}, "default")
        url = normalize_url(settings.store_url())
        make_url(url)
    except ConfigError as exc:
        _fail(str(exc))
    except ArgumentError:
        _fail("--database-url: not a database URL (e.g. postgresql+asyncpg://user@host/db)")
    return _Target(url, [s.name for s in loaded.servers] if loaded else None)


def _with_store(target: _Target, action: Callable[[Store], Awaitable[T]]) -> T:
    async def run() -> T:
        store = await Store.open(target.url)
        try:
            return await action(store)
        finally:
            await store.close()

    from alembic.util import CommandError  # alembic is slow to import; only store commands need it

    try:
        return asyncio.run(run())
    except (OSError, SQLAlchemyError, CommandError) as exc:
        where = make_url(target.url).render_as_string(hide_password=True)
        _fail(f"cannot use the store at {where}: {exc}", EXIT_NOT_FOUND)


def _when(t: datetime | None, none: str = "-") -> str:
    return none if t is None else t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso(t: datetime | None) -> str | None:
    return None if t is None else _when(t)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> None:
    if not rows:
        _say(empty)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in (headers, *rows):
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


# ---- validation -------------------------------------------------------------------------------------


def parse_expiry(text: str) -> timedelta | None:
    """``Nd``, ``Nh``, ``Nm`` (days, hours, minutes; N >= 1) or ``never`` (None)."""
    value = text.strip().lower()
    if value == "never":
        return None
    m = _EXPIRY.fullmatch(value)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"--expires: expected Nd, Nh, Nm (e.g. 30d, 12h, 90m) or never, got {text!r}")
    delta = int(m.group(1)) * _UNITS[m.group(2)]
    if delta > MAX_EXPIRY:
        raise ValueError(f"--expires: at most {MAX_EXPIRY.days} days (or never)")
    return delta


def _loopback_host(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redirect_uri_problem(uri: str) -> str | None:
    """Why ``uri`` cannot be a redirect URI (OAuth 2.1 / RFC 8252), or None if it can."""
    if not uri or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        return "must be a URI without spaces"
    try:
        parts = urlsplit(uri)
        host = parts.hostname
    except ValueError:
        return "is not a valid URI"
    scheme = parts.scheme.lower()
    if not scheme:
        return "must be an absolute URI"
    if "#" in uri:
        return "must not contain a fragment (#...)"
    if scheme == "https":
        return None if host else "needs a host"
    if scheme == "http":
        return (
            None if _loopback_host(host) else "http is allowed only on loopback (127.0.0.1, [::1], localhost)"
        )
    if "." in scheme:  # private-use scheme of a native app, RFC 8252 section 7.1
        return None
    return "use https, http on a loopback address, or a private-use scheme such as com.example.app:/callback"


def _native(uri: str) -> bool:
    parts = urlsplit(uri)
    return parts.scheme.lower() != "https" and (
        parts.scheme.lower() != "http" or _loopback_host(parts.hostname)
    )


def _check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        _fail(f"the password must be at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > 1024:
        _fail("the password is longer than 1024 characters")
    return password


def _read_password(password_stdin: bool) -> str:
    """From stdin's first line with --password-stdin, else asked twice on a terminal (never echoed)."""
    if password_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            _fail("--password-stdin: no password on standard input")
        return _check_password(password)
    if not sys.stdin.isatty():
        _fail("standard input is not a terminal: pass --password-stdin and write the password to stdin")
    try:
        first = getpass.getpass("Password: ")
        second = getpass.getpass("Password (again): ")
    except (EOFError, KeyboardInterrupt):
        _fail("no password given")
    if first != second:
        _fail("the passwords do not match")
    return _check_password(first)


def _check_username(username: str) -> None:
    if not valid_username(username):
        _fail(
            f"invalid user name {username!r}: 1-64 letters, digits, '.', '_', '@', '+' or '-', "
            "starting with a letter or digit"
        )


# ---- clients ----------------------------------------------------------------------------------------


@clients_app.command("add")
def clients_add(
    name: Annotated[str, typer.Argument(help="Shown on the consent page (e.g. 'Conformance suite').")],
    redirect_uri: Annotated[
        list[str],
        typer.Option(
            "--redirect-uri",
            help="Where the client receives the code (repeatable; exact match, any port on loopback).",
        ),
    ],
    confidential: Annotated[
        bool, typer.Option("--confidential", help="Issue a client secret (printed once, second line).")
    ] = False,
    auth_method: Annotated[
        str,
        typer.Option(
            "--auth-method",
            help="With --confidential: client_secret_basic (default) or client_secret_post.",
        ),
    ] = "client_secret_basic",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Register a client; prints its client id (and with --confidential, its secret on a second line).

    Redirect URIs that are all loopback or private-use make a native client (RFC 8252: any port on
    loopback); otherwise a web client.
    """
    name = name.strip()
    if not name or len(name) > MAX_CLIENT_NAME_CHARS or not name.isprintable():
        _fail(f"the client name must be 1-{MAX_CLIENT_NAME_CHARS} printable characters")
    if not redirect_uri:
        _fail("give at least one --redirect-uri")
    for uri in redirect_uri:
        problem = redirect_uri_problem(uri)
        if problem:
            _fail(f"--redirect-uri {uri!r}: {problem}")
    if auth_method not in ("client_secret_basic", "client_secret_post"):
        _fail("--auth-method must be client_secret_basic or client_secret_post")
    target = _target(config, data_dir, database_url)
    secret = new_secret() if confidential else None
    method: AuthMethod = "none"
    if secret:
        method = "client_secret_post" if auth_method == "client_secret_post" else "client_secret_basic"
    record = ClientRecord(
        client_id=_random.token_hex(16),
        name=name,
        redirect_uris=list(dict.fromkeys(redirect_uri)),
        secret_hash=hash_secret(secret) if secret else None,
        kind="static",
        application_type="native" if all(_native(u) for u in redirect_uri) else "web",
        token_endpoint_auth_method=method,
    )
    _with_store(target, lambda store: store.add_client(record))
    typer.echo(record.client_id)
    if secret:
        typer.echo(secret)
        _say(f"registered confidential client {name!r}: client id, then client secret (shown only now)")
    else:
        _say(f"registered public client {name!r} ({record.application_type})")


@clients_app.command("list")
def clients_list(
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Every registered client: pre-registered, dynamically registered (dcr) and metadata-document (cimd)."""
    target = _target(config, data_dir, database_url)
    records = _with_store(target, lambda store: store.list_clients())
    if as_json:
        _json(
            [
                {
                    "client_id": c.client_id,
                    "name": c.name,
                    "kind": c.kind,
                    "application_type": c.application_type,
                    "token_endpoint_auth_method": c.token_endpoint_auth_method,
                    "redirect_uris": c.redirect_uris,
                    "created_at": _iso(c.created_at),
                    "expires_at": _iso(c.expires_at),
                }
                for c in records
            ]
        )
        return
    rows = [[c.client_id, c.name, c.kind, " ".join(c.redirect_uris), _when(c.created_at)] for c in records]
    _table(["ID", "NAME", "KIND", "REDIRECT URIS", "CREATED"], rows, "no clients")


@clients_app.command("remove")
def clients_remove(
    client_id: Annotated[str, typer.Argument(help="The client id, as printed by 'clients add' or 'list'.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Remove a client; its refresh tokens stop working and its consents are forgotten."""
    target = _target(config, data_dir, database_url)
    if not _with_store(target, lambda store: store.remove_client(client_id)):
        _fail(f"no client {client_id!r}", EXIT_NOT_FOUND)
    _say(f"removed client {client_id}")


# ---- users ------------------------------------------------------------------------------------------


@users_app.command("add")
def users_add(
    username: Annotated[str, typer.Argument(help="1-64 letters, digits, '.', '_', '@', '+' or '-'.")],
    password_stdin: PasswordStdinOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Add a local user (the password is asked twice on a terminal, or read with --password-stdin)."""
    _check_username(username)
    target = _target(config, data_dir, database_url)
    password = _read_password(password_stdin)

    async def add(store: Store) -> bool:
        try:
            await store.add_user(username, password)
        except AlreadyExists:
            return False
        return True

    if not _with_store(target, add):
        _fail(f"user {username!r} exists already (use 'users passwd' to change the password)", EXIT_NOT_FOUND)
    _say(f"added user {username}")


@users_app.command("list")
def users_list(
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Every local user."""
    target = _target(config, data_dir, database_url)
    records = _with_store(target, lambda store: store.list_users())
    if as_json:
        _json(
            [
                {"username": u.username, "created_at": _iso(u.created_at), "disabled": u.disabled}
                for u in records
            ]
        )
        return
    rows = [[u.username, _when(u.created_at), "disabled" if u.disabled else "active"] for u in records]
    _table(["USERNAME", "CREATED", "STATUS"], rows, "no users")


@users_app.command("remove")
def users_remove(
    username: Annotated[str, typer.Argument()],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Remove a user; their grants (refresh tokens and the access tokens from them) are revoked."""
    target = _target(config, data_dir, database_url)
    if not _with_store(target, lambda store: store.remove_user(username)):
        _fail(f"no user {username!r}", EXIT_NOT_FOUND)
    _say(f"removed user {username}")


@users_app.command("passwd")
def users_passwd(
    username: Annotated[str, typer.Argument()],
    password_stdin: PasswordStdinOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Set a user's password."""
    target = _target(config, data_dir, database_url)
    if _with_store(target, lambda store: store.get_user(username)) is None:
        _fail(f"no user {username!r}", EXIT_NOT_FOUND)
    password = _read_password(password_stdin)
    if not _with_store(target, lambda store: store.set_password(username, password)):
        _fail(f"no user {username!r}", EXIT_NOT_FOUND)
    _say(f"changed the password of {username}")


# ---- API keys ---------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    name: Annotated[
        str, typer.Option("--name", help="1-64 letters, digits, '.', '_' or '-'; unique among active keys.")
    ],
    servers: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--servers", help="Comma-separated servers the key may reach (default: all)."),
    ] = None,
    expires: Annotated[
        str, typer.Option("--expires", help="Lifetime: Nd, Nh, Nm (e.g. 30d) or never (the default).")
    ] = "never",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Create an API key and print it once, as the only line on standard output; it is stored hashed."""
    if not valid_key_name(name):
        _fail(
            f"invalid key name {name!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    server_list: list[str] | None = None
    if servers is not None:
        server_list = [s.strip() for s in servers.split(",") if s.strip()]
        if not server_list:
            _fail("--servers: give at least one server name (or leave it out for all servers)")
        bad = [s for s in server_list if not valid_server_name(s)]
        if bad:
            _fail(f"--servers: not a server name: {', '.join(bad)}")
    try:
        lifetime = parse_expiry(expires)
    except ValueError as exc:
        _fail(str(exc))
    target = _target(config, data_dir, database_url)
    if server_list and target.servers is not None:
        unknown = sorted(set(server_list) - set(target.servers))
        if unknown:
            _say(f"warning: not in {config}: {', '.join(unknown)}")
    expires_at = None if lifetime is None else datetime.now(UTC) + lifetime

    async def create(store: Store) -> tuple[str, str] | None:
        try:
            record, plaintext = await store.create_api_key(name, server_list, expires_at)
        except AlreadyExists:
            return None
        return record.key_id, plaintext

    created = _with_store(target, create)
    if created is None:
        _fail(f"an active key named {name!r} exists already (revoke it first)", EXIT_NOT_FOUND)
    key_id, plaintext = created
    typer.echo(plaintext)
    _say(
        f"created key {name} (id {key_id}; servers: {', '.join(server_list) if server_list else 'all'}; "
        f"expires: {_when(expires_at, 'never')}). It is shown only now: store it safely."
    )


@keys_app.command("list")
def keys_list(
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Every API key (never the key itself)."""
    target = _target(config, data_dir, database_url)
    records = _with_store(target, lambda store: store.list_api_keys())
    if as_json:
        _json(
            [
                {
                    "name": k.name,
                    "id": k.key_id,
                    "servers": k.servers,
                    "created_at": _iso(k.created_at),
                    "expires_at": _iso(k.expires_at),
                    "revoked_at": _iso(k.revoked_at),
                    "last_used_at": _iso(k.last_used_at),
                }
                for k in records
            ]
        )
        return
    rows = [
        [
            k.name,
            k.key_id,
            ",".join(k.servers) if k.servers is not None else "all",
            _when(k.created_at),
            _when(k.expires_at, "never"),
            _when(k.revoked_at),
            _when(k.last_used_at, "never"),
        ]
        for k in records
    ]
    _table(["NAME", "ID", "SERVERS", "CREATED", "EXPIRES", "REVOKED", "LAST USED"], rows, "no keys")


@keys_app.command("revoke")
def keys_revoke(
    name_or_id: Annotated[str, typer.Argument(metavar="NAME_OR_ID", help="The key's id or name.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Revoke a key at once (the gateway may accept it for up to 5 more seconds from its cache)."""
    target = _target(config, data_dir, database_url)
    if not _with_store(target, lambda store: store.revoke_api_key(name_or_id)):
        _fail(f"no key {name_or_id!r}", EXIT_NOT_FOUND)
    _say(f"revoked key {name_or_id}")


# ---- tunnel connectors ------------------------------------------------------------------------------

connectors_app = typer.Typer(
    help="Tunnel connectors: private machines that dial out to this gateway and bring their servers.",
    no_args_is_help=True,
    context_settings=_HELP,
)


@connectors_app.command("add")
def connectors_add(
    name: Annotated[
        str, typer.Argument(help="1-64 letters, digits, '.', '_' or '-'; unique among active connectors.")
    ],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Add a connector and print its token once, as the only line on standard output (stored hashed)."""
    if not valid_key_name(name):
        _fail(
            f"invalid connector name {name!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    target = _target(config, data_dir, database_url)

    async def add(store: Store) -> tuple[str, str] | None:
        try:
            record, token = await store.create_connector(name)
        except AlreadyExists:
            return None
        return record.id, token

    created = _with_store(target, add)
    if created is None:
        _fail(f"an active connector named {name!r} exists already (revoke it first)", EXIT_NOT_FOUND)
    connector_id, token = created
    typer.echo(token)
    _say(
        f"added connector {name} (id {connector_id}). Its token is shown only now: on the private machine "
        "run  mcp-bastion connect https://<this gateway> --token <token> --config servers.json"
    )


@connectors_app.command("list")
def connectors_list(
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Every connector: attached or not, since when, from where, and its servers (never the token)."""
    target = _target(config, data_dir, database_url)
    records = _with_store(target, lambda store: store.list_connectors())
    now = datetime.now(UTC)
    if as_json:
        _json(
            [
                {
                    "name": c.name,
                    "id": c.id,
                    "attached": c.attached(now),
                    "since": _iso(c.last_connected_at) if c.attached(now) else None,
                    "last_connected_at": _iso(c.last_connected_at),
                    "last_seen_at": _iso(c.last_seen_at),
                    "from": c.last_address,
                    "servers": c.servers,
                    "created_at": _iso(c.created_at),
                    "revoked_at": _iso(c.revoked_at),
                }
                for c in records
            ]
        )
        return
    rows = [
        [
            c.name,
            c.id,
            "yes" if c.attached(now) else "no",
            _when(c.last_connected_at, "never"),
            c.last_address or "-",
            ",".join(c.servers) or "-",
            _when(c.revoked_at),
        ]
        for c in records
    ]
    _table(["NAME", "ID", "ATTACHED", "SINCE", "FROM", "SERVERS", "REVOKED"], rows, "no connectors")


@connectors_app.command("revoke")
def connectors_revoke(
    name_or_id: Annotated[str, typer.Argument(metavar="NAME_OR_ID", help="The connector's id or name.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Revoke a connector: its token stops working and a running gateway closes its link within seconds."""
    target = _target(config, data_dir, database_url)
    if not _with_store(target, lambda store: store.revoke_connector(name_or_id)):
        _fail(f"no connector {name_or_id!r}", EXIT_NOT_FOUND)
    _say(f"revoked connector {name_or_id}")


__all__ = ["clients_app", "connectors_app", "keys_app", "parse_expiry", "redirect_uri_problem", "users_app"]

"""The ``mcp-bastion`` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .config import (
    MAX_COALESCE_MS,
    ConfigError,
    GatewaySettings,
    ServerConfig,
    apply,
    default_data_dir,
    from_environment,
    load_config_file,
    parse_server,
)

app = typer.Typer(
    name="mcp-bastion",
    help="Put any MCP server behind one endpoint that every MCP client, in every protocol era, can use.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# The long-running commands never need the admin commands' database libraries (SQLAlchemy alone adds
# ~10 MB to every gateway and connector process): those are loaded only for any other command line.
RUNNERS = ("expose", "serve", "connect")


def _add_admin_commands() -> None:
    from . import admin

    app.add_typer(admin.clients_app, name="clients")
    app.add_typer(admin.users_app, name="users")
    app.add_typer(admin.keys_app, name="keys")
    app.add_typer(admin.connectors_app, name="connectors")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mcp-bastion {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        Optional[bool],  # noqa: UP045 - typer needs Optional here
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """mcp-bastion: an MCP gateway, bridge and tunnel."""


HostOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--host", help="Address to listen on (default 127.0.0.1; env MCP_BASTION_HOST)."),
]
PortOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--port", "-p", help="Port to listen on (default 8080; env MCP_BASTION_PORT)."),
]
PublicUrlOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--public-url",
        help="The URL clients use to reach this gateway (behind a TLS proxy); "
        "its host is allowed as Host and Origin.",
    ),
]
AllowHostOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option(
        "--allow-host",
        help="Extra Host header value to accept (repeatable; 'name:*' any port; '*' disables the check).",
    ),
]
AllowOriginOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option(
        "--allow-origin", help="Extra browser Origin to accept (repeatable; '*' disables the check)."
    ),
]
DataDirOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--data-dir", help="Where state is kept (env MCP_BASTION_DATA_DIR; default: the user's data dir)."
    ),
]
AuthOpt = Annotated[
    Optional[bool],  # noqa: UP045
    typer.Option(
        "--auth/--no-auth",
        help="Require sign-in on every MCP endpoint (default: on when listening beyond loopback or with "
        "--public-url). --no-auth beyond loopback is logged as a warning at every start.",
        show_default=False,
    ),
]
DatabaseUrlOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--database-url",
        help="SQLAlchemy URL of the sign-in store, e.g. postgresql+asyncpg://user@host/db "
        "(default: SQLite file bastion.db in the data dir; env MCP_BASTION_DATABASE_URL).",
    ),
]
LogLevelOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--log-level", help="debug, info, warning or error (env MCP_BASTION_LOG_LEVEL)."),
]


def _auth_flag(value: bool | None) -> str | None:
    return None if value is None else ("on" if value else "off")


def _settings(base: GatewaySettings, **flags: object) -> GatewaySettings:
    settings = from_environment(base)
    values = {k: v for k, v in flags.items() if v is not None and v != []}
    settings = apply(settings, values, "command line")
    if not settings.data_dir:
        settings = apply(settings, {"data_dir": default_data_dir()}, "default")
    return settings.validated()


def _fail(message: str) -> None:
    typer.echo(f"mcp-bastion: {message}", err=True)
    raise typer.Exit(2)


def _run(settings: GatewaySettings, servers: list[ServerConfig], single: bool) -> None:
    from . import logs
    from .gateway import Gateway, run

    logs.configure(settings.log_level, settings.log_format)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    run(Gateway(settings, servers, single=single))


@app.command(context_settings={"allow_interspersed_args": False})
def expose(
    command: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Argument(help="The stdio server to run, after '--': COMMAND [ARGS...]."),
    ] = None,
    url: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--url", help="Front a remote Streamable HTTP or SSE server instead of a command."),
    ] = None,
    transport: Annotated[
        str,
        typer.Option("--transport", help="With --url: 'http' (Streamable HTTP), 'sse', or 'auto' (by path)."),
    ] = "auto",
    name: Annotated[str, typer.Option("--name", help="The server's name in logs.")] = "server",
    env: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--env", "-e", help="KEY=VALUE for the child (repeatable); VALUE may be env:NAME or file:PATH."
        ),
    ] = None,
    header: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--header",
            "-H",
            help="'Name: value' sent to the --url server (repeatable; secret references allowed).",
        ),
    ] = None,
    isolation: Annotated[
        str,
        typer.Option("--isolation", help="'shared': one child for all sessions; 'session': one per session."),
    ] = "shared",
    host: HostOpt = None,
    port: PortOpt = None,
    public_url: PublicUrlOpt = None,
    allow_host: AllowHostOpt = None,
    allow_origin: AllowOriginOpt = None,
    data_dir: DataDirOpt = None,
    auth: AuthOpt = None,
    database_url: DatabaseUrlOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Serve one MCP server at http://HOST:PORT/mcp (Streamable HTTP, both eras) and /sse (legacy HTTP+SSE).

    Example: mcp-bastion expose --port 8080 -- npx -y @modelcontextprotocol/server-everything
    """
    try:
        settings = _settings(
            GatewaySettings(),
            host=host,
            port=port,
            public_url=public_url,
            allowed_hosts=allow_host,
            allowed_origins=allow_origin,
            data_dir=str(data_dir) if data_dir else None,
            auth=_auth_flag(auth),
            database_url=database_url,
            log_level=log_level,
        )
        entry: dict[str, object] = {"isolation": isolation}
        if url and command:
            _fail("give either --url or a command after '--', not both")
        if url:
            entry["url"] = url
            kind = (
                transport if transport != "auto" else ("sse" if url.rstrip("/").endswith("/sse") else "http")
            )
            entry["type"] = kind
            entry["headers"] = dict(_pair(h, ":") for h in header or [])
        elif command:
            entry["command"] = command[0]
            entry["args"] = command[1:]
            entry["env"] = dict(_pair(e, "=") for e in env or [])
        else:
            _fail("nothing to expose: give a command after '--' or --url URL")
        server = parse_server(name, entry)
    except ConfigError as exc:
        _fail(str(exc))
        return
    _run(settings, [server], single=True)


def _pair(text: str, sep: str) -> tuple[str, str]:
    if sep not in text:
        raise ConfigError(f"expected NAME{sep}VALUE, got {text!r}")
    key, value = text.split(sep, 1)
    return key.strip(), value.strip()


@app.command()
def serve(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            help="An mcpServers JSON file (Claude Desktop, Cursor, VS Code) or a TOML gateway file.",
            exists=True,
            dir_okay=False,
        ),
    ],
    prefix_mode: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--prefix-mode", help="Aggregated names: 'always' <server>_<name> (default) or 'on-collision'."
        ),
    ] = None,
    separator: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--separator", help="Between server and tool name in aggregated names (default '_')."),
    ] = None,
    host: HostOpt = None,
    port: PortOpt = None,
    public_url: PublicUrlOpt = None,
    allow_host: AllowHostOpt = None,
    allow_origin: AllowOriginOpt = None,
    data_dir: DataDirOpt = None,
    auth: AuthOpt = None,
    database_url: DatabaseUrlOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Serve every server in FILE: each at /servers/<name>/mcp (and /sse), all of them at /mcp (and /sse)."""
    try:
        loaded = load_config_file(config)
        settings = _settings(
            loaded.settings,
            host=host,
            port=port,
            public_url=public_url,
            allowed_hosts=allow_host,
            allowed_origins=allow_origin,
            data_dir=str(data_dir) if data_dir else None,
            auth=_auth_flag(auth),
            database_url=database_url,
            log_level=log_level,
            prefix_mode=prefix_mode,
            separator=separator,
        )
    except ConfigError as exc:
        _fail(str(exc))
        return
    if not loaded.servers:
        # A gateway for tunnel connectors only: their servers join while it runs.
        typer.echo(f"mcp-bastion: {config}: no servers of its own; serving connectors' servers", err=True)
    _run(settings, loaded.servers, single=False)


@app.command()
def connect(
    url: Annotated[str, typer.Argument(help="The gateway's URL, e.g. https://gateway.example.com")],
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            help="The servers to offer: an mcpServers JSON file (as for serve), optionally with "
            'per-server "tools": {"allow": [...], "deny": [...]}.',
            exists=True,
            dir_okay=False,
        ),
    ],
    token: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--token",
            help="The connector token from 'mcp-bastion connectors add' (or env:NAME, file:PATH; "
            "default: env MCP_BASTION_CONNECTOR_TOKEN).",
            show_default=False,
        ),
    ] = None,
    ca_bundle: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--ca-bundle", help="PEM bundle to verify the gateway with (private PKI).", exists=True),
    ] = None,
    name: Annotated[
        str, typer.Option("--name", help="The connector's name; the gateway checks it matches the token.")
    ] = "",
    insecure_http: Annotated[
        bool,
        typer.Option(
            "--insecure-http", help="Allow a plain http:// gateway beyond loopback (token in clear)."
        ),
    ] = False,
    heartbeat: Annotated[
        float, typer.Option("--heartbeat", help="Seconds between heartbeats; 3 missed: the link is dead.")
    ] = 10.0,
    coalesce_ms: Annotated[
        int,
        typer.Option(
            "--coalesce-ms",
            help="The read-coalescing window: while a server is queueing, leave the link and its output "
            "unread after each read for a quarter of what its calls wait (1 to 8 windows), so that "
            "each wake-up carries a batch (0: read every message at once).",
            min=0,
            max=int(MAX_COALESCE_MS),
        ),
    ] = 2,
    log_level: LogLevelOpt = None,
) -> None:
    """Dial out to a gateway and serve the servers in FILE through it (nothing listens here).

    Example: mcp-bastion connect https://gateway.example.com --token env:BASTION_TOKEN --config servers.json
    """
    from . import logs
    from .config import resolve_secret
    from .tunnel.connector import Connector, ConnectorError
    from .tunnel.connector import run as run_connector

    raw = token or os.environ.get("MCP_BASTION_CONNECTOR_TOKEN", "")
    if not raw:
        _fail("give the connector token: --token TOKEN (or env:NAME, file:PATH)")
    if not heartbeat > 0:
        _fail("--heartbeat must be positive")
    try:
        secret = resolve_secret(raw)
        loaded = load_config_file(config)
        level = from_environment(loaded.settings).log_level if log_level is None else log_level
        logs.configure(level, "json")
        connector = Connector(
            url,
            secret.strip(),
            loaded.servers,
            name=name,
            ca_bundle=str(ca_bundle) if ca_bundle else None,
            insecure_http=insecure_http,
            heartbeat_seconds=heartbeat,
            coalesce_seconds=coalesce_ms / 1000,
        )
    except (ConfigError, ConnectorError) as exc:
        _fail(str(exc))
        return
    raise typer.Exit(run_connector(connector))


def main() -> None:
    # `expose -- cmd --flag`: everything after '--' belongs to the child.
    argv = sys.argv[1:]
    if "--" in argv:
        idx = argv.index("--")
        head, tail = argv[:idx], argv[idx + 1 :]
        sys.argv = [sys.argv[0], *head, "--", *tail]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command not in RUNNERS:
        _add_admin_commands()
    app()


if __name__ == "__main__":
    main()

"""The auth store: clients, users, API keys, codes, refresh tokens, signing keys, consents.

SQLAlchemy 2 Core on an async engine: SQLite (aiosqlite) by default, PostgreSQL (asyncpg) by URL, so
several gateway processes can share one database. The schema is owned by the alembic migrations in
``migrations/``, which :meth:`Store.open` applies before returning.

Single-use things (authorization codes, refresh tokens, pending transactions) are spent with a
conditional ``UPDATE ... WHERE used_at IS NULL`` whose row count decides who won, so two processes can
never both use one. Every write transaction starts with its write (never a read first): SQLite then
takes its write lock up front instead of failing a lock upgrade. Secrets are stored as SHA-256 hex
(they are 256-bit random values); passwords as argon2id.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets as _random
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Index,
    MetaData,
    Row,
    String,
    Table,
    Text,
    and_,
    delete,
    event,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from ..core.names import valid_server_name
from .passwords import hash_password, needs_rehash, verify_password
from .secrets import hash_secret, new_secret

__all__ = [
    "AlreadyExists",
    "ApiKeyRecord",
    "ClientRecord",
    "CodeRecord",
    "RefreshRecord",
    "RefreshResult",
    "SigningKeyRecord",
    "Store",
    "StoreError",
    "UserRecord",
    "normalize_url",
    "valid_key_name",
    "valid_username",
]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The newest revision in migrations/versions/ (a test keeps the two in step).
SCHEMA_HEAD = "0002"
API_KEY_PREFIX = "mcpb_"
REFRESH_TOKEN_PREFIX = "mcpbrt_"
CODE_PREFIX = "mcpbac_"
# A key's last_used_at is written at most this often, so busy keys do not write on every request.
LAST_USED_RESOLUTION = timedelta(seconds=60)
# Held (transaction-scoped) while migrating PostgreSQL, so replicas starting together migrate once.
_PG_MIGRATION_LOCK = 0x6D637062  # "mcpb"

_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")


class StoreError(Exception):
    """The store cannot do what was asked; the message says why."""


class AlreadyExists(StoreError):
    """A record with that name or id exists already."""


def valid_username(name: str) -> bool:
    """User names appear in subjects (``user:<name>``) and credential mappings, so they are kept plain."""
    return bool(_USERNAME.fullmatch(name))


def valid_key_name(name: str) -> bool:
    """Key names appear in identities (``key:<name>``) and on the command line, so they are kept plain."""
    return bool(_KEY_NAME.fullmatch(name))


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(t: datetime) -> datetime:
    """Refuse naive datetimes at the API boundary: their meaning depends on the host's time zone."""
    if t.tzinfo is None:
        raise ValueError("the auth store takes timezone-aware datetimes")
    return t


# ---- schema (the runtime view; migrations/versions/ are the source of truth) -------------------------


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps naive UTC text, compared as text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("the auth store takes timezone-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

clients = Table(
    "clients",
    metadata,
    Column("client_id", String(2048), primary_key=True),
    Column("name", Text, nullable=False),
    Column("redirect_uris", JSON, nullable=False),
    Column("secret_hash", String(64)),
    Column("kind", String(16), nullable=False),
    Column("application_type", String(16), nullable=False),
    Column("token_endpoint_auth_method", String(32), nullable=False),
    Column("grant_types", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime),
)

users = Table(
    "users",
    metadata,
    Column("username", String(64), primary_key=True),
    Column("password_hash", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("disabled", Boolean, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("servers", JSON),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime),
    Column("revoked_at", UTCDateTime),
    Column("last_used_at", UTCDateTime),
    Index(
        "ux_api_keys_active_name",
        "name",
        unique=True,
        sqlite_where=text("revoked_at IS NULL"),
        postgresql_where=text("revoked_at IS NULL"),
    ),
)

auth_codes = Table(
    "auth_codes",
    metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("client_id", String(2048), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("code_challenge", String(128), nullable=False),
    Column("resource", Text, nullable=False),
    Column("scope", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("nonce", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("used_at", UTCDateTime),
    Column("family_id", String(128), nullable=False),
)

token_families = Table(
    "token_families",
    metadata,
    Column("family_id", String(128), primary_key=True),
    Column("client_id", String(2048), nullable=False),
    Column("subject", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, index=True),
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("family_id", String(128), nullable=False, index=True),
    Column("client_id", String(2048), nullable=False),
    Column("subject", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("resource", Text, nullable=False),
    Column("scope", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("used_at", UTCDateTime),
    Column("revoked_at", UTCDateTime),
)

revoked_access_tokens = Table(
    "revoked_access_tokens",
    metadata,
    Column("jti", String(128), primary_key=True),
    Column("expires_at", UTCDateTime, nullable=False),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(128), primary_key=True),
    Column("private_pem", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("retired_at", UTCDateTime),
)

pending = Table(
    "pending",
    metadata,
    Column("id", String(64), primary_key=True),  # sha256 of the id handed out
    Column("kind", String(32), nullable=False),
    Column("data", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("used_at", UTCDateTime),
)

consents = Table(
    "consents",
    metadata,
    Column("subject", String(512), primary_key=True),
    Column("client_id", String(2048), primary_key=True),
    Column("scope", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

settings = Table(
    "settings",
    metadata,
    Column("key", String(128), primary_key=True),
    Column("value", Text, nullable=False),
)

connectors = Table(
    "connectors",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime),
    Column("last_connected_at", UTCDateTime),
    Column("last_seen_at", UTCDateTime),
    Column("detached_at", UTCDateTime),
    Column("last_address", String(256)),
    Column("servers", JSON),
    Index(
        "ux_connectors_active_name",
        "name",
        unique=True,
        sqlite_where=text("revoked_at IS NULL"),
        postgresql_where=text("revoked_at IS NULL"),
    ),
)


# ---- records ----------------------------------------------------------------------------------------

ClientKind = Literal["static", "dcr", "cimd"]
ApplicationType = Literal["web", "native"]
AuthMethod = Literal["none", "client_secret_basic", "client_secret_post"]
RefreshFailure = Literal["unknown", "expired", "revoked", "reused", "wrong_client"]
PendingKind = Literal["authorize", "oidc_state"]


@dataclass(slots=True)
class ClientRecord:
    """A registered OAuth client; ``secret_hash`` is None for public clients (``none`` auth method)."""

    client_id: str
    name: str
    redirect_uris: list[str]
    secret_hash: str | None = None
    kind: ClientKind = "static"
    application_type: ApplicationType = "web"
    token_endpoint_auth_method: AuthMethod = "none"
    grant_types: list[str] = field(default_factory=lambda: ["authorization_code", "refresh_token"])
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=_now)
    expires_at: datetime | None = None

    @property
    def is_public(self) -> bool:
        return self.token_endpoint_auth_method == "none"


@dataclass(frozen=True, slots=True)
class UserRecord:
    username: str
    created_at: datetime
    disabled: bool


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """An API key without its secret; ``servers`` None means every server."""

    key_id: str
    name: str
    servers: list[str] | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def usable(self, now: datetime | None = None) -> bool:
        now = now or _now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True, slots=True)
class CodeRecord:
    """An authorization code as issued. ``replayed`` is True when it had been used before this consume."""

    client_id: str
    redirect_uri: str
    code_challenge: str
    resource: str
    scope: str
    subject: str
    name: str
    nonce: str | None
    created_at: datetime
    expires_at: datetime
    family_id: str
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class RefreshRecord:
    """What a refresh token grants (the grant it belongs to is ``family_id``)."""

    family_id: str
    client_id: str
    subject: str
    name: str
    resource: str
    scope: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """Outcome of a rotation: ``ok`` with the new ``token`` and its ``record``, or the failure ``reason``.

    ``record`` describes the presented token whenever it was found (for logs), the new one when ``ok``.
    """

    ok: bool
    token: str | None = None
    record: RefreshRecord | None = None
    reason: RefreshFailure | None = None


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    kid: str
    private_pem: str
    created_at: datetime
    retired_at: datetime | None


CONNECTOR_TOKEN_PREFIX = "mcpbc_"
# A gateway refreshes last_seen_at of attached connectors at least this often; a row not refreshed for
# three times as long belongs to a gateway that stopped without saying so, and counts as detached.
CONNECTOR_SEEN_INTERVAL = timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class ConnectorRecord:
    """A tunnel connector without its token; ``servers`` are those it offered when it last attached."""

    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None
    last_connected_at: datetime | None
    last_seen_at: datetime | None
    detached_at: datetime | None
    last_address: str | None
    servers: list[str]

    def attached(self, now: datetime | None = None) -> bool:
        """Whether a gateway reported this connector's link as up (recently enough to be believed)."""
        if self.revoked_at is not None or self.last_connected_at is None or self.last_seen_at is None:
            return False
        if self.detached_at is not None and self.detached_at >= self.last_connected_at:
            return False
        return (now or _now()) - self.last_seen_at < 3 * CONNECTOR_SEEN_INTERVAL


def _connector(row: Row[Any]) -> ConnectorRecord:
    m = row._mapping
    return ConnectorRecord(
        id=m["id"],
        name=m["name"],
        created_at=m["created_at"],
        revoked_at=m["revoked_at"],
        last_connected_at=m["last_connected_at"],
        last_seen_at=m["last_seen_at"],
        detached_at=m["detached_at"],
        last_address=m["last_address"],
        servers=list(m["servers"] or []),
    )


def _client(row: Row[Any]) -> ClientRecord:
    m = row._mapping
    return ClientRecord(
        client_id=m["client_id"],
        name=m["name"],
        redirect_uris=list(m["redirect_uris"]),
        secret_hash=m["secret_hash"],
        kind=m["kind"],
        application_type=m["application_type"],
        token_endpoint_auth_method=m["token_endpoint_auth_method"],
        grant_types=list(m["grant_types"]),
        metadata=dict(m["metadata"]),
        created_at=m["created_at"],
        expires_at=m["expires_at"],
    )


def _api_key(row: Row[Any]) -> ApiKeyRecord:
    m = row._mapping
    return ApiKeyRecord(
        key_id=m["key_id"],
        name=m["name"],
        servers=None if m["servers"] is None else list(m["servers"]),
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        revoked_at=m["revoked_at"],
        last_used_at=m["last_used_at"],
    )


def _code(row: Row[Any], replayed: bool) -> CodeRecord:
    m = row._mapping
    return CodeRecord(
        client_id=m["client_id"],
        redirect_uri=m["redirect_uri"],
        code_challenge=m["code_challenge"],
        resource=m["resource"],
        scope=m["scope"],
        subject=m["subject"],
        name=m["name"],
        nonce=m["nonce"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        family_id=m["family_id"],
        replayed=replayed,
    )


def _refresh(row: Row[Any]) -> RefreshRecord:
    m = row._mapping
    return RefreshRecord(
        family_id=m["family_id"],
        client_id=m["client_id"],
        subject=m["subject"],
        name=m["name"],
        resource=m["resource"],
        scope=m["scope"],
        expires_at=m["expires_at"],
    )


def _scopes(scope: str) -> set[str]:
    return set(scope.split())


def _ttl(ttl: timedelta | float) -> timedelta:
    return ttl if isinstance(ttl, timedelta) else timedelta(seconds=ttl)


# ---- engine and migrations --------------------------------------------------------------------------


def normalize_url(url: str) -> str:
    """Map plain ``sqlite://`` and ``postgresql://`` (``postgres://``) URLs to their async drivers."""
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


SQLITE_WAIT = 30.0  # seconds a SQLite connection waits for another process's lock


def _prepare_sqlite_file(database: str) -> None:
    """Create the database's directory (0700) and the file itself (0600) before SQLite does (umask),
    and put it in WAL mode, which the file keeps (one writer beside many readers, across processes).

    Switching to WAL needs the database to itself: SQLite may refuse at once ("database is locked")
    rather than wait while another process opening it is migrating, so this retries; in a worker
    thread (``asyncio.to_thread``), where waiting blocks nothing."""
    path = Path(database).expanduser()
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    deadline = time.monotonic() + SQLITE_WAIT
    conn = sqlite3.connect(path, timeout=SQLITE_WAIT)
    try:
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL").fetchall()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        conn.close()


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    # The busy timeout is the driver's ``timeout`` connect argument (SQLITE_WAIT), set in Store.open.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _upgrade(connection: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (a no-op when it is there already).

    A database already at ``SCHEMA_HEAD`` is recognised without loading alembic, which is slow to
    import: every admin command and every gateway start opens the store."""
    async with engine.connect() as conn:
        if await conn.run_sync(_revision) == SCHEMA_HEAD:
            return
    async with engine.begin() as conn:
        # Processes opening one database together migrate one after the other: the second finds the
        # schema at head. Both databases have transactional DDL, so a failed migration leaves nothing.
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        elif conn.dialect.name == "sqlite":
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
        await conn.run_sync(_upgrade)


# ---- the store --------------------------------------------------------------------------------------


class Store:
    """Every auth table behind async methods; one instance per process, safe to share between tasks."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @classmethod
    async def open(cls, url: str) -> Store:
        """Connect to ``url`` (``sqlite+aiosqlite:///path`` or ``postgresql+asyncpg://...``) and migrate."""
        url = normalize_url(url)
        parsed = make_url(url)
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database or ""
            if database in ("", ":memory:"):
                kwargs["poolclass"] = StaticPool  # one shared in-memory database
            else:
                await asyncio.to_thread(_prepare_sqlite_file, database)
            kwargs["connect_args"] = {"timeout": SQLITE_WAIT}
        else:
            kwargs["pool_pre_ping"] = True
        engine = create_async_engine(url, **kwargs)
        if parsed.get_backend_name() == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        try:
            await migrate(engine)
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    # ---- clients ----------------------------------------------------------------------------------

    async def add_client(self, client: ClientRecord, *, replace: bool = False) -> None:
        """Register ``client``; ``replace`` overwrites one with that id (CIMD refresh), else AlreadyExists."""
        values = {
            "client_id": client.client_id,
            "name": client.name,
            "redirect_uris": list(client.redirect_uris),
            "secret_hash": client.secret_hash,
            "kind": client.kind,
            "application_type": client.application_type,
            "token_endpoint_auth_method": client.token_endpoint_auth_method,
            "grant_types": list(client.grant_types),
            "metadata": dict(client.metadata),
            "created_at": client.created_at,
            "expires_at": client.expires_at,
        }
        try:
            async with self.engine.begin() as conn:
                if replace:
                    await conn.execute(delete(clients).where(clients.c.client_id == client.client_id))
                await conn.execute(insert(clients).values(**values))
        except IntegrityError:
            raise AlreadyExists(f"client {client.client_id!r} exists already") from None

    async def get_client(self, client_id: str) -> ClientRecord | None:
        """The client, or None if unknown or past its ``expires_at`` (an unknown client re-registers)."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(clients).where(clients.c.client_id == client_id))).first()
        if row is None:
            return None
        client = _client(row)
        if client.expires_at is not None and client.expires_at <= _now():
            return None
        return client

    async def list_clients(self) -> list[ClientRecord]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(clients).order_by(clients.c.created_at, clients.c.client_id))
            return [_client(r) for r in rows]

    async def remove_client(self, client_id: str) -> bool:
        """Forget a client, its consents, and revoke every grant it holds; False if unknown."""
        now = _now()
        async with self.engine.begin() as conn:
            gone = await conn.execute(delete(clients).where(clients.c.client_id == client_id))
            await conn.execute(delete(consents).where(consents.c.client_id == client_id))
            await conn.execute(
                update(token_families)
                .where(token_families.c.client_id == client_id, token_families.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            await conn.execute(
                update(refresh_tokens)
                .where(refresh_tokens.c.client_id == client_id, refresh_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        return gone.rowcount > 0

    # ---- users ------------------------------------------------------------------------------------

    async def add_user(self, username: str, password: str) -> None:
        if not valid_username(username):
            raise ValueError(
                "user names are 1-64 letters, digits, '.', '_', '@', '+' or '-', "
                "starting with a letter or digit"
            )
        hashed = await asyncio.to_thread(hash_password, password)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(users).values(
                        username=username, password_hash=hashed, created_at=_now(), disabled=False
                    )
                )
        except IntegrityError:
            raise AlreadyExists(f"user {username!r} exists already") from None

    async def verify_user(self, username: str, password: str) -> bool:
        """True for the right password of an enabled user; as slow for unknown users as for known ones."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(users.c.password_hash, users.c.disabled).where(users.c.username == username)
                )
            ).first()
        stored = None if row is None else str(row.password_hash)
        ok = await asyncio.to_thread(verify_password, stored, password)
        if not ok or row is None or row.disabled:
            return False
        if needs_rehash(str(stored)):  # parameters were raised since this hash was made
            await self._set_hash(username, await asyncio.to_thread(hash_password, password))
        return True

    async def get_user(self, username: str) -> UserRecord | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(users.c.username, users.c.created_at, users.c.disabled).where(
                        users.c.username == username
                    )
                )
            ).first()
        return None if row is None else UserRecord(row.username, row.created_at, bool(row.disabled))

    async def list_users(self) -> list[UserRecord]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(users.c.username, users.c.created_at, users.c.disabled).order_by(users.c.username)
            )
            return [UserRecord(r.username, r.created_at, bool(r.disabled)) for r in rows]

    async def remove_user(self, username: str) -> bool:
        """Delete a user, their consents, and revoke every grant they hold; False if unknown."""
        subject = f"user:{username}"
        now = _now()
        async with self.engine.begin() as conn:
            gone = await conn.execute(delete(users).where(users.c.username == username))
            await conn.execute(delete(consents).where(consents.c.subject == subject))
            await conn.execute(
                update(token_families)
                .where(token_families.c.subject == subject, token_families.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        return gone.rowcount > 0

    async def set_password(self, username: str, password: str) -> bool:
        """Change a user's password; False if there is no such user."""
        return await self._set_hash(username, await asyncio.to_thread(hash_password, password))

    async def set_user_disabled(self, username: str, disabled: bool) -> bool:
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(users).where(users.c.username == username).values(disabled=disabled)
            )
        return res.rowcount > 0

    async def _set_hash(self, username: str, hashed: str) -> bool:
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(users).where(users.c.username == username).values(password_hash=hashed)
            )
        return res.rowcount > 0

    # ---- API keys ---------------------------------------------------------------------------------

    async def create_api_key(
        self, name: str, servers: Sequence[str] | None, expires_at: datetime | None
    ) -> tuple[ApiKeyRecord, str]:
        """A new key; the plaintext (``mcpb_<key id>_<43 chars>``) is returned here and never again."""
        if not valid_key_name(name):
            raise ValueError(
                "key names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if servers is not None:
            bad = [s for s in servers if not valid_server_name(s)]
            if bad:
                raise ValueError(f"not a server name: {', '.join(bad)}")
            servers = sorted(set(servers))
        if expires_at is not None:
            _aware(expires_at)
        record = ApiKeyRecord(
            key_id=_random.token_hex(6),
            name=name,
            servers=None if servers is None else list(servers),
            created_at=_now(),
            expires_at=expires_at,
            revoked_at=None,
            last_used_at=None,
        )
        plaintext = new_secret(f"{API_KEY_PREFIX}{record.key_id}_")
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(api_keys).values(
                        key_id=record.key_id,
                        name=name,
                        secret_hash=hash_secret(plaintext),
                        servers=record.servers,
                        created_at=record.created_at,
                        expires_at=expires_at,
                    )
                )
        except IntegrityError:
            raise AlreadyExists(f"a key named {name!r} exists already (revoke it first)") from None
        return record, plaintext

    async def find_api_key(self, plaintext: str) -> ApiKeyRecord | None:
        """The key for a presented bearer, or None if malformed, unknown, revoked or expired."""
        parts = plaintext.split("_", 2)
        if len(parts) != 3 or parts[0] + "_" != API_KEY_PREFIX or not _KEY_ID.fullmatch(parts[1]):
            return None
        now = _now()
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(api_keys).where(api_keys.c.secret_hash == hash_secret(plaintext)))
            ).first()
        if row is None:
            return None
        record = _api_key(row)
        if record.key_id != parts[1] or not record.usable(now):
            return None
        if record.last_used_at is None or now - record.last_used_at >= LAST_USED_RESOLUTION:
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(api_keys)
                    .where(
                        api_keys.c.key_id == record.key_id,
                        or_(
                            api_keys.c.last_used_at.is_(None),
                            api_keys.c.last_used_at < now - LAST_USED_RESOLUTION,
                        ),
                    )
                    .values(last_used_at=now)
                )
        return record

    async def list_api_keys(self) -> list[ApiKeyRecord]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id))
            return [_api_key(r) for r in rows]

    async def revoke_api_key(self, name_or_id: str) -> bool:
        """Revoke the key with that id, else the active key with that name; False if there is none.

        Revoking an already revoked key is a success (nothing changes)."""
        return await self._revoke(api_keys, api_keys.c.key_id, name_or_id)

    # ---- authorization codes ----------------------------------------------------------------------

    async def add_code(
        self,
        *,
        client_id: str,
        redirect_uri: str,
        code_challenge: str,
        resource: str,
        scope: str,
        subject: str,
        name: str,
        expires_at: datetime,
        nonce: str | None = None,
        family_id: str | None = None,
    ) -> str:
        """Issue a code for a finished authorization; returns the plaintext code.

        The grant's token family (``family_id``, new if None) is created with it, so a replayed code
        can revoke whatever was minted from the first use."""
        _aware(expires_at)
        code = new_secret(CODE_PREFIX)
        now = _now()
        family_id = family_id or new_secret("fam")
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(auth_codes).values(
                    code_hash=hash_secret(code),
                    client_id=client_id,
                    redirect_uri=redirect_uri,
                    code_challenge=code_challenge,
                    resource=resource,
                    scope=scope,
                    subject=subject,
                    name=name,
                    nonce=nonce,
                    created_at=now,
                    expires_at=expires_at,
                    family_id=family_id,
                )
            )
            await self._ensure_family(conn, family_id, client_id, subject, now)
        return code

    async def consume_code(self, code: str) -> CodeRecord | None:
        """Spend a code: the record the first time; ``replayed=True`` on every later use (the caller
        revokes the family); None if unknown, or expired and never used."""
        code_hash = hash_secret(code)
        now = _now()
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(auth_codes)
                .where(
                    auth_codes.c.code_hash == code_hash,
                    auth_codes.c.used_at.is_(None),
                    auth_codes.c.expires_at > now,
                )
                .values(used_at=now)
            )
            row = (await conn.execute(select(auth_codes).where(auth_codes.c.code_hash == code_hash))).first()
        if row is None:
            return None
        if res.rowcount == 1:
            return _code(row, replayed=False)
        if row.used_at is not None:
            return _code(row, replayed=True)
        return None

    # ---- refresh tokens and grant families ---------------------------------------------------------

    async def _ensure_family(
        self, conn: AsyncConnection, family_id: str, client_id: str, subject: str, now: datetime
    ) -> None:
        """Create the family row unless it exists (INSERT ... ON CONFLICT DO NOTHING: race-free)."""
        values = {"family_id": family_id, "client_id": client_id, "subject": subject, "created_at": now}
        if conn.dialect.name == "postgresql":
            await conn.execute(pg_insert(token_families).values(**values).on_conflict_do_nothing())
        elif conn.dialect.name == "sqlite":
            await conn.execute(sqlite_insert(token_families).values(**values).on_conflict_do_nothing())
        else:
            found = await conn.execute(
                select(token_families.c.family_id).where(token_families.c.family_id == family_id)
            )
            if found.first() is None:
                await conn.execute(insert(token_families).values(**values))

    async def add_refresh_token(
        self,
        *,
        family_id: str,
        client_id: str,
        subject: str,
        name: str,
        resource: str,
        scope: str,
        expires_at: datetime,
    ) -> str:
        """Issue a refresh token in grant ``family_id`` (created if new); returns the plaintext."""
        _aware(expires_at)
        token = new_secret(REFRESH_TOKEN_PREFIX)
        now = _now()
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(refresh_tokens).values(
                    token_hash=hash_secret(token),
                    family_id=family_id,
                    client_id=client_id,
                    subject=subject,
                    name=name,
                    resource=resource,
                    scope=scope,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            await self._ensure_family(conn, family_id, client_id, subject, now)
        return token

    async def rotate_refresh_token(
        self, plaintext: str, client_id: str, *, ttl: timedelta | float | None = None
    ) -> RefreshResult:
        """Spend a refresh token and issue its successor in the same family.

        The successor lives ``ttl`` (default: as long as the spent one was issued for). Presenting a
        token that was already spent revokes its whole family (OAuth 2.1 reuse detection): either the
        client or an attacker holds a stolen copy, and the store cannot tell which."""
        token_hash = hash_secret(plaintext)
        now = _now()
        live_family = select(token_families.c.family_id).where(token_families.c.revoked_at.is_(None))
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(refresh_tokens)
                .where(
                    refresh_tokens.c.token_hash == token_hash,
                    refresh_tokens.c.client_id == client_id,
                    refresh_tokens.c.used_at.is_(None),
                    refresh_tokens.c.revoked_at.is_(None),
                    refresh_tokens.c.expires_at > now,
                    refresh_tokens.c.family_id.in_(live_family.scalar_subquery()),
                )
                .values(used_at=now)
            )
            if res.rowcount == 1:
                row = (
                    await conn.execute(
                        select(refresh_tokens).where(refresh_tokens.c.token_hash == token_hash)
                    )
                ).one()
                lifetime = _ttl(ttl) if ttl is not None else row.expires_at - row.created_at
                new = new_secret(REFRESH_TOKEN_PREFIX)
                record = RefreshRecord(
                    family_id=row.family_id,
                    client_id=row.client_id,
                    subject=row.subject,
                    name=row.name,
                    resource=row.resource,
                    scope=row.scope,
                    expires_at=now + lifetime,
                )
                await conn.execute(
                    insert(refresh_tokens).values(
                        token_hash=hash_secret(new),
                        family_id=record.family_id,
                        client_id=record.client_id,
                        subject=record.subject,
                        name=record.name,
                        resource=record.resource,
                        scope=record.scope,
                        created_at=now,
                        expires_at=record.expires_at,
                    )
                )
                return RefreshResult(ok=True, token=new, record=record)
        # Not spent: find out why (the answer is invalid_grant either way; the reason is for logs).
        async with self.engine.connect() as conn:
            found_row = (
                await conn.execute(
                    select(refresh_tokens, token_families.c.revoked_at.label("family_revoked_at"))
                    .select_from(
                        refresh_tokens.outerjoin(
                            token_families, token_families.c.family_id == refresh_tokens.c.family_id
                        )
                    )
                    .where(refresh_tokens.c.token_hash == token_hash)
                )
            ).first()
        if found_row is None:
            return RefreshResult(ok=False, reason="unknown")
        found = _refresh(found_row)
        if found_row.client_id != client_id:
            return RefreshResult(ok=False, record=found, reason="wrong_client")
        if found_row.revoked_at is not None or found_row.family_revoked_at is not None:
            return RefreshResult(ok=False, record=found, reason="revoked")
        if found_row.used_at is not None:
            await self.revoke_family(found_row.family_id)
            return RefreshResult(ok=False, record=found, reason="reused")
        return RefreshResult(ok=False, record=found, reason="expired")

    async def peek_refresh_token(self, plaintext: str) -> RefreshRecord | None:
        """The grant of a refresh token that could be rotated now, without spending it; None if it is
        unknown, spent, revoked or expired (``rotate_refresh_token`` then says which, and acts on reuse)."""
        now = _now()
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(refresh_tokens)
                    .select_from(
                        refresh_tokens.join(
                            token_families, token_families.c.family_id == refresh_tokens.c.family_id
                        )
                    )
                    .where(
                        refresh_tokens.c.token_hash == hash_secret(plaintext),
                        refresh_tokens.c.used_at.is_(None),
                        refresh_tokens.c.revoked_at.is_(None),
                        refresh_tokens.c.expires_at > now,
                        token_families.c.revoked_at.is_(None),
                    )
                )
            ).first()
        return None if row is None else _refresh(row)

    async def revoke_refresh_token(self, plaintext: str, client_id: str | None = None) -> str | None:
        """Revoke the grant a refresh token belongs to (RFC 7009); returns its family id, or None if the
        token is unknown or (with ``client_id``) was issued to another client."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(refresh_tokens.c.family_id, refresh_tokens.c.client_id).where(
                        refresh_tokens.c.token_hash == hash_secret(plaintext)
                    )
                )
            ).first()
        if row is None or (client_id is not None and row.client_id != client_id):
            return None
        await self.revoke_family(row.family_id)
        return str(row.family_id)

    async def revoke_family(self, family_id: str) -> bool:
        """Revoke a grant: its refresh tokens, and (through ``family_revoked``) its access tokens."""
        now = _now()
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(token_families)
                .where(token_families.c.family_id == family_id, token_families.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            await conn.execute(
                update(refresh_tokens)
                .where(refresh_tokens.c.family_id == family_id, refresh_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        return res.rowcount > 0

    async def family_revoked(self, family_id: str) -> bool:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(token_families.c.revoked_at).where(token_families.c.family_id == family_id)
                )
            ).first()
        return row is not None and row.revoked_at is not None

    async def revoked_families_since(self, t: datetime) -> list[str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(token_families.c.family_id).where(token_families.c.revoked_at >= _aware(t))
            )
            return [str(r.family_id) for r in rows]

    # ---- access-token revocation ------------------------------------------------------------------

    async def revoke_access_token(self, jti: str, expires_at: datetime) -> None:
        """Remember a revoked access token until it would have expired anyway (idempotent)."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(revoked_access_tokens).values(jti=jti, expires_at=_aware(expires_at))
                )
        except IntegrityError:
            pass

    async def access_token_revoked(self, jti: str) -> bool:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(revoked_access_tokens.c.jti).where(revoked_access_tokens.c.jti == jti)
                )
            ).first()
        return row is not None

    # ---- signing keys -----------------------------------------------------------------------------

    async def signing_keys(self) -> list[SigningKeyRecord]:
        """Every signing key, oldest first (including retired ones; the key ring filters)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(signing_keys).order_by(signing_keys.c.created_at, signing_keys.c.kid)
            )
            return [SigningKeyRecord(r.kid, r.private_pem, r.created_at, r.retired_at) for r in rows]

    async def add_signing_key(self, kid: str, pem: str, created_at: datetime | None = None) -> None:
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(signing_keys).values(
                        kid=kid, private_pem=pem, created_at=_aware(created_at or _now())
                    )
                )
        except IntegrityError:
            raise AlreadyExists(f"signing key {kid!r} exists already") from None

    async def retire_signing_key(self, kid: str) -> bool:
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(signing_keys)
                .where(signing_keys.c.kid == kid, signing_keys.c.retired_at.is_(None))
                .values(retired_at=_now())
            )
        return res.rowcount > 0

    # ---- pending transactions ---------------------------------------------------------------------

    async def put_pending(self, kind: PendingKind, data: dict[str, Any], ttl: timedelta | float) -> str:
        """Park a one-time transaction; returns its id (unguessable: it travels as ``state`` and in forms)."""
        pending_id = new_secret()
        now = _now()
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(pending).values(
                    id=hash_secret(pending_id),
                    kind=kind,
                    data=data,
                    created_at=now,
                    expires_at=now + _ttl(ttl),
                )
            )
        return pending_id

    async def take_pending(self, pending_id: str, kind: PendingKind) -> dict[str, Any] | None:
        """The transaction's data, once; None if unknown, of another kind, expired or already taken."""
        key = hash_secret(pending_id)
        now = _now()
        async with self.engine.begin() as conn:
            res = await conn.execute(
                update(pending)
                .where(
                    pending.c.id == key,
                    pending.c.kind == kind,
                    pending.c.used_at.is_(None),
                    pending.c.expires_at > now,
                )
                .values(used_at=now)
            )
            if res.rowcount != 1:
                return None
            row = (await conn.execute(select(pending.c.data).where(pending.c.id == key))).one()
        return dict(row.data)

    async def peek_pending(self, pending_id: str, kind: PendingKind) -> dict[str, Any] | None:
        """The transaction's data without spending it (None as for ``take_pending``)."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(pending.c.data).where(
                        pending.c.id == hash_secret(pending_id),
                        pending.c.kind == kind,
                        pending.c.used_at.is_(None),
                        pending.c.expires_at > _now(),
                    )
                )
            ).first()
        return None if row is None else dict(row.data)

    # ---- consents ---------------------------------------------------------------------------------

    async def has_consent(self, subject: str, client_id: str, scope: str) -> bool:
        """True when ``subject`` has approved every scope in ``scope`` (space-separated) for the client."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(consents.c.scope).where(
                        consents.c.subject == subject, consents.c.client_id == client_id
                    )
                )
            ).first()
        return row is not None and _scopes(scope) <= _scopes(row.scope)

    async def add_consent(self, subject: str, client_id: str, scope: str) -> None:
        """Record approval of ``scope``, adding to what was approved before.

        Optimistic: the merged value is written only if the row still holds what was read, so
        concurrent approvals (other tabs, other replicas) never lose each other's scopes."""
        where = (consents.c.subject == subject, consents.c.client_id == client_id)
        for _ in range(20):
            async with self.engine.connect() as conn:
                row = (await conn.execute(select(consents.c.scope).where(*where))).first()
            if row is None:
                try:
                    async with self.engine.begin() as conn:
                        await conn.execute(
                            insert(consents).values(
                                subject=subject,
                                client_id=client_id,
                                scope=" ".join(sorted(_scopes(scope))),
                                created_at=_now(),
                            )
                        )
                    return
                except IntegrityError:
                    continue  # a concurrent first approval won the insert: merge into it
            merged = " ".join(sorted(_scopes(row.scope) | _scopes(scope)))
            if merged == row.scope:
                return
            async with self.engine.begin() as conn:
                res = await conn.execute(
                    update(consents).where(*where, consents.c.scope == row.scope).values(scope=merged)
                )
            if res.rowcount == 1:
                return
        raise StoreError("could not record consent: too many concurrent changes")

    async def remove_consent(self, subject: str, client_id: str) -> bool:
        async with self.engine.begin() as conn:
            res = await conn.execute(
                delete(consents).where(consents.c.subject == subject, consents.c.client_id == client_id)
            )
        return res.rowcount > 0

    # ---- settings ---------------------------------------------------------------------------------

    async def get_or_create_secret(self, name: str, nbytes: int = 32) -> bytes:
        """A random key shared by every process on this database (e.g. the cookie HMAC key)."""
        key = f"secret:{name}"
        for _ in range(3):
            async with self.engine.connect() as conn:
                row = (await conn.execute(select(settings.c.value).where(settings.c.key == key))).first()
            if row is not None:
                return bytes.fromhex(row.value)
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(insert(settings).values(key=key, value=_random.token_hex(nbytes)))
            except IntegrityError:
                continue  # another process created it first: read theirs
        raise StoreError(f"could not create secret {name!r}")

    # ---- housekeeping -----------------------------------------------------------------------------

    async def purge_expired(self, grace: timedelta = timedelta(days=1)) -> int:
        """Delete rows that can no longer matter (expired more than ``grace`` ago); returns how many."""
        cutoff = _now() - grace
        total = 0
        async with self.engine.begin() as conn:
            for table in (auth_codes, pending, revoked_access_tokens, refresh_tokens):
                res = await conn.execute(delete(table).where(table.c.expires_at < cutoff))
                total += res.rowcount
            live = select(refresh_tokens.c.family_id).distinct().scalar_subquery()
            codes = select(auth_codes.c.family_id).distinct().scalar_subquery()
            res = await conn.execute(
                delete(token_families).where(
                    token_families.c.created_at < cutoff,
                    and_(token_families.c.family_id.not_in(live), token_families.c.family_id.not_in(codes)),
                )
            )
            total += res.rowcount
        return total

    # ---- tunnel connectors ------------------------------------------------------------------------

    async def create_connector(self, name: str) -> tuple[ConnectorRecord, str]:
        """A new connector; its token (``mcpbc_<id>_<43 chars>``) is returned here and never again."""
        if not valid_key_name(name):
            raise ValueError(
                "connector names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        record = ConnectorRecord(
            id=_random.token_hex(6),
            name=name,
            created_at=_now(),
            revoked_at=None,
            last_connected_at=None,
            last_seen_at=None,
            detached_at=None,
            last_address=None,
            servers=[],
        )
        token = new_secret(f"{CONNECTOR_TOKEN_PREFIX}{record.id}_")
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(connectors).values(
                        id=record.id,
                        name=name,
                        token_hash=hash_secret(token),
                        created_at=record.created_at,
                        servers=[],
                    )
                )
        except IntegrityError:
            raise AlreadyExists(f"a connector named {name!r} exists already (revoke it first)") from None
        return record, token

    async def find_connector(self, token: str) -> ConnectorRecord | None:
        """The connector a presented token belongs to; None if malformed, unknown or revoked."""
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] + "_" != CONNECTOR_TOKEN_PREFIX or not _KEY_ID.fullmatch(parts[1]):
            return None
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(connectors).where(connectors.c.token_hash == hash_secret(token)))
            ).first()
        if row is None:
            return None
        record = _connector(row)
        if record.id != parts[1] or record.revoked_at is not None:
            return None
        return record

    async def get_connector(self, connector_id: str) -> ConnectorRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(connectors).where(connectors.c.id == connector_id))).first()
        return None if row is None else _connector(row)

    async def list_connectors(self) -> list[ConnectorRecord]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(connectors).order_by(connectors.c.created_at, connectors.c.id))
            return [_connector(r) for r in rows]

    async def revoke_connector(self, name_or_id: str) -> bool:
        """Revoke the connector with that id, else the active one with that name; False if there is none.

        Revoking an already revoked connector is a success (nothing changes)."""
        return await self._revoke(connectors, connectors.c.id, name_or_id)

    async def _revoke(self, table: Table, id_column: Column[str], name_or_id: str) -> bool:
        """Revoke the row with that id, else the active row with that name (API keys, connectors);
        True also when it was revoked before, False when there is no such row."""
        now = _now()
        async with self.engine.begin() as conn:
            active = table.c.revoked_at.is_(None)
            res = await conn.execute(
                update(table).where(id_column == name_or_id, active).values(revoked_at=now)
            )
            if res.rowcount == 0:
                res = await conn.execute(
                    update(table).where(table.c.name == name_or_id, active).values(revoked_at=now)
                )
            if res.rowcount > 0:
                return True
            found = await conn.execute(
                select(id_column).where(or_(id_column == name_or_id, table.c.name == name_or_id)).limit(1)
            )
            return found.first() is not None

    async def connector_attached(self, connector_id: str, address: str, servers: Sequence[str]) -> None:
        """A gateway accepted the connector's link (from ``address``, offering ``servers``)."""
        now = _now()
        async with self.engine.begin() as conn:
            await conn.execute(
                update(connectors)
                .where(connectors.c.id == connector_id)
                .values(
                    last_connected_at=now,
                    last_seen_at=now,
                    last_address=address[:256],
                    servers=sorted(set(servers)),
                )
            )

    async def connector_seen(self, connector_ids: Sequence[str]) -> None:
        """These connectors' links are still up (refreshed every CONNECTOR_SEEN_INTERVAL)."""
        if not connector_ids:
            return
        async with self.engine.begin() as conn:
            await conn.execute(
                update(connectors).where(connectors.c.id.in_(list(connector_ids))).values(last_seen_at=_now())
            )

    async def connector_detached(self, connector_id: str) -> None:
        now = _now()
        async with self.engine.begin() as conn:
            await conn.execute(
                update(connectors)
                .where(connectors.c.id == connector_id)
                .values(detached_at=now, last_seen_at=now)
            )

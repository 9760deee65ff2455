"""Throw-away databases on the real PostgreSQL at 127.0.0.1:5432 (trust auth, user postgres).

Each test gets its own ``bastion_test_<hex>`` database, dropped afterwards, so tests never see each
other's rows and the shared ``test`` database stays clean. If the server is down it is started with
``pg_ctlcluster`` (tests fail rather than skip when it cannot be).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

HOST = "127.0.0.1"
PORT = 5432
USER = "postgres"
ADMIN_DSN = f"postgresql://{USER}@{HOST}:{PORT}/test"


def url_for(database: str) -> str:
    """The SQLAlchemy URL of ``database``, as the gateway and the CLI take it."""
    return f"postgresql+asyncpg://{USER}@{HOST}:{PORT}/{database}"


async def _admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(ADMIN_DSN, timeout=10)
    except (OSError, asyncpg.PostgresError):
        await asyncio.to_thread(_start_cluster)
        return await asyncpg.connect(ADMIN_DSN, timeout=30)


def _start_cluster() -> None:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir())
    if not versions:
        raise RuntimeError("PostgreSQL is not installed (/etc/postgresql is empty)")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
        check=False,
        capture_output=True,
    )


async def create_database() -> str:
    name = f"bastion_test_{secrets.token_hex(6)}"
    conn = await _admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    conn = await _admin()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[str]:
    """A fresh database's SQLAlchemy URL for the duration of the block."""
    name = await create_database()
    try:
        yield url_for(name)
    finally:
        await drop_database(name)


@contextlib.contextmanager
def database_sync() -> Iterator[str]:
    """As :func:`database`, for tests that are not coroutines (e.g. driving the CLI)."""
    name = asyncio.run(create_database())
    try:
        yield url_for(name)
    finally:
        asyncio.run(drop_database(name))

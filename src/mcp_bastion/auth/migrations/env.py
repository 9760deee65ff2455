"""Alembic environment of the auth store.

``Store.open`` passes its (sync-adapted) connection in ``config.attributes["connection"]`` from inside
``AsyncConnection.run_sync``. Run by hand (``alembic revision``, ``alembic upgrade``), it connects to
``-x url=...`` or ``MCP_BASTION_DATABASE_URL`` with the async driver and does the same.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from mcp_bastion.auth.store import metadata, normalize_url

config = context.config


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("MCP_BASTION_DATABASE_URL")
    if not url:
        raise SystemExit("give the database as -x url=... or MCP_BASTION_DATABASE_URL")
    return normalize_url(url)


async def _run_standalone() -> None:
    engine = create_async_engine(_url())
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_configure_and_run)
    finally:
        await engine.dispose()


def run() -> None:
    if context.is_offline_mode():
        context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
    else:
        asyncio.run(_run_standalone())


run()

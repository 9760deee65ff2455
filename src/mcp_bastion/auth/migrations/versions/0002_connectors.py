"""Tunnel connectors: the private ends that dial out to this gateway (issue 5).

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _time(name: str, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "connectors",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        _time("created_at", nullable=False),
        _time("revoked_at"),
        _time("last_connected_at"),
        _time("last_seen_at"),
        _time("detached_at"),
        sa.Column("last_address", sa.String(256)),
        sa.Column("servers", sa.JSON),
    )
    # Names are unique among connectors in force, so a revoked connector's name can be reused.
    op.create_index(
        "ux_connectors_active_name",
        "connectors",
        ["name"],
        unique=True,
        sqlite_where=sa.text("revoked_at IS NULL"),
        postgresql_where=sa.text("revoked_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ux_connectors_active_name", table_name="connectors")
    op.drop_table("connectors")

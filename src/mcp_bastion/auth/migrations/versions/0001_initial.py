"""Initial auth store: clients, users, API keys, codes, refresh tokens, keys, pending, consents, settings.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _time(name: str, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "clients",
        sa.Column("client_id", sa.String(2048), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("redirect_uris", sa.JSON, nullable=False),
        sa.Column("secret_hash", sa.String(64)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("application_type", sa.String(16), nullable=False),
        sa.Column("token_endpoint_auth_method", sa.String(32), nullable=False),
        sa.Column("grant_types", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        _time("created_at", nullable=False),
        _time("expires_at"),
    )
    op.create_table(
        "users",
        sa.Column("username", sa.String(64), primary_key=True),
        sa.Column("password_hash", sa.Text, nullable=False),
        _time("created_at", nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("servers", sa.JSON),
        _time("created_at", nullable=False),
        _time("expires_at"),
        _time("revoked_at"),
        _time("last_used_at"),
    )
    # Names are unique among keys still in force, so a revoked key's name can be reused.
    op.create_index(
        "ux_api_keys_active_name",
        "api_keys",
        ["name"],
        unique=True,
        sqlite_where=sa.text("revoked_at IS NULL"),
        postgresql_where=sa.text("revoked_at IS NULL"),
    )
    op.create_table(
        "auth_codes",
        sa.Column("code_hash", sa.String(64), primary_key=True),
        sa.Column("client_id", sa.String(2048), nullable=False),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        sa.Column("code_challenge", sa.String(128), nullable=False),
        sa.Column("resource", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("nonce", sa.Text),
        _time("created_at", nullable=False),
        _time("expires_at", nullable=False),
        _time("used_at"),
        sa.Column("family_id", sa.String(128), nullable=False),
    )
    op.create_table(
        "token_families",
        sa.Column("family_id", sa.String(128), primary_key=True),
        sa.Column("client_id", sa.String(2048), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        _time("created_at", nullable=False),
        _time("revoked_at"),
    )
    op.create_index("ix_token_families_revoked_at", "token_families", ["revoked_at"])
    op.create_table(
        "refresh_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("family_id", sa.String(128), nullable=False),
        sa.Column("client_id", sa.String(2048), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("resource", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        _time("created_at", nullable=False),
        _time("expires_at", nullable=False),
        _time("used_at"),
        _time("revoked_at"),
    )
    op.create_index("ix_refresh_tokens_family_id", "refresh_tokens", ["family_id"])
    op.create_table(
        "revoked_access_tokens",
        sa.Column("jti", sa.String(128), primary_key=True),
        _time("expires_at", nullable=False),
    )
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(128), primary_key=True),
        sa.Column("private_pem", sa.Text, nullable=False),
        _time("created_at", nullable=False),
        _time("retired_at"),
    )
    op.create_table(
        "pending",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        _time("created_at", nullable=False),
        _time("expires_at", nullable=False),
        _time("used_at"),
    )
    op.create_table(
        "consents",
        sa.Column("subject", sa.String(512), primary_key=True),
        sa.Column("client_id", sa.String(2048), primary_key=True),
        sa.Column("scope", sa.Text, nullable=False),
        _time("created_at", nullable=False),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "settings",
        "consents",
        "pending",
        "signing_keys",
        "revoked_access_tokens",
        "refresh_tokens",
        "token_families",
        "auth_codes",
        "api_keys",
        "users",
        "clients",
    ):
        op.drop_table(table)

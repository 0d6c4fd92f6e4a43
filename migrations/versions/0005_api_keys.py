"""API keys with scopes, and who asked: ``api_keys`` (name, scopes, the sha256 of the
secret) and ``requested_by`` (a key name) on jobs, edits and versions.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 11:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WHO = ("jobs", "edits", "versions")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("scopes", JSONB, nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("secret_sha256"),
    )
    for table in _WHO:
        op.add_column(table, sa.Column("requested_by", sa.String(length=64), nullable=True))


def downgrade() -> None:
    for table in _WHO:
        op.drop_column(table, "requested_by")
    op.drop_table("api_keys")

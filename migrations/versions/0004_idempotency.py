"""Idempotency keys: a job remembers the client's ``Idempotency-Key`` and the sha256 of
the request it came with (unique per model among the jobs that have a key).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 10:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("idempotency_key", sa.String(length=255), nullable=True))
    op.add_column("jobs", sa.Column("request_sha256", sa.String(length=64), nullable=True))
    op.create_index(
        "uq_jobs_model_idempotency_key",
        "jobs",
        ["model_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_jobs_model_idempotency_key", table_name="jobs")
    op.drop_column("jobs", "request_sha256")
    op.drop_column("jobs", "idempotency_key")

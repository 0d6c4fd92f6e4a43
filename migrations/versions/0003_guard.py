"""The guard's decisions: one row per staged update judged, accepted or rejected.

Written from service/models.py (``GuardDecision``), reviewed: JSON columns are JSONB
as in 0001; rows are listed per model in id order (``ix_guard_decisions_model_id_id``).

Revision ID: 0003
Revises: 0002_evaluations
Create Date: 2026-11-24 10:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002_evaluations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "guard_decisions",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("parent_number", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("accepted", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("rules", JSONB, nullable=False),
        sa.Column("edit_ids", JSONB, nullable=False),
        sa.Column("update_norm", sa.Float(), nullable=True),
        sa.Column("norm_median", sa.Float(), nullable=True),
        sa.Column("norm_ratio", sa.Float(), nullable=True),
        sa.Column("perplexity_before", sa.Float(), nullable=True),
        sa.Column("perplexity_after", sa.Float(), nullable=True),
        sa.Column("recall_before", sa.Float(), nullable=True),
        sa.Column("recall_after", sa.Float(), nullable=True),
        sa.Column("measurements", JSONB, nullable=False),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_guard_decisions_job_id"), "guard_decisions", ["job_id"], unique=False)
    op.create_index(
        "ix_guard_decisions_model_id_id", "guard_decisions", ["model_id", "id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_guard_decisions_model_id_id", table_name="guard_decisions")
    op.drop_index(op.f("ix_guard_decisions_job_id"), table_name="guard_decisions")
    op.drop_table("guard_decisions")

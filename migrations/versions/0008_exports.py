"""Exports and imports: a version written out as a Hugging Face folder or a patch
(``exports``: one row per request, its job, the archive artifact and its manifest);
job kinds ``export`` and ``import``, version kind ``import`` (a patch applied onto the
base), artifact kinds ``export`` (the tar archives) and ``upload`` (patches sent to be
imported).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 20:40:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TYPE job_kind ADD VALUE IF NOT EXISTS 'export'")
    op.execute("ALTER TYPE job_kind ADD VALUE IF NOT EXISTS 'import'")
    op.execute("ALTER TYPE version_kind ADD VALUE IF NOT EXISTS 'import'")
    op.execute("ALTER TYPE artifact_kind ADD VALUE IF NOT EXISTS 'export'")
    op.execute("ALTER TYPE artifact_kind ADD VALUE IF NOT EXISTS 'upload'")
    op.create_table(
        "exports",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("artifact_id", sa.Integer(), nullable=True),
        sa.Column("manifest", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("requested_by", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"]),
        sa.ForeignKeyConstraint(["artifact_id"], ["artifacts.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_exports_job_id", "exports", ["job_id"])
    op.create_index("ix_exports_model_id_created_at", "exports", ["model_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_exports_model_id_created_at", table_name="exports")
    op.drop_index("ix_exports_job_id", table_name="exports")
    op.drop_table("exports")
    # PostgreSQL cannot drop one value of an enum; the rows that use them go
    op.execute("DELETE FROM events WHERE job_id IN (SELECT id FROM jobs WHERE kind IN ('export', 'import'))")  # fmt: skip
    op.execute("UPDATE versions SET job_id = NULL WHERE job_id IN (SELECT id FROM jobs WHERE kind IN ('export', 'import'))")  # fmt: skip
    op.execute("UPDATE versions SET kind = 'edit' WHERE kind = 'import'")
    op.execute("DELETE FROM jobs WHERE kind IN ('export', 'import')")

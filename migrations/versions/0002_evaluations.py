"""Evaluations: the ``evaluations`` table and job kind ``evaluation``.

Written against service/models.py and checked with ``alembic check``. A new value
of a native Postgres enum needs ``ALTER TYPE … ADD VALUE`` (autogenerate does not
see enum values); Postgres 12+ runs it inside the migration's transaction, and
nothing here uses the new value in that transaction. The downgrade deletes the
evaluation jobs and rebuilds ``job_kind`` without the value (Postgres cannot drop
an enum value).

Revision ID: 0002_evaluations
Revises: 0001
Create Date: 2026-12-02 12:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ENUM, JSONB

revision: str = "0002_evaluations"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TYPE job_kind ADD VALUE IF NOT EXISTS 'evaluation'")
    op.create_table(
        "evaluations",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("suite", sa.String(length=32), nullable=False),
        sa.Column("params", JSONB, nullable=False),
        sa.Column(
            "status",
            ENUM("queued", "running", "succeeded", "failed", name="job_status", create_type=False),
            nullable=False,
        ),
        sa.Column("metrics", JSONB, nullable=True),
        sa.Column("details", JSONB, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("policy", sa.String(length=64), nullable=True),
        sa.Column("policy_spec", JSONB, nullable=True),
        sa.Column("passed", sa.Boolean(), nullable=True),
        sa.Column("alert", JSONB, nullable=True),
        sa.Column("timing", JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "model_id", "version", "policy", name="uq_evaluations_model_version_policy"
        ),
    )
    op.create_index(op.f("ix_evaluations_job_id"), "evaluations", ["job_id"], unique=False)
    op.create_index(
        "ix_evaluations_model_suite_version",
        "evaluations",
        ["model_id", "suite", "version", "id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_evaluations_model_suite_version", table_name="evaluations")
    op.drop_index(op.f("ix_evaluations_job_id"), table_name="evaluations")
    op.drop_table("evaluations")
    op.execute("DELETE FROM jobs WHERE kind = 'evaluation'")
    op.execute("ALTER TYPE job_kind RENAME TO job_kind_old")
    ENUM("edit", "rollback", name="job_kind").create(op.get_bind())
    op.execute("ALTER TABLE jobs ALTER COLUMN kind TYPE job_kind USING kind::text::job_kind")
    op.execute("DROP TYPE job_kind_old")

"""Job control for operators: jobs can be cancelled (status ``cancelled`` for jobs,
evaluations and edits; ``cancel_requested`` for a running job, honoured at its next
safe point), jobs get a ``seq`` for newest-first keyset pages, and an ``events``
table keeps everything that happens to a job or a model in order, for the
Server-Sent Events streams (a client resumes after the last id it saw).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 14:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TYPE job_status ADD VALUE IF NOT EXISTS 'cancelled'")
    op.execute("ALTER TYPE edit_status ADD VALUE IF NOT EXISTS 'cancelled'")
    op.add_column(
        "jobs",
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    # existing jobs are numbered in the order they were created, new ones by the sequence
    op.execute("CREATE SEQUENCE jobs_seq_seq AS BIGINT")
    op.add_column("jobs", sa.Column("seq", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE jobs SET seq = numbered.n FROM "
        "(SELECT id, row_number() OVER (ORDER BY created_at, id) AS n FROM jobs) AS numbered "
        "WHERE jobs.id = numbered.id"
    )
    op.execute("SELECT setval('jobs_seq_seq', COALESCE((SELECT max(seq) FROM jobs), 0) + 1, false)")
    op.execute("ALTER TABLE jobs ALTER COLUMN seq SET DEFAULT nextval('jobs_seq_seq')")
    op.execute("ALTER TABLE jobs ALTER COLUMN seq SET NOT NULL")
    op.execute("ALTER SEQUENCE jobs_seq_seq OWNED BY jobs.seq")
    op.create_index("uq_jobs_seq", "jobs", ["seq"], unique=True)
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"]),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_events_job_id_id", "events", ["job_id", "id"])
    op.create_index("ix_events_model_id_id", "events", ["model_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_events_model_id_id", table_name="events")
    op.drop_index("ix_events_job_id_id", table_name="events")
    op.drop_table("events")
    op.drop_index("uq_jobs_seq", table_name="jobs")
    op.drop_column("jobs", "seq")  # drops the sequence it owns
    op.drop_column("jobs", "cancel_requested")
    # PostgreSQL cannot drop one value of an enum: cancelled rows become failed
    op.execute("UPDATE edits SET status = 'failed' WHERE status = 'cancelled'")
    op.execute("UPDATE evaluations SET status = 'failed' WHERE status = 'cancelled'")
    op.execute("UPDATE jobs SET status = 'failed' WHERE status = 'cancelled'")

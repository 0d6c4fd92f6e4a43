"""Artifacts of kind ``templates``: the context templates sampled once from a base
model's weights, named in the ledger so that every worker of the model (a replica
that takes over, another machine) edits with the same ones.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 12:00:00.000000+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TYPE artifact_kind ADD VALUE IF NOT EXISTS 'templates'")


def downgrade() -> None:
    # PostgreSQL cannot drop one value of an enum; rows of kind templates go, the
    # value stays (harmless: nothing writes it below this revision)
    op.execute("DELETE FROM artifacts WHERE kind = 'templates'")

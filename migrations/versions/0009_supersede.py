"""Supersede: an edit replaced by a later edit of the same subject and prompt
(edit status ``superseded``, ``edits.superseded_by``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 19:40:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TYPE edit_status ADD VALUE IF NOT EXISTS 'superseded'")
    op.add_column("edits", sa.Column("superseded_by", sa.BigInteger(), nullable=True))
    op.create_foreign_key("fk_edits_superseded_by", "edits", "edits", ["superseded_by"], ["id"])
    # the active edit of a subject and prompt is looked up for every new request
    op.create_index("ix_edits_model_subject", "edits", ["model_id", "subject"])


def downgrade() -> None:
    op.drop_index("ix_edits_model_subject", table_name="edits")
    op.drop_constraint("fk_edits_superseded_by", "edits", type_="foreignkey")
    op.drop_column("edits", "superseded_by")
    # PostgreSQL cannot drop an enum value: 'superseded' stays in edit_status, unused
    # (the older code has no such status: a superseded edit is applied as far as it knows)
    op.execute("UPDATE edits SET status = 'applied' WHERE status = 'superseded'")

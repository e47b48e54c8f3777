"""Account emails in the outbox: a delivery belongs to a submission or to an account

Revision ID: 0002
Revises: 0001
Created: issue 12 (account emails are claimed, retried and replayed like notifications)

``deliveries.submission_id`` becomes nullable; ``user_id`` (the account an account email is
for), ``template`` (which account email) and ``params`` (ids and names it needs; never a token,
code or password) are added, with a CHECK that every row belongs to one or the other. Existing
rows all belong to submissions and are kept as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    """Let a delivery belong to an account instead of a submission."""
    with op.batch_alter_table("deliveries") as batch:
        batch.alter_column("submission_id", existing_type=sa.Integer, nullable=True)
        batch.add_column(sa.Column("user_id", sa.Integer))
        batch.add_column(sa.Column("template", sa.String(32)))
        batch.add_column(sa.Column("params", JSON))
        batch.create_foreign_key(
            "deliveries_user_id_fkey", "users", ["user_id"], ["id"], ondelete="CASCADE"
        )
        batch.create_check_constraint(
            "deliveries_submission_or_user_check",
            "submission_id IS NOT NULL OR user_id IS NOT NULL",
        )
        batch.create_index("ix_deliveries_user", ["user_id"])


def downgrade() -> None:
    """Back to 0001: account emails cannot be kept there, so they are deleted (they are
    notices, not data; a pending one is not sent)."""
    op.execute("DELETE FROM deliveries WHERE submission_id IS NULL")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_user")
        batch.drop_constraint("deliveries_submission_or_user_check", type_="check")
        batch.drop_constraint("deliveries_user_id_fkey", type_="foreignkey")
        batch.drop_column("params")
        batch.drop_column("template")
        batch.drop_column("user_id")
        batch.alter_column("submission_id", existing_type=sa.Integer, nullable=False)

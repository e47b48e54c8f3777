"""The schema of the first release, as its init-db created it

Revision ID: 0001
Revises:
Created: the first release

Tables, columns, types, nullability, keys, indexes and foreign keys exactly as release 1's
``metadata.create_all`` made them on SQLite and PostgreSQL (no server defaults: every default
lives in the code). A database made by release 1 is stamped at this revision instead of running
it; tests/test_migrations.py checks that both ways give the same schema.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from dal.py: this step stays what it was when dal.py changes.
UTC_DATETIME = sa.DateTime(timezone=True)  # dal.UTCDateTime's column type
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    """Create release 1's tables and mark the database as one release 1 must not open."""
    meta = op.create_table(
        "mailslot_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(254), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("email_confirmed_at", UTC_DATETIME),
        sa.Column("session_version", sa.Integer, nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
    )
    op.create_table(
        "forms",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("public_id", sa.String(32), nullable=False, unique=True),
        sa.Column(
            "owner_id",
            sa.Integer,
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("fields", JSON, nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("strict", sa.Boolean, nullable=False),
        sa.Column("redirect_url", sa.String(2000)),
        sa.Column("allowed_domains", JSON, nullable=False),
        sa.Column("honeypot_field", sa.String(64), nullable=False),
        sa.Column("webhook_url", sa.String(2000)),
        sa.Column("webhook_secret", sa.String(100)),
        sa.Column("notify", sa.Boolean, nullable=False),
        sa.Column("retention_days", sa.Integer),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("thanks_message", sa.Text, nullable=False),
        sa.Column("show_branding", sa.Boolean, nullable=False),
        sa.Column("spam_rules", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
    )
    op.create_index("ix_forms_owner", "forms", ["owner_id", "id"])
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "user_id",
            sa.Integer,
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("last_used_at", UTC_DATETIME),
        sa.Column("revoked_at", UTC_DATETIME),
    )
    op.create_table(
        "submissions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("public_id", sa.String(32), nullable=False, unique=True),
        sa.Column(
            "form_id",
            sa.Integer,
            sa.ForeignKey("forms.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("data", JSON, nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("is_spam", sa.Boolean, nullable=False),
        sa.Column("spam_reason", sa.Text),
        sa.Column("ip_hash", sa.String(64)),
        sa.Column("user_agent", sa.String(512)),
        sa.Column("referrer", sa.String(2000)),
        sa.Column("meta", JSON, nullable=False),
        sa.Column("search_text", sa.Text, nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
    )
    op.create_index(
        "ix_submissions_form_created", "submissions", ["form_id", "created_at", "is_spam"]
    )
    op.create_index("ix_submissions_form_id", "submissions", ["form_id", "id"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "submission_id",
            sa.Integer,
            sa.ForeignKey("submissions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target", sa.String(2000), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", UTC_DATETIME, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
    )
    op.create_index("ix_deliveries_submission", "deliveries", ["submission_id"])
    op.create_index("ix_deliveries_due", "deliveries", ["status", "next_attempt_at"])
    # Release 1 refuses a database whose stamp is not "1" (with a clear message), so it cannot
    # run on a schema it does not know; databases it made get the same "2" when adopted.
    op.bulk_insert(meta, [{"key": "schema_version", "value": "2"}])


def downgrade() -> None:
    """Drop every table: back to an empty database."""
    for table in ("deliveries", "submissions", "api_tokens", "forms", "users", "mailslot_meta"):
        op.drop_table(table)

"""Alembic's environment for Mailslot: dal.metadata is the target; SQLite alters in batch mode.

Two ways in. ``flask --app microapp upgrade-db`` (migrate.upgrade_db) takes the migration lock on
its own connection and hands that connection over in ``config.attributes["connection"]``. The
``alembic`` command line, for people writing migrations (``revision --autogenerate``, ``history``,
``current``), opens the same kind of locked connection itself, on the database the app would use
(DATABASE_URL from the environment or settings.toml). Upgrades go through upgrade-db: only it
recognises a database made by release 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alembic import context

import dal

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext
    from sqlalchemy.engine import Connection


def render_item(kind: str, value: Any, autogen_context: AutogenContext) -> str | bool:
    """Write our column types as plain SQLAlchemy ones, so a migration never imports dal.py."""
    if kind == "type" and isinstance(value, dal.UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if kind == "type" and value is dal.JSONType:
        autogen_context.imports.add("from sqlalchemy.dialects import postgresql")
        return 'sa.JSON().with_variant(postgresql.JSONB(), "postgresql")'
    return False


def run_migrations(connection: Connection) -> None:
    """Run the command's migrations on this connection, inside the transaction it holds."""
    context.configure(
        connection=connection,
        target_metadata=dal.metadata,
        # SQLite cannot ALTER most things in place: batch mode copies the table. The same script
        # runs on PostgreSQL, where batch operations are plain ALTERs.
        render_as_batch=True,
        render_item=render_item,
        # dal.migration_connection makes DDL transactional on SQLite too (its own BEGIN).
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def app_database_url() -> str:
    """The database the app would use (the alembic command line only)."""
    from settings import load_settings

    return load_settings().database_url_or_default


if context.is_offline_mode():
    raise SystemExit("Mailslot's migrations run against a database; --sql mode is not supported.")
given = context.config.attributes.get("connection")
if given is not None:
    run_migrations(given)
else:
    with dal.migration_connection(app_database_url()) as opened:
        run_migrations(opened)

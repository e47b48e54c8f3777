"""Every SQL statement in Mailslot: the tables (the Alembic metadata), the engine and its
transactions, and every query.

Query functions take a connection first so that callers compose them inside one transaction
(``with transaction() as conn: ...``) and hand rows back as ``records`` (never SQLAlchemy rows);
SQLAlchemy's errors leave as this module's own (DatabaseUnavailable, Duplicate, ...). It is the
only module that imports SQLAlchemy. Nothing here knows about Flask requests or talks to Redis
(``cache`` does, and calls this module for its SQL fallbacks).
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
import structlog
from flask import Flask, current_app
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine

import records

if TYPE_CHECKING:
    from settings import Settings

log = structlog.get_logger("mailslot.dal")

# =================================================================================================
# Types and tables
# =================================================================================================


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in Python; naive UTC in SQLite, timestamptz in PostgreSQL."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        """Store UTC (naive on SQLite, which has no time zones)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use utcnow()")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        """Hand back aware UTC datetimes on every backend."""
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    """The current time, aware, in UTC."""
    return dt.datetime.now(dt.UTC)


JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
metadata = sa.MetaData()

# Release 1's schema version stamp, kept so that release 1 refuses a database it cannot read.
meta = sa.Table(
    "mailslot_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("email", sa.String(254), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("email_confirmed_at", UTCDateTime),
    sa.Column("session_version", sa.Integer, nullable=False, default=1),
    sa.Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

forms = sa.Table(
    "forms",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("public_id", sa.String(32), nullable=False, unique=True),
    sa.Column("owner_id", sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("fields", JSONType, nullable=False, default=list),
    sa.Column("schema_version", sa.Integer, nullable=False, default=1),
    sa.Column("strict", sa.Boolean, nullable=False, default=False),
    sa.Column("redirect_url", sa.String(2000)),
    sa.Column("allowed_domains", JSONType, nullable=False, default=list),
    sa.Column("honeypot_field", sa.String(64), nullable=False, default="_gotcha"),
    sa.Column("webhook_url", sa.String(2000)),
    sa.Column("webhook_secret", sa.String(100)),
    sa.Column("notify", sa.Boolean, nullable=False, default=True),
    sa.Column("retention_days", sa.Integer),  # NULL = keep submissions forever
    # Shown on the hosted page (plain text): a description, the thank-you message, the footer.
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("thanks_message", sa.Text, nullable=False, default=""),
    sa.Column("show_branding", sa.Boolean, nullable=False, default=True),
    # Owner's spam rules: {"words": [...], "email_domains": [...]}.
    sa.Column("spam_rules", JSONType, nullable=False, default=dict),
    sa.Column("status", sa.String(16), nullable=False, default="active"),
    sa.Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    sa.Column("updated_at", UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow),
    sa.Index("ix_forms_owner", "owner_id", "id"),
)

submissions = sa.Table(
    "submissions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("public_id", sa.String(32), nullable=False, unique=True),
    sa.Column("form_id", sa.ForeignKey("forms.id", ondelete="CASCADE"), nullable=False),
    sa.Column("data", JSONType, nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("is_spam", sa.Boolean, nullable=False, default=False),
    sa.Column("spam_reason", sa.Text),
    sa.Column("ip_hash", sa.String(64)),
    sa.Column("user_agent", sa.String(512)),
    sa.Column("referrer", sa.String(2000)),
    # Control values that are not data but that delivery needs later (_subject, _replyto).
    sa.Column("meta", JSONType, nullable=False, default=dict),
    # The values as people typed them, case-folded: what inbox search matches.
    sa.Column("search_text", sa.Text, nullable=False, default=""),
    sa.Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    sa.Index("ix_submissions_form_id", "form_id", "id"),
    # Covers the inbox chart's last-30-days count (and retention's cutoff) without reading rows.
    sa.Index("ix_submissions_form_created", "form_id", "created_at", "is_spam"),
)

# The outbox: every email and webhook Mailslot sends. A row belongs to a submission (its
# notification or webhook) or to an account (an account email: user_id and template set,
# submission_id NULL); it goes with whichever it belongs to.
deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("submission_id", sa.ForeignKey("submissions.id", ondelete="CASCADE")),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("target", sa.String(2000), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, default="pending"),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", UTCDateTime, nullable=False, default=utcnow),
    sa.Column("last_error", sa.Text),
    sa.Column("updated_at", UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow),
    sa.Column(
        "user_id", sa.ForeignKey("users.id", ondelete="CASCADE", name="deliveries_user_id_fkey")
    ),
    # Which account email (a key of delivery.ACCOUNT_EMAILS); links are made when it is sent.
    sa.Column("template", sa.String(32)),
    # Whatever else that email needs: ids and names only, never a token, code or password.
    sa.Column("params", JSONType),
    sa.Index("ix_deliveries_due", "status", "next_attempt_at"),
    sa.Index("ix_deliveries_submission", "submission_id"),
    sa.Index("ix_deliveries_user", "user_id"),
    sa.CheckConstraint(
        "submission_id IS NOT NULL OR user_id IS NOT NULL",
        name="deliveries_submission_or_user_check",
    ),
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("prefix", sa.String(32), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    sa.Column("last_used_at", UTCDateTime),
    sa.Column("revoked_at", UTCDateTime),
)

# Alembic's own table (not ours to create): the revision the database is at.
_alembic_version = sa.table("alembic_version", sa.column("version_num", sa.String))

R = TypeVar("R")


def _one(cls: Callable[..., R], result: sa.Result[Any]) -> R | None:
    """The record of a result's one row, built by position; None when there is no row."""
    row = result.one_or_none()
    return None if row is None else cls(*row)


def _all(cls: Callable[..., R], result: Iterable[Any]) -> list[R]:
    """The records of a result's rows, built by position."""
    return [cls(*row) for row in result]


# =================================================================================================
# Errors: SQLAlchemy's become Mailslot's own
# =================================================================================================


class DatabaseError(Exception):
    """A statement failed in the database; the message is the driver's (never a password)."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached, or is locked or failing: nothing was saved."""


class IntegrityViolation(DatabaseError):
    """A write broke one of the schema's rules (a constraint, a foreign key)."""


class Duplicate(IntegrityViolation):
    """A write would repeat a value that must be unique (an account's email)."""


class BrokenReferences(IntegrityViolation):
    """An upgrade would leave rows whose foreign keys point nowhere; nothing was changed."""


_UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE; SQLite says "UNIQUE constraint failed"


@contextmanager
def _own_errors() -> Iterator[None]:
    """Raise SQLAlchemy's errors as ours, the original chained for the logs."""
    try:
        yield
    except sa.exc.IntegrityError as exc:
        unique = getattr(exc.orig, "sqlstate", None) == _UNIQUE_VIOLATION or str(
            exc.orig
        ).startswith("UNIQUE constraint failed")
        raise (Duplicate if unique else IntegrityViolation)(str(exc.orig)) from exc
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        raise DatabaseUnavailable(str(exc.orig)) from exc
    except sa.exc.TimeoutError as exc:  # no connection free in the pool
        raise DatabaseUnavailable(str(exc)) from exc
    except sa.exc.SQLAlchemyError as exc:
        raise DatabaseError(str(exc)) from exc


# =================================================================================================
# Engine and transactions
# =================================================================================================


@dataclass
class Database:
    """What one app's SQL goes through: its engine, and on SQLite its writers' lock."""

    engine: Engine
    # SQLite allows one writer at a time and makes the others poll with growing sleeps (up to
    # 100 ms each) while they wait: under load some threads lose every race and wait for seconds.
    # This process's writers queue on a lock instead; other processes still meet busy_timeout.
    write_lock: threading.RLock | None = None


def _sqlite_pragmas(
    dbapi_connection: Any, _record: Any, busy_timeout_ms: int = 5000, foreign_keys: bool = True
) -> None:
    """Durable, concurrent SQLite: WAL, a generous busy timeout, full sync, foreign keys."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
    cursor.close()


def json_text(value: Any) -> str:
    """JSON as stored: real characters rather than \\u escapes, so text search finds them."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def make_engine(url: str) -> Engine:
    """One engine per app; SQLite gets its pragmas on every new connection. Connects lazily."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url, connect_args={"check_same_thread": False}, json_serializer=json_text
        )
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(
        url,
        json_serializer=json_text,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=10,
        connect_args={"connect_timeout": 5},
    )


def init_app(app: Flask, settings: Settings) -> None:
    """Attach the database to the app; no connection is opened here."""
    engine = make_engine(settings.database_url_or_default)
    app.extensions["mailslot.database"] = Database(
        engine=engine,
        write_lock=threading.RLock() if engine.dialect.name == "sqlite" else None,
    )


def database() -> Database:
    """The current app's database."""
    return current_app.extensions["mailslot.database"]


@contextmanager
def transaction() -> Iterator[Connection]:
    """One database transaction: committed on success, rolled back on any error."""
    current = database()
    with _own_errors(), current.write_lock or nullcontext(), current.engine.begin() as conn:
        yield conn


@contextmanager
def connection() -> Iterator[Connection]:
    """A connection for reads."""
    with _own_errors(), database().engine.connect() as conn:
        yield conn


# =================================================================================================
# What the schema is: the statements migrate.py needs
# =================================================================================================

ALEMBIC_VERSION_TABLE = _alembic_version.name
META_TABLE = meta.name
# The upgrade's PostgreSQL advisory lock: a constant of ours ("mailslot" in ASCII).
MIGRATION_LOCK_KEY = 0x6D61696C736C6F74
SQLITE_LOCK_WAIT_MS = 10 * 60 * 1000


def table_names(conn: Connection) -> set[str]:
    """The names of the tables the database holds."""
    return set(sa.inspect(conn).get_table_names())


def alembic_revisions(conn: Connection) -> list[str]:
    """The revisions Alembic stamped the database with (it has the table)."""
    return list(conn.execute(sa.select(_alembic_version.c.version_num)).scalars())


def schema_stamp(conn: Connection) -> str | None:
    """Release 1's schema version stamp, when the database has one (it has the table)."""
    return conn.execute(
        sa.select(meta.c.value).where(meta.c.key == "schema_version")
    ).scalar_one_or_none()


def set_schema_stamp(conn: Connection, value: str) -> None:
    """Change release 1's schema version stamp (release 1 refuses any value but its own)."""
    conn.execute(sa.update(meta).where(meta.c.key == "schema_version").values(value=value))


@contextmanager
def migration_connection(url: str) -> Iterator[Connection]:
    """A connection whose transaction holds the upgrade lock; committed when the block succeeds.

    PostgreSQL: a transaction-level advisory lock on a constant key, released by the commit (or by
    the server when the process dies). SQLite: BEGIN EXCLUSIVE, waiting up to ten minutes for the
    other writers, and DDL inside the transaction, so a failed upgrade leaves nothing half-done.
    Foreign keys are off while it runs (batch mode drops and re-creates tables, and dropping a
    parent with them on deletes its children's rows) and checked before the commit.
    """
    engine = _migration_engine(url)
    try:
        with _own_errors(), engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
            yield conn
            if engine.dialect.name == "sqlite":
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                if broken:
                    tables = ", ".join(sorted({row[0] for row in broken}))
                    raise BrokenReferences(
                        f"The upgrade would leave rows in {tables} whose foreign keys point "
                        "nowhere; nothing was changed."
                    )
    finally:
        engine.dispose()


def _migration_engine(url: str) -> Engine:
    """A one-connection engine for upgrades, apart from the app's pool."""
    if not url.startswith("sqlite"):
        return sa.create_engine(
            url,
            json_serializer=json_text,
            poolclass=sa.pool.NullPool,
            connect_args={"connect_timeout": 5},
        )
    engine = sa.create_engine(url, json_serializer=json_text, poolclass=sa.pool.NullPool)
    sa.event.listen(
        engine,
        "connect",
        partial(_sqlite_pragmas, busy_timeout_ms=SQLITE_LOCK_WAIT_MS, foreign_keys=False),
    )
    sa.event.listen(engine, "connect", _sqlite_manual_begin)
    sa.event.listen(engine, "begin", _begin_exclusive)
    return engine


def _sqlite_manual_begin(dbapi_connection: Any, _record: Any) -> None:
    """Stop pysqlite from beginning transactions itself: it would leave DDL outside them."""
    dbapi_connection.isolation_level = None


def _begin_exclusive(conn: Connection) -> None:
    """Begin the upgrade's transaction holding SQLite's write lock, DDL included."""
    conn.exec_driver_sql("BEGIN EXCLUSIVE")


def database_url() -> str:
    """The current app's database URL, password included (for the migration connection)."""
    return database().engine.url.render_as_string(hide_password=False)


# =================================================================================================
# Public ids
# =================================================================================================


def new_public_id() -> str:
    """A random, URL-safe public id with 128 bits of entropy (forms, submissions)."""
    return secrets.token_urlsafe(16)


# =================================================================================================
# Users
# =================================================================================================


def insert_user(conn: Connection, email: str, password_hash: str) -> records.User:
    """Add an owner; raises Duplicate when the email is taken."""
    user_id = conn.execute(
        sa.insert(users).values(email=email, password_hash=password_hash, created_at=utcnow())
    ).inserted_primary_key[0]
    return records.User(*conn.execute(sa.select(users).where(users.c.id == user_id)).one())


def user_by_email(conn: Connection, email: str) -> records.User | None:
    """The owner with this (lower-cased) email."""
    return _one(records.User, conn.execute(sa.select(users).where(users.c.email == email)))


def user_by_id(conn: Connection, user_id: int) -> records.User | None:
    """The owner with this id."""
    return _one(records.User, conn.execute(sa.select(users).where(users.c.id == user_id)))


def set_password_hash(conn: Connection, user_id: int, password_hash: str) -> None:
    """Store a new password hash (an upgrade at login, or a change)."""
    conn.execute(sa.update(users).where(users.c.id == user_id).values(password_hash=password_hash))


def bump_session_version(conn: Connection, user_id: int) -> None:
    """Invalidate every session cookie issued so far for this owner."""
    conn.execute(
        sa.update(users)
        .where(users.c.id == user_id)
        .values(session_version=users.c.session_version + 1)
    )


def mark_email_confirmed(conn: Connection, user_id: int, email: str) -> bool:
    """Confirm the address if it is still the owner's and not yet confirmed; True if it changed."""
    result = conn.execute(
        sa.update(users)
        .where(users.c.id == user_id, users.c.email == email, users.c.email_confirmed_at.is_(None))
        .values(email_confirmed_at=utcnow())
    )
    return result.rowcount == 1


# =================================================================================================
# Forms
# =================================================================================================

# A form's columns in the order of records.Form's fields (the public view's first), so that a row
# builds the record by position.
_FORM_COLUMNS = tuple(forms.c[name] for name in records.Form.__dataclass_fields__)


def insert_form(
    conn: Connection, owner_id: int, public_id: str, values: dict[str, Any]
) -> records.Form:
    """Add a form for an owner."""
    now = utcnow()
    form_id = conn.execute(
        sa.insert(forms).values(
            owner_id=owner_id, public_id=public_id, created_at=now, updated_at=now, **values
        )
    ).inserted_primary_key[0]
    return records.Form(*conn.execute(sa.select(*_FORM_COLUMNS).where(forms.c.id == form_id)).one())


def update_form(conn: Connection, form_id: int, values: dict[str, Any]) -> None:
    """Change a form's settings or fields."""
    conn.execute(
        sa.update(forms).where(forms.c.id == form_id).values(updated_at=utcnow(), **values)
    )


def bump_schema_version(conn: Connection, form_id: int, fields: list[dict[str, Any]]) -> None:
    """Store a new field schema and count its version up."""
    conn.execute(
        sa.update(forms)
        .where(forms.c.id == form_id)
        .values(fields=fields, schema_version=forms.c.schema_version + 1, updated_at=utcnow())
    )


def delete_form(conn: Connection, form_id: int) -> None:
    """Remove a form with its submissions and their deliveries."""
    sub_ids = sa.select(submissions.c.id).where(submissions.c.form_id == form_id)
    conn.execute(sa.delete(deliveries).where(deliveries.c.submission_id.in_(sub_ids)))
    conn.execute(sa.delete(submissions).where(submissions.c.form_id == form_id))
    conn.execute(sa.delete(forms).where(forms.c.id == form_id))


def form_by_public_id(conn: Connection, public_id: str) -> records.Form | None:
    """A form by its public id, whoever owns it."""
    query = sa.select(*_FORM_COLUMNS).where(forms.c.public_id == public_id)
    return _one(records.Form, conn.execute(query))


_PUBLIC_FORM = sa.select(
    *(forms.c[name] for name in records.PublicForm.__dataclass_fields__)
).where(forms.c.public_id == sa.bindparam("public_id"))


def public_view_of_form(conn: Connection, public_id: str) -> records.PublicForm | None:
    """The public view of a form by its public id, whoever owns it (the cache's fill)."""
    return _one(records.PublicForm, conn.execute(_PUBLIC_FORM, {"public_id": public_id}))


def owned_form(conn: Connection, owner_id: int, public_id: str) -> records.Form | None:
    """A form by public id, only when this owner has it."""
    query = sa.select(*_FORM_COLUMNS).where(
        forms.c.public_id == public_id, forms.c.owner_id == owner_id
    )
    return _one(records.Form, conn.execute(query))


def forms_with_counts(conn: Connection, owner_id: int) -> list[records.FormWithCounts]:
    """The owner's forms, newest first, with submission counts and the newest submission time."""
    counts = (
        sa.select(
            submissions.c.form_id,
            sa.func.count().label("submission_count"),
            sa.func.max(submissions.c.created_at).label("newest_at"),
        )
        .where(submissions.c.is_spam.is_(False))
        .group_by(submissions.c.form_id)
        .subquery()
    )
    query = (
        sa.select(
            *_FORM_COLUMNS,
            sa.func.coalesce(counts.c.submission_count, 0).label("submission_count"),
            counts.c.newest_at,
        )
        .select_from(forms.outerjoin(counts, counts.c.form_id == forms.c.id))
        .where(forms.c.owner_id == owner_id)
        .order_by(forms.c.id.desc())
    )
    return _all(records.FormWithCounts, conn.execute(query))


# The submission path's statements are built once: executed with a parameter dict they reuse
# their cache key and compiled form, instead of building and hashing a new statement per call.
_OWNER_OF_FORM = (
    sa.select(users)
    .join(forms, forms.c.owner_id == users.c.id)
    .where(forms.c.id == sa.bindparam("form_id"))
)
_INSERT_SUBMISSION = sa.insert(submissions).returning(*submissions.c)
_INSERT_DELIVERIES = sa.insert(deliveries).returning(deliveries.c.id, sort_by_parameter_order=True)


def owner_of_form(conn: Connection, form_id: int) -> records.User | None:
    """The user who owns a form."""
    return _one(records.User, conn.execute(_OWNER_OF_FORM, {"form_id": form_id}))


# =================================================================================================
# Submissions
# =================================================================================================


def search_text(data: dict[str, Any]) -> str:
    """The searchable text of a submission: every value as typed, case-folded."""
    parts = [value if isinstance(value, str) else json.dumps(value) for value in data.values()]
    return "\n".join(parts).casefold()


def insert_submission(conn: Connection, values: dict[str, Any]) -> records.Submission:
    """Store one submission (its search text is derived from its data)."""
    values = {"search_text": search_text(values["data"]), **values, "created_at": utcnow()}
    return records.Submission(*conn.execute(_INSERT_SUBMISSION, values).one())


def insert_deliveries(
    conn: Connection, submission_id: int, targets: list[tuple[str, str]], status: str = "pending"
) -> list[int]:
    """Queue (kind, target) deliveries in the outbox, in the submission's transaction; one
    statement for all of them. Spam's are ``held``. Their ids, in the order given."""
    if not targets:
        return []
    now = utcnow()
    rows = [
        {
            "submission_id": submission_id,
            "kind": kind,
            "target": target,
            "status": status,
            "attempts": 0,
            "next_attempt_at": now,
            "updated_at": now,
        }
        for kind, target in targets
    ]
    return list(conn.execute(_INSERT_DELIVERIES, rows).scalars())


def _like_pattern(text: str) -> str:
    """A LIKE pattern that matches ``text`` literally anywhere."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def submission_page(
    conn: Connection,
    form_id: int,
    *,
    before: int | None = None,
    limit: int = 50,
    query: str = "",
    spam: bool | None = False,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> list[records.Submission]:
    """One page of a form's submissions, newest first, keyset-paged by id (``before``)."""
    stmt = sa.select(submissions).where(submissions.c.form_id == form_id)
    if before is not None:
        # A 64-bit bound: an API cursor may point past the largest 32-bit id PostgreSQL stores.
        stmt = stmt.where(submissions.c.id < sa.literal(before, sa.BigInteger))
    if spam is not None:
        stmt = stmt.where(submissions.c.is_spam.is_(spam))
    if query:
        pattern = _like_pattern(query.casefold())
        stmt = stmt.where(submissions.c.search_text.like(pattern, escape="\\"))
    if since is not None:
        stmt = stmt.where(submissions.c.created_at >= since)
    if until is not None:
        stmt = stmt.where(submissions.c.created_at < until)
    return _all(
        records.Submission, conn.execute(stmt.order_by(submissions.c.id.desc()).limit(limit))
    )


_EXPORTED_SUBMISSION = sa.select(
    *(submissions.c[name] for name in records.ExportedSubmission.__dataclass_fields__)
)


def iter_submissions(
    conn: Connection, form_id: int, batch: int = 1000
) -> Iterator[records.ExportedSubmission]:
    """Every non-spam submission of a form, oldest first, fetched in batches (constant memory)."""
    last = 0
    while True:
        rows = _all(
            records.ExportedSubmission,
            conn.execute(
                _EXPORTED_SUBMISSION.where(
                    submissions.c.form_id == form_id,
                    submissions.c.id > last,
                    submissions.c.is_spam.is_(False),
                )
                .order_by(submissions.c.id)
                .limit(batch)
            ),
        )
        yield from rows
        if len(rows) < batch:
            return
        last = rows[-1].id


def submission_in_form(conn: Connection, form_id: int, public_id: str) -> records.Submission | None:
    """A submission by public id, only within this form."""
    query = sa.select(submissions).where(
        submissions.c.form_id == form_id, submissions.c.public_id == public_id
    )
    return _one(records.Submission, conn.execute(query))


def set_spam(conn: Connection, submission_id: int, is_spam: bool, reason: str | None) -> None:
    """Mark a submission spam or not spam."""
    conn.execute(
        sa.update(submissions)
        .where(submissions.c.id == submission_id)
        .values(is_spam=is_spam, spam_reason=reason)
    )


def delete_submission(conn: Connection, submission_id: int) -> None:
    """Remove one submission and its deliveries."""
    _delete_submissions(conn, [submission_id])


def deliveries_for(conn: Connection, submission_id: int) -> list[records.Delivery]:
    """A submission's delivery log."""
    return _all(
        records.Delivery,
        conn.execute(
            sa.select(deliveries)
            .where(deliveries.c.submission_id == submission_id)
            .order_by(deliveries.c.id)
        ),
    )


def spam_count(conn: Connection, form_id: int) -> int:
    """How many of a form's stored submissions are spam."""
    return conn.execute(
        sa.select(sa.func.count()).where(
            submissions.c.form_id == form_id, submissions.c.is_spam.is_(True)
        )
    ).scalar_one()


# =================================================================================================
# Deliveries (the outbox)
# =================================================================================================


def claim_delivery(
    conn: Connection, delivery_id: int, lease_seconds: int, expect_attempts: int | None = None
) -> records.Delivery | None:
    """Take a delivery for sending: pending, or sending with an expired lease. None = no-op.

    One conditional UPDATE, so two workers holding the same message cannot both win. With
    ``expect_attempts`` the row must still have that many attempts (the message is not stale).
    """
    now = utcnow()
    conditions = [
        deliveries.c.id == delivery_id,
        sa.or_(
            deliveries.c.status == "pending",
            sa.and_(deliveries.c.status == "sending", deliveries.c.next_attempt_at < now),
        ),
    ]
    if expect_attempts is not None:
        conditions.append(deliveries.c.attempts == expect_attempts)
    result = conn.execute(
        sa.update(deliveries)
        .where(*conditions)
        .values(
            status="sending",
            attempts=deliveries.c.attempts + 1,
            next_attempt_at=now + dt.timedelta(seconds=lease_seconds),
            updated_at=now,
        )
    )
    if result.rowcount != 1:
        return None
    return records.Delivery(
        *conn.execute(sa.select(deliveries).where(deliveries.c.id == delivery_id)).one()
    )


def finish_delivery(
    conn: Connection,
    delivery_id: int,
    status: str,
    *,
    error: str | None = None,
    next_attempt_at: dt.datetime | None = None,
) -> None:
    """Record an attempt's outcome: done, dead, or pending again at ``next_attempt_at``."""
    values: dict[str, Any] = {"status": status, "last_error": error, "updated_at": utcnow()}
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    conn.execute(sa.update(deliveries).where(deliveries.c.id == delivery_id).values(**values))


# What every delivery task reads of its own row, whatever the row belongs to.
_DELIVERY_ROW = (
    deliveries.c.id.label("delivery_id"),
    deliveries.c.kind,
    deliveries.c.target,
    deliveries.c.attempts,
)


def delivery_context(conn: Connection, delivery_id: int) -> records.SubmissionDelivery | None:
    """A delivery with its submission, form and owner, for building the message."""
    query = (
        sa.select(
            *_DELIVERY_ROW,
            submissions.c.id.label("submission_id"),
            submissions.c.public_id.label("submission_public_id"),
            submissions.c.data,
            submissions.c.meta,
            submissions.c.created_at,
            submissions.c.is_spam,
            forms.c.id.label("form_id"),
            forms.c.public_id.label("form_public_id"),
            forms.c.name.label("form_name"),
            forms.c.webhook_url,
            forms.c.webhook_secret,
            users.c.email.label("owner_email"),
            users.c.email_confirmed_at.label("owner_confirmed_at"),
        )
        .select_from(
            deliveries.join(submissions, submissions.c.id == deliveries.c.submission_id)
            .join(forms, forms.c.id == submissions.c.form_id)
            .join(users, users.c.id == forms.c.owner_id)
        )
        .where(deliveries.c.id == delivery_id)
    )
    row = conn.execute(query).one_or_none()
    return None if row is None else records.SubmissionDelivery(**row._mapping)


def insert_account_delivery(
    conn: Connection,
    user_id: int,
    template: str,
    target: str,
    params: dict[str, Any] | None = None,
) -> int:
    """Queue one account email in the outbox, in the caller's transaction; its id."""
    now = utcnow()
    return conn.execute(
        sa.insert(deliveries).values(
            user_id=user_id,
            kind="email",
            template=template,
            target=target,
            params=params,
            status="pending",
            attempts=0,
            next_attempt_at=now,
            updated_at=now,
        )
    ).inserted_primary_key[0]


def account_delivery_context(conn: Connection, delivery_id: int) -> records.AccountDelivery | None:
    """An account email with its account, for building the message."""
    query = (
        sa.select(
            *_DELIVERY_ROW,
            deliveries.c.template,
            deliveries.c.params,
            users.c.id.label("user_id"),
            users.c.email.label("user_email"),
            users.c.email_confirmed_at.label("user_confirmed_at"),
        )
        .join(users, users.c.id == deliveries.c.user_id)
        .where(deliveries.c.id == delivery_id, deliveries.c.submission_id.is_(None))
    )
    row = conn.execute(query).one_or_none()
    return None if row is None else records.AccountDelivery(**row._mapping)


def account_deliveries(conn: Connection, user_id: int, limit: int = 20) -> list[records.Delivery]:
    """The account emails of one owner, newest first."""
    return _all(
        records.Delivery,
        conn.execute(
            sa.select(deliveries)
            .where(deliveries.c.user_id == user_id, deliveries.c.submission_id.is_(None))
            .order_by(deliveries.c.id.desc())
            .limit(limit)
        ),
    )


def owned_account_delivery(
    conn: Connection, user_id: int, delivery_id: int
) -> records.Delivery | None:
    """One account email, only when it is this owner's."""
    query = sa.select(deliveries).where(
        deliveries.c.id == delivery_id,
        deliveries.c.user_id == user_id,
        deliveries.c.submission_id.is_(None),
    )
    return _one(records.Delivery, conn.execute(query))


def due_deliveries(conn: Connection, limit: int, push_back_seconds: int) -> list[tuple[int, int]]:
    """(id, attempts) of rows to (re-)enqueue: pending and due, or stuck in sending past their
    lease.

    Picked rows are pushed back ``push_back_seconds`` so the next sweep does not enqueue them
    again while their message waits in the queue. On PostgreSQL concurrent sweepers skip each
    other's rows (FOR UPDATE SKIP LOCKED).
    """
    now = utcnow()
    query = (
        sa.select(deliveries.c.id, deliveries.c.attempts)
        .where(
            deliveries.c.status.in_(("pending", "sending")),
            deliveries.c.next_attempt_at <= now,
        )
        .order_by(deliveries.c.next_attempt_at)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    due = [(row.id, row.attempts) for row in conn.execute(query)]
    if due:
        conn.execute(
            sa.update(deliveries)
            .where(deliveries.c.id.in_([i for i, _ in due]), deliveries.c.status == "pending")
            .values(next_attempt_at=now + dt.timedelta(seconds=push_back_seconds))
        )
    return due


def requeue_delivery(conn: Connection, delivery_id: int) -> bool:
    """Replay a done or dead delivery: pending again, due now, attempts kept for the record."""
    result = conn.execute(
        sa.update(deliveries)
        .where(deliveries.c.id == delivery_id, deliveries.c.status.in_(("done", "dead")))
        .values(status="pending", next_attempt_at=utcnow(), last_error=None, updated_at=utcnow())
    )
    return result.rowcount == 1


def release_spam_deliveries(conn: Connection, submission_id: int) -> list[int]:
    """Make a submission's held deliveries due now; their ids."""
    ids = list(
        conn.execute(
            sa.select(deliveries.c.id).where(
                deliveries.c.submission_id == submission_id, deliveries.c.status == "held"
            )
        ).scalars()
    )
    if ids:
        conn.execute(
            sa.update(deliveries)
            .where(deliveries.c.id.in_(ids))
            .values(status="pending", next_attempt_at=utcnow(), updated_at=utcnow())
        )
    return ids


def disable_webhook(conn: Connection, form_id: int) -> None:
    """Turn a form's webhook off (its receiver answered 410 Gone)."""
    conn.execute(
        sa.update(forms).where(forms.c.id == form_id).values(webhook_url=None, updated_at=utcnow())
    )


def _unsent_webhooks(form_id: int) -> sa.ColumnElement[bool]:
    """The conditions for a form's webhook deliveries that no attempt is working on."""
    return sa.and_(
        deliveries.c.kind == "webhook",
        deliveries.c.status.in_(("pending", "held")),
        deliveries.c.submission_id.in_(
            sa.select(submissions.c.id).where(submissions.c.form_id == form_id)
        ),
    )


def retarget_webhook_deliveries(conn: Connection, form_id: int, url: str) -> int:
    """Show the form's unsent webhook deliveries going to its new URL; how many there were."""
    result = conn.execute(sa.update(deliveries).where(_unsent_webhooks(form_id)).values(target=url))
    return result.rowcount


def cancel_webhook_deliveries(conn: Connection, form_id: int, reason: str) -> int:
    """Mark the form's unsent webhook deliveries dead with ``reason``; how many there were."""
    result = conn.execute(
        sa.update(deliveries)
        .where(_unsent_webhooks(form_id))
        .values(status="dead", last_error=reason, updated_at=utcnow())
    )
    return result.rowcount


def set_delivery_target(conn: Connection, delivery_id: int, target: str) -> None:
    """Record where a delivery is being sent (a webhook's URL can change between attempts)."""
    conn.execute(sa.update(deliveries).where(deliveries.c.id == delivery_id).values(target=target))


def dead_deliveries(conn: Connection, form_id: int, limit: int = 200) -> list[records.DeadDelivery]:
    """A form's dead deliveries with their submission ids, newest first."""
    return _all(
        records.DeadDelivery,
        conn.execute(
            sa.select(deliveries, submissions.c.public_id.label("submission_public_id"))
            .join(submissions, submissions.c.id == deliveries.c.submission_id)
            .where(submissions.c.form_id == form_id, deliveries.c.status == "dead")
            .order_by(deliveries.c.id.desc())
            .limit(limit)
        ),
    )


# =================================================================================================
# API tokens (and the JSON API's own lookups and per-token rate limit)
# =================================================================================================


def insert_api_token(
    conn: Connection, user_id: int, name: str, prefix: str, token_hash: str
) -> records.ApiToken:
    """Store a new API token (its hash and visible prefix, never the token itself)."""
    token_id = conn.execute(
        sa.insert(api_tokens).values(
            user_id=user_id, name=name, prefix=prefix, token_hash=token_hash, created_at=utcnow()
        )
    ).inserted_primary_key[0]
    return records.ApiToken(
        *conn.execute(sa.select(api_tokens).where(api_tokens.c.id == token_id)).one()
    )


def active_api_tokens(conn: Connection, user_id: int) -> list[records.ApiToken]:
    """An owner's tokens that are not revoked, newest first."""
    return _all(
        records.ApiToken,
        conn.execute(
            sa.select(api_tokens)
            .where(api_tokens.c.user_id == user_id, api_tokens.c.revoked_at.is_(None))
            .order_by(api_tokens.c.id.desc())
        ),
    )


def api_token_by_hash(conn: Connection, token_hash: str) -> records.ApiTokenWithOwner | None:
    """The unrevoked token with this hash, with its owner's email and confirmation time."""
    query = (
        sa.select(
            api_tokens,
            users.c.email,
            users.c.email_confirmed_at,
            users.c.created_at.label("user_created_at"),
        )
        .join(users, users.c.id == api_tokens.c.user_id)
        .where(api_tokens.c.token_hash == token_hash, api_tokens.c.revoked_at.is_(None))
    )
    return _one(records.ApiTokenWithOwner, conn.execute(query))


def revoke_api_token(conn: Connection, user_id: int, token_id: int) -> bool:
    """Revoke one of this owner's tokens; False when there is no such active token."""
    result = conn.execute(
        sa.update(api_tokens)
        .where(
            api_tokens.c.id == token_id,
            api_tokens.c.user_id == user_id,
            api_tokens.c.revoked_at.is_(None),
        )
        .values(revoked_at=utcnow())
    )
    return result.rowcount == 1


def touch_api_token(conn: Connection, token_id: int, now: dt.datetime, every: int) -> None:
    """Record a use, at most once per ``every`` seconds (a conditional UPDATE, no read)."""
    conn.execute(
        sa.update(api_tokens)
        .where(
            api_tokens.c.id == token_id,
            sa.or_(
                api_tokens.c.last_used_at.is_(None),
                api_tokens.c.last_used_at < now - dt.timedelta(seconds=every),
            ),
        )
        .values(last_used_at=now)
    )


def owned_submission(
    conn: Connection, owner_id: int, public_id: str
) -> records.SubmissionWithForm | None:
    """A submission by public id with its form's public id, only when this owner has the form."""
    query = (
        sa.select(submissions, forms.c.public_id.label("form_public_id"))
        .join(forms, forms.c.id == submissions.c.form_id)
        .where(submissions.c.public_id == public_id, forms.c.owner_id == owner_id)
    )
    return _one(records.SubmissionWithForm, conn.execute(query))


# =================================================================================================
# Submissions per day (the inbox chart)
# =================================================================================================


def daily_counts(conn: Connection, form_id: int, days: int) -> list[records.DayCount]:
    """Non-spam submissions per UTC day for the last ``days`` days, oldest first, zeros included."""
    first = utcnow().date() - dt.timedelta(days=days - 1)
    since = dt.datetime.combine(first, dt.time(), tzinfo=dt.UTC)
    if conn.dialect.name == "postgresql":
        # A literal, not a bound parameter: GROUP BY must repeat the select's expression exactly.
        utc = sa.func.timezone(sa.literal_column("'UTC'"), submissions.c.created_at)
        day: Any = sa.cast(utc, sa.Date)
    else:
        day = sa.func.date(submissions.c.created_at)
    rows = conn.execute(
        sa.select(day.label("day"), sa.func.count().label("n"))
        .where(
            submissions.c.form_id == form_id,
            submissions.c.is_spam.is_(False),
            submissions.c.created_at >= since,
        )
        .group_by(day)
    )
    found = {
        row.day if isinstance(row.day, dt.date) else dt.date.fromisoformat(row.day): row.n
        for row in rows
    }
    dates = [first + dt.timedelta(days=offset) for offset in range(days)]
    return [records.DayCount(date, found.get(date, 0)) for date in dates]


# =================================================================================================
# Retention and erasure
# =================================================================================================


def _delete_submissions(conn: Connection, ids: sa.Select[Any] | list[int]) -> int:
    """Delete submissions (and their deliveries) by id or by an id subquery; the count."""
    conn.execute(sa.delete(deliveries).where(deliveries.c.submission_id.in_(ids)))
    return conn.execute(sa.delete(submissions).where(submissions.c.id.in_(ids))).rowcount


def forms_with_retention(conn: Connection) -> list[tuple[int, int]]:
    """(form id, retention days) of the forms whose owner set a retention period."""
    query = sa.select(forms.c.id, forms.c.retention_days).where(forms.c.retention_days.is_not(None))
    return [(form_id, days) for form_id, days in conn.execute(query)]


def purge_before(conn: Connection, form_id: int, cutoff: dt.datetime, batch: int) -> int:
    """Delete up to ``batch`` of a form's submissions older than ``cutoff``; the count."""
    ids = (
        sa.select(submissions.c.id)
        .where(submissions.c.form_id == form_id, submissions.c.created_at < cutoff)
        .order_by(submissions.c.id)
        .limit(batch)
    )
    return _delete_submissions(conn, list(conn.execute(ids).scalars()))


def submissions_mentioning(
    conn: Connection, owner_id: int, text: str
) -> Iterator[records.SubmissionValues]:
    """The owner's submissions whose data or control values contain ``text`` (candidates)."""
    pattern = _like_pattern(text)
    query = (
        sa.select(submissions.c.id, submissions.c.data, submissions.c.meta)
        .join(forms, forms.c.id == submissions.c.form_id)
        .where(
            forms.c.owner_id == owner_id,
            sa.or_(
                sa.cast(submissions.c.data, sa.Text).ilike(pattern, escape="\\"),
                sa.cast(submissions.c.meta, sa.Text).ilike(pattern, escape="\\"),
            ),
        )
        .order_by(submissions.c.id)
    )
    for row in conn.execute(query):
        yield records.SubmissionValues(*row)


def delete_submissions(conn: Connection, ids: list[int]) -> int:
    """Delete these submissions and their deliveries; the count."""
    total = 0
    for start in range(0, len(ids), 500):
        total += _delete_submissions(conn, ids[start : start + 500])
    return total

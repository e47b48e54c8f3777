"""Every SQL statement and every Redis access in Mailslot.

Query functions take a SQLAlchemy ``Connection`` first so that callers compose them inside one
transaction (``with transaction() as conn: ...``). Nothing here knows about Flask requests.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import fakeredis
import redis
import sqlalchemy as sa
from flask import Flask, current_app
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine, Row

if TYPE_CHECKING:
    from microapp import Settings

__all__ = ["Row"]

SCHEMA_VERSION = 1

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
    sa.Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    sa.Index("ix_submissions_form_id", "form_id", "id"),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("submission_id", sa.ForeignKey("submissions.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("target", sa.String(2000), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, default="pending"),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", UTCDateTime, nullable=False, default=utcnow),
    sa.Column("last_error", sa.Text),
    sa.Column("updated_at", UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow),
    sa.Index("ix_deliveries_due", "status", "next_attempt_at"),
    sa.Index("ix_deliveries_submission", "submission_id"),
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

# =================================================================================================
# Engine, Redis client and the app's stores
# =================================================================================================


@dataclass
class Stores:
    """What one app talks to: one SQL engine and one Redis client."""

    engine: Engine
    redis: redis.Redis
    key_prefix: str
    embedded_redis: bool


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Durable, concurrent SQLite: WAL, a generous busy timeout, full sync, foreign keys."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """One engine per app; SQLite gets its pragmas on every new connection. Connects lazily."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=10,
        connect_args={"connect_timeout": 5},
    )


def make_redis(settings: Settings) -> tuple[redis.Redis, bool]:
    """A Redis client with short timeouts, or an in-process server when REDIS_URL is empty."""
    if not settings.redis_url:
        return fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True), True
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        decode_responses=True,
        retry_on_timeout=False,
    )
    return client, False


def init_app(app: Flask, settings: Settings) -> None:
    """Attach the stores to the app; no connection is opened here."""
    client, embedded = make_redis(settings)
    app.extensions["mailslot.stores"] = Stores(
        engine=make_engine(settings.database_url_or_default),
        redis=client,
        key_prefix=settings.redis_key_prefix,
        embedded_redis=embedded,
    )


def stores() -> Stores:
    """The current app's stores."""
    return current_app.extensions["mailslot.stores"]


@contextmanager
def transaction() -> Iterator[Connection]:
    """One database transaction: committed on success, rolled back on any error."""
    with stores().engine.begin() as conn:
        yield conn


@contextmanager
def connection() -> Iterator[Connection]:
    """A connection for reads."""
    with stores().engine.connect() as conn:
        yield conn


def describe_url(url: str) -> str:
    """A URL fit for logs: the password is replaced by ***."""
    password = urlsplit(url).password
    return url.replace(f":{password}@", ":***@", 1) if password else url


# =================================================================================================
# Schema set-up and health
# =================================================================================================


class SchemaMismatch(RuntimeError):
    """The database was made by another version of Mailslot."""


def init_db() -> bool:
    """Create missing tables and record the schema version; True when anything was created.

    Safe to run any number of times. A database stamped with another schema version is refused
    with a message instead of being used half-understood.
    """
    with stores().engine.begin() as conn:
        existing = set(sa.inspect(conn).get_table_names())
        stored = _schema_version(conn) if meta.name in existing else None
        if stored is not None and stored != SCHEMA_VERSION:
            raise SchemaMismatch(
                f"The database has Mailslot schema version {stored}, but this Mailslot uses "
                f"version {SCHEMA_VERSION}. Use the matching Mailslot release or a new database."
            )
        missing = [t.name for t in metadata.sorted_tables if t.name not in existing]
        metadata.create_all(conn, checkfirst=True)
        if stored is None:
            conn.execute(sa.insert(meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
    return bool(missing)


def _schema_version(conn: Connection) -> int | None:
    """The schema version the database was stamped with."""
    value = conn.execute(
        sa.select(meta.c.value).where(meta.c.key == "schema_version")
    ).scalar_one_or_none()
    return int(value) if value is not None else None


def stored_schema_version() -> int | None:
    """The stamped schema version, or None before init-db."""
    with connection() as conn:
        if meta.name not in sa.inspect(conn).get_table_names():
            return None
        return _schema_version(conn)


def redis_reachable() -> bool:
    """True when Redis answers a PING within its timeout."""
    try:
        return bool(stores().redis.ping())
    except (redis.RedisError, OSError):
        return False


# =================================================================================================
# Users
# =================================================================================================


def insert_user(conn: Connection, email: str, password_hash: str) -> Row:
    """Add an owner; raises IntegrityError when the email is taken."""
    user_id = conn.execute(
        sa.insert(users).values(email=email, password_hash=password_hash, created_at=utcnow())
    ).inserted_primary_key[0]
    return conn.execute(sa.select(users).where(users.c.id == user_id)).one()


def user_by_email(conn: Connection, email: str) -> Row | None:
    """The owner with this (lower-cased) email."""
    return conn.execute(sa.select(users).where(users.c.email == email)).one_or_none()


def user_by_id(conn: Connection, user_id: int) -> Row | None:
    """The owner with this id."""
    return conn.execute(sa.select(users).where(users.c.id == user_id)).one_or_none()


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

"""Schema migrations, on SQLite and PostgreSQL.

A database left by release 1 (its frozen DDL in tests/release_1/, realistic rows, the old version
stamp) comes under Alembic with every row intact and usable; the migrations build exactly what
dal.py describes and what release 1 built; the upgrade is idempotent, serialised between
processes, and refuses a database newer than the code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy.dialects.postgresql import JSONB
from werkzeug.security import generate_password_hash

import dal
import microapp
import migrate
from conftest import (
    FAST_HASH,
    PASSWORD,
    AuthActions,
    free_port,
    new_postgres_database,
    post_form,
    read_outbox,
)

PROJECT = Path(__file__).resolve().parent.parent
RELEASE_1_SCHEMA = Path(__file__).resolve().parent / "release_1"
HEAD = migrate.SCHEMA_REVISION
# The revisions after release 1's, in order: what an upgrade from release 1 runs.
LATER = [f"{n:04d}" for n in range(2, int(HEAD) + 1)]
NEXT = f"{int(HEAD) + 1:04d}"  # a test-only migration after the head (ship_next)
CREATED = f"Created the database at revision {HEAD} (head)."
ADOPTED = "Brought a database from release 1 under Alembic at revision 0001; no row was changed."
UPGRADED = f"Upgraded {' → '.join(['0001', *LATER])} (head)."
# What upgrade-db says about a release 1 database.
ADOPTION = [ADOPTED, UPGRADED] if LATER else [ADOPTED]
NOTHING_TO_DO = f"Already at {HEAD} (head); nothing to do."


# =================================================================================================
# Release 1's database: its DDL (frozen in SQL files) and realistic rows
# =================================================================================================

NOW = dt.datetime(2025, 3, 14, 9, 26, 53, 589793, tzinfo=dt.UTC)
TOKEN = "ms_live_" + "r1" * 21 + "a"  # an API token made by release 1 (only its hash is stored)
REVOKED_TOKEN = "ms_live_" + "x9" * 21 + "b"
FORM_PID = "contactForm0000000000000000000a1"
SUBMISSION_PIDS = ("sub-ada", "sub-grace", "sub-spam", "sub-other")
FIELDS = [
    {"name": "name", "label": "Your name", "type": "text", "required": True, "max_length": None,
     "min": None, "max": None, "choices": [], "help": ""},
    {"name": "email", "label": "email", "type": "email", "required": True, "max_length": None,
     "min": None, "max": None, "choices": [], "help": ""},
    {"name": "topic", "label": "topic", "type": "select", "required": False, "max_length": None,
     "min": None, "max": None, "choices": ["Sales", "Support"], "help": ""},
]  # fmt: skip


def _ago(**delta: float) -> dt.datetime:
    """A fixed moment before NOW."""
    return NOW - dt.timedelta(**delta)


def _user(uid: int, email: str, confirmed: bool, sessions: int) -> dict[str, Any]:
    """A users row as release 1 stored it."""
    return {
        "id": uid,
        "email": email,
        "password_hash": generate_password_hash(PASSWORD, method=FAST_HASH),
        "email_confirmed_at": _ago(days=30) if confirmed else None,
        "session_version": sessions,
        "created_at": _ago(days=31),
    }


def _form(fid: int, owner: int, public_id: str, name: str, **values: Any) -> dict[str, Any]:
    """A forms row as release 1 stored it."""
    row = {
        "id": fid, "public_id": public_id, "owner_id": owner, "name": name, "fields": [],
        "schema_version": 1, "strict": False, "redirect_url": None, "allowed_domains": [],
        "honeypot_field": "_gotcha", "webhook_url": None, "webhook_secret": None, "notify": True,
        "retention_days": None, "description": "", "thanks_message": "", "show_branding": True,
        "spam_rules": {}, "status": "active", "created_at": _ago(days=20),
        "updated_at": _ago(days=2),
    }  # fmt: skip
    return {**row, **values}


def _submission(sid: int, form: int, data: dict[str, str], **values: Any) -> dict[str, Any]:
    """A submissions row as release 1 stored it."""
    row = {
        "id": sid, "public_id": SUBMISSION_PIDS[sid - 1], "form_id": form, "data": data,
        "schema_version": 1, "is_spam": False, "spam_reason": None, "ip_hash": "9f" * 16,
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64)", "referrer": "https://example.com/contact",
        "meta": {}, "search_text": " ".join(data.values()).casefold(),
        "created_at": _ago(hours=sid),
    }  # fmt: skip
    return {**row, **values}


def _delivery(did: int, sub: int, kind: str, status: str, attempts: int, **values: Any) -> dict:
    """A deliveries row as release 1 stored it."""
    target = "owner@example.com" if kind == "email" else "http://127.0.0.1:9/hook"
    row = {
        "id": did, "submission_id": sub, "kind": kind, "target": target, "status": status,
        "attempts": attempts, "next_attempt_at": _ago(minutes=did), "last_error": None,
        "updated_at": _ago(minutes=did),
    }  # fmt: skip
    return {**row, **values}


def release_1_rows() -> dict[str, list[dict[str, Any]]]:
    """Two accounts, their forms with fields, submissions (one spam), deliveries in every state
    and API tokens (one revoked): what a release-1 deployment holds."""
    return {
        "mailslot_meta": [{"key": "schema_version", "value": "1"}],
        "users": [
            _user(1, "owner@example.com", confirmed=True, sessions=2),
            _user(2, "new@example.org", confirmed=False, sessions=1),
        ],
        "forms": [
            _form(
                1,
                1,
                FORM_PID,
                "Contact",
                fields=FIELDS,
                schema_version=3,
                strict=True,
                allowed_domains=["example.com"],
                webhook_url="http://127.0.0.1:9/hook",
                webhook_secret="whsec_" + "a" * 32,
                retention_days=365,
                description="Write to us.",
                thanks_message="Thank you!",
                spam_rules={"words": ["casino"], "email_domains": ["spam.test"]},
            ),
            _form(
                2,
                1,
                "pausedSurvey000000000000000000b2",
                "Survey",
                status="paused",
                notify=False,
                show_branding=False,
                redirect_url="https://example.com/thanks",
            ),
            _form(3, 2, "newcomerForm000000000000000000c3", "Newcomer"),
        ],
        "api_tokens": [
            {
                "id": 1,
                "user_id": 1,
                "name": "CRM sync",
                "prefix": TOKEN[:12],
                "token_hash": hashlib.sha256(TOKEN.encode()).hexdigest(),
                "created_at": _ago(days=10),
                "last_used_at": _ago(hours=1),
                "revoked_at": None,
            },
            {
                "id": 2,
                "user_id": 1,
                "name": "Old laptop",
                "prefix": REVOKED_TOKEN[:12],
                "token_hash": hashlib.sha256(REVOKED_TOKEN.encode()).hexdigest(),
                "created_at": _ago(days=9),
                "last_used_at": None,
                "revoked_at": _ago(days=8),
            },
        ],
        "submissions": [
            _submission(
                1,
                1,
                {"name": "Ada Lovelace", "email": "ada@example.net", "topic": "Sales"},
                meta={"_subject": "Engines"},
            ),
            _submission(
                2, 1, {"name": "Grace Hopper", "email": "grace@example.net", "topic": "Support"}
            ),
            _submission(
                3,
                1,
                {"name": "Casino", "email": "win@spam.test"},
                is_spam=True,
                spam_reason="rule: casino",
            ),
            _submission(
                4, 3, {"message": "Hello — ünïcödé ✓"}, ip_hash=None, user_agent=None, referrer=None
            ),
        ],
        "deliveries": [
            _delivery(1, 1, "email", "done", 1),
            _delivery(2, 1, "webhook", "dead", 10, last_error="HTTP 500 from the receiver"),
            _delivery(3, 2, "email", "dead", 10, last_error="SMTP 451 try later"),
            _delivery(4, 2, "webhook", "sending", 2, next_attempt_at=NOW + dt.timedelta(minutes=5)),
            _delivery(5, 4, "email", "pending", 0),
            _delivery(6, 3, "email", "held", 0),
            _delivery(7, 3, "webhook", "held", 0),
        ],
    }


_JSON_COLUMNS = {"fields", "allowed_domains", "spam_rules", "data", "meta"}
_FROZEN_JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def _frozen_table(name: str, columns: list[str]) -> sa.TableClause:
    """Release 1's table as a plain clause: JSON and timestamp columns typed as it typed them."""

    def typed(column: str) -> sa.ColumnClause[Any]:
        if column in _JSON_COLUMNS and name != "mailslot_meta":
            return sa.column(column, _FROZEN_JSON)
        if column.endswith("_at"):
            return sa.column(column, sa.DateTime(timezone=True))
        return sa.column(column)

    return sa.table(name, *(typed(column) for column in columns))


def build_release_1_database(url: str) -> None:
    """Create release 1's schema with its own DDL, fill it with its rows and stamp it."""
    engine = sa.create_engine(url)
    kind = engine.dialect.name
    lines = (RELEASE_1_SCHEMA / f"schema.{kind}.sql").read_text().splitlines()
    ddl = "\n".join(line for line in lines if not line.startswith("--"))
    statements = [statement for statement in ddl.split(";\n") if statement.strip()]
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
        for name, rows in release_1_rows().items():
            conn.execute(sa.insert(_frozen_table(name, list(rows[0]))), rows)
        if kind == "postgresql":  # SERIAL sequences go on after the ids inserted by hand
            for name in ("users", "forms", "api_tokens", "submissions", "deliveries"):
                conn.exec_driver_sql(
                    f"SELECT setval('{name}_id_seq', (SELECT max(id) FROM {name}))"
                )
    engine.dispose()


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (Alembic's included), in key order."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        names = sorted(sa.inspect(conn).get_table_names())
        rows = {
            n: [tuple(r) for r in conn.exec_driver_sql(f"SELECT * FROM {n} ORDER BY 1")]
            for n in names
        }
    engine.dispose()
    return rows


# =================================================================================================
# Fixtures: a fresh database of each kind, empty or as release 1 left it
# =================================================================================================


@pytest.fixture(params=["sqlite", "postgresql"])
def kind(request: pytest.FixtureRequest) -> str:
    """The kind of database the migrations run on."""
    return request.param


@pytest.fixture
def seed() -> str:
    """What the database holds before the test: "empty", or "release-1" (parametrize it)."""
    return "empty"


@contextmanager
def fresh_database(kind: str, directory: Path, seed: str = "empty") -> Iterator[str]:
    """A database of its own (on PostgreSQL, created on the test server and dropped after)."""
    if kind == "postgresql":
        with new_postgres_database("mailslot_migrate") as url:
            yield seeded(url.replace("postgresql://", "postgresql+psycopg://", 1), seed)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        yield seeded(f"sqlite:///{directory / 'data.db'}", seed)


def seeded(url: str, seed: str) -> str:
    """The database at ``url``, after building release 1's in it when ``seed`` asks."""
    if seed == "release-1":
        build_release_1_database(url)
    return url


@pytest.fixture
def database_url(kind: str, seed: str, tmp_path: Path) -> Iterator[str]:
    """This test's own database, as ``seed`` says."""
    with fresh_database(kind, tmp_path / "data", seed) as url:
        yield url


@pytest.fixture
def overrides(overrides: dict[str, Any], database_url: str) -> dict[str, Any]:
    """The app (and so ``runner`` and ``client``) uses this test's database."""
    return {**overrides, "database_url": database_url}


def revisions(url: str) -> list[str]:
    """The revisions in alembic_version."""
    return [row[0] for row in dump(url).get("alembic_version", [])]


def with_new_stamp(
    rows: dict[str, list[tuple[Any, ...]]], after: dict[str, list[tuple[Any, ...]]]
) -> dict[str, list[tuple[Any, ...]]]:
    """Release 1's ``rows`` as the upgrade must leave them, given what it left (``after``):
    stamped at the head, the old stamp now "2", and every row as it was, but for the columns
    later migrations added at the end of its table, which are empty (NULL)."""
    kept: dict[str, list[tuple[Any, ...]]] = {}
    for name, old_rows in rows.items():
        added = len(after[name][0]) - len(old_rows[0]) if after.get(name) and old_rows else 0
        kept[name] = [(*row, *([None] * added)) for row in old_rows]
    return {**kept, "mailslot_meta": [("schema_version", "2")], "alembic_version": [(HEAD,)]}


# =================================================================================================
# Release 1's databases come under Alembic, rows intact and usable
# =================================================================================================


@pytest.mark.parametrize("seed", ["release-1"])
def test_release_1_database_is_brought_under_alembic_with_every_row_intact(
    runner: FlaskCliRunner, database_url: str
) -> None:
    before = dump(database_url)
    assert "alembic_version" not in before  # create_app left it alone: upgrading is the command's

    result = runner.invoke(args=["upgrade-db"])

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ADOPTION
    after = dump(database_url)
    assert after == with_new_stamp(before, after)


@pytest.mark.parametrize("seed", ["release-1"])
def test_release_1_rows_work_in_the_app_after_the_upgrade(
    runner: FlaskCliRunner, client: FlaskClient, auth: AuthActions, app: Flask
) -> None:
    assert runner.invoke(args=["upgrade-db"]).exit_code == 0

    assert auth.login().status_code == 302
    assert "Contact" in client.get("/forms").get_data(as_text=True)
    inbox = client.get(f"/forms/{FORM_PID}").get_data(as_text=True)
    assert "Ada Lovelace" in inbox
    assert "Grace Hopper" in inbox

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    page = client.get(f"/api/v1/forms/{FORM_PID}/submissions", headers=bearer)
    assert page.status_code == 200
    assert [s["id"] for s in page.json["data"]] == ["sub-spam", "sub-grace", "sub-ada"]
    revoked = {"Authorization": f"Bearer {REVOKED_TOKEN}"}
    assert client.get("/api/v1/me", headers=revoked).status_code == 401

    detail = f"/forms/{FORM_PID}/submissions/sub-grace"
    replay = post_form(client, f"{detail}/deliveries/3/replay", {}, page=detail)
    assert replay.status_code == 302
    sent = [m for m in read_outbox(app) if m["To"] == "owner@example.com"]
    assert len(sent) == 1
    assert "Grace Hopper" in sent[0].get_body(preferencelist=("plain",)).get_content()


# =================================================================================================
# 0002: a delivery belongs to a submission or to an account (account emails in the outbox)
# =================================================================================================


def _account_rows(url: str) -> list[tuple[Any, ...]]:
    """The outbox rows that belong to an account: (user_id, template, status, target)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT user_id, template, status, target FROM deliveries "
            "WHERE submission_id IS NULL ORDER BY id"
        ).all()
    engine.dispose()
    return [tuple(row) for row in rows]


@pytest.mark.parametrize("seed", ["release-1"])
def test_an_upgraded_release_1_database_keeps_account_emails_in_the_outbox(
    runner: FlaskCliRunner, auth: AuthActions, app: Flask, database_url: str
) -> None:
    assert runner.invoke(args=["upgrade-db"]).exit_code == 0

    auth.signup("newcomer@example.com")
    auth.signup("owner@example.com")  # release 1's account: its owner is told instead

    sent = {message["To"]: message["Subject"] for message in read_outbox(app)}
    assert _account_rows(database_url) == [
        (3, "confirm_email", "done", "newcomer@example.com"),
        (1, "account_exists", "done", "owner@example.com"),
    ]
    assert sent["newcomer@example.com"] == "Confirm your Mailslot address"
    assert "owner@example.com" in sent


@pytest.mark.parametrize("seed", ["release-1"])
def test_downgrading_0002_drops_account_emails_and_keeps_every_notification(
    runner: FlaskCliRunner, auth: AuthActions, database_url: str
) -> None:
    release_1 = dump(database_url)
    assert runner.invoke(args=["upgrade-db"]).exit_code == 0
    auth.signup("newcomer@example.com")
    assert _account_rows(database_url)

    with dal.migration_connection(database_url) as conn:
        command.downgrade(migrate.alembic_config(conn), "0001")

    after = dump(database_url)
    assert after["deliveries"] == release_1["deliveries"]
    assert after["alembic_version"] == [("0001",)]
    assert migrate.upgrade_db(database_url) == [f"Upgraded {' → '.join(['0001', *LATER])} (head)."]


@pytest.mark.parametrize("seed", ["release-1"])
def test_upgrade_db_in_its_own_process_brings_release_1_under_alembic(
    database_url: str, tmp_path: Path
) -> None:
    before = dump(database_url)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "flask"), "--app", "microapp", "upgrade-db"],
        cwd=PROJECT,
        env=_child_env(database_url, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ADOPTION
    after = dump(database_url)
    assert after == with_new_stamp(before, after)


@pytest.mark.parametrize("seed", ["release-1"])
def test_upgrading_twice_changes_nothing_the_second_time(
    runner: FlaskCliRunner, database_url: str
) -> None:
    first = runner.invoke(args=["upgrade-db"])
    after_first = dump(database_url)
    second = runner.invoke(args=["init-db"])  # the release-1 name does the same

    assert first.output.splitlines() == ADOPTION
    assert second.exit_code == 0
    assert second.output.splitlines() == [NOTHING_TO_DO]
    assert dump(database_url) == after_first


def test_a_fresh_database_is_created_by_the_migrations(
    runner: FlaskCliRunner, database_url: str
) -> None:
    # On SQLite create_app created it on first start (through the migrations); on PostgreSQL the
    # command does. Either way the command says what happened, once.
    first = runner.invoke(args=["upgrade-db"])
    second = runner.invoke(args=["upgrade-db"])

    assert first.output.splitlines() == [CREATED]
    assert second.output.splitlines() == [NOTHING_TO_DO]
    assert revisions(database_url) == [HEAD]
    assert dump(database_url)["mailslot_meta"] == [("schema_version", "2")]


# =================================================================================================
# The migrations and dal.py agree; 0001 is release 1's schema
# =================================================================================================


def test_migrated_database_matches_the_tables_in_dal(database_url: str) -> None:
    migrate.upgrade_db(database_url)
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), dal.metadata)
    engine.dispose()
    assert differences == []


def test_the_comparison_notices_a_table_that_differs_from_the_migrations(
    database_url: str,
) -> None:
    migrate.upgrade_db(database_url)
    changed = sa.MetaData()
    for table in dal.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["deliveries"].append_column(sa.Column("priority", sa.Integer))
    changed.tables["submissions"].c.user_agent.type = sa.String(1024)
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), changed)
    engine.dispose()
    assert {diff[0] if isinstance(diff, tuple) else diff[0][0] for diff in differences} == {
        "add_column",
        "modify_type",
    }


def schema_of(url: str) -> list[tuple[Any, ...]]:
    """Everything DDL made, as the database itself reports it (Alembic's table left out)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql(
                "SELECT type, name, tbl_name, sql FROM sqlite_master "
                "WHERE tbl_name != 'alembic_version' ORDER BY name"
            )
            found = [(*row[:3], " ".join((row[3] or "").split())) for row in rows]
        else:
            queries = (
                "SELECT table_name, column_name, ordinal_position, data_type, "
                "character_maximum_length, is_nullable, column_default "
                "FROM information_schema.columns WHERE table_schema = 'public' "
                "AND table_name != 'alembic_version' ORDER BY 1, 3",
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                "FROM pg_constraint WHERE connamespace = 'public'::regnamespace "
                "AND conrelid::regclass::text != 'alembic_version' ORDER BY 1, 2",
                "SELECT tablename, indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = 'public' AND tablename != 'alembic_version' ORDER BY 1, 2",
                "SELECT sequencename, data_type FROM pg_sequences ORDER BY 1",
            )
            found = [tuple(row) for query in queries for row in conn.exec_driver_sql(query)]
    engine.dispose()
    return found


def test_first_migration_builds_what_release_1_built(kind: str, tmp_path: Path) -> None:
    with (
        fresh_database(kind, tmp_path / "old", "release-1") as release_1,
        fresh_database(kind, tmp_path / "new") as migrated,
    ):
        with dal.migration_connection(migrated) as conn:
            command.upgrade(migrate.alembic_config(conn), "0001")
        built = schema_of(migrated)
        assert built == schema_of(release_1)
        assert len(built) > 10  # the queries saw the tables


def test_downgrading_the_first_migration_leaves_an_empty_database(database_url: str) -> None:
    migrate.upgrade_db(database_url)
    with dal.migration_connection(database_url) as conn:
        command.downgrade(migrate.alembic_config(conn), "base")

    assert dump(database_url) == {"alembic_version": []}
    assert migrate.upgrade_db(database_url) == [CREATED]  # and it can start again from there


def test_migrations_are_numbered_in_one_line_so_their_names_tell_the_head() -> None:
    scripts = list(reversed(list(migrate._script_directory().walk_revisions())))
    assert [s.revision for s in scripts] == [f"{n:04d}" for n in range(1, len(scripts) + 1)]
    assert [s.down_revision for s in scripts] == [None, *(s.revision for s in scripts[:-1])]
    for script in scripts:
        assert Path(script.path).name.startswith(f"{script.revision}_")
    assert migrate._script_directory().get_heads() == [migrate.SCHEMA_REVISION]


# =================================================================================================
# Refusals: newer than the code, or not recognised
# =================================================================================================


def test_database_newer_than_the_code_is_refused_and_left_alone(
    runner: FlaskCliRunner, client: FlaskClient, database_url: str
) -> None:
    migrate.upgrade_db(database_url)
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0042'")
    engine.dispose()
    before = dump(database_url)

    result = runner.invoke(args=["upgrade-db"])

    assert result.exit_code == 1
    assert "The database is at revision 0042, which is newer than this Mailslot" in result.output
    assert "Run that release or a newer one" in result.output
    assert dump(database_url) == before
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert (
        ready.json["database"]
        == f"at revision 0042, newer than this code ({HEAD}): run the matching release"
    )


@pytest.mark.parametrize("seed", ["release-1"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("UPDATE mailslot_meta SET value = '99'", "is stamped with Mailslot schema version 99"),
        ("DELETE FROM mailslot_meta", "has no version stamp"),
        ("DROP TABLE api_tokens", "and lacks api_tokens"),
    ],
)
def test_database_that_is_not_release_1_nor_alembic_is_refused(
    runner: FlaskCliRunner, client: FlaskClient, database_url: str, change: str, message: str
) -> None:
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(change)
    engine.dispose()
    before = dump(database_url)

    result = runner.invoke(args=["upgrade-db"])

    assert result.exit_code == 1
    assert message in result.output
    assert "Restore a backup, or use an empty database." in result.output
    assert dump(database_url) == before
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json["database"] == (
        "not a database this code recognises: see flask --app microapp upgrade-db"
    )


# =================================================================================================
# /readyz and the first start
# =================================================================================================


@pytest.mark.parametrize("seed", ["release-1"])
def test_readyz_says_a_release_1_database_needs_the_upgrade(
    runner: FlaskCliRunner, client: FlaskClient
) -> None:
    before = client.get("/readyz")
    runner.invoke(args=["upgrade-db"])
    after = client.get("/readyz")

    assert before.status_code == 503
    assert before.json["database"] == "made by release 1: run flask --app microapp upgrade-db"
    assert after.status_code == 200
    assert after.json["database"] == "ok"


def test_readyz_says_an_empty_database_is_not_initialised(
    runner: FlaskCliRunner, client: FlaskClient, database_url: str
) -> None:
    runner.invoke(args=["upgrade-db"])
    with dal.migration_connection(database_url) as conn:
        command.downgrade(migrate.alembic_config(conn), "base")

    ready = client.get("/readyz")

    assert ready.status_code == 503
    assert ready.json["database"] == "not initialised: run flask --app microapp upgrade-db"


# =================================================================================================
# Two processes upgrading at once
# =================================================================================================

# Runs `flask --app microapp upgrade-db` in a child process that holds the upgrade lock for a
# while once it has it, and writes down what it found there: the other child must wait for it.
_RACER = """
import sys, time
from contextlib import contextmanager
from pathlib import Path
import dal
import migrate
import microapp  # imported before the barrier, so that both children reach the lock together

barrier, log = Path(sys.argv[1]), Path(sys.argv[2])
locked = dal.migration_connection

@contextmanager
def migration_connection_held(url):
    with locked(url) as conn:
        with log.open("a") as out:
            print(migrate.schema_state(conn).kind, file=out)
        time.sleep(0.5)  # hold the lock: the other process asks for it meanwhile
        yield conn

dal.migration_connection = migration_connection_held
while not barrier.exists():
    time.sleep(0.01)
from flask.cli import main
sys.argv = ["flask", "--app", "microapp", "upgrade-db"]
main()
"""


def _child_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a child process running the CLI on this database."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    return {**env, "DATABASE_URL": database_url, "INSTANCE_PATH": str(tmp_path / "instance")}


@pytest.mark.parametrize("seed", ["empty", "release-1"])
def test_two_processes_upgrading_at_once_migrate_once(
    database_url: str, seed: str, tmp_path: Path
) -> None:
    before = dump(database_url)
    barrier, log = tmp_path / "go", tmp_path / "found.log"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(barrier), str(log)],
            cwd=PROJECT,
            env=_child_env(database_url, tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    barrier.touch()
    outputs = [child.communicate(timeout=120) for child in children]

    assert [child.returncode for child in children] == [0, 0], outputs
    said = sorted(out.strip() for out, _ in outputs)
    first = CREATED if seed == "empty" else "\n".join(ADOPTION)
    assert said == sorted([first, NOTHING_TO_DO])
    # Each found the database as the other left it: the second only after the first committed.
    assert log.read_text().splitlines() in (
        [seed, "current"],  # SQLite's create_app and the command both ask for the lock
        [seed, "current", "current"],
        [seed, "current", "current", "current"],
    )
    assert revisions(database_url) == [HEAD]
    if seed == "release-1":
        after = dump(database_url)
        assert after == with_new_stamp(before, after)


# =================================================================================================
# The next migration: batch mode on SQLite keeps every row, children of altered tables included
# =================================================================================================

_NEXT_MIGRATION = '''"""A test-only step after 0001 that makes SQLite copy parent tables."""

import sqlalchemy as sa
from alembic import op

revision = "{next}"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Change a type in users (parent of forms and tokens) and submissions (parent of
    deliveries): SQLite copies both tables, PostgreSQL alters them in place."""
    with op.batch_alter_table("users") as batch:
        batch.alter_column("password_hash", type_=sa.String(300), existing_nullable=False)
        batch.add_column(sa.Column("nickname", sa.String(100)))
    with op.batch_alter_table("submissions") as batch:
        batch.alter_column("user_agent", type_=sa.String(1024), existing_nullable=True)


def downgrade() -> None:
    """Back to 0001."""
    with op.batch_alter_table("submissions") as batch:
        batch.alter_column("user_agent", type_=sa.String(512), existing_nullable=True)
    with op.batch_alter_table("users") as batch:
        batch.drop_column("nickname")
        batch.alter_column("password_hash", type_=sa.String(255), existing_nullable=False)
'''


@pytest.fixture
def ship_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Call it to make this code one that ships a migration after the head (NEXT), in a copy of
    migrations/."""

    def ship(script: str = _NEXT_MIGRATION) -> None:
        scripts = tmp_path / "migrations"
        shutil.copytree(
            migrate.MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__")
        )
        text = script.replace('"{next}"', f'"{NEXT}"').replace('"{head}"', f'"{HEAD}"')
        (scripts / "versions" / f"{NEXT}_next.py").write_text(text)
        monkeypatch.setattr(migrate, "MIGRATIONS_DIR", scripts)
        monkeypatch.setattr(migrate, "SCHEMA_REVISION", NEXT)
        migrate._script_directory.cache_clear()

    yield ship
    migrate._script_directory.cache_clear()


@pytest.mark.parametrize("seed", ["release-1"])
def test_release_1_database_upgraded_past_the_head_keeps_every_row(
    ship_next: Callable[..., None], runner: FlaskCliRunner, database_url: str
) -> None:
    ship_next()
    before = dump(database_url)

    result = runner.invoke(args=["upgrade-db"])

    assert result.exit_code == 0, result.output
    past_head = UPGRADED.replace(" (head)", f" → {NEXT} (head)")
    assert result.output.splitlines() == [ADOPTED, past_head]
    after = dump(database_url)
    # users and submissions were copied by batch mode on SQLite; their children kept every row
    assert after == {**with_new_stamp(before, after), "alembic_version": [(NEXT,)]}


def test_database_behind_the_code_is_not_ready_until_upgraded(
    ship_next: Callable[..., None], runner: FlaskCliRunner, client: FlaskClient
) -> None:
    runner.invoke(args=["upgrade-db"])  # at 0001, the head of this code
    ship_next()

    behind = client.get("/readyz")
    upgraded = runner.invoke(args=["upgrade-db"])
    ready = client.get("/readyz")

    assert behind.status_code == 503
    assert behind.json["database"] == (
        f"at revision {HEAD}, this code needs {NEXT}: run flask --app microapp upgrade-db"
    )
    assert upgraded.output.splitlines() == [f"Upgraded {HEAD} → {NEXT} (head)."]
    assert ready.json["database"] == "ok"


_FAILING_MIGRATION = _NEXT_MIGRATION.replace(
    "def upgrade() -> None:\n",
    "def upgrade() -> None:\n"
    '    op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))\n'
    '    op.execute("SELECT no_such_function()")\n',
)


@pytest.mark.parametrize("seed", ["release-1"])
def test_a_failed_migration_leaves_the_database_as_it_was(
    ship_next: Callable[..., None], runner: FlaskCliRunner, database_url: str
) -> None:
    runner.invoke(args=["upgrade-db"])
    before = dump(database_url)
    ship_next(_FAILING_MIGRATION)

    result = runner.invoke(args=["upgrade-db"])

    assert result.exit_code != 0
    assert dump(database_url) == before  # no half_done table: DDL rolled back on SQLite too


@pytest.mark.parametrize(("kind", "seed"), [("sqlite", "release-1")])
def test_a_migration_that_orphans_rows_is_rolled_back_with_a_message(
    ship_next: Callable[..., None], runner: FlaskCliRunner, database_url: str
) -> None:
    # Foreign keys are off while SQLite migrates (for batch mode), so they are checked at the end.
    runner.invoke(args=["upgrade-db"])
    before = dump(database_url)
    ship_next(
        _NEXT_MIGRATION.replace(
            "def upgrade() -> None:\n",
            'def upgrade() -> None:\n    op.execute("DELETE FROM users")\n',
        )
    )

    result = runner.invoke(args=["upgrade-db"])

    assert result.exit_code == 1
    assert "would leave rows in api_tokens, forms whose foreign keys point nowhere" in result.output
    assert dump(database_url) == before


@pytest.mark.parametrize("kind", ["sqlite"])
def test_upgrade_db_says_when_the_database_is_unreachable(overrides: dict[str, Any]) -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    app = microapp.create_app(**{**overrides, "database_url": unreachable})

    result = app.test_cli_runner().invoke(args=["upgrade-db"])

    assert result.exit_code == 1
    assert result.output.startswith("Error: The database is unreachable or locked: ")
    assert "Connection refused" in result.output

"""The data layer on SQLite and, when configured, PostgreSQL: schema set-up, users, pragmas."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

import dal
import records
import settings


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both databases."""
    return request.param


def test_emails_are_unique(app: Flask) -> None:
    with app.app_context():
        with dal.transaction() as conn:
            dal.insert_user(conn, "a@example.com", "hash")
        with pytest.raises(dal.Duplicate), dal.transaction() as conn:
            dal.insert_user(conn, "a@example.com", "hash")


def test_user_round_trip_keeps_aware_utc_times(app: Flask) -> None:
    with app.app_context():
        with dal.transaction() as conn:
            user = dal.insert_user(conn, "t@example.com", "hash")
            assert dal.mark_email_confirmed(conn, user.id, "t@example.com")
            assert not dal.mark_email_confirmed(conn, user.id, "t@example.com")
        with dal.connection() as conn:
            stored = dal.user_by_id(conn, user.id)
    assert stored is not None
    assert stored.created_at.tzinfo == dt.UTC
    assert stored.email_confirmed_at is not None
    assert abs(stored.created_at - dal.utcnow()) < dt.timedelta(minutes=1)


def test_bumping_the_session_version_counts_up(app: Flask) -> None:
    with app.app_context(), dal.transaction() as conn:
        user = dal.insert_user(conn, "s@example.com", "hash")
        dal.bump_session_version(conn, user.id)
        dal.bump_session_version(conn, user.id)
        assert dal.user_by_id(conn, user.id).session_version == user.session_version + 2


def test_naive_datetimes_are_refused(app: Flask) -> None:
    with (
        app.app_context(),
        pytest.raises(dal.DatabaseError, match="naive datetime"),
        dal.transaction() as conn,
    ):
        conn.execute(
            sa.insert(dal.users).values(
                email="n@example.com",
                password_hash="x",
                created_at=dt.datetime(2026, 1, 1),  # noqa: DTZ001
            )
        )


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_connections_get_durable_pragmas(app: Flask) -> None:
    with app.app_context(), dal.connection() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_describe_url_hides_passwords() -> None:
    assert settings.describe_url("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert settings.describe_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_writers_in_one_process_take_turns_on_a_lock(app: Flask) -> None:
    # SQLite's busy handler makes waiting writers sleep up to 100 ms per try; the process's
    # own writers queue on a lock instead, so none of them loses every race.
    import threading

    with app.app_context():
        lock = dal.database().write_lock
        assert lock is not None
        outside: list[bool] = []
        with dal.transaction():
            probe = threading.Thread(target=lambda: outside.append(lock.acquire(blocking=False)))
            probe.start()
            probe.join()
        assert outside == [False]  # another thread may not write while this one does
        assert lock.acquire(blocking=False)  # and may once it committed
        lock.release()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_postgresql_writers_are_not_serialized_in_the_process(app: Flask) -> None:
    with app.app_context():
        assert dal.database().write_lock is None


def test_insert_deliveries_returns_ids_in_the_order_given(app: Flask) -> None:
    with app.app_context(), dal.transaction() as conn:
        owner = dal.insert_user(conn, "o@example.com", "hash")
        form = dal.insert_form(conn, owner.id, "f-order", {"name": "F"})
        sub = dal.insert_submission(
            conn,
            {"public_id": "s-order", "form_id": form.id, "data": {"a": "b"}, "schema_version": 1},
        )
        targets = [("webhook", "https://a.example/"), ("email", "o@example.com")]
        ids = dal.insert_deliveries(conn, sub.id, targets, "held")
        assert dal.insert_deliveries(conn, sub.id, []) == []
        rows = conn.execute(sa.select(dal.deliveries).order_by(dal.deliveries.c.id)).all()
    assert [(r.id, r.kind, r.target, r.status) for r in rows] == [
        (ids[0], "webhook", "https://a.example/", "held"),
        (ids[1], "email", "o@example.com", "held"),
    ]
    assert sub.public_id == "s-order"
    assert sub.data == {"a": "b"}
    assert sub.created_at.tzinfo is not None  # RETURNING gives the row as a SELECT would


# --- records: rows leave dal as small typed records -------------------------------------------


@pytest.mark.parametrize(
    ("record", "table"),
    [
        (records.User, dal.users),
        (records.Submission, dal.submissions),
        (records.Delivery, dal.deliveries),
        (records.ApiToken, dal.api_tokens),
    ],
)
def test_records_that_mirror_a_table_list_its_columns_in_its_order(
    record: type, table: sa.Table
) -> None:
    # A row of select(table) builds its record by position: a column added to the table and not
    # to the record, or in another place, would shift every value after it.
    assert [field.name for field in dataclasses.fields(record)] == list(table.c.keys())


def test_a_form_record_carries_every_column_of_the_table_and_its_public_view_no_secret() -> None:
    # dal selects a form's columns in the record's order: none may be missing or extra.
    assert sorted(field.name for field in dataclasses.fields(records.Form)) == sorted(
        dal.forms.c.keys()
    )
    public = {field.name for field in dataclasses.fields(records.PublicForm)}
    assert public < set(dal.forms.c.keys())
    assert "webhook_secret" not in public


def test_rows_leave_dal_as_frozen_records_not_sqlalchemy_rows(app: Flask) -> None:
    with app.app_context():
        with dal.transaction() as conn:
            user = dal.insert_user(conn, "r@example.com", "hash")
            form = dal.insert_form(conn, user.id, dal.new_public_id(), {"name": "Records"})
        with dal.connection() as conn:
            found = [
                dal.user_by_id(conn, user.id),
                dal.form_by_public_id(conn, form.public_id),
                dal.public_view_of_form(conn, form.public_id),
                *dal.forms_with_counts(conn, user.id),
            ]
    assert [type(item) for item in found] == [
        records.User,
        records.Form,
        records.PublicForm,
        records.FormWithCounts,
    ]
    assert found[0] == user
    assert found[1] == form
    assert (found[3].name, found[3].submission_count, found[3].newest_at) == ("Records", 0, None)
    for item in found:
        assert not isinstance(item, sa.Row)
        with pytest.raises(dataclasses.FrozenInstanceError):
            item.id = 0  # type: ignore[misc]


# --- errors: SQLAlchemy's become dal's own ------------------------------------------------------


def test_a_broken_rule_that_is_not_uniqueness_is_an_integrity_violation(app: Flask) -> None:
    with (
        app.app_context(),
        pytest.raises(dal.IntegrityViolation) as caught,
        dal.transaction() as conn,
    ):
        conn.execute(sa.insert(dal.deliveries).values(kind="email", target="x", status="x"))
    assert not isinstance(caught.value, dal.Duplicate)
    assert isinstance(caught.value.__cause__, sa.exc.IntegrityError)  # kept for the logs


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_database_that_cannot_be_opened_is_unavailable(app: Flask, tmp_path: Path) -> None:
    with app.app_context():
        dal.database().engine = dal.make_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
        with pytest.raises(dal.DatabaseUnavailable), dal.connection() as conn:
            dal.user_by_id(conn, 1)
        with pytest.raises(dal.DatabaseUnavailable), dal.transaction() as conn:
            dal.insert_user(conn, "u@example.com", "hash")

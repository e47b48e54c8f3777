"""Retention, erasure of one person's data, and a start-up that opens no connection."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

import dal
import records
import services
import tasks
from conftest import AuthActions, post_form

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Retention and erasure run SQL: both databases."""
    return request.param


def make_owner(app: Flask, email: str = "owner@example.com") -> int:
    """An owner's id."""
    with app.app_context(), dal.transaction() as conn:
        return dal.insert_user(conn, email, "x").id


def add(
    app: Flask, form: records.Form, data: dict[str, Any], age_days: float = 0, **meta: Any
) -> int:
    """Store a submission ``age_days`` old with a pending delivery; its id."""
    with app.app_context(), dal.transaction() as conn:
        row = dal.insert_submission(
            conn,
            {
                "public_id": dal.new_public_id(),
                "form_id": form.id,
                "data": data,
                "schema_version": 1,
                "meta": meta,
            },
        )
        conn.execute(
            sa.update(dal.submissions)
            .where(dal.submissions.c.id == row.id)
            .values(created_at=dal.utcnow() - dt.timedelta(days=age_days))
        )
        dal.insert_deliveries(conn, row.id, [("email", "o@example.com")])
        return row.id


def remaining(app: Flask) -> list[int]:
    """Ids of the stored submissions."""
    with app.app_context(), dal.connection() as conn:
        return sorted(conn.execute(sa.select(dal.submissions.c.id)).scalars())


def form_for(app: Flask, owner_id: int, retention_days: int | None) -> records.Form:
    """A form with a retention period."""
    with app.app_context():
        return services.create_form(
            owner_id, {"name": "Keep", "notify": False, "retention_days": retention_days}
        )


# --- retention ------------------------------------------------------------------------------


def test_purge_deletes_only_what_is_past_each_forms_retention(app: Flask) -> None:
    owner = make_owner(app)
    short, forever = form_for(app, owner, 7), form_for(app, owner, None)
    old = add(app, short, {"n": 1}, age_days=8)
    edge = add(app, short, {"n": 2}, age_days=6.99)
    fresh = add(app, short, {"n": 3}, age_days=0)
    ancient = add(app, forever, {"n": 4}, age_days=3000)
    with app.app_context():
        assert tasks.purge_expired() == 1
    assert remaining(app) == sorted([edge, fresh, ancient])
    assert old not in remaining(app)
    with app.app_context(), dal.connection() as conn:
        orphans = conn.execute(
            sa.select(sa.func.count())
            .select_from(dal.deliveries)
            .where(dal.deliveries.c.submission_id == old)
        ).scalar()
    assert orphans == 0


def test_purge_is_idempotent(app: Flask, runner: Any) -> None:
    owner = make_owner(app)
    form = form_for(app, owner, 1)
    for n in range(3):
        add(app, form, {"n": n}, age_days=2)
    first = runner.invoke(args=["purge"])
    second = runner.invoke(args=["purge"])
    assert "Purged 3 expired submissions." in first.output
    assert "Purged 0 expired submissions." in second.output
    assert remaining(app) == []


def test_purge_works_through_large_backlogs_in_batches(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks, "PURGE_BATCH", 4)
    owner = make_owner(app)
    form = form_for(app, owner, 1)
    for n in range(10):
        add(app, form, {"n": n}, age_days=5)
    with app.app_context():
        assert tasks.purge_expired() == 10


def test_purge_task_called_directly(app: Flask) -> None:
    import tasks

    owner = make_owner(app)
    add(app, form_for(app, owner, 30), {"n": 1}, age_days=31)
    with app.app_context():
        assert tasks.purge_retention() == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "Use a number of days from 1 to 3650."),
        ("4000", "Use a number of days from 1 to 3650."),
    ],
)
def test_retention_setting_is_validated(
    client: FlaskClient, auth: AuthActions, value: str, message: str
) -> None:
    auth.signup()
    response = post_form(
        client,
        "/forms/new",
        {"name": "R", "status": "active", "honeypot_field": "_gotcha", "retention_days": value},
    )
    assert response.status_code == 422
    assert message in response.get_data(as_text=True)


def test_retention_setting_is_saved(client: FlaskClient, auth: AuthActions, app: Flask) -> None:
    auth.signup()
    response = post_form(
        client,
        "/forms/new",
        {"name": "R", "status": "active", "honeypot_field": "_gotcha", "retention_days": "30"},
    )
    public_id = response.headers["Location"].rsplit("/", 1)[1]
    with app.app_context(), dal.connection() as conn:
        assert dal.form_by_public_id(conn, public_id).retention_days == 30
    page = client.get(f"/forms/{public_id}/settings").get_data(as_text=True)
    assert 'value="30"' in page


# --- erasure --------------------------------------------------------------------------------


def test_erasure_finds_the_address_across_forms_and_only_the_owners(app: Flask) -> None:
    owner, other = make_owner(app), make_owner(app, "other@example.com")
    a, b = form_for(app, owner, None), form_for(app, owner, None)
    theirs = form_for(app, other, None)
    hits = [
        add(app, a, {"email": "Ada@Example.org"}),
        add(app, b, {"message": "write to ada@example.org please"}),
        add(app, b, {"n": 1}, reply_to="ada@example.org"),
    ]
    misses = [
        add(app, a, {"email": "bada@example.org"}),
        add(app, a, {"email": "ada@example.org.evil"}),
        add(app, a, {"email": "someone@example.org"}),
    ]
    not_mine = add(app, theirs, {"email": "ada@example.org"})
    with app.app_context():
        assert sorted(services.submissions_about(owner, " ADA@example.org ")) == sorted(hits)
        assert services.erase_person(owner, "ada@example.org") == 3
    assert remaining(app) == sorted([*misses, not_mine])


def test_erasure_page_shows_the_count_first_then_deletes(
    client: FlaskClient, auth: AuthActions, app: Flask
) -> None:
    auth.signup()
    with app.app_context(), dal.connection() as conn:
        owner = dal.user_by_email(conn, "owner@example.com").id
    form = form_for(app, owner, None)
    add(app, form, {"email": "ada@example.org"})
    add(app, form, {"email": "ada@example.org", "n": 2})
    assert client.get("/account/erase").status_code == 200
    counted = post_form(client, "/account/erase", {"email": "ada@example.org", "action": "count"})
    assert "2 submission(s) mention ada@example.org" in counted.get_data(as_text=True)
    assert len(remaining(app)) == 2
    deleted = post_form(client, "/account/erase", {"email": "ada@example.org", "action": "delete"})
    assert deleted.status_code == 302
    assert remaining(app) == []
    assert "Deleted 2 submission(s)" in client.get("/account/erase").get_data(as_text=True)


def test_erasure_page_refuses_a_bad_address(client: FlaskClient, auth: AuthActions) -> None:
    auth.signup()
    response = post_form(client, "/account/erase", {"email": "not-an-address", "action": "count"})
    assert response.status_code == 422
    assert "Enter a valid email address, like you@example.com." in response.get_data(as_text=True)


# --- serverless start-up ------------------------------------------------------------------------

NO_NETWORK = """
import socket, sys
attempts = []
real_connect = socket.socket.connect
def refuse(self, address):
    attempts.append(address)
    raise OSError("network used at start-up")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
import microapp
app = microapp.create_app(
    instance_path=sys.argv[1],
    redis_url="redis://127.0.0.1:6399/0",
    database_url="postgresql://mailslot@127.0.0.1:5999/mailslot",
    mail_backend="smtp",
)
import tasks
assert app.extensions["celery"] is not None
print("connections", len(attempts), attempts)
"""


def test_import_and_create_app_open_no_network_connection(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_NETWORK, str(tmp_path)],
        cwd=PROJECT,
        env={**os.environ, "LOG_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "connections 0 []" in result.stdout

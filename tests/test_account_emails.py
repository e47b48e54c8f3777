"""Account emails go through the outbox: claimed, retried, swept, listed, replayed, deleted.

Sign-up and "send the link again" only insert a ``deliveries`` row (user_id + template, no
submission) and hand its id to the common dispatch path; the ``deliver`` task builds the email,
and its links, when it sends it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

import dal
import microapp
import records
import services
import tasks
import users
from conftest import (
    PASSWORD,
    AuthActions,
    SMTPSink,
    confirmation_link,
    free_port,
    message_text,
    post_form,
    read_outbox,
    settle_deliveries,
)


def rows(app: Flask) -> list[sa.Row[Any]]:
    """Every delivery row, oldest first (after the deliveries handed off so far settled)."""
    settle_deliveries(app)
    with app.app_context(), dal.connection() as conn:
        return list(conn.execute(sa.select(dal.deliveries).order_by(dal.deliveries.c.id)))


def run(app: Flask, fn: Any, *args: Any) -> Any:
    """Call a task function directly, inside the app context."""
    with app.app_context():
        return fn(*args)


def sign_up(app: Flask, email: str = "owner@example.com") -> AuthActions:
    """Sign up (and log in) through the real pages."""
    auth = AuthActions(app.test_client(), app)
    assert auth.signup(email).status_code == 302
    return auth


@pytest.fixture
def broker_down(overrides: dict[str, Any]) -> dict[str, Any]:
    """Settings for connected mode whose broker does not answer (nothing leaves the outbox)."""
    return {**overrides, "redis_url": f"redis://127.0.0.1:{free_port()}/0"}


@pytest.fixture
def smtp_app(broker_down: dict[str, Any], smtp_sink: SMTPSink) -> Flask:
    """Broker down, mail through a real SMTP sink; tests run the deliver task themselves."""
    app = microapp.create_app(
        **broker_down,
        mail_backend="smtp",
        smtp_host="127.0.0.1",
        smtp_port=smtp_sink.port,
        smtp_starttls=False,
        delivery_retry_schedule=[0, 0, 0],
    )
    app.config["TESTING"] = True
    return app


# --- the row ------------------------------------------------------------------------------------


def test_the_confirmation_email_is_an_outbox_row(app: Flask) -> None:
    sign_up(app)
    [row] = rows(app)
    with app.app_context(), dal.connection() as conn:
        user = dal.user_by_email(conn, "owner@example.com")
    assert (row.user_id, row.submission_id, row.kind, row.template, row.target) == (
        user.id,
        None,
        "email",
        "confirm_email",
        "owner@example.com",
    )
    assert (row.status, row.attempts, row.params) == ("done", 1, None)
    [message] = read_outbox(app)
    assert message["Subject"] == "Confirm your Mailslot address"
    token = confirmation_link(message).rsplit("/", 1)[1]
    assert token not in repr(tuple(row))  # the link was made when the email was sent


def test_with_the_broker_down_the_confirmation_waits_for_the_sweeper(
    broker_down: dict[str, Any],
) -> None:
    web = microapp.create_app(**broker_down)
    auth = sign_up(web)
    [row] = rows(web)
    assert (row.status, row.attempts) == ("pending", 0)
    assert read_outbox(web) == []
    # The broker is back: the sweeper (beat, or the embedded thread) finds the row and sends it.
    worker = microapp.create_app(**{**broker_down, "redis_url": ""})
    assert run(worker, tasks.sweep_outbox) == 1
    [message] = read_outbox(worker)
    assert message["To"] == "owner@example.com"
    assert rows(worker)[0].status == "done"
    auth.client.get(confirmation_link(message).removeprefix("http://mailslot.test"))
    with web.app_context(), dal.connection() as conn:
        assert dal.user_by_email(conn, "owner@example.com").email_confirmed_at is not None


def test_resend_queues_a_new_row_and_is_limited(app: Flask) -> None:
    auth = sign_up(app)
    answers = [
        post_form(auth.client, "/account/confirm", {}, page="/account").status_code
        for _ in range(users.CONFIRMATION_RESENDS_PER_HOUR + 1)
    ]
    assert answers == [302] * users.CONFIRMATION_RESENDS_PER_HOUR + [429]
    assert len(rows(app)) == 1 + users.CONFIRMATION_RESENDS_PER_HOUR
    assert len(read_outbox(app)) == 1 + users.CONFIRMATION_RESENDS_PER_HOUR


# --- sending: retries, dead, replay -------------------------------------------------------------


def test_an_account_email_is_retried_on_the_notification_schedule(
    smtp_app: Flask, smtp_sink: SMTPSink
) -> None:
    smtp_sink.refuse_rcpt = "451 4.3.0 try later"
    sign_up(smtp_app)
    [row] = rows(smtp_app)
    before = dal.utcnow()
    assert run(smtp_app, tasks.deliver, row.id) == "retry"
    [row] = rows(smtp_app)
    assert (row.status, row.attempts) == ("pending", 1)
    assert "451" in row.last_error
    assert row.next_attempt_at >= before
    with smtp_app.app_context(), dal.transaction() as conn:
        assert dal.due_deliveries(conn, 10, push_back_seconds=300) == [(row.id, 1)]
    smtp_sink.refuse_rcpt = None
    assert run(smtp_app, tasks.deliver, row.id, 1) == "done"
    [(_, recipients, message)] = smtp_sink.messages
    assert recipients == ["owner@example.com"]
    assert "http://mailslot.test/confirm/" in message_text(message)


def test_a_dead_account_email_is_listed_and_replayed_from_the_account_page(
    smtp_app: Flask, smtp_sink: SMTPSink
) -> None:
    smtp_sink.refuse_rcpt = "550 5.1.1 no such user"
    auth = sign_up(smtp_app)
    [row] = rows(smtp_app)
    assert run(smtp_app, tasks.deliver, row.id) == "dead"
    page = auth.client.get("/account").get_data(as_text=True)
    assert "Address confirmation" in page
    assert "dead" in page
    assert "550" in page
    smtp_sink.refuse_rcpt = None
    response = post_form(auth.client, f"/account/emails/{row.id}/replay", {}, page="/account")
    assert response.status_code == 302
    assert "The email is queued again." in auth.client.get("/account").get_data(as_text=True)
    assert rows(smtp_app)[0].status == "pending"
    assert run(smtp_app, tasks.deliver, row.id) == "done"
    [(_, _, message)] = smtp_sink.messages
    link = confirmation_link(message).removeprefix("http://mailslot.test")
    assert "Your email address is confirmed." in auth.client.get(link, follow_redirects=True).text


def test_nobody_replays_another_owners_account_email(app: Flask) -> None:
    sign_up(app, "a@example.com")
    other = sign_up(app, "b@example.com")
    theirs = rows(app)[0]
    assert theirs.target == "a@example.com"
    page = "/account"
    assert (
        post_form(other.client, f"/account/emails/{theirs.id}/replay", {}, page).status_code == 404
    )
    assert post_form(other.client, "/account/emails/99999/replay", {}, page).status_code == 404


def test_a_confirmation_no_longer_needed_is_not_sent(smtp_app: Flask, smtp_sink: SMTPSink) -> None:
    sign_up(smtp_app)
    [row] = rows(smtp_app)
    with smtp_app.app_context(), dal.transaction() as conn:
        dal.mark_email_confirmed(conn, row.user_id, row.target)
    assert run(smtp_app, tasks.deliver, row.id) == "done"
    assert smtp_sink.messages == []
    assert rows(smtp_app)[0].last_error == "not sent: the address was confirmed before it went out"


def test_an_account_email_for_an_old_address_goes_dead(
    smtp_app: Flask, smtp_sink: SMTPSink
) -> None:
    sign_up(smtp_app)
    [row] = rows(smtp_app)
    with smtp_app.app_context(), dal.transaction() as conn:
        conn.execute(sa.update(dal.users).values(email="changed@example.com"))
    assert run(smtp_app, tasks.deliver, row.id) == "dead"
    assert smtp_sink.messages == []
    assert "address changed" in rows(smtp_app)[0].last_error


def test_an_unknown_account_email_goes_dead(app: Flask) -> None:
    sign_up(app)
    with app.app_context(), dal.transaction() as conn:
        user = dal.user_by_email(conn, "owner@example.com")
        row_id = dal.insert_account_delivery(conn, user.id, "no_such_email", user.email)
    assert run(app, tasks.deliver, row_id) == "dead"
    assert "no account email called 'no_such_email'" in rows(app)[-1].last_error


def test_queueing_an_unknown_account_email_is_refused(app: Flask) -> None:
    sign_up(app)
    with app.app_context(), dal.transaction() as conn:
        user = dal.user_by_email(conn, "owner@example.com")
        with pytest.raises(ValueError, match="no account email"):
            users.queue_account_email(conn, user, "password")


# --- what stays apart from forms, what goes with the user ---------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """These run on both databases: the cascade is the database's."""
    return request.param


def owner_with_a_form(app: Flask) -> tuple[AuthActions, records.Form, str]:
    """A confirmed owner with a notifying form and one submission; (auth, form, submission)."""
    auth = sign_up(app)
    auth.confirm()
    with app.app_context():
        with dal.connection() as conn:
            user = dal.user_by_email(conn, "owner@example.com")
        form = services.create_form(user.id, {"name": "Contact", "notify": True})
    response = app.test_client().post(f"/f/{form.public_id}", json={"message": "hi"})
    assert response.status_code == 201
    return auth, form, response.json["id"]


def test_account_emails_stay_out_of_the_forms_pages_and_api(app: Flask) -> None:
    auth, form, submission_id = owner_with_a_form(app)
    account_rows = [r for r in rows(app) if r.submission_id is None]
    assert len(account_rows) == 1
    with app.app_context(), dal.transaction() as conn:
        conn.execute(sa.update(dal.deliveries).values(status="dead", last_error="x"))
    dead_page = auth.client.get(f"/forms/{form.public_id}/deliveries/dead").text
    assert "owner@example.com" in dead_page  # the notification's row
    assert dead_page.count('/replay"') == 1  # and only that one
    detail = auth.client.get(f"/forms/{form.public_id}/submissions/{submission_id}").text
    assert detail.count('/replay"') == 1
    with app.app_context():
        submission = services.owned_submission(form, submission_id)
        assert [d.submission_id for d in services.submission_deliveries(submission)] == [
            submission.id
        ]


def test_retention_and_erasure_leave_account_emails_alone(app: Flask) -> None:
    _, form, _ = owner_with_a_form(app)
    with app.app_context():
        services.update_form_settings(form, {"retention_days": 1})
        later = dal.utcnow() + dt.timedelta(days=3)
        assert tasks.purge_expired(later) == 1
        assert services.erase_person(form.owner_id, "owner@example.com") == 0
    assert [(r.template, r.submission_id) for r in rows(app)] == [("confirm_email", None)]


def test_deleting_a_user_deletes_their_account_emails(app: Flask) -> None:
    owner_with_a_form(app)
    sign_up(app, "someone.else@example.com")
    assert len(rows(app)) == 3  # two confirmations and one notification
    with app.app_context(), dal.transaction() as conn:
        conn.execute(sa.delete(dal.users).where(dal.users.c.email == "owner@example.com"))
    assert [r.target for r in rows(app)] == ["someone.else@example.com"]


def test_a_delivery_must_belong_to_a_submission_or_a_user(app: Flask) -> None:
    with app.app_context(), pytest.raises(dal.IntegrityViolation), dal.transaction() as conn:
        conn.execute(
            sa.insert(dal.deliveries).values(kind="email", target="x@example.com", status="pending")
        )


def test_the_password_never_reaches_an_account_email(app: Flask) -> None:
    auth = sign_up(app)
    auth.logout()
    sign_up(app)  # the same address again: the "account exists" email
    assert [m["Subject"] for m in read_outbox(app)] == [
        "Confirm your Mailslot address",
        "Someone tried to sign up to Mailslot with your address",
    ]
    assert all(PASSWORD not in m.as_string() for m in read_outbox(app))

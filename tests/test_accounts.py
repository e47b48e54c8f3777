"""Accounts: sign-up, confirmation, login, logout, sessions and the login redirect."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

import dal
import records
import users
from conftest import PASSWORD, AuthActions, csrf_token, message_text, post_form, read_outbox


def user_row(app: Flask, email: str = "owner@example.com") -> records.User:
    """The stored user for ``email``."""
    with app.app_context(), dal.connection() as conn:
        user = dal.user_by_email(conn, email)
    assert user is not None
    return user


# --- sign-up ----------------------------------------------------------------------------------


def test_signup_page_shows_the_form(client: FlaskClient) -> None:
    page = client.get("/signup").get_data(as_text=True)
    assert 'for="email"' in page
    assert 'for="password"' in page
    assert 'for="confirm"' in page
    assert 'name="csrf_token"' in page


def test_signup_creates_the_account_and_mails_a_confirmation(
    client: FlaskClient, app: Flask
) -> None:
    response = post_form(
        client,
        "/signup",
        {"email": "New.Owner@Example.com ", "password": PASSWORD, "confirm": PASSWORD},
    )
    assert response.status_code == 302
    assert response.headers["Location"] == "/login"
    page = client.get("/login").get_data(as_text=True)
    assert "Check your inbox at new.owner@example.com for a message about your account" in page
    assert client.get("/forms").status_code == 302  # not logged in until the person logs in
    user = user_row(app, "new.owner@example.com")
    assert user.email_confirmed_at is None
    assert user.password_hash.startswith("pbkdf2:sha256:1000$")
    [message] = read_outbox(app)
    assert message["To"] == "new.owner@example.com"
    assert message["Subject"] == "Confirm your Mailslot address"
    assert "http://mailslot.test/confirm/" in message_text(message)
    assert PASSWORD not in message.as_string()


def test_the_auth_helper_signs_up_then_logs_in(
    auth: AuthActions, client: FlaskClient, app: Flask
) -> None:
    assert auth.signup().status_code == 302
    assert "Your forms" in client.get("/forms").get_data(as_text=True)
    assert user_row(app).email_confirmed_at is None


@pytest.mark.parametrize(
    ("email", "password", "confirm", "message"),
    [
        ("", PASSWORD, PASSWORD, "Enter your email address."),
        ("not-an-email", PASSWORD, PASSWORD, "Enter a valid email address, like you@example.com."),
        ("a@b", PASSWORD, PASSWORD, "Enter a valid email address, like you@example.com."),
        (
            "x" * 250 + "@example.com",
            PASSWORD,
            PASSWORD,
            "Use an address of at most 254 characters.",
        ),
        ("owner@example.com", "", "", "Choose a password."),
        ("owner@example.com", "short", "short", "Use at least 8 characters."),
        ("owner@example.com", "p" * 129, "p" * 129, "Use at most 128 characters."),
        ("owner@example.com", PASSWORD, "something else", "The two passwords do not match."),
        ("owner@example.com", PASSWORD, "", "Type the password again."),
    ],
)
def test_signup_refuses_invalid_input_with_a_message(
    client: FlaskClient, app: Flask, email: str, password: str, confirm: str, message: str
) -> None:
    response = post_form(
        client, "/signup", {"email": email, "password": password, "confirm": confirm}
    )
    assert response.status_code == 422
    assert message in response.get_data(as_text=True)
    assert read_outbox(app) == []


def session_of(app: Flask, client: FlaskClient) -> dict[str, Any]:
    """The decoded session cookie of a client (empty when it has none)."""
    cookie = client.get_cookie("mailslot_session")
    if cookie is None:
        return {}
    serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
    return dict(serializer.loads(cookie.value))


def signup_answer(app: Flask, email: str, password: str = PASSWORD) -> dict[str, Any]:
    """Everything a person signing up from a fresh browser can observe, the address masked."""
    client = app.test_client()
    response = post_form(
        client, "/signup", {"email": email, "password": password, "confirm": password}
    )
    masked = users.normalise_email(email)
    cookies = sorted(
        re.sub(r"=[^;]*", "=<value>", header, count=1)
        for header in response.headers.getlist("Set-Cookie")
    )
    session = session_of(app, client)
    flashes = [
        (category, text.replace(masked, "<address>"))
        for category, text in session.get("_flashes", [])
    ]
    return {
        "status": response.status_code,
        "location": response.headers.get("Location"),
        "body": response.get_data(as_text=True).replace(masked, "<address>"),
        "cookies": cookies,
        "session_keys": sorted(session),
        "flashes": flashes,
        "logged_in": client.get("/forms").status_code == 200,
    }


def test_signup_with_a_taken_address_answers_exactly_like_a_new_one(
    auth: AuthActions, app: Flask
) -> None:
    auth.signup()
    auth.logout()
    taken = signup_answer(app, "OWNER@example.com")
    fresh = signup_answer(app, "someone.new@example.com")
    assert taken == fresh
    assert taken["location"] == "/login"
    assert taken["logged_in"] is False
    assert "uid" not in taken["session_keys"]


def test_signup_with_a_taken_address_tells_the_owner_by_email_instead(
    auth: AuthActions, app: Flask
) -> None:
    auth.signup()
    auth.logout()
    signup_answer(app, "owner@example.com", "a different password")
    confirmation, notice = read_outbox(app)
    assert confirmation["Subject"] == "Confirm your Mailslot address"
    assert notice["To"] == "owner@example.com"
    assert notice["Subject"] == "Someone tried to sign up to Mailslot with your address"
    text = message_text(notice)
    assert "already has one" in text
    assert "http://mailslot.test/login" in text
    assert "a different password" not in notice.as_string()
    assert PASSWORD not in notice.as_string()
    assert "/confirm/" not in text  # nothing in it lets the sender into the account


def test_signup_with_a_taken_address_changes_nothing_about_the_account(
    auth: AuthActions, app: Flask
) -> None:
    auth.signup()
    auth.logout()
    before = user_row(app)
    signup_answer(app, "owner@example.com", "a different password")
    after = user_row(app)
    assert (after.id, after.password_hash, after.session_version) == (
        before.id,
        before.password_hash,
        before.session_version,
    )
    assert auth.login("owner@example.com", "a different password").status_code == 422
    assert auth.login().status_code == 302


def test_the_owner_is_told_at_most_once_an_hour(
    auth: AuthActions, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth.signup()
    auth.logout()
    for _ in range(3):
        signup_answer(app, "owner@example.com")
    assert [m["Subject"] for m in read_outbox(app)][1:] == [
        "Someone tried to sign up to Mailslot with your address"
    ]
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 2 * 3600 + 5)
    signup_answer(app, "owner@example.com")
    assert len(read_outbox(app)) == 3


def test_both_sign_up_answers_hash_the_password(
    auth: AuthActions, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No timed assertion: the costly step, hashing, must run whether or not the address is free.
    auth.signup()
    auth.logout()
    hashed: list[str] = []
    real_hash = users.hash_password
    monkeypatch.setattr(users, "hash_password", lambda p: hashed.append(p) or real_hash(p))
    signup_answer(app, "owner@example.com", "taken address pw")
    signup_answer(app, "free@example.com", "free address pw")
    assert hashed == ["taken address pw", "free address pw"]


def test_signup_error_keeps_what_was_typed_but_not_the_password(client: FlaskClient) -> None:
    response = post_form(
        client, "/signup", {"email": "kept@example.com", "password": PASSWORD, "confirm": "x"}
    )
    page = response.get_data(as_text=True)
    assert 'value="kept@example.com"' in page
    assert PASSWORD not in page


def test_signup_error_is_tied_to_its_field_for_screen_readers(client: FlaskClient) -> None:
    page = post_form(client, "/signup", {"email": "bad", "password": "", "confirm": ""}).get_data(
        as_text=True
    )
    assert 'aria-describedby="email-error"' in page
    assert 'id="email-error"' in page
    assert 'aria-invalid="true"' in page


# --- CSRF -------------------------------------------------------------------------------------


def test_post_without_csrf_token_is_refused(client: FlaskClient, app: Flask) -> None:
    response = client.post(
        "/signup", data={"email": "a@example.com", "password": PASSWORD, "confirm": PASSWORD}
    )
    assert response.status_code == 400
    assert "did not come from this site" in response.get_data(as_text=True)
    with app.app_context(), dal.connection() as conn:
        assert dal.user_by_email(conn, "a@example.com") is None


def test_post_with_a_forged_csrf_token_is_refused(client: FlaskClient) -> None:
    client.get("/login")
    response = client.post(
        "/login", data={"email": "a@example.com", "password": PASSWORD, "csrf_token": "forged"}
    )
    assert response.status_code == 400


def test_real_csrf_token_round_trip_signup_login_logout(client: FlaskClient, app: Flask) -> None:
    token = csrf_token(client, "/signup")
    response = client.post(
        "/signup",
        data={
            "email": "real@example.com",
            "password": PASSWORD,
            "confirm": PASSWORD,
            "csrf_token": token,
        },
    )
    assert response.status_code == 302
    token = csrf_token(client, "/login")
    response = client.post(
        "/login", data={"email": "real@example.com", "password": PASSWORD, "csrf_token": token}
    )
    assert response.headers["Location"] == "/forms"
    token = csrf_token(client, "/account")
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/forms").status_code == 302
    token = csrf_token(client, "/login")
    response = client.post(
        "/login", data={"email": "real@example.com", "password": PASSWORD, "csrf_token": token}
    )
    assert response.headers["Location"] == "/forms"


def test_logout_without_csrf_token_does_not_log_out(auth: AuthActions, client: FlaskClient) -> None:
    auth.signup()
    assert client.post("/logout").status_code == 400
    assert client.get("/forms").status_code == 200


# --- login ------------------------------------------------------------------------------------


def test_login_page_shows_the_form(client: FlaskClient) -> None:
    page = client.get("/login").get_data(as_text=True)
    assert 'for="email"' in page
    assert 'autocomplete="current-password"' in page


def test_login_with_the_right_password_lands_on_forms(
    auth: AuthActions, client: FlaskClient
) -> None:
    auth.signup()
    auth.logout()
    response = auth.login()
    assert response.status_code == 302
    assert response.headers["Location"] == "/forms"
    assert "owner@example.com" in client.get("/account").get_data(as_text=True)


@pytest.mark.parametrize(
    ("email", "password"),
    [
        ("owner@example.com", "wrong password"),
        ("nobody@example.com", PASSWORD),
        ("OWNER@example.com", "wrong password"),
    ],
)
def test_login_failures_all_get_one_generic_message(
    auth: AuthActions, client: FlaskClient, email: str, password: str
) -> None:
    auth.signup()
    auth.logout()
    response = auth.login(email, password)
    assert response.status_code == 422
    assert "Wrong email or password." in response.get_data(as_text=True)
    assert client.get("/forms").status_code == 302


@pytest.mark.parametrize(
    ("email", "password", "message"),
    [
        ("", PASSWORD, "Enter your email address."),
        ("owner@example.com", "", "Enter your password."),
    ],
)
def test_login_refuses_empty_fields_with_a_message(
    client: FlaskClient, email: str, password: str, message: str
) -> None:
    response = post_form(client, "/login", {"email": email, "password": password})
    assert response.status_code == 422
    assert message in response.get_data(as_text=True)


def test_login_email_is_case_insensitive(auth: AuthActions) -> None:
    auth.signup()
    auth.logout()
    assert auth.login("  Owner@EXAMPLE.com").status_code == 302


def test_login_issues_a_fresh_session(auth: AuthActions, client: FlaskClient) -> None:
    client.get("/login")
    client.set_cookie("mailslot_session", "planted-by-an-attacker")
    auth.signup()
    auth.logout()
    auth.login()
    cookie = client.get_cookie("mailslot_session")
    assert cookie is not None
    assert cookie.value != "planted-by-an-attacker"
    assert cookie.http_only
    assert cookie.same_site == "Lax"


def test_login_rehashes_a_password_stored_with_old_parameters(
    auth: AuthActions, app: Flask
) -> None:
    auth.signup()
    auth.logout()
    app.extensions["mailslot.settings"].password_hash_method = "pbkdf2:sha256:2000"
    auth.login()
    assert user_row(app).password_hash.startswith("pbkdf2:sha256:2000$")
    auth.logout()
    assert auth.login().status_code == 302


def test_default_hash_is_scrypt_and_verifies(tmp_path: object) -> None:
    import microapp

    app = microapp.create_app(instance_path=str(tmp_path))
    assert app.extensions["mailslot.settings"].password_hash_method == "scrypt:32768:8:3"
    client = app.test_client()
    helper = AuthActions(client, app)
    helper.signup()
    assert user_row(app).password_hash.startswith("scrypt:32768:8:3$")
    helper.logout()
    assert helper.login().status_code == 302


# --- logout and sessions ----------------------------------------------------------------------


def test_a_cookie_captured_before_logout_no_longer_works_after_it(
    auth: AuthActions, client: FlaskClient, app: Flask
) -> None:
    auth.signup()
    captured = client.get_cookie("mailslot_session")
    assert captured is not None
    auth.logout()
    thief = app.test_client()
    thief.set_cookie("mailslot_session", captured.value)
    response = thief.get("/forms")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login")


def test_logout_ends_sessions_in_other_browsers(auth: AuthActions, app: Flask) -> None:
    auth.signup()
    other = app.test_client()
    AuthActions(other, app).login()
    assert other.get("/forms").status_code == 200
    auth.logout()
    assert other.get("/forms").status_code == 302


# --- the login redirect -----------------------------------------------------------------------


def test_pages_that_need_login_redirect_with_next(client: FlaskClient) -> None:
    response = client.get("/account")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/account"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("//evil.example", "/forms"),
        ("/\\evil.example", "/forms"),
        ("https://evil.example/", "/forms"),
        ("javascript:alert(1)", "/forms"),
        ("evil.example", "/forms"),
        ("/\t/evil.example", "/forms"),
        ("/%0d%0aSet-Cookie:x", "/%0d%0aSet-Cookie:x"),  # stays a harmless same-site path
    ],
)
def test_login_ignores_next_that_leaves_the_site(
    auth: AuthActions, client: FlaskClient, target: str, expected: str
) -> None:
    auth.signup()
    auth.logout()
    token = csrf_token(client, "/login")
    response = client.post(
        "/login",
        query_string={"next": target},
        data={"email": "owner@example.com", "password": PASSWORD, "csrf_token": token},
    )
    assert response.status_code == 302
    assert response.headers["Location"] == expected


def test_login_follows_a_same_site_next(auth: AuthActions, client: FlaskClient) -> None:
    auth.signup()
    auth.logout()
    token = csrf_token(client, "/login?next=/account")
    response = client.post(
        "/login?next=/account",
        data={"email": "owner@example.com", "password": PASSWORD, "csrf_token": token},
    )
    assert response.headers["Location"] == "/account"


# --- email confirmation -----------------------------------------------------------------------


def test_confirmation_link_from_the_outbox_confirms_the_address(
    auth: AuthActions, app: Flask, client: FlaskClient
) -> None:
    auth.signup()
    response = auth.confirm()
    assert response.status_code == 302
    assert user_row(app).email_confirmed_at is not None
    page = client.get("/account").get_data(as_text=True)
    assert "Your email address is confirmed." in page
    again = auth.confirm()
    assert again.status_code == 302
    assert "already confirmed" in client.get("/account").get_data(as_text=True)


def test_confirmation_works_when_logged_out(
    auth: AuthActions, app: Flask, client: FlaskClient
) -> None:
    auth.signup()
    auth.logout()
    response = auth.confirm()
    assert response.headers["Location"] == "/login"
    assert user_row(app).email_confirmed_at is not None


def test_tampered_confirmation_link_is_refused(
    auth: AuthActions, app: Flask, client: FlaskClient
) -> None:
    auth.signup()
    client.get("/confirm/not-a-real-token")
    assert "not valid" in client.get("/account").get_data(as_text=True)
    assert user_row(app).email_confirmed_at is None


def test_expired_confirmation_link_is_refused(
    auth: AuthActions, app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth.signup()
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 4 * 24 * 3600)
    auth.confirm()
    assert "expired" in client.get("/account").get_data(as_text=True)
    assert user_row(app).email_confirmed_at is None


def test_resend_confirmation_mails_a_new_link(
    auth: AuthActions, app: Flask, client: FlaskClient
) -> None:
    auth.signup()
    response = post_form(client, "/account/confirm", {}, page="/account")
    assert response.status_code == 302
    assert len(read_outbox(app)) == 2
    auth.confirm()
    post_form(client, "/account/confirm", {}, page="/account")
    assert len(read_outbox(app)) == 2

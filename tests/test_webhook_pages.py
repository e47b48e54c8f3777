"""The settings page's webhook: save, remove, test, re-key, and the signing secret shown once."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from test_forms_pages import create_form

import cache
import dal
import microapp
import records
import settings as settings_module
from conftest import AuthActions, WebhookReceiver, csrf_token, post_form, settle_deliveries


@pytest.fixture
def app(overrides: dict[str, Any]) -> Iterator[Flask]:
    """Embedded mode on SQLite; webhooks may reach the loopback receiver; DNS and tests fast."""
    app = microapp.create_app(
        **overrides,
        webhook_allow_private=True,
        webhook_dns_timeout=0.2,
        webhook_test_timeout=0.3,
    )
    app.config["TESTING"] = True
    yield app
    with app.app_context():
        dal.database().engine.dispose()


@pytest.fixture
def owner(client: FlaskClient, auth: AuthActions) -> str:
    """A logged-in owner with one form; the form's public id."""
    auth.signup()
    return create_form(client)


@pytest.fixture
def hanging_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A resolver that never answers for one name (until the test ends); the name."""
    released = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "slow.example.net":
            released.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield "slow.example.net"
    released.set()


def form_row(app: Flask, public_id: str) -> records.Form:
    """The stored form."""
    with app.app_context(), dal.connection() as conn:
        row = dal.form_by_public_id(conn, public_id)
    assert row is not None
    return row


def save_webhook(client: FlaskClient, public_id: str, url: str, action: str = "save") -> Any:
    """Press a button of the webhook form."""
    path = f"/forms/{public_id}/webhook"
    return post_form(
        client, path, {"url": url, "action": action}, page=f"/forms/{public_id}/settings"
    )


def reveal(client: FlaskClient, public_id: str) -> Any:
    """Press "Reveal" under the masked secret."""
    return post_form(
        client,
        f"/forms/{public_id}/webhook/secret",
        {},
        page=f"/forms/{public_id}/settings",
    )


def text(response: Any) -> str:
    """The answer's body."""
    return response.get_data(as_text=True)


def log_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The structured log events recorded so far."""
    return [record.msg for record in caplog.records if isinstance(record.msg, dict)]


# --- the secret, shown once ----------------------------------------------------------------------


def test_a_first_webhook_shows_its_new_secret_once_and_uncached(
    app: Flask, client: FlaskClient, owner: str, webhook_receiver: WebhookReceiver
) -> None:
    response = save_webhook(client, owner, webhook_receiver.url)
    secret = form_row(app, owner).webhook_secret
    assert response.status_code == 200
    assert secret in text(response)
    assert "Copy it now" in text(response)
    assert "Webhook saved." in text(response)
    assert response.headers["Cache-Control"] == "no-store"
    page = client.get(f"/forms/{owner}/settings")
    assert secret not in text(page)
    assert f"whsec_…{secret[-4:]}" in text(page)
    assert ">Reveal</button>" in text(page)


def test_saving_the_same_webhook_again_does_not_show_the_secret(
    app: Flask, client: FlaskClient, owner: str, webhook_receiver: WebhookReceiver
) -> None:
    save_webhook(client, owner, webhook_receiver.url)
    secret = form_row(app, owner).webhook_secret
    response = save_webhook(client, owner, webhook_receiver.url + "?v=2")
    assert response.status_code == 302
    assert secret not in text(client.get(response.headers["Location"]))
    assert form_row(app, owner).webhook_secret == secret


def test_reveal_shows_the_secret_uncached_and_logs_it_without_the_secret(
    app: Flask,
    client: FlaskClient,
    owner: str,
    webhook_receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    save_webhook(client, owner, webhook_receiver.url)
    secret = form_row(app, owner).webhook_secret
    caplog.clear()
    response = reveal(client, owner)
    assert response.status_code == 200
    assert secret in text(response)
    assert response.headers["Cache-Control"] == "no-store"
    events = log_events(caplog)
    [revealed] = [e for e in events if e["event"] == "form.webhook_secret_revealed"]
    assert revealed["form"] == owner
    assert not any(secret in json.dumps(e, default=str) for e in events)
    assert secret not in caplog.text
    assert secret not in text(client.get(f"/forms/{owner}/settings"))  # masked again


@pytest.mark.parametrize("token", [None, "forged"])
def test_reveal_without_a_valid_csrf_token_is_refused(
    app: Flask, client: FlaskClient, owner: str, webhook_receiver: WebhookReceiver, token: Any
) -> None:
    save_webhook(client, owner, webhook_receiver.url)
    data = {} if token is None else {"csrf_token": token}
    response = client.post(f"/forms/{owner}/webhook/secret", data=data)
    assert response.status_code == 400
    assert "This form expired" in text(response)
    assert form_row(app, owner).webhook_secret not in text(response)


def test_reveal_on_a_form_without_a_webhook_says_so(client: FlaskClient, owner: str) -> None:
    response = reveal(client, owner)
    assert response.status_code == 302
    assert "This form has no webhook yet." in text(client.get(response.headers["Location"]))


def test_a_new_signing_secret_is_shown_once_and_uncached(
    app: Flask, client: FlaskClient, owner: str, webhook_receiver: WebhookReceiver
) -> None:
    save_webhook(client, owner, webhook_receiver.url)
    old = form_row(app, owner).webhook_secret
    response = save_webhook(client, owner, webhook_receiver.url, action="rotate")
    new = form_row(app, owner).webhook_secret
    assert new != old
    assert response.status_code == 200
    assert new in text(response)
    assert old not in text(response)
    assert "New signing secret created." in text(response)
    assert response.headers["Cache-Control"] == "no-store"
    assert new not in text(client.get(f"/forms/{owner}/settings"))


def test_another_owners_webhook_buttons_answer_404(
    app: Flask, client: FlaskClient, owner: str, webhook_receiver: WebhookReceiver
) -> None:
    save_webhook(client, owner, webhook_receiver.url)
    before = form_row(app, owner)
    intruder = app.test_client()
    AuthActions(intruder, app).signup("b@example.com")
    token = csrf_token(intruder, "/forms/new")
    answers = [
        intruder.post(f"/forms/{owner}/webhook/secret", data={"csrf_token": token}),
        *(
            intruder.post(
                f"/forms/{owner}/webhook",
                data={"csrf_token": token, "url": "http://127.0.0.1:1/x", "action": action},
            )
            for action in ("save", "rotate", "test")
        ),
    ]
    assert [r.status_code for r in answers] == [404] * 4
    assert not any(before.webhook_secret in text(r) for r in answers)
    after = form_row(app, owner)
    assert (after.webhook_url, after.webhook_secret) == (before.webhook_url, before.webhook_secret)
    assert webhook_receiver.requests == []


# --- saving, removing, testing -----------------------------------------------------------------


def test_removing_the_webhook_on_the_page_cancels_what_was_still_to_send(
    app: Flask, client: FlaskClient, owner: str, webhook_receiver: WebhookReceiver
) -> None:
    save_webhook(client, owner, webhook_receiver.url)
    form = form_row(app, owner)
    with app.app_context(), dal.transaction() as conn:  # a submission waiting for its retry
        submission = dal.insert_submission(
            conn, {"public_id": "s" * 22, "form_id": form.id, "data": {}, "schema_version": 1}
        )
        [row_id] = dal.insert_deliveries(conn, submission.id, [("webhook", form.webhook_url)])
    response = save_webhook(client, owner, "")
    assert response.status_code == 302
    assert "Webhook removed." in text(client.get(response.headers["Location"]))
    settle_deliveries(app)
    with app.app_context(), dal.connection() as conn:
        row = conn.execute(sa.select(dal.deliveries).where(dal.deliveries.c.id == row_id)).one()
    assert (row.status, row.last_error) == ("dead", "cancelled: the form's webhook was removed")
    assert webhook_receiver.requests == []


def test_a_hanging_resolver_on_save_answers_a_clear_message(
    app: Flask, client: FlaskClient, owner: str, hanging_dns: str
) -> None:
    response = save_webhook(client, owner, f"https://{hanging_dns}/hook")
    assert response.status_code == 422
    assert (
        f"This address cannot receive webhooks: the DNS lookup for &#39;{hanging_dns}&#39; "
        "took longer than 0.2 s; try again." in text(response)
    )
    assert form_row(app, owner).webhook_url is None


def test_send_test_event_with_a_hanging_resolver_says_so(
    app: Flask, client: FlaskClient, owner: str, hanging_dns: str
) -> None:
    with app.app_context(), cache.form_write(owner) as conn:  # saved before the resolver broke
        dal.update_form(
            conn,
            form_row(app, owner).id,
            {"webhook_url": f"https://{hanging_dns}/hook", "webhook_secret": "whsec_AAAA"},
        )
    response = save_webhook(client, owner, f"https://{hanging_dns}/hook", action="test")
    assert response.status_code == 302
    page = text(client.get(response.headers["Location"]))
    assert "The test event failed: the DNS lookup" in page
    assert "took longer than 0.2 s" in page


def test_send_test_event_gives_up_after_the_short_interactive_timeout(
    app: Flask, client: FlaskClient, owner: str, webhook_receiver: WebhookReceiver
) -> None:
    save_webhook(client, owner, webhook_receiver.url)
    assert app.extensions["mailslot.settings"].webhook_read_timeout == 15.0  # the worker's
    webhook_receiver.script = ["timeout"]
    webhook_receiver.slow_seconds = 5
    response = save_webhook(client, owner, webhook_receiver.url, action="test")
    webhook_receiver.release.set()
    page = text(client.get(response.headers["Location"]))
    assert re.search(r"The test event failed: webhook: \w*[Tt]imeout", page), page


def test_send_test_event_reports_the_receivers_answer(
    app: Flask, client: FlaskClient, owner: str, webhook_receiver: WebhookReceiver
) -> None:
    save_webhook(client, owner, webhook_receiver.url)
    response = save_webhook(client, owner, webhook_receiver.url, action="test")
    page = text(client.get(response.headers["Location"]))
    assert "The receiver answered 200: the webhook works." in page
    assert webhook_receiver.bodies()[0]["type"] == "webhook.test"


@pytest.mark.parametrize("key", ["webhook_dns_timeout", "webhook_test_timeout"])
@pytest.mark.parametrize("value", [0, -1.5])
def test_webhook_dns_and_test_timeouts_must_be_positive(key: str, value: float) -> None:
    with pytest.raises(
        settings_module.SettingsError, match=f"{key.upper()}: must be greater than 0"
    ):
        settings_module.load_settings(**{key: value})

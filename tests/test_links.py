"""links.external_url: every absolute link Mailslot gives out comes from the app's URL map,
against BASE_URL, in requests, tasks and CLI commands alike."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask

import dal
import dashboard
import microapp
import records
import services
import users
from conftest import message_text, read_outbox
from links import external_url


def move_route(app: Flask, endpoint: str, rule: str) -> None:
    """Serve ``endpoint`` at ``rule`` first: what a route change does to the links built for it.

    The old rule still answers requests; only what is built for the endpoint changes.
    """
    app.add_url_rule(rule, endpoint=endpoint)
    rules = app.url_map._rules_by_endpoint[endpoint]  # Werkzeug has no public way to reorder
    rules.insert(0, rules.pop())


def confirmed_owner_form(app: Flask) -> records.Form:
    """A confirmed owner's form that notifies."""
    with app.app_context():
        with dal.transaction() as conn:
            owner = dal.insert_user(conn, "links@example.com", "x")
            dal.mark_email_confirmed(conn, owner.id, owner.email)
        return services.create_form(owner.id, {"name": "Links", "notify": True})


def test_links_in_redirects_emails_and_snippets_follow_the_route_map(app: Flask) -> None:
    move_route(app, "public.thanks", "/thanks/<pid:public_id>")
    move_route(app, "public.submit", "/post/<pid:public_id>")
    move_route(app, "public.hosted_page", "/page/<pid:public_id>")
    move_route(app, "dashboard.submission_detail", "/inbox/<pid:public_id>/<pid:submission_id>")
    move_route(app, "accounts.confirm_email", "/account/confirm-address/<token>")
    form = confirmed_owner_form(app)

    response = app.test_client().post(f"/f/{form.public_id}", data={"message": "hi"})
    assert response.status_code == 303
    assert response.headers["Location"] == f"http://mailslot.test/thanks/{form.public_id}"
    [notification] = read_outbox(app)
    link = re.search(r"http://\S+", message_text(notification))
    assert link is not None
    assert link.group(0).startswith(f"http://mailslot.test/inbox/{form.public_id}/")

    with app.test_request_context():
        snippets = dashboard._install_snippets(form)
        assert services.endpoint_url(form) == f"http://mailslot.test/post/{form.public_id}"
        users.sign_up("new.owner@example.com", "correct horse battery")
    assert snippets["action"] == f"http://mailslot.test/post/{form.public_id}"
    assert snippets["hosted"] == f"http://mailslot.test/page/{form.public_id}"
    assert 'action="http://mailslot.test/post/' in snippets["html"]
    confirmation = message_text(read_outbox(app)[-1])
    assert "http://mailslot.test/account/confirm-address/" in confirmation


def test_links_use_base_url_never_the_request_host(app: Flask) -> None:
    with app.test_request_context("/", base_url="http://attacker.example"):
        assert external_url("accounts.login") == "http://mailslot.test/login"
    with app.app_context():  # a task or a CLI command: no request at all
        assert external_url("accounts.login") == "http://mailslot.test/login"


def test_links_keep_the_path_base_url_names(overrides: dict[str, Any]) -> None:
    app = microapp.create_app(**{**overrides, "base_url": "https://example.com/mailslot/"})
    with app.app_context():
        url = external_url("public.thanks", public_id="abc")
        dal.database().engine.dispose()
    assert url == "https://example.com/mailslot/f/abc/thanks"

"""Local spam scoring: each signal alone and combined, held deliveries, and "not spam"."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dal
import intake
import services
from conftest import AuthActions, post_form, read_outbox, settle_deliveries


@pytest.fixture
def owner(app: Flask, client: FlaskClient, auth: AuthActions) -> dict[str, Any]:
    """A confirmed owner with one lenient form (notifications on), logged in as ``client``."""
    auth.signup()
    auth.confirm()
    response = post_form(
        client,
        "/forms/new",
        {
            "name": "Contact",
            "notify": "y",
            "status": "active",
            "honeypot_field": "_gotcha",
            "blocked_words": "casino\nfree money",
            "blocked_email_domains": "spam.example",
        },
    )
    return {"public_id": response.headers["Location"].rsplit("/", 1)[1]}


def latest(app: Flask) -> sa.Row[Any]:
    """The newest submission."""
    with app.app_context(), dal.connection() as conn:
        return conn.execute(
            sa.select(dal.submissions).order_by(dal.submissions.c.id.desc())
        ).first()


def notifications(app: Flask) -> list[Any]:
    """Notification emails written to the outbox (not the confirmation mail)."""
    return [m for m in read_outbox(app) if m["Subject"].startswith("New submission")]


def post(app: Flask, public_id: str, data: dict[str, Any]) -> None:
    """A JSON submission from another site."""
    response = app.test_client().post(f"/f/{public_id}", json=data)
    assert response.status_code == 201


@pytest.mark.parametrize(
    ("data", "spam", "reason"),
    [
        ({"message": "hello"}, False, None),
        ({"message": "see http://a.example http://b.example http://c.example"}, False, "3 links"),
        ({"message": " ".join(f"https://x{n}.example" for n in range(5))}, True, "5 links"),
        ({"message": "Win at the CASINO today"}, True, "contains the blocked word “casino”"),
        ({"email": "bot@Spam.example", "message": "hi"}, True,
         "email from the blocked domain “spam.example”"),
    ],
)  # fmt: skip
def test_each_signal_on_its_own(
    app: Flask, owner: dict[str, Any], data: dict[str, Any], spam: bool, reason: str | None
) -> None:
    post(app, owner["public_id"], data)
    row = latest(app)
    assert row.is_spam is spam
    assert row.spam_reason == reason
    assert len(notifications(app)) == (0 if spam else 1)


def hosted_token(client: FlaskClient, public_id: str) -> tuple[str, str]:
    """The CSRF token and render stamp of a freshly rendered hosted page."""
    page = client.get(f"/f/{public_id}").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
    rendered = re.search(r'name="_rendered" value="([^"]+)"', page)
    assert csrf
    assert rendered
    return csrf.group(1), rendered.group(1)


def send_hosted(client: FlaskClient, public_id: str, rendered: str | None, csrf: str) -> int:
    """Submit the hosted page's default fields."""
    data = {"name": "Ada", "email": "ada@example.org", "message": "Hello", "csrf_token": csrf}
    if rendered is not None:
        data["_rendered"] = rendered
    return client.post(f"/f/{public_id}/page", data=data).status_code


def test_hosted_page_sent_too_fast_is_spam(app: Flask, owner: dict[str, Any]) -> None:
    visitor = app.test_client()
    csrf, rendered = hosted_token(visitor, owner["public_id"])
    assert send_hosted(visitor, owner["public_id"], rendered, csrf) == 303
    row = latest(app)
    assert row.is_spam
    assert re.fullmatch(r"sent \d+\.\d s after render", row.spam_reason)


def test_hosted_page_sent_after_a_human_pause_is_not_spam(
    app: Flask, owner: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    visitor = app.test_client()
    csrf, rendered = hosted_token(visitor, owner["public_id"])
    real = time.time
    monkeypatch.setattr(intake.time, "time", lambda: real() + 7.5)
    assert send_hosted(visitor, owner["public_id"], rendered, csrf) == 303
    row = latest(app)
    assert not row.is_spam
    assert row.spam_reason is None


def test_a_render_stamp_older_than_a_day_is_suspicious_but_not_alone_spam(
    app: Flask, owner: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    visitor = app.test_client()
    csrf, rendered = hosted_token(visitor, owner["public_id"])
    real = time.time
    monkeypatch.setattr(intake.time, "time", lambda: real() + 2 * 24 * 3600)
    send_hosted(visitor, owner["public_id"], rendered, csrf)
    row = latest(app)
    assert not row.is_spam
    assert row.spam_reason == "sent more than a day after the page was rendered"


@pytest.mark.parametrize("rendered", [None, "forged.stamp.value"])
def test_a_missing_or_forged_render_stamp_is_suspicious(
    app: Flask, owner: dict[str, Any], rendered: str | None
) -> None:
    visitor = app.test_client()
    csrf, _ = hosted_token(visitor, owner["public_id"])
    send_hosted(visitor, owner["public_id"], rendered, csrf)
    row = latest(app)
    assert not row.is_spam
    assert row.spam_reason == "the page's render stamp is missing or forged"


def test_velocity_across_forms_is_counted(app: Flask, owner: dict[str, Any]) -> None:
    app.extensions["mailslot.settings"].spam_velocity_limit = 3
    app.extensions["mailslot.settings"].spam_threshold = 0.5
    for n in range(4):
        post(app, owner["public_id"], {"n": n})
    row = latest(app)
    assert row.is_spam
    assert row.spam_reason == "4 submissions from this address in 10 minutes"


def test_signals_add_up_and_all_reasons_are_shown(
    app: Flask, owner: dict[str, Any], client: FlaskClient
) -> None:
    visitor = app.test_client()
    csrf, _ = hosted_token(visitor, owner["public_id"])
    visitor.post(
        f"/f/{owner['public_id']}/page",
        data={
            "name": "Bot",
            "email": "bot@example.org",
            "message": "http://a.example http://b.example http://c.example",
            "csrf_token": csrf,
        },
    )
    row = latest(app)
    assert row.is_spam
    assert row.spam_reason == "3 links; the page's render stamp is missing or forged"
    spam_view = client.get(f"/forms/{owner['public_id']}?spam=1").get_data(as_text=True)
    assert row.public_id in spam_view
    inbox = client.get(f"/forms/{owner['public_id']}").get_data(as_text=True)
    assert row.public_id not in inbox
    detail = client.get(f"/forms/{owner['public_id']}/submissions/{row.public_id}")
    assert "3 links; the page&#39;s render stamp is missing or forged" in detail.get_data(
        as_text=True
    )


def test_spam_sends_nothing_until_marked_not_spam(
    app: Flask, owner: dict[str, Any], client: FlaskClient
) -> None:
    post(app, owner["public_id"], {"message": "free money inside"})
    row = latest(app)
    assert row.is_spam
    settle_deliveries(app)
    with app.app_context(), dal.connection() as conn:
        assert [d.status for d in dal.deliveries_for(conn, row.id)] == ["held"]
    assert notifications(app) == []
    path = f"/forms/{owner['public_id']}/submissions/{row.public_id}"
    response = post_form(client, f"{path}/spam", {"spam": "0"}, page=path)
    assert response.status_code == 302
    assert not latest(app).is_spam
    [message] = notifications(app)
    assert "free money inside" in message.get_body(preferencelist=("plain",)).get_content()
    with app.app_context(), dal.connection() as conn:
        assert [d.status for d in dal.deliveries_for(conn, row.id)] == ["done"]


def test_stats_block_counts_today_week_spam_and_honeypot(
    app: Flask, owner: dict[str, Any], client: FlaskClient
) -> None:
    post(app, owner["public_id"], {"message": "hello"})
    post(app, owner["public_id"], {"message": "casino"})
    app.test_client().post(f"/f/{owner['public_id']}", data={"_gotcha": "bot"})
    with app.app_context():
        stats, _ = services.inbox_numbers(intake.public_form(owner["public_id"]))
        assert stats == {
            "today": 1,
            "week": 1,
            "spam": 1,
            "honeypot": 1,
        }
    page = client.get(f"/forms/{owner['public_id']}").get_data(as_text=True)
    assert "Spam caught" in page
    assert "Honeypot hits" in page


def test_honeypot_name_cannot_be_a_field_name(
    app: Flask, owner: dict[str, Any], client: FlaskClient
) -> None:
    public_id = owner["public_id"]
    saved = post_form(
        client,
        f"/forms/{public_id}/fields",
        {"action": "save", "fields-0-name": "website", "fields-0-type": "url"},
    )
    assert saved.status_code == 302
    response = post_form(
        client,
        f"/forms/{public_id}/settings",
        {"name": "Contact", "status": "active", "honeypot_field": "website"},
    )
    assert response.status_code == 422
    assert "A field of this form is named &#39;website&#39;" in response.get_data(as_text=True)
    renamed = post_form(
        client,
        f"/forms/{public_id}/settings",
        {"name": "Contact", "status": "active", "honeypot_field": "trap"},
    )
    assert renamed.status_code == 302
    clash = post_form(
        client,
        f"/forms/{public_id}/fields",
        {"action": "save", "fields-0-name": "trap", "fields-0-type": "text"},
    )
    assert clash.status_code == 422
    assert "A field of this form is named &#39;trap&#39;" in clash.get_data(as_text=True)


def _stored_form(app: Flask, public_id: str) -> Any:
    """The form as stored now."""
    with app.app_context(), dal.connection() as conn:
        return conn.execute(sa.select(dal.forms).where(dal.forms.c.public_id == public_id)).one()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,30}", fullmatch=True))
def test_services_refuse_a_honeypot_named_like_a_field_whichever_is_saved_last(
    app: Flask, owner: dict[str, Any], name: str
) -> None:
    # The one check lives in services: the pages and the API only show its message.
    public_id = owner["public_id"]
    spec = {"name": name, "type": "text"}
    with app.app_context():
        form = _stored_form(app, public_id)
        services.save_fields(form, [spec])  # the honeypot is _gotcha: no clash
        form = _stored_form(app, public_id)
        with pytest.raises(services.InvalidInput) as refused:
            services.update_form_settings(form, {"honeypot_field": name})
        assert list(refused.value.errors) == ["honeypot_field"]
        services.update_form_settings(form, {"honeypot_field": name + "_trap"})
        trap = _stored_form(app, public_id)
        with pytest.raises(services.InvalidInput) as clash:
            services.save_fields(trap, [spec, {"name": name + "_trap", "type": "text"}])
        assert list(clash.value.errors) == ["_form"]
    after = _stored_form(app, public_id)
    assert after.honeypot_field == name + "_trap"
    assert [field["name"] for field in after.fields] == [name]

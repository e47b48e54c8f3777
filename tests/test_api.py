"""The JSON API v1: tokens, every resource's success path and every error, ownership, paging.

Every test here runs on SQLite and, when MAILSLOT_TEST_DATABASE_URL is set, on PostgreSQL.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from dataclasses import astuple, dataclass
from typing import Any

import jsonschema_rs
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from markupsafe import escape
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

import api
import cache
import dal
import openapi
import records
import services
import settings as settings_module
import users
import validation
from conftest import AuthActions, WebhookReceiver, post_form, settle_deliveries

TOKEN_RE = re.compile(r"ms_live_[A-Za-z0-9_-]{43}")
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"])


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Run this module on both databases."""
    return request.param


@pytest.fixture
def overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Webhooks may reach the local test receiver."""
    return {**overrides, "webhook_allow_private": True}


@pytest.fixture
def resolve_only_local(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host names other than localhost do not resolve (no DNS traffic from the tests)."""
    real = socket.getaddrinfo

    def fake(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("localhost", "127.0.0.1", b"localhost", b"127.0.0.1"):
            return real(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "not resolvable in tests")

    monkeypatch.setattr(socket, "getaddrinfo", fake)


# --- helpers ----------------------------------------------------------------------------------


@dataclass
class Owner:
    """An account with an API token."""

    id: int
    email: str
    token: str
    token_id: int

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header for this owner's token."""
        return {"Authorization": f"Bearer {self.token}"}


def make_owner(app: Flask, email: str) -> Owner:
    """A confirmed account and a fresh token."""
    with app.app_context():
        with dal.transaction() as conn:
            user = dal.insert_user(conn, email, "x")
            dal.mark_email_confirmed(conn, user.id, email)
        row, token = users.create_api_token(user.id, "tests")
    return Owner(user.id, email, token, row.id)


@pytest.fixture
def owner(app: Flask) -> Owner:
    """Owner A."""
    return make_owner(app, "a@example.com")


@pytest.fixture
def other(app: Flask) -> Owner:
    """Owner B."""
    return make_owner(app, "b@example.com")


def call(
    client: FlaskClient, who: Owner | None, method: str, path: str, body: Any = None, **kwargs: Any
) -> Any:
    """One API request as ``who`` (no token when None); ``body`` is sent as JSON."""
    headers = dict(kwargs.pop("headers", {}))
    if who is not None:
        headers.update(who.headers)
    if body is not None:
        kwargs["json"] = body
    return client.open(path, method=method, headers=headers, **kwargs)


def error_of(response: Any, status: int, code: str | None = None) -> dict[str, list[str]]:
    """Assert the one error shape; the ``fields`` of the error."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "fields"}
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert isinstance(body["error"]["fields"], dict)
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]["fields"]


def create_form(client: FlaskClient, who: Owner, **values: Any) -> dict[str, Any]:
    """Create a form over the API; its JSON."""
    response = call(client, who, "POST", "/api/v1/forms", {"name": "Contact", **values})
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def store_submissions(
    app: Flask, form_id: str, count: int, *, spam: bool = False, data: dict[str, Any] | None = None
) -> list[records.Submission]:
    """Store submissions directly, oldest first (faster than posting hundreds)."""
    with app.app_context():
        with dal.connection() as conn:
            form = dal.form_by_public_id(conn, form_id)
        assert form is not None
        with dal.transaction() as conn:
            return [
                dal.insert_submission(
                    conn,
                    {
                        "public_id": dal.new_public_id(),
                        "form_id": form.id,
                        "data": data or {"n": index},
                        "schema_version": 1,
                        "is_spam": spam,
                        "meta": {},
                    },
                )
                for index in range(count)
            ]


def set_delivery_status(app: Flask, delivery_id: int, status: str) -> None:
    """Force a delivery into a state (a worker would)."""
    with app.app_context(), dal.transaction() as conn:
        dal.finish_delivery(conn, delivery_id, status)


@pytest.fixture
def delivered(
    app: Flask, client: FlaskClient, owner: Owner, webhook_receiver: WebhookReceiver
) -> dict[str, Any]:
    """A form of owner A with a webhook, one submission posted publicly, both deliveries done."""
    form = create_form(client, owner, webhook_url=webhook_receiver.url)
    response = client.post(f"/f/{form['id']}", json={"email": "ann@example.org", "message": "Hi"})
    assert response.status_code == 201, response.get_data(as_text=True)
    submission_id = response.get_json()["id"]
    settle_deliveries(app)
    deliveries = call(
        client, owner, "GET", f"/api/v1/submissions/{submission_id}/deliveries"
    ).get_json()["data"]
    assert {d["kind"] for d in deliveries} == {"email", "webhook"}
    assert {d["status"] for d in deliveries} == {"done"}
    webhook = next(d for d in deliveries if d["kind"] == "webhook")
    return {"form": form, "submission": submission_id, "webhook": webhook}


# --- the document and the reference page ----------------------------------------------------


@SQLITE_ONLY
def test_openapi_document_is_public_and_describes_every_route(
    client: FlaskClient, app: Flask
) -> None:
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    doc = response.get_json()
    assert doc["openapi"] == "3.1.0"
    assert doc["servers"] == [{"url": "http://mailslot.test/api/v1"}]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    documented = {
        (method.upper(), path) for path, methods in doc["paths"].items() for method in methods
    }
    routed = {
        (method, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule.removeprefix("/api/v1")))
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("api.") and rule.endpoint not in api._OPEN_ENDPOINTS
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert documented == routed
    create = doc["paths"]["/forms"]["post"]
    assert create["responses"]["201"]["headers"]["Location"]["required"] is True
    assert set(create["responses"]) == {"201", "400", "401", "413", "415", "422", "429"}
    assert "WWW-Authenticate" in create["responses"]["401"]["headers"]
    assert "Retry-After" in create["responses"]["429"]["headers"]
    assert doc["components"]["schemas"]["FormCreate"]["required"] == ["name"]
    assert doc["components"]["schemas"]["FormCreate"]["additionalProperties"] is False


@SQLITE_ONLY
def test_api_root_points_at_the_document(client: FlaskClient) -> None:
    body = client.get("/api/v1/").get_json()
    assert body["openapi"] == "http://mailslot.test/api/v1/openapi.json"
    assert body["reference"] == "http://mailslot.test/api"


@SQLITE_ONLY
def test_reference_page_is_rendered_from_the_document(client: FlaskClient) -> None:
    response = client.get("/api")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    doc = client.get("/api/v1/openapi.json").get_json()
    for path, methods in doc["paths"].items():
        for method, spec in methods.items():
            assert f"{method.upper()} /api/v1{path}" in page
            assert str(escape(spec["summary"])) in page
    for name in doc["components"]["schemas"]:
        assert f'id="model-{name}"' in page
    # Self-hosted only: no inline script or style, nothing from another origin.
    assert "<script>" not in page
    assert "style=" not in page
    assert "<style" not in page
    assert not re.search(r'(src|href)="https?://', page)


# --- authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "invalid_token"),
    [
        (None, False),
        ("", False),
        ("Basic dXNlcjpwYXNz", True),
        ("Bearer", False),
        ("Bearer nonsense", True),
        ("Bearer ms_live_" + "A" * 43, True),
        ("Token ms_live_" + "A" * 43, True),
    ],
)
def test_missing_or_unknown_token_gets_401(
    client: FlaskClient, authorization: str | None, invalid_token: bool
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = client.get("/api/v1/me", headers=headers)
    error_of(response, 401, "unauthorized")
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert ('error="invalid_token"' in challenge) is invalid_token


def test_me_describes_the_account_and_the_token(client: FlaskClient, owner: Owner) -> None:
    response = call(client, owner, "GET", "/api/v1/me")
    assert response.status_code == 200
    body = response.get_json()
    assert body["email"] == "a@example.com"
    assert body["email_confirmed"] is True
    assert body["token"]["name"] == "tests"
    assert body["token"]["prefix"] == owner.token[:12]
    assert body["token"]["prefix"].startswith("ms_live_")


@SQLITE_ONLY
def test_session_cookie_does_not_authenticate(client: FlaskClient, auth: AuthActions) -> None:
    auth.signup()
    assert client.get("/forms").status_code == 200  # logged in
    error_of(client.get("/api/v1/me"), 401, "unauthorized")
    error_of(client.post("/api/v1/forms", json={"name": "x"}), 401, "unauthorized")


def test_revoked_token_gets_401(app: Flask, client: FlaskClient, owner: Owner) -> None:
    assert call(client, owner, "GET", "/api/v1/me").status_code == 200
    with app.app_context():
        assert users.revoke_api_token(owner.id, owner.token_id)
        assert not users.revoke_api_token(owner.id, owner.token_id)
    response = call(client, owner, "GET", "/api/v1/forms")
    error_of(response, 401, "unauthorized")
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_token_records_its_last_use_at_most_once_a_minute(
    app: Flask, client: FlaskClient, owner: Owner
) -> None:
    def last_used() -> Any:
        with app.app_context():
            return users.list_api_tokens(owner.id)[0].last_used_at

    assert last_used() is None
    call(client, owner, "GET", "/api/v1/me")
    first = last_used()
    assert first is not None
    call(client, owner, "GET", "/api/v1/me")
    assert last_used() == first


def test_tokens_are_stored_as_hashes(app: Flask, owner: Owner) -> None:
    with app.app_context():
        row = users.list_api_tokens(owner.id)[0]
    assert TOKEN_RE.fullmatch(owner.token)
    assert row.prefix == owner.token[:12]
    assert row.token_hash == users.hash_api_token(owner.token)
    assert owner.token not in json.dumps([str(value) for value in astuple(row)])


# --- the per-token rate limit ----------------------------------------------------------------


def test_token_over_its_rate_limit_gets_429_with_retry_after(
    app: Flask, client: FlaskClient, owner: Owner, other: Owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    app.extensions["mailslot.settings"].api_rate_limit = "3/minute"
    monkeypatch.setattr(cache, "clock", lambda: 1_700_000_040.0)  # the start of a minute
    for _ in range(3):
        assert call(client, owner, "GET", "/api/v1/me").status_code == 200
    response = call(client, owner, "GET", "/api/v1/me")
    error_of(response, 429, "rate_limited")
    # Four calls (the refused one counts) weigh on the next minute too: a retry fits once half
    # of it has passed, when 1 + 4 * (1 - 1/2) calls are within the limit of 3.
    assert response.headers["Retry-After"] == "90"
    # The limit is per token: another token is not affected.
    assert call(client, other, "GET", "/api/v1/me").status_code == 200


def test_rate_limit_falls_back_to_the_in_process_limiter_when_redis_is_down(
    app: Flask, client: FlaskClient, owner: Owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    app.extensions["mailslot.settings"].api_rate_limit = "1/minute"

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("down")

    with app.app_context():
        monkeypatch.setattr(cache.stores().redis, "pipeline", broken)
    assert call(client, owner, "GET", "/api/v1/me").status_code == 200
    assert call(client, owner, "GET", "/api/v1/me").status_code == 429


def test_api_rate_limit_setting_is_checked() -> None:
    assert settings_module.load_settings(api_rate_limit="20 per hour").api_rate_limit_window == (
        20,
        3600,
    )
    assert settings_module.load_settings(api_rate_limit="5/second").api_rate_limit_window == (5, 1)
    for bad in ("600", "0/minute", "ten/minute", "6/fortnight"):
        with pytest.raises(settings_module.SettingsError, match="API_RATE_LIMIT"):
            settings_module.load_settings(api_rate_limit=bad)


# --- forms -------------------------------------------------------------------------------------


def test_create_form_answers_201_with_location(client: FlaskClient, owner: Owner) -> None:
    response = call(
        client,
        owner,
        "POST",
        "/api/v1/forms",
        {
            "name": "  Contact  ",
            "fields": [
                {"name": "email", "type": "email", "required": True},
                {"name": "topic", "type": "select", "choices": ["Sales", "Support"]},
            ],
            "strict": True,
            "status": "paused",
            "redirect_url": "https://example.com/thanks",
            "allowed_domains": ["Example.com", "www.example.com:8080", "example.com"],
            "honeypot_field": "_trap",
            "notify": False,
        },
    )
    assert response.status_code == 201
    body = response.get_json()
    assert response.headers["Location"] == f"http://mailslot.test/api/v1/forms/{body['id']}"
    assert body["name"] == "Contact"
    assert [f["name"] for f in body["fields"]] == ["email", "topic"]
    assert body["fields"][1]["choices"] == ["Sales", "Support"]
    assert body["fields"][0]["label"] == "email"
    assert body["schema_version"] == 1
    assert body["strict"] is True
    assert body["status"] == "paused"
    assert body["allowed_domains"] == ["example.com", "www.example.com:8080"]
    assert body["honeypot_field"] == "_trap"
    assert body["notify"] is False
    assert body["webhook_url"] is None
    assert body["webhook_secret"] is None
    assert body["endpoint_url"] == f"http://mailslot.test/f/{body['id']}"
    fetched = call(client, owner, "GET", response.headers["Location"]).get_json()
    assert fetched == {key: value for key, value in body.items() if key != "webhook_secret"}


def test_create_form_with_defaults(client: FlaskClient, owner: Owner) -> None:
    body = create_form(client, owner)
    assert body["fields"] == []
    assert body["status"] == "active"
    assert body["strict"] is False
    assert body["notify"] is True
    assert body["honeypot_field"] == "_gotcha"
    assert body["allowed_domains"] == []


def test_webhook_secret_is_shown_on_create_and_rotate_only(
    client: FlaskClient, owner: Owner, webhook_receiver: WebhookReceiver
) -> None:
    body = create_form(client, owner, webhook_url=webhook_receiver.url)
    secret = body["webhook_secret"]
    assert secret.startswith("whsec_")
    path = f"/api/v1/forms/{body['id']}"
    assert "webhook_secret" not in call(client, owner, "GET", path).get_json()
    listed = call(client, owner, "GET", "/api/v1/forms").get_json()["data"][0]
    assert "webhook_secret" not in listed
    renamed = call(client, owner, "PATCH", path, {"name": "Renamed"}).get_json()
    assert renamed["webhook_secret"] is None
    rotated = call(client, owner, "PATCH", path, {"rotate_webhook_secret": True}).get_json()
    assert rotated["webhook_secret"].startswith("whsec_")
    assert rotated["webhook_secret"] != secret


def test_list_forms_newest_first(client: FlaskClient, owner: Owner) -> None:
    assert call(client, owner, "GET", "/api/v1/forms").get_json() == {"data": []}
    first = create_form(client, owner, name="First")
    second = create_form(client, owner, name="Second")
    data = call(client, owner, "GET", "/api/v1/forms").get_json()["data"]
    assert [f["id"] for f in data] == [second["id"], first["id"]]


def test_patch_form_changes_only_what_is_sent(client: FlaskClient, owner: Owner) -> None:
    form = create_form(client, owner, redirect_url="https://example.com/done", strict=True)
    path = f"/api/v1/forms/{form['id']}"
    response = call(client, owner, "PATCH", path, {"name": "Renamed", "redirect_url": None})
    assert response.status_code == 200
    body = response.get_json()
    assert body["name"] == "Renamed"
    assert body["redirect_url"] is None
    assert body["strict"] is True
    assert body["schema_version"] == 1
    body = call(
        client, owner, "PATCH", path, {"fields": [{"name": "age", "type": "number", "min": 18}]}
    ).get_json()
    assert body["schema_version"] == 2
    assert body["fields"][0]["min"] == 18
    same = call(client, owner, "PATCH", path, {"fields": body["fields"]}).get_json()
    assert same["schema_version"] == 2  # an unchanged schema keeps its version
    assert call(client, owner, "PATCH", path, {}).get_json()["name"] == "Renamed"
    paused = call(client, owner, "PATCH", path, {"status": "paused"}).get_json()
    assert paused["status"] == "paused"


def test_form_page_texts_retention_and_spam_rules_round_trip(
    app: Flask, client: FlaskClient, owner: Owner
) -> None:
    form = create_form(
        client,
        owner,
        description="  Ask us anything.  ",
        thanks_message="We read every message.",
        show_branding=False,
        retention_days=30,
    )
    assert (form["description"], form["thanks_message"]) == (
        "Ask us anything.",
        "We read every message.",
    )
    assert (form["show_branding"], form["retention_days"]) == (False, 30)
    assert form["spam_rules"] == {"blocked_words": [], "blocked_email_domains": []}
    path = f"/api/v1/forms/{form['id']}"
    rules = {"blocked_words": [" casino ", "casino", "free money"]}
    body = call(client, owner, "PATCH", path, {"spam_rules": rules, "retention_days": None})
    assert body.get_json()["spam_rules"] == {
        "blocked_words": ["casino", "free money"],
        "blocked_email_domains": [],
    }
    assert body.get_json()["retention_days"] is None
    rules = {"blocked_email_domains": ["@Spam.Example"]}
    body = call(client, owner, "PATCH", path, {"spam_rules": rules}).get_json()
    assert body["spam_rules"] == {"blocked_words": [], "blocked_email_domains": ["spam.example"]}
    visitor = app.test_client()
    visitor.post(f"/f/{form['id']}", json={"email": "x@spam.example", "message": "hi"})
    [stored] = call(client, owner, "GET", f"{path}/submissions").get_json()["data"]
    assert stored["is_spam"] is True  # the rule set over the API applies to intake
    page = visitor.get(f"/f/{form['id']}").get_data(as_text=True)
    assert "Ask us anything." in page
    assert "Powered by Mailslot" not in page


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"retention_days": 0}, "retention_days"),
        ({"retention_days": 3651}, "retention_days"),
        ({"spam_rules": {"blocked_words": ["two\nlines"]}}, "spam_rules.blocked_words.0"),
        ({"description": "x" * 2001}, "description"),
        ({"show_branding": "no"}, "show_branding"),
    ],
)
def test_form_settings_refuse_bad_values(
    client: FlaskClient, owner: Owner, change: dict[str, Any], field: str
) -> None:
    form = create_form(client, owner)
    response = call(client, owner, "PATCH", f"/api/v1/forms/{form['id']}", change)
    assert field in error_of(response, 422)


def test_patch_form_that_fails_part_way_changes_nothing(
    client: FlaskClient, owner: Owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    form = create_form(client, owner, name="Before")
    path = f"/api/v1/forms/{form['id']}"

    def database_gone(*_args: Any) -> None:
        raise OperationalError("UPDATE forms", {}, Exception("disk I/O error"))

    monkeypatch.setattr(dal, "bump_schema_version", database_gone)  # after the name was written
    change = {"name": "After", "fields": [{"name": "age", "type": "number"}]}
    error_of(call(client, owner, "PATCH", path, change), 503, "service_unavailable")
    monkeypatch.undo()
    unchanged = call(client, owner, "GET", path).get_json()
    assert (unchanged["name"], unchanged["schema_version"]) == ("Before", 1)


def test_patch_form_sets_and_removes_the_webhook(
    client: FlaskClient, owner: Owner, webhook_receiver: WebhookReceiver
) -> None:
    form = create_form(client, owner)
    path = f"/api/v1/forms/{form['id']}"
    body = call(client, owner, "PATCH", path, {"webhook_url": webhook_receiver.url}).get_json()
    assert body["webhook_url"] == webhook_receiver.url
    assert body["webhook_secret"].startswith("whsec_")
    body = call(client, owner, "PATCH", path, {"webhook_url": None}).get_json()
    assert body["webhook_url"] is None


def test_rotating_without_a_webhook_is_a_conflict(client: FlaskClient, owner: Owner) -> None:
    form = create_form(client, owner)
    response = call(
        client, owner, "PATCH", f"/api/v1/forms/{form['id']}", {"rotate_webhook_secret": True}
    )
    error_of(response, 409, "conflict")


def test_delete_form_answers_204_and_removes_its_submissions(
    app: Flask, client: FlaskClient, owner: Owner
) -> None:
    form = create_form(client, owner)
    [submission] = store_submissions(app, form["id"], 1)
    response = call(client, owner, "DELETE", f"/api/v1/forms/{form['id']}")
    assert response.status_code == 204
    assert response.get_data() == b""
    error_of(call(client, owner, "GET", f"/api/v1/forms/{form['id']}"), 404, "not_found")
    error_of(
        call(client, owner, "GET", f"/api/v1/submissions/{submission.public_id}"), 404, "not_found"
    )


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({}, "name", "This field is required."),
        ({"name": "   "}, "name", "Give the form a name."),
        ({"name": ""}, "name", "This cannot be empty."),
        ({"name": "x" * 201}, "name", "at most 200 characters"),
        ({"name": 5}, "name", "valid string"),
        ({"name": "x\x00y"}, "name", "NUL"),
        ({"name": "x", "colour": "red"}, "colour", "There is no such field."),
        ({"name": "x", "notify": "yes"}, "notify", "valid boolean"),
        ({"name": "x", "status": "closed"}, "status", "'active' or 'paused'"),
        ({"name": "x", "redirect_url": "/thanks"}, "redirect_url", "http:// or https://"),
        ({"name": "x", "allowed_domains": ["not a host"]}, "allowed_domains.0", "not a host"),
        ({"name": "x", "allowed_domains": "example.com"}, "allowed_domains", "valid list"),
        ({"name": "x", "honeypot_field": "_next"}, "honeypot_field", "control field"),
        ({"name": "x", "honeypot_field": "1x"}, "honeypot_field", "Use letters"),
        ({"name": "x", "fields": [{"name": "1a"}]}, "fields.0.name", "starting with a letter"),
        ({"name": "x", "fields": [{"name": "a", "size": 3}]}, "fields.0.size", "no such field"),
        (
            {"name": "x", "fields": [{"name": "a"}, {"name": "a"}]},
            "fields.1.name",
            "Two fields are named 'a'.",
        ),
        ({"name": "x", "fields": [{"name": "a", "type": "select"}]}, "fields.0.choices", "choice"),
        (
            {"name": "x", "fields": [{"name": "n", "type": "number", "min": 5, "max": 1}]},
            "fields.0.min",
            "larger than the maximum",
        ),
        (
            {"name": "x", "honeypot_field": "email", "fields": [{"name": "email"}]},
            "honeypot_field",
            "cannot also be the spam trap",
        ),
        ({"name": "x", "webhook_url": "ftp://example.com/"}, "webhook_url", "http://"),
        ({"name": "x", "webhook_url": "https://nowhere.invalid/"}, "webhook_url", "resolve"),
        ([], "_body", "Send a JSON object."),
        ("Contact", "_body", "Send a JSON object."),
    ],
)
def test_create_form_refuses_bad_input_with_422_per_field(
    client: FlaskClient,
    owner: Owner,
    body: Any,
    field: str,
    message: str,
    resolve_only_local: None,
) -> None:
    fields = error_of(call(client, owner, "POST", "/api/v1/forms", body), 422, "invalid")
    assert field in fields, fields
    assert any(message in text for text in fields[field]), fields[field]
    assert call(client, owner, "GET", "/api/v1/forms").get_json() == {"data": []}


# --- the document's patterns are exactly what the checks behind them accept -------------------


def document_accepts(model: str, key: str, value: Any) -> bool:
    """Whether the served document's schema of ``model.key`` admits ``value`` (judged by
    jsonschema_rs, the validator schemathesis uses)."""
    doc = openapi.openapi_document("http://mailslot.test/api/v1")
    schema = {**doc["components"]["schemas"][model]["properties"][key], **doc["components"]}
    return jsonschema_rs.validator_for(schema, validate_formats=True).is_valid(value)


def api_accepts(model: type[Any], key: str, value: Any) -> bool:
    """Whether the API's wire model accepts ``value`` for ``key`` (pydantic, as the views do)."""
    try:
        model.model_validate({"name": "x", key: value})
    except ValidationError:
        return False
    return True


def test_space_characters_are_what_python_strips() -> None:
    named = re.compile(f"[{openapi.SPACE_CHARACTERS}]")
    everything = [chr(code) for code in range(sys.maxunicode + 1)]
    assert {char for char in everything if named.fullmatch(char)} == {
        char for char in everything if char.isspace()
    }


@given(value=st.text(max_size=12))
@example(value="\x1c")  # str.isspace() is true for the separators \x1c-\x1f; \s in Rust is not
@example(value="\ufeff")  # ECMA-262's \s has it; str.strip() leaves it
@example(value="\x85 x\x00")
def test_a_form_name_is_valid_when_something_is_left_after_strip(value: str) -> None:
    expected = bool(value.strip()) and "\x00" not in value
    assert document_accepts("FormCreate", "name", value) == expected
    assert api_accepts(openapi.FormCreate, "name", value) == expected


@SQLITE_ONLY
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    url=st.from_regex(openapi.HTTP_URL_PATTERN, fullmatch=True).filter(lambda url: len(url) <= 2000)
)
@example(url="https://[::ffff:192.0.2.1]:8443/hook?x=1#y")
@example(url="HTTP://a.b")
@example(url="http://1:65535")
def test_every_url_of_the_pattern_passes_every_check_but_resolution(
    url: str, monkeypatch: pytest.MonkeyPatch, app: Flask
) -> None:
    assert document_accepts("FormCreate", "webhook_url", url)
    assert api_accepts(openapi.FormCreate, "webhook_url", url)
    assert validation.is_http_url(url)
    public = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: public)
    app.extensions["mailslot.settings"].webhook_allow_private = False
    with app.app_context():
        problem = services.check_webhook_url(url)
    # Only the documented rule may refuse it: an address (or localhost) that is not public.
    assert problem is None or "private or reserved" in problem or "loopback" in problem, problem


@settings(max_examples=300)
@given(
    host=st.from_regex(openapi.HOST_PATTERN, fullmatch=True).filter(lambda host: len(host) <= 253)
)
@example(host="LocalHost:1")
def test_every_host_of_the_pattern_is_an_allowed_domain(host: str) -> None:
    assert document_accepts("FormCreate", "allowed_domains", [host])
    assert api_accepts(openapi.FormCreate, "allowed_domains", [host])
    assert validation.parse_allowed_domains(host) == [host.lower()]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("webhook_url", "http://user:secret@example.com/"),  # no credentials in the URL
        ("webhook_url", "https://exämple.com/"),  # international names in the xn-- form
        ("webhook_url", "https://example.com:0/"),
        ("webhook_url", "https://example.com:65536/"),
        ("webhook_url", "https://[::1/"),
        ("webhook_url", "https://[1::2::3]/"),
        ("webhook_url", "https://example.com/a b"),
        ("webhook_url", "https://example.com/\u2028"),
        ("redirect_url", "javascript:alert(1)"),
        ("redirect_url", "//example.com/"),
        ("allowed_domains", ["intranet"]),  # one label: only localhost
        ("allowed_domains", ["example.com/"]),
        ("allowed_domains", ["example.com:99999"]),
        ("honeypot_field", "_next"),
        ("name", " \u3000 "),
    ],
)
def test_the_document_and_the_api_refuse_alike(key: str, value: Any) -> None:
    assert not document_accepts("FormCreate", key, value)
    assert not api_accepts(openapi.FormCreate, key, value) or key == "honeypot_field"


@SQLITE_ONLY
@pytest.mark.parametrize("operation", ["createForm", "updateForm"])
def test_the_rules_json_schema_cannot_state_are_on_the_422_answer(
    client: FlaskClient, operation: str
) -> None:
    doc = client.get("/api/v1/openapi.json").get_json()
    [spec] = [
        spec
        for methods in doc["paths"].values()
        for spec in methods.values()
        if spec["operationId"] == operation
    ]
    described = spec["responses"]["422"]["description"]
    assert all(rule in described for rule in api.FORM_RULES)
    listing = doc["paths"]["/forms/{form_id}/submissions"]["get"]["responses"]["422"]
    assert "Besides the schema" not in listing["description"]


def test_webhook_to_a_private_address_is_refused(
    app: Flask, client: FlaskClient, owner: Owner
) -> None:
    app.extensions["mailslot.settings"].webhook_allow_private = False
    fields = error_of(
        call(
            client,
            owner,
            "POST",
            "/api/v1/forms",
            {"name": "x", "webhook_url": "http://127.0.0.1/"},
        ),
        422,
        "invalid",
    )
    assert "private or reserved" in fields["webhook_url"][0]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": None}, "name"),
        ({"strict": None}, "strict"),
        ({"fields": None}, "fields"),
        ({"status": "archived"}, "status"),
        ({"rotate_webhook_secret": "yes"}, "rotate_webhook_secret"),
        ({"id": "new"}, "id"),
    ],
)
def test_patch_form_refuses_bad_input(
    client: FlaskClient, owner: Owner, body: dict[str, Any], field: str
) -> None:
    form = create_form(client, owner)
    path = f"/api/v1/forms/{form['id']}"
    assert field in error_of(call(client, owner, "PATCH", path, body), 422, "invalid")
    assert call(client, owner, "GET", path).get_json() == {
        key: value for key, value in form.items() if key != "webhook_secret"
    }


def test_patch_refuses_a_honeypot_that_names_a_field(client: FlaskClient, owner: Owner) -> None:
    form = create_form(client, owner, honeypot_field="website")
    path = f"/api/v1/forms/{form['id']}"
    fields = error_of(call(client, owner, "PATCH", path, {"fields": [{"name": "website"}]}), 422)
    assert "cannot also be the spam trap" in fields["fields"][0]
    both = {"fields": [{"name": "website"}], "honeypot_field": "_gotcha"}
    assert call(client, owner, "PATCH", path, both).status_code == 200
    fields = error_of(call(client, owner, "PATCH", path, {"honeypot_field": "website"}), 422)
    assert "cannot also be the spam trap" in fields["honeypot_field"][0]


# --- bodies: 400, 413, 415 --------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b'{"name": ', b"{'name': 'x'}", b'{"name": NaN}', b"\xff\xfe\xfd", b"", b"[" * 100_000],
)
def test_malformed_json_gets_400(client: FlaskClient, owner: Owner, raw: bytes) -> None:
    response = call(
        client,
        owner,
        "POST",
        "/api/v1/forms",
        data=raw,
        headers={"Content-Type": "application/json"},
    )
    error_of(response, 400, "invalid_json")


@pytest.mark.parametrize(
    ("method", "path", "content_type"),
    [
        ("POST", "/api/v1/forms", "application/x-www-form-urlencoded"),
        ("POST", "/api/v1/forms", "text/plain"),
        ("POST", "/api/v1/forms", None),
        ("PATCH", "/api/v1/forms/{form}", "multipart/form-data; boundary=x"),
        ("PATCH", "/api/v1/submissions/{submission}", "text/json"),
    ],
)
def test_non_json_body_gets_415(
    app: Flask,
    client: FlaskClient,
    owner: Owner,
    method: str,
    path: str,
    content_type: str | None,
) -> None:
    form = create_form(client, owner)
    [submission] = store_submissions(app, form["id"], 1)
    headers = {"Content-Type": content_type} if content_type else {}
    response = call(
        client,
        owner,
        method,
        path.format(form=form["id"], submission=submission.public_id),
        data=b'{"name": "x", "is_spam": true}',
        headers=headers,
    )
    error_of(response, 415, "unsupported_media_type")


def test_body_over_the_limit_gets_413(app: Flask, client: FlaskClient, owner: Owner) -> None:
    limit = app.config["MAX_CONTENT_LENGTH"]
    body = json.dumps({"name": "x" * limit}).encode()
    response = call(
        client,
        owner,
        "POST",
        "/api/v1/forms",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    error_of(response, 413, "body_too_large")


# --- 404 and 405 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/forms/doesnotexist"),
        ("GET", "/api/v1/forms/has%20space"),
        ("GET", "/api/v1/forms/nul%00byte"),
        ("DELETE", "/api/v1/forms/doesnotexist"),
        ("GET", "/api/v1/forms/doesnotexist/submissions"),
        ("GET", "/api/v1/submissions/doesnotexist"),
        ("GET", "/api/v1/submissions/doesnotexist/deliveries"),
        ("POST", "/api/v1/submissions/doesnotexist/deliveries/1/replay"),
        ("GET", "/api/v1/no-such-resource"),
        ("GET", "/api/v1/submissions/x/deliveries/abc/replay"),
    ],
)
def test_unknown_objects_and_paths_get_404(
    client: FlaskClient, owner: Owner, method: str, path: str
) -> None:
    error_of(call(client, owner, method, path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/api/v1/forms", {"GET", "POST"}),
        ("DELETE", "/api/v1/forms", {"GET", "POST"}),
        ("POST", "/api/v1/forms/x", {"GET", "PATCH", "DELETE"}),
        ("GET", "/api/v1/submissions/x/deliveries/1/replay", {"POST"}),
        ("POST", "/api/v1/me", {"GET"}),
    ],
)
def test_wrong_method_gets_405_with_allow(
    client: FlaskClient, owner: Owner, method: str, path: str, allowed: set[str]
) -> None:
    response = call(client, owner, method, path)
    error_of(response, 405, "method_not_allowed")
    assert allowed <= {m.strip() for m in response.headers["Allow"].split(",")}


# --- submissions ------------------------------------------------------------------------------


def test_pagination_walks_250_submissions_without_gap_or_duplicate(
    app: Flask, client: FlaskClient, owner: Owner
) -> None:
    form = create_form(client, owner)
    stored = store_submissions(app, form["id"], 250)
    seen: list[str] = []
    sizes = []
    cursor = None
    while True:
        query = {"limit": 100} | ({"cursor": cursor} if cursor else {})
        response = call(
            client, owner, "GET", f"/api/v1/forms/{form['id']}/submissions", query_string=query
        )
        assert response.status_code == 200
        page = response.get_json()
        sizes.append(len(page["data"]))
        seen += [item["id"] for item in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sizes == [100, 100, 50]
    assert seen == [row.public_id for row in reversed(stored)]  # newest first, each once


def test_default_page_size_is_50(app: Flask, client: FlaskClient, owner: Owner) -> None:
    form = create_form(client, owner)
    store_submissions(app, form["id"], 51)
    page = call(client, owner, "GET", f"/api/v1/forms/{form['id']}/submissions").get_json()
    assert len(page["data"]) == 50
    assert page["next_cursor"]


def test_submission_filters(app: Flask, client: FlaskClient, owner: Owner) -> None:
    form = create_form(client, owner)
    old = store_submissions(app, form["id"], 2, data={"message": "old news"})
    time.sleep(0.01)
    spam = store_submissions(app, form["id"], 1, spam=True, data={"message": "cheap pills"})
    time.sleep(0.01)
    new = store_submissions(app, form["id"], 2, data={"message": "Hello Ünïcode"})
    path = f"/api/v1/forms/{form['id']}/submissions"

    def ids(**query: Any) -> list[str]:
        response = call(client, owner, "GET", path, query_string=query)
        assert response.status_code == 200, response.get_data(as_text=True)
        return [item["id"] for item in response.get_json()["data"]]

    def public(rows: list[records.Submission]) -> list[str]:
        return [row.public_id for row in reversed(rows)]

    assert ids() == public(old + spam + new)
    assert ids(spam="true") == public(spam)
    assert ids(spam="false") == public(old + new)
    assert ids(q="ünïcode") == public(new)
    assert ids(q="HELLO ÜN") == public(new)
    assert ids(q="%") == []
    assert ids(since=new[0].created_at.isoformat()) == public(new)
    assert ids(until=spam[0].created_at.isoformat().replace("+00:00", "Z")) == public(old)
    assert ids(since=spam[0].created_at.isoformat(), until=new[0].created_at.isoformat()) == (
        public(spam)
    )


@pytest.fixture
def paged_form(
    app: Flask, client: FlaskClient, owner: Owner
) -> tuple[str, list[records.Submission]]:
    """A form with five stored submissions (their ids in the table, oldest first)."""
    form = create_form(client, owner)
    return form["id"], store_submissions(app, form["id"], 5)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cursor=st.from_regex(openapi.CURSOR_PATTERN, fullmatch=True)
    | st.integers(0, 2**72 - 1).map(api.encode_cursor)
    | st.integers(0, 20).map(api.encode_cursor)
)
@example(cursor=api.encode_cursor(0))
@example(cursor=api.encode_cursor(2**31 - 1))
@example(cursor=api.encode_cursor(2**31))  # past the largest id PostgreSQL can hold
@example(cursor=api.encode_cursor(2**63))  # past the largest id SQLite can hold
@example(cursor="AAAAAAAAAAAA")
@example(cursor="____________")
def test_any_cursor_of_the_documented_pattern_is_a_position(
    client: FlaskClient, owner: Owner, paged_form: tuple[str, list[records.Submission]], cursor: str
) -> None:
    form_id, stored = paged_form
    response = call(
        client,
        owner,
        "GET",
        f"/api/v1/forms/{form_id}/submissions",
        query_string={"cursor": cursor, "limit": 2},
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    before = api.decode_cursor(cursor)
    expected = [row for row in reversed(stored) if row.id < before]
    page = response.get_json()
    assert [item["id"] for item in page["data"]] == [row.public_id for row in expected[:2]]
    assert page["next_cursor"] == (api.encode_cursor(expected[1].id) if expected[2:] else None)


@given(before=st.integers(0, 2**63 - 1))
def test_a_cursor_decodes_to_the_position_it_was_made_for(before: int) -> None:
    cursor = api.encode_cursor(before)
    assert cursor is not None
    assert re.fullmatch(openapi.CURSOR_PATTERN, cursor)
    assert api.decode_cursor(cursor) == before


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"cursor": "garbage!garb"}, "cursor"),
        ({"cursor": "AAAAAAAAAAA"}, "cursor"),  # 11 characters
        ({"cursor": "AAAAAAAAAAAAA"}, "cursor"),  # 13
        ({"cursor": ""}, "cursor"),
        ({"cursor": "AAAAAAAAAAA="}, "cursor"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2024-01-01"}, "since"),
        ({"since": "2024-01-01T00:00:00"}, "since"),  # no time zone
        ({"until": "2024-13-01T00:00:00Z"}, "until"),
        ({"until": "2024-02-30T00:00:00Z"}, "until"),
        ({"until": "2024-01-01T12:00:60Z"}, "until"),  # a leap second only ends a UTC day
        ({"until": "2024-01-01T00:00:00+24:00"}, "until"),
        ({"spam": "yes"}, "spam"),
        ({"q": "x" * 201}, "q"),
        ({"q": " " * 201}, "q"),  # the length is the length sent
    ],
)
def test_bad_submission_query_gets_422(
    client: FlaskClient, owner: Owner, query: dict[str, str], field: str
) -> None:
    form = create_form(client, owner)
    response = call(
        client, owner, "GET", f"/api/v1/forms/{form['id']}/submissions", query_string=query
    )
    assert field in error_of(response, 422, "invalid")


def test_a_whole_number_written_with_a_fraction_is_that_integer(
    app: Flask, client: FlaskClient, owner: Owner
) -> None:
    # JSON Schema's integers include 2.0, so the document admits it and so does the API.
    form = call(client, owner, "POST", "/api/v1/forms", {"name": "x", "retention_days": 2.0})
    assert form.status_code == 201, form.get_data(as_text=True)
    assert form.get_json()["retention_days"] == 2
    store_submissions(app, form.get_json()["id"], 3)
    response = call(
        client,
        owner,
        "GET",
        f"/api/v1/forms/{form.get_json()['id']}/submissions",
        query_string={"limit": "2.0"},
    )
    assert len(response.get_json()["data"]) == 2


@pytest.mark.parametrize(
    ("query", "everything"),
    [
        ({"until": "0001-01-01T00:00:00+01:00"}, False),  # before year 1 in UTC
        ({"until": "0000-01-01T00:00:00Z"}, False),  # year 0 is in RFC 3339
        ({"since": "0000-12-31T23:00:00-02:00"}, True),
        ({"since": "9999-12-31T23:00:00-02:00"}, False),  # after year 9999 in UTC
        ({"until": "9999-12-31T23:59:60Z"}, True),
        ({"since": "1998-12-31T23:59:60Z"}, True),
        ({"since": "2000-01-01t00:00:00.123456789z"}, True),
    ],
)
def test_every_rfc3339_date_time_is_a_bound(
    app: Flask, client: FlaskClient, owner: Owner, query: dict[str, str], everything: bool
) -> None:
    form = create_form(client, owner)
    stored = store_submissions(app, form["id"], 2)
    response = call(
        client, owner, "GET", f"/api/v1/forms/{form['id']}/submissions", query_string=query
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    expected = [row.public_id for row in reversed(stored)] if everything else []
    assert [item["id"] for item in response.get_json()["data"]] == expected


_DATE_TIME = jsonschema_rs.validator_for(
    {"type": "string", "format": "date-time"}, validate_formats=True
)
_DATE_TIME_LIKE = st.builds(
    "{}-{}-{}{}{}:{}:{}{}{}".format,
    st.sampled_from(["0000", "0001", "0400", "1998", "2000", "2024", "2100", "9999", "20x4"]),
    st.sampled_from(["01", "02", "12", "13", "00"]),
    st.sampled_from(["01", "28", "29", "30", "31", "32"]),
    st.sampled_from(["T", "t", " "]),
    st.sampled_from(["00", "22", "23", "24"]),
    st.sampled_from(["00", "58", "59", "60"]),
    st.sampled_from(["00", "59", "60", "61"]),
    st.sampled_from(["", ".1", ".123456789", "."]),
    st.sampled_from(["Z", "z", "+00:00", "-00:00", "+01:00", "-01:00", "+23:59", "+24:00", ""]),
)


@settings(max_examples=500)
@given(text=_DATE_TIME_LIKE | st.text(max_size=30))
@example(text="0000-01-01T00:00:61Z")
def test_the_api_reads_exactly_the_date_times_json_schema_admits(text: str) -> None:
    # jsonschema_rs is the validator schemathesis judges the document's `date-time` with.
    assert (api.parse_rfc3339(text) is not None) == _DATE_TIME.is_valid(text)


def test_get_mark_and_delete_a_submission(
    client: FlaskClient, owner: Owner, delivered: dict[str, Any]
) -> None:
    path = f"/api/v1/submissions/{delivered['submission']}"
    body = call(client, owner, "GET", path).get_json()
    assert body["id"] == delivered["submission"]
    assert body["form_id"] == delivered["form"]["id"]
    assert body["data"] == {"email": "ann@example.org", "message": "Hi"}
    assert body["is_spam"] is False
    marked = call(client, owner, "PATCH", path, {"is_spam": True})
    assert marked.status_code == 200
    assert marked.get_json()["is_spam"] is True
    assert marked.get_json()["spam_reason"] == "marked as spam by the owner"
    unmarked = call(client, owner, "PATCH", path, {"is_spam": False}).get_json()
    assert unmarked["is_spam"] is False
    assert unmarked["spam_reason"] is None
    for bad in ({}, {"is_spam": "true"}, {"is_spam": True, "note": "x"}):
        error_of(call(client, owner, "PATCH", path, bad), 422, "invalid")
    assert call(client, owner, "DELETE", path).status_code == 204
    error_of(call(client, owner, "GET", path), 404, "not_found")


def test_submission_carries_subject_and_reply_to(client: FlaskClient, owner: Owner) -> None:
    form = create_form(client, owner)
    posted = client.post(
        f"/f/{form['id']}",
        json={"message": "Hi", "_subject": "Booking", "_replyto": "ann@example.org"},
    ).get_json()
    body = call(client, owner, "GET", f"/api/v1/submissions/{posted['id']}").get_json()
    assert body["subject"] == "Booking"
    assert body["reply_to"] == "ann@example.org"
    assert body["data"] == {"message": "Hi"}


# --- deliveries -------------------------------------------------------------------------------


def test_replay_a_done_delivery_answers_202_and_sends_again(
    app: Flask,
    client: FlaskClient,
    owner: Owner,
    delivered: dict[str, Any],
    webhook_receiver: WebhookReceiver,
) -> None:
    assert len(webhook_receiver.requests) == 1
    path = (
        f"/api/v1/submissions/{delivered['submission']}/deliveries/"
        f"{delivered['webhook']['id']}/replay"
    )
    response = call(client, owner, "POST", path)
    assert response.status_code == 202
    body = response.get_json()
    assert body["id"] == delivered["webhook"]["id"]
    assert body["kind"] == "webhook"
    assert body["target"] == webhook_receiver.url
    settle_deliveries(app)
    assert len(webhook_receiver.requests) == 2
    # The same message id: the receiver can tell it is a replay of the same event.
    first, second = webhook_receiver.requests
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]


@pytest.mark.parametrize("status", ["pending", "sending", "held"])
def test_replay_of_an_unfinished_delivery_is_a_conflict(
    app: Flask, client: FlaskClient, owner: Owner, delivered: dict[str, Any], status: str
) -> None:
    set_delivery_status(app, delivered["webhook"]["id"], status)
    path = (
        f"/api/v1/submissions/{delivered['submission']}/deliveries/"
        f"{delivered['webhook']['id']}/replay"
    )
    error_of(call(client, owner, "POST", path), 409, "conflict")


def test_replay_of_another_submissions_delivery_is_404(
    app: Flask, client: FlaskClient, owner: Owner, delivered: dict[str, Any]
) -> None:
    [unrelated] = store_submissions(app, delivered["form"]["id"], 1)
    for submission, delivery_id in (
        (unrelated.public_id, delivered["webhook"]["id"]),
        (delivered["submission"], 999_999_999),
    ):
        path = f"/api/v1/submissions/{submission}/deliveries/{delivery_id}/replay"
        error_of(call(client, owner, "POST", path), 404, "not_found")


# --- ownership: owner B sees none of owner A's objects -----------------------------------------

# Every documented operation that names an object, with a body where it needs one.
OBJECT_OPERATIONS = [
    ("GET", "/forms/{form}", None),
    ("PATCH", "/forms/{form}", {"name": "Taken over"}),
    ("DELETE", "/forms/{form}", None),
    ("GET", "/forms/{form}/submissions", None),
    ("GET", "/submissions/{submission}", None),
    ("PATCH", "/submissions/{submission}", {"is_spam": True}),
    ("DELETE", "/submissions/{submission}", None),
    ("GET", "/submissions/{submission}/deliveries", None),
    ("POST", "/submissions/{submission}/deliveries/{delivery}/replay", None),
]


@SQLITE_ONLY
def test_the_ownership_matrix_covers_every_operation(client: FlaskClient) -> None:
    doc = client.get("/api/v1/openapi.json").get_json()
    names = {
        "{form_id}": "{form}",
        "{submission_id}": "{submission}",
        "{delivery_id}": "{delivery}",
    }
    documented = set()
    for path, methods in doc["paths"].items():
        for name, short in names.items():
            path = path.replace(name, short)
        documented |= {(method.upper(), path) for method in methods if "{" in path}
    assert documented == {(method, path) for method, path, _ in OBJECT_OPERATIONS}


@pytest.mark.parametrize(("method", "path", "body"), OBJECT_OPERATIONS)
def test_another_owners_token_gets_404_for_every_object(
    client: FlaskClient,
    owner: Owner,
    other: Owner,
    delivered: dict[str, Any],
    method: str,
    path: str,
    body: Any,
) -> None:
    ids = {
        "form": delivered["form"]["id"],
        "submission": delivered["submission"],
        "delivery": delivered["webhook"]["id"],
    }
    url = "/api/v1" + path.format(**ids)
    error_of(call(client, other, method, url, body), 404, "not_found")
    # Owner A's objects are untouched, and A can still reach each of them.
    form = call(client, owner, "GET", f"/api/v1/forms/{ids['form']}").get_json()
    assert form["name"] == "Contact"
    submission = call(client, owner, "GET", f"/api/v1/submissions/{ids['submission']}").get_json()
    assert submission["is_spam"] is False
    if method == "GET":
        assert call(client, owner, method, url).status_code == 200


def test_another_owners_lists_hold_none_of_the_first_owners_objects(
    app: Flask, client: FlaskClient, owner: Owner, other: Owner, delivered: dict[str, Any]
) -> None:
    assert call(client, other, "GET", "/api/v1/forms").get_json() == {"data": []}
    assert call(client, other, "GET", "/api/v1/me").get_json()["email"] == "b@example.com"
    own = create_form(client, other)
    [own_submission] = store_submissions(app, own["id"], 1)
    listed = call(client, other, "GET", f"/api/v1/forms/{own['id']}/submissions").get_json()
    assert [s["id"] for s in listed["data"]] == [own_submission.public_id]
    # A's delivery cannot be replayed through B's own submission either.
    path = (
        f"/api/v1/submissions/{own_submission.public_id}/deliveries/"
        f"{delivered['webhook']['id']}/replay"
    )
    error_of(call(client, other, "POST", path), 404, "not_found")


# --- the token page -----------------------------------------------------------------------------


@SQLITE_ONLY
def test_token_page_needs_login(client: FlaskClient) -> None:
    response = client.get("/account/tokens")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login")


@SQLITE_ONLY
def test_account_page_links_to_the_token_page(client: FlaskClient, auth: AuthActions) -> None:
    auth.signup()
    assert 'href="/account/tokens"' in client.get("/account").get_data(as_text=True)


@SQLITE_ONLY
def test_create_a_token_on_the_page_shows_it_once(client: FlaskClient, auth: AuthActions) -> None:
    auth.signup()
    page = client.get("/account/tokens").get_data(as_text=True)
    assert "You have no active tokens." in page
    response = post_form(client, "/account/tokens", {"name": "CRM sync"})
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    page = response.get_data(as_text=True)
    tokens = TOKEN_RE.findall(page)
    assert len(set(tokens)) == 1
    token = tokens[0]
    assert "cannot show it again" in page
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.get_json()["token"]["name"] == "CRM sync"
    later = client.get("/account/tokens").get_data(as_text=True)
    assert token not in later
    assert "CRM sync" in later
    assert f"{token[:12]}…" in later


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "Name the token"),
        ("   ", "Name the token"),
        ("x" * 101, "Use at most 100 characters."),
        ("tab\there", "Use printable characters only."),
    ],
)
def test_token_page_refuses_bad_names(
    client: FlaskClient, auth: AuthActions, name: str, message: str
) -> None:
    auth.signup()
    response = post_form(client, "/account/tokens", {"name": name})
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert message in page
    assert not TOKEN_RE.search(page)
    assert "You have no active tokens." in page


@SQLITE_ONLY
def test_token_page_post_needs_the_csrf_token(client: FlaskClient, auth: AuthActions) -> None:
    auth.signup()
    response = client.post("/account/tokens", data={"name": "x"})
    assert response.status_code == 400
    assert not TOKEN_RE.search(response.get_data(as_text=True))


@SQLITE_ONLY
def test_revoke_a_token_on_the_page(app: Flask, client: FlaskClient, auth: AuthActions) -> None:
    auth.signup()
    page = post_form(client, "/account/tokens", {"name": "Old script"}).get_data(as_text=True)
    token = TOKEN_RE.search(page).group(0)  # type: ignore[union-attr]
    token_id = int(re.search(r"/account/tokens/([0-9]+)/revoke", page).group(1))  # type: ignore[union-attr]
    response = post_form(client, f"/account/tokens/{token_id}/revoke", {}, page="/account/tokens")
    assert response.status_code == 302
    assert "Token revoked" in client.get("/account/tokens").get_data(as_text=True)
    assert "Old script" not in client.get("/account/tokens").get_data(as_text=True)
    error_of(
        client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}), 401, "unauthorized"
    )
    again = post_form(client, f"/account/tokens/{token_id}/revoke", {}, page="/account/tokens")
    assert again.status_code == 404


@pytest.mark.parametrize("token_id", ["999999", str(2**31), "9" * 30])
def test_revoking_a_token_that_does_not_exist_is_404(
    client: FlaskClient, auth: AuthActions, token_id: str
) -> None:
    auth.signup()
    response = post_form(client, f"/account/tokens/{token_id}/revoke", {}, page="/account/tokens")
    assert response.status_code == 404


@SQLITE_ONLY
def test_cannot_revoke_another_owners_token(
    app: Flask, client: FlaskClient, auth: AuthActions
) -> None:
    other = make_owner(app, "b@example.com")
    auth.signup()
    response = post_form(
        client, f"/account/tokens/{other.token_id}/revoke", {}, page="/account/tokens"
    )
    assert response.status_code == 404
    assert client.get("/api/v1/me", headers=other.headers).status_code == 200


# --- property: no JSON body makes POST /api/v1/forms fail with 500 ------------------------------

_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
_json = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
_field_specs = st.lists(
    st.fixed_dictionaries(
        {"name": st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,8}", fullmatch=True) | _json},
        optional={
            "type": st.sampled_from(validation.FIELD_TYPES) | _json,
            "label": st.text(max_size=40) | _json,
            "required": st.booleans() | _json,
            "max_length": st.integers(-5, 20_000) | _json,
            "min": st.floats(allow_nan=False, allow_infinity=False) | _json,
            "max": st.floats(allow_nan=False, allow_infinity=False) | _json,
            "choices": st.lists(st.text(max_size=20), max_size=4) | _json,
            "help": st.text(max_size=40) | _json,
        },
    )
    | _json,
    max_size=4,
)
_form_bodies = st.fixed_dictionaries(
    {"name": st.text(max_size=210) | _json},
    optional={
        "fields": _field_specs | _json,
        "strict": st.booleans() | _json,
        "status": st.sampled_from(["active", "paused", "closed"]) | _json,
        "redirect_url": st.sampled_from(["https://example.com/x", "/x", "javascript:x"]) | _json,
        "allowed_domains": st.lists(st.sampled_from(["example.com", "bad host", "a.b:99"])) | _json,
        "honeypot_field": st.sampled_from(["_gotcha", "_next", "x y"]) | _json,
        "notify": st.booleans() | _json,
        "webhook_url": st.sampled_from(["http://localhost:9/h", "https://nowhere.invalid/"])
        | _json,
        "rotate_webhook_secret": _json,
    },
)


@pytest.fixture
def property_client(
    app: Flask, owner: Owner, resolve_only_local: None
) -> tuple[FlaskClient, Owner]:
    """A client and a token for the property test (rate limit out of the way)."""
    app.extensions["mailslot.settings"].api_rate_limit = "1000000/minute"
    return app.test_client(), owner


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.one_of(_form_bodies, _json))
def test_any_json_body_to_create_form_gets_201_or_a_4xx_error(
    property_client: tuple[FlaskClient, Owner], body: Any
) -> None:
    client, who = property_client
    response = call(
        client,
        who,
        "POST",
        "/api/v1/forms",
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    event(f"status {response.status_code}")
    if response.status_code == 201:
        assert response.get_json()["id"]
        return
    assert 400 <= response.status_code < 500, response.get_data(as_text=True)
    error_of(response, response.status_code)

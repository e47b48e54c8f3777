"""The public side: POST /f/<id> from any website, CORS, and the hosted form page."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from markupsafe import escape

import cache
import dal
import intake
import microapp
import records
from conftest import (
    FAST_HASH,
    AuthActions,
    assert_public_envelope,
    csrf_token,
    free_port,
    message_text,
    post_form,
    public_refusal,
    read_outbox,
    settle_deliveries,
)

BASE_URL = "http://mailslot.test"
JSON_ANSWER = {"Accept": "application/json"}
FROM_OK = {"Referer": "https://ok.example/contact"}
CONTACT_FIELDS = [
    {"name": "email", "label": "Your email", "type": "email", "required": True},
    {
        "name": "message",
        "label": "Your message",
        "type": "textarea",
        "required": True,
        "help": "Tell us everything.",
    },
    {"name": "age", "label": "Age", "type": "number", "min": 18, "max": 120},
    {"name": "topic", "label": "Topic", "type": "select", "choices": ["Sales", "Support"]},
]

MakeForm = Callable[..., str]


# --- helpers ----------------------------------------------------------------------------------


class FormMaker:
    """Creates forms for one logged-in owner through the real pages."""

    def __init__(self, client: FlaskClient, app: Flask) -> None:
        self.client = client
        self.app = app

    def __call__(self, fields: list[dict[str, Any]] | None = None, **settings: Any) -> str:
        """A new form (settings as on /forms/new, None = unticked) with ``fields`` saved."""
        data = {
            "name": "Contact",
            "redirect_url": "",
            "allowed_domains": "",
            "notify": "y",
            "status": "active",
            "honeypot_field": "_gotcha",
            **settings,
        }
        response = post_form(
            self.client, "/forms/new", {k: v for k, v in data.items() if v is not None}
        )
        assert response.status_code == 302, response.get_data(as_text=True)
        public_id = response.headers["Location"].rsplit("/", 1)[1]
        if fields:
            builder: dict[str, Any] = {"action": "save"}
            for index, spec in enumerate(fields):
                for key, value in spec.items():
                    if key == "choices":
                        value = "\n".join(value)
                    elif key == "required":
                        value = "y" if value else None
                    if value is not None:
                        builder[f"fields-{index}-{key}"] = str(value)
            path = f"/forms/{public_id}/fields"
            assert post_form(self.client, path, builder).status_code == 302
        return public_id


@pytest.fixture
def make_form(client: FlaskClient, app: Flask, auth: AuthActions) -> MakeForm:
    """Forms of a freshly signed-up owner in this test's own app."""
    auth.signup()
    return FormMaker(client, app)


def _site(tmp_path_factory: pytest.TempPathFactory, **settings: Any) -> Iterator[FormMaker]:
    """One app with a signed-up owner, for a module's table of cases (``settings`` override)."""
    app = microapp.create_app(
        instance_path=str(tmp_path_factory.mktemp("public") / "instance"),
        password_hash_method=FAST_HASH,
        base_url=BASE_URL,
        redis_key_prefix=f"mailslot-test-{uuid.uuid4().hex[:8]}:",
        **settings,
    )
    app.config["TESTING"] = True
    client = app.test_client()
    AuthActions(client, app).signup()
    yield FormMaker(client, app)
    with app.app_context():
        dal.database().engine.dispose()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FormMaker]:
    """One app and owner for tables of cases that each make their own form and look only at it.

    Creating an app per case would dominate the run time; nothing here is read across forms.
    """
    yield from _site(tmp_path_factory)


def stored(app: Flask, public_id: str) -> list[records.Submission]:
    """The form's submissions, oldest first."""
    with app.app_context(), dal.connection() as conn:
        form = dal.form_by_public_id(conn, public_id)
        assert form is not None
        return dal.submission_page(conn, form.id, limit=1000, spam=None)[::-1]


def deliveries(app: Flask) -> list[sa.Row[Any]]:
    """Every submission's outbox row (the owner's account emails are left out)."""
    settle_deliveries(app)
    with app.app_context(), dal.connection() as conn:
        query = dal.deliveries.select().where(dal.deliveries.c.submission_id.is_not(None))
        return list(conn.execute(query.order_by(dal.deliveries.c.id)))


def honeypot_count(app: Flask, public_id: str) -> int:
    """How many posts this form's honeypot trapped."""
    with app.app_context(), dal.connection() as conn:
        form = dal.form_by_public_id(conn, public_id)
        assert form is not None
        return cache.read_counter(f"form:{form.id}:honeypot")


def thanks_url(public_id: str) -> str:
    """Where a browser lands by default."""
    return f"{BASE_URL}/f/{public_id}/thanks"


# --- accepted posts ---------------------------------------------------------------------------


def test_urlencoded_post_is_stored_and_redirects_to_the_thanks_page(
    client: FlaskClient, app: Flask, make_form: MakeForm
) -> None:
    public_id = make_form()
    response = client.post(
        f"/f/{public_id}", data={"name": " Ann ", "email": "ann@example.org", "message": "Hi!"}
    )
    assert response.status_code == 303
    assert response.headers["Location"] == thanks_url(public_id)
    [row] = stored(app, public_id)
    assert row.data == {"name": "Ann", "email": "ann@example.org", "message": "Hi!"}
    assert row.is_spam is False
    assert row.schema_version == 1
    page = client.get(f"/f/{public_id}/thanks")
    assert page.status_code == 200
    assert "Your submission to “Contact” was received." in page.get_data(as_text=True)


def test_multipart_post_without_files_is_stored(shared: FormMaker) -> None:
    public_id = shared()
    response = shared.client.post(
        f"/f/{public_id}",
        data={"name": "Zoë", "message": "multi\r\npart", "empty_file": (io.BytesIO(b""), "")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 303
    [row] = stored(shared.app, public_id)
    assert row.data == {"name": "Zoë", "message": "multi\r\npart"}


def test_json_post_answers_201_with_the_submission_id(shared: FormMaker) -> None:
    public_id = shared()
    response = shared.client.post(
        f"/f/{public_id}", json={"email": "ann@example.org", "count": 3, "ok": True, "none": None}
    )
    assert response.status_code == 201
    assert response.json == {"ok": True, "id": response.json["id"]}
    [row] = stored(shared.app, public_id)
    assert row.public_id == response.json["id"]
    assert row.data == {"email": "ann@example.org", "count": 3, "ok": True, "none": ""}


@pytest.mark.parametrize(
    "headers",
    [{"Accept": "application/json"}, {"X-Requested-With": "XMLHttpRequest"}],
    ids=["accept-json", "xhr"],
)
def test_form_post_from_fetch_answers_201_json(shared: FormMaker, headers: dict[str, str]) -> None:
    public_id = shared()
    response = shared.client.post(f"/f/{public_id}", data={"message": "hi"}, headers=headers)
    assert response.status_code == 201
    assert response.json["ok"] is True
    assert [row.public_id for row in stored(shared.app, public_id)] == [response.json["id"]]


@pytest.mark.parametrize("as_json", [False, True], ids=["urlencoded", "json"])
def test_control_fields_are_not_stored_as_data(shared: FormMaker, as_json: bool) -> None:
    public_id = shared(allowed_domains="ok.example")
    body = {
        "message": "hello",
        "_next": "https://ok.example/merci",
        "_subject": "Quote request",
        "_replyto": "ann@example.org",
        "_gotcha": "",
        "_anything": "else",
    }
    if as_json:
        response = shared.client.post(f"/f/{public_id}", json=body, headers=FROM_OK)
    else:
        response = shared.client.post(f"/f/{public_id}", data=body, headers=FROM_OK)
    assert response.status_code in (201, 303)
    [row] = stored(shared.app, public_id)
    assert row.data == {"message": "hello"}
    assert row.meta == {"subject": "Quote request", "reply_to": "ann@example.org"}


# --- where a browser goes next ----------------------------------------------------------------


def test_browser_post_goes_to_the_forms_redirect_url(shared: FormMaker) -> None:
    public_id = shared(redirect_url="https://example.com/thank-you")
    response = shared.client.post(f"/f/{public_id}", data={"message": "hi"})
    assert response.status_code == 303
    assert response.headers["Location"] == "https://example.com/thank-you"


@pytest.mark.parametrize(
    ("allowed", "referer", "next_url", "target"),
    [
        ("ok.example", "https://ok.example/contact", "https://ok.example/merci", None),
        ("ok.example", "https://ok.example/contact", "/merci?x=1", "https://ok.example/merci?x=1"),
        ("ok.example", "https://ok.example/a/contact", "done", "https://ok.example/a/done"),
        ("ok.example", "", "https://ok.example/merci", None),
        ("", "https://site.example/contact", "https://site.example/merci", None),
        ("", "https://site.example/contact", "/merci", "https://site.example/merci"),
    ],
)
def test_next_is_followed_within_the_trusted_sites(
    shared: FormMaker, allowed: str, referer: str, next_url: str, target: str | None
) -> None:
    public_id = shared(allowed_domains=allowed, redirect_url="https://example.com/fallback")
    headers = {"Referer": referer} if referer else {}
    response = shared.client.post(
        f"/f/{public_id}", data={"message": "hi", "_next": next_url}, headers=headers
    )
    assert response.status_code == 303
    assert response.headers["Location"] == (target or next_url)


HOSTILE_NEXT = [
    "//evil.example",
    "//evil.example/path",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "https://ok.example@evil.example",
    "https://site.example@evil.example/",
    "https://evil.example",
    "https://ok.example.evil.example/",
    "/\\evil.example",
    "\t//evil.example",
    "data:text/html,<script>alert(1)</script>",
]


@pytest.mark.parametrize("next_url", HOSTILE_NEXT)
@pytest.mark.parametrize(
    ("allowed", "referer"),
    [("ok.example", "https://ok.example/contact"), ("", "https://site.example/contact")],
    ids=["allow-list", "empty-list"],
)
def test_next_never_leaves_the_trusted_sites(
    shared: FormMaker, allowed: str, referer: str, next_url: str
) -> None:
    public_id = shared(allowed_domains=allowed)
    response = shared.client.post(
        f"/f/{public_id}", data={"message": "hi", "_next": next_url}, headers={"Referer": referer}
    )
    assert response.status_code == 303
    assert response.headers["Location"] == thanks_url(public_id)


def test_hostile_next_falls_back_to_the_redirect_url(shared: FormMaker) -> None:
    public_id = shared(allowed_domains="ok.example", redirect_url="https://ok.example/thanks")
    response = shared.client.post(
        f"/f/{public_id}", data={"message": "hi", "_next": "//evil.example"}, headers=FROM_OK
    )
    assert response.headers["Location"] == "https://ok.example/thanks"


@pytest.mark.parametrize(
    ("allowed", "posted_from", "next_url", "expected"),
    [
        (["ok.example"], "https://ok.example/c", "https://ok.example/m", "https://ok.example/m"),
        (["ok.example"], "https://ok.example/c", "/m", "https://ok.example/m"),
        (["ok.example"], "https://ok.example/c", "https://OK.example/m", "https://ok.example/m"),
        (["ok.example"], None, "https://ok.example:443/m", "https://ok.example/m"),
        (["ok.example"], None, "https://ok.example:8443/m", None),
        (["ok.example:8443"], None, "https://ok.example:8443/m", "https://ok.example:8443/m"),
        (["ok.example:8443"], None, "https://ok.example/m", None),
        (
            ["xn--bcher-kva.example"],
            None,
            "https://bücher.example/ä",
            "https://xn--bcher-kva.example/%C3%A4",
        ),
        (["ok.example"], None, f"{BASE_URL}/f/x/thanks", f"{BASE_URL}/f/x/thanks"),
        ([], "https://site.example/c", "https://site.example/m", "https://site.example/m"),
        ([], "https://site.example/c", "m", "https://site.example/m"),
        ([], None, "/m", f"{BASE_URL}/m"),
        (["ok.example"], "https://ok.example/c", "//evil.example", None),
        (["ok.example"], "https://ok.example/c", "javascript:alert(1)", None),
        (["ok.example"], "https://ok.example/c", "https://ok.example@evil.example", None),
        (["ok.example"], "https://ok.example/c", "https://ok.example:pw@evil.example", None),
        (["ok.example"], "https://ok.example/c", "https://evil.example", None),
        (["ok.example"], "https://ok.example/c", "https://ok.example.evil.example", None),
        (["ok.example"], "https://ok.example/c", "https://evil.example/?ok.example", None),
        (["ok.example"], "https://ok.example/c", "/\\evil.example", None),
        (["ok.example"], "https://ok.example/c", "https:\\\\evil.example", None),
        (["ok.example"], "https://ok.example/c", "\t//evil.example", None),
        (["ok.example"], "https://ok.example/c", "https://evil.example\n.ok.example", None),
        (["ok.example"], "https://ok.example/c", "ftp://ok.example/file", None),
        (["ok.example"], "https://ok.example/c", "https://ok.example:99999/", None),
        (["ok.example"], "https://ok.example/c", "", None),
        (["ok.example"], "https://ok.example/c", "x" * 2001, None),
        (["ok.example"], "https://site.example/c", "https://site.example/m", None),
        ([], "https://site.example/c", "https://evil.example", None),
        ([], "https://site.example/c", "//evil.example", None),
        ([], "https://site.example/c", "javascript:alert(1)", None),
        ([], "https://site.example/c", "https://site.example@evil.example", None),
        ([], None, "https://anything.example/", None),
    ],
)
def test_safe_redirect_allows_only_trusted_hosts(
    shared: FormMaker,
    allowed: list[str],
    posted_from: str | None,
    next_url: str,
    expected: str | None,
) -> None:
    form = SimpleNamespace(allowed_domains=allowed)
    with shared.app.app_context():
        assert intake.safe_redirect(form, next_url, posted_from) == expected  # type: ignore[arg-type]


def test_setting_changes_apply_to_the_very_next_post(shared: FormMaker) -> None:
    """The public side caches forms; saving settings or fields must not serve the old copy."""
    public_id = shared()
    path = f"/f/{public_id}"
    assert shared.client.post(path, json={"message": "warms the cache"}).status_code == 201
    settings = {"name": "Contact", "notify": "y", "honeypot_field": "_gotcha"}
    post_form(shared.client, f"/forms/{public_id}/settings", {**settings, "status": "paused"})
    assert shared.client.post(path, json={"message": "x"}).status_code == 403
    post_form(
        shared.client,
        f"/forms/{public_id}/settings",
        {**settings, "status": "active", "allowed_domains": "ok.example"},
    )
    evil = {"Origin": "https://evil.example"}
    assert shared.client.post(path, json={"message": "x"}, headers=evil).status_code == 403
    builder = {"action": "save", "fields-0-name": "email", "fields-0-required": "y"}
    post_form(shared.client, f"/forms/{public_id}/fields", builder)
    assert shared.client.post(path, json={"message": "x"}).status_code == 422


# --- refused posts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, {"email": ["This field is required."], "message": ["This field is required."]}),
        (
            {"email": "not-an-email", "message": "hi"},
            {"email": ["Enter a valid email address."]},
        ),
        (
            {"email": "a@example.org", "message": "hi", "age": "12"},
            {"age": ["Use a number of at least 18."]},
        ),
        (
            {"email": "a@example.org", "message": "hi", "topic": "Billing"},
            {"topic": ["Choose one of the listed options."]},
        ),
        (
            {"email": "a@example.org", "message": {"nested": "object"}},
            {"message": ["Send a plain value, not an object or list."]},
        ),
        (
            {"email": "a@example.org", "message": "m" * 10_001},
            {"message": ["Use at most 10000 characters."]},
        ),
        (
            {"email": "a@example.org", **{f"f{i}": "x" for i in range(100)}},
            {"_form": ["Too many fields: at most 100."]},
        ),
    ],
)
def test_invalid_json_post_answers_422_with_errors_per_field(
    shared: FormMaker, body: dict[str, Any], errors: Any
) -> None:
    public_id = shared(fields=CONTACT_FIELDS)
    response = shared.client.post(f"/f/{public_id}", json=body)
    assert response.status_code == 422
    assert response.json == public_refusal(
        "invalid", "Some fields need fixing; see errors.", errors
    )
    assert stored(shared.app, public_id) == []


def test_invalid_browser_post_answers_422_with_a_page_listing_the_errors(shared: FormMaker) -> None:
    public_id = shared(fields=CONTACT_FIELDS)
    response = shared.client.post(f"/f/{public_id}", data={"email": "nope", "age": "old"})
    assert response.status_code == 422
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "Your submission needs fixing" in page
    assert "<strong>email</strong>: Enter a valid email address." in page
    assert "<strong>message</strong>: This field is required." in page
    assert "<strong>age</strong>: Enter a number." in page
    assert stored(shared.app, public_id) == []


def test_strict_form_refuses_fields_it_does_not_name(shared: FormMaker) -> None:
    public_id = shared(fields=CONTACT_FIELDS, strict="y")
    body = {"email": "a@example.org", "message": "hi", "extra": "x"}
    response = shared.client.post(f"/f/{public_id}", json=body)
    assert response.status_code == 422
    assert response.json["errors"] == {"extra": ["This form has no field with this name."]}


def test_lenient_form_keeps_fields_it_does_not_name(shared: FormMaker) -> None:
    public_id = shared(fields=CONTACT_FIELDS)
    body = {"email": "A@Example.ORG", "message": "hi", "extra": "x"}
    assert shared.client.post(f"/f/{public_id}", json=body).status_code == 201
    [row] = stored(shared.app, public_id)
    assert row.data == {"email": "A@example.org", "message": "hi", "extra": "x"}


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "browser"])
def test_unknown_form_is_404(shared: FormMaker, as_json: bool) -> None:
    headers = JSON_ANSWER if as_json else {}
    response = shared.client.post("/f/no-such-form", data={"message": "hi"}, headers=headers)
    assert response.status_code == 404
    message = "There is no form at this address. Check the form's action URL."
    if as_json:
        assert response.json == public_refusal("not_found", message)
    else:
        assert escape(message) in response.get_data(as_text=True)


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "browser"])
def test_paused_form_refuses_submissions(shared: FormMaker, as_json: bool) -> None:
    public_id = shared(status="paused")
    headers = JSON_ANSWER if as_json else {}
    response = shared.client.post(f"/f/{public_id}", data={"message": "hi"}, headers=headers)
    assert response.status_code == 403
    message = "This form is paused and is not accepting submissions."
    if as_json:
        assert response.json == public_refusal("forbidden", message)
    else:
        assert message in response.get_data(as_text=True)
    assert stored(shared.app, public_id) == []


@pytest.mark.parametrize(
    ("allowed", "headers", "accepted"),
    [
        ("ok.example", {"Origin": "https://ok.example"}, True),
        ("ok.example", {"Origin": "http://ok.example:8080"}, True),
        ("ok.example", {"Origin": "https://OK.EXAMPLE"}, True),
        ("ok.example", {"Referer": "https://ok.example/contact"}, True),
        ("ok.example", {"Origin": BASE_URL}, True),
        ("ok.example", {}, True),
        ("ok.example", {"Origin": "https://evil.example"}, False),
        ("ok.example", {"Origin": "https://www.ok.example"}, False),
        ("ok.example", {"Origin": "https://ok.example.evil.example"}, False),
        ("ok.example", {"Referer": "https://evil.example/ok.example"}, False),
        ("ok.example", {"Origin": "null", "Referer": "https://evil.example/"}, False),
        ("ok.example", {"Origin": "https://evil.example", "Referer": "https://ok.example/"}, False),
        ("ok.example:8443", {"Origin": "https://ok.example"}, False),
        ("", {"Origin": "https://anyone.example"}, True),
        ("", {"Referer": "https://anyone.example/page"}, True),
    ],
)
def test_allowed_domains_decide_who_may_post(
    shared: FormMaker, allowed: str, headers: dict[str, str], accepted: bool
) -> None:
    public_id = shared(allowed_domains=allowed)
    response = shared.client.post(
        f"/f/{public_id}", data={"message": "hi"}, headers={**JSON_ANSWER, **headers}
    )
    if accepted:
        assert response.status_code == 201
        assert len(stored(shared.app, public_id)) == 1
    else:
        assert response.status_code == 403
        assert response.json == public_refusal(
            "forbidden", "This form does not accept submissions from this website."
        )
        assert stored(shared.app, public_id) == []


def test_refused_browser_post_gets_an_error_page(shared: FormMaker) -> None:
    public_id = shared(allowed_domains="ok.example")
    response = shared.client.post(
        f"/f/{public_id}", data={"message": "hi"}, headers={"Referer": "https://evil.example/"}
    )
    assert response.status_code == 403
    assert response.mimetype == "text/html"
    assert "This form does not accept submissions from this website." in response.get_data(
        as_text=True
    )


@pytest.mark.parametrize("kind", ["urlencoded", "multipart", "json", "hosted"])
def test_body_over_64_kib_is_refused_with_413(shared: FormMaker, kind: str) -> None:
    public_id = shared()
    big = "x" * (64 * 1024 + 1)
    if kind == "json":
        response = shared.client.post(f"/f/{public_id}", json={"message": big})
    elif kind == "hosted":
        response = _hosted_post(shared.app, public_id, {"email": "a@example.org", "message": big})
    else:
        response = shared.client.post(
            f"/f/{public_id}",
            data={"message": big},
            content_type="multipart/form-data" if kind == "multipart" else None,
            headers=JSON_ANSWER,
        )
    assert response.status_code == 413
    assert stored(shared.app, public_id) == []


def test_body_under_64_kib_is_accepted(shared: FormMaker) -> None:
    public_id = shared()
    body = {f"field{i}": "y" * 10_000 for i in range(6)}
    response = shared.client.post(f"/f/{public_id}", data=body, headers=JSON_ANSWER)
    assert response.status_code == 201
    [row] = stored(shared.app, public_id)
    assert row.data == body


def test_file_part_is_refused_with_415(shared: FormMaker) -> None:
    public_id = shared()
    response = shared.client.post(
        f"/f/{public_id}",
        data={"message": "see attached", "cv": (io.BytesIO(b"%PDF-1.4"), "cv.pdf")},
        content_type="multipart/form-data",
        headers=JSON_ANSWER,
    )
    assert response.status_code == 415
    assert response.json == public_refusal(
        "unsupported_media_type",
        "File uploads are not supported yet. Remove the file field and send again.",
    )
    assert stored(shared.app, public_id) == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", None])
def test_other_content_types_are_refused_with_415(
    shared: FormMaker, content_type: str | None
) -> None:
    public_id = shared()
    headers = {**JSON_ANSWER, **({"Content-Type": content_type} if content_type else {})}
    response = shared.client.post(f"/f/{public_id}", data=b"message=hi", headers=headers)
    assert response.status_code == 415
    assert response.json == public_refusal(
        "unsupported_media_type",
        "Send the form as application/x-www-form-urlencoded, multipart/form-data "
        "or application/json.",
    )
    assert stored(shared.app, public_id) == []


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", '"text"', "", "null", "{'a': 1}"])
def test_malformed_json_is_refused_with_400(shared: FormMaker, body: str) -> None:
    public_id = shared()
    response = shared.client.post(f"/f/{public_id}", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json == public_refusal(
        "bad_request", "The body is not valid JSON. Send a JSON object of fields."
    )
    assert stored(shared.app, public_id) == []


# --- one JSON envelope for every refusal -----------------------------------------------------

AJAX = {"X-Requested-With": "XMLHttpRequest"}


@pytest.fixture(scope="module")
def one_a_minute(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FormMaker]:
    """Like ``shared``, with one submission a minute per address and form."""
    yield from _site(tmp_path_factory, submit_limit_per_ip_minute=1)


def _refused(site: FormMaker, status: int, headers: dict[str, str]) -> Any:
    """A post to the public endpoint that is refused with ``status``."""
    post = site.client.post
    if status == 400:  # a multipart body without its boundary
        return post(f"/f/{site()}", data=b"x", content_type="multipart/form-data", headers=headers)
    if status == 403:
        return post(f"/f/{site(status='paused')}", data={"message": "hi"}, headers=headers)
    if status == 404:
        return post("/f/no-such-form", data={"message": "hi"}, headers=headers)
    if status == 405:
        return site.client.put(f"/f/{site()}", data={"message": "hi"}, headers=headers)
    if status == 413:
        return post(f"/f/{site()}", data={"message": "x" * (64 * 1024 + 1)}, headers=headers)
    if status == 415:
        return post(f"/f/{site()}", data=b"message=hi", content_type="text/plain", headers=headers)
    if status == 422:
        public_id = site(fields=CONTACT_FIELDS)
        return post(f"/f/{public_id}", data={"email": "nope"}, headers=headers)
    public_id = site()
    assert post(f"/f/{public_id}", data={"message": "hi"}, headers=headers).status_code < 400
    return post(f"/f/{public_id}", data={"message": "again"}, headers=headers)


@pytest.mark.parametrize("headers", [JSON_ANSWER, AJAX], ids=["accept-json", "ajax"])
@pytest.mark.parametrize("status", [400, 403, 404, 405, 413, 415, 422, 429])
def test_every_refusal_of_the_endpoint_has_the_one_json_envelope(
    one_a_minute: FormMaker, status: int, headers: dict[str, str]
) -> None:
    response = _refused(one_a_minute, status, headers)
    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert_public_envelope(response)
    if status == 405:
        assert "POST" in response.headers["Allow"]
    if status == 429:
        assert int(response.headers["Retry-After"]) > 0


def test_an_address_that_is_no_form_id_gets_the_envelope_too(shared: FormMaker) -> None:
    response = shared.client.post("/f/not.an.id", data={"message": "hi"}, headers=JSON_ANSWER)
    assert response.json == public_refusal("not_found", "There is nothing at this address.")


def test_422_names_each_field_in_errors_and_says_why_in_error(shared: FormMaker) -> None:
    public_id = shared(fields=CONTACT_FIELDS)
    response = shared.client.post(f"/f/{public_id}", data={"email": "nope"}, headers=AJAX)
    assert response.status_code == 422
    assert response.json["error"] == {
        "code": "invalid",
        "message": "Some fields need fixing; see errors.",
    }
    assert response.json["errors"]["email"] == ["Enter a valid email address."]


def test_a_database_outage_is_503_in_the_envelope_and_a_page(overrides: dict[str, Any]) -> None:
    # The answer's own headers (CORS, the hosted page's frame-ancestors) need the form too: with
    # the database down they answer as for an unknown form instead of failing with a 500.
    app = microapp.create_app(
        **overrides, database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    )
    visitor = app.test_client()
    origin = {"Origin": "https://site.example"}
    response = visitor.post("/f/any-form", json={"message": "hi"}, headers=origin)
    assert response.status_code == 503
    assert response.json == public_refusal(
        "service_unavailable", "The database is unavailable; nothing was saved. Try again."
    )
    assert response.headers["Access-Control-Allow-Origin"] == "*"  # as for an unknown form
    for path in ("/f/any-form", "/f/any-form/thanks"):
        page = visitor.get(path)
        assert (page.status_code, page.mimetype) == (503, "text/html")
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]


def test_browsers_still_get_pages_for_every_refusal(one_a_minute: FormMaker) -> None:
    for status in (400, 403, 404, 405, 413, 415, 429):
        response = _refused(one_a_minute, status, {"Accept": "text/html"})
        assert (response.status_code, response.mimetype) == (status, "text/html")


# --- the honeypot -----------------------------------------------------------------------------


def test_filled_honeypot_looks_like_success_but_stores_nothing(
    client: FlaskClient, app: Flask, make_form: MakeForm, auth: AuthActions
) -> None:
    auth.confirm()
    public_id = make_form(redirect_url="https://example.com/thanks")
    human = client.post(f"/f/{public_id}", data={"message": "hi"})
    bot = client.post(f"/f/{public_id}", data={"message": "buy", "_gotcha": "http://spam"})
    assert (bot.status_code, bot.headers["Location"]) == (
        human.status_code,
        human.headers["Location"],
    )
    bot_json = client.post(f"/f/{public_id}", json={"message": "buy", "_gotcha": "x"})
    assert bot_json.status_code == 201
    assert bot_json.json["ok"] is True
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", bot_json.json["id"])
    assert [row.data for row in stored(app, public_id)] == [{"message": "hi"}]
    assert len(deliveries(app)) == 1  # the human's notification only
    assert len(read_outbox(app)) == 2  # confirmation + the human's notification
    assert honeypot_count(app, public_id) == 2


def test_custom_honeypot_field_is_the_trap(shared: FormMaker) -> None:
    public_id = shared(honeypot_field="website_url")
    trapped = shared.client.post(f"/f/{public_id}", data={"message": "buy", "website_url": "x"})
    assert trapped.status_code == 303
    kept = shared.client.post(
        f"/f/{public_id}", data={"message": "hi", "website_url": "", "_gotcha": "x"}
    )
    assert kept.status_code == 303
    assert [row.data for row in stored(shared.app, public_id)] == [{"message": "hi"}]
    assert honeypot_count(shared.app, public_id) == 1


def test_blank_honeypot_is_not_a_trap(shared: FormMaker) -> None:
    public_id = shared()
    shared.client.post(f"/f/{public_id}", data={"message": "hi", "_gotcha": "   "})
    assert len(stored(shared.app, public_id)) == 1
    assert honeypot_count(shared.app, public_id) == 0


# --- CORS -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "origin", "allow_origin"),
    [
        ("", "https://anyone.example", "*"),
        ("ok.example", "https://ok.example", "https://ok.example"),
        ("ok.example\nshop.example", "https://shop.example", "https://shop.example"),
        ("ok.example", "https://evil.example", None),
        ("ok.example", None, None),
    ],
)
def test_cors_preflight_answers_allowed_origins(
    shared: FormMaker, allowed: str, origin: str | None, allow_origin: Any
) -> None:
    public_id = shared(allowed_domains=allowed)
    headers = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    if origin:
        headers["Origin"] = origin
    response = shared.client.options(f"/f/{public_id}", headers=headers)
    assert response.status_code == 204
    assert response.headers.get("Access-Control-Allow-Origin") == allow_origin
    assert response.headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    assert "Content-Type" in response.headers["Access-Control-Allow-Headers"]
    assert "Accept" in response.headers["Access-Control-Allow-Headers"]
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in response.headers["Vary"]


@pytest.mark.parametrize(
    ("allowed", "origin", "allow_origin"),
    [
        ("", "https://anyone.example", "*"),
        ("ok.example", "https://ok.example", "https://ok.example"),
    ],
)
def test_answers_to_allowed_origins_carry_the_cors_header(
    shared: FormMaker, allowed: str, origin: str, allow_origin: str
) -> None:
    public_id = shared(allowed_domains=allowed)
    accepted = shared.client.post(
        f"/f/{public_id}", data={"message": "hi"}, headers={"Origin": origin}
    )
    invalid = shared.client.post(f"/f/{public_id}", json=[], headers={"Origin": origin})
    assert accepted.headers["Access-Control-Allow-Origin"] == allow_origin
    assert invalid.status_code == 400
    assert invalid.headers["Access-Control-Allow-Origin"] == allow_origin
    assert "Origin" in accepted.headers["Vary"]


def test_refused_origin_is_not_given_a_cors_header(shared: FormMaker) -> None:
    """Only the allowed domains may read answers once the owner lists any."""
    public_id = shared(allowed_domains="ok.example")
    response = shared.client.post(
        f"/f/{public_id}",
        data={"message": "hi"},
        headers={**JSON_ANSWER, "Origin": "https://evil.example"},
    )
    assert response.status_code == 403
    assert "Access-Control-Allow-Origin" not in response.headers


# --- the hosted page --------------------------------------------------------------------------


def _field_block(page: str, name: str) -> str:
    """The <div class="field"> that holds the control named ``name``."""
    for block in re.findall(r'<div class="field[^"]*">.*?</div>', page, re.S):
        if f'name="{name}"' in block:
            return block
    raise AssertionError(f"no field {name!r} on the page")


def test_hosted_page_shows_labels_help_and_controls_from_the_schema(shared: FormMaker) -> None:
    public_id = shared(fields=CONTACT_FIELDS, name="Support request")
    response = shared.app.test_client().get(f"/f/{public_id}")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "<h1>Support request</h1>" in page
    assert f'action="/f/{public_id}/page"' in page
    assert '<label for="email">Your email</label>' in _field_block(page, "email")
    message = _field_block(page, "message")
    assert '<label for="message">Your message</label>' in message
    assert '<p class="hint" id="message-hint">Tell us everything.</p>' in message
    assert 'aria-describedby="message-hint"' in message
    assert re.search(r'<input[^>]*max="120"[^>]*min="18"[^>]*name="age"[^>]*type="number"', page)
    assert '<option value="Sales">Sales</option>' in _field_block(page, "topic")
    assert re.search(r'<input[^>]*name="_gotcha"[^>]*tabindex="-1"', page)
    assert "message</textarea>" not in page


def test_hosted_page_marks_required_fields_for_browsers(shared: FormMaker) -> None:
    public_id = shared(fields=CONTACT_FIELDS)
    page = shared.app.test_client().get(f"/f/{public_id}").get_data(as_text=True)
    assert re.search(r"<input[^>]*name=\"email\"[^>]*required", page)
    assert re.search(r"<textarea[^>]*name=\"message\"[^>]*required", page)
    assert not re.search(r"<input[^>]*name=\"age\"[^>]*required", page)


def test_hosted_page_shows_a_visible_marker_on_required_labels(shared: FormMaker) -> None:
    """Like the owner's pages, a required field's label carries the * marker."""
    public_id = shared(fields=CONTACT_FIELDS)
    page = shared.app.test_client().get(f"/f/{public_id}").get_data(as_text=True)
    marker = '<span class="required" aria-hidden="true">*</span>'
    assert marker in _field_block(page, "email")
    assert marker in _field_block(page, "message")
    assert marker not in _field_block(page, "age")


def test_hosted_page_of_an_empty_schema_shows_name_email_and_message(shared: FormMaker) -> None:
    public_id = shared()
    page = shared.app.test_client().get(f"/f/{public_id}").get_data(as_text=True)
    assert '<label for="name">Name</label>' in page
    assert '<label for="email">Email</label>' in page
    assert '<label for="message">Message</label>' in page
    assert re.search(r'<input[^>]*name="email"[^>]*type="email"', page)
    assert re.search(r"<textarea[^>]*name=\"message\"[^>]*required", page)


def test_hosted_page_carries_a_csrf_token(shared: FormMaker) -> None:
    """The page posts to /f/<id>/page, which is CSRF-protected: the token must be on the page."""
    public_id = shared()
    visitor = shared.app.test_client()
    token = csrf_token(visitor, f"/f/{public_id}")
    response = visitor.post(
        f"/f/{public_id}/page",
        data={"email": "ann@example.org", "message": "hi", "csrf_token": token},
    )
    assert response.status_code == 303


def _hosted_post(app: Flask, public_id: str, data: dict[str, str]) -> Any:
    """Fill in the hosted page as a fresh visitor: the page's own CSRF token goes along."""
    return post_form(app.test_client(), f"/f/{public_id}/page", data, page=f"/f/{public_id}")


def test_hosted_post_with_a_missing_required_field_shows_the_message_beside_it(
    shared: FormMaker,
) -> None:
    public_id = shared(fields=CONTACT_FIELDS)
    response = _hosted_post(
        shared.app, public_id, {"email": "", "message": "Hello there", "age": "30"}
    )
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert "Some answers need fixing" in page
    email = _field_block(page, "email")
    assert 'aria-invalid="true"' in email
    assert 'aria-describedby="email-error"' in email
    assert '<p class="error" id="email-error">This field is required.</p>' in email
    message = _field_block(page, "message")
    assert 'aria-invalid="false"' in message
    assert "Hello there</textarea>" in message  # what was typed survives
    assert 'value="30"' in _field_block(page, "age")
    assert stored(shared.app, public_id) == []


def test_hosted_post_shows_each_fields_own_message(shared: FormMaker) -> None:
    public_id = shared(fields=CONTACT_FIELDS)
    response = _hosted_post(
        shared.app, public_id, {"email": "nope", "message": "", "age": "7", "topic": "Sales"}
    )
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert 'id="email-error">Enter a valid email address.</p>' in page
    assert 'aria-describedby="message-hint message-error"' in _field_block(page, "message")
    assert 'id="message-error">This field is required.</p>' in page
    assert 'id="age-error">Use a number of at least 18.</p>' in page
    assert "topic-error" not in page


def test_hosted_post_after_fixing_lands_on_the_thanks_page(shared: FormMaker) -> None:
    public_id = shared(fields=CONTACT_FIELDS)
    assert _hosted_post(shared.app, public_id, {"email": "", "message": "hi"}).status_code == 422
    response = _hosted_post(
        shared.app, public_id, {"email": "ann@example.org", "message": "hi", "_gotcha": ""}
    )
    assert response.status_code == 303
    assert response.headers["Location"] == thanks_url(public_id)
    [row] = stored(shared.app, public_id)
    assert row.data == {"email": "ann@example.org", "message": "hi"}


def test_hosted_post_with_a_filled_honeypot_stores_nothing(shared: FormMaker) -> None:
    public_id = shared()
    response = _hosted_post(
        shared.app, public_id, {"email": "a@example.org", "message": "hi", "_gotcha": "bot"}
    )
    assert response.status_code == 303
    assert stored(shared.app, public_id) == []
    assert honeypot_count(shared.app, public_id) == 1


@pytest.mark.parametrize("token", [None, "forged"])
def test_hosted_post_without_a_valid_csrf_token_is_refused(
    shared: FormMaker, token: str | None
) -> None:
    public_id = shared()
    visitor = shared.app.test_client()
    visitor.get(f"/f/{public_id}")
    data = {"email": "ann@example.org", "message": "hi"}
    if token:
        data["csrf_token"] = token
    response = visitor.post(f"/f/{public_id}/page", data=data)
    assert response.status_code == 400
    assert stored(shared.app, public_id) == []


def test_hosted_page_of_a_paused_form_says_so_and_refuses_posts(shared: FormMaker) -> None:
    public_id = shared(status="paused")
    page = shared.app.test_client().get(f"/f/{public_id}").get_data(as_text=True)
    assert "This form is paused and is not accepting submissions right now." in page
    assert "<form" not in page
    # A tab opened before the pause still posts; its session token is still valid.
    visitor = shared.app.test_client()
    token = csrf_token(visitor, "/login")
    response = visitor.post(
        f"/f/{public_id}/page",
        data={"email": "ann@example.org", "message": "hi", "csrf_token": token},
    )
    assert response.status_code == 403
    assert "This form is paused" in response.get_data(as_text=True)
    assert stored(shared.app, public_id) == []


@pytest.mark.parametrize("path", ["/f/nope", "/f/nope/thanks"])
def test_hosted_pages_of_an_unknown_form_are_404(shared: FormMaker, path: str) -> None:
    response = shared.client.get(path)
    assert response.status_code == 404
    assert "There is no form at this address." in response.get_data(as_text=True)


# --- what is stored, and who is told ----------------------------------------------------------


def test_submission_stores_a_salted_ip_hash_and_never_the_ip(shared: FormMaker) -> None:
    public_id = shared()
    for ip in ("203.0.113.7", "203.0.113.7", "198.51.100.2"):
        response = shared.client.post(
            f"/f/{public_id}",
            data={"message": "hi"},
            headers={"User-Agent": "Agent/1.0", "Referer": "https://site.example/p"},
            environ_base={"REMOTE_ADDR": ip},
        )
        assert response.status_code == 303
    first, second, third = stored(shared.app, public_id)
    assert re.fullmatch(r"[0-9a-f]{32}", first.ip_hash)
    assert first.ip_hash == second.ip_hash != third.ip_hash
    unsalted = hashlib.sha256(b"203.0.113.7").hexdigest()
    assert first.ip_hash not in unsalted
    for row in (first, second, third):
        text = json.dumps({k: str(v) for k, v in dataclasses.asdict(row).items()})
        assert "203.0.113.7" not in text
        assert "198.51.100.2" not in text
    assert (first.user_agent, first.referrer) == ("Agent/1.0", "https://site.example/p")


def test_notification_email_uses_the_subject_and_reply_to(
    client: FlaskClient, app: Flask, make_form: MakeForm, auth: AuthActions
) -> None:
    auth.confirm()
    public_id = make_form(name="Contact")
    response = client.post(
        f"/f/{public_id}",
        data={
            "name": "Ann",
            "message": "Call me",
            "_subject": "Quote request",
            "_replyto": "ann@example.org",
        },
    )
    assert response.status_code == 303
    [delivery] = deliveries(app)
    assert (delivery.kind, delivery.target, delivery.status) == (
        "email",
        "owner@example.com",
        "done",
    )
    _confirmation, notification = read_outbox(app)
    assert notification["To"] == "owner@example.com"
    assert notification["Subject"] == "Quote request"
    assert notification["Reply-To"] == "ann@example.org"
    text = message_text(notification)
    assert "name: Ann" in text
    assert "message: Call me" in text
    [row] = stored(app, public_id)
    assert f"/forms/{public_id}/submissions/{row.public_id}" in text


def test_notification_subject_defaults_to_the_form_name_and_stays_one_line(
    client: FlaskClient, app: Flask, make_form: MakeForm, auth: AuthActions
) -> None:
    auth.confirm()
    public_id = make_form(name="Bookings")
    client.post(f"/f/{public_id}", data={"email": "guest@example.org", "message": "hi"})
    settle_deliveries(app)  # the outbox is read in the order the deliveries ran
    client.post(
        f"/f/{public_id}", data={"message": "hi", "_subject": "Hi\r\nBcc: victim@example.org"}
    )
    _, plain, injected = read_outbox(app)
    assert plain["Subject"] == "New submission: Bookings"
    assert plain["Reply-To"] == "guest@example.org"  # an `email` field stands in for _replyto
    assert injected["Bcc"] is None
    assert "\n" not in injected["Subject"]
    assert "victim@example.org" in injected["Subject"]


@pytest.mark.parametrize(
    ("confirm", "notify"), [(False, "y"), (True, None)], ids=["unconfirmed", "notify-off"]
)
def test_no_email_unless_notify_is_on_and_the_address_confirmed(
    client: FlaskClient,
    app: Flask,
    make_form: MakeForm,
    auth: AuthActions,
    confirm: bool,
    notify: str | None,
) -> None:
    if confirm:
        auth.confirm()
    public_id = make_form(notify=notify)
    assert client.post(f"/f/{public_id}", data={"message": "hi"}).status_code == 303
    assert len(stored(app, public_id)) == 1
    assert deliveries(app) == []
    assert [m["Subject"] for m in read_outbox(app)] == ["Confirm your Mailslot address"]

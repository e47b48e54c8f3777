"""Hostile text in form names, field names, values and headers never becomes markup.

Every page that shows submitter- or owner-typed text is checked twice: the dangerous fragment is
absent, and the escaped text is present (so the check cannot pass because nothing was shown).
"""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from markupsafe import escape

import dal
import microapp
from conftest import FAST_HASH, AuthActions, post_form, read_outbox

# payload -> fragments that would be live markup if the payload were not escaped
PAYLOADS: dict[str, list[str]] = {
    "<script>alert(1)</script>": ["<script>alert(1)"],
    '"><img src=x onerror=alert(1)>': ["<img src=x", '"><img'],
    "javascript:alert(1)": [],
    "</textarea><svg onload=alert(1)>": ["<svg onload", "</textarea><svg"],
    "{{7*7}}": [],
}
IDS = ["script", "attribute-break", "javascript-url", "textarea-break", "template"]
_URL_ATTRIBUTE = re.compile(r"""(?:href|src|action|formaction)\s*=\s*["']?\s*javascript:""", re.I)


def assert_inert(page: str, payload: str, *, shown: bool = True) -> None:
    """``payload`` is on the page only as escaped text."""
    for fragment in PAYLOADS[payload]:
        assert fragment not in page
    assert not _URL_ATTRIBUTE.search(page)
    if shown:
        assert str(escape(payload)) in page


@dataclass
class Shared:
    """An app and a client logged in as its confirmed owner (confirmed: notifications are sent)."""

    app: Flask
    client: FlaskClient


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One app for the module: every test makes its own form and reads only that form's pages."""
    app = microapp.create_app(
        instance_path=str(tmp_path_factory.mktemp("xss") / "instance"),
        password_hash_method=FAST_HASH,
        base_url="http://mailslot.test",
        redis_key_prefix=f"mailslot-test-{uuid.uuid4().hex[:8]}:",
    )
    app.config["TESTING"] = True
    client = app.test_client()
    owner = AuthActions(client, app)
    owner.signup()
    owner.confirm()
    yield Shared(app, client)
    with app.app_context():
        dal.database().engine.dispose()


def create_form(client: FlaskClient, name: str, **values: str) -> str:
    """A form made through /forms/new; its public id."""
    data = {"name": name, "notify": "y", "status": "active", "honeypot_field": "_gotcha"}
    response = post_form(client, "/forms/new", {**data, **values})
    assert response.status_code == 302, response.get_data(as_text=True)
    return response.headers["Location"].rsplit("/", 1)[1]


def save_fields(client: FlaskClient, public_id: str, rows: list[dict[str, str]]) -> Any:
    """Press "Save fields" in the builder with these rows."""
    data: dict[str, str] = {"action": "save"}
    for index, row in enumerate(rows):
        for key, value in row.items():
            data[f"fields-{index}-{key}"] = value
    return post_form(client, f"/forms/{public_id}/fields", data)


@pytest.mark.parametrize("payload", list(PAYLOADS), ids=IDS)
def test_hostile_text_is_escaped_on_every_owner_page(shared: Shared, payload: str) -> None:
    public_id = create_form(shared.client, payload)
    response = shared.client.post(
        f"/f/{public_id}",
        data={payload: payload, "message": payload, "_subject": payload, "_replyto": payload},
        headers={
            "Accept": "application/json",
            "User-Agent": payload,
            "Referer": f"https://site.example/{payload}",
        },
    )
    assert response.status_code == 201
    submission = response.json["id"]
    pages = {
        "/forms": {"shown": True},
        f"/forms/{public_id}": {"shown": True},
        f"/forms/{public_id}/submissions/{submission}": {"shown": True},
        f"/forms/{public_id}/settings": {"shown": True},
        f"/forms/{public_id}/fields": {"shown": True},
        f"/forms/{public_id}/delete": {"shown": True},
        f"/f/{public_id}": {"shown": True},
        f"/f/{public_id}/thanks": {"shown": True},
    }
    for path, options in pages.items():
        page = shared.client.get(path).get_data(as_text=True)
        assert_inert(page, payload, **options)
    detail = shared.client.get(f"/forms/{public_id}/submissions/{submission}").get_data(
        as_text=True
    )
    escaped = str(escape(payload))
    assert f'<dt>{escaped}</dt><dd class="value">{escaped}</dd>' in detail
    assert f"<dt>Browser</dt><dd>{escaped}</dd>" in detail
    assert f"<dt>Subject</dt><dd>{escaped}</dd>" in detail
    inbox = shared.client.get(f"/forms/{public_id}").get_data(as_text=True)
    assert f'<th scope="col">{escaped}</th>' in inbox
    assert f"<td>{escaped}</td>" in inbox


@pytest.mark.parametrize("payload", list(PAYLOADS), ids=IDS)
def test_hostile_text_is_escaped_in_the_notification_email(shared: Shared, payload: str) -> None:
    public_id = create_form(shared.client, payload)
    shared.client.post(f"/f/{public_id}", data={payload: payload})
    notification = read_outbox(shared.app)[-1]
    html_part = notification.get_body(preferencelist=("html",))
    assert html_part is not None
    body = html_part.get_content()
    assert_inert(body, payload)
    assert f'<th align="left">{escape(payload)}</th><td>{escape(payload)}</td>' in body


@pytest.mark.parametrize("payload", list(PAYLOADS), ids=IDS)
def test_hostile_text_survives_the_exports_as_plain_data(shared: Shared, payload: str) -> None:
    public_id = create_form(shared.client, payload)
    shared.client.post(f"/f/{public_id}", data={payload: payload, "message": f"say {payload}"})

    exported = json.loads(
        shared.client.get(f"/forms/{public_id}/export.json").get_data(as_text=True)
    )
    assert [item["data"] for item in exported] == [{payload: payload, "message": f"say {payload}"}]

    text = shared.client.get(f"/forms/{public_id}/export.csv").get_data().decode("utf-8-sig")
    header, record = list(csv.reader(io.StringIO(text, newline="")))
    row = dict(zip(header, record, strict=True))
    assert row[payload] == payload
    assert row["message"] == f"say {payload}"


def test_search_text_is_escaped_when_shown_back(shared: Shared) -> None:
    public_id = create_form(shared.client, "Contact")
    for payload in PAYLOADS:
        page = shared.client.get(f"/forms/{public_id}", query_string={"q": payload}).get_data(
            as_text=True
        )
        assert_inert(page, payload)
        assert f'value="{escape(payload)}"' in page


def test_hostile_labels_help_and_choices_are_escaped(shared: Shared) -> None:
    public_id = create_form(shared.client, "Contact")
    rows = [
        {"name": f"f{i}", "label": payload, "help": payload, "type": "select", "choices": payload}
        for i, payload in enumerate(PAYLOADS)
    ]
    assert save_fields(shared.client, public_id, rows).status_code == 302
    for path in (f"/f/{public_id}", f"/forms/{public_id}/fields", f"/forms/{public_id}"):
        page = shared.client.get(path).get_data(as_text=True)
        for payload in PAYLOADS:
            assert_inert(page, payload, shown=path != f"/forms/{public_id}")
    install = shared.client.get(f"/forms/{public_id}").get_data(as_text=True)
    for payload in PAYLOADS:  # the snippet is escaped once as HTML code and once as page text
        assert str(escape(str(escape(payload)))) in install


def test_hostile_builder_input_is_escaped_when_the_page_comes_back_with_errors(
    shared: Shared,
) -> None:
    public_id = create_form(shared.client, "Contact")
    rows = [
        {"name": payload, "label": payload, "help": payload, "choices": payload}
        for payload in PAYLOADS
    ]
    response = save_fields(shared.client, public_id, rows)
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    for payload in PAYLOADS:
        assert_inert(page, payload)


@pytest.mark.parametrize("payload", list(PAYLOADS), ids=IDS)
def test_hostile_field_names_are_escaped_on_the_error_pages(shared: Shared, payload: str) -> None:
    public_id = create_form(shared.client, "Strict", strict="y")
    assert (
        save_fields(shared.client, public_id, [{"name": "email", "type": "email"}]).status_code
        == 302
    )

    response = shared.client.post(f"/f/{public_id}", data={"email": "a@example.org", payload: "x"})
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert_inert(page, payload)
    assert f"<strong>{escape(payload)}</strong>: This form has no field with this name." in page

    hosted = post_form(
        shared.app.test_client(),
        f"/f/{public_id}/page",
        {"email": "a@example.org", payload: "x"},
        page=f"/f/{public_id}",
    )
    assert hosted.status_code == 422
    assert_inert(hosted.get_data(as_text=True), payload)

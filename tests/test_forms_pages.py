"""The owner's form pages: list, settings, field builder, inbox, detail, exports, delete.

Tests that exercise SQL (counts, paging, search, spam, exports, deletes, the cross-owner matrix)
run on SQLite and, when MAILSLOT_TEST_DATABASE_URL is set, on PostgreSQL. Tables of page and
validation cases share one SQLite app (the ``shared`` fixture), each case with its own form.
"""

from __future__ import annotations

import csv
import html
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
import records
import services
from conftest import FAST_HASH, AuthActions, csrf_token, post_form, settle_deliveries

BASE_URL = "http://mailslot.test"
SETTINGS_DEFAULTS = {
    "name": "Contact",
    "redirect_url": "",
    "allowed_domains": "",
    "notify": "y",
    "status": "active",
    "honeypot_field": "_gotcha",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Run this module on both databases."""
    return request.param


# For tests that need a fresh app but where the database plays no part.
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"])


# --- helpers ----------------------------------------------------------------------------------


def create_form(client: FlaskClient, **values: Any) -> str:
    """Create a form through /forms/new; its public id. ``None`` leaves a box unticked."""
    data = {**SETTINGS_DEFAULTS, **values}
    response = post_form(client, "/forms/new", {k: v for k, v in data.items() if v is not None})
    assert response.status_code == 302, response.get_data(as_text=True)
    return response.headers["Location"].rsplit("/", 1)[1]


def form_row(app: Flask, public_id: str) -> records.Form | None:
    """The stored form, whoever owns it."""
    with app.app_context(), dal.connection() as conn:
        return dal.form_by_public_id(conn, public_id)


def submission_rows(app: Flask, public_id: str) -> list[records.Submission]:
    """Every submission of a form (spam too), newest first."""
    form = form_row(app, public_id)
    assert form is not None
    with app.app_context(), dal.connection() as conn:
        return dal.submission_page(conn, form.id, limit=10_000, spam=None)


def insert_submissions(
    app: Flask, public_id: str, items: list[dict[str, Any]]
) -> list[records.Submission]:
    """Store submissions directly, oldest first (faster than posting hundreds)."""
    form = form_row(app, public_id)
    assert form is not None
    with app.app_context(), dal.transaction() as conn:
        return [
            dal.insert_submission(
                conn,
                {
                    "public_id": dal.new_public_id(),
                    "form_id": form.id,
                    "data": data,
                    "schema_version": form.schema_version,
                    "is_spam": False,
                },
            )
            for data in items
        ]


def submit(client: FlaskClient, public_id: str, data: dict[str, Any]) -> str:
    """Post to the public endpoint as a fetch() client; the new submission's id."""
    response = client.post(f"/f/{public_id}", data=data, headers={"Accept": "application/json"})
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.json["id"]


def inbox_ids(page: str) -> list[str]:
    """Submission ids linked from an inbox page, in page order."""
    return re.findall(r"/submissions/([A-Za-z0-9_-]+)\"", page)


def builder_names(page: str) -> list[str]:
    """The field names in the builder's rows, in row order."""
    rows = re.findall(r'<input[^>]*name="fields-(\d+)-name"[^>]*value="([^"]*)"', page)
    assert [int(i) for i, _ in rows] == list(range(len(rows)))
    return [html.unescape(value) for _, value in rows]


def builder_data(rows: list[dict[str, Any]], action: str) -> dict[str, Any]:
    """The builder's POST body for ``rows`` and the pressed button."""
    data: dict[str, Any] = {"action": action}
    for index, row in enumerate(rows):
        for key, value in row.items():
            data[f"fields-{index}-{key}"] = value
    return data


@pytest.fixture
def owner(auth: AuthActions) -> AuthActions:
    """A signed-up, logged-in owner."""
    auth.signup()
    return auth


@dataclass
class Shared:
    """An app on SQLite and a client logged in as its owner, shared by a module's tests."""

    app: Flask
    client: FlaskClient


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One app for the page and validation tables: each case makes its own form and reads only
    that form, so the cases do not need an app each (that would dominate the run time).
    """
    app = microapp.create_app(
        instance_path=str(tmp_path_factory.mktemp("pages") / "instance"),
        password_hash_method=FAST_HASH,
        base_url=BASE_URL,
        redis_key_prefix=f"mailslot-test-{uuid.uuid4().hex[:8]}:",
    )
    app.config["TESTING"] = True
    client = app.test_client()
    AuthActions(client, app).signup()
    yield Shared(app, client)
    with app.app_context():
        dal.database().engine.dispose()


def form_count(app: Flask) -> int:
    """How many forms exist."""
    with app.app_context(), dal.connection() as conn:
        return len(conn.execute(dal.forms.select()).all())


# --- the list of forms ------------------------------------------------------------------------


@SQLITE_ONLY
def test_forms_list_is_empty_at_first(client: FlaskClient, owner: AuthActions) -> None:
    page = client.get("/forms").get_data(as_text=True)
    assert "You have no forms yet" in page
    assert 'href="/forms/new"' in page


def test_forms_list_shows_counts_and_newest_time(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    quiet = create_form(client, name="Quiet form")
    busy = create_form(client, name="Busy form")
    rows = insert_submissions(app, busy, [{"n": "1"}, {"n": "2"}, {"n": "3"}])
    page = client.get("/forms").get_data(as_text=True)
    busy_row = page[page.index(f"/forms/{busy}") :].split("</tr>", 1)[0]
    quiet_row = page[page.index(f"/forms/{quiet}") :].split("</tr>", 1)[0]
    assert "Busy form" in busy_row
    assert "<td>3</td>" in busy_row
    assert f'datetime="{rows[-1].created_at.isoformat()}"' in busy_row
    assert "<td>0</td>" in quiet_row
    assert "—" in quiet_row
    assert page.index("Busy form") < page.index("Quiet form")  # newest form first


def test_forms_list_needs_a_login(shared: Shared) -> None:
    response = shared.app.test_client().get("/forms")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=")


# --- creating a form and its settings ---------------------------------------------------------


def test_new_form_page_shows_every_setting_with_defaults(shared: Shared) -> None:
    response = shared.client.get("/forms/new")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    for name in ("name", "redirect_url", "allowed_domains", "notify", "status", "strict"):
        assert f'name="{name}"' in page
    assert re.search(r'<input[^>]*name="honeypot_field"[^>]*value="_gotcha"', page)
    assert re.search(r'<input[^>]*checked[^>]*name="notify"', page)
    assert '<option selected value="active">' in page
    assert 'name="csrf_token"' in page


def test_creating_a_form_stores_the_cleaned_settings(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    response = post_form(
        client,
        "/forms/new",
        {
            "name": "  Event sign-up  ",
            "redirect_url": "https://example.com/thanks",
            "allowed_domains": "Example.com\n\nwww.example.com:8443\nexample.com\n",
            "status": "paused",
            "honeypot_field": "website_url",
            "strict": "y",
        },
    )
    assert response.status_code == 302
    public_id = response.headers["Location"].rsplit("/", 1)[1]
    assert response.headers["Location"] == f"/forms/{public_id}"
    assert len(public_id) >= 22  # 128 random bits, URL-safe
    record = form_row(app, public_id)
    assert record is not None
    assert record.name == "Event sign-up"
    assert record.redirect_url == "https://example.com/thanks"
    assert record.allowed_domains == ["example.com", "www.example.com:8443"]
    assert record.notify is False
    assert record.status == "paused"
    assert record.honeypot_field == "website_url"
    assert record.strict is True
    assert record.fields == []
    assert record.schema_version == 1
    inbox = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "Form “Event sign-up” created." in inbox


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": ""}, "Give the form a name."),
        ({"name": "   "}, "Give the form a name."),
        ({"name": "n" * 201}, "Use at most 200 characters."),
        ({"redirect_url": "example.com/thanks"}, "Use a full http:// or https:// address."),
        ({"redirect_url": "javascript:alert(1)"}, "Use a full http:// or https:// address."),
        ({"redirect_url": "/thanks"}, "Use a full http:// or https:// address."),
        ({"redirect_url": "https://" + "a" * 1995}, "Use at most 2000 characters."),
        (
            {"allowed_domains": "example.com\nnot a host"},
            "'not a host' is not a host name. Write one host a line, like example.com.",
        ),
        (
            {"allowed_domains": "https://example.com"},
            "'https://example.com' is not a host name. Write one host a line, like example.com.",
        ),
        (
            {"allowed_domains": "\n".join(f"h{i}.example.com" for i in range(51))},
            "List at most 50 hosts.",
        ),
        ({"status": "deleted"}, "Choose active or paused."),
        ({"honeypot_field": ""}, "Use letters, digits, _ and - (start with a letter or _)."),
        ({"honeypot_field": "1st"}, "Use letters, digits, _ and - (start with a letter or _)."),
        (
            {"honeypot_field": "has space"},
            "Use letters, digits, _ and - (start with a letter or _).",
        ),
        (
            {"honeypot_field": "_next"},
            "'_next' is already a control field. Choose another name, like _gotcha.",
        ),
        (
            {"honeypot_field": "_replyto"},
            "'_replyto' is already a control field. Choose another name, like _gotcha.",
        ),
    ],
)
def test_new_form_refuses_invalid_settings_with_a_message(
    shared: Shared, changes: dict[str, str], message: str
) -> None:
    before = form_count(shared.app)
    response = post_form(shared.client, "/forms/new", {**SETTINGS_DEFAULTS, **changes})
    assert response.status_code == 422
    assert escape(message) in response.get_data(as_text=True)
    assert 'aria-invalid="true"' in response.get_data(as_text=True)
    assert form_count(shared.app) == before


def test_new_form_without_a_csrf_token_is_refused(shared: Shared) -> None:
    before = form_count(shared.app)
    response = shared.client.post("/forms/new", data=SETTINGS_DEFAULTS)
    assert response.status_code == 400
    assert form_count(shared.app) == before


def test_settings_page_shows_the_stored_settings(shared: Shared) -> None:
    public_id = create_form(
        shared.client,
        name="Bookings",
        redirect_url="https://example.com/done",
        allowed_domains="example.com\nshop.example.com",
        notify=None,
        status="paused",
        honeypot_field="hp",
        strict="y",
    )
    page = shared.client.get(f"/forms/{public_id}/settings").get_data(as_text=True)
    assert re.search(r'<input[^>]*name="name"[^>]*value="Bookings"', page)
    assert re.search(r'<input[^>]*name="redirect_url"[^>]*value="https://example.com/done"', page)
    assert "example.com\nshop.example.com</textarea>" in page
    assert not re.search(r'<input[^>]*checked[^>]*name="notify"', page)
    assert re.search(r'<input[^>]*checked[^>]*name="strict"', page)
    assert '<option selected value="paused">' in page
    assert re.search(r'<input[^>]*name="honeypot_field"[^>]*value="hp"', page)
    assert f'href="/forms/{public_id}/delete"' in page


def test_saving_settings_changes_the_form(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    public_id = create_form(client)
    path = f"/forms/{public_id}/settings"
    response = post_form(
        client,
        path,
        {
            "name": "Renamed",
            "allowed_domains": "ok.example",
            "status": "paused",
            "honeypot_field": "trap",
        },
    )
    assert response.status_code == 302
    assert response.headers["Location"] == path
    record = form_row(app, public_id)
    assert record is not None
    assert (record.name, record.allowed_domains, record.status) == (
        "Renamed",
        ["ok.example"],
        "paused",
    )
    assert record.honeypot_field == "trap"
    assert "Settings saved." in client.get(path).get_data(as_text=True)


def test_saving_settings_with_an_unticked_box_turns_it_off(shared: Shared) -> None:
    public_id = create_form(shared.client, notify="y", strict="y")
    data = {k: v for k, v in SETTINGS_DEFAULTS.items() if k != "notify"}
    response = post_form(shared.client, f"/forms/{public_id}/settings", data)
    assert response.status_code == 302
    record = form_row(shared.app, public_id)
    assert record is not None
    assert (record.notify, record.strict) == (False, False)


def test_invalid_settings_are_not_saved(shared: Shared) -> None:
    public_id = create_form(shared.client, name="Keep me")
    response = post_form(
        shared.client,
        f"/forms/{public_id}/settings",
        {**SETTINGS_DEFAULTS, "name": "Changed", "redirect_url": "ftp://example.com/x"},
    )
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert "Use a full http:// or https:// address." in page
    assert 'value="Changed"' in page  # what was typed survives the re-render
    record = form_row(shared.app, public_id)
    assert record is not None
    assert record.name == "Keep me"


# --- the field builder ------------------------------------------------------------------------

ROW_A = {"name": "email", "label": "Email", "type": "email", "required": "y"}
ROW_B = {"name": "topic", "label": "Topic", "type": "select", "choices": "Sales\nSupport\n"}
ROW_C = {"name": "age", "label": "Age", "type": "number", "min": "18", "max": "120"}


def test_field_builder_starts_empty(shared: Shared) -> None:
    public_id = create_form(shared.client)
    page = shared.client.get(f"/forms/{public_id}/fields").get_data(as_text=True)
    assert "No fields yet" in page
    assert "Schema version 1." in page
    assert builder_names(page) == []
    assert 'name="action" value="add"' in page
    assert 'name="action" value="save"' in page


def test_field_builder_add_appends_an_empty_row(shared: Shared) -> None:
    public_id = create_form(shared.client)
    path = f"/forms/{public_id}/fields"
    response = post_form(shared.client, path, builder_data([ROW_A], "add"))
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert builder_names(page) == ["email", ""]
    assert 'name="action" value="remove-1"' in page
    assert re.search(r'<select[^>]*name="fields-1-type"', page)
    record = form_row(shared.app, public_id)
    assert record is not None
    assert (record.fields, record.schema_version) == ([], 1)  # nothing saved yet


@pytest.mark.parametrize(
    ("action", "order"),
    [
        ("remove-0", ["topic", "age"]),
        ("remove-1", ["email", "age"]),
        ("remove-2", ["email", "topic"]),
        ("up-1", ["topic", "email", "age"]),
        ("up-2", ["email", "age", "topic"]),
        ("up-0", ["email", "topic", "age"]),
        ("down-0", ["topic", "email", "age"]),
        ("down-1", ["email", "age", "topic"]),
        ("down-2", ["email", "topic", "age"]),
        ("remove-9", ["email", "topic", "age"]),
        ("explode", ["email", "topic", "age"]),
    ],
)
def test_field_builder_moves_and_removes_rows_without_saving(
    shared: Shared, action: str, order: list[str]
) -> None:
    public_id = create_form(shared.client)
    response = post_form(
        shared.client, f"/forms/{public_id}/fields", builder_data([ROW_A, ROW_B, ROW_C], action)
    )
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert builder_names(page) == order
    if "topic" in order:  # a row's other inputs travel with it
        position = order.index("topic")
        assert "Sales\nSupport\n</textarea>" in page
        assert re.search(
            rf'<select[^>]*name="fields-{position}-type"[^>]*>.*?'
            r'<option selected value="select">',
            page,
            re.S,
        )
    record = form_row(shared.app, public_id)
    assert record is not None
    assert record.schema_version == 1


def test_field_builder_save_stores_the_schema_and_bumps_its_version(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    public_id = create_form(client)
    path = f"/forms/{public_id}/fields"
    response = post_form(client, path, builder_data([ROW_A, ROW_B, ROW_C], "save"))
    assert response.status_code == 302
    assert response.headers["Location"] == path
    record = form_row(app, public_id)
    assert record is not None
    assert record.schema_version == 2
    assert [spec["name"] for spec in record.fields] == ["email", "topic", "age"]
    email, topic, age = record.fields
    assert (email["type"], email["required"]) == ("email", True)
    assert topic["choices"] == ["Sales", "Support"]
    assert (age["min"], age["max"]) == (18, 120)

    page = client.get(path).get_data(as_text=True)
    assert "Fields saved." in page
    assert "Schema version 2." in page
    assert builder_names(page) == ["email", "topic", "age"]

    response = post_form(client, path, builder_data([ROW_C, ROW_A], "save"))
    assert response.status_code == 302
    record = form_row(app, public_id)
    assert record is not None
    assert record.schema_version == 3
    assert [spec["name"] for spec in record.fields] == ["age", "email"]


def test_field_builder_save_with_no_rows_clears_the_schema(shared: Shared) -> None:
    public_id = create_form(shared.client)
    path = f"/forms/{public_id}/fields"
    assert post_form(shared.client, path, builder_data([ROW_A], "save")).status_code == 302
    assert post_form(shared.client, path, builder_data([], "save")).status_code == 302
    record = form_row(shared.app, public_id)
    assert record is not None
    assert (record.fields, record.schema_version) == ([], 3)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"name": ""}, "Give the field a name."),
        ({"name": "2fast"}, "Use letters, digits, _ and -, starting with a letter."),
        ({"name": "_next"}, "Use letters, digits, _ and -, starting with a letter."),
        ({"name": "has space"}, "Use letters, digits, _ and -, starting with a letter."),
        ({"name": "x", "label": "l" * 201}, "Use at most 200 characters."),
        ({"name": "x", "help": "h" * 1001}, "Use at most 1000 characters."),
        ({"name": "x", "type": "file"}, "Choose a field type from the list."),
        ({"name": "x", "max_length": "0"}, "Use a whole number from 1 to 10000."),
        ({"name": "x", "max_length": "10001"}, "Use a whole number from 1 to 10000."),
        ({"name": "x", "max_length": "ten"}, "Use a whole number from 1 to 10000."),
        ({"name": "x", "type": "number", "min": "abc"}, "Enter a number."),
        ({"name": "x", "type": "number", "max": "inf"}, "Enter a number."),
        (
            {"name": "x", "type": "number", "min": "10", "max": "1"},
            "The minimum is larger than the maximum.",
        ),
        ({"name": "x", "type": "select", "choices": ""}, "List at least one choice, one a line."),
        (
            {"name": "x", "type": "radio", "choices": " \n "},
            "List at least one choice, one a line.",
        ),
        (
            {"name": "x", "type": "radio", "choices": "ok\n" + "c" * 201},
            "Keep each choice to at most 200 characters.",
        ),
    ],
)
def test_field_builder_refuses_an_invalid_row_with_a_message(
    shared: Shared, row: dict[str, str], message: str
) -> None:
    public_id = create_form(shared.client)
    response = post_form(shared.client, f"/forms/{public_id}/fields", builder_data([row], "save"))
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert escape(message) in page
    assert 'aria-describedby="fields-0-' in page
    record = form_row(shared.app, public_id)
    assert record is not None
    assert (record.fields, record.schema_version) == ([], 1)


def test_field_builder_refuses_two_fields_with_the_same_name(shared: Shared) -> None:
    public_id = create_form(shared.client)
    response = post_form(
        shared.client, f"/forms/{public_id}/fields", builder_data([ROW_A, ROW_B, ROW_A], "save")
    )
    assert response.status_code == 422
    assert escape("Two fields are named 'email'.") in response.get_data(as_text=True)
    record = form_row(shared.app, public_id)
    assert record is not None
    assert record.schema_version == 1


# --- the inbox --------------------------------------------------------------------------------


def test_inbox_lists_submissions_newest_first(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    public_id = create_form(client)
    ids = [submit(client, public_id, {"message": f"hello {n}"}) for n in range(3)]
    page = client.get(f"/forms/{public_id}").get_data(as_text=True)
    assert inbox_ids(page) == ids[::-1]
    assert '<th scope="col">message</th>' in page
    assert "hello 2" in page


def test_empty_inbox_says_so(shared: Shared) -> None:
    public_id = create_form(shared.client)
    page = shared.client.get(f"/forms/{public_id}").get_data(as_text=True)
    assert "No submissions yet" in page
    assert inbox_ids(page) == []


def test_inbox_pages_with_a_before_cursor(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    public_id = create_form(client)
    rows = insert_submissions(app, public_id, [{"n": str(i)} for i in range(123)])
    newest_first = [row.public_id for row in reversed(rows)]
    seen: list[str] = []
    path = f"/forms/{public_id}"
    pages = 0
    while path:
        page = client.get(path).get_data(as_text=True)
        found = inbox_ids(page)
        assert 0 < len(found) <= services.INBOX_PAGE_SIZE
        seen += found
        pages += 1
        older = re.search(r'href="([^"]*before=\d+[^"]*)">Older</a>', page)
        path = html.unescape(older.group(1)) if older else ""
        if pages > 1:
            assert ">Newest</a>" in page
    assert pages == 3
    assert seen == newest_first


def test_inbox_with_a_before_cursor_past_the_oldest_is_empty(shared: Shared) -> None:
    public_id = create_form(shared.client)
    [row] = insert_submissions(shared.app, public_id, [{"n": "1"}])
    page = shared.client.get(f"/forms/{public_id}?before={row.id}").get_data(as_text=True)
    assert inbox_ids(page) == []
    assert shared.client.get(f"/forms/{public_id}?before=nonsense").status_code == 200


SEARCH_TEXTS = [
    "haystack with a needle",
    "NEEDLE in caps",
    "100 percent",
    "100% sure",
    "axb only",
    "a_b literally",
    "from zürich",
]
SEARCHES = {  # query -> the messages it finds
    "needle": ["haystack with a needle", "NEEDLE in caps"],
    "NeEdLe": ["haystack with a needle", "NEEDLE in caps"],
    "100%": ["100% sure"],
    "a_b": ["a_b literally"],
    "zürich": ["from zürich"],
    "Initech": ["other fields count too"],
    "nothing like this": [],
}


def test_inbox_search_finds_words_in_any_field(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    public_id = create_form(client)
    items: list[dict[str, Any]] = [{"message": text} for text in SEARCH_TEXTS]
    items.append({"message": "other fields count too", "company": "Initech"})
    rows = insert_submissions(app, public_id, items)
    text_of = {row.public_id: row.data["message"] for row in rows}
    found = {}
    for query in SEARCHES:
        page = client.get(f"/forms/{public_id}", query_string={"q": query}).get_data(as_text=True)
        found[query] = sorted(text_of[i] for i in inbox_ids(page))
        if not found[query]:
            assert f"Nothing matches “{query}”." in page
    assert found == {query: sorted(texts) for query, texts in SEARCHES.items()}


def test_inbox_search_matches_the_text_people_typed(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    """Quotes and backslashes are found as typed, and case is ignored beyond ASCII too."""
    public_id = create_form(client)
    texts = ['She said "hi"', "C:\\path\\file", "from zürich", "plain words"]
    rows = insert_submissions(app, public_id, [{"message": text} for text in texts])
    text_of = {row.public_id: row.data["message"] for row in rows}
    searches = {
        '"hi"': ['She said "hi"'],
        "C:\\path": ["C:\\path\\file"],
        "\\": ["C:\\path\\file"],
        "ZÜRICH": ["from zürich"],
    }
    found = {}
    for query in searches:
        page = client.get(f"/forms/{public_id}", query_string={"q": query}).get_data(as_text=True)
        found[query] = sorted(text_of[i] for i in inbox_ids(page))
    assert found == searches


def test_inbox_with_an_out_of_range_cursor_is_not_a_server_error(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    public_id = create_form(client)
    insert_submissions(app, public_id, [{"n": "1"}])
    statuses = {
        before: client.get(f"/forms/{public_id}?before={before}").status_code
        for before in ("99999999999999999999", "-1")
    }
    assert {before: s for before, s in statuses.items() if s not in (200, 400)} == {}


def test_spam_filter_separates_spam_from_the_inbox(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    public_id = create_form(client)
    ham = submit(client, public_id, {"message": "real person"})
    spam = submit(client, public_id, {"message": "cheap pills"})
    path = f"/forms/{public_id}/submissions/{spam}"
    assert post_form(client, f"{path}/spam", {"spam": "1"}, page=path).status_code == 302

    inbox = client.get(f"/forms/{public_id}").get_data(as_text=True)
    assert inbox_ids(inbox) == [ham]
    spam_page = client.get(f"/forms/{public_id}?spam=1").get_data(as_text=True)
    assert inbox_ids(spam_page) == [spam]
    assert inbox_ids(client.get(f"/forms/{public_id}?spam=1&q=real").get_data(as_text=True)) == []
    assert "<td>1</td>" in client.get("/forms").get_data(as_text=True)


def test_empty_spam_folder_says_so(shared: Shared) -> None:
    public_id = create_form(shared.client)
    submit(shared.client, public_id, {"message": "hi"})
    page = shared.client.get(f"/forms/{public_id}?spam=1").get_data(as_text=True)
    assert "No spam here." in page


def test_install_panel_has_the_html_fetch_and_hosted_snippets(shared: Shared) -> None:
    public_id = create_form(shared.client, honeypot_field="website_url")
    action = f"{BASE_URL}/f/{public_id}"
    page = html.unescape(shared.client.get(f"/forms/{public_id}").get_data(as_text=True))
    install = page[page.index('<section class="install"') :]
    assert f'<form action="{action}" method="POST">' in install
    assert re.search(r'<input type="text" name="website_url" tabindex="-1"[^>]*>', install)
    assert 'name="email" required' in install  # the default fields, for an empty schema
    assert f'fetch("{action}"' in install
    assert "'Accept': 'application/json'" in install
    assert f'<a href="{action}">{action}</a>' in install


def test_install_panel_follows_the_saved_fields(shared: Shared) -> None:
    public_id = create_form(shared.client)
    post_form(shared.client, f"/forms/{public_id}/fields", builder_data([ROW_B, ROW_A], "save"))
    page = html.unescape(shared.client.get(f"/forms/{public_id}").get_data(as_text=True))
    install = page[page.index('<section class="install"') :]
    assert '<select name="topic"><option value="Sales">Sales</option>' in install
    assert '<input type="email" name="email" required>' in install
    assert 'name="message"' not in install
    assert install.index('name="topic"') < install.index('name="email"')


# --- one submission ---------------------------------------------------------------------------


def test_detail_page_shows_every_field_and_where_it_came_from(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    owner.confirm()
    public_id = create_form(client)
    response = client.post(
        f"/f/{public_id}",
        data={
            "name": "Ann",
            "message": "Line one\nline two",
            "_subject": "Quote request",
            "_replyto": "ann@example.org",
        },
        headers={"Referer": "https://site.example/contact", "User-Agent": "TestBrowser/1.0"},
    )
    assert response.status_code == 303
    [row] = submission_rows(app, public_id)
    settle_deliveries(app)
    page = client.get(f"/forms/{public_id}/submissions/{row.public_id}").get_data(as_text=True)
    assert '<dt>name</dt><dd class="value">Ann</dd>' in page
    assert "Line one\nline two" in page
    assert "https://site.example/contact" in page
    assert "TestBrowser/1.0" in page
    assert "<dt>Subject</dt><dd>Quote request</dd>" in page
    assert "<dt>Reply to</dt><dd>ann@example.org</dd>" in page
    assert f'datetime="{row.created_at.isoformat()}"' in page
    assert "<td>email</td><td>owner@example.com</td><td>done</td>" in page
    assert "Mark as spam" in page


def test_detail_page_of_an_unknown_submission_is_404(shared: Shared) -> None:
    public_id = create_form(shared.client)
    assert shared.client.get(f"/forms/{public_id}/submissions/nope").status_code == 404


def test_marking_spam_and_not_spam(client: FlaskClient, app: Flask, owner: AuthActions) -> None:
    public_id = create_form(client)
    submission = submit(client, public_id, {"message": "maybe spam"})
    path = f"/forms/{public_id}/submissions/{submission}"

    response = post_form(client, f"{path}/spam", {"spam": "1"}, page=path)
    assert response.status_code == 302
    assert response.headers["Location"] == path
    [row] = submission_rows(app, public_id)
    assert (row.is_spam, row.spam_reason) == (True, "marked as spam by the owner")
    page = client.get(path).get_data(as_text=True)
    assert "Marked as spam." in page
    assert 'name="spam" value="0"' in page
    assert "Not spam" in page

    response = post_form(client, f"{path}/spam", {"spam": "0"}, page=path)
    assert response.status_code == 302
    [row] = submission_rows(app, public_id)
    assert (row.is_spam, row.spam_reason) == (False, None)
    assert "Marked as not spam." in client.get(path).get_data(as_text=True)


def test_marking_spam_without_a_csrf_token_changes_nothing(shared: Shared) -> None:
    public_id = create_form(shared.client)
    submission = submit(shared.client, public_id, {"message": "hi"})
    response = shared.client.post(
        f"/forms/{public_id}/submissions/{submission}/spam", data={"spam": "1"}
    )
    assert response.status_code == 400
    [row] = submission_rows(shared.app, public_id)
    assert row.is_spam is False


def test_deleting_a_submission(client: FlaskClient, app: Flask, owner: AuthActions) -> None:
    owner.confirm()
    public_id = create_form(client)
    keep = submit(client, public_id, {"message": "keep"})
    gone = submit(client, public_id, {"message": "delete me"})
    settle_deliveries(app)
    path = f"/forms/{public_id}/submissions/{gone}"
    response = post_form(client, f"{path}/delete", {}, page=path)
    assert response.status_code == 302
    assert response.headers["Location"] == f"/forms/{public_id}"
    assert "Submission deleted." in client.get(f"/forms/{public_id}").get_data(as_text=True)
    assert [row.public_id for row in submission_rows(app, public_id)] == [keep]
    assert client.get(path).status_code == 404
    with app.app_context(), dal.connection() as conn:
        left = conn.execute(
            dal.deliveries.select().where(dal.deliveries.c.submission_id.is_not(None))
        ).all()
    assert len(left) == 1  # the deleted submission's notification row went with it


# --- exports ----------------------------------------------------------------------------------


def test_csv_export_is_utf8_with_bom_and_one_column_per_field(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    public_id = create_form(client)
    rows = insert_submissions(
        app,
        public_id,
        [
            {"name": "Ann", "message": 'She said "hi", then left\r\nfor good'},
            {"name": "Zoë", "company": "Ünicode GmbH"},
        ],
    )
    response = client.get(f"/forms/{public_id}/export.csv")
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"] == (
        f'attachment; filename="mailslot-{public_id}.csv"'
    )
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_data()
    assert body.startswith(b"\xef\xbb\xbf")
    text = body.decode("utf-8-sig")
    assert '"She said ""hi"", then left\r\nfor good"' in text  # RFC 4180 quoting
    assert text.endswith("\r\n")
    header, *records = list(csv.reader(io.StringIO(text, newline="")))
    assert header[:2] == ["id", "submitted_at"]
    assert sorted(header[2:]) == ["company", "message", "name"]
    by_column = [dict(zip(header, record, strict=True)) for record in records]
    assert [r["id"] for r in by_column] == [row.public_id for row in rows]
    assert by_column[0]["message"] == 'She said "hi", then left\r\nfor good'
    assert by_column[0]["company"] == ""
    assert by_column[1]["name"] == "Zoë"
    assert by_column[1]["company"] == "Ünicode GmbH"
    assert by_column[1]["submitted_at"] == rows[1].created_at.isoformat()


def test_csv_export_puts_schema_fields_first_in_schema_order(shared: Shared) -> None:
    public_id = create_form(shared.client)
    post_form(shared.client, f"/forms/{public_id}/fields", builder_data([ROW_C, ROW_A], "save"))
    insert_submissions(shared.app, public_id, [{"email": "a@example.com", "extra": "x"}])
    text = shared.client.get(f"/forms/{public_id}/export.csv").get_data().decode("utf-8-sig")
    header = next(csv.reader(io.StringIO(text, newline="")))
    assert header == ["id", "submitted_at", "age", "email", "extra"]


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://evil.example")', '\'=HYPERLINK("http://evil.example")'),
        ("+1+1", "'+1+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tindented", "'\tindented"),
        ("\rcarriage", "'\rcarriage"),
        ("a=b", "a=b"),
        (" =1", " =1"),
        ("plain", "plain"),
    ],
)
def test_csv_export_defuses_formulas(shared: Shared, value: str, cell: str) -> None:
    public_id = create_form(shared.client)
    insert_submissions(shared.app, public_id, [{"answer": value, value: "column name"}])
    text = shared.client.get(f"/forms/{public_id}/export.csv").get_data().decode("utf-8-sig")
    header, record = list(csv.reader(io.StringIO(text, newline="")))
    assert dict(zip(header, record, strict=True))[cell] == "column name"
    assert dict(zip(header, record, strict=True))["answer"] == cell


def test_csv_export_writes_numbers_and_booleans_as_text(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    public_id = create_form(client)
    insert_submissions(app, public_id, [{"n": -5, "ok": True, "no": False, "x": 2.5, "e": None}])
    text = client.get(f"/forms/{public_id}/export.csv").get_data().decode("utf-8-sig")
    header, record = list(csv.reader(io.StringIO(text, newline="")))
    assert dict(zip(header[2:], record[2:], strict=True)) == {
        "n": "-5",
        "ok": "true",
        "no": "false",
        "x": "2.5",
        "e": "",
    }


def test_exports_of_an_empty_form(shared: Shared) -> None:
    public_id = create_form(shared.client)
    csv_body = shared.client.get(f"/forms/{public_id}/export.csv").get_data()
    assert csv_body == b"\xef\xbb\xbfid,submitted_at\r\n"
    json_response = shared.client.get(f"/forms/{public_id}/export.json")
    assert json.loads(json_response.get_data(as_text=True)) == []


@pytest.mark.parametrize(
    ("export", "content_type"),
    [
        ("export.csv", "text/csv; charset=utf-8"),
        ("export.json", "application/json"),  # JSON is UTF-8 by definition (RFC 8259)
    ],
)
def test_exports_state_their_exact_content_type(
    shared: Shared, export: str, content_type: str
) -> None:
    public_id = create_form(shared.client)
    response = shared.client.get(f"/forms/{public_id}/{export}")
    assert response.status_code == 200
    assert response.headers.getlist("Content-Type") == [content_type]


def test_json_export_is_valid_json_with_every_submission(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    public_id = create_form(client)
    rows = insert_submissions(
        app, public_id, [{"name": "Ann", "n": 3}, {"message": 'quote " and \\ and \u2028 zoë'}]
    )
    response = client.get(f"/forms/{public_id}/export.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["Content-Disposition"] == (
        f'attachment; filename="mailslot-{public_id}.json"'
    )
    assert json.loads(response.get_data(as_text=True)) == [
        {"id": row.public_id, "submitted_at": row.created_at.isoformat(), "data": row.data}
        for row in rows
    ]


def test_exports_leave_out_spam(client: FlaskClient, app: Flask, owner: AuthActions) -> None:
    public_id = create_form(client)
    ham = submit(client, public_id, {"message": "ham"})
    spam = submit(client, public_id, {"message": "spam"})
    path = f"/forms/{public_id}/submissions/{spam}"
    post_form(client, f"{path}/spam", {"spam": "1"}, page=path)
    exported = json.loads(client.get(f"/forms/{public_id}/export.json").get_data(as_text=True))
    assert [item["id"] for item in exported] == [ham]
    csv_text = client.get(f"/forms/{public_id}/export.csv").get_data(as_text=True)
    assert ham in csv_text
    assert spam not in csv_text


# --- deleting a form --------------------------------------------------------------------------


def test_delete_form_asks_for_confirmation_first(shared: Shared) -> None:
    public_id = create_form(shared.client, name="Old form")
    response = shared.client.get(f"/forms/{public_id}/delete")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "Delete “Old form”?" in page
    assert 'name="csrf_token"' in page
    assert '<form method="post">' in page
    assert form_row(shared.app, public_id) is not None


def test_deleting_a_form_removes_it_and_its_submissions(
    client: FlaskClient, app: Flask, owner: AuthActions
) -> None:
    owner.confirm()
    public_id = create_form(client, name="Old form")
    other = create_form(client, name="Other form")
    submit(client, public_id, {"message": "one"})
    kept = submit(client, other, {"message": "two"})
    settle_deliveries(app)
    old_id = form_row(app, public_id).id  # type: ignore[union-attr]

    response = post_form(client, f"/forms/{public_id}/delete", {})
    assert response.status_code == 302
    assert response.headers["Location"] == "/forms"
    assert form_row(app, public_id) is None
    with app.app_context(), dal.connection() as conn:
        assert dal.submission_page(conn, old_id, spam=None) == []
        left = conn.execute(
            dal.deliveries.select().where(dal.deliveries.c.submission_id.is_not(None))
        ).all()
    assert len(left) == 1  # the other form's notification
    page = client.get("/forms").get_data(as_text=True)
    assert "Form “Old form” and its submissions were deleted." in page
    assert "Other form" in page
    assert client.get(f"/forms/{public_id}").status_code == 404
    assert client.post(f"/f/{public_id}", data={"message": "x"}).status_code == 404
    assert [row.public_id for row in submission_rows(app, other)] == [kept]


def test_deleting_a_form_needs_the_csrf_token(shared: Shared) -> None:
    public_id = create_form(shared.client)
    assert shared.client.post(f"/forms/{public_id}/delete").status_code == 400
    forged = shared.client.post(f"/forms/{public_id}/delete", data={"csrf_token": "forged"})
    assert forged.status_code == 400
    assert form_row(shared.app, public_id) is not None


# --- the cross-owner matrix -------------------------------------------------------------------

OWNER_ROUTES = [
    ("GET", "/forms/{form}"),
    ("GET", "/forms/{form}?spam=1&q=x"),
    ("GET", "/forms/{form}/settings"),
    ("POST", "/forms/{form}/settings"),
    ("GET", "/forms/{form}/fields"),
    ("POST", "/forms/{form}/fields"),
    ("GET", "/forms/{form}/submissions/{submission}"),
    ("POST", "/forms/{form}/submissions/{submission}/spam"),
    ("POST", "/forms/{form}/submissions/{submission}/delete"),
    ("GET", "/forms/{form}/export.csv"),
    ("GET", "/forms/{form}/export.json"),
    ("GET", "/forms/{form}/delete"),
    ("POST", "/forms/{form}/delete"),
]
SUBMISSION_ROUTES = [(method, path) for method, path in OWNER_ROUTES if "{submission}" in path]
POST_BODIES = {
    "settings": {**SETTINGS_DEFAULTS, "name": "Hijacked", "status": "paused"},
    "fields": builder_data([{"name": "pwned", "type": "text"}], "save"),
    "spam": {"spam": "1"},
}


@pytest.fixture
def two_owners(app: Flask) -> dict[str, Any]:
    """Owner A with a form and a submission; owner B, logged in on another client, with a form."""
    client_a, client_b = app.test_client(), app.test_client()
    AuthActions(client_a, app).signup("a@example.com")
    form_a = create_form(client_a, name="A's form")
    submission_a = submit(client_a, form_a, {"message": "for A only"})
    AuthActions(client_b, app).signup("b@example.com")
    form_b = create_form(client_b, name="B's form")
    return {
        "a": client_a,
        "b": client_b,
        "form_a": form_a,
        "submission_a": submission_a,
        "form_b": form_b,
        "token_b": csrf_token(client_b, "/forms/new"),
    }


def _request_as_b(owners: dict[str, Any], method: str, path: str) -> Any:
    """Send one request as owner B, with B's valid CSRF token on POSTs."""
    if method == "GET":
        return owners["b"].get(path)
    body = next((b for key, b in POST_BODIES.items() if path.endswith(f"/{key}")), {})
    return owners["b"].post(path, data={**body, "csrf_token": owners["token_b"]})


def _assert_a_untouched(app: Flask, owners: dict[str, Any]) -> None:
    """A's form and submission are exactly as A left them."""
    record = form_row(app, owners["form_a"])
    assert record is not None
    assert (record.name, record.status, record.fields) == ("A's form", "active", [])
    [row] = submission_rows(app, owners["form_a"])
    assert (row.public_id, row.is_spam) == (owners["submission_a"], False)


def test_another_owners_form_and_submissions_are_404_on_every_route_and_method(
    app: Flask, two_owners: dict[str, Any]
) -> None:
    """B (logged in, valid CSRF token) probes A's form, and A's submission under B's own form."""
    own = {  # the control: A reaches every GET route of the matrix
        path: two_owners["a"].get(path).status_code
        for method, route in OWNER_ROUTES
        if method == "GET"
        for path in [route.format(form=two_owners["form_a"], submission=two_owners["submission_a"])]
    }
    assert set(own.values()) == {200}, own

    probes = [
        (method, route.format(form=two_owners["form_a"], submission=two_owners["submission_a"]))
        for method, route in OWNER_ROUTES
    ] + [
        (method, route.format(form=two_owners["form_b"], submission=two_owners["submission_a"]))
        for method, route in SUBMISSION_ROUTES
    ]
    answers = {
        f"{method} {path}": _request_as_b(two_owners, method, path) for method, path in probes
    }
    wrong = {probe: r.status_code for probe, r in answers.items() if r.status_code != 404}
    assert wrong == {}
    assert not any("for A only" in r.get_data(as_text=True) for r in answers.values())
    _assert_a_untouched(app, two_owners)

    listing = two_owners["b"].get("/forms").get_data(as_text=True)
    assert "B&#39;s form" in listing
    assert "A&#39;s form" not in listing
    assert two_owners["form_a"] not in listing


@SQLITE_ONLY
def test_owner_routes_send_visitors_to_the_login_page(
    app: Flask, two_owners: dict[str, Any]
) -> None:
    visitor = app.test_client()
    token = csrf_token(visitor, "/login")
    answers = {}
    for method, route in OWNER_ROUTES:
        path = route.format(form=two_owners["form_a"], submission=two_owners["submission_a"])
        if method == "GET":
            answers[f"GET {path}"] = visitor.get(path)
        else:
            answers[f"POST {path}"] = visitor.post(path, data={"csrf_token": token})
    wrong = {
        probe: (r.status_code, r.headers.get("Location"))
        for probe, r in answers.items()
        if r.status_code != 302 or not r.headers["Location"].startswith("/login?next=")
    }
    assert wrong == {}
    _assert_a_untouched(app, two_owners)

"""Hypothesis properties of the CSV export and of keyset paging through a form's submissions."""

from __future__ import annotations

import csv
import io
import uuid
from typing import Any

from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dal
import records
import services

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
PROPERTY_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Any text a submission can hold (lone surrogates cannot be encoded, so no form can store them).
_text = st.text(max_size=30)
_cell_text = st.one_of(
    _text,
    st.sampled_from(FORMULA_STARTS).flatmap(lambda start: _text.map(lambda t: start + t)),
    st.sampled_from(['"', '""', ",", "\r\n", "\n", "\r", "'=1", " =1", "\ufeff"]),
)
_keys = st.one_of(st.sampled_from(["name", "email", "message"]), st.text(min_size=1, max_size=12))
_rows = st.lists(st.dictionaries(_keys, _cell_text, max_size=5), min_size=0, max_size=6)


def guarded(value: str) -> str:
    """What the formula guard makes of a value: a leading ' for text a spreadsheet would run."""
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def new_form(conn: Any) -> records.Form:
    """A fresh owner with a fresh, schema-less form."""
    user = dal.insert_user(conn, f"{uuid.uuid4().hex}@example.com", "x")
    return dal.insert_form(conn, user.id, dal.new_public_id(), {"name": "Property"})


def insert(
    conn: Any, form: records.Form, data: dict[str, Any], is_spam: bool = False
) -> records.Submission:
    """Store one submission."""
    return dal.insert_submission(
        conn,
        {
            "public_id": dal.new_public_id(),
            "form_id": form.id,
            "data": data,
            "schema_version": 1,
            "is_spam": is_spam,
        },
    )


@PROPERTY_SETTINGS
@given(value=_cell_text)
def test_spreadsheet_safe_only_ever_adds_one_leading_quote(value: str) -> None:
    cell = services.spreadsheet_safe(value)
    assert cell == guarded(value)
    assert not cell.startswith(FORMULA_STARTS)


@PROPERTY_SETTINGS
@given(rows=_rows)
def test_csv_export_parses_back_to_every_value(app: Flask, rows: list[dict[str, str]]) -> None:
    with app.app_context(), dal.transaction() as conn:
        form = new_form(conn)
        stored = [insert(conn, form, data) for data in rows]
    with app.test_request_context():
        text = "".join(services.export_csv(form))

    assert text.startswith("\ufeff")
    header, *records = list(csv.reader(io.StringIO(text[1:], newline="")))
    columns = list(dict.fromkeys(key for data in rows for key in data))  # first-seen order
    assert header == ["id", "submitted_at", *(guarded(column) for column in columns)]
    assert len(records) == len(rows)
    for record, row, data in zip(records, stored, rows, strict=True):
        assert record[:2] == [row.public_id, row.created_at.isoformat()]
        assert record[2:] == [guarded(data[column]) if column in data else "" for column in columns]


@settings(PROPERTY_SETTINGS, max_examples=30)  # up to 240 inserts an example
@given(
    count=st.integers(min_value=0, max_value=120),
    page_size=st.integers(min_value=1, max_value=60),
    others=st.integers(min_value=0, max_value=5),
)
def test_keyset_pages_return_each_submission_once_newest_first(
    app: Flask, count: int, page_size: int, others: int
) -> None:
    with app.app_context(), dal.transaction() as conn:
        form, neighbour = new_form(conn), new_form(conn)
        ids = []
        for n in range(count):
            ids.append(insert(conn, form, {"n": n}).id)
            if n < others:  # another form's rows interleave with this form's ids
                insert(conn, neighbour, {"n": n})

    seen: list[int] = []
    pages = 0
    before = None
    with app.app_context(), dal.connection() as conn:
        while True:
            page = dal.submission_page(conn, form.id, before=before, limit=page_size)
            assert len(page) <= page_size
            if not page:
                break
            pages += 1
            assert all(row.form_id == form.id for row in page)
            seen += [row.id for row in page]
            before = page[-1].id
    assert seen == sorted(ids, reverse=True)
    assert pages == -(-count // page_size)  # ceil: no empty page before the end


@PROPERTY_SETTINGS
@given(spam_flags=st.lists(st.booleans(), max_size=120))
def test_inbox_cursor_walks_inbox_and_spam_without_gaps(app: Flask, spam_flags: list[bool]) -> None:
    """The "Older" cursor of the inbox stops exactly at the end; spam and inbox never mix."""
    with app.app_context(), dal.transaction() as conn:
        form = new_form(conn)
        rows = [insert(conn, form, {"n": n}, is_spam) for n, is_spam in enumerate(spam_flags)]

    with app.app_context():
        for spam in (False, True):
            expected = [row.id for row in reversed(rows) if row.is_spam is spam]
            seen: list[int] = []
            before = None
            while True:
                page, before = services.inbox_page(form, before=before, query="", spam=spam)
                assert len(page) <= services.INBOX_PAGE_SIZE
                seen += [row.id for row in page]
                if before is None:
                    break
                assert page, "a cursor was given for an empty page"
            assert seen == expected

"""Hostile and careless clients on the public routes: never a 5xx, never a lost submission.

A fixed corpus pins the reproductions of issue 12 and what probing around them found, each with
the answer a careful service gives. The properties then throw generated bodies, content types,
headers and control values at `POST /f/<id>`, `POST /f/<id>/page`, `GET /f/<id>` and the thanks
page, on SQLite and on PostgreSQL (which refuses NUL and lone surrogates that SQLite stores), and
check: no answer is a 5xx, every 2xx/3xx answer to a POST stored a row (or counted a honeypot
hit, which answers like a success by design), and every other answer stored nothing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import cache
import dal
import intake
import microapp
from conftest import (
    FAST_HASH,
    AuthActions,
    _wipe_postgres,
    assert_public_envelope,
    post_form,
    public_refusal,
)

BASE_URL = "http://mailslot.test"
HONEYPOT = "_gotcha"
BOUNDARY = "MailslotFuzzBoundary"
DEEP = 5000


# =================================================================================================
# One app per database, with an open form and a form with allowed domains
# =================================================================================================


@dataclass
class Site:
    """The app and the two forms every case posts to."""

    app: Flask
    forms: dict[str, str] = field(default_factory=dict)  # "open" / "guarded" -> public id

    def visitor(self) -> FlaskClient:
        """A fresh browser: no cookies."""
        return self.app.test_client()

    def form_id(self, public_id: str) -> int:
        """The SQL id of a form."""
        with self.app.app_context(), dal.connection() as conn:
            form = dal.form_by_public_id(conn, public_id)
            assert form is not None
            return form.id

    def state(self, public_id: str) -> tuple[int, int]:
        """(stored submissions, honeypot hits) of a form."""
        form_id = self.form_id(public_id)
        with self.app.app_context(), dal.connection() as conn:
            rows = conn.execute(
                sa.select(sa.func.count())
                .select_from(dal.submissions)
                .where(dal.submissions.c.form_id == form_id)
            ).scalar_one()
            return rows, cache.read_counter(f"form:{form_id}:honeypot")

    def newest(self, public_id: str) -> sa.Row[Any]:
        """The form's newest submission."""
        form_id = self.form_id(public_id)
        with self.app.app_context(), dal.connection() as conn:
            return conn.execute(
                sa.select(dal.submissions)
                .where(dal.submissions.c.form_id == form_id)
                .order_by(dal.submissions.c.id.desc())
            ).first()

    def stamp(self, public_id: str) -> str:
        """A genuine render stamp of this form's hosted page."""
        page = self.visitor().get(f"/f/{public_id}").get_data(as_text=True)
        marker = 'name="_rendered" value="'
        return page.split(marker, 1)[1].split('"', 1)[0]


def _create_form(client: FlaskClient, **values: str) -> str:
    """A new lenient form through the owner's page."""
    data = {"name": "Contact", "status": "active", "honeypot_field": HONEYPOT, **values}
    response = post_form(client, "/forms/new", data)
    assert response.status_code == 302, response.get_data(as_text=True)
    return response.headers["Location"].rsplit("/", 1)[1]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def site(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    """One app per database for the whole module; each case looks only at its own effects."""
    overrides: dict[str, Any] = {
        "instance_path": str(tmp_path_factory.mktemp("hostile") / "instance"),
        "password_hash_method": FAST_HASH,
        "base_url": BASE_URL,
        "redis_key_prefix": f"mailslot-test-{uuid.uuid4().hex[:8]}:",
        "rate_limits_enabled": False,
    }
    if request.param == "postgresql":
        overrides["database_url"] = request.getfixturevalue("postgres_url")
    app = microapp.create_app(**overrides)
    app.config["TESTING"] = True
    if request.param == "postgresql":
        created = app.test_cli_runner().invoke(args=["init-db"])
        assert created.exit_code == 0, created.output
    owner = app.test_client()
    auth = AuthActions(owner, app)
    auth.signup()
    auth.confirm()
    built = Site(app)
    built.forms["open"] = _create_form(owner, notify="y")  # each submission queues an email too
    built.forms["guarded"] = _create_form(owner, allowed_domains="ok.example\nshop.example:8443")
    yield built
    if request.param == "postgresql":
        _wipe_postgres(app)
    with app.app_context():
        dal.database().engine.dispose()


# =================================================================================================
# Bodies
# =================================================================================================


def _bytes(text: str) -> bytes:
    """Text as a client would put it on the wire; lone surrogates become invalid UTF-8."""
    return text.encode("utf-8", "surrogatepass")


def urlencoded(fields: list[tuple[str, str]]) -> bytes:
    """An application/x-www-form-urlencoded body."""
    return b"&".join(
        f"{quote_from_bytes(_bytes(k))}={quote_from_bytes(_bytes(v))}".encode() for k, v in fields
    )


def multipart(fields: list[tuple[str, str]], boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body written by hand, so that any bytes can go into it."""
    out = b""
    for name, value in fields:
        out += b"--" + boundary.encode("latin-1") + b"\r\n"
        out += b'Content-Disposition: form-data; name="' + _bytes(name) + b'"\r\n\r\n'
        out += _bytes(value) + b"\r\n"
    return out + b"--" + boundary.encode("latin-1") + b"--\r\n"


def json_body(value: Any) -> bytes:
    """JSON as Python writes it: lone surrogates as \\ud800 escapes."""
    return json.dumps(value).encode("ascii")


@dataclass(frozen=True)
class Req:
    """One request to a public route, as data (so that hypothesis can shrink and pin it).

    ``encoding`` says how ``fields`` become the body ("urlencoded", "multipart", "json"), or
    "raw" to send ``raw`` as it is. ``stamp`` (hosted posts only) adds a render stamp field:
    "valid" is a genuine stamp of this form's page, "other" one of the other form's page.
    """

    form: str = "open"
    encoding: str = "urlencoded"
    fields: tuple[tuple[str, Any], ...] = ()
    raw: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    stamp: str = ""
    query: str = ""

    def body(self, extra: tuple[tuple[str, str], ...] = ()) -> tuple[bytes, str | None]:
        """The body bytes and the Content-Type header to send."""
        fields = [(str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in self.fields]
        fields += list(extra)
        if self.encoding == "urlencoded":
            body, kind = urlencoded(fields), "application/x-www-form-urlencoded"
        elif self.encoding == "multipart":
            body, kind = multipart(fields), f"multipart/form-data; boundary={BOUNDARY}"
        elif self.encoding == "json":
            body = json_body({**dict(self.fields), **dict(extra)})
            kind = "application/json"
        else:
            body, kind = self.raw, None
        return body, self.content_type if self.content_type is not None else kind


def send(site: Site, req: Req, path: str, method: str = "POST") -> Any:
    """Send ``req`` to ``path`` (``{id}`` stands for the form) from a fresh browser."""
    public_id = site.forms[req.form]
    extra: tuple[tuple[str, str], ...] = ()
    if req.stamp:
        other = site.forms["guarded" if req.form == "open" else "open"]
        stamps = {"valid": public_id, "other": other}
        value = site.stamp(stamps[req.stamp]) if req.stamp in stamps else req.stamp
        extra = (("_rendered", value),)
    body, content_type = req.body(extra)
    headers = dict(req.headers)
    if content_type is not None:
        headers.setdefault("Content-Type", content_type)
    url = path.format(id=public_id) + (f"?{req.query}" if req.query else "")
    # The bytes exactly as given: the test client would write a multipart body of its own for an
    # empty one.
    return site.visitor().open(
        url,
        method=method,
        input_stream=io.BytesIO(body),
        content_length=len(body),
        headers=headers,
    )


def assert_kept_or_refused(site: Site, req: Req, response: Any, before: tuple[int, int]) -> None:
    """Never a 5xx; a success stored one row (or counted one honeypot hit); anything else none."""
    text = response.get_data(as_text=True)[:500]
    assert response.status_code < 500, text
    if response.mimetype == "application/json":
        assert_public_envelope(response)
    rows, trapped = site.state(site.forms[req.form])
    if 200 <= response.status_code < 400:
        assert (rows, trapped) in ((before[0] + 1, before[1]), (before[0], before[1] + 1)), text
        if response.status_code == 201 and rows == before[0] + 1:
            assert site.newest(site.forms[req.form]).public_id == response.json["id"]
    else:
        assert (rows, trapped) == before, text


def assert_refused_site(response: Any) -> None:
    """The JSON answer to a post from a site outside the allowed domains."""
    assert response.status_code == 403
    assert response.json == public_refusal(
        "forbidden", "This form does not accept submissions from this website."
    )


def post_and_check(site: Site, req: Req, path: str = "/f/{id}") -> Any:
    """POST ``req`` and check the property; return the response for further checks."""
    before = site.state(site.forms[req.form])
    response = send(site, req, path)
    assert_kept_or_refused(site, req, response, before)
    return response


# =================================================================================================
# The fixed corpus: issue 12's reproductions and their neighbours, with the expected answers
# =================================================================================================

THANKS = "/thanks"
FROM_OK = (("Referer", "https://ok.example/contact"),)
FROM_SITE = (("Referer", "https://site.example/contact"),)
JSON_ANSWER = (("Accept", "application/json"),)

MALFORMED_NEXT = [
    "http://[",
    "https://[::1",
    "http://]/",
    "https://ok.example\uff03@evil.example/",  # full-width number sign: NFKC makes it '#'
    "https://ok.example\uff0fevil.example/",  # full-width solidus: NFKC makes it '/'
    "https://ok.example\uff1f.evil.example/",  # full-width question mark
    "https://ok.example\uff20evil.example/",  # full-width commercial at
    "https://a..b/",  # IDNA: empty label
    "https://" + "a" * 64 + ".example/",  # IDNA: label too long
    "https://\udcff.example/",
    "https://ok.example:99999/",
    "https://ok.example:0/",
    "https://ok.example:-1/",
    "https://ok.example:x/",
    "https://ok.example@evil.example/",
    "https://ok.example:pw@evil.example/",
    "https://@ok.example/",
    "https:\\\\evil.example",
    "/\\evil.example",
    "https://evil.example\\@ok.example/",
    "https://ok.example%2f@evil.example/",
    "http:evil.example",
    "\x00",
    "//evil.example",
    "https://fe80::1%25eth0/",
    "https://[fe80::1%25eth0]/",
]


@pytest.mark.parametrize("next_url", MALFORMED_NEXT)
@pytest.mark.parametrize("form", ["open", "guarded"])
def test_malformed_next_is_ignored_and_the_submission_kept(
    site: Site, form: str, next_url: str
) -> None:
    referer = FROM_OK if form == "guarded" else FROM_SITE
    response = post_and_check(
        site, Req(form, fields=(("message", "hi"), ("_next", next_url)), headers=referer)
    )
    assert response.status_code == 303
    assert response.headers["Location"] == f"{BASE_URL}/f/{site.forms[form]}{THANKS}"
    assert site.newest(site.forms[form]).data == {"message": "hi"}


@pytest.mark.parametrize(
    "referer", ["http://[", "https://[::1", "https://a..b/", "\udcff", "\x00http://["]
)
def test_malformed_referer_never_fails_a_post(site: Site, referer: str) -> None:
    headers = (("Referer", referer),)
    opened = post_and_check(site, Req("open", fields=(("message", "hi"),), headers=headers))
    assert opened.status_code == 303
    assert_refused_site(
        post_and_check(
            site, Req("guarded", fields=(("message", "hi"),), headers=headers + JSON_ANSWER)
        )
    )


@pytest.mark.parametrize(
    "referer",
    ["http://[", "https://[::1", "http://ok.example\uff03@x/", "https://a..b/", "https://x:99999/"],
)
def test_thanks_page_with_a_malformed_referer_links_back_to_the_form(
    site: Site, referer: str
) -> None:
    public_id = site.forms["open"]
    response = site.visitor().get(f"/f/{public_id}/thanks", headers={"Referer": referer})
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert f'href="/f/{public_id}"' in page
    assert "Back to the form" in page


def test_thanks_page_links_back_to_the_site_the_visitor_came_from(site: Site) -> None:
    public_id = site.forms["open"]
    response = site.visitor().get(
        f"/f/{public_id}/thanks", headers={"Referer": "https://shop.example/contact?a=1"}
    )
    page = response.get_data(as_text=True)
    assert 'href="https://shop.example/contact?a=1"' in page
    assert "Back to shop.example" in page


@pytest.mark.parametrize(
    "body",
    [
        "[" * DEEP + "]" * DEEP,
        "{" + '"a":{' * DEEP + "}" * DEEP + "}",
        '{"message": ' + "[" * DEEP + "]" * DEEP + "}",
        '{"message": ' + "[" * 1000 + "]" * 1000 + "}",
        '{"message": ' + "[" * 33 + "]" * 33 + "}",
        '{"_next": ' + "[" * DEEP,
    ],
    ids=["array", "object", "in-a-field", "1000-deep", "33-deep", "unclosed"],
)
def test_json_nested_too_deep_is_refused_with_400(site: Site, body: str) -> None:
    req = Req("open", encoding="raw", raw=body.encode(), content_type="application/json")
    response = post_and_check(site, req)
    assert response.status_code == 400
    assert response.json == public_refusal(
        "bad_request",
        "The JSON is nested more than 32 levels deep. Send an object of fields with plain values.",
    )


def test_json_nested_within_the_bound_gets_the_per_field_message(site: Site) -> None:
    body = '{"message": ' + "[" * 30 + "]" * 30 + "}"
    req = Req("open", encoding="raw", raw=body.encode(), content_type="application/json")
    response = post_and_check(site, req)
    assert response.status_code == 422
    assert response.json["errors"] == {"message": ["Send a plain value, not an object or list."]}


@pytest.mark.parametrize("encoding", ["json", "urlencoded", "multipart"])
@pytest.mark.parametrize("junk", ["\ud800", "a\udfffb", "x\x00y", "\ud800\x00\udc00"])
def test_junk_in_subject_and_replyto_never_refuses_the_submission(
    site: Site, encoding: str, junk: str
) -> None:
    fields = (("message", "hi"), ("_subject", junk), ("_replyto", f"{junk}@example.org"))
    response = post_and_check(site, Req("open", encoding=encoding, fields=fields))
    assert response.status_code in (201, 303)
    row = site.newest(site.forms["open"])
    assert row.data == {"message": "hi"}
    for value in row.meta.values():
        assert "\x00" not in value
        assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)


@pytest.mark.parametrize(
    ("subject", "stored_as"),
    [
        ("Hello\r\nBcc: victim@example.org", "Hello Bcc: victim@example.org"),
        ("  Two\t\tspaces \x0b\x0c here\u2028 ", "Two spaces here"),
        ("\ud800 surrogate", "\ufffd surrogate"),
        ("\r\n\t", None),
        ("s" * 300, "s" * 250),
    ],
)
def test_subject_is_stored_as_one_line(site: Site, subject: str, stored_as: str | None) -> None:
    post_and_check(site, Req("open", "json", fields=(("m", "x"), ("_subject", subject))))
    assert site.newest(site.forms["open"]).meta.get("subject") == stored_as


@pytest.mark.parametrize("encoding", ["json", "urlencoded", "multipart"])
def test_lone_surrogates_and_nul_in_values_are_dropped_not_fatal(site: Site, encoding: str) -> None:
    fields = (("name", "Ann\udc00"), ("message", "a\x00b"))
    response = post_and_check(site, Req("open", encoding=encoding, fields=fields))
    assert response.status_code in (201, 303)
    # JSON's \\udc00 escape is one bad code point; on the wire it is three bad bytes.
    bad = "\ufffd" if encoding == "json" else "\ufffd" * 3
    assert site.newest(site.forms["open"]).data == {"name": f"Ann{bad}", "message": "ab"}


@pytest.mark.parametrize("encoding", ["json", "urlencoded"])
def test_lone_surrogates_in_field_names_become_replacement_characters(
    site: Site, encoding: str
) -> None:
    fields = (("na\ud800me", "Ann"), ("\udfff", "v"))
    response = post_and_check(site, Req("open", encoding=encoding, fields=fields))
    assert response.status_code in (201, 303)
    bad = "\ufffd" if encoding == "json" else "\ufffd" * 3
    assert site.newest(site.forms["open"]).data == {f"na{bad}me": "Ann", bad: "v"}


@pytest.mark.parametrize(
    ("raw", "content_type", "stored"),
    [
        (b"message=caf\xe9&name=\xff\xfe", None, {"message": "caf\ufffd", "name": "\ufffd\ufffd"}),
        (b"message=caf%E9&name=%ff", None, {"message": "caf\ufffd", "name": "\ufffd"}),
        (b"message=%ed%a0%80x", None, {"message": "\ufffd\ufffd\ufffdx"}),
        (b"message=hi", "; charset=bogus", {"message": "hi"}),
        (b"message=hi", "; charset=utf-16", {"message": "hi"}),
        (b"message=hi", "; charset", {"message": "hi"}),
    ],
)
def test_urlencoded_bytes_that_are_not_utf8_become_replacement_characters(
    site: Site, raw: bytes, content_type: str, stored: dict[str, str]
) -> None:
    kind = "application/x-www-form-urlencoded" + (content_type or "")
    req = Req("open", encoding="raw", raw=raw, content_type=kind)
    response = post_and_check(site, req)
    assert response.status_code == 303
    assert site.newest(site.forms["open"]).data == stored


def test_multipart_value_that_is_not_utf8_is_kept_with_replacement_characters(site: Site) -> None:
    raw = multipart([("message", "x")]).replace(b"\r\nx\r\n", b"\r\ncaf\xe9\r\n")
    kind = f"multipart/form-data; charset=latin-1; boundary={BOUNDARY}"
    response = post_and_check(site, Req("open", encoding="raw", raw=raw, content_type=kind))
    assert response.status_code == 303
    assert site.newest(site.forms["open"]).data == {"message": "caf\ufffd"}


NO_BOUNDARY = (
    "The multipart/form-data body has no boundary in its Content-Type header. Let the browser or "
    "your HTTP library set the header, and send again."
)
UNREADABLE = (
    "The multipart/form-data body could not be read. Check that it uses the boundary its "
    "Content-Type header names, and send again."
)


MULTIPART = "multipart/form-data"
WITH_BOUNDARY = f"{MULTIPART}; boundary={BOUNDARY}"
HI = multipart([("message", "hi")])


@pytest.mark.parametrize(
    ("raw", "content_type", "message"),
    [
        pytest.param(HI, MULTIPART, NO_BOUNDARY, id="no-boundary"),
        pytest.param(HI, f"{MULTIPART}; boundary=", NO_BOUNDARY, id="empty-boundary"),
        pytest.param(HI, f"{MULTIPART}; boundary=Other", UNREADABLE, id="other-boundary"),
        pytest.param(HI, f"{MULTIPART}; boundary=caf\xe9", UNREADABLE, id="latin1-boundary"),
        pytest.param(HI.replace(b"message", b"m\xe9"), WITH_BOUNDARY, UNREADABLE, id="bad-name"),
        pytest.param(b"garbage", WITH_BOUNDARY, UNREADABLE, id="junk"),
        pytest.param(HI.replace(b"Content-Disposition", b"X"), WITH_BOUNDARY, UNREADABLE,
                     id="no-disposition"),
        pytest.param(b"", WITH_BOUNDARY,
                     "The multipart/form-data body is empty. Send the form's fields in it.",
                     id="empty"),
    ],
)  # fmt: skip
def test_multipart_that_cannot_be_read_is_refused_with_400(
    site: Site, raw: bytes, content_type: str, message: str
) -> None:
    req = Req("open", encoding="raw", raw=raw, content_type=content_type, headers=JSON_ANSWER)
    response = post_and_check(site, req)
    assert response.status_code == 400
    assert response.json == public_refusal("bad_request", message)
    browser = post_and_check(site, Req("open", encoding="raw", raw=raw, content_type=content_type))
    assert browser.status_code == 400
    assert browser.mimetype == "text/html"


def test_multipart_part_without_a_name_is_dropped_and_an_empty_form_is_kept(site: Site) -> None:
    kind = f"multipart/form-data; boundary={BOUNDARY}"
    raw = (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nhi\r\n"
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="message"\r\n\r\nkept\r\n'
        f"--{BOUNDARY}--\r\n"
    ).encode()
    response = post_and_check(site, Req("open", encoding="raw", raw=raw, content_type=kind))
    assert response.status_code == 303
    assert site.newest(site.forms["open"]).data == {"message": "kept"}
    closing_only = f"--{BOUNDARY}--\r\n".encode()
    empty = post_and_check(site, Req("open", encoding="raw", raw=closing_only, content_type=kind))
    assert empty.status_code == 303
    assert site.newest(site.forms["open"]).data == {}


@pytest.mark.parametrize("encoding", ["json", "urlencoded", "multipart"])
def test_field_names_that_differ_only_by_normalisation_are_one_field(
    site: Site, encoding: str
) -> None:
    decomposed = "cafe\u0301"
    response = post_and_check(
        site, Req("open", encoding=encoding, fields=((decomposed, "cre\u0300me"), ("m", "x")))
    )
    assert response.status_code in (201, 303)
    assert site.newest(site.forms["open"]).data == {"caf\u00e9": "cr\u00e8me", "m": "x"}
    both = ((decomposed, "one"), ("caf\u00e9", "two"))
    refused = post_and_check(site, Req("open", encoding=encoding, fields=both, headers=JSON_ANSWER))
    assert refused.status_code == 422
    assert refused.json["errors"] == {"caf\u00e9": ["Send one value for this field."]}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Origin", "http://["),
        ("Origin", "null"),
        ("Origin", "\x00"),
        ("Referer", "\x00\x01"),
        ("User-Agent", "Agent\x00/1.0 \xff"),
        ("Accept", "application/json;q=nan, text/html;q=inf"),
        ("Accept", "*/*;q=-1,,,;;"),
        ("Content-Type", "application/json; charset=\x00"),
        ("X-Requested-With", "\xff"),
        ("X-Forwarded-For", "\x00, [::1, 999.1.1.1"),
    ],
)
@pytest.mark.parametrize("path", ["/f/{id}", "/f/{id}/page"])
def test_odd_header_values_never_fail_a_post(site: Site, path: str, name: str, value: str) -> None:
    req = Req("open", fields=(("message", "hi"),), headers=((name, value),), stamp="valid")
    post_and_check(site, req, path)


def test_stored_referer_and_user_agent_are_one_line_without_nul(site: Site) -> None:
    headers = (("User-Agent", "Agent\x00/1.0\x7f"), ("Referer", "https://a.example/\x00p"))
    response = post_and_check(site, Req("open", fields=(("message", "hi"),), headers=headers))
    assert response.status_code == 303
    row = site.newest(site.forms["open"])
    assert (row.user_agent, row.referrer) == ("Agent/1.0", "https://a.example/p")


@pytest.mark.parametrize(
    ("name", "value"),
    [("Referer", "http://["), ("Referer", "\x00"), ("Origin", "http://["), ("Accept", "q=nan")],
)
@pytest.mark.parametrize("path", ["/f/{id}", "/f/{id}/thanks"])
def test_odd_header_values_never_fail_the_pages(
    site: Site, path: str, name: str, value: str
) -> None:
    response = site.visitor().get(path.format(id=site.forms["guarded"]), headers={name: value})
    assert response.status_code == 200
    preflight = site.visitor().options(
        f"/f/{site.forms['guarded']}", headers={name: value, "Origin": value}
    )
    assert preflight.status_code == 204


# =================================================================================================
# Allowed domains: Origin null, and the ports _next may go to
# =================================================================================================


def test_origin_null_without_a_referer_is_refused_when_domains_are_listed(site: Site) -> None:
    headers = (("Origin", "null"),)
    assert_refused_site(
        post_and_check(
            site, Req("guarded", fields=(("message", "hi"),), headers=headers + JSON_ANSWER)
        )
    )
    page = post_and_check(site, Req("guarded", fields=(("message", "hi"),), headers=headers))
    assert page.status_code == 403
    assert "This form does not accept submissions from this website." in page.get_data(as_text=True)
    vouched = post_and_check(
        site, Req("guarded", fields=(("message", "hi"),), headers=headers + FROM_OK)
    )
    assert vouched.status_code == 303
    open_form = post_and_check(site, Req("open", fields=(("message", "hi"),), headers=headers))
    assert open_form.status_code == 303


@pytest.mark.parametrize(
    ("next_url", "followed"),
    [
        ("https://ok.example/merci", True),
        ("https://ok.example:443/merci", True),
        ("http://ok.example:80/merci", True),
        ("https://ok.example:8443/merci", False),
        ("http://ok.example:443/merci", False),
        ("https://ok.example:1/merci", False),
        ("https://shop.example:8443/merci", True),
        ("http://shop.example:8443/merci", True),
        ("https://shop.example/merci", False),
        ("https://shop.example:443/merci", False),
        (f"{BASE_URL}/f/x/thanks", True),
        ("http://mailslot.test:8080/f/x/thanks", False),
    ],
)
def test_next_is_followed_only_on_the_port_the_allowed_entry_names(
    site: Site, next_url: str, followed: bool
) -> None:
    fields = (("message", "hi"), ("_next", next_url))
    response = post_and_check(site, Req("guarded", fields=fields, headers=FROM_OK))
    assert response.status_code == 303
    expected = next_url.replace(":443/", "/").replace(":80/", "/") if followed else None
    default = f"{BASE_URL}/f/{site.forms['guarded']}{THANKS}"
    assert response.headers["Location"] == (expected or default)


def test_next_without_allowed_domains_stays_on_the_posting_sites_port(site: Site) -> None:
    headers = (("Referer", "https://site.example:8443/contact"),)
    same = post_and_check(site, Req("open", fields=(("_next", "/merci"),), headers=headers))
    assert same.headers["Location"] == "https://site.example:8443/merci"
    other = post_and_check(
        site, Req("open", fields=(("_next", "https://site.example/merci"),), headers=headers)
    )
    assert other.headers["Location"] == f"{BASE_URL}/f/{site.forms['open']}{THANKS}"


# =================================================================================================
# The hosted page's render stamp is bound to its form
# =================================================================================================


@pytest.mark.parametrize("stamp", ["valid", "other"])
def test_render_stamp_is_accepted_only_on_its_own_form(site: Site, stamp: str) -> None:
    """The stamp stands in for the session's CSRF token: one form's stamp must not open another."""
    req = Req("open", fields=(("name", "Ann"), ("email", "a@example.org"), ("message", "hi")))
    response = post_and_check(site, dataclasses.replace(req, stamp=stamp), "/f/{id}/page")
    if stamp == "valid":
        assert response.status_code == 303
    else:
        assert response.status_code == 400
        assert "This form expired. Reload the page and send it again." in response.get_data(
            as_text=True
        )


def test_render_stamp_of_another_form_counts_as_forged_for_spam_timing(site: Site) -> None:
    """With a valid session token the post goes through, but another form's stamp is no stamp."""
    public_id, other = site.forms["open"], site.forms["guarded"]
    visitor = site.visitor()
    page = visitor.get(f"/f/{public_id}").get_data(as_text=True)
    token = page.split('name="csrf_token" type="hidden" value="', 1)[1].split('"', 1)[0]
    data = {
        "name": "Ann",
        "email": "a@example.org",
        "message": "hi",
        "csrf_token": token,
        "_rendered": site.stamp(other),
    }
    assert visitor.post(f"/f/{public_id}/page", data=data).status_code == 303
    reasons = site.newest(public_id).spam_reason.split("; ")
    assert "the page's render stamp is missing or forged" in reasons


def test_render_stamp_binds_its_form_in_the_service(site: Site) -> None:
    with site.app.test_request_context():
        stamp = intake.render_token(site.forms["open"])
        assert intake.render_stamp_valid(stamp, site.forms["open"])
        assert not intake.render_stamp_valid(stamp, site.forms["guarded"])


# =================================================================================================
# Properties: generated requests at every public route
# =================================================================================================

_ODD = [
    "\ud800",
    "\udfff",
    "\x00",
    "\r\n",
    "\\",
    "\uff03",
    "\uff0f",
    "\uff1f",
    "\uff20",
    "e\u0301",
    "\u212a",
    "\ufeff",
    "\u2028",
    "[",
    "]",
    "%",
    "%ff",
    "=?utf-8?q?a=0D=0ABcc:_x@y?=",
]
_any_text = st.text(st.characters(exclude_categories=()), max_size=12)  # surrogates included
_text = st.builds("{}{}{}".format, _any_text, st.sampled_from(["", *_ODD]), _any_text)
_header_char = st.characters(codec="latin-1", exclude_characters="\r\n")
_header_text = st.text(_header_char, max_size=60)
_url = st.builds(
    "{}{}{}{}{}".format,
    st.sampled_from(["https://", "http://", "", "//", "ftp://", "javascript:", "https:", "\\\\"]),
    st.sampled_from(
        ["ok.example", "OK.Example", "shop.example", "evil.example", "mailslot.test", "[", "[::1]",
         "\uff4f\uff4b.example", "ok.example\uff03", "a..b", "xn--", "", "@", "ok.example@evil"]
    ),
    st.sampled_from(["", ":", ":0", ":80", ":443", ":8443", ":99999", ":-1", ":x"]),
    st.sampled_from(["", "/", "/merci", "/\\evil", "?q=1", "#top", "/\x00"]),
    _text,
)  # fmt: skip
_value = st.one_of(_text, _url, st.sampled_from(MALFORMED_NEXT))
_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**2000), max_value=2**2000),
    st.floats(),
    _text,
)
_json_value = st.recursive(
    _json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=8,
)
_key = st.one_of(
    st.sampled_from(["message", "name", "email", "_next", "_subject", "_replyto", HONEYPOT,
                     "csrf_token", "_rendered", "caf\u00e9", "cafe\u0301", "", "_", "x" * 101]),
    _text,
)  # fmt: skip
_fields = st.lists(st.tuples(_key, _value), max_size=6)
_CONTENT_TYPES = [
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded; charset=bogus",
    "application/x-www-form-urlencoded;;;",
    "multipart/form-data",
    "multipart/form-data; boundary=",
    f"multipart/form-data; boundary={BOUNDARY}",
    f"multipart/form-data; charset=latin-1; boundary={BOUNDARY}",
    "multipart/form-data; boundary=Other",
    "application/json",
    "application/json; charset=utf-16",
    "application/json; charset=\x00",
    "text/plain",
    "",
    ";",
]
_content_type = st.one_of(st.none(), st.sampled_from(_CONTENT_TYPES), _header_text)
_header_names = ["Origin", "Referer", "X-Requested-With", "Accept", "X-Forwarded-For", "User-Agent"]
_headers = st.lists(
    st.tuples(
        st.sampled_from(_header_names),
        st.one_of(_header_text, _url.filter(lambda u: "\r" not in u and "\n" not in u),
                  st.sampled_from(["null", "XMLHttpRequest", "application/json", "*/*;q=nan",
                                   "https://ok.example", "https://ok.example/contact"])),
    ),
    max_size=4,
).map(tuple)  # fmt: skip


def _latin1_safe(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Header values as a server hands them to the app: latin-1 text without line breaks."""
    return tuple(
        (name, value.encode("latin-1", "replace").decode("latin-1"))
        for name, value in headers
        if "\r" not in value and "\n" not in value
    )


_structured = st.builds(
    Req,
    form=st.sampled_from(["open", "guarded"]),
    encoding=st.sampled_from(["urlencoded", "multipart", "json"]),
    fields=_fields.map(tuple),
    content_type=st.one_of(st.none(), st.none(), _content_type),
    headers=_headers.map(_latin1_safe),
)
_json_structured = st.builds(
    Req,
    form=st.sampled_from(["open", "guarded"]),
    encoding=st.just("json"),
    fields=st.lists(st.tuples(_key, _json_value), max_size=5).map(tuple),
    headers=_headers.map(_latin1_safe),
)
_raw = st.builds(
    Req,
    form=st.sampled_from(["open", "guarded"]),
    encoding=st.just("raw"),
    raw=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda n: b"[" * n + b"]" * n, st.integers(0, 3000)),
        st.builds(lambda n: b'{"a":' + b"[" * n, st.integers(0, 3000)),
    ),
    content_type=_content_type,
    headers=_headers.map(_latin1_safe),
)
_requests = st.one_of(_structured, _json_structured, _raw)

_PROPERTY_SETTINGS = settings(
    settings.default,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Inputs found by these properties or by hand; each is replayed on every run.
_FOUND = [
    Req(fields=(("message", "x"), ("_next", "http://["))),
    Req(fields=(("_next", "https://ok.example\uff03@evil.example/"),), headers=FROM_OK),
    Req(fields=(("_next", "https://ok.example\uff0fevil.example/"),), headers=FROM_SITE),
    Req(fields=(("_next", "https://" + "a" * 64 + ".example/"),)),
    Req(fields=(("message", "x"),), headers=(("Referer", "http://["),)),
    Req("guarded", fields=(("message", "x"),), headers=(("Origin", "null"),)),
    Req(encoding="raw", raw=b"[" * DEEP + b"]" * DEEP, content_type="application/json"),
    Req(encoding="json", fields=(("_subject", "\ud800"), ("_replyto", "\ud800"))),
    Req(encoding="json", fields=(("k\ud800", "v\udfff"),)),
    Req(encoding="json", fields=(("_next", "\x00"), ("m", "\x00"))),
    Req(encoding="raw", raw=b"m=\xff\xfe", content_type="application/x-www-form-urlencoded"),
    Req(encoding="raw", raw=multipart([("m", "x")]), content_type="multipart/form-data"),
    Req(encoding="multipart", fields=(("cafe\u0301", "a"), ("caf\u00e9", "b"))),
    Req(encoding="json", fields=(("n", 2**1500),)),
    Req(headers=(("User-Agent", "\x00"), ("Referer", "https://ok.example/\x00"))),
    Req("guarded", fields=(("m", "x"),), headers=(("Referer", "\x00"),)),
    Req("guarded", fields=(("_next", "https://ok.example:8443/"),), headers=FROM_OK),
    Req(encoding="raw", raw=b'{"n": 1' + b"0" * 5000 + b"}", content_type="application/json"),
    Req(encoding="raw", raw=b"", content_type=f"multipart/form-data; boundary={BOUNDARY}"),
    Req(encoding="raw", raw=b"junk", content_type=f"multipart/form-data; boundary={BOUNDARY}"),
    Req(  # a part without a name
        encoding="raw",
        raw=multipart([("m", "x")]).replace(b'; name="m"', b""),
        content_type=f"multipart/form-data; boundary={BOUNDARY}",
    ),
]


def _pin(found: list[Req], **also: Any) -> Any:
    """Decorate a property with every input in ``found`` as an explicit example."""

    def decorate(test: Any) -> Any:
        for req in reversed(found):
            test = example(req=req, **also)(test)
        return test

    return decorate


@_pin(_FOUND)
@settings(_PROPERTY_SETTINGS, max_examples=350)
@given(req=_requests)
def test_any_post_to_the_endpoint_is_answered_below_500_and_kept_when_accepted(
    site: Site, req: Req
) -> None:
    post_and_check(site, req)


_HOSTED_FOUND = [
    Req(fields=(("message", "x"),), stamp="valid"),
    Req(fields=(("message", "x"),), stamp="other"),
    Req(fields=(("message", "x"),), stamp="\ud800"),
    Req(fields=(("message", "x"), ("csrf_token", "\udfff")), stamp="\x00"),
    Req(fields=(("_subject", "\ud800"), ("message", "x")), stamp="valid"),
    Req(encoding="raw", raw=multipart([("m", "x")]), content_type="multipart/form-data"),
]


@_pin(_HOSTED_FOUND)
@settings(_PROPERTY_SETTINGS, max_examples=250)
@given(
    req=st.builds(
        Req,
        form=st.sampled_from(["open", "guarded"]),
        encoding=st.sampled_from(["urlencoded", "multipart", "raw"]),
        fields=_fields.map(tuple),
        raw=st.binary(max_size=200),
        content_type=st.one_of(st.none(), st.none(), _content_type),
        headers=_headers.map(_latin1_safe),
        stamp=st.one_of(st.sampled_from(["valid", "valid", "other", ""]), _text),
    )
)
def test_any_post_to_the_hosted_page_is_answered_below_500_and_kept_when_accepted(
    site: Site, req: Req
) -> None:
    post_and_check(site, req, "/f/{id}/page")


_PAGES_FOUND = [
    Req(headers=(("Referer", "http://["),)),
    Req(headers=(("Referer", "https://ok.example\uff03@x/"),)),
    Req(headers=(("Referer", "https://a..b/"),)),
    Req("guarded", headers=(("Origin", "http://["),)),
]


@_pin(_PAGES_FOUND, path="/f/{id}/thanks")
@_pin(_PAGES_FOUND, path="/f/{id}")
@settings(_PROPERTY_SETTINGS, max_examples=150)
@given(
    req=st.builds(
        Req,
        form=st.sampled_from(["open", "guarded"]),
        headers=_headers.map(_latin1_safe),
        query=st.text(_header_char, max_size=30),
    ),
    path=st.sampled_from(["/f/{id}", "/f/{id}/thanks"]),
)
def test_the_hosted_page_and_thanks_page_answer_any_headers(
    site: Site, req: Req, path: str
) -> None:
    before = site.state(site.forms[req.form])
    response = send(site, req, path, method="GET")
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    preflight = send(site, req, "/f/{id}", method="OPTIONS")
    assert preflight.status_code == 204
    assert site.state(site.forms[req.form]) == before

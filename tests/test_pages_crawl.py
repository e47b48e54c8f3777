"""Every GET route, logged out and logged in: security headers, no inline script or style, a title
and one <h1> on each HTML page. Also the pieces of the pages that only rendering shows: the
frame-ancestors of hosted pages, HSTS in production, relative times and the 30-day chart.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st

import dal
import intake
import microapp
import records
import services
import web
from conftest import FAST_HASH, AuthActions, post_form

CSP = "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors {}"
SETTINGS = {"notify": "y", "status": "active", "honeypot_field": "_gotcha"}


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The chart's per-day query is dialect-specific: run this module on both databases."""
    return request.param


SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"])


# =================================================================================================
# Helpers
# =================================================================================================


@dataclass
class PageFacts:
    """What an HTML page holds that the CSP and accessibility checks care about."""

    titles: list[str] = field(default_factory=list)
    h1: int = 0
    inline_scripts: int = 0
    style_elements: int = 0
    style_attributes: list[str] = field(default_factory=list)
    event_handlers: list[str] = field(default_factory=list)
    script_sources: list[str] = field(default_factory=list)


class PageParser(HTMLParser):
    """Real attributes and elements, not text: the install snippet shows `style=` as code."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.facts = PageFacts()
        self._in_title = False
        self._svg_depth = 0  # an SVG <title> is a tooltip, not the page's title

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Count the tags and attributes that matter."""
        names = dict(attrs)
        if tag == "svg":
            self._svg_depth += 1
        elif tag == "title" and not self._svg_depth:
            self._in_title = True
            self.facts.titles.append("")
        elif tag == "h1":
            self.facts.h1 += 1
        elif tag == "script":
            if names.get("src"):
                self.facts.script_sources.append(names["src"] or "")
            else:
                self.facts.inline_scripts += 1
        elif tag == "style":
            self.facts.style_elements += 1
        for name, _value in attrs:
            if name == "style":
                self.facts.style_attributes.append(tag)
            elif name.startswith("on"):
                self.facts.event_handlers.append(f"{tag}[{name}]")

    def handle_endtag(self, tag: str) -> None:
        """Leave the title or an SVG."""
        if tag == "title":
            self._in_title = False
        elif tag == "svg":
            self._svg_depth -= 1

    def handle_data(self, data: str) -> None:
        """Collect the title's text."""
        if self._in_title:
            self.facts.titles[-1] += data


def page_facts(html: str) -> PageFacts:
    """Parse one page."""
    parser = PageParser()
    parser.feed(html)
    parser.close()
    return parser.facts


def assert_security_headers(response: Any, frame_ancestors: str = "'none'") -> None:
    """The headers every response carries (HSTS only in production: see its own test)."""
    assert response.headers["Content-Security-Policy"] == CSP.format(frame_ancestors)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    assert response.headers.get("Content-Type", "").count("charset=") <= 1


def assert_clean_page(path: str, response: Any) -> None:
    """An HTML page the CSP can run unchanged, with a title and exactly one <h1>."""
    facts = page_facts(response.get_data(as_text=True))
    assert facts.inline_scripts == 0, f"{path}: inline <script>"
    assert facts.style_elements == 0, f"{path}: <style> element"
    assert facts.style_attributes == [], f"{path}: style= on {facts.style_attributes}"
    assert facts.event_handlers == [], f"{path}: inline handlers {facts.event_handlers}"
    assert len(facts.titles) == 1, f"{path}: {len(facts.titles)} <title> elements"
    assert facts.titles[0].strip(), f"{path}: an empty <title>"
    assert facts.h1 == 1, f"{path}: {facts.h1} <h1> elements"
    assert all(src.startswith("/static/") for src in facts.script_sources), path


def create_form(client: FlaskClient, name: str, **values: str) -> str:
    """A form made through /forms/new; its public id."""
    response = post_form(client, "/forms/new", {"name": name, **SETTINGS, **values})
    assert response.status_code == 302, response.get_data(as_text=True)
    return response.headers["Location"].rsplit("/", 1)[1]


def submit(client: FlaskClient, public_id: str, data: dict[str, str]) -> str:
    """Post to the public endpoint as fetch() would; the submission's id."""
    response = client.post(f"/f/{public_id}", data=data, headers={"Accept": "application/json"})
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.json["id"]


def get_routes(app: Flask, values: dict[str, str]) -> list[str]:
    """Every GET route with its URL parameters filled in; an unknown parameter fails loudly."""
    paths = []
    for rule in app.url_map.iter_rules():
        if "GET" not in (rule.methods or set()) or rule.endpoint == "static":
            continue
        missing = set(rule.arguments) - set(values)
        assert not missing, f"teach the crawl the parameters {missing} of {rule.rule}"
        template = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        paths.append(template.format(**values))
    return sorted(set(paths))


def _route_values(client: FlaskClient, auth: AuthActions) -> dict[str, str]:
    """An owner with a form and a submission: ids for every URL parameter."""
    auth.signup()
    public_id = create_form(client, "Contact")
    submission_id = submit(client, public_id, {"email": "ann@example.org", "message": "Hi"})
    return {
        "public_id": public_id,
        "form_id": public_id,
        "submission_id": submission_id,
        "token": "not-a-token",
    }


# =================================================================================================
# The crawl
# =================================================================================================


@SQLITE_ONLY
def test_every_get_route_sends_the_headers_and_clean_html(
    app: Flask, client: FlaskClient, auth: AuthActions
) -> None:
    values = _route_values(client, auth)
    routes = get_routes(app, values)
    assert "/forms/{public_id}".format(**values) in routes
    visitor = app.test_client()
    pages_seen: dict[str, set[str]] = {"owner": set(), "visitor": set()}
    for who, browser in (("owner", client), ("visitor", visitor)):
        for path in routes:
            response = browser.get(path)
            response.get_data()  # read streamed exports to the end, inside their context
            assert response.status_code < 500, f"{who} {path}: {response.status_code}"
            assert_security_headers(response, "*" if path.startswith("/f/") else "'none'")
            if response.mimetype == "text/html" and response.status_code != 302:
                assert_clean_page(f"{who} {path}", response)
                pages_seen[who].add(path)
    owner_pages = {p for p in routes if not p.startswith(("/api/v1/", "/confirm/", "/healthz"))}
    owner_pages -= {p for p in routes if p.endswith((".csv", ".json")) or p == "/readyz"}
    assert pages_seen["owner"] == owner_pages  # every page really rendered, none skipped
    assert {"/", "/login", "/signup", "/f/{public_id}".format(**values)} <= pages_seen["visitor"]


@SQLITE_ONLY
@pytest.mark.parametrize(
    "path",
    ["/nope", "/f/nope", "/forms/nope", "/static/style.css", "/static/app.js", "/healthz"],
)
def test_errors_assets_and_json_carry_the_headers_too(
    client: FlaskClient, auth: AuthActions, path: str
) -> None:
    auth.signup()
    response = client.get(path)
    assert_security_headers(response)
    if response.mimetype == "text/html":
        assert_clean_page(path, response)


@SQLITE_ONLY
def test_hosted_pages_may_be_framed_only_by_the_allowed_domains(
    app: Flask, client: FlaskClient, auth: AuthActions
) -> None:
    auth.signup()
    open_form = create_form(client, "Open")
    listed = create_form(client, "Listed", allowed_domains="example.com\nshop.example.com:8443")
    visitor = app.test_client()
    for path in (f"/f/{open_form}", f"/f/{open_form}/thanks"):
        assert_security_headers(visitor.get(path), "*")
    for path in (f"/f/{listed}", f"/f/{listed}/thanks"):
        expected = "'self' example.com shop.example.com:8443"
        assert_security_headers(visitor.get(path), expected)
    # The owner's pages about the same form are never frameable.
    assert_security_headers(client.get(f"/forms/{listed}"), "'none'")
    assert_security_headers(visitor.get("/f/unknown"), "'none'")


@pytest.mark.parametrize(("env", "hsts"), [("development", False), ("production", True)])
def test_hsts_is_sent_only_in_production(tmp_path: Path, env: str, hsts: bool) -> None:
    app = microapp.create_app(
        instance_path=str(tmp_path / "instance"),
        password_hash_method=FAST_HASH,
        env=env,
        secret_key="s" * 40,
    )
    for path in ("/", "/healthz", "/static/style.css"):
        response = app.test_client().get(path)
        assert_security_headers(response)
        header = response.headers.get("Strict-Transport-Security")
        assert header == ("max-age=31536000; includeSubDomains" if hsts else None)


@SQLITE_ONLY
def test_copy_buttons_are_hidden_until_the_script_shows_them(
    client: FlaskClient, auth: AuthActions
) -> None:
    auth.signup()
    public_id = create_form(client, "Contact")
    page = client.get(f"/forms/{public_id}").get_data(as_text=True)
    buttons = re.findall(r"<button[^>]*data-copy=\"([^\"]+)\"[^>]*>", page)
    assert set(buttons) == {"snippet-action", "snippet-html", "snippet-fetch"}
    assert all(" hidden" in b for b in re.findall(r"<button[^>]*data-copy=[^>]*>", page))
    for target in buttons:
        assert f'id="{target}"' in page
    assert '<script src="/static/app.js" defer></script>' in page


# =================================================================================================
# Relative times and the chart
# =================================================================================================

NOW = dt.datetime(2025, 6, 15, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("ago", "text"),
    [
        (dt.timedelta(seconds=5), "just now"),
        (dt.timedelta(minutes=1), "1 minute ago"),
        (dt.timedelta(minutes=59), "59 minutes ago"),
        (dt.timedelta(hours=1), "1 hour ago"),
        (dt.timedelta(hours=23), "23 hours ago"),
        (dt.timedelta(days=1, hours=3), "yesterday"),
        (dt.timedelta(days=12), "12 days ago"),
        (dt.timedelta(days=45), "1 May 2025"),
        (dt.timedelta(seconds=-30), "just now"),  # a clock a little ahead is not "in the future"
    ],
)
def test_relative_time_reads_like_a_person_would_say_it(ago: dt.timedelta, text: str) -> None:
    assert web.relative_time(NOW - ago, now=NOW) == text


@SQLITE_ONLY
def test_inbox_times_are_relative_with_the_exact_time_on_hover(
    app: Flask, client: FlaskClient, auth: AuthActions
) -> None:
    auth.signup()
    public_id = create_form(client, "Contact")
    submit(client, public_id, {"message": "hi"})
    page = client.get(f"/forms/{public_id}").get_data(as_text=True)
    match = re.search(r'<time datetime="([^"]+)" title="([^"]+)">([^<]+)</time>', page)
    assert match
    stamp = dt.datetime.fromisoformat(match.group(1))
    assert match.group(2) == stamp.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert match.group(3) == "just now"


@pytest.fixture
def contact_form(app: Flask, client: FlaskClient, auth: AuthActions) -> Any:
    """A signed-up owner's (logged-in ``client``) form "Contact", as the public side sees it."""
    auth.signup()
    public_id = create_form(client, "Contact")
    with app.app_context():
        return intake.public_form(public_id)


def test_inbox_chart_counts_submissions_per_day_for_30_days(
    app: Flask, client: FlaskClient, contact_form: Any
) -> None:
    form = contact_form
    with app.app_context():
        today = dal.utcnow().replace(hour=0, minute=30, second=0, microsecond=0)
        stamps = {0: 2, 1: 1, 29: 3, 30: 4}  # days ago -> count; 30 days ago is outside
        for days_ago, count in stamps.items():
            for _ in range(count):
                _insert(form, today - dt.timedelta(days=days_ago), spam=False)
        _insert(form, today, spam=True)  # spam is not counted
        per_day = services.submissions_per_day(form)
    assert len(per_day) == 30
    assert per_day[-1].day == today.date()
    assert per_day[0].day == today.date() - dt.timedelta(days=29)
    assert [d.count for d in per_day] == [3] + [0] * 27 + [1, 2]

    page = client.get(f"/forms/{form.public_id}").get_data(as_text=True)
    chart = page[page.index('<figure class="chart"') : page.index("</figure>")]
    assert "<strong>6</strong> in the last 30 days" in chart
    assert len(re.findall(r'<rect class="bar"', chart)) == 30
    assert f"the busiest day was {per_day[0].day.isoformat()} with 3." in chart
    assert chart.count(": 0 submissions</title>") == 27
    assert facts_ok(chart)


@given(
    counts=st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=30),
)
def test_the_chart_layout_scales_bars_to_the_busiest_day(counts: list[int]) -> None:
    first = dt.date(2025, 6, 1)
    per_day = [records.DayCount(first + dt.timedelta(days=i), n) for i, n in enumerate(counts)]
    chart = web.chart_geometry(per_day)
    assert (chart.width, chart.total, len(chart.bars)) == (
        10 * len(counts),
        sum(counts),
        len(counts),
    )
    assert chart.busiest_count == max(counts)
    assert chart.busiest_day == (first + dt.timedelta(days=counts.index(max(counts)))).isoformat()
    for index, (bar, count) in enumerate(zip(chart.bars, counts, strict=True)):
        height = float(bar.bar_height)
        assert abs(float(bar.bar_y) + height - 60) < 0.011  # every bar stands on the baseline
        assert (bar.x, bar.bar_x) == (index * 10, index * 10 + 1.5)
        if count == 0:
            assert height == 1
            assert "empty-day" in bar.css_class
        else:
            assert 1.5 <= height <= 56
            assert bar.title.endswith(f": {count} submission{'' if count == 1 else 's'}")
        if count == max(counts) and count:
            assert height == 56
    assert chart.bars[-1].css_class.endswith(" today")


def test_booleans_read_yes_and_no_and_other_values_pass_through() -> None:
    assert [web.yes_no(v) for v in (True, False, "true", 0, 1, None)] == [
        "Yes",
        "No",
        "true",
        0,
        1,
        None,
    ]
    assert (web.status_title(404), web.status_title(418)) == ("Not found", "Error")


def test_inbox_chart_caches_past_days_and_counts_today_live(app: Flask, contact_form: Any) -> None:
    form = contact_form
    with app.app_context():
        now = dal.utcnow()
        before = now - dt.timedelta(days=2)
        _insert(form, before, spam=False)
        assert services.submissions_per_day(form)[-3].count == 1
        _insert(form, before, spam=False)
        _insert(form, before, spam=False)
        _insert(form, now, spam=False)
        per_day = services.submissions_per_day(form)
        assert per_day[-3].count == 1  # past days: from the cache (a minute old at most)
        assert per_day[-1].count == 1  # today: live, as in the list below the chart
        with dal.connection() as conn:
            rows = dal.submission_page(conn, form.id, before=None, limit=10, query="", spam=False)
        old = [row for row in rows if row.created_at < now - dt.timedelta(days=1)]
        services.mark_spam(old[0], True)  # the owner's verdict forgets the cached days
        assert services.submissions_per_day(form)[-3].count == 2
        services.delete_submission(old[1])  # and so does a delete
        assert services.submissions_per_day(form)[-3].count == 1


def test_stats_block_agrees_with_the_chart_and_shows_new_submissions_at_once(
    app: Flask, contact_form: Any
) -> None:
    form = contact_form
    with app.app_context():
        now = dal.utcnow()
        for days_ago in (0, 6, 7):  # "last 7 days" is today and the six days before it
            _insert(form, now - dt.timedelta(days=days_ago), spam=False)
        _insert(form, now, spam=True)
        stats, per_day = services.inbox_numbers(form)
        assert stats == {"today": 1, "week": 2, "spam": 1, "honeypot": 0}
        assert per_day[-1].count == stats["today"]
        _insert(form, now, spam=False)
        stats, _ = services.inbox_numbers(form)
        assert (stats["today"], stats["week"]) == (2, 3)  # not a minute later


def _insert(form: Any, when: dt.datetime, spam: bool) -> None:
    """One stored submission received at ``when``."""
    with mock.patch.object(dal, "utcnow", return_value=when), dal.transaction() as conn:
        dal.insert_submission(
            conn,
            {
                "public_id": dal.new_public_id(),
                "form_id": form.id,
                "data": {"message": "hi"},
                "schema_version": form.schema_version,
                "is_spam": spam,
                "meta": {},
            },
        )


def facts_ok(fragment: str) -> bool:
    """A fragment of HTML with no style attribute, style element or inline script."""
    facts = page_facts(fragment)
    return not (facts.style_attributes or facts.style_elements or facts.inline_scripts)


@SQLITE_ONLY
def test_an_empty_inbox_chart_is_a_flat_line_not_an_error(
    client: FlaskClient, auth: AuthActions
) -> None:
    auth.signup()
    public_id = create_form(client, "Contact")
    page = client.get(f"/forms/{public_id}").get_data(as_text=True)
    assert "<strong>0</strong> in the last 30 days" in page
    assert page.count('class="day empty-day') == 30

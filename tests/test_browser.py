"""Real-browser tests: Playwright drives the system Chromium against Mailslot served by waitress.

Each test gets a fresh app on 127.0.0.1 and a free port (and, where a "website" is needed, a
plain static HTML server on another port). Screenshots go to ``test-artifacts/``; with
``MAILSLOT_UPDATE_DOCS=1`` the README's screenshots under ``docs/`` are refreshed too.
Chromium comes from the system (``apt-get install -y chromium``); a missing browser skips
locally and fails in CI (``MAILSLOT_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import csv
import datetime as dt
import http.server
import io
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from flask import Flask

import dal
import intake
import microapp
import services
import tasks
from conftest import (
    FAST_HASH,
    PASSWORD,
    AuthActions,
    confirmation_link,
    free_port,
    need_service,
    post_form,
    read_outbox,
)

pytestmark = pytest.mark.services

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
PROJECT_DIR = Path(__file__).resolve().parent.parent
ARTIFACTS = PROJECT_DIR / "test-artifacts"
DOCS = PROJECT_DIR / "docs"
DESKTOP = {"width": 1280, "height": 800}
# The screenshots the README shows (docs/), refreshed with MAILSLOT_UPDATE_DOCS=1.
DOC_SHOTS = {"landing", "inbox", "hosted-form", "hosted-form-mobile", "hosted-form-errors"}
PHONE = {"width": 390, "height": 844}
CONTACT_FIELDS = [
    {"name": "name", "label": "Your name", "type": "text"},
    {"name": "email", "label": "Email address", "type": "email", "required": "y"},
    {
        "name": "message",
        "label": "How can we help?",
        "type": "textarea",
        "required": "y",
        "help": "A sentence or two is plenty.",
    },
]


# =================================================================================================
# Fixtures: the browser, the live app, a static "website"
# =================================================================================================


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """The system Chromium, headless, driven by Playwright."""
    need_service(CHROMIUM.exists(), f"Chromium is missing at {CHROMIUM}: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need_service(False, "Playwright for Python is not installed")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@dataclass
class LiveApp:
    """The app and the address waitress serves it on."""

    app: Flask
    url: str

    def owner(self) -> AuthActions:
        """A signed-up owner through the real pages (the test client shares the database)."""
        auth = AuthActions(self.app.test_client(), self.app)
        auth.signup()
        return auth

    def create_form(self, auth: AuthActions, name: str, fields: list[dict[str, str]]) -> str:
        """A form with these fields, made through /forms/new and the builder; its public id."""
        created = post_form(
            auth.client,
            "/forms/new",
            {"name": name, "notify": "y", "status": "active", "honeypot_field": "_gotcha"},
        )
        assert created.status_code == 302, created.get_data(as_text=True)
        public_id = created.headers["Location"].rsplit("/", 1)[1]
        rows = {"action": "save"}
        for index, spec in enumerate(fields):
            rows.update({f"fields-{index}-{key}": value for key, value in spec.items()})
        saved = post_form(auth.client, f"/forms/{public_id}/fields", rows)
        assert saved.status_code == 302, saved.get_data(as_text=True)
        return public_id

    def human_pause(self, page: Any) -> None:
        """Wait as long as a person would before sending: faster posts count as spam."""
        seconds = getattr(self.app.extensions["mailslot.settings"], "spam_min_seconds", 0)
        page.wait_for_timeout(int(seconds * 1000) + 300)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveApp]:
    """Mailslot in embedded mode, served by waitress on 127.0.0.1 and a free port."""
    import waitress

    port = free_port()
    app = microapp.create_app(
        instance_path=str(tmp_path / "instance"),
        password_hash_method=FAST_HASH,
        base_url=f"http://127.0.0.1:{port}",
        redis_key_prefix=f"mailslot-browser-{uuid.uuid4().hex[:8]}:",
    )
    server = waitress.create_server(app, host="127.0.0.1", port=port, threads=4)
    thread = threading.Thread(target=server.run, name="waitress", daemon=True)
    thread.start()
    yield LiveApp(app, f"http://127.0.0.1:{port}")
    server.close()
    thread.join(timeout=5)
    tasks.hand_over(app, timeout=60)  # nothing of this test delivers after it ended
    with app.app_context():
        dal.database().engine.dispose()


class StaticSite:
    """A plain static website on its own port: a dict of path -> (content type, body)."""

    def __init__(self) -> None:
        site = self
        self.files: dict[str, tuple[str, str]] = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                """Serve a file from the dict, or 404."""
                content_type, body = site.files.get(self.path, ("text/plain", "not found"))
                data = body.encode()
                self.send_response(200 if self.path in site.files else 404)
                self.send_header("Content-Type", f"{content_type}; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                """Quiet."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def site() -> Iterator[StaticSite]:
    """A running static website."""
    static = StaticSite()
    static.thread.start()
    yield static
    static.server.shutdown()
    static.server.server_close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh desktop tab; script errors, CSP violations and broken assets fail the test."""
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda msg: _keep_console_error(errors, msg))
    tab.on("response", lambda response: _keep_broken_asset(errors, response))
    tab.set_default_timeout(10_000)
    yield tab
    context.close()
    assert errors == [], f"errors in the browser: {errors}"


def _keep_console_error(errors: list[str], message: Any) -> None:
    """Console errors, except Chromium's echo of a page answering 4xx (checked elsewhere)."""
    if message.type == "error" and not message.text.startswith("Failed to load resource"):
        errors.append(message.text)


def _keep_broken_asset(errors: list[str], response: Any) -> None:
    """A stylesheet, script, icon or image that failed to load."""
    if response.status >= 400 and response.request.resource_type != "document":
        errors.append(f"{response.status} {response.url}")


def screenshot(tab: Any, name: str, full_page: bool = True) -> Path:
    """Save a screenshot under test-artifacts/ (and docs/ when asked to refresh them)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    tab.screenshot(path=str(path), full_page=full_page)
    if name in DOC_SHOTS and os.environ.get("MAILSLOT_UPDATE_DOCS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / path.name)
    return path


def log_in(tab: Any, live: LiveApp, email: str = "owner@example.com") -> None:
    """Log in through the login page."""
    tab.goto(f"{live.url}/login")
    tab.get_by_label("Email", exact=True).fill(email)
    tab.get_by_label("Password", exact=True).fill(PASSWORD)
    tab.get_by_role("button", name="Log in").click()
    tab.wait_for_url(f"{live.url}/forms")


# =================================================================================================
# 1. Sign up, confirm, log in, create a form, add three fields
# =================================================================================================


def test_owner_signs_up_confirms_logs_in_and_builds_a_form(page: Any, live: LiveApp) -> None:
    page.goto(live.url + "/")
    assert page.get_by_role("heading", level=1).count() == 1
    screenshot(page, "landing", full_page=False)

    page.get_by_role("link", name="Create an account").click()
    page.get_by_label("Email", exact=True).fill("owner@example.com")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Confirm password").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    page.wait_for_url(f"{live.url}/login")
    assert "Check your inbox at owner@example.com" in page.locator(".flash").inner_text()
    log_in(page, live)
    assert "You have no forms yet" in page.locator(".empty").inner_text()

    link = confirmation_link(read_outbox(live.app)[-1])
    assert link.startswith(live.url)
    page.goto(link)
    assert "Your email address is confirmed." in page.locator(".flash").inner_text()

    page.get_by_role("button", name="Log out").click()
    assert "You are logged out." in page.locator(".flash").inner_text()
    log_in(page, live)

    page.get_by_role("link", name="Create your first form").click()
    page.get_by_label("Name", exact=True).fill("Contact us")
    page.get_by_role("button", name="Create form").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Contact us"
    assert "No submissions yet" in page.locator(".empty").inner_text()

    page.get_by_role("navigation", name="Form").get_by_role("link", name="Fields").click()
    for index, spec in enumerate(CONTACT_FIELDS):
        page.get_by_role("button", name="Add a field").click()
        row = page.locator("fieldset.builder-row").nth(index)
        row.get_by_label("Field name", exact=True).fill(spec["name"])
        row.get_by_label("Label", exact=True).fill(spec["label"])
        row.get_by_label("Type", exact=True).select_option(spec["type"])
        if spec.get("required"):
            row.get_by_label("Required", exact=True).check()
        if spec.get("help"):
            row.get_by_label("Help text", exact=True).fill(spec["help"])
    page.get_by_role("button", name="Save fields").click()
    assert "Fields saved." in page.locator(".flash").inner_text()
    assert page.locator("fieldset.builder-row").count() == 3

    page.get_by_role("link", name="Hosted page").click()
    for spec in CONTACT_FIELDS:
        assert page.get_by_label(spec["label"]).count() == 1
    assert page.get_by_label("Email address").get_attribute("type") == "email"


# =================================================================================================
# 2. The hosted page: a missing required field, then the thanks page
# =================================================================================================


def test_hosted_page_shows_the_message_next_to_the_field_then_thanks(
    page: Any, browser: Any, live: LiveApp
) -> None:
    public_id = live.create_form(live.owner(), "Contact us", CONTACT_FIELDS)
    hosted = f"{live.url}/f/{public_id}"
    page.goto(hosted)
    assert page.title() == "Contact us"
    screenshot(page, "hosted-form")

    page.get_by_label("Your name").fill("Ada Lovelace")
    page.get_by_label("How can we help?").fill("Could you send me a quote?")
    page.get_by_role("button", name="Send").click()

    email = page.get_by_label("Email address")
    message = page.locator("#email-error")
    assert message.inner_text().endswith("This field is required.")
    assert email.get_attribute("aria-invalid") == "true"
    assert "email-error" in (email.get_attribute("aria-describedby") or "").split()
    field_box, message_box = email.bounding_box(), message.bounding_box()
    assert 0 <= message_box["y"] - (field_box["y"] + field_box["height"]) < 40  # right below it
    assert page.evaluate("document.activeElement.classList.contains('error-summary')")
    assert page.get_by_label("How can we help?").input_value() == "Could you send me a quote?"
    screenshot(page, "hosted-form-errors")

    email.fill("ada@example.org")
    live.human_pause(page)
    page.get_by_role("button", name="Send").click()
    page.wait_for_url(f"{hosted}/thanks")
    assert page.get_by_role("heading", level=1).inner_text() == "Thank you!"
    assert "Your submission to “Contact us” was received." in page.content()
    screenshot(page, "thanks")
    page.get_by_role("link", name="Back to the form").click()
    page.wait_for_url(hosted)

    phone = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True)
    try:
        small = phone.new_page()
        small.goto(hosted)
        width = small.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], "the hosted page scrolls sideways on a phone"
        screenshot(small, "hosted-form-mobile")
    finally:
        phone.close()


# =================================================================================================
# 3 and 4. A static website posts with the Install snippets; the owner reads and exports
# =================================================================================================


def test_install_snippets_work_from_a_static_site_and_land_in_the_inbox(
    page: Any, live: LiveApp, site: StaticSite
) -> None:
    live.create_form(live.owner(), "Website contact", CONTACT_FIELDS)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.url)
    log_in(page, live)
    page.get_by_role("link", name="Website contact").click()
    inbox_url = page.url

    # The owner copies the HTML snippet with the copy button (it appears only with JavaScript).
    copy = page.locator("button[data-copy='snippet-html']")
    copy.click()
    # The label changes when the clipboard promise resolves: wait for it rather than race it.
    copy.locator("text=Copied").wait_for(timeout=5000)
    assert copy.inner_text() == "Copied"
    html_snippet = page.evaluate("navigator.clipboard.readText()")
    assert html_snippet == page.locator("#snippet-html").text_content()
    fetch_snippet = page.locator("#snippet-fetch").text_content()

    # The owner pastes it into a static page and turns on the documented _next line.
    thanks_page = f"{site.url}/thank-you.html"
    commented = (
        '<!-- <input type="hidden" name="_next" value="https://your-site.example/thanks"> -->'
    )
    assert commented in html_snippet
    with_next = html_snippet.replace(
        commented, f'<input type="hidden" name="_next" value="{thanks_page}">'
    )
    site.files["/contact.html"] = ("text/html", _static_page("Contact", with_next))
    site.files["/thank-you.html"] = ("text/html", _static_page("Thanks", "<h1>Got it!</h1>"))
    site.files["/ajax.html"] = (
        "text/html",
        _static_page("Ajax", html_snippet, script="/ajax.js"),
    )
    site.files["/ajax.js"] = ("text/javascript", fetch_snippet)  # runs exactly as pasted

    visitor = page.context.browser.new_context(viewport=DESKTOP)
    try:
        tab = visitor.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        tab.goto(f"{site.url}/contact.html")
        tab.get_by_label("Your name").fill("Grace Hopper")
        tab.get_by_label("Email address").fill("grace@example.org")
        tab.get_by_label("How can we help?").fill("Plain HTML form from a static site")
        tab.get_by_role("button", name="Send").click()
        tab.wait_for_url(thanks_page)
        assert tab.get_by_role("heading", level=1).inner_text() == "Got it!"

        tab.goto(f"{site.url}/ajax.html")
        tab.get_by_label("Email address").fill("linus@example.org")
        tab.get_by_label("How can we help?").fill("Sent with fetch() and JSON back")
        with tab.expect_response(lambda r: r.request.method == "POST") as answer:
            tab.get_by_role("button", name="Send").click()
        assert answer.value.status == 201
        body = answer.value.json()
        assert body["ok"] is True
        assert body["id"]
        assert tab.url == f"{site.url}/ajax.html"  # fetch() answered; the page stayed
        tab.wait_for_timeout(200)
        assert errors == []  # a CORS refusal would surface as an unhandled rejection
    finally:
        visitor.close()

    # 4. The owner sees both in the inbox, opens one and exports CSV.
    page.goto(inbox_url)
    rows = page.locator("tbody tr")
    assert rows.count() == 2
    table = page.locator("table").inner_text()
    assert "Plain HTML form from a static site" in table
    assert "Sent with fetch() and JSON back" in table
    assert page.locator("tbody time").first.inner_text() == "just now"
    exact = rows.first.locator("time").get_attribute("title")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", exact)
    assert "2 in the last 30 days" in page.locator(".chart").inner_text()

    rows.filter(has_text="Sent with fetch()").get_by_role("link", name="Open").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Submission"
    answers = page.locator(".answers").inner_text()
    assert "linus@example.org" in answers
    assert "Sent with fetch() and JSON back" in answers

    page.goto(inbox_url)
    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    text = Path(download.value.path()).read_text(encoding="utf-8-sig")
    records = list(csv.DictReader(io.StringIO(text, newline="")))
    assert sorted(r["message"] for r in records) == [
        "Plain HTML form from a static site",
        "Sent with fetch() and JSON back",
    ]


def _static_page(title: str, body: str, script: str | None = None) -> str:
    """A minimal HTML page, as an owner's static site would have."""
    tag = f'<script src="{script}" defer></script>' if script else ""
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
        f"{tag}</head><body>{body}</body></html>"
    )


# =================================================================================================
# 5. Keyboard only
# =================================================================================================


def test_hosted_form_can_be_filled_and_sent_with_the_keyboard_alone(
    page: Any, live: LiveApp
) -> None:
    public_id = live.create_form(live.owner(), "Keyboard", CONTACT_FIELDS)
    page.goto(f"{live.url}/f/{public_id}")
    answers = {"name": "Kim", "email": "kim@example.org", "message": "Typed, never clicked."}
    for name, text in answers.items():
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.name") == name
        ring = page.evaluate("getComputedStyle(document.activeElement).boxShadow")
        assert ring != "none", f"no visible focus on {name}"
        page.keyboard.type(text)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Send"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none", "the Send button shows no focus"
    live.human_pause(page)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live.url}/f/{public_id}/thanks")
    with live.app.app_context():
        form = intake.public_form(public_id)
        rows, _ = services.inbox_page(form, before=None, query="", spam=False)
    assert [row.data for row in rows] == [answers]


# =================================================================================================
# Screenshots of a lived-in inbox (for the README)
# =================================================================================================


def test_screenshot_of_a_busy_inbox(page: Any, live: LiveApp) -> None:
    owner = live.owner()
    public_id = live.create_form(owner, "Website contact", CONTACT_FIELDS)
    now = dal.utcnow()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    received = [
        now - dt.timedelta(minutes=4 + 47 * n)
        if days_ago == 0
        else midnight - dt.timedelta(days=days_ago) + dt.timedelta(hours=8, minutes=97 * n)
        for days_ago, count in enumerate(PER_DAY[::-1])
        for n in range(count)
    ]
    with live.app.app_context():
        form = intake.public_form(public_id)
        for n, when in enumerate(sorted(received)):  # oldest first, as they would arrive
            with mock.patch.object(dal, "utcnow", return_value=when), dal.transaction() as conn:
                dal.insert_submission(
                    conn,
                    {
                        "public_id": dal.new_public_id(),
                        "form_id": form.id,
                        "data": SAMPLE_PEOPLE[n % len(SAMPLE_PEOPLE)],
                        "schema_version": form.schema_version,
                        "is_spam": False,
                        "meta": {},
                    },
                )
    log_in(page, live)
    page.get_by_role("link", name="Website contact").click()
    assert page.locator("tbody tr").count() == min(len(received), services.INBOX_PAGE_SIZE)
    assert f"{len(received)} in the last 30 days" in page.locator(".chart").inner_text()
    assert page.locator(".bars .day").count() == 30
    page.set_viewport_size({"width": 1280, "height": 1000})
    screenshot(page, "inbox", full_page=False)
    page.goto(f"{live.url}/forms")
    screenshot(page, "forms", full_page=False)


# Submissions per day over the last 30 days, oldest first (the README's inbox screenshot).
PER_DAY = [1, 0, 2, 1, 3, 2, 0, 1, 2, 4, 3, 1, 2, 5, 3, 0, 2, 4, 6, 3, 2, 5, 4, 1, 3, 6, 5, 7, 4, 3]
SAMPLE_PEOPLE = [
    {"name": "Ada Lovelace", "email": "ada@example.org", "message": "Could you send a quote?"},
    {"name": "Grace Hopper", "email": "grace@example.net", "message": "Is the workshop on?"},
    {"name": "Alan Turing", "email": "alan@example.com", "message": "Table for six on Friday."},
    {"name": "Katherine J.", "email": "kj@example.org", "message": "Loved the talk — slides?"},
    {"name": "Linus T.", "email": "linus@example.com", "message": "Invoice 1042 is missing."},
    {"name": "Margaret H.", "email": "mh@example.net", "message": "Can I bring a friend?"},
    {"name": "Tim B-L", "email": "tim@example.org", "message": "Your contact page works!"},
]

"""What every Mailslot blueprint shares: the request class and its form parser, the ``pid`` URL
converter, the CSRF extension, the current user and ``login_required``, ``safe_next``, the HTML
and JSON error answers with their two documented JSON envelopes, and the template filters.

The two JSON envelopes:

- the public endpoint (every path under ``/f/``) answers ``{"ok": true, "id": …}`` on success
  and ``{"ok": false, "error": {"code", "message"}, "errors": {field: [messages]}}`` on every
  failure (``errors`` is empty unless a 422 names fields);
- everything else (the JSON API, and JSON clients of the other pages) answers errors as
  ``{"error": {"code", "message", "fields"}}``.

It must not hold views (they live in one module per blueprint), rules, SQL or Redis; it reads
the request but never changes what is stored.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit

from flask import (
    Request,
    g,
    has_request_context,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf.csrf import CSRFProtect
from werkzeug.datastructures import ImmutableMultiDict
from werkzeug.formparser import FormDataParser
from werkzeug.routing import BaseConverter

import dal
import records
import users

# Every path under this prefix is the public endpoint or its hosted pages: cross-site by design,
# with their own body limit and their own JSON envelope.
PUBLIC_PREFIX = "/f/"

# The extension's object: microapp registers it, blueprints exempt the views that need no token.
csrf = CSRFProtect()

# =================================================================================================
# Requests: the form parser
# =================================================================================================

MSG_NO_BOUNDARY = (
    "The multipart/form-data body has no boundary in its Content-Type header. Let the browser "
    "or your HTTP library set the header, and send again."
)
MSG_EMPTY_MULTIPART = "The multipart/form-data body is empty. Send the form's fields in it."
MSG_UNREADABLE_MULTIPART = (
    "The multipart/form-data body could not be read. Check that it uses the boundary its "
    "Content-Type header names, and send again."
)


class UnreadableForm(ImmutableMultiDict[str, str]):
    """No fields, because the body could not be read; ``problem`` tells the sender why."""

    def __init__(self, problem: str) -> None:
        super().__init__()
        self.problem = problem


class _FormParser(FormDataParser):
    """Werkzeug's form parser, changed where it would silently turn a body into no fields.

    A urlencoded body is decoded as the URL standard says: bytes that are not UTF-8 (raw or
    percent-encoded) become U+FFFD, where Werkzeug drops the whole body over one such byte. A
    multipart body that cannot be read (no boundary, another boundary, part headers that are
    not UTF-8, no body at all) gives an ``UnreadableForm`` instead of an empty form.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "silent": False})

    def parse(
        self,
        stream: IO[bytes],
        mimetype: str,
        content_length: int | None,
        options: dict[str, str] | None = None,
    ) -> Any:
        """(stream, form, files) for this body."""
        if mimetype == "application/x-www-form-urlencoded":
            text = stream.read().decode("utf-8", "replace")
            pairs = parse_qsl(text, keep_blank_values=True, errors="replace")
            return stream, self.cls(pairs), self.cls()
        if mimetype == "multipart/form-data":
            if not (options or {}).get("boundary"):
                return stream, UnreadableForm(MSG_NO_BOUNDARY), self.cls()
            if content_length == 0:  # even a form without fields sends its closing boundary
                return stream, UnreadableForm(MSG_EMPTY_MULTIPART), self.cls()
        try:
            return super().parse(stream, mimetype, content_length, options)
        except ValueError:
            return stream, UnreadableForm(MSG_UNREADABLE_MULTIPART), self.cls()


class MailslotRequest(Request):
    """Flask's request, with the form parser above."""

    form_data_parser_class = _FormParser


class PublicIdConverter(BaseConverter):
    """Public ids are URL-safe tokens: anything else is a 404 before any lookup."""

    regex = r"[A-Za-z0-9_-]{1,64}"


# =================================================================================================
# Sessions and the current user
# =================================================================================================


def load_user() -> None:
    """Put the logged-in user on ``g``; a cookie from before logout no longer matches."""
    g.user = None
    user_id, version = session.get("uid"), session.get("sv")
    if user_id is None:
        return
    user = users.user_for_session(user_id, version)
    if user is None:
        session.clear()
    g.user = user


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Send people who are not logged in to the login page, remembering where they were going."""

    @functools.wraps(view)
    def wrapped(**kwargs: Any) -> Any:
        if g.user is None:
            return redirect(url_for("accounts.login", next=request.full_path.rstrip("?")))
        return view(**kwargs)

    return wrapped


def safe_next(target: str | None, default: str) -> str:
    """Follow ``next`` only to a same-site relative path; never ``//host`` or ``/\\host``."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return default
    if any(ord(ch) < 32 or ch == "\\" for ch in target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target


# =================================================================================================
# Errors: a page for people, one of the two JSON envelopes for programs
# =================================================================================================

ERROR_TEXT = {
    400: "The request could not be understood.",
    401: "You need to log in to see this.",
    403: "You are not allowed to do that.",
    404: "There is nothing at this address.",
    405: "This address does not accept that method.",
    413: "The request is too large.",
    415: "This kind of content is not accepted here.",
    422: "Some of what you sent needs fixing.",
    429: "Too many requests; wait a moment and try again.",
    500: "Something went wrong on our side. It has been logged.",
    503: "The service is temporarily unavailable; try again in a minute.",
}
STATUS_TITLES = {
    400: "Bad request",
    401: "Log in needed",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    413: "Too large",
    415: "Unsupported content",
    422: "Needs fixing",
    429: "Slow down",
    500: "Server error",
    503: "Unavailable",
}
# Fixed here (documented in the README), not derived from Python's status phrases, which change
# between versions (3.13 calls 413 "Content Too Large").
ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_entity_too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
    500: "internal_server_error",
    503: "service_unavailable",
}
MSG_PUBLIC_INVALID = "Some fields need fixing; see errors."


def error_code(status: int) -> str:
    """A stable machine-readable code for a status."""
    if status in ERROR_CODES:
        return ERROR_CODES[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def on_public_endpoint() -> bool:
    """Whether this request is for the public endpoint or its hosted pages (``/f/…``)."""
    return request.path.startswith(PUBLIC_PREFIX)


def wants_json() -> bool:
    """API paths, JSON bodies, AJAX posts to the public endpoint and clients that prefer JSON get
    JSON answers; a plain browser request gets a page (or a redirect)."""
    if request.path.startswith("/api/") or request.is_json:
        return True
    if on_public_endpoint() and request.headers.get("X-Requested-With") == "XMLHttpRequest":
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def public_success(submission_id: str) -> Any:
    """The public endpoint's answer to a stored (or trapped) submission: 201."""
    return jsonify(ok=True, id=submission_id), 201


def public_error_body(
    status: int, message: str, code: str | None = None, errors: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """The public endpoint's one failure envelope (``errors`` names fields on a 422 only)."""
    return {
        "ok": False,
        "error": {"code": code or error_code(status), "message": message},
        "errors": errors or {},
    }


def error_response(
    status: int,
    message: str | None = None,
    code: str | None = None,
    fields: dict[str, list[str]] | None = None,
) -> Any:
    """One error, as a page for people or as the JSON envelope of the path for programs."""
    message = message or ERROR_TEXT.get(status, "Error.")
    code = code or error_code(status)
    if wants_json():
        if on_public_endpoint():
            body = public_error_body(status, message, code, fields)
        else:
            body = {"error": {"code": code, "message": message, "fields": fields or {}}}
        response = jsonify(body)
        response.status_code = status
        return response
    return render_template("error.html", status=status, message=message), status


# =================================================================================================
# Template filters and helpers: values the templates show, computed here
# =================================================================================================


def relative_time(value: Any, now: Any = None) -> str:
    """'just now', '5 minutes ago', 'yesterday', '3 days ago' or, past a month, the date."""
    seconds = int(((now or dal.utcnow()) - value).total_seconds())
    if seconds < 60:
        return "just now"
    units = ((3600, 60, "minute"), (86400, 3600, "hour"))
    for limit, size, name in units:
        if seconds < limit:
            count = seconds // size
            return f"{count} {name}{'s' if count != 1 else ''} ago"
    days = seconds // 86400
    if days == 1:
        return "yesterday"
    if days < 30:
        return f"{days} days ago"
    return f"{value.day} {value:%b %Y}"


def exact_time(value: Any) -> str:
    """The full UTC time, for hover titles and detail pages."""
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def yes_no(value: Any) -> Any:
    """A submitted boolean as people read it ("Yes"/"No"); any other value unchanged."""
    if value is True:
        return "Yes"
    if value is False:
        return "No"
    return value


def status_title(status: int) -> str:
    """The short title of an error page ("Not found")."""
    return STATUS_TITLES.get(status, "Error")


def error_label(name: str) -> str:
    """A submission error's key as shown: errors about the whole form are "Form"."""
    return "Form" if name == "_form" else name


def field_aria(
    field: Any, hint: str | None = None, autocomplete: str | None = None
) -> dict[str, str]:
    """A form field's ARIA attributes (and autocomplete): invalid or not, and the ids of its
    hint and error messages."""
    described = [f"{field.id}-hint"] if hint else []
    if field.errors:
        described.append(f"{field.id}-error")
    attrs: dict[str, str] = {"aria-invalid": "true" if field.errors else "false"}
    if described:
        attrs["aria-describedby"] = " ".join(described)
    if autocomplete:
        attrs["autocomplete"] = autocomplete
    return attrs


def error_aria(field: Any) -> dict[str, str]:
    """ARIA attributes for a builder input: set only when it has an error."""
    if not field.errors:
        return {}
    return {"aria-invalid": "true", "aria-describedby": f"{field.id}-error"}


def is_required(field: Any) -> bool:
    """Whether a field is marked required (by a validator or by its render keywords)."""
    return bool(field.flags.required or (field.render_kw or {}).get("required"))


def invalid_fields(form: Any) -> list[Any]:
    """The fields of a form that have errors (not the CSRF token), for the error summary."""
    return [field for field in form if field.errors and field.name != "csrf_token"]


def any_required(form: Any) -> bool:
    """Whether any field of the form is required (the page then explains the asterisk)."""
    return any(is_required(field) for field in form)


def nav_section() -> str | None:
    """Which item of the main navigation the current page belongs to."""
    if not has_request_context() or request.endpoint is None:
        return None
    endpoint = request.endpoint
    if endpoint in ("dashboard.forms_index", "dashboard.form_new") or (
        endpoint.startswith("dashboard.") and "public_id" in (request.view_args or {})
    ):
        return "forms"
    return {"accounts.account": "account", "accounts.login": "login"}.get(endpoint)


@dataclass(frozen=True, slots=True)
class ChartBar:
    """One day of the chart: where its bar is drawn, and what its tooltip says."""

    x: int
    bar_x: float
    bar_y: str
    bar_height: str
    title: str
    css_class: str


@dataclass(frozen=True, slots=True)
class Chart:
    """The inbox's submissions-per-day chart, laid out on a 10-units-per-day, 60-high canvas."""

    width: int
    total: int
    first_day: str
    last_day: str
    busiest_day: str
    busiest_count: int
    axis_start: str
    bars: tuple[ChartBar, ...]


CHART_HEIGHT = 60
CHART_TOP = 56  # the tallest bar; the rest is the baseline's room
CHART_MIN_BAR = 1.5  # a day with one submission still shows
CHART_EMPTY_BAR = 1  # an empty day is a flat line


def chart_geometry(per_day: Sequence[records.DayCount]) -> Chart:
    """Lay out the 30-day bar chart from ``per_day`` (oldest first, at least one day)."""
    peak = max(max(d.count for d in per_day), 1)
    busiest = max(per_day, key=lambda d: d.count)  # the earliest of equally busy days
    bars = []
    for index, d in enumerate(per_day):
        height = max(d.count / peak * CHART_TOP, CHART_MIN_BAR) if d.count else CHART_EMPTY_BAR
        css_class = "day" + ("" if d.count else " empty-day")
        css_class += " today" if index == len(per_day) - 1 else ""
        bars.append(
            ChartBar(
                x=index * 10,
                bar_x=index * 10 + 1.5,
                bar_y=f"{CHART_HEIGHT - height:.2f}",
                bar_height=f"{height:.2f}",
                title=f"{d.day:%a} {d.day.day} {d.day:%b}: {d.count} submission"
                + ("" if d.count == 1 else "s"),
                css_class=css_class,
            )
        )
    return Chart(
        width=len(per_day) * 10,
        total=sum(d.count for d in per_day),
        first_day=per_day[0].day.isoformat(),
        last_day=per_day[-1].day.isoformat(),
        busiest_day=busiest.day.isoformat(),
        busiest_count=busiest.count,
        axis_start=f"{per_day[0].day.day} {per_day[0].day:%b}",
        bars=tuple(bars),
    )


TEMPLATE_FILTERS: dict[str, Callable[..., Any]] = {
    "relative_time": relative_time,
    "exact_time": exact_time,
    "yes_no": yes_no,
    "status_title": status_title,
    "error_label": error_label,
    "field_aria": field_aria,
    "error_aria": error_aria,
    "is_required": is_required,
    "invalid_fields": invalid_fields,
    "any_required": any_required,
}

"""What every Mailslot blueprint shares: the request class and its form parser, the ``pid`` URL
converter, the CSRF extension, the current user and ``login_required``, ``safe_next``, the HTML
and JSON error answers, and the template filters.

It must not hold views (they live in one module per blueprint), rules, SQL or Redis; it reads
the request but never changes what is stored.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from http import HTTPStatus
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit

from flask import (
    Request,
    g,
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
import services

# Every path under this prefix is the public endpoint or its hosted pages: cross-site by design,
# with their own body limit.
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
    user = services.user_for_session(user_id, version)
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
# Errors: a page for people, JSON for programs
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


def error_code(status: int) -> str:
    """A stable machine-readable code for a status."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def wants_json() -> bool:
    """API paths, JSON bodies and clients that prefer JSON get JSON errors."""
    if request.path.startswith("/api/") or request.is_json:
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def error_response(status: int, message: str | None = None, code: str | None = None) -> Any:
    """One error, as a page for people or ``{"error": {...}}`` for programs."""
    message = message or ERROR_TEXT.get(status, "Error.")
    code = code or error_code(status)
    if wants_json():
        response = jsonify(error={"code": code, "message": message, "fields": {}})
        response.status_code = status
        return response
    return render_template("error.html", status=status, message=message), status


# =================================================================================================
# Template filters
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


TEMPLATE_FILTERS: dict[str, Callable[..., Any]] = {
    "relative_time": relative_time,
    "exact_time": exact_time,
}

"""Mailslot's web process: settings, logging, the app factory, blueprints, views and CLI.

Views stay thin: they parse the request, call one function in ``services``, and render.
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit

import click
import structlog
from flask import (
    Blueprint,
    Flask,
    Request,
    abort,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    request_finished,
    request_started,
    session,
    stream_with_context,
    url_for,
)
from flask_wtf.csrf import CSRFError, CSRFProtect, validate_csrf
from sqlalchemy.exc import OperationalError
from werkzeug.datastructures import ImmutableMultiDict
from werkzeug.exceptions import (
    HTTPException,
    InternalServerError,
    TooManyRequests,
)
from werkzeug.formparser import FormDataParser
from werkzeug.routing import BaseConverter
from wtforms.validators import ValidationError as FormValidationError

import dal
import forms
import openapi
import services
import tasks
from api import api
from settings import (
    Settings,
    current_settings,
    describe_url,
    load_settings,
    resolve_secret_key,
)

log = structlog.get_logger("mailslot")

# =================================================================================================
# Logging
# =================================================================================================

_SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(settings: Settings) -> None:
    """Route structlog and every stdlib logger (Flask, waitress, Celery) through one pipeline."""
    use_json = settings.log_format == "json" or (
        settings.log_format == "auto" and settings.env == "production"
    )
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.contextvars.clear_contextvars()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,  # below LOG_LEVEL: dropped before any work
            *_SHARED_PROCESSORS,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED_PROCESSORS,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if use_json else _keep_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name("mailslot")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "mailslot"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in ("flask.app", "waitress", "celery", "werkzeug"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # Alembic names each of its autogenerate plugins at INFO the first time it runs.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _keep_exc_info(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """The console renderer prints tracebacks itself; leave exc_info for it."""
    return event


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _bind_request(sender: Flask, **_extra: Any) -> None:
    """Bind a request id at the very start, before CSRF or any before_request handler runs."""
    structlog.contextvars.clear_contextvars()
    incoming = request.headers.get("X-Request-ID", "")
    g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
    g.started = time.perf_counter()
    structlog.contextvars.bind_contextvars(request_id=g.request_id)


def _log_request(sender: Flask, response: Any, **_extra: Any) -> None:
    """End every request with one line: method, path, status and duration."""
    request_id = g.get("request_id")
    if request_id:
        response.headers["X-Request-ID"] = request_id
    started = g.get("started", time.perf_counter())
    log.info(
        "request",
        method=request.method,
        path=request.path,
        status=response.status_code,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
    )


# =================================================================================================
# App factory
# =================================================================================================

csrf = CSRFProtect()
csrf.exempt(api)  # bearer tokens only: the API never reads the session cookie

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


def create_app(**overrides: Any) -> Flask:
    """Build the app. Keyword arguments override settings (tests); nothing touches the network."""
    settings = load_settings(**overrides)
    configure_logging(settings)
    instance_dir = settings.instance_dir
    instance_dir.mkdir(parents=True, exist_ok=True)

    app = Flask(__name__, instance_path=str(instance_dir))
    app.request_class = MailslotRequest
    production = settings.env == "production"
    app.config.update(
        SECRET_KEY=resolve_secret_key(settings),
        MAX_CONTENT_LENGTH=settings.max_content_length,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=production,
        SESSION_COOKIE_NAME="mailslot_session",
        PERMANENT_SESSION_LIFETIME=14 * 24 * 3600,
        WTF_CSRF_TIME_LIMIT=None,
        WTF_CSRF_SSL_STRICT=production,
        PREFERRED_URL_SCHEME="https" if production else "http",
    )
    app.extensions["mailslot.settings"] = settings
    dal.init_app(app, settings)
    tasks.celery_init_app(app, settings)
    csrf.init_app(app)

    app.url_map.converters["pid"] = PublicIdConverter
    app.register_blueprint(pages)
    app.register_blueprint(public)
    app.register_blueprint(api)
    _register_error_handlers(app)
    _register_cli(app)
    app.before_request(_load_user)
    app.after_request(_security_headers)
    app.jinja_env.filters.update(relative_time=relative_time, exact_time=exact_time)
    app.context_processor(lambda: {"current_user": g.get("user"), "mode": settings.mode})
    request_started.connect(_bind_request, app)
    request_started.connect(_limit_public_bodies, app)
    request_finished.connect(_log_request, app)

    if settings.database_url_or_default.startswith("sqlite"):
        # A local file, not a network call: a missing database is created by the migrations on
        # first start. One that holds data is upgraded by upgrade-db only (`just run` runs it).
        with app.app_context():
            app.extensions["mailslot.created_db"] = dal.create_embedded_db()
    log.info(
        "mailslot.start",
        mode=settings.mode,
        env=settings.env,
        database=describe_url(settings.database_url_or_default),
        redis=describe_url(settings.redis_url) if settings.redis_url else "in-process",
        mail=settings.mail_backend,
    )
    return app


class PublicIdConverter(BaseConverter):
    """Public ids are URL-safe tokens: anything else is a 404 before any lookup."""

    regex = r"[A-Za-z0-9_-]{1,64}"


# =================================================================================================
# Security headers
# =================================================================================================

# No 'unsafe-inline' anywhere: templates use external CSS/JS only and no style= attributes.
_CSP = "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors {ancestors}"
# Public pages an owner may put in an <iframe> on their own site (and where a post from it lands).
_FRAMEABLE = frozenset({"public.hosted_page", "public.hosted_submit", "public.thanks"})
_CSP_HOST = re.compile(r"[a-z0-9.-]+(:[0-9]{1,5})?")


def _frame_ancestors() -> str:
    """Who may frame this response: nobody, except hosted pages on the form's allowed sites."""
    if request.endpoint not in _FRAMEABLE:
        return "'none'"
    form = g.get("public_form")
    if form is None:  # the view did not run (a CSRF failure): its answer still shows in the frame
        try:
            form = services.public_form((request.view_args or {}).get("public_id", ""))
        except services.FormUnavailable:
            return "'none'"
    if not form.allowed_domains:
        return "*"  # no list means "any site may post", so any site may embed the page too
    return " ".join(["'self'", *(d for d in form.allowed_domains if _CSP_HOST.fullmatch(d))])


def _security_headers(response: Any) -> Any:
    """CSP, nosniff and referrer policy on every response; HSTS in production."""
    response.headers["Content-Security-Policy"] = _CSP.format(ancestors=_frame_ancestors())
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "strict-origin-when-cross-origin"
    if current_settings().env == "production":
        response.headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
    return response


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


# =================================================================================================
# Sessions and the current user
# =================================================================================================


def _load_user() -> None:
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
            return redirect(url_for("pages.login", next=request.full_path.rstrip("?")))
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


def _start_session(user: dal.Row) -> None:
    """Clear whatever the browser had and issue a fresh session for this user."""
    session.clear()
    session["uid"] = user.id
    session["sv"] = user.session_version
    session.permanent = True


# =================================================================================================
# Blueprint: pages (the owner's UI)
# =================================================================================================

pages = Blueprint("pages", __name__)


@pages.get("/")
def index() -> str:
    """The landing page: what Mailslot does."""
    return render_template("index.html")


@pages.route("/signup", methods=["GET", "POST"])
def signup() -> Any:
    """Sign up, then log in: the same answer whether or not the address has an account."""
    form = forms.SignupForm()
    if request.method == "POST":
        _or_429(services.check_signup_rate, request.remote_addr)
    if form.validate_on_submit():
        services.sign_up(form.email.data, form.password.data)
        flash(
            f"Check your inbox at {services.normalise_email(form.email.data)} for a message "
            "about your account, then log in.",
            "success",
        )
        return redirect(url_for("pages.login"))
    status = 422 if form.errors else 200
    return render_template(
        "signup.html", form=form, min_password=current_settings().password_min_length
    ), status


@pages.route("/login", methods=["GET", "POST"])
def login() -> Any:
    """Log in with email and password; one generic message for every wrong combination."""
    form = forms.LoginForm()
    next_url = safe_next(request.args.get("next"), url_for("pages.forms_index"))
    if form.validate_on_submit():
        user = _or_429(services.log_in, form.email.data, form.password.data, request.remote_addr)
        if user is None:
            form.form_errors.append("Wrong email or password.")
        else:
            _start_session(user)
            return redirect(next_url)
    status = 422 if form.errors or form.form_errors else 200
    return render_template("login.html", form=form), status


def _or_429(call: Callable[..., Any], *args: Any) -> Any:
    """Run a rate-limited service call; over the limit, answer 429 with Retry-After."""
    try:
        return call(*args)
    except services.RateLimited as exc:
        raise TooManyRequests(
            "Too many attempts. Wait a few minutes and try again.", retry_after=exc.retry_after
        ) from None


@pages.post("/logout")
def logout() -> Any:
    """End this session and every other copy of its cookie."""
    form = forms.ActionForm()
    if form.validate_on_submit() and g.user is not None:
        services.log_out(g.user.id)
    session.clear()
    flash("You are logged out.", "info")
    return redirect(url_for("pages.index"))


@pages.get("/confirm/<token>")
def confirm_email(token: str) -> Any:
    """Confirm an owner's email address from the signed link we mailed."""
    outcome = services.confirm_email(token)
    messages = {
        "confirmed": ("Your email address is confirmed.", "success"),
        "already": ("Your email address was already confirmed.", "info"),
        "expired": (
            "This confirmation link has expired. Send a new one from your account.",
            "error",
        ),
        "invalid": (
            "This confirmation link is not valid. Send a new one from your account.",
            "error",
        ),
    }
    message, category = messages[outcome]
    flash(message, category)
    return redirect(url_for("pages.account" if g.user else "pages.login"))


@pages.route("/account", methods=["GET"])
@login_required
def account() -> str:
    """The owner's account: address, confirmation state, the emails we sent about it."""
    return render_template(
        "account.html",
        resend_form=forms.ActionForm(),
        account_emails=services.account_emails(g.user.id),
    )


@pages.post("/account/emails/<int(max=2147483647):delivery_id>/replay")  # 32-bit ids in SQL
@login_required
def account_email_replay(delivery_id: int) -> Any:
    """Send a done or dead account email again (links in it are made afresh)."""
    if forms.ActionForm().validate_on_submit():
        if not services.replay_account_email(g.user.id, delivery_id):
            abort(404)
        flash("The email is queued again.", "success")
    return redirect(url_for("pages.account"))


@pages.route("/account/tokens", methods=["GET", "POST"])
@login_required
def account_tokens() -> Any:
    """API tokens: create one (shown once, on this answer only), list and revoke."""
    form = forms.ApiTokenForm()
    new_token = None
    if form.validate_on_submit():
        _, new_token = services.create_api_token(g.user.id, form.name.data)
        form = forms.ApiTokenForm(formdata=None)
    page = render_template(
        "account_tokens.html",
        form=form,
        new_token=new_token,
        tokens=services.list_api_tokens(g.user.id),
        revoke_form=forms.ActionForm(),
    )
    response = current_app.make_response((page, 422 if form.errors else 200))
    response.headers["Cache-Control"] = "no-store"  # the new token must not stay in any cache
    return response


@pages.post("/account/tokens/<int(max=2147483647):token_id>/revoke")  # ids are 32-bit in SQL
@login_required
def account_token_revoke(token_id: int) -> Any:
    """Revoke a token: programs using it get 401 from the next request on."""
    if forms.ActionForm().validate_on_submit():
        if not services.revoke_api_token(g.user.id, token_id):
            abort(404)
        flash("Token revoked. Programs that use it now get 401 Unauthorized.", "success")
    return redirect(url_for("pages.account_tokens"))


@pages.post("/account/confirm")
@login_required
def resend_confirmation() -> Any:
    """Send the confirmation link again."""
    if forms.ActionForm().validate_on_submit():
        if _or_429(services.send_confirmation, g.user.id):
            flash(f"We sent a new confirmation link to {g.user.email}.", "success")
        else:
            flash("Your email address is already confirmed.", "info")
    return redirect(url_for("pages.account"))


@pages.route("/account/erase", methods=["GET", "POST"])
@login_required
def account_erase() -> Any:
    """Find, then delete, everything the owner holds about one email address."""
    form = forms.EraseForm()
    found = None
    if form.validate_on_submit():
        if request.form.get("action") == "delete":
            deleted = services.erase_person(g.user.id, form.email.data)
            flash(f"Deleted {deleted} submission(s) that mentioned {form.email.data}.", "success")
            return redirect(url_for("pages.account_erase"))
        found = len(services.submissions_about(g.user.id, form.email.data))
    status = 422 if form.errors else 200
    return render_template("account_erase.html", form=form, found=found), status


@pages.get("/forms")
@login_required
def forms_index() -> str:
    """The owner's forms with submission counts and the newest submission time."""
    return render_template("forms_index.html", forms=services.list_forms(g.user.id))


def _owned_form(public_id: str) -> dal.Row:
    """The logged-in owner's form, or 404 (also for someone else's form)."""
    try:
        return services.owned_form(g.user.id, public_id)
    except services.NotFound:
        abort(404)


def _owned_submission(form: dal.Row, submission_id: str) -> dal.Row:
    """A submission of the owner's form, or 404."""
    try:
        return services.owned_submission(form, submission_id)
    except services.NotFound:
        abort(404)


@pages.route("/forms/new", methods=["GET", "POST"])
@login_required
def form_new() -> Any:
    """Create a form."""
    form = forms.FormSettingsForm()
    if form.validate_on_submit():
        created = services.create_form(g.user.id, forms.settings_values(form))
        flash(f"Form “{created.name}” created. Paste the snippet below into your site.", "success")
        return redirect(url_for("pages.form_inbox", public_id=created.public_id))
    status = 422 if form.errors else 200
    return render_template("form_settings.html", form=form, record=None), status


@pages.route("/forms/<pid:public_id>/settings", methods=["GET", "POST"])
@login_required
def form_settings(public_id: str) -> Any:
    """Change a form's settings."""
    record = _owned_form(public_id)
    if request.method == "GET":
        return _render_settings(record)
    form = forms.FormSettingsForm()
    if form.validate_on_submit():
        clash = forms.honeypot_clash(record.fields or [], form.honeypot_field.data)
        if clash is None:
            services.update_form_settings(record, forms.settings_values(form))
            flash("Settings saved.", "success")
            return redirect(url_for("pages.form_settings", public_id=public_id))
        form.honeypot_field.errors.append(clash)
    return _render_settings(record, form=form), 422


@pages.post("/forms/<pid:public_id>/webhook")
@login_required
def form_webhook(public_id: str) -> Any:
    """Save, test or re-key the form's webhook (buttons named ``action``)."""
    record = _owned_form(public_id)
    webhook_form = forms.WebhookForm()
    action = request.form.get("action", "save")
    if not webhook_form.validate_on_submit():
        return _render_settings(record, webhook_form=webhook_form), 422
    if action == "test":
        flash(services.send_test_event(record), "info")
        return redirect(url_for("pages.form_settings", public_id=public_id) + "#webhook")
    if action == "rotate":
        flash("New signing secret created. Give it to your receiver.", "success")
        return _secret_page(record, services.rotate_webhook_secret(record))
    url = webhook_form.url.data or None
    problem = services.check_webhook_url(url) if url else None
    if problem:
        webhook_form.url.errors.append(f"This address cannot receive webhooks: {problem}.")
        return _render_settings(record, webhook_form=webhook_form), 422
    new_secret = services.set_webhook(record, url)
    flash("Webhook saved." if url else "Webhook removed.", "success")
    if new_secret:
        return _secret_page(services.owned_form(g.user.id, public_id), new_secret)
    return redirect(url_for("pages.form_settings", public_id=public_id) + "#webhook")


@pages.post("/forms/<pid:public_id>/webhook/secret")
@login_required
def form_webhook_secret(public_id: str) -> Any:
    """Show the signing secret once more ("Reveal"); CSRF-checked like every POST."""
    record = _owned_form(public_id)
    secret = services.reveal_webhook_secret(record)
    if secret is None:
        flash("This form has no webhook yet.", "info")
        return redirect(url_for("pages.form_settings", public_id=public_id) + "#webhook")
    return _secret_page(record, secret)


def _secret_page(record: dal.Row, secret: str) -> Any:
    """The settings page showing the signing secret in full, kept out of every cache."""
    response = current_app.make_response(_render_settings(record, shown_secret=secret))
    response.headers["Cache-Control"] = "no-store"
    return response


def _render_settings(
    record: dal.Row, form: Any = None, webhook_form: Any = None, shown_secret: str | None = None
) -> str:
    """The settings page with its two forms; the signing secret masked unless ``shown_secret``."""
    if form is None:
        form = forms.FormSettingsForm(data=forms.settings_form_data(record._mapping))
    if webhook_form is None:
        webhook_form = forms.WebhookForm(data={"url": record.webhook_url or ""})
    masked = services.masked_secret(record.webhook_secret) if record.webhook_secret else None
    return render_template(
        "form_settings.html",
        form=form,
        record=record,
        webhook_form=webhook_form,
        shown_secret=shown_secret,
        masked_secret=masked,
        reveal_form=forms.ActionForm(),
    )


@pages.route("/forms/<pid:public_id>/fields", methods=["GET", "POST"])
@login_required
def form_fields(public_id: str) -> Any:
    """The field builder: add, remove, reorder and save fields without JavaScript."""
    record = _owned_form(public_id)
    if request.method == "GET":
        form = forms.FieldsForm(data=forms.fields_form_data(record.fields or []))
        return render_template("form_fields.html", form=form, record=record)
    form = forms.FieldsForm()
    action = request.form.get("action", "save")
    if forms.apply_builder_action(form, action):
        return render_template("form_fields.html", form=form, record=record)
    if form.validate_on_submit():
        specs = forms.field_specs(form)
        clash = forms.honeypot_clash(specs, record.honeypot_field)
        if clash is None:
            services.save_fields(record, specs)
            flash("Fields saved. The hosted page and validation use them from now on.", "success")
            return redirect(url_for("pages.form_fields", public_id=public_id))
        form.form_errors.append(clash)
    return render_template("form_fields.html", form=form, record=record), 422


@pages.get("/forms/<pid:public_id>")
@login_required
def form_inbox(public_id: str) -> str:
    """The inbox: newest first, keyset pages, search and a spam filter; the install panel."""
    record = _owned_form(public_id)
    query = request.args.get("q", "").strip()[:200]
    spam = request.args.get("spam") == "1"
    before = request.args.get("before", type=int)
    if before is not None and not 0 < before < 2**31:
        before = None  # not a cursor we hand out: start from the newest
    rows, next_before = services.inbox_page(record, before=before, query=query, spam=spam)
    stats, per_day = services.inbox_numbers(record)
    return render_template(
        "form_inbox.html",
        record=record,
        submissions=rows,
        next_before=next_before,
        query=query,
        spam=spam,
        before=before,
        snippets=services.install_snippets(record),
        stats=stats,
        per_day=per_day,
    )


@pages.get("/forms/<pid:public_id>/submissions/<pid:submission_id>")
@login_required
def submission_detail(public_id: str, submission_id: str) -> str:
    """One submission with every field, when and from where, and its delivery log."""
    record = _owned_form(public_id)
    submission = _owned_submission(record, submission_id)
    return render_template(
        "submission.html",
        record=record,
        submission=submission,
        deliveries=services.submission_deliveries(submission),
        action_form=forms.ActionForm(),
    )


@pages.post("/forms/<pid:public_id>/submissions/<pid:submission_id>/spam")
@login_required
def submission_mark(public_id: str, submission_id: str) -> Any:
    """Mark a submission spam or not spam."""
    record = _owned_form(public_id)
    submission = _owned_submission(record, submission_id)
    if forms.ActionForm().validate_on_submit():
        is_spam = request.form.get("spam") == "1"
        services.mark_spam(submission, is_spam)
        flash("Marked as spam." if is_spam else "Marked as not spam.", "success")
    return redirect(
        url_for("pages.submission_detail", public_id=public_id, submission_id=submission_id)
    )


@pages.post("/forms/<pid:public_id>/submissions/<pid:submission_id>/delete")
@login_required
def submission_delete(public_id: str, submission_id: str) -> Any:
    """Delete one submission."""
    record = _owned_form(public_id)
    submission = _owned_submission(record, submission_id)
    if forms.ActionForm().validate_on_submit():
        services.delete_submission(submission)
        flash("Submission deleted.", "success")
    return redirect(url_for("pages.form_inbox", public_id=public_id))


@pages.post(
    "/forms/<pid:public_id>/submissions/<pid:submission_id>/deliveries/<int:delivery_id>/replay"
)
@login_required
def delivery_replay(public_id: str, submission_id: str, delivery_id: int) -> Any:
    """Send a done or dead delivery again."""
    record = _owned_form(public_id)
    submission = _owned_submission(record, submission_id)
    if forms.ActionForm().validate_on_submit():
        if services.replay_delivery(submission, delivery_id):
            flash("Delivery queued again.", "success")
        else:
            abort(404)
    return redirect(
        url_for("pages.submission_detail", public_id=public_id, submission_id=submission_id)
    )


@pages.get("/forms/<pid:public_id>/deliveries/dead")
@login_required
def dead_deliveries(public_id: str) -> str:
    """Deliveries that ran out of attempts, each with a way to replay it."""
    record = _owned_form(public_id)
    return render_template(
        "dead_deliveries.html",
        record=record,
        deliveries=services.dead_deliveries(record),
        action_form=forms.ActionForm(),
    )


@pages.get("/forms/<pid:public_id>/export.csv")
@login_required
def export_csv(public_id: str) -> Any:
    """Every submission as CSV, streamed."""
    record = _owned_form(public_id)
    return _download(services.export_csv(record), record, "csv", "text/csv; charset=utf-8")


@pages.get("/forms/<pid:public_id>/export.json")
@login_required
def export_json(public_id: str) -> Any:
    """Every submission as JSON, streamed."""
    record = _owned_form(public_id)
    return _download(services.export_json(record), record, "json", "application/json")


def _download(chunks: Any, record: dal.Row, extension: str, content_type: str) -> Any:
    """A streamed attachment named after the form, with exactly this Content-Type (werkzeug
    would add a second charset to a text/* ``mimetype`` that already names one)."""
    response = current_app.response_class(stream_with_context(chunks), content_type=content_type)
    response.headers["Content-Disposition"] = (
        f'attachment; filename="mailslot-{record.public_id}.{extension}"'
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@pages.route("/forms/<pid:public_id>/delete", methods=["GET", "POST"])
@login_required
def form_delete(public_id: str) -> Any:
    """Confirm, then delete a form and all its data."""
    record = _owned_form(public_id)
    form = forms.ActionForm()
    if form.validate_on_submit():
        services.delete_form(record)
        flash(f"Form “{record.name}” and its submissions were deleted.", "success")
        return redirect(url_for("pages.forms_index"))
    return render_template("form_delete.html", record=record, form=form)


# =================================================================================================
# Blueprint: public (/f/<public_id>) and health
# =================================================================================================

public = Blueprint("public", __name__)

_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def _limit_public_bodies(sender: Flask, **_extra: Any) -> None:
    """Submission bodies have their own, smaller limit; set before anything reads the body."""
    if request.path.startswith("/f/"):
        request.max_content_length = current_settings().submission_max_bytes


def _read_payload() -> services.Payload:
    """Parse the body of a submission, whatever kind of client sent it."""
    if request.mimetype == "application/json":
        values, problem = forms.load_json_fields(request.get_data(cache=True))
        if problem is not None:
            return services.Payload("unreadable", problem=problem)
        return services.Payload("json", values)
    if request.mimetype in _FORM_TYPES:
        if isinstance(request.form, UnreadableForm):
            return services.Payload("unreadable", problem=request.form.problem)
        values = {key: items for key, items in request.form.to_dict(flat=False).items()}
        has_files = any(f.filename for f in request.files.values())
        return services.Payload("form", values, has_files=has_files)
    return services.Payload("unsupported")


def _wants_json_answer() -> bool:
    """AJAX and API clients get JSON answers; a plain browser post gets redirected."""
    return (
        request.is_json
        or request.headers.get("X-Requested-With") == "XMLHttpRequest"
        or wants_json()
    )


def _intake(public_id: str, hosted: bool) -> services.IntakeResult:
    """Run intake for this request."""
    return services.record_submission(
        services.IntakeRequest(
            public_id=public_id,
            payload=_read_payload(),
            origin=forms.request_header_text(request.headers.get("Origin")),
            referrer=forms.request_header_text(request.referrer),
            client_ip=request.remote_addr,
            user_agent=forms.request_header_text(request.user_agent.string),
            hosted=hosted,
        )
    )


def _unavailable(exc: services.FormUnavailable, json_shape: bool = False) -> Any:
    """Intake's refusal as the endpoint's JSON shape or as a page; 429s say when to retry."""
    if json_shape:
        response = jsonify(ok=False, error=exc.message)
        response.status_code = exc.status
    else:
        response = current_app.make_response(error_response(exc.status, exc.message))
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


@public.post("/f/<pid:public_id>", provide_automatic_options=False)
def submit(public_id: str) -> Any:
    """The endpoint any website's form posts to."""
    try:
        result = _intake(public_id, hosted=False)
    except services.FormUnavailable as exc:
        return _unavailable(exc, json_shape=_wants_json_answer())
    g.public_form = result.form
    if result.outcome == "invalid":
        if _wants_json_answer():
            return jsonify(ok=False, errors=result.errors), 422
        return render_template("submit_errors.html", record=result.form, errors=result.errors), 422
    if _wants_json_answer():
        return jsonify(ok=True, id=result.submission_id), 201
    return redirect(result.redirect_to, 303)


@public.route("/f/<pid:public_id>", methods=["OPTIONS"], provide_automatic_options=False)
def submit_preflight(public_id: str) -> Any:
    """CORS preflight for fetch() from the form's allowed sites."""
    try:
        g.public_form = services.public_form(public_id)
    except services.FormUnavailable:
        g.public_form = None
    response = current_app.response_class(status=204)
    response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = "Content-Type, Accept, X-Requested-With"
    response.headers["Access-Control-Max-Age"] = "86400"
    return response


csrf.exempt(submit)
csrf.exempt(submit_preflight)


@public.after_request
def _cors(response: Any) -> Any:
    """Let allowed sites read the endpoint's answers (any site when no list is set)."""
    if request.endpoint in ("public.submit", "public.submit_preflight"):
        form = g.get("public_form")
        if form is None and request.view_args:
            try:
                form = services.public_form(request.view_args["public_id"])
            except services.FormUnavailable:
                form = None
        allowed = services.cors_origin(form, request.headers.get("Origin"))
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = allowed
        response.vary.add("Origin")
    return response


@public.get("/f/<pid:public_id>", provide_automatic_options=False)
def hosted_page(public_id: str) -> Any:
    """The form page Mailslot hosts for owners without a website."""
    try:
        record = services.public_form(public_id)
    except services.FormUnavailable as exc:
        return _unavailable(exc)
    g.public_form = record
    form = forms.hosted_form_class(record.fields or [])()
    return _render_hosted(record, form)


def _render_hosted(record: Any, form: Any) -> str:
    """The hosted page, with a fresh signed render stamp for the spam check."""
    return render_template(
        "hosted.html",
        record=record,
        form=form,
        render_token=services.render_token(record.public_id),
    )


@public.post("/f/<pid:public_id>/page")
def hosted_submit(public_id: str) -> Any:
    """The hosted page's own submit, errors shown beside each field.

    It is protected by the session's CSRF token, or by the page's signed render stamp: in a
    cross-site iframe (allowed domains may embed the page) browsers send no session cookie, and
    for an anonymous public form the stamp proves just as well that our page was filled in.
    """
    try:
        record = services.public_form(public_id)
    except services.FormUnavailable as exc:
        return _unavailable(exc)
    g.public_form = record
    form = forms.hosted_form_class(record.fields or [])()
    stamp = request.form.get("_rendered")
    if not (_session_csrf_valid() or services.render_stamp_valid(stamp, record.public_id)):
        form.form_errors.append("This form expired. Reload the page and send it again.")
        return _render_hosted(record, form), 400
    try:
        result = _intake(public_id, hosted=True)
    except services.FormUnavailable as exc:
        return _unavailable(exc)
    if result.outcome == "invalid":
        forms.attach_errors(form, result.errors)
        return _render_hosted(record, form), 422
    return redirect(result.redirect_to, 303)


csrf.exempt(hosted_submit)


def _session_csrf_valid() -> bool:
    """Whether the request carries this session's CSRF token."""
    try:
        validate_csrf(request.form.get("csrf_token"))
    except FormValidationError:
        return False
    return True


@public.get("/f/<pid:public_id>/thanks")
def thanks(public_id: str) -> Any:
    """Where a submitter lands when the owner set no redirect."""
    try:
        record = services.public_form(public_id)
    except services.FormUnavailable as exc:
        return _unavailable(exc)
    g.public_form = record
    back_url, back_label = _back_link(record)
    return render_template("thanks.html", record=record, back_url=back_url, back_label=back_label)


def _back_link(record: Any) -> tuple[str, str]:
    """Back to the site the submitter came from when the browser says so, else to the form."""
    came_from = forms.parse_web_url(forms.request_header_text(request.referrer))
    here = forms.parse_web_url(request.host_url)
    if came_from is not None and (
        here is None or (came_from.host, came_from.port) != (here.host, here.port)
    ):
        return came_from.url, f"Back to {came_from.host}"
    return url_for("public.hosted_page", public_id=record.public_id), "Back to the form"


@public.get("/healthz")
def healthz() -> Any:
    """The process is up."""
    return jsonify(status="ok")


@public.get("/readyz")
def readyz() -> Any:
    """Database and Redis reachability and the mode; 503 only when the database is down."""
    report = services.readiness()
    return jsonify(report), 503 if report["status"] == "down" else 200


@pages.get("/api")
def api_reference() -> str:
    """The API reference, rendered on the server from the OpenAPI document."""
    document = openapi.openapi_document(openapi.api_url())
    return render_template("api_reference.html", **openapi.reference_context(document))


# =================================================================================================
# Errors
# =================================================================================================

_ERROR_TEXT = {
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


def wants_json() -> bool:
    """API paths, JSON bodies and clients that prefer JSON get JSON errors."""
    if request.path.startswith("/api/") or request.is_json:
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def error_response(status: int, message: str | None = None, code: str | None = None) -> Any:
    """One error, as a page for people or ``{"error": {...}}`` for programs."""
    message = message or _ERROR_TEXT.get(status, "Error.")
    code = code or _error_code(status)
    if wants_json():
        response = jsonify(error={"code": code, "message": message, "fields": {}})
        response.status_code = status
        return response
    return render_template("error.html", status=status, message=message), status


def _error_code(status: int) -> str:
    """A stable machine-readable code for a status."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def _register_error_handlers(app: Flask) -> None:
    """HTML for browsers, JSON for programs, never a traceback; 500s are logged with one."""

    @app.errorhandler(CSRFError)
    def csrf_failed(exc: CSRFError) -> Any:
        return error_response(
            400,
            "This form expired or did not come from this site. Reload the page and try again.",
            "csrf_failed",
        )

    @app.errorhandler(OperationalError)
    def database_down(exc: OperationalError) -> Any:
        log.error("database.unavailable", error=str(exc.orig)[:200])
        return error_response(503, "The database is unavailable; nothing was saved. Try again.")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        headers = dict(exc.get_headers()) if status in (405, 429) else {}
        custom = exc.description if exc.description != type(exc).description else None
        response = current_app.make_response(error_response(status, custom))
        for name in ("Allow", "Retry-After"):
            if name in headers:
                response.headers[name] = headers[name]
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Any:
        log.exception("request.failed")
        return error_response(500)

    app.register_error_handler(InternalServerError, unexpected)


# =================================================================================================
# CLI
# =================================================================================================


def _stop_serving(_signum: int, _frame: Any) -> None:
    """SIGTERM (a platform's restart, systemd's stop) ends serving as Ctrl-C does: waitress
    stops accepting and gives the requests it is running up to 5 s to finish, instead of the
    process dying mid-request."""
    raise SystemExit(0)


def _start_embedded_sweeper(app: Flask, interval: int, stop: threading.Event) -> threading.Thread:
    """With no worker to run beat, hand the outbox sweep to the delivery threads now and every
    ``interval`` seconds, and the retention purge daily, until ``stop`` is set."""

    def sweep_forever() -> None:
        last_purge: float | None = None
        while True:
            try:
                with app.app_context():
                    tasks.enqueue(tasks.sweep_outbox)
                    if last_purge is None or time.monotonic() - last_purge > 24 * 3600:
                        tasks.enqueue(tasks.purge_retention)
                        last_purge = time.monotonic()
            except Exception:
                log.exception("outbox.sweep_failed")
            if stop.wait(interval):
                return

    thread = threading.Thread(target=sweep_forever, name="outbox-sweeper", daemon=True)
    thread.start()
    return thread


def _register_cli(app: Flask) -> None:
    """Commands run as ``flask --app microapp <command>``."""

    @app.cli.command("upgrade-db")
    def upgrade_db_command() -> None:
        """Create or upgrade the database to this code's schema (idempotent, one at a time)."""
        # On SQLite create_app creates a missing database: that was done by this command too.
        done = app.extensions.pop("mailslot.created_db", [])
        try:
            done += dal.upgrade_db()
        except dal.SchemaMismatch as exc:
            raise click.ClickException(str(exc)) from None
        except OperationalError as exc:
            raise click.ClickException(
                f"The database is unreachable or locked: {exc.orig}"
            ) from None
        for line in done or [f"Already at {dal.SCHEMA_REVISION} (head); nothing to do."]:
            click.echo(line)

    # The release-1 name: Procfiles, unit files and scripts that call it keep working.
    app.cli.add_command(upgrade_db_command, "init-db")

    @app.cli.command("deliver-pending")
    def deliver_pending_command() -> None:
        """Deliver every due outbox row right here (for hosts with no worker: cron, serverless)."""
        total = 0
        while True:
            count = tasks.sweep(inline=True)
            total += count
            if count == 0:
                break
        click.echo(f"Delivered or rescheduled {total} pending deliveries.")

    @app.cli.command("purge")
    def purge_command() -> None:
        """Delete submissions past their form's retention period (idempotent)."""
        click.echo(f"Purged {services.purge_expired()} expired submissions.")

    @app.cli.command("serve")
    @click.option("--host", default=None, help="Address to bind (default: HOST).")
    @click.option("--port", type=int, default=None, help="Port (default: PORT).")
    def serve_command(host: str | None, port: int | None) -> None:
        """Serve with waitress on HOST:PORT, trusting the configured proxy hop."""
        import waitress

        settings = current_settings()
        host, port = host or settings.host, port or settings.port
        options: dict[str, Any] = {
            "host": host,
            "port": port,
            "threads": settings.web_threads,
            "ident": "mailslot",
        }
        if settings.trusted_proxy:
            options.update(
                trusted_proxy=settings.trusted_proxy,
                trusted_proxy_count=settings.trusted_proxy_count,
                trusted_proxy_headers={"x-forwarded-for", "x-forwarded-proto"},
                clear_untrusted_proxy_headers=True,
            )
        stop_sweeping = threading.Event()
        if settings.embedded:
            _start_embedded_sweeper(app, settings.sweep_interval, stop_sweeping)
        signal.signal(signal.SIGTERM, _stop_serving)
        warnings = services.log_broker_warnings()  # here, not in create_app: that stays offline
        log.info("serve", url=f"http://{host}:{port}", mode=settings.mode, warnings=len(warnings))
        try:
            waitress.serve(app, **options)
        finally:
            # Deliveries queued by the last requests go out now rather than at the next sweep:
            # published (connected mode), or finished by the delivery threads (embedded mode).
            stop_sweeping.set()
            handed_over = tasks.hand_over(app, timeout=5)
            log.info("serve.stopped", deliveries_handed_over=handed_over)

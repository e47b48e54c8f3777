"""Mailslot's app module: ``create_app()``, extension and blueprint registration, the app-wide
error handlers, logging set-up, the security headers (CSP and friends), the CLI, and the
worker's Celery entry point (``celery -A microapp.celery_app worker``, built on first use).

The views live in one module per blueprint (``accounts``, ``dashboard``, ``public_site``, ``api``),
what they share in ``web``. This module must not hold views' logic, rules, SQL or SMTP/HTTP
client code: it wires the pieces together.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
import time
import uuid
from typing import Any

import click
import structlog
from flask import (
    Flask,
    current_app,
    g,
    request,
    request_finished,
    request_started,
)
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import (
    HTTPException,
    InternalServerError,
)

import cache
import dal
import intake
import migrate
import services
import tasks
import web
from accounts import accounts
from api import api
from dashboard import dashboard
from public_site import limit_public_bodies, public
from settings import (
    Settings,
    current_settings,
    describe_url,
    load_settings,
    resolve_secret_key,
)
from web import csrf, error_response

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


def create_app(**overrides: Any) -> Flask:
    """Build the app. Keyword arguments override settings (tests); nothing touches the network."""
    settings = load_settings(**overrides)
    configure_logging(settings)
    instance_dir = settings.instance_dir
    instance_dir.mkdir(parents=True, exist_ok=True)

    app = Flask(__name__, instance_path=str(instance_dir))
    app.request_class = web.MailslotRequest
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
    cache.init_app(app, settings)
    tasks.celery_init_app(app)
    csrf.init_app(app)

    app.url_map.converters["pid"] = web.PublicIdConverter
    for blueprint in (dashboard, accounts, public, api):
        app.register_blueprint(blueprint)
    _register_error_handlers(app)
    _register_cli(app)
    app.before_request(web.load_user)
    app.after_request(_security_headers)
    app.jinja_env.filters.update(web.TEMPLATE_FILTERS)
    app.context_processor(
        lambda: {"current_user": g.get("user"), "mode": settings.mode, "nav": web.nav_section()}
    )
    request_started.connect(_bind_request, app)
    request_started.connect(limit_public_bodies, app)
    request_finished.connect(_log_request, app)

    if settings.database_url_or_default.startswith("sqlite"):
        # A local file, not a network call: a missing database is created by the migrations on
        # first start. One that holds data is upgraded by upgrade-db only (`just run` runs it).
        with app.app_context():
            app.extensions["mailslot.created_db"] = migrate.create_embedded_db()
    log.info(
        "mailslot.start",
        mode=settings.mode,
        env=settings.env,
        database=describe_url(settings.database_url_or_default),
        redis=describe_url(settings.redis_url) if settings.redis_url else "in-process",
        mail=settings.mail_backend,
    )
    return app


# =================================================================================================
# Security headers
# =================================================================================================

# No 'unsafe-inline' anywhere: templates use external CSS/JS only and no style= attributes.
_CSP = "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors {ancestors}"
# Public pages an owner may put in an <iframe> on their own site (and where a post from it lands).
_FRAMEABLE = frozenset({"public.hosted_page", "public.hosted_submit", "public.thanks"})
_CSP_HOST = re.compile(r"[a-z0-9.-]+(:[0-9]{1,5})?")


def _frame_ancestors(status: int) -> str:
    """Who may frame this response: nobody, except hosted pages on the form's allowed sites.
    A 5xx (the database down, say) is framed by nobody: looking the form up would fail again."""
    if request.endpoint not in _FRAMEABLE or status >= 500:
        return "'none'"
    form = g.get("public_form")
    if form is None:  # the view did not run (a CSRF failure): its answer still shows in the frame
        try:
            form = intake.public_form((request.view_args or {}).get("public_id", ""))
        except intake.FormUnavailable:
            return "'none'"
    if not form.allowed_domains:
        return "*"  # no list means "any site may post", so any site may embed the page too
    return " ".join(["'self'", *(d for d in form.allowed_domains if _CSP_HOST.fullmatch(d))])


def _security_headers(response: Any) -> Any:
    """CSP, nosniff and referrer policy on every response; HSTS in production."""
    response.headers["Content-Security-Policy"] = _CSP.format(
        ancestors=_frame_ancestors(response.status_code)
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "strict-origin-when-cross-origin"
    if current_settings().env == "production":
        response.headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
    return response


# =================================================================================================
# Errors
# =================================================================================================


def _register_error_handlers(app: Flask) -> None:
    """HTML for browsers, JSON for programs, never a traceback; 500s are logged with one."""

    @app.errorhandler(CSRFError)
    def csrf_failed(exc: CSRFError) -> Any:
        return error_response(
            400,
            "This form expired or did not come from this site. Reload the page and try again.",
            "csrf_failed",
        )

    @app.errorhandler(dal.DatabaseUnavailable)
    def database_down(exc: dal.DatabaseUnavailable) -> Any:
        log.error("database.unavailable", error=str(exc)[:200])
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


def _register_cli(app: Flask) -> None:
    """Commands run as ``flask --app microapp <command>``."""

    @app.cli.command("upgrade-db")
    def upgrade_db_command() -> None:
        """Create or upgrade the database to this code's schema (idempotent, one at a time)."""
        # On SQLite create_app creates a missing database: that was done by this command too.
        done = app.extensions.pop("mailslot.created_db", [])
        try:
            done += migrate.upgrade_db()
        except migrate.SchemaMismatch as exc:
            raise click.ClickException(str(exc)) from None
        except dal.DatabaseUnavailable as exc:
            raise click.ClickException(f"The database is unreachable or locked: {exc}") from None
        for line in done or [f"Already at {migrate.SCHEMA_REVISION} (head); nothing to do."]:
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
        click.echo(f"Purged {tasks.purge_expired()} expired submissions.")

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
            tasks.start_embedded_sweeper(app, settings.sweep_interval, stop_sweeping)
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


# =================================================================================================
# The worker's entry point
# =================================================================================================


def __getattr__(name: str) -> Any:
    """``celery -A microapp.celery_app worker`` looks up ``microapp.celery_app``: the Flask app,
    and its Celery app with it, are built then, once, and never when the web imports this."""
    if name != "celery_app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = create_app()
    with app.app_context():
        services.log_broker_warnings()  # the worker's start; create_app itself stays offline
    celery_app = app.extensions["celery"]
    globals()["celery_app"] = celery_app
    return celery_app

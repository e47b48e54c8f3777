"""Mailslot's Celery app and tasks, and the mail backends they send through.

The worker is started with ``celery -A tasks worker -B``: Celery finds the ``celery`` attribute
below, which builds the Flask app on first use. In embedded mode (no REDIS_URL) tasks run eagerly
in the web process.
"""

from __future__ import annotations

import datetime as dt
import smtplib
import ssl
import uuid
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Any

import structlog
from celery import Celery, Task, shared_task
from celery.signals import setup_logging, task_postrun, task_prerun
from flask import Flask, current_app, render_template

import dal

if TYPE_CHECKING:
    from microapp import Settings

log = structlog.get_logger("mailslot.tasks")

# =================================================================================================
# Celery app
# =================================================================================================


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's configuration, derived from Settings: reliable delivery over fast delivery."""
    timeout = settings.redis_timeout
    config: dict[str, Any] = {
        "broker_url": settings.redis_url or "memory://",
        "result_backend": settings.redis_url or None,
        "task_ignore_result": True,
        "task_default_queue": settings.celery_queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_concurrency": settings.worker_concurrency,
        "task_soft_time_limit": settings.celery_task_soft_time_limit,
        "task_time_limit": settings.celery_task_time_limit,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": {
            "visibility_timeout": settings.celery_visibility_timeout,
            "socket_connect_timeout": max(timeout, 1.0),
            "socket_timeout": max(timeout, 1.0),
        },
        # Results are only read by the ping round trip; never let the result store stall a request.
        "result_backend_transport_options": {
            "retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.2}
        },
        "redis_socket_connect_timeout": max(timeout, 1.0),
        "redis_socket_timeout": max(timeout, 1.0),
        "result_expires": 3600,
        "beat_schedule_filename": str(settings.instance_dir / "celerybeat-schedule"),
        "task_always_eager": settings.embedded,
        "task_eager_propagates": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
    }
    return config


def celery_init_app(app: Flask, settings: Settings) -> Celery:
    """Create the app's Celery instance; every task runs inside the Flask app context."""

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(celery_config(settings))
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


@setup_logging.connect
def _keep_our_logging(**_kwargs: Any) -> None:
    """Stop Celery from installing its own handlers: create_app already routed logs to structlog."""


@task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_kwargs: Any) -> None:
    """Worker log lines carry the task's id and name."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))


@task_postrun.connect
def _unbind_task(**_kwargs: Any) -> None:
    """Leave nothing bound for the next task."""
    structlog.contextvars.clear_contextvars()


def __getattr__(name: str) -> Any:
    """``celery -A tasks`` looks up ``tasks.celery``: build the Flask app then, not at import."""
    if name == "celery":
        from microapp import create_app

        return create_app().extensions["celery"]
    raise AttributeError(name)


def enqueue(task: Any, *args: Any) -> bool:
    """Publish a task without retries; a broker failure is logged, never raised to the caller."""
    try:
        # The app's own Celery instance, not Celery's global default: a process may hold several.
        current_app.extensions["celery"].tasks[task.name].apply_async(args=args, retry=False)
    except Exception as exc:  # noqa: BLE001 - a down broker must not fail the request
        log.warning("enqueue.failed", task=task.name, error=f"{type(exc).__name__}: {exc}"[:300])
        return False
    return True


# =================================================================================================
# Tasks
# =================================================================================================


@shared_task(ignore_result=False)
def ping() -> str:
    """Answer 'pong': proves a round trip through the broker, a worker and the result backend."""
    return "pong"


@shared_task(autoretry_for=(OSError, smtplib.SMTPException), retry_backoff=30, max_retries=5)
def send_confirmation_email(user_id: int, link: str) -> None:
    """Mail an owner the link that confirms their address."""
    with dal.connection() as conn:
        user = dal.user_by_id(conn, user_id)
    if user is None or user.email_confirmed_at is not None:
        return
    context = {"link": link, "email": user.email}
    send_mail(
        to=user.email,
        subject="Confirm your Mailslot address",
        text=render_template("email/confirm.txt", **context),
        html=render_template("email/confirm.html", **context),
    )


# =================================================================================================
# Mail backends
# =================================================================================================


def _clean_header(value: str) -> str:
    """No CR or LF can reach a header, whatever a submitter typed."""
    return " ".join(value.replace("\r", " ").replace("\n", " ").split())


def build_message(
    *, to: str, subject: str, text: str, html: str | None = None, reply_to: str | None = None
) -> EmailMessage:
    """A text (and optional HTML) message from MAIL_FROM."""
    settings = current_app.extensions["mailslot.settings"]
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = _clean_header(to)
    message["Subject"] = _clean_header(subject)
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="mailslot")
    if reply_to:
        message["Reply-To"] = _clean_header(reply_to)
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message


def send_mail(
    *, to: str, subject: str, text: str, html: str | None = None, reply_to: str | None = None
) -> EmailMessage:
    """Send through the configured backend: SMTP, or the console (log + .eml in the outbox)."""
    message = build_message(to=to, subject=subject, text=text, html=html, reply_to=reply_to)
    settings = current_app.extensions["mailslot.settings"]
    if settings.mail_backend == "smtp":
        _send_smtp(settings, message)
    else:
        _write_outbox(settings, message)
    return message


def _write_outbox(settings: Settings, message: EmailMessage) -> None:
    """Console backend: write the message under instance/outbox/ and log where it is."""
    outbox = settings.instance_dir / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    path = outbox / f"{stamp}-{uuid.uuid4().hex[:8]}.eml"
    path.write_bytes(bytes(message))
    log.info("mail.written", to=message["To"], subject=message["Subject"], path=str(path))


def _send_smtp(settings: Settings, message: EmailMessage) -> None:
    """SMTP backend: connect with a timeout, STARTTLS and log in when configured, send."""
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout) as s:
        if settings.smtp_starttls:
            s.starttls(context=ssl.create_default_context())
        if settings.smtp_username:
            s.login(settings.smtp_username, settings.smtp_password.get_secret_value())
        s.send_message(message)
    log.info("mail.sent", to=message["To"], subject=message["Subject"])

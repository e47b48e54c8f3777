"""Mailslot's Celery app and tasks, and the mail backends they send through.

The worker is started with ``celery -A tasks worker -B``: Celery finds the ``celery`` attribute
below, which builds the Flask app on first use. In embedded mode (no REDIS_URL) there is no broker
and no worker: the web process hands tasks to a few delivery threads of its own, never running
them inside a request.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.errors
import email.policy
import http.client
import json
import os
import queue
import random
import smtplib
import socket
import ssl
import threading
import time
import unicodedata
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import email_validator
import structlog
from celery import Celery, Task, shared_task
from celery.signals import setup_logging, task_postrun, task_prerun
from flask import Flask, current_app, render_template

import cache
import dal
import services
from settings import current_settings

if TYPE_CHECKING:
    from settings import Settings

log = structlog.get_logger("mailslot.tasks")
# Retry jitter draws from its own generator: delivery threads must not move the global random
# state that other code (and Hypothesis, in the tests) relies on.
_JITTER = random.Random()  # noqa: S311 - jitter, not secrecy

# =================================================================================================
# Celery app
# =================================================================================================


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's configuration, derived from Settings: reliable delivery over fast delivery."""
    timeout = settings.redis_timeout
    config: dict[str, Any] = {
        "broker_url": settings.redis_url or "memory://localhost/",
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
            # Publishing makes one connection attempt: a down Redis must not stall a request.
            # The worker's own reconnects follow broker_connection_max_retries (forever).
            "max_retries": 0,
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
        "task_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "beat_schedule": {
            "sweep-outbox": {"task": "tasks.sweep_outbox", "schedule": settings.sweep_interval},
            "purge-retention": {"task": "tasks.purge_retention", "schedule": 24 * 3600},
        },
    }
    return config


def celery_init_app(app: Flask, settings: Settings) -> Celery:
    """Create the app's Celery instance; every task runs inside the Flask app context."""

    threads = DeliveryThreads(app) if settings.embedded else None

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

        def apply_async(
            self, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any
        ) -> Any:
            """Publish to the broker; in embedded mode, hand the task to the delivery threads.

            Embedded mode has no broker: ``.delay()`` and ``.apply_async()`` queue the task for
            a delivery thread and return at once, so that no task ever runs inside a request.
            """
            if threads is None:
                return super().apply_async(args, kwargs, task_id=task_id, **options)
            threads.submit(self.name, [tuple(args or ())], dict(kwargs or {}))
            return self.AsyncResult(task_id or str(uuid.uuid4()))

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(celery_config(settings))
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    app.extensions["mailslot.publisher"] = Publisher(celery_app)
    app.extensions["mailslot.delivery_threads"] = threads
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

        app = create_app()
        with app.app_context():
            services.log_broker_warnings()  # the worker's start; create_app itself stays offline
        return app.extensions["celery"]
    raise AttributeError(name)


def enqueue(task: Any, *args: Any) -> bool:
    """Publish a task without retries; a broker failure is logged, never raised to the caller.

    In embedded mode the task goes to the delivery threads instead (False when they refused it).
    """
    threads = current_app.extensions["mailslot.delivery_threads"]
    if threads is not None:
        return threads.submit(task.name, [args])
    try:
        # The app's own Celery instance, not Celery's global default: a process may hold several.
        current_app.extensions["celery"].tasks[task.name].apply_async(args=args, retry=False)
    except Exception as exc:  # noqa: BLE001 - a down broker must not fail the request
        log.warning("enqueue.failed", task=task.name, error=f"{type(exc).__name__}: {exc}"[:300])
        return False
    return True


def enqueue_each(task: Any, calls: list[tuple[Any, ...]]) -> bool:
    """Publish one task per argument tuple, pipelined into one Redis round trip; never raises.

    Like ``enqueue``: no retries, and a broker failure is logged and answered with False (the
    outbox rows wait for the sweeper). In embedded mode the delivery threads take them.
    """
    threads = current_app.extensions["mailslot.delivery_threads"]
    if threads is not None:
        return threads.submit(task.name, calls)
    if len(calls) < 2:
        return all([enqueue(task, *args) for args in calls])
    return _publish_batch(current_app.extensions["celery"], [(task.name, tuple(a)) for a in calls])


def enqueue_soon(task: Any, calls: list[tuple[Any, ...]]) -> None:
    """Queue one ``task`` per argument tuple through this app's publisher thread; return at once.

    For outbox rows that are already committed. The request does not wait for the broker, and
    rows whose task never goes out (the process stops first, the broker is down) wait for the
    sweeper, as they would after a failed ``enqueue``. In embedded mode the delivery threads
    run the tasks, after this returns.
    """
    threads = current_app.extensions["mailslot.delivery_threads"]
    if threads is not None:
        threads.submit(task.name, calls)
    else:
        current_app.extensions["mailslot.publisher"].submit(task.name, calls)


def _publish_batch(celery_app: Celery, messages: list[tuple[str, tuple[Any, ...]]]) -> bool:
    """Publish (task name, arguments) pairs with one producer, as one Redis pipeline."""
    try:
        with celery_app.producer_or_acquire() as producer:
            # kombu >= 5.7 sends a batch as one pipeline; an older kombu publishes one by one.
            batch = producer.batch() if hasattr(producer, "batch") else contextlib.nullcontext()
            with batch:
                for name, args in messages:
                    celery_app.tasks[name].apply_async(args=args, retry=False, producer=producer)
    except Exception as exc:  # noqa: BLE001 - a down broker must not fail the caller
        error = f"{type(exc).__name__}: {exc}"[:300]
        log.warning("enqueue.failed", count=len(messages), error=error)
        return False
    return True


class Publisher:
    """Hands tasks to the workers from one background thread of the web process.

    Publishing a Celery message costs the web process more CPU than storing the submission
    does. Here the request answers as soon as its transaction commits, and what every request
    queued meanwhile leaves as one ``fan_out`` message per task name: a worker publishes the
    individual tasks (one per delivery), so that work is not done by the process people wait
    on. The thread starts on first use (never at import or in the factory) and ends after
    ``idle_seconds`` without work; a forked child starts its own.
    """

    def __init__(
        self,
        celery_app: Celery,
        *,
        max_batch: int = 500,
        linger_seconds: float = 0.05,
        idle_seconds: float = 10,
    ):
        self.celery_app = celery_app
        self.max_batch = max_batch
        self.linger_seconds = linger_seconds
        self.idle_seconds = idle_seconds
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._unsent = 0
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def submit(self, task_name: str, items: list[tuple[Any, ...]]) -> None:
        """Queue one task per argument tuple; never blocks on the broker."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's thread and queue are not ours
                self._queue, self._unsent, self._thread = queue.SimpleQueue(), 0, None
                self._pid = os.getpid()
            self._unsent += len(items)
            for item in items:
                self._queue.put((task_name, item))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="mailslot-publisher", daemon=True
                )
                self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued was published or given up on; False on timeout."""
        with self._drained:
            return self._drained.wait_for(lambda: self._unsent == 0, timeout)

    def _run(self) -> None:
        """Publish whatever is queued, in batches, until idle."""
        while True:
            try:
                first = self._queue.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            # Linger a moment: requests that arrive together share one message.
            batch, until = [first], time.monotonic() + self.linger_seconds
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get(timeout=max(until - time.monotonic(), 0)))
                except queue.Empty:
                    break
            by_task: dict[str, list[Any]] = {}
            for name, item in batch:
                by_task.setdefault(name, []).append(item)
            _publish_batch(
                self.celery_app, [(fan_out.name, (name, items)) for name, items in by_task.items()]
            )
            with self._drained:
                self._unsent -= len(batch)
                self._drained.notify_all()


# How many tasks embedded mode runs at once: one slow receiver holds up one thread, not all.
EMBEDDED_DELIVERY_THREADS = 4

# Every app's delivery threads in this process: a forked child resets them (see below).
_ALL_DELIVERY_THREADS: weakref.WeakSet[DeliveryThreads] = weakref.WeakSet()


class DeliveryThreads:
    """Embedded mode's worker: a few threads of the web process that run the tasks handed to them.

    There is no broker in embedded mode. A request commits its outbox rows, hands the tickets
    here and answers; up to ``size`` threads run the same task functions a worker would (claims
    make a second run of a ticket harmless), so that a slow receiver holds up one thread, never
    a request. Threads start on first use (never at import or in the factory) and end after
    ``idle_seconds`` without work; an exception in a task is logged and the thread goes on; a
    forked child starts with none and an empty queue. At most ``max_queued`` tasks wait: beyond
    that, and after ``close``, a task is refused with a warning and its outbox row waits for the
    sweeper, as it would when a broker is down.
    """

    def __init__(
        self,
        app: Flask,
        *,
        size: int = EMBEDDED_DELIVERY_THREADS,
        max_queued: int = 10_000,
        idle_seconds: float = 10.0,
    ) -> None:
        self.app = app
        self.size = size
        self.max_queued = max_queued
        self.idle_seconds = idle_seconds
        self._reset()
        _ALL_DELIVERY_THREADS.add(self)

    def _reset(self) -> None:
        """Start empty: at construction, and in a forked child (the parent's work is its own)."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._settled = threading.Condition(self._lock)
        self._queue: deque[tuple[str, tuple[Any, ...], dict[str, Any]]] = deque()
        self._threads: set[threading.Thread] = set()
        self._waiting = 0  # threads waiting for work
        self._unfinished = 0  # queued or running
        self._closed = False

    def submit(
        self, task_name: str, calls: list[tuple[Any, ...]], kwargs: dict[str, Any] | None = None
    ) -> bool:
        """Queue one task per argument tuple and return at once; False when any was refused."""
        with self._lock:
            taken = 0 if self._closed else min(len(calls), self.max_queued - len(self._queue))
            for args in calls[:taken]:
                self._queue.append((task_name, tuple(args), kwargs or {}))
            self._unfinished += taken
            self._work.notify(taken)
            self._threads = {thread for thread in self._threads if thread.is_alive()}
            for _ in range(min(len(self._queue) - self._waiting, self.size - len(self._threads))):
                thread = threading.Thread(target=self._run, name="mailslot-delivery", daemon=True)
                self._threads.add(thread)
                thread.start()
            closed = self._closed
        if taken < len(calls):
            log.warning(
                "delivery_threads.refused",
                task=task_name,
                count=len(calls) - taken,
                reason="shutting down" if closed else "queue full",
            )
        return taken == len(calls)

    def wait_for_idle(self, timeout: float) -> bool:
        """Wait until every task queued so far has run; False on timeout."""
        with self._settled:
            return self._settled.wait_for(lambda: self._unfinished == 0, timeout)

    def close(self, timeout: float) -> bool:
        """Take no more tasks; let the threads finish the queue for up to ``timeout`` seconds.

        What has not started by then is dropped (its outbox rows wait for the sweeper of the
        next start). True when everything queued was run.
        """
        with self._lock:
            self._closed = True
            self._work.notify_all()
        finished = self.wait_for_idle(timeout)
        with self._lock:
            left = len(self._queue)
            self._queue.clear()
            self._unfinished -= left
            self._work.notify_all()
        if left:
            log.warning("delivery_threads.left_for_the_sweeper", count=left)
        return finished

    def _run(self) -> None:
        """Run queued tasks one after the other until idle, or closed with nothing left."""
        while True:
            with self._lock:
                self._waiting += 1
                self._work.wait_for(lambda: self._queue or self._closed, self.idle_seconds)
                self._waiting -= 1
                if not self._queue:
                    self._threads.discard(threading.current_thread())
                    return
                task_name, args, kwargs = self._queue.popleft()
            try:
                self._run_task(task_name, args, kwargs)
            finally:
                with self._lock:
                    self._unfinished -= 1
                    if self._unfinished == 0:
                        self._settled.notify_all()

    def _run_task(self, task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Run one task as a worker would (in the app context, its id bound to the log lines)."""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(task_id=str(uuid.uuid4()), task=task_name)
        try:
            self.app.extensions["celery"].tasks[task_name](*args, **kwargs)
        except Exception:
            log.exception("delivery_threads.task_failed")
        finally:
            structlog.contextvars.clear_contextvars()


def _reset_delivery_threads_in_child() -> None:
    """A forked child has none of its parent's threads: it starts its own on first use."""
    for threads in list(_ALL_DELIVERY_THREADS):
        threads._reset()


os.register_at_fork(after_in_child=_reset_delivery_threads_in_child)


def wait_for_idle(app: Flask, timeout: float = 30.0) -> bool:
    """Wait until the tasks ``app`` handed off so far were attempted; False on timeout.

    Embedded mode: the delivery threads ran them. Connected mode: the publisher sent them to the
    broker (what a worker does with them is not this process's to wait for).
    """
    threads = app.extensions["mailslot.delivery_threads"]
    if threads is not None:
        return threads.wait_for_idle(timeout)
    return app.extensions["mailslot.publisher"].flush(timeout)


def hand_over(app: Flask, timeout: float) -> bool:
    """At shutdown: publish what the publisher holds, or let the delivery threads finish theirs.

    Waits up to ``timeout`` seconds; whatever is left waits in the outbox for the sweeper. True
    when nothing was left.
    """
    threads = app.extensions["mailslot.delivery_threads"]
    if threads is not None:
        return threads.close(timeout)
    return app.extensions["mailslot.publisher"].flush(timeout)


# =================================================================================================
# Tasks
# =================================================================================================


@shared_task(ignore_result=False)
def ping() -> str:
    """Answer 'pong': proves a round trip through the broker, a worker and the result backend."""
    return "pong"


# What fan_out may publish: the tasks the web process hands over through its publisher.
_FAN_OUT_TASKS = frozenset({"tasks.deliver"})


@shared_task
def fan_out(task_name: str, calls: list[list[Any]]) -> int:
    """Publish one ``task_name`` task per argument list (the web process's publisher sends these).

    The number published; 0 when the broker failed (the outbox rows wait for the sweeper).
    """
    if task_name not in _FAN_OUT_TASKS:
        log.warning("fan_out.refused", task=task_name)
        return 0
    task = current_app.extensions["celery"].tasks[task_name]
    published = enqueue_each(task, [tuple(args) for args in calls])
    return len(calls) if published else 0


@shared_task
def deliver(delivery_id: int, attempts: int | None = None) -> str:
    """Send one outbox row (email or webhook). Safe to run twice: only one run claims the row.

    ``attempts`` is how many attempts the row had when this message was published: a message
    left over from an earlier attempt (the sweeper may publish a row whose message is still
    queued) finds nothing to claim, so a retry never goes out before its time. None (direct
    calls, inline sweeps) claims whatever is claimable.
    """
    structlog.contextvars.bind_contextvars(delivery_id=delivery_id)
    settings = current_settings()
    with dal.transaction() as conn:
        claimed = dal.claim_delivery(
            conn, delivery_id, settings.delivery_lease_seconds, expect_attempts=attempts
        )
        if claimed is None:
            context = None
        elif claimed.submission_id is None:
            context = dal.account_delivery_context(conn, delivery_id)
        else:
            context = dal.delivery_context(conn, delivery_id)
    if claimed is None or context is None:
        log.info("delivery.skipped", reason="not claimable")
        return "skipped"
    note = None
    try:
        if claimed.submission_id is None:
            structlog.contextvars.bind_contextvars(user=context.user_id, email=context.template)
            note = send_account_email(context)
        else:
            structlog.contextvars.bind_contextvars(
                submission=context.submission_public_id, form=context.form_public_id
            )
            if context.kind == "email":
                send_notification(context)
            else:
                send_webhook(context)
    except PermanentFailure as exc:
        return _record_failure(context, str(exc), permanent=True, gone=exc.gone)
    except TemporaryFailure as exc:
        return _record_failure(context, str(exc), retry_after=exc.retry_after)
    except Exception as exc:
        log.exception("delivery.error")
        return _record_failure(context, f"{type(exc).__name__}: {exc}")
    with dal.transaction() as conn:
        dal.finish_delivery(conn, delivery_id, "done", error=note)
    log.info("delivery.done", kind=context.kind, attempts=context.attempts, note=note)
    return "done"


class PermanentFailure(Exception):
    """Trying again cannot help (5xx to RCPT, webhook refused by policy, 410 Gone)."""

    def __init__(self, message: str, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


class TemporaryFailure(Exception):
    """Worth another attempt later (connection errors, 4xx SMTP, 429/5xx/timeouts)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def next_attempt_delay(
    attempts: int, schedule: list[int], retry_after: float | None
) -> float | None:
    """Seconds until the next attempt after ``attempts`` tries, or None when none is left."""
    if attempts >= len(schedule):
        return None
    delay = schedule[attempts] * _JITTER.uniform(0.9, 1.1)
    if retry_after is not None:
        delay = max(delay, min(retry_after, 24 * 3600))
    return delay


def _record_failure(
    context: Any,
    error: str,
    *,
    permanent: bool = False,
    gone: bool = False,
    retry_after: float | None = None,
) -> str:
    """Schedule the next attempt, or mark the delivery dead when none is left."""
    settings = current_settings()
    error = error[:1000]
    delay = (
        None
        if permanent
        else next_attempt_delay(context.attempts, settings.delivery_retry_schedule, retry_after)
    )
    with dal.transaction() as conn:
        if delay is None:
            dal.finish_delivery(conn, context.delivery_id, "dead", error=error)
        else:
            when = dal.utcnow() + dt.timedelta(seconds=delay)
            dal.finish_delivery(
                conn, context.delivery_id, "pending", error=error, next_attempt_at=when
            )
    if gone:
        with cache.form_write(context.form_public_id) as conn:
            dal.disable_webhook(conn, context.form_id)
            dal.cancel_webhook_deliveries(conn, context.form_id, f"cancelled: {WEBHOOK_GONE}")
    if delay is None:
        log.warning("delivery.dead", kind=context.kind, attempts=context.attempts, error=error)
        return "dead"
    log.info("delivery.retry", kind=context.kind, attempts=context.attempts, in_s=round(delay))
    return "retry"


@shared_task
def purge_retention() -> int:
    """Daily beat task: delete submissions past their form's retention period."""
    return services.purge_expired()


@shared_task
def sweep_outbox() -> int:
    """Beat task: enqueue deliveries that are due or whose lease ran out."""
    return sweep(inline=False)


def sweep(*, inline: bool, limit: int = 500) -> int:
    """Find due deliveries and enqueue them (or, with no worker, deliver them right here)."""
    settings = current_settings()
    with dal.transaction() as conn:
        due = dal.due_deliveries(
            conn, limit, push_back_seconds=0 if inline else settings.delivery_lease_seconds
        )
    # Published after the commit: SQLite's write lock is not held while the broker is slow.
    if inline:
        for delivery_id, _attempts in due:
            deliver.run(delivery_id)
    elif due:
        enqueue_each(deliver, due)
    if due:
        log.info("outbox.swept", count=len(due), inline=inline)
    return len(due)


# =================================================================================================
# Header values: decoded, then flattened or refused, before any message is built
# =================================================================================================
# Python's email package decodes RFC 2047 encoded words in a header value it is given, so a
# value with no CR or LF can still become several headers once it is set (CVE-2024-6923). Every
# value bound for a header is therefore decoded here first, exactly as the package would read
# it, and only then judged: text is flattened to one line, an address is taken or refused whole.

SUBJECT_MAX_LENGTH = 200
DISPLAY_NAME_MAX_LENGTH = 100
_DECODE_ROUNDS = 4  # an encoded word may carry another one; more nesting than this is refused
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_LINE_LIKE = frozenset({"Cc", "Zl", "Zp"})
_STRICT_PARSE = email.policy.default.clone(raise_on_defect=True)


class UnsafeMessage(PermanentFailure):
    """A message whose headers are not exactly the ones we set, or lack a usable address.

    Permanent: the same values would fail the same way on every attempt.
    """


def _without_surrogates(text: str) -> str:
    """``text`` without lone surrogates (no encoding can carry them)."""
    return "".join(ch for ch in text if not "\ud800" <= ch <= "\udfff")


def _parsed_unstructured(text: str) -> str | None:
    """What the email package makes of ``text`` as a header value; None if it cannot."""
    try:
        return str(email.policy.default.header_factory("subject", text))
    except Exception:  # noqa: BLE001 - hostile input: whatever the parser chokes on is refused
        return None


def _decoded(value: Any) -> str | None:
    """A string with its encoded words decoded until none is left, NFC; None if unreadable."""
    if not isinstance(value, str):
        return None
    text = _without_surrogates(value)
    for _ in range(_DECODE_ROUNDS):
        decoded = _parsed_unstructured(text)
        if decoded is None:
            return None
        decoded = _without_surrogates(decoded)  # undecodable bytes come back as surrogates
        if decoded == text:
            return unicodedata.normalize("NFC", text)
        text = decoded
    return None


def _flatten(text: str) -> str:
    """One line: line breaks, other control characters and separators become single spaces,
    bidirectional overrides go."""
    kept = (
        " " if unicodedata.category(ch) in _LINE_LIKE else ch
        for ch in text
        if ch not in _BIDI_CONTROLS
    )
    return " ".join("".join(kept).split())


def header_text(value: Any, max_length: int = SUBJECT_MAX_LENGTH) -> str | None:
    """A value fit for an unstructured header (Subject, a display name), or None when nothing
    usable is left.

    Encoded words are decoded (nested ones too), the text is normalised (NFC) and flattened to
    one line of at most ``max_length`` characters, and what still looks like an encoded word
    (unknown charset, bad encoding) is broken up ("=?" -> "= ?") so that no reader decodes it
    later. The result reads back unchanged through the email package.
    """
    decoded = _decoded(value)
    if decoded is None:
        return None
    text = _flatten(decoded).replace("=?", "= ?")[:max_length].rstrip()
    if not text or _parsed_unstructured(text) != text:
        return None
    return text


def _single_mailbox(value: Any) -> tuple[str, str] | None:
    """(display name, addr-spec) when ``value`` decodes to exactly one mailbox, else None.

    Refused rather than repaired: line breaks or other control characters anywhere, groups,
    several addresses, anything the address parser finds a defect in.
    """
    if isinstance(value, str) and _without_surrogates(value) != value:
        return None  # an address is taken whole or not at all
    text = _decoded(value)
    if text is None:
        return None
    text = text.strip()
    if not text or any(
        unicodedata.category(ch) in _LINE_LIKE or ch in _BIDI_CONTROLS for ch in text
    ):
        return None
    try:
        header = email.policy.default.header_factory("reply-to", text)
        groups = header.groups
    except Exception:  # noqa: BLE001 - hostile input: whatever the parser chokes on is refused
        return None
    if header.defects or len(groups) != 1 or groups[0].display_name is not None:
        return None
    if len(groups[0].addresses) != 1:
        return None
    mailbox = groups[0].addresses[0]
    if not mailbox.addr_spec or any(ch.isspace() for ch in mailbox.addr_spec):
        return None
    return mailbox.display_name, mailbox.addr_spec


def header_address(value: Any, *, checked: bool = True) -> str | None:
    """One bare address for To or Reply-To, or None.

    ``value`` must decode to exactly one mailbox; its display name is dropped (a submitter's
    name is no one's business in a header, and ``"boss@bank.example" <eve@…>`` is a trick).
    ``checked`` (submitted values) also requires an address email-validator accepts, with no
    quoted local part, IP literal or non-ASCII local part; the domain comes back in ASCII.
    Stored addresses (the owner's, validated at sign-up) need only the mailbox shape.
    """
    mailbox = _single_mailbox(value)
    if mailbox is None:
        return None
    address = mailbox[1]
    if not checked:
        return address if address.count("@") == 1 else None
    try:
        valid = email_validator.validate_email(
            address,
            check_deliverability=False,
            allow_smtputf8=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
        )
    except email_validator.EmailNotValidError:
        return None
    return valid.ascii_email


def sender_address(mail_from: str) -> Address | None:
    """MAIL_FROM as a From header: one mailbox, its display name flattened; None if unusable."""
    mailbox = _single_mailbox(mail_from)
    if mailbox is None or mailbox[1].count("@") != 1:
        return None
    name = header_text(mailbox[0], DISPLAY_NAME_MAX_LENGTH) or ""
    try:
        return Address(display_name=name, addr_spec=mailbox[1])
    except (ValueError, IndexError, email.errors.HeaderParseError):
        return None


def _squeezed(text: str) -> str:
    """``text`` without any whitespace."""
    return "".join(text.split())


def check_serialised(message: EmailMessage) -> bytes:
    """The message's bytes, once they are shown to hold exactly the headers that were set.

    Defence in depth: the bytes are parsed back (strictly, and by the lenient legacy parser a
    receiver may use) and must name the same headers, once each, with the same values and no
    line break inside any of them. Anything else raises UnsafeMessage.
    """
    raw = bytes(message)
    expected = sorted(name.lower() for name in message)
    try:
        strict = email.message_from_bytes(raw, policy=_STRICT_PARSE)
    except (email.errors.MessageError, ValueError) as exc:
        raise UnsafeMessage(f"the message does not parse back: {exc}") from None
    legacy = email.message_from_bytes(raw)
    for reader in (strict, legacy):
        found = sorted(name.lower() for name in reader)
        if found != expected:
            raise UnsafeMessage(f"the message would carry {found}, not {expected}")
    for name in message:
        value = str(strict[name])
        # The email package's folding may move the value to the next line, or lose the space
        # between two encoded words (a known bug): compare the text without its spaces.
        if _squeezed(value) != _squeezed(str(message[name])) or "\r" in value or "\n" in value:
            raise UnsafeMessage(f"the {name} header does not read back as it was set")
    return raw


# =================================================================================================
# Notification email
# =================================================================================================


def reply_to_address(meta: dict[str, Any], data: dict[str, Any]) -> str | None:
    """Reply-To from _replyto, else from an ``email`` field: the first that is exactly one
    usable address (see ``header_address``)."""
    for candidate in (meta.get("reply_to"), data.get("email")):
        address = header_address(candidate)
        if address:
            return address
    return None


def send_notification(context: Any) -> None:
    """Email the form's owner about one submission, only ever to the confirmed address.

    A submitter's subject or reply address that cannot be used is left out, never the email:
    if the checked message still does not read back as built, it goes with Mailslot's own
    subject and no Reply-To.
    """
    if context.owner_confirmed_at is None or context.target != context.owner_email:
        raise PermanentFailure("the owner's address is not confirmed (or changed)")
    settings = current_settings()
    link = (
        f"{settings.base_url}/forms/{context.form_public_id}"
        f"/submissions/{context.submission_public_id}"
    )
    values = {
        "form_name": context.form_name,
        "data": context.data,
        "received_at": context.created_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "link": link,
    }
    default_subject = header_text(f"New submission: {context.form_name}") or "New submission"
    parts = {
        "to": context.owner_email,
        "text": render_template("email/submission.txt", **values),
        "html": render_template("email/submission.html", **values),
    }
    try:
        message = build_message(
            subject=header_text(context.meta.get("subject")) or default_subject,
            reply_to=reply_to_address(context.meta, context.data),
            **parts,
        )
    except UnsafeMessage as exc:
        log.warning("mail.submitted_headers_dropped", reason=str(exc)[:300])
        message = build_message(subject="New submission", **parts)
    transmit_or_classify(message)


def transmit_or_classify(message: EmailMessage) -> None:
    """Send a built message; SMTP refusals become Permanent- or TemporaryFailure."""
    try:
        transmit(message)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        text = f"recipient refused: {codes}"
        if codes and all(code >= 500 for code in codes):
            raise PermanentFailure(text) from None
        raise TemporaryFailure(text) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise TemporaryFailure(f"SMTP: {type(exc).__name__}: {exc}") from None


# =================================================================================================
# Account emails
# =================================================================================================
# Each is an outbox row naming its account and its template: claimed, retried, listed and
# replayed like a notification. Links are made from ids when the email is sent, so a row never
# holds a token, and no email ever holds a password or a code.


@dataclass(frozen=True)
class AccountEmail:
    """One kind of account email: its subject, its templates and what they are given."""

    label: str  # what the owner's account page calls it
    subject: str
    template: str  # "email/<name>": .txt and .html
    # The templates' values, or None when the email is no longer needed (the note says why).
    values: Callable[[Any], dict[str, Any] | None]
    skipped_note: str = ""
    # Sent to the account's current address only (a row queued for an old address is dead).
    to_account_address: bool = True


def _confirm_values(context: Any) -> dict[str, Any] | None:
    """A fresh confirmation link for the account's current address; None once confirmed."""
    if context.user_confirmed_at is not None:
        return None
    link = services.confirmation_link(context.user_id, context.user_email)
    return {"link": link, "email": context.user_email}


def _account_exists_values(context: Any) -> dict[str, Any]:
    """The address and where to log in (nothing secret: the person asking may not own it)."""
    return {"email": context.user_email, "login_link": f"{current_settings().base_url}/login"}


ACCOUNT_EMAILS: dict[str, AccountEmail] = {
    "confirm_email": AccountEmail(
        label="Address confirmation",
        subject="Confirm your Mailslot address",
        template="email/confirm",
        values=_confirm_values,
        skipped_note="not sent: the address was confirmed before it went out",
    ),
    "account_exists": AccountEmail(
        label="Sign-up attempt with your address",
        subject="Someone tried to sign up to Mailslot with your address",
        template="email/account_exists",
        values=_account_exists_values,
    ),
}


def send_account_email(context: Any) -> str | None:
    """Send one account email; a note when it was no longer needed and was not sent."""
    spec = ACCOUNT_EMAILS.get(context.template)
    if spec is None:
        raise PermanentFailure(f"Mailslot has no account email called {context.template!r}")
    if spec.to_account_address and context.target != context.user_email:
        raise PermanentFailure("the account's address changed after this email was queued")
    values = spec.values(context)
    if values is None:
        return spec.skipped_note
    message = build_message(
        to=context.target,
        subject=spec.subject,
        text=render_template(f"{spec.template}.txt", **values),
        html=render_template(f"{spec.template}.html", **values),
    )
    transmit_or_classify(message)
    return None


# =================================================================================================
# Webhooks
# =================================================================================================


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to an address we checked, whatever the name resolves to now."""

    def __init__(self, host: str, port: int, address: str, **kwargs: Any) -> None:
        super().__init__(host, port, **kwargs)
        self._address = address

    def connect(self) -> None:
        """Connect to the checked address."""
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked address, verifying the certificate for the URL's host name."""

    def __init__(self, host: str, port: int, address: str, **kwargs: Any) -> None:
        super().__init__(host, port, context=ssl.create_default_context(), **kwargs)
        self._address = address

    def connect(self) -> None:
        """Connect to the checked address, then TLS with SNI for the host name."""
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def webhook_body(context: Any, timestamp: int) -> bytes:
    """The JSON event for one submission."""
    event = {
        "type": "submission.created",
        "timestamp": dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(),
        "data": {
            "form": {"id": context.form_public_id, "name": context.form_name},
            "submission": {
                "id": context.submission_public_id,
                "created_at": context.created_at.isoformat(),
                "data": context.data,
            },
        },
    }
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


def post_webhook(
    url: str,
    secret: str,
    message_id: str,
    body: bytes,
    *,
    timeouts: tuple[float, float] | None = None,
) -> tuple[int, dict[str, str]]:
    """POST a signed body to a checked, pinned address; no redirects followed.

    ``timeouts`` is (connect, read) in seconds; by default the worker's WEBHOOK_*_TIMEOUT.
    A refused address is a PermanentFailure; a name that does not resolve (now) is temporary.
    """
    settings = current_settings()
    connect_timeout, read_timeout = timeouts or (
        settings.webhook_connect_timeout,
        settings.webhook_read_timeout,
    )
    try:
        target, addresses = services.resolve_webhook_target(
            url, settings.webhook_allow_private, dns_timeout=settings.webhook_dns_timeout
        )
    except services.HostNotResolved as exc:
        raise TemporaryFailure(str(exc)) from None
    except services.BlockedAddress as exc:
        raise PermanentFailure(f"webhook refused: {exc}") from None
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Mailslot-Webhooks/1",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": services.sign_webhook(secret, message_id, timestamp, body),
    }
    connection_class = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    connection = connection_class(target.host, target.port, addresses[0], timeout=connect_timeout)
    try:
        connection.connect()
        connection.sock.settimeout(read_timeout)
        connection.request("POST", target.path, body=body, headers=headers)
        response = connection.getresponse()
        response.read(64 * 1024)
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    except (OSError, http.client.HTTPException) as exc:
        raise TemporaryFailure(f"webhook: {type(exc).__name__}: {exc}") from None
    finally:
        connection.close()


def _retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds (delta or HTTP date), or None."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


WEBHOOK_GONE = "the receiver answered 410 Gone; webhook disabled"


def send_webhook(context: Any) -> None:
    """Deliver the submission.created event; 2xx done, 410 disables, 429/5xx retry.

    It goes to the form's webhook URL and secret as they are now, not as they were when the
    submission arrived; the row's target is brought up to date to say so.
    """
    if not context.webhook_url or not context.webhook_secret:
        raise PermanentFailure(services.WEBHOOK_REMOVED)
    if context.target != context.webhook_url:
        with dal.transaction() as conn:
            dal.set_delivery_target(conn, context.delivery_id, context.webhook_url)
    body = webhook_body(context, int(time.time()))
    status, headers = post_webhook(
        context.webhook_url, context.webhook_secret, f"msg_{context.delivery_id}", body
    )
    if 200 <= status < 300:
        return
    if status == 410:
        raise PermanentFailure(WEBHOOK_GONE, gone=True)
    if 300 <= status < 400:
        raise TemporaryFailure(f"the receiver answered {status} (redirects are not followed)")
    raise TemporaryFailure(
        f"the receiver answered {status}",
        retry_after=_retry_after_seconds(headers.get("retry-after")),
    )


# =================================================================================================
# Mail backends
# =================================================================================================


def build_message(
    *, to: str, subject: str, text: str, html: str | None = None, reply_to: str | None = None
) -> EmailMessage:
    """A text (and optional HTML) message from MAIL_FROM, every header value checked first.

    Each value goes through ``header_text`` or ``header_address`` before the message exists:
    an unusable subject becomes "Mailslot", an unusable Reply-To is left out, and an unusable
    sender or recipient raises UnsafeMessage. The bytes are then read back (``check_serialised``).
    """
    settings = current_settings()
    sender = sender_address(settings.mail_from)
    if sender is None:
        raise UnsafeMessage("MAIL_FROM is not one usable address; fix the setting")
    recipient = header_address(to, checked=False)
    if recipient is None:
        raise UnsafeMessage("the recipient is not one usable address")
    message = EmailMessage()
    message["From"] = sender
    message["To"] = Address(addr_spec=recipient)
    message["Subject"] = header_text(subject) or "Mailslot"
    message["Date"] = formatdate(localtime=False)
    # Our own ids, not make_msgid's or the generator's: those draw on the global random state,
    # which delivery threads must leave alone.
    message["Message-ID"] = f"<{uuid.uuid4().hex}@mailslot>"
    reply_address = header_address(reply_to)
    if reply_address:
        message["Reply-To"] = Address(addr_spec=reply_address)
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
        message.set_boundary(f"=_mailslot_{uuid.uuid4().hex}")
    check_serialised(message)
    return message


def send_mail(
    *, to: str, subject: str, text: str, html: str | None = None, reply_to: str | None = None
) -> EmailMessage:
    """Build a message and send it through the configured backend."""
    message = build_message(to=to, subject=subject, text=text, html=html, reply_to=reply_to)
    transmit(message)
    return message


def transmit(message: EmailMessage) -> None:
    """Send a built message: SMTP, or the console (log + .eml in the outbox)."""
    settings = current_settings()
    if settings.mail_backend == "smtp":
        _send_smtp(settings, message)
    else:
        _write_outbox(settings, message)


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
        # The envelope names exactly the checked sender and recipient, whatever the headers say.
        s.send_message(
            message,
            from_addr=message["From"].addresses[0].addr_spec,
            to_addrs=[message["To"].addresses[0].addr_spec],
        )
    log.info("mail.sent", to=message["To"], subject=message["Subject"])

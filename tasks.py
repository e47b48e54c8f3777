"""Mailslot's Celery side: the Celery app of a Flask app (``celery_init_app``, whose tasks run
inside the app context), the tasks (deliver, sweep the outbox, purge expired submissions), the
retry schedule, the publisher thread that hands tasks to the broker, and embedded mode's delivery
and sweeper threads.

The worker is started with ``celery -A microapp.celery_app worker -B``: ``microapp`` builds the
Flask app, and this Celery app with it, on first use. In embedded mode (no REDIS_URL) there is no
broker and no worker: the web process hands tasks to a few delivery threads of its own, never
running them inside a request. How each delivery is made lives in ``delivery``. This module must
not import ``microapp``, ``services``, ``users`` or ``intake``: they sit above it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import queue
import random
import threading
import time
import uuid
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

import structlog
from celery import Celery, Task, shared_task
from celery.signals import setup_logging, task_postrun, task_prerun
from flask import Flask, current_app

import cache
import dal
import delivery
import records
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


def celery_init_app(app: Flask) -> Celery:
    """Create the app's Celery instance; every task runs inside the Flask app context.

    Flask's "Background Tasks with Celery" pattern, configured from the app's Settings; in
    embedded mode its tasks go to the app's delivery threads instead of a broker.
    """
    settings: Settings = app.extensions["mailslot.settings"]
    threads = DeliveryThreads(app) if settings.embedded else None

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            """Run the task inside the app context (a worker has no request)."""
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


# =================================================================================================
# Handing tasks over: to the broker, through the publisher thread, or to the delivery threads
# =================================================================================================


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


def dispatch_deliveries(tickets: list[tuple[int, int]]) -> None:
    """Hand committed outbox rows, as (id, attempts so far), to the workers; rows that fail to
    enqueue wait for the sweeper."""
    enqueue_soon(deliver, tickets)


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


# =================================================================================================
# Embedded mode: delivery threads and the sweeper thread of the web process
# =================================================================================================

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


def start_embedded_sweeper(app: Flask, interval: int, stop: threading.Event) -> threading.Thread:
    """With no worker to run beat, hand the outbox sweep to the delivery threads now and every
    ``interval`` seconds, and the retention purge daily, until ``stop`` is set."""

    def sweep_forever() -> None:
        """Enqueue the sweep (and, once a day, the purge) until stopped."""
        last_purge: float | None = None
        while True:
            try:
                with app.app_context():
                    enqueue(sweep_outbox)
                    if last_purge is None or time.monotonic() - last_purge > 24 * 3600:
                        enqueue(purge_retention)
                        last_purge = time.monotonic()
            except Exception:
                log.exception("outbox.sweep_failed")
            if stop.wait(interval):
                return

    thread = threading.Thread(target=sweep_forever, name="outbox-sweeper", daemon=True)
    thread.start()
    return thread


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
            note = delivery.send_account_email(context)
        else:
            structlog.contextvars.bind_contextvars(
                submission=context.submission_public_id, form=context.form_public_id
            )
            if context.kind == "email":
                delivery.send_notification(context)
            else:
                delivery.send_webhook(context)
    except delivery.PermanentFailure as exc:
        return _record_failure(context, str(exc), permanent=True, gone=exc.gone)
    except delivery.TemporaryFailure as exc:
        return _record_failure(context, str(exc), retry_after=exc.retry_after)
    except Exception as exc:
        log.exception("delivery.error")
        return _record_failure(context, f"{type(exc).__name__}: {exc}")
    with dal.transaction() as conn:
        dal.finish_delivery(conn, delivery_id, "done", error=note)
    log.info("delivery.done", kind=context.kind, attempts=context.attempts, note=note)
    return "done"


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
    context: records.SubmissionDelivery | records.AccountDelivery,
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
    if gone and isinstance(context, records.SubmissionDelivery):
        with cache.form_write(context.form_public_id) as conn:
            dal.disable_webhook(conn, context.form_id)
            dal.cancel_webhook_deliveries(
                conn, context.form_id, f"cancelled: {delivery.WEBHOOK_GONE}"
            )
    if delay is None:
        log.warning("delivery.dead", kind=context.kind, attempts=context.attempts, error=error)
        return "dead"
    log.info("delivery.retry", kind=context.kind, attempts=context.attempts, in_s=round(delay))
    return "retry"


@shared_task
def purge_retention() -> int:
    """Daily beat task: delete submissions past their form's retention period."""
    return purge_expired()


PURGE_BATCH = 1000


def purge_expired(now: dt.datetime | None = None) -> int:
    """Delete submissions older than their form's retention period; safe to run any time."""
    now = now or dal.utcnow()
    total = 0
    with dal.connection() as conn:
        targets = dal.forms_with_retention(conn)
    for form_id, retention_days in targets:
        cutoff = now - dt.timedelta(days=retention_days)
        while True:
            with dal.transaction() as conn:
                deleted = dal.purge_before(conn, form_id, cutoff, PURGE_BATCH)
            total += deleted
            if deleted < PURGE_BATCH:
                break
        cache.forget_form_numbers(form_id)
    if total:
        log.info("retention.purged", submissions=total)
    return total


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

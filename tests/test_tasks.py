"""Celery set-up and tasks: embedded mode's threads, a real worker round trip, mail backends."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

import cache
import delivery
import microapp
import tasks
from conftest import PASSWORD, SMTPSink, message_text, read_outbox, settle_deliveries

PROJECT = Path(__file__).resolve().parent.parent


def test_celery_is_configured_for_reliable_delivery(overrides: dict[str, Any]) -> None:
    app = microapp.create_app(**overrides, redis_url="redis://127.0.0.1:6399/3")
    conf = app.extensions["celery"].conf
    assert conf.broker_url == "redis://127.0.0.1:6399/3"
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_connection_max_retries is None
    assert conf.broker_transport_options["visibility_timeout"] == 3600
    assert conf.task_time_limit == 90
    assert conf.task_always_eager is False


def test_embedded_mode_runs_no_task_eagerly_but_on_its_delivery_threads(app: Flask) -> None:
    # The behaviour itself (requests answer while a delivery is held) is in test_embedded_delivery.
    assert app.extensions["celery"].conf.task_always_eager is False
    assert isinstance(app.extensions["mailslot.delivery_threads"], tasks.DeliveryThreads)


def test_ping_task_called_directly_answers_pong(app: Flask) -> None:
    with app.app_context():
        assert tasks.ping() == "pong"


def test_enqueue_with_the_broker_down_logs_and_returns_false(overrides: dict[str, Any]) -> None:
    from conftest import free_port

    app = microapp.create_app(**overrides, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with app.app_context():
        started = time.monotonic()
        assert tasks.enqueue(tasks.ping) is False
        assert time.monotonic() - started < 10


@pytest.mark.services
def test_ping_round_trip_through_a_real_worker(
    overrides: dict[str, Any], redis_url: str, tmp_path: Path
) -> None:
    queue = f"mailslot-test-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "CELERY_QUEUE": queue,
        "INSTANCE_PATH": str(tmp_path / "worker"),
        "LOG_FORMAT": "json",
    }
    log_file = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "microapp.celery_app", "worker", "--pool", "solo",
         "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
        cwd=PROJECT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        app = microapp.create_app(**overrides, redis_url=redis_url, celery_queue=queue)
        celery_app = app.extensions["celery"]
        result = celery_app.tasks["tasks.ping"].apply_async()
        assert result.get(timeout=60) == "pong"
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log_file.close()
    log = (tmp_path / "worker.log").read_text()
    assert '"task_id"' in log  # the worker logs through structlog with the task bound


def test_console_backend_writes_the_message_to_the_outbox(app: Flask) -> None:
    with app.app_context():
        delivery.send_mail(to="o@example.com", subject="Hello", text="Body", html="<p>Body</p>")
    [message] = read_outbox(app)
    assert message["Subject"] == "Hello"
    assert message_text(message).strip() == "Body"
    assert message.get_body(preferencelist=("html",)) is not None


def test_smtp_backend_delivers_to_a_real_smtp_server(
    overrides: dict[str, Any], smtp_sink: SMTPSink
) -> None:
    app = microapp.create_app(
        **overrides,
        mail_backend="smtp",
        smtp_host="127.0.0.1",
        smtp_port=smtp_sink.port,
        smtp_starttls=False,
        mail_from="Mailslot <noreply@mailslot.test>",
    )
    client = app.test_client()
    from conftest import AuthActions

    AuthActions(client, app).signup("smtp@example.com", PASSWORD)
    settle_deliveries(app)
    assert smtp_sink.received.wait(10)
    [(mail_from, recipients, message)] = smtp_sink.messages
    assert mail_from == "noreply@mailslot.test"
    assert recipients == ["smtp@example.com"]
    assert message["Subject"] == "Confirm your Mailslot address"
    assert "http://mailslot.test/confirm/" in message_text(message)


def test_headers_cannot_be_injected_through_subject_or_reply_to(app: Flask) -> None:
    with app.app_context():
        message = delivery.build_message(
            to="o@example.com",
            subject="Hi\r\nBcc: victim@example.com",
            text="x",
            reply_to="a@example.com\r\nBcc: victim@example.com",
        )
    assert message["Bcc"] is None
    assert message["Subject"] == "Hi Bcc: victim@example.com"
    assert message["Reply-To"] is None  # not one address: left out, the message still goes


# --- the web process's publisher ----------------------------------------------------------------


@pytest.fixture
def broker_app(overrides: dict[str, Any], redis_url: str) -> Iterator[Flask]:
    """Connected mode on the real Redis, with a queue of its own (emptied afterwards)."""
    queue = f"mailslot-test-{uuid.uuid4().hex[:8]}"
    app = microapp.create_app(**overrides, redis_url=redis_url, celery_queue=queue)
    yield app
    with app.app_context():
        cache.stores().redis.delete(queue)


def queued(app: Flask) -> list[tuple[str, list[Any]]]:
    """(task name, positional arguments) of each message on the app's queue, oldest first."""
    with app.app_context():
        raw = cache.stores().redis.lrange(app.extensions["mailslot.settings"].celery_queue, 0, -1)
    messages = [json.loads(item) for item in reversed(raw)]
    return [(m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0]) for m in messages]


@pytest.mark.services
def test_publisher_sends_what_requests_queued_as_one_fan_out_message(broker_app: Flask) -> None:
    with broker_app.app_context():
        tasks.enqueue_soon(tasks.deliver, [(1, 0), (2, 0)])
        tasks.enqueue_soon(tasks.deliver, [(3, 1)])
        assert broker_app.extensions["mailslot.publisher"].flush()
    assert queued(broker_app) == [("tasks.fan_out", ["tasks.deliver", [[1, 0], [2, 0], [3, 1]]])]


@pytest.mark.services
def test_fan_out_publishes_one_deliver_task_per_delivery(broker_app: Flask) -> None:
    with broker_app.app_context():
        assert tasks.fan_out("tasks.deliver", [[4, 0], [5, 2]]) == 2
    assert queued(broker_app) == [("tasks.deliver", [4, 0]), ("tasks.deliver", [5, 2])]


@pytest.mark.services
def test_fan_out_refuses_tasks_it_does_not_carry(broker_app: Flask) -> None:
    with broker_app.app_context():
        assert tasks.fan_out("tasks.purge_retention", [[]]) == 0
    assert queued(broker_app) == []


@pytest.mark.services
def test_publisher_thread_ends_when_idle_and_starts_again(broker_app: Flask) -> None:
    publisher = tasks.Publisher(broker_app.extensions["celery"], idle_seconds=0.05)
    publisher.submit("tasks.deliver", [(1, 0)])
    assert publisher.flush()
    first = publisher._thread
    assert first is not None
    first.join(timeout=10)
    assert not first.is_alive()
    publisher.submit("tasks.deliver", [(2, 0)])
    assert publisher.flush()
    assert [args for _, args in queued(broker_app)] == [
        ["tasks.deliver", [[1, 0]]],
        ["tasks.deliver", [[2, 0]]],
    ]


def test_publisher_gives_up_quietly_when_the_broker_is_down(overrides: dict[str, Any]) -> None:
    from conftest import free_port

    app = microapp.create_app(**overrides, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with app.app_context():
        tasks.enqueue_soon(tasks.deliver, [(7, 0)])
    started = time.monotonic()
    assert app.extensions["mailslot.publisher"].flush(timeout=30)  # never hangs on the broker
    assert time.monotonic() - started < 30

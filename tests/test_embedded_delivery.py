"""Embedded mode's delivery threads: a request only stores and answers, whatever the receivers do.

The downstreams here hold their connection until the test releases them, so each test proves by
the order of events (never by a stopwatch) that the request had answered while a delivery was
still under way, and that the delivery then arrived, exactly once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_delivery import make_form, verify
from test_faults import wait_for

import dal
import microapp
import records
import tasks
from conftest import (
    PASSWORD,
    SMTPSink,
    WebhookReceiver,
    free_port,
    post_form,
    settle_deliveries,
    start_serve,
)


class HangingSMTP:
    """A TCP server that accepts SMTP connections and says nothing until released.

    Released, it relays each held connection to a real SMTP sink, so that the conversation the
    client started completes as if the server had merely been slow.
    """

    def __init__(self, sink: SMTPSink) -> None:
        self.sink = sink
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connected = threading.Event()
        self.release = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        """Hold every connection; each gets its own relay once released."""
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)
            self.connected.set()
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        """After the release, pipe the held connection to the sink both ways."""
        self.release.wait(120)
        with contextlib.suppress(OSError):
            upstream = socket.create_connection(("127.0.0.1", self.sink.port))
            threading.Thread(target=_pipe, args=(upstream, conn), daemon=True).start()
            _pipe(conn, upstream)

    def still_held(self) -> bool:
        """Every connection accepted so far is still open at the client's end."""
        for conn in self.held:
            try:
                if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    return False  # the client gave up and closed it
            except BlockingIOError:
                continue  # open, and the client is waiting for our greeting
        return bool(self.held)

    def close(self) -> None:
        """Release everything and stop listening."""
        self.release.set()
        self.listener.close()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    """Copy bytes until ``source`` ends, then end ``target``'s side."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)


@pytest.fixture
def hanging_smtp(smtp_sink: SMTPSink) -> Iterator[HangingSMTP]:
    """An SMTP server that never answers until the test releases it."""
    server = HangingSMTP(smtp_sink)
    yield server
    server.close()


@pytest.fixture
def overrides(overrides: dict[str, Any], hanging_smtp: HangingSMTP) -> dict[str, Any]:
    """Embedded mode, mailing through the hanging server; webhooks may reach the local receiver."""
    return {
        **overrides,
        "mail_backend": "smtp",
        "smtp_host": "127.0.0.1",
        "smtp_port": hanging_smtp.port,
        "smtp_starttls": False,
        "smtp_timeout": 60.0,
        "webhook_allow_private": True,
        "webhook_read_timeout": 20.0,
    }


def statuses(app: Flask) -> list[tuple[str, str, int]]:
    """(kind, status, attempts) of every delivery row as it is now, without waiting for any."""
    with app.app_context(), dal.connection() as conn:
        query = sa.select(dal.deliveries).order_by(dal.deliveries.c.id)
        return [(row.kind, row.status, row.attempts) for row in conn.execute(query)]


def pending_webhook_row(app: Flask, url: str) -> int:
    """A stored submission with one pending webhook delivery, handed to nobody yet; its id."""
    form = make_form(app, webhook_url=url, notify=False)
    with app.app_context(), dal.transaction() as conn:
        submission = dal.insert_submission(
            conn,
            {
                "public_id": dal.new_public_id(),
                "form_id": form.id,
                "data": {"message": "waiting"},
                "schema_version": 1,
                "meta": {},
            },
        )
        [delivery_id] = dal.insert_deliveries(conn, submission.id, [("webhook", url)])
    return delivery_id


def form_owner_email(app: Flask, form: records.Form) -> str:
    """The address of the form's owner."""
    with app.app_context(), dal.connection() as conn:
        owner = dal.owner_of_form(conn, form.id)
        assert owner is not None
        return owner.email


# --- the request answers while the receivers still hold the delivery ----------------------------


def test_submission_answers_while_the_smtp_server_and_webhook_receiver_hold_its_deliveries(
    app: Flask,
    client: FlaskClient,
    hanging_smtp: HangingSMTP,
    smtp_sink: SMTPSink,
    webhook_receiver: WebhookReceiver,
) -> None:
    webhook_receiver.script = ["hold"]
    form = make_form(app, webhook_url=webhook_receiver.url)
    response = client.post(f"/f/{form.public_id}", json={"message": "hello"})
    assert response.status_code == 201
    assert webhook_receiver.holding.wait(30), "the webhook was never called"
    assert hanging_smtp.connected.wait(30), "the notification was never sent"
    # The submitter has their answer; both deliveries are still in the receivers' hands.
    assert hanging_smtp.still_held()
    assert statuses(app) == [("email", "sending", 1), ("webhook", "sending", 1)]

    webhook_receiver.release.set()
    hanging_smtp.release.set()
    settle_deliveries(app)
    assert statuses(app) == [("email", "done", 1), ("webhook", "done", 1)]
    [(_, recipients, message)] = smtp_sink.messages
    assert recipients == [form_owner_email(app, form)]
    assert message["Subject"] == "New submission: Contact"
    [request] = webhook_receiver.requests
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert verify(form.webhook_secret, headers, request["body"])
    assert webhook_receiver.bodies()[0]["data"]["submission"]["id"] == response.json["id"]


def test_eight_slow_receivers_hold_no_request(
    app: Flask, client: FlaskClient, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script = ["hold"] * 8
    form = make_form(app, webhook_url=webhook_receiver.url, notify=False)
    answers = [client.post(f"/f/{form.public_id}", json={"n": n}) for n in range(8)]
    assert [a.status_code for a in answers] == [201] * 8
    assert webhook_receiver.holding.wait(30)
    # Every submitter has an answer while the receiver still holds deliveries; the others wait.
    in_flight = [status for _, status, _ in statuses(app)]
    assert "sending" in in_flight
    assert in_flight.count("sending") <= tasks.EMBEDDED_DELIVERY_THREADS

    webhook_receiver.release.set()
    settle_deliveries(app)
    assert statuses(app) == [("webhook", "done", 1)] * 8
    ids = [r["headers"]["webhook-id"] for r in webhook_receiver.requests]
    assert len(ids) == len(set(ids)) == 8  # each delivered, none twice
    assert all(
        verify(form.webhook_secret, r["headers"], r["body"]) for r in webhook_receiver.requests
    )


def test_signup_answers_while_the_smtp_server_holds_the_confirmation(
    app: Flask, client: FlaskClient, hanging_smtp: HangingSMTP, smtp_sink: SMTPSink
) -> None:
    # The page itself, not AuthActions.signup: that one waits for the email to go out.
    response = post_form(
        client,
        "/signup",
        {"email": "holding@example.com", "password": PASSWORD, "confirm": PASSWORD},
    )
    assert response.status_code == 302
    assert hanging_smtp.connected.wait(30), "the confirmation was never sent"
    assert hanging_smtp.still_held()  # answered; the email is still on its way

    hanging_smtp.release.set()
    settle_deliveries(app)
    [(_, recipients, message)] = smtp_sink.messages
    assert recipients == ["holding@example.com"]
    assert message["Subject"] == "Confirm your Mailslot address"


def test_delay_in_embedded_mode_hands_the_task_to_a_delivery_thread(
    app: Flask, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script = ["hold"]
    delivery_id = pending_webhook_row(app, webhook_receiver.url)
    assert app.extensions["celery"].conf.task_always_eager is False
    with app.app_context():
        app.extensions["celery"].tasks["tasks.deliver"].delay(delivery_id, 0)
    assert webhook_receiver.holding.wait(30)  # .delay() returned; a delivery thread holds it
    webhook_receiver.release.set()
    settle_deliveries(app)
    assert statuses(app) == [("webhook", "done", 1)]
    assert len(webhook_receiver.requests) == 1


# --- any handoffs: each delivery once --------------------------------------------------------

# One handoff: a ticket for row ``index`` (attempts 0 as after the commit, None as from a sweep
# run inline, 3 as a message left over from an earlier attempt), or a call with no arguments
# (the task raises). Handed over in chunks, as separate requests and sweeps would.
_handoffs = st.lists(
    st.one_of(
        st.tuples(st.integers(0, 3), st.sampled_from([0, None, 3])),
        st.just(()),
    ),
    max_size=16,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(handoffs=_handoffs, chunk=st.integers(1, 5))
def test_any_handoffs_deliver_each_row_once_and_settle(
    app: Flask, webhook_receiver: WebhookReceiver, handoffs: list[Any], chunk: int
) -> None:
    rows = [pending_webhook_row(app, webhook_receiver.url) for _ in range(4)]
    webhook_receiver.requests.clear()
    calls = [(rows[c[0]], c[1]) if c else () for c in handoffs]
    threads = app.extensions["mailslot.delivery_threads"]
    for start in range(0, len(calls), chunk):
        assert threads.submit("tasks.deliver", calls[start : start + chunk])
    settle_deliveries(app)

    claimable = {call[0] for call in calls if call and call[1] != 3}
    with app.app_context(), dal.connection() as conn:
        got = {
            row.id: (row.status, row.attempts)
            for row in conn.execute(sa.select(dal.deliveries).where(dal.deliveries.c.id.in_(rows)))
        }
    assert got == {r: ("done", 1) if r in claimable else ("pending", 0) for r in rows}
    sent = sorted(r["headers"]["webhook-id"] for r in webhook_receiver.requests)
    assert sent == sorted(f"msg_{r}" for r in claimable)  # each once, none twice


# --- the threads: lazy, sturdy, fork-safe, and closed cleanly -----------------------------------


def test_create_app_starts_no_delivery_thread_until_a_task_is_handed_over(
    overrides: dict[str, Any], webhook_receiver: WebhookReceiver
) -> None:
    before = set(threading.enumerate())
    app = microapp.create_app(**overrides)
    started = set(threading.enumerate()) - before
    assert not [t for t in started if t.name == "mailslot-delivery"]
    delivery_id = pending_webhook_row(app, webhook_receiver.url)
    with app.app_context():
        assert tasks.enqueue(tasks.deliver, delivery_id, 0)
    assert [t for t in set(threading.enumerate()) - before if t.name == "mailslot-delivery"]
    assert tasks.hand_over(app, timeout=60)
    assert statuses(app) == [("webhook", "done", 1)]


def test_a_task_that_raises_leaves_its_thread_running_the_next_one(
    app: Flask, webhook_receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    delivery_id = pending_webhook_row(app, webhook_receiver.url)
    one_thread = tasks.DeliveryThreads(app, size=1)
    # A missing argument: the first task raises TypeError; the same thread must run the second.
    assert one_thread.submit("tasks.deliver", [(), (delivery_id, 0)])
    assert one_thread.wait_for_idle(60)
    assert "delivery_threads.task_failed" in caplog.text
    assert statuses(app) == [("webhook", "done", 1)]
    assert len(webhook_receiver.requests) == 1


def test_closed_delivery_threads_refuse_work_and_leave_the_row_to_the_sweeper(
    app: Flask, webhook_receiver: WebhookReceiver
) -> None:
    delivery_id = pending_webhook_row(app, webhook_receiver.url)
    assert tasks.hand_over(app, timeout=10)
    with app.app_context():
        assert tasks.enqueue(tasks.deliver, delivery_id, 0) is False
        settle_deliveries(app)
        assert statuses(app) == [("webhook", "pending", 0)]
        assert tasks.sweep(inline=True) == 1
    assert statuses(app) == [("webhook", "done", 1)]


def test_the_sweeper_hands_due_rows_to_the_delivery_threads(
    app: Flask, webhook_receiver: WebhookReceiver
) -> None:
    pending_webhook_row(app, webhook_receiver.url)  # stored, handed to nobody
    stop = threading.Event()
    tasks.start_embedded_sweeper(app, 3600, stop)
    try:
        wait_for(lambda: statuses(app) == [("webhook", "done", 1)], 60, "not swept")
    finally:
        stop.set()
    assert len(webhook_receiver.requests) == 1


def test_a_forked_child_starts_its_own_delivery_threads(
    app: Flask, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script = ["hold"]
    held = pending_webhook_row(app, webhook_receiver.url)
    fresh = pending_webhook_row(app, webhook_receiver.url)
    with app.app_context():
        tasks.enqueue(tasks.deliver, held, 0)
    assert webhook_receiver.holding.wait(30)  # the parent's thread is busy at the fork
    pid = os.fork()
    if pid == 0:  # the child: none of the parent's threads or work, its own on first use
        code = 1
        try:
            with app.app_context():
                dal.database().engine.dispose(close=False)
                idle_at_start = tasks.wait_for_idle(app, timeout=0)
                tasks.enqueue(tasks.deliver, fresh, 0)
                code = 0 if idle_at_start and tasks.wait_for_idle(app, timeout=60) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    webhook_receiver.release.set()
    settle_deliveries(app)
    assert os.waitstatus_to_exitcode(status) == 0
    assert statuses(app) == [("webhook", "done", 1), ("webhook", "done", 1)]
    ids = sorted(r["headers"]["webhook-id"] for r in webhook_receiver.requests)
    assert ids == sorted([f"msg_{held}", f"msg_{fresh}"])


def test_serve_finishes_the_deliveries_it_holds_when_stopped(
    tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    # SIGTERM while a receiver holds a delivery: serve stops taking requests, lets the delivery
    # thread finish, and only then exits; the row is done, not left half-sent.
    webhook_receiver.script = ["hold"]
    settings = {
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "SECRET_KEY": "embedded-serve-test-secret-0123456789",
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_READ_TIMEOUT": "60",
        "LOG_FORMAT": "json",
        "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000",
    }
    app = microapp.create_app(**{key.lower(): value for key, value in settings.items()})
    form = make_form(app, webhook_url=webhook_receiver.url, notify=False)
    port = free_port()
    env = {**os.environ, **settings}
    for name in ("REDIS_URL", "DATABASE_URL", "LOG_LEVEL"):
        env.pop(name, None)
    log_path = tmp_path / "serve.log"
    server = start_serve(port, env, log_path)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 60, "serve did not start")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/f/{form.public_id}",
            data=b'{"message": "stopping"}',
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 201
        assert webhook_receiver.holding.wait(30)
        server.send_signal(signal.SIGTERM)
        webhook_receiver.release.set()
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert statuses(app) == [("webhook", "done", 1)]
    assert len(webhook_receiver.requests) == 1
    log = log_path.read_text()
    assert '"event": "serve.stopped"' in log
    assert '"deliveries_handed_over": true' in log


def _answers(url: str) -> bool:
    """True when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False

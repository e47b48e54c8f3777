"""Fault tests: a private Redis that stops and starts, a real worker that gets killed, an SMTP
server that refuses connections. Nothing that got a success answer may be lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from flask import Flask

import dal
import microapp
import records
import services
from conftest import SMTPSink, WebhookReceiver, free_port, need_service, settle_deliveries

PROJECT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.services


class PrivateRedis:
    """A redis-server of the test's own on its own port, stopped and started by PID."""

    def __init__(self, workdir: Path, *options: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.options = options  # more redis-server options: "--maxmemory-policy", "allkeys-lru"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers."""
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_for(lambda: _pings(client), 10, "private redis did not start")

    def stop(self) -> None:
        """Stop the server (by its PID, never the shared one)."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def wait_for(check: Callable[[], Any], seconds: float, message: str) -> None:
    """Poll until ``check`` is true; bounded in time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(message)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private redis-server, stopped at the end."""
    need_service(shutil.which("redis-server") is not None, "redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


class Worker:
    """A real `celery -A microapp.celery_app worker -B` subprocess sharing the test's database."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start a worker with beat (the sweeper runs every second here)."""
        self.starts += 1
        log = (self.workdir / f"worker-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "microapp.celery_app", "worker", "-B",
             "--pool", "solo", "--without-gossip", "--without-mingle", "--loglevel", "INFO",
             "-s", str(self.workdir / f"beat-{self.starts}")],
            cwd=PROJECT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: beat runs in a child process
        )  # fmt: skip

    def kill(self) -> None:
        """kill -9 the worker and its beat child: no clean shutdown, no acknowledgements."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        """Stop gracefully."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None


@pytest.fixture
def system(
    tmp_path: Path, private_redis: PrivateRedis, webhook_receiver: WebhookReceiver
) -> Iterator[dict[str, Any]]:
    """The app (connected mode, SQLite file shared with the worker) and a worker to start."""
    smtp_port = free_port()
    settings = {
        "REDIS_URL": private_redis.url,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'shared.db'}",
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "SECRET_KEY": "fault-tests-secret-key-0123456789abcdef",
        "CELERY_QUEUE": f"faults-{uuid.uuid4().hex[:8]}",
        "CELERY_VISIBILITY_TIMEOUT": "5",
        "MAIL_BACKEND": "smtp",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "SMTP_STARTTLS": "false",
        "SMTP_TIMEOUT": "2",
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_READ_TIMEOUT": "5",
        "SWEEP_INTERVAL": "1",
        "DELIVERY_LEASE_SECONDS": "3",
        "DELIVERY_RETRY_SCHEDULE": "[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]",
        "LOG_FORMAT": "json",
        "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000",
        "BASE_URL": "http://mailslot.test",
        "RATE_LIMITS_ENABLED": "false",
    }
    kwargs: dict[str, Any] = {key.lower(): value for key, value in settings.items()}
    kwargs["delivery_retry_schedule"] = json.loads(settings["DELIVERY_RETRY_SCHEDULE"])
    kwargs["rate_limits_enabled"] = False
    app = microapp.create_app(**kwargs)
    worker = Worker({**os.environ, **settings}, tmp_path)
    yield {"app": app, "worker": worker, "redis": private_redis, "smtp_port": smtp_port,
           "receiver": webhook_receiver}  # fmt: skip
    worker.stop()


def make_form(app: Flask, webhook_url: str | None, notify: bool = True) -> records.Form:
    """A confirmed owner's form with notifications and (optionally) a webhook."""
    with app.app_context():
        with dal.transaction() as conn:
            owner = dal.insert_user(conn, f"owner-{uuid.uuid4().hex[:6]}@example.com", "x")
            dal.mark_email_confirmed(conn, owner.id, owner.email)
        form = services.create_form(owner.id, {"name": "Faults", "notify": notify})
        if webhook_url:
            services.set_webhook(form, webhook_url)
        return services.owned_form(owner.id, form.public_id)


def statuses(app: Flask) -> dict[str, int]:
    """How many deliveries are in each status."""
    with app.app_context(), dal.connection() as conn:
        rows = conn.execute(
            sa.select(dal.deliveries.c.status, sa.func.count()).group_by(dal.deliveries.c.status)
        )
        return dict(rows.all())


def stored_count(app: Flask) -> int:
    """Submissions in the database."""
    with app.app_context(), dal.connection() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(dal.submissions)).scalar_one()


def test_redis_down_while_100_submissions_arrive_loses_nothing(system: dict[str, Any]) -> None:
    app, worker, private_redis = system["app"], system["worker"], system["redis"]
    receiver: WebhookReceiver = system["receiver"]
    sink = SMTPSink(port=system["smtp_port"])
    sink.controller.start()
    try:
        form = make_form(app, receiver.url)
        worker.start()
        private_redis.stop()
        client = app.test_client()
        answers = [
            client.post(f"/f/{form.public_id}", json={"n": n, "message": f"hello {n}"})
            for n in range(100)
        ]
        accepted = sum(1 for a in answers if a.status_code == 201)
        stored = stored_count(app)
        settle_deliveries(app)
        assert statuses(app) == {"pending": 200}
        private_redis.start()
        wait_for(lambda: statuses(app).get("done") == 200, 120, f"not delivered: {statuses(app)}")
        emailed = {m.get_body(preferencelist=("plain",)).get_content().split("/submissions/")[1]
                   .split()[0] for _, _, m in sink.messages}  # fmt: skip
        hooked = {body["data"]["submission"]["id"] for body in receiver.bodies()}
        lost = stored - min(len(emailed), len(hooked))
        print(
            f"accepted={accepted} stored={stored} delivered_email={len(sink.messages)} "
            f"delivered_webhook={len(receiver.requests)} lost={lost}"
        )
        assert accepted == stored == 100
        assert len(sink.messages) == len(emailed) == 100  # every one, none twice
        assert len(receiver.requests) == len(hooked) == 100
        assert lost == 0
    finally:
        sink.controller.stop()


def test_worker_killed_while_a_webhook_receiver_holds_the_request(
    system: dict[str, Any],
) -> None:
    app, worker = system["app"], system["worker"]
    receiver: WebhookReceiver = system["receiver"]
    receiver.script = ["hold"]
    form = make_form(app, receiver.url, notify=False)
    worker.start()
    response = app.test_client().post(f"/f/{form.public_id}", json={"message": "kill me"})
    assert response.status_code == 201
    assert receiver.holding.wait(60), "the worker never called the webhook"
    worker.kill()
    receiver.release.set()
    worker.start()
    wait_for(lambda: statuses(app).get("done") == 1, 90, f"not delivered: {statuses(app)}")
    ids = {r["headers"]["webhook-id"] for r in receiver.requests}
    print(
        f"webhook_attempts={len(receiver.requests)} distinct_ids={len(ids)} "
        f"final={statuses(app)} lost=0"
    )
    assert len(receiver.requests) == 2  # the interrupted attempt, then the one that finished
    assert len(ids) == 1


def test_smtp_refusing_connections_for_a_while_then_back(system: dict[str, Any]) -> None:
    app, worker = system["app"], system["worker"]
    form = make_form(app, None)
    worker.start()
    client = app.test_client()
    for n in range(5):
        assert client.post(f"/f/{form.public_id}", json={"n": n}).status_code == 201

    def retried_twice() -> bool:
        with app.app_context(), dal.connection() as conn:
            attempts = conn.execute(sa.select(dal.deliveries.c.attempts)).scalars().all()
        return len(attempts) == 5 and min(attempts) >= 2

    wait_for(retried_twice, 60, "deliveries were not retried while SMTP was down")
    assert statuses(app).get("done") is None
    sink = SMTPSink(port=system["smtp_port"])
    sink.controller.start()
    try:
        wait_for(lambda: statuses(app).get("done") == 5, 60, f"not delivered: {statuses(app)}")
        print(f"smtp_outage emails={len(sink.messages)} final={json.dumps(statuses(app))}")
        assert len(sink.messages) == 5
    finally:
        sink.controller.stop()

"""A hypothesis state machine over submit, Redis down/up, worker steps, sweeps and SMTP outages.

A worker step runs one message from the real broker queue: the web's ``fan_out`` message (which
publishes one ``deliver`` per delivery, as a worker would) or a ``deliver``.

Invariant: every stored submission keeps its delivery row, and once everything is back and the
sweeper has run, every delivery ends ``done`` or ``dead`` — never lost, never sent twice.
"""

from __future__ import annotations

import base64
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from test_faults import PrivateRedis

import cache
import dal
import microapp
import services
import tasks
from conftest import SMTPSink, free_port, need_service, settle_deliveries

pytestmark = pytest.mark.services

ALLOWED = {"pending", "sending", "done", "dead"}


def test_deliveries_are_never_lost(tmp_path: Path, smtp_sink: SMTPSink) -> None:
    need_service(shutil.which("redis-server") is not None, "redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    dead_port = free_port()

    class Outbox(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            if server.process is None:
                server.start()
            smtp_sink.messages.clear()
            self.queue = f"state-{uuid.uuid4().hex[:8]}"
            self.app = microapp.create_app(
                instance_path=str(tmp_path / self.queue),
                redis_url=server.url,
                celery_queue=self.queue,
                mail_backend="smtp",
                smtp_host="127.0.0.1",
                smtp_port=smtp_sink.port,
                smtp_starttls=False,
                smtp_timeout=1.0,
                delivery_retry_schedule=[0, 0, 0, 0, 0, 0],
                password_hash_method="pbkdf2:sha256:1000",
                log_level="ERROR",
                rate_limits_enabled=False,
            )
            self.conf = self.app.extensions["mailslot.settings"]
            with self.app.app_context():
                with dal.transaction() as conn:
                    owner = dal.insert_user(conn, "owner@example.com", "x")
                    dal.mark_email_confirmed(conn, owner.id, owner.email)
                self.form = services.create_form(owner.id, {"name": "State", "notify": True})
            self.accepted = 0

        @rule()
        def submit(self) -> None:
            response = self.app.test_client().post(
                f"/f/{self.form.public_id}", json={"n": self.accepted}
            )
            assert response.status_code == 201
            self.accepted += 1
            # The publisher thread sends (or fails to send) before the next step: deterministic.
            settle_deliveries(self.app)

        @rule()
        def redis_down(self) -> None:
            server.stop()

        @rule()
        def redis_up(self) -> None:
            if server.process is None:
                server.start()

        @rule()
        def worker_step(self) -> None:
            """Take one message off the broker queue and run it, as a worker would."""
            if server.process is None:
                return
            with self.app.app_context():
                raw = cache.stores().redis.rpop(self.queue)
                if raw is None:
                    return
                message = json.loads(raw)
                args = json.loads(base64.b64decode(message["body"]))[0]
                # fan_out (from the web's publisher) publishes the deliver tasks it carries.
                self.app.extensions["celery"].tasks[message["headers"]["task"]](*args)

        @rule()
        def sweep(self) -> None:
            with self.app.app_context():
                tasks.sweep(inline=True)

        @rule()
        def smtp_fails(self) -> None:
            self.conf.smtp_port = dead_port

        @rule()
        def smtp_back(self) -> None:
            self.conf.smtp_port = smtp_sink.port

        def rows(self) -> list[Any]:
            with self.app.app_context(), dal.connection() as conn:
                return list(conn.execute(sa.select(dal.deliveries)))

        @invariant()
        def every_submission_keeps_its_delivery(self) -> None:
            with self.app.app_context(), dal.connection() as conn:
                stored = conn.execute(
                    sa.select(sa.func.count()).select_from(dal.submissions)
                ).scalar_one()
            rows = self.rows()
            assert stored == self.accepted
            assert len(rows) == self.accepted
            assert {r.status for r in rows} <= ALLOWED

        def teardown(self) -> None:
            self.conf.smtp_port = smtp_sink.port
            if server.process is None:
                server.start()
            with self.app.app_context():
                for _ in range(20):
                    if tasks.sweep(inline=True) == 0:
                        break
            rows = self.rows()
            assert {r.status for r in rows} <= {"done", "dead"}
            done = sum(1 for r in rows if r.status == "done")
            assert len(smtp_sink.messages) == done  # nothing sent twice
            with self.app.app_context():
                cache.stores().redis.delete(self.queue)
                dal.database().engine.dispose()

    try:
        run_state_machine_as_test(
            Outbox,
            settings=settings(
                max_examples=25,
                stateful_step_count=15,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        server.stop()

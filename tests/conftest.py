"""Shared fixtures: ``app``, ``client``, ``runner``, the ``auth`` helper, services and sinks.

The suite always runs on SQLite and the in-process Redis. With ``MAILSLOT_TEST_DATABASE_URL``
(a PostgreSQL server URL; a fresh database is created on it for the run and dropped after) and
``MAILSLOT_TEST_REDIS_URL`` (a Redis database we may write to; keys get a per-test prefix) the DAL
and Redis tests run against those too. ``MAILSLOT_REQUIRE_SERVICES=1`` turns a missing service
into a failure instead of a skip.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner

import microapp
import migrate
import tasks

REQUIRE_SERVICES = os.environ.get("MAILSLOT_REQUIRE_SERVICES") == "1"
TEST_DATABASE_URL = os.environ.get("MAILSLOT_TEST_DATABASE_URL", "")
TEST_REDIS_URL = os.environ.get("MAILSLOT_TEST_REDIS_URL", "")
FAST_HASH = "pbkdf2:sha256:1000"  # the real default (scrypt, ~0.4 s) has its own tests
PASSWORD = "correct horse battery"


def need_service(available: bool, reason: str) -> None:
    """Skip when a service is missing locally; fail when CI requires every service."""
    if available:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"required service missing: {reason}")
    pytest.skip(reason)


# =================================================================================================
# Backends
# =================================================================================================


@contextmanager
def new_postgres_database(prefix: str = "mailslot_test") -> Iterator[str]:
    """A fresh database on the test PostgreSQL server (its URL), dropped afterwards."""
    need_service(bool(TEST_DATABASE_URL), "MAILSLOT_TEST_DATABASE_URL is not set")
    import psycopg

    server_url = TEST_DATABASE_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(server_url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        need_service(False, f"PostgreSQL unreachable: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = server_url.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this run, dropped at the end."""
    with new_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis given to the tests (a database index of our own)."""
    need_service(bool(TEST_REDIS_URL), "MAILSLOT_TEST_REDIS_URL is not set")
    import redis

    try:
        redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=1).ping()
    except (redis.RedisError, OSError) as exc:
        need_service(False, f"Redis unreachable at {TEST_REDIS_URL}: {exc}")
    return TEST_REDIS_URL


def _wipe_postgres(app: Flask) -> None:
    """Empty every table between tests on the shared run database."""
    import dal

    with app.app_context(), dal.transaction() as conn:
        names = ", ".join(t.name for t in dal.metadata.sorted_tables if t.name != "mailslot_meta")
        conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")


def _wipe_redis_prefix(app: Flask) -> None:
    """Delete the keys this test wrote, by its own prefix."""
    import cache

    with app.app_context():
        stores = cache.stores()
        keys = list(stores.redis.scan_iter(f"{stores.key_prefix}*"))
        if keys:
            stores.redis.delete(*keys)


# =================================================================================================
# App, client, runner
# =================================================================================================


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database brought to the newest revision by the migrations, once per run."""

    path = tmp_path_factory.mktemp("migrated") / "mailslot.db"
    migrate.upgrade_db(f"sqlite:///{path}")
    return path


@pytest.fixture
def overrides(tmp_path: Path, migrated_sqlite: Path) -> dict[str, Any]:
    """Settings for one test's app: its own instance folder and Redis key prefix.

    The folder starts with a copy of the migrated database: the schema a first start creates,
    without running the migrations again for every app (about 70 ms each).
    """
    (tmp_path / "instance").mkdir()
    shutil.copyfile(migrated_sqlite, tmp_path / "instance" / "mailslot.db")
    return {
        "instance_path": str(tmp_path / "instance"),
        "password_hash_method": FAST_HASH,
        "base_url": "http://mailslot.test",
        "redis_key_prefix": f"mailslot-test-{uuid.uuid4().hex[:8]}:",
    }


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which database the app uses; DAL tests parametrize this with 'postgresql' as well."""
    return request.param


@pytest.fixture
def app(overrides: dict[str, Any], backend: str, request: pytest.FixtureRequest) -> Iterator[Flask]:
    """A Mailslot app on SQLite (or PostgreSQL when the test asks) with in-process Redis."""
    if backend == "postgresql":
        overrides["database_url"] = request.getfixturevalue("postgres_url")
    app = microapp.create_app(**overrides)
    app.config["TESTING"] = True
    if backend == "postgresql":
        with app.app_context():
            import dal

            migrate.upgrade_db()
    yield app
    # Nothing of this test may still be delivering while the next one runs.
    tasks.hand_over(app, timeout=120)
    if backend == "postgresql":
        _wipe_postgres(app)
    if overrides.get("redis_url"):
        _wipe_redis_prefix(app)
    with app.app_context():
        import dal

        dal.database().engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """The Flask test client."""
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    """Runs the app's CLI commands."""
    return app.test_cli_runner()


# =================================================================================================
# CSRF tokens and the auth helper
# =================================================================================================

_CSRF = re.compile(
    r'name="csrf_token" type="hidden" value="([^"]+)"|name="csrf_token" value="([^"]+)"'
)


def csrf_token(client: FlaskClient, path: str) -> str:
    """Read the real CSRF token from the page at ``path``."""
    page = client.get(path).get_data(as_text=True)
    match = _CSRF.search(page)
    assert match, f"no CSRF token on {path}"
    return match.group(1) or match.group(2)


def public_refusal(
    code: str, message: str, errors: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """The public endpoint's JSON answer to a refused post (README: "Forms and submissions")."""
    return {"ok": False, "error": {"code": code, "message": message}, "errors": errors or {}}


# The codes of the public endpoint's refusals, as the README documents them.
PUBLIC_ERROR_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_entity_too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
    503: "service_unavailable",
}


def assert_public_envelope(response: Any) -> None:
    """A JSON answer from /f/…: ``{"ok": true, "id"}`` (201), or the one refusal envelope, whose
    ``errors`` name fields on a 422 only."""
    body = response.json
    if response.status_code < 400:
        assert response.status_code == 201
        assert set(body) == {"ok", "id"}
        assert body["ok"] is True
        assert isinstance(body["id"], str)
        return
    assert set(body) == {"ok", "error", "errors"}, body
    assert body["ok"] is False
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == PUBLIC_ERROR_CODES[response.status_code]
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"].strip()
    assert isinstance(body["errors"], dict)
    assert bool(body["errors"]) == (response.status_code == 422)


def post_form(client: FlaskClient, path: str, data: dict[str, Any], page: str | None = None) -> Any:
    """POST ``data`` to ``path`` with the real CSRF token from ``page`` (default: ``path``)."""
    token = csrf_token(client, page or path)
    return client.post(path, data={**data, "csrf_token": token})


class AuthActions:
    """Sign up, log in and log out through the real pages."""

    def __init__(self, client: FlaskClient, app: Flask) -> None:
        self.client = client
        self.app = app

    def signup(self, email: str = "owner@example.com", password: str = PASSWORD) -> Any:
        """Create an account through /signup, then log in through /login, as a person does:
        afterwards the account exists, is unconfirmed, and this client is logged in.

        The answer of /signup (the same whether or not the address was free).
        """
        response = post_form(
            self.client, "/signup", {"email": email, "password": password, "confirm": password}
        )
        settle_deliveries(self.app)  # its email has gone out on return
        if response.status_code == 302:
            self.login(email, password)
        return response

    def login(self, email: str = "owner@example.com", password: str = PASSWORD) -> Any:
        """Log in through /login."""
        return post_form(self.client, "/login", {"email": email, "password": password})

    def logout(self) -> Any:
        """Log out through the POST button on the account page."""
        return post_form(self.client, "/logout", {}, page="/account")

    def confirm(self) -> Any:
        """Follow the newest confirmation link in the outbox."""
        link = confirmation_link(read_outbox(self.app)[-1])
        return self.client.get(link.removeprefix("http://mailslot.test"))


@pytest.fixture
def auth(client: FlaskClient, app: Flask) -> AuthActions:
    """The auth helper."""
    return AuthActions(client, app)


# =================================================================================================
# Mail: the outbox and a real SMTP sink
# =================================================================================================


def settle_deliveries(app: Flask) -> None:
    """Wait until the deliveries that ``app`` has handed off so far have been attempted.

    Call it before looking at what a delivery did (the outbox, a webhook receiver's requests, the
    rows' statuses): embedded mode runs them on its delivery threads after the request answered
    (connected mode: this waits until the publisher handed them to the broker).
    """
    assert tasks.wait_for_idle(app, timeout=120), "handed-off deliveries did not settle"


def read_outbox(app: Flask) -> list[EmailMessage]:
    """Messages the console backend wrote, oldest first (after pending deliveries settled)."""
    settle_deliveries(app)
    outbox = Path(app.instance_path) / "outbox"
    files = sorted(outbox.glob("*.eml")) if outbox.exists() else []
    return [
        email.message_from_bytes(f.read_bytes(), policy=email.policy.default)  # type: ignore[misc]
        for f in files
    ]


def message_text(message: EmailMessage) -> str:
    """The plain-text part of a message."""
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return part.get_content()


def confirmation_link(message: EmailMessage) -> str:
    """The /confirm/… link in a confirmation email."""
    match = re.search(r"https?://\S+/confirm/\S+", message_text(message))
    assert match
    return match.group(0)


def free_port() -> int:
    """A TCP port nobody listens on right now (bound and released by us)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``flask --app microapp serve`` on ``port`` in a subprocess, its output in ``log_path``."""
    with log_path.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "microapp", "serve", "--port", str(port)],
            cwd=Path(microapp.__file__).parent, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


class SMTPSink:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps what it receives."""

    def __init__(self, port: int | None = None) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[tuple[str, list[str], EmailMessage]] = []
        self.received = threading.Event()
        self.refuse_rcpt: str | None = None  # e.g. "550 5.1.1 no such user"
        self.port = port or free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        """Accept the recipient, unless the test asked for a refusal."""
        if self.refuse_rcpt:
            return self.refuse_rcpt
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Keep the envelope and the parsed message."""
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), message))  # type: ignore[arg-type]
        self.received.set()
        return "250 OK"


@pytest.fixture
def smtp_sink() -> Iterator[SMTPSink]:
    """A running SMTP sink; its port goes into SMTP_PORT."""
    sink = SMTPSink()
    sink.controller.start()
    yield sink
    sink.controller.stop()


# =================================================================================================
# A webhook receiver
# =================================================================================================


class WebhookReceiver:
    """A local HTTP server that records each POST and answers from a script.

    ``script`` holds one entry per request: a status code, ``"timeout"`` (answer after
    ``slow_seconds``), or ``"hold"`` (wait until ``release`` is set, then answer 200). When the
    script runs out every request gets 200.
    """

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        receiver = self
        self.requests: list[dict[str, Any]] = []
        self.script: list[Any] = []
        self.slow_seconds = 2.0
        self.release = threading.Event()
        self.holding = threading.Event()
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers.items()), "body": body}
                    )
                    action = receiver.script.pop(0) if receiver.script else 200
                extra: dict[str, str] = {}
                if action == "timeout":
                    receiver.release.wait(receiver.slow_seconds)
                    action = 200
                elif action == "hold":
                    receiver.holding.set()
                    receiver.release.wait(60)
                    action = 200
                elif isinstance(action, tuple):
                    action, extra = action
                try:
                    self.send_response(action)
                    for name, value in extra.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies received, in order."""
        import json

        return [json.loads(r["body"]) for r in self.requests]


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A running webhook receiver."""
    receiver = WebhookReceiver()
    receiver.thread.start()
    yield receiver
    receiver.release.set()
    receiver.server.shutdown()
    receiver.server.server_close()

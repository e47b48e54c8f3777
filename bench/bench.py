"""Mailslot's benchmark (``just bench``): connected mode, measured side by side in one run.

Not part of the test suite and not an app module. It starts, as separate processes, a private
``redis-server``, the web process (``flask --app microapp serve``: waitress) and one Celery worker
with beat (``celery -A microapp.celery_app worker -B``), plus, inside this process, an SMTP sink
(aiosmtpd) and a webhook receiver (http.server) whose per-message delay can be switched at run
time. The owner and the forms are created through the app's own functions; the 100 000-row forms
are filled with executemany. Load comes from wrk (Debian's package, with a Lua script for the
POST). Everything is on loopback, every loop is bounded, and every process started here is
stopped at the end.

Sections: baseline + intake (req/s, p50/p99), isolation (intake p99 with 2 s downstreams vs
instant), drain (deliveries/s for one worker), export (CSV rows/s and the web process's peak
RSS, 10 000 vs 100 000 rows), inbox (first and deep page p95) and cold start (first /healthz,
import + create_app(), idle RSS). The table goes to stdout and the numbers to
``bench-results/bench-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the project's .venv/bin under `uv run`
RESULTS_DIR = PROJECT / "bench-results"
MB = 1024 * 1024

# Five fields, urlencoded, as a browser posts them (no Accept header: the answer is a 303).
INTAKE_BODY = urllib.parse.urlencode(
    {
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "subject": "A question about the Analytical Engine",
        "message": "Hello! I would like to know more about your engine. " * 4,
        "company": "Analytical Engines Ltd",
    }
)

WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def git_output(*args: str) -> str:
    """What a git command prints about the project's checkout."""
    return subprocess.run(  # noqa: S603 - git with the bench's own arguments
        ["git", *args],  # noqa: S607
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()


def log(message: str) -> None:
    """Progress on stderr, so that stdout holds only the report."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# =================================================================================================
# Processes, ports and /proc
# =================================================================================================


class Processes:
    """Every child started by the bench, each in its own process group, stopped at the end."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> Any:
        """Start ``argv`` in a new session (its own process group); output to ``log_path``."""
        with log_path.open("ab") as out:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv built by the bench
                argv,
                cwd=PROJECT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM the child's process group, then SIGKILL it if it is still there."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        # Prefork children may outlive a leader that exited first: sweep the group anyway.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.children = [(n, p) for n, p in self.children if p is not proc]

    def stop_all(self) -> None:
        """Stop every child, newest first."""
        for _name, proc in list(reversed(self.children)):
            self.stop(proc)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    """Poll ``check`` until it is true (bounded by ``timeout``); seconds it took."""
    started = time.perf_counter()
    for _ in range(int(timeout / step) + 1):
        try:
            if check():
                return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(step)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's VmRSS every 10 ms in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = proc_status(pid)["VmRSS"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(360_000):  # an hour at most
            if self._stop.wait(0.01):
                return
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, proc_status(self.pid)["VmRSS"])

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# =================================================================================================
# Downstreams: SMTP sink and webhook receiver (with a switchable delay)
# =================================================================================================


class Downstreams:
    """An aiosmtpd sink and an http.server webhook receiver in this process; ``delay`` seconds."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.lock = threading.Lock()
        self.emails = 0
        self.webhooks = 0
        self.smtp_port = free_port()
        self.http_port = free_port()
        self._smtp: Any = None
        self._http: ThreadingHTTPServer | None = None

    def start(self) -> None:
        """Start both servers."""
        from aiosmtpd.controller import Controller

        owner = self

        class SinkHandler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                if owner.delay:
                    await asyncio.sleep(owner.delay)
                with owner.lock:
                    owner.emails += 1
                return "250 Message accepted"

        self._smtp = Controller(SinkHandler(), hostname="127.0.0.1", port=self.smtp_port)
        self._smtp.start()

        class Receiver(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(min(length, 1024 * 1024))
                if owner.delay:
                    time.sleep(owner.delay)
                with owner.lock:
                    owner.webhooks += 1
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args: Any) -> None:
                return

        ThreadingHTTPServer.daemon_threads = True
        self._http = ThreadingHTTPServer(("127.0.0.1", self.http_port), Receiver)
        threading.Thread(
            target=self._http.serve_forever, name="webhook-receiver", daemon=True
        ).start()

    def counts(self) -> tuple[int, int]:
        """(emails, webhooks) received so far."""
        with self.lock:
            return self.emails, self.webhooks

    def stop(self) -> None:
        """Stop both servers."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._smtp is not None:
            with contextlib.suppress(Exception):
                self._smtp.stop()


# =================================================================================================
# HTTP client with a cookie jar (http.client, keep-alive)
# =================================================================================================


class Browser:
    """A keep-alive HTTP/1.1 client that keeps cookies, for the owner's pages."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        return self.conn

    def open(self, method: str, path: str, form: dict[str, str] | None = None) -> Any:
        """Send a request; the response (unread) — cookies from it are kept."""
        headers = {"Accept": "text/html"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self.conn = None
                if attempt:
                    raise
        for header in response.headers.get_all("Set-Cookie") or []:
            for name, morsel in SimpleCookie(header).items():
                self.cookies[name] = morsel.value
        return response

    def fetch(self, method: str, path: str, form: dict[str, str] | None = None) -> tuple[int, str]:
        """Status and body text."""
        response = self.open(method, path, form)
        return response.status, response.read().decode("utf-8", "replace")

    def close(self) -> None:
        """Close the connection."""
        if self.conn is not None:
            self.conn.close()

    def log_in(self, email: str, password: str) -> None:
        """Log in through the real /login form, CSRF token included."""
        status, page = self.fetch("GET", "/login")
        match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page)
        if status != 200 or match is None:
            raise RuntimeError(f"GET /login answered {status} without a CSRF token")
        form = {"email": email, "password": password, "csrf_token": match.group(1)}
        status, _ = self.fetch("POST", "/login", form)
        if status not in (302, 303):
            raise RuntimeError(f"POST /login answered {status}, not a redirect")


def get_status(port: int, path: str, timeout: float = 2.0) -> int:
    """One GET on a fresh connection; the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.4999)))
    return ordered[rank - 1]


# =================================================================================================
# wrk
# =================================================================================================


def wrk_version() -> str:
    """wrk's version line, e.g. 'wrk debian/4.1.0-3+b2 [epoll]'."""
    result = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)  # noqa: S607
    first = (result.stdout or result.stderr).splitlines()[0]
    return first.split(" Copyright")[0].strip()


def ensure_wrk() -> None:
    """Install wrk from Debian's packages when it is missing (as root), else stop with a hint."""
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("wrk is missing: install it with `apt-get install -y wrk`.")
    log("wrk is missing: apt-get install -y wrk")
    subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, timeout=600)  # noqa: S607
    if not shutil.which("wrk"):
        raise SystemExit("wrk is still missing after apt-get install -y wrk.")


def run_wrk(
    url: str, script: Path, duration: int, connections: int, threads: int, pid: int
) -> dict[str, Any]:
    """One wrk run; its numbers, plus the web process's CPU time per request."""
    cpu_before = cpu_seconds(pid)
    argv = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
        "-s", str(script), url,
    ]  # fmt: skip
    result = subprocess.run(  # noqa: S603 - fixed argv
        argv, capture_output=True, text=True, timeout=duration + 60
    )
    cpu_used = cpu_seconds(pid) - cpu_before
    line = next((x for x in result.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stdout}\n{result.stderr}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return {
        "requests": raw["requests"],
        "seconds": round(seconds, 2),
        "req_per_s": round(raw["requests"] / seconds, 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "mean_ms": round(raw["mean_us"] / 1000, 3),
        "non_2xx_3xx": raw["status_errors"],
        "socket_errors": errors,
        "web_cpu_ms_per_request": round(cpu_used * 1000 / max(raw["requests"], 1), 3),
    }


# =================================================================================================
# The bench
# =================================================================================================


class Bench:
    """Sets the stack up, runs the sections, tears everything down."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Processes()
        self.tmp = Path(tempfile.mkdtemp(prefix="mailslot-bench-"))
        self.down = Downstreams()
        self.results: dict[str, Any] = {}
        self.app: Any = None
        self.web: Any = None
        self.worker: Any = None
        self.web_port = free_port()
        self.redis_port = free_port()
        self.default_database = f"sqlite:///{self.tmp / 'bench.db'}"
        self.database_url = os.environ.get("DATABASE_URL") or self.default_database
        self.owner_email = f"bench-{secrets.token_hex(4)}@example.com"
        self.owner_password = secrets.token_urlsafe(12)
        self.forms: dict[str, Any] = {}
        self.env: dict[str, str] = {}

    # --- set-up ---------------------------------------------------------------------------------

    def app_env(self) -> dict[str, str]:
        """Connected mode, private Redis, local sinks, no rate limits, quiet logs."""
        env = {
            "INSTANCE_PATH": str(self.tmp / "instance"),
            "SECRET_KEY": secrets.token_urlsafe(32),
            "DATABASE_URL": self.database_url,
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "BASE_URL": f"http://127.0.0.1:{self.web_port}",
            "RATE_LIMITS_ENABLED": "false",
            "MAIL_BACKEND": "smtp",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(self.down.smtp_port),
            "SMTP_STARTTLS": "false",
            "SMTP_USERNAME": "",
            "WEBHOOK_ALLOW_PRIVATE": "true",
            "LOG_LEVEL": self.args.log_level,
        }
        if self.args.web_threads:
            env["WEB_THREADS"] = str(self.args.web_threads)
        return env

    def compile_bytecode(self) -> None:
        """Compile .pyc files first, as a deployment does (pip; uv with UV_COMPILE_BYTECODE=1).

        With PYTHONDONTWRITEBYTECODE set (as on this machine) nothing is cached otherwise, and
        every process would compile each module it imports, every time it starts.
        """
        if self.args.no_compile:
            return
        site = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
        modules = [str(p) for p in PROJECT.glob("*.py")]
        started = time.perf_counter()
        subprocess.run(  # noqa: S603 - fixed argv
            [sys.executable, "-m", "compileall", "-q", "-j", "0", str(site), *modules],
            check=True,
            capture_output=True,
            timeout=600,
        )
        log(f"bytecode compiled ({time.perf_counter() - started:.1f} s)")

    def start_stack(self) -> None:
        """Redis, the downstreams, the web process and the worker; then the app in here."""
        self.compile_bytecode()
        self.down.start()
        redis_argv = [
            shutil.which("redis-server") or "redis-server", "--port", str(self.redis_port),
            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        ]  # fmt: skip
        self.procs.start("redis", redis_argv, self.tmp / "redis.log", dict(os.environ))
        wait_until(lambda: _redis_ping(self.redis_port), 20, "redis-server")

        os.environ.update(self.app_env())  # the in-process app and every child read the same
        self.env = dict(os.environ)
        sys.path.insert(0, str(PROJECT))
        import microapp
        import migrate

        self.app = microapp.create_app()
        with self.app.app_context():
            migrate.upgrade_db()  # SQLite is set up by create_app; PostgreSQL here
        self.settings = self.app.extensions["mailslot.settings"]

        flask = str(BIN / "flask")
        web_argv = [flask, "--app", "microapp", "serve", "--port", str(self.web_port)]
        self.web = self.procs.start("web", web_argv, self.tmp / "web.log", self.env)
        wait_until(lambda: get_status(self.web_port, "/healthz") == 200, 60, "web process")
        worker_argv = [
            str(BIN / "celery"),
            "-A",
            "microapp.celery_app",
            "worker",
            "-B",
            "--loglevel",
            "WARNING",
        ]
        self.worker = self.procs.start("worker", worker_argv, self.tmp / "worker.log", self.env)
        ping = self.app.extensions["celery"].tasks["tasks.ping"]
        answer = ping.apply_async().get(timeout=90)
        if answer != "pong":
            raise RuntimeError(f"worker ping answered {answer!r}")
        log(f"stack up: web pid {self.web.pid} on :{self.web_port}, worker pid {self.worker.pid}")

    def create_owner_and_forms(self) -> None:
        """A confirmed owner; an intake form with notify + webhook; the big forms."""
        import dal
        import delivery
        import services
        import users

        with self.app.app_context():
            users.sign_up(self.owner_email, self.owner_password)
            with dal.connection() as conn:
                user = dal.user_by_email(conn, users.normalise_email(self.owner_email))
            token = delivery.confirmation_link(user.id, user.email).rsplit("/", 1)[1]
            if users.confirm_email(token) != "confirmed":
                raise RuntimeError("could not confirm the bench owner's address")
            hook = f"http://127.0.0.1:{self.down.http_port}/hook"
            for key, name, notify, webhook in (
                ("intake", "Bench intake", True, True),
                ("drain", "Bench drain", True, True),
                ("small", "Bench 10k", False, False),
                ("big", "Bench 100k", False, False),
            ):
                form = services.create_form(user.id, {"name": name, "notify": notify})
                if webhook:
                    services.set_webhook(form, hook)
                self.forms[key] = services.owned_form(user.id, form.public_id)
        self.owner_id = user.id

    def insert_submissions(self, form: Any, count: int, days: int = 90) -> None:
        """``count`` submissions of five fields, oldest first over ``days`` days (executemany)."""
        import sqlalchemy as sa

        import dal

        now = dal.utcnow()
        step = dt.timedelta(days=days) / max(count, 1)
        derived = getattr(dal, "search_text", None)  # what insert_submission stores beside data
        batch = 5000
        for start in range(0, count, batch):
            rows = []
            for i in range(start, min(count, start + batch)):
                rows.append(
                    {
                        "public_id": secrets.token_urlsafe(16),
                        "form_id": form.id,
                        "data": {
                            "name": f"Person {i}",
                            "email": f"person{i}@example.com",
                            "subject": f"Question number {i}",
                            "message": "Hello, I would like to know more about your product. " * 3,
                            "company": f"Company {i % 997}",
                        },
                        "schema_version": 1,
                        "is_spam": False,
                        "spam_reason": None,
                        "ip_hash": f"{i % 5000:032x}",
                        "user_agent": "Mozilla/5.0 (bench)",
                        "referrer": "https://example.com/contact",
                        "meta": {},
                        "created_at": now - step * (count - i),
                    }
                )
            if derived is not None and "search_text" in dal.submissions.c:
                for row in rows:
                    row["search_text"] = derived(row["data"])
            with self.app.app_context(), dal.transaction() as conn:
                conn.execute(sa.insert(dal.submissions), rows)

    def count_submissions(self, form: Any) -> int:
        """How many submissions a form has."""
        import sqlalchemy as sa

        import dal

        with self.app.app_context(), dal.connection() as conn:
            query = sa.select(sa.func.count()).where(dal.submissions.c.form_id == form.id)
            return int(conn.execute(query).scalar_one())

    def delivery_counts(self, form: Any | None = None) -> dict[str, int]:
        """Deliveries by status (of one form's submissions, or all)."""
        import sqlalchemy as sa

        import dal

        query = sa.select(dal.deliveries.c.status, sa.func.count()).group_by(
            dal.deliveries.c.status
        )
        if form is not None:
            query = query.join(
                dal.submissions, dal.submissions.c.id == dal.deliveries.c.submission_id
            ).where(dal.submissions.c.form_id == form.id)
        with self.app.app_context(), dal.connection() as conn:
            return {status: int(n) for status, n in conn.execute(query)}

    def quiesce(self) -> dict[str, int]:
        """Empty the queue and settle leftover outbox rows, so the next section starts idle."""
        import sqlalchemy as sa

        import dal

        backlog = self.delivery_counts()
        with self.app.app_context():
            purged = self.app.extensions["celery"].control.purge()
            with dal.transaction() as conn:
                conn.execute(
                    sa.update(dal.deliveries)
                    .where(dal.deliveries.c.status.in_(("pending", "sending")))
                    .values(status="dead", last_error="settled by the benchmark")
                )
        time.sleep(max(1.0, self.down.delay * 2 + 0.5))  # tasks in flight finish
        backlog["purged_messages"] = purged or 0
        return backlog

    def write_scripts(self) -> tuple[Path, Path]:
        """wrk's Lua scripts: GET (report only) and the urlencoded POST."""
        get_script = self.tmp / "get.lua"
        get_script.write_text(WRK_DONE)
        post_script = self.tmp / "post.lua"
        post_script.write_text(
            "wrk.method = 'POST'\n"
            f"wrk.body = {json.dumps(INTAKE_BODY)}\n"
            "wrk.headers['Content-Type'] = 'application/x-www-form-urlencoded'\n" + WRK_DONE
        )
        return get_script, post_script

    # --- sections -------------------------------------------------------------------------------

    def section_throughput(self) -> None:
        """healthz baseline vs intake, then intake with slow downstreams (isolation)."""
        args = self.args
        get_script, post_script = self.write_scripts()
        base = f"http://127.0.0.1:{self.web_port}"
        intake_url = f"{base}/f/{self.forms['intake'].public_id}"
        wrk = lambda url, script, seconds: run_wrk(  # noqa: E731
            url, script, seconds, args.connections, args.wrk_threads, self.web.pid
        )
        log("warm-up (3 s each)")
        wrk(f"{base}/healthz", get_script, 3)
        wrk(intake_url, post_script, 3)
        self.quiesce()

        log(f"healthz baseline: {args.connections} connections, {args.duration} s")
        baseline = wrk(f"{base}/healthz", get_script, args.duration)
        self.results["baseline"] = baseline

        log(f"intake: {args.connections} connections, {args.duration} s, downstreams instant")
        before = self.count_submissions(self.forms["intake"])
        profiler = self.start_profiler(args.duration)
        intake = wrk(intake_url, post_script, args.duration)
        self.stop_profiler(profiler)
        intake["stored"] = self.count_submissions(self.forms["intake"]) - before
        intake["backlog_after"] = self.quiesce()
        intake["ratio_to_baseline"] = round(intake["req_per_s"] / baseline["req_per_s"], 3)
        self.results["intake"] = intake

        if "isolation" not in args.sections:
            return
        log(f"isolation: intake with SMTP and webhook receivers each taking {args.delay} s")
        self.down.delay = args.delay
        try:
            slow = wrk(intake_url, post_script, args.duration)
        finally:
            self.down.delay = 0.0
        slow["backlog_after"] = self.quiesce()
        self.results["isolation"] = {
            "delay_s": args.delay,
            "instant": {k: intake[k] for k in ("req_per_s", "p50_ms", "p99_ms")},
            "slow": slow,
            "p99_ratio": round(slow["p99_ms"] / intake["p99_ms"], 3),
        }

    def start_profiler(self, seconds: int) -> Any:
        """With --py-spy FILE, sample the web process during the intake run."""
        if not self.args.py_spy:
            return None
        spy = shutil.which("py-spy")
        if spy is None:
            raise SystemExit("--py-spy needs py-spy on PATH: uv run --with py-spy ...")
        argv = [
            spy, "record", "--pid", str(self.web.pid), "--duration", str(seconds),
            "--rate", "200", "--format", "raw", "--output", self.args.py_spy, "--nonblocking",
            *self.args.py_spy_args.split(),
        ]  # fmt: skip
        return self.procs.start("py-spy", argv, self.tmp / "py-spy.log", dict(os.environ))

    def stop_profiler(self, proc: Any) -> None:
        """Wait for py-spy to write its file."""
        if proc is None:
            return
        try:
            proc.wait(timeout=60)
        finally:
            self.procs.stop(proc)
        log(f"py-spy profile written to {self.args.py_spy}")

    def section_drain(self) -> None:
        """Queue N deliveries at once; time one worker to deliver them all."""
        import sqlalchemy as sa

        import dal
        import tasks

        count = self.args.drain
        form = self.forms["drain"]
        self.insert_submissions(form, count // 2, days=1)
        with self.app.app_context(), dal.transaction() as conn:
            subs = list(
                conn.execute(
                    sa.select(dal.submissions.c.id).where(dal.submissions.c.form_id == form.id)
                ).scalars()
            )
            now = dal.utcnow()
            # Due later than the run lasts, as the sweeper leaves rows it has just enqueued, so
            # the measure is the worker's and not the sweeper's.
            later = now + dt.timedelta(seconds=self.settings.delivery_lease_seconds)
            rows = []
            for sub_id in subs:
                for kind, target in (
                    ("email", self.owner_email),
                    ("webhook", f"http://127.0.0.1:{self.down.http_port}/hook"),
                ):
                    rows.append(
                        {
                            "submission_id": sub_id,
                            "kind": kind,
                            "target": target,
                            "status": "pending",
                            "attempts": 0,
                            "next_attempt_at": later,
                            "updated_at": now,
                        }
                    )
            conn.execute(sa.insert(dal.deliveries), rows)
            ids = list(
                conn.execute(
                    sa.select(dal.deliveries.c.id).where(dal.deliveries.c.submission_id.in_(subs))
                ).scalars()
            )
        emails0, hooks0 = self.down.counts()
        log(f"drain: enqueueing {len(ids)} deliveries")
        started = time.perf_counter()
        with self.app.app_context():
            for delivery_id in ids:
                tasks.enqueue(tasks.deliver, delivery_id)
        enqueued_s = time.perf_counter() - started
        finished = None
        counts: dict[str, int] = {}
        for _ in range(int(self.args.drain_timeout / 0.25)):
            counts = self.delivery_counts(form)
            if counts.get("done", 0) + counts.get("dead", 0) >= len(ids):
                finished = time.perf_counter() - started
                break
            time.sleep(0.25)
        emails1, hooks1 = self.down.counts()
        elapsed = finished or (time.perf_counter() - started)
        self.results["drain"] = {
            "deliveries": len(ids),
            "worker_concurrency": self.settings.worker_concurrency,
            "enqueue_s": round(enqueued_s, 2),
            "seconds": round(elapsed, 2),
            "completed": finished is not None,
            "statuses": counts,
            "deliveries_per_s": round(counts.get("done", 0) / elapsed, 1),
            "emails_received": emails1 - emails0,
            "webhooks_received": hooks1 - hooks0,
        }
        self.quiesce()

    def section_export(self) -> None:
        """Stream the CSV export of the 10 000- and the 100 000-row forms; rows/s and peak RSS."""
        browser = Browser(self.web_port)
        browser.log_in(self.owner_email, self.owner_password)
        out: dict[str, Any] = {}
        for key in ("small", "big"):
            form = self.forms[key]
            before = proc_status(self.web.pid)
            total = 0
            newlines = 0
            with RssSampler(self.web.pid) as sampler:
                started = time.perf_counter()
                response = browser.open("GET", f"/forms/{form.public_id}/export.csv")
                if response.status != 200:
                    raise RuntimeError(f"export answered {response.status}")
                deadline = started + 600
                for _ in range(10_000_000):
                    chunk = response.read(64 * 1024)
                    if not chunk or time.perf_counter() > deadline:
                        break
                    total += len(chunk)
                    newlines += chunk.count(b"\r\n")
                elapsed = time.perf_counter() - started
            rows = newlines - 1  # the header
            after = proc_status(self.web.pid)
            out[str(self.sizes[key])] = {
                "rows": rows,
                "seconds": round(elapsed, 2),
                "rows_per_s": round(rows / elapsed),
                "csv_mb": round(total / MB, 1),
                "rss_before_mb": round(before["VmRSS"] / MB, 1),
                "peak_rss_mb": round(sampler.peak / MB, 1),
                "hwm_after_mb": round(after["VmHWM"] / MB, 1),
            }
            log(f"export {rows} rows: {elapsed:.1f} s, peak RSS {sampler.peak / MB:.0f} MB")
        browser.close()
        small, big = out[str(self.sizes["small"])], out[str(self.sizes["big"])]
        out["peak_growth_mb"] = round(big["peak_rss_mb"] - small["peak_rss_mb"], 1)
        self.results["export"] = out

    def section_inbox(self) -> None:
        """p50/p95 of the inbox's first page and of a deep page (?before=) of the big form."""
        import sqlalchemy as sa

        import dal

        form = self.forms["big"]
        with self.app.app_context(), dal.connection() as conn:
            ids = (
                sa.select(dal.submissions.c.id)
                .where(dal.submissions.c.form_id == form.id)
                .order_by(dal.submissions.c.id)
                .limit(1)
                .offset(100)
            )
            deep_before = int(conn.execute(ids).scalar_one())
        browser = Browser(self.web_port)
        browser.log_in(self.owner_email, self.owner_password)
        out: dict[str, Any] = {"requests_each": self.args.inbox_requests}
        for name, path in (
            ("first", f"/forms/{form.public_id}"),
            ("deep", f"/forms/{form.public_id}?before={deep_before}"),
        ):
            for _ in range(5):  # warm-up (and the stats cache)
                browser.fetch("GET", path)
            times = []
            for _ in range(self.args.inbox_requests):
                started = time.perf_counter()
                status, _page = browser.fetch("GET", path)
                times.append((time.perf_counter() - started) * 1000)
                if status != 200:
                    raise RuntimeError(f"inbox {name} answered {status}")
            out[name] = {
                "p50_ms": round(percentile(times, 50), 1),
                "p95_ms": round(percentile(times, 95), 1),
                "max_ms": round(max(times), 1),
            }
        browser.close()
        out["deep_before_id"] = deep_before
        self.results["inbox"] = out

    def deploy_venv(self) -> Path:
        """A virtualenv installed as the README's deploy step does: no test or dev groups,
        PostgreSQL support, bytecode compiled. Cold start is measured there: a production
        process imports what production installs (the test tools bring rich, whose import
        structlog's console renderer would otherwise pay for)."""
        venv = self.tmp / "deploy-venv"
        started = time.perf_counter()
        subprocess.run(  # noqa: S603 - fixed argv
            [shutil.which("uv") or "uv", "sync", "--locked", "--no-default-groups", "--extra",
             "postgres", "--compile-bytecode", "--quiet"],
            cwd=PROJECT,
            env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv)},
            check=True,
            capture_output=True,
            timeout=600,
        )  # fmt: skip
        log(f"deploy virtualenv installed ({time.perf_counter() - started:.1f} s)")
        return venv / "bin"

    def section_cold_start(self) -> None:
        """First /healthz 200 of a fresh web process; import + create_app() in a fresh process.

        Both in the deploy virtualenv; import + create_app() in this (development) one too.
        """
        deploy_bin = self.deploy_venv()
        flask = str(deploy_bin / "flask")
        first_ok = []
        idle_rss = []
        for _ in range(3):
            port = free_port()
            started = time.perf_counter()
            proc = self.procs.start(
                "cold-web",
                [flask, "--app", "microapp", "serve", "--port", str(port)],
                self.tmp / "cold-web.log",
                self.env,
            )
            try:
                wait_until(lambda p=port: get_status(p, "/healthz") == 200, 60, "cold web", 0.005)
                first_ok.append((time.perf_counter() - started) * 1000)
                time.sleep(1.0)
                idle_rss.append(proc_status(proc.pid)["VmRSS"] / MB)
            finally:
                self.procs.stop(proc)
        code = (
            "import time; t = time.perf_counter(); import microapp; "
            "microapp.create_app(); print(round((time.perf_counter() - t) * 1000, 1))"
        )
        factory: dict[str, list[float]] = {"deploy": [], "dev": []}
        for _ in range(self.args.cold_runs):
            for name, python in (("deploy", deploy_bin / "python"), ("dev", sys.executable)):
                result = subprocess.run(  # noqa: S603 - fixed argv
                    [str(python), "-c", code],
                    cwd=PROJECT,
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                )
                factory[name].append(float(result.stdout.strip().splitlines()[-1]))
        empty = self.tmp / "no-pycache"  # a pycache prefix with nothing in it: compile it all
        empty.mkdir(exist_ok=True)
        result = subprocess.run(  # noqa: S603 - fixed argv
            [str(deploy_bin / "python"), "-c", code],
            cwd=PROJECT,
            env={**self.env, "PYTHONPYCACHEPREFIX": str(empty), "PYTHONDONTWRITEBYTECODE": "1"},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        uncached = float(result.stdout.strip().splitlines()[-1])
        self.results["cold_start"] = {
            "import_create_app_ms_without_bytecode": uncached,
            "first_healthz_ms_best": round(min(first_ok), 1),
            "first_healthz_ms_median": round(statistics.median(first_ok), 1),
            "import_create_app_ms_best": min(factory["deploy"]),
            "import_create_app_ms_all": factory["deploy"],
            "import_create_app_ms_best_dev_venv": min(factory["dev"]),
            "idle_web_rss_mb": round(statistics.median(idle_rss), 1),
        }

    # --- run ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Every selected section, in an order where each starts from an idle stack."""
        args = self.args
        self.sizes = {"small": args.small_rows, "big": args.rows}
        self.start_stack()
        self.results["meta"] = self.meta()
        self.results["meta"]["web_idle_rss_mb"] = round(proc_status(self.web.pid)["VmRSS"] / MB, 1)
        self.create_owner_and_forms()
        if {"export", "inbox"} & set(args.sections):
            log(f"inserting {args.small_rows} + {args.rows} submissions (executemany)")
            started = time.perf_counter()
            self.insert_submissions(self.forms["small"], args.small_rows)
            self.insert_submissions(self.forms["big"], args.rows)
            self.results["meta"]["insert_rows_per_s"] = round(
                (args.small_rows + args.rows) / (time.perf_counter() - started)
            )
        if {"intake", "isolation"} & set(args.sections):
            self.section_throughput()
        if "drain" in args.sections:
            self.section_drain()
        if "export" in args.sections:
            self.section_export()
        if "inbox" in args.sections:
            self.section_inbox()
        if "cold" in args.sections:
            self.section_cold_start()
        self.results["meta"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
        self.results["targets"] = targets(self.results)
        return self.results

    def meta(self) -> dict[str, Any]:
        """Where and how this run happened."""
        commit = git_output("rev-parse", "--short", "HEAD")
        dirty = git_output("status", "--porcelain", "--untracked-files=no")
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        from settings import describe_url

        return {
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git": commit + ("+dirty" if dirty else ""),
            "machine": f"{os.cpu_count()} CPUs ({cpu}), "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GiB",
            "python": platform.python_version(),
            "database": describe_url(self.database_url).split("://")[0]
            + (
                f" {sqlite3.sqlite_version} (WAL, synchronous=FULL)"
                if "sqlite" in self.database_url
                else ""
            ),
            "load_tool": wrk_version(),
            "web": f"waitress, {self.settings.web_threads} threads",
            "worker": f"celery prefork, concurrency {self.settings.worker_concurrency}, -B",
            "connections": self.args.connections,
            "duration_s": self.args.duration,
            "wrk_threads": self.args.wrk_threads,
            "log_level": self.args.log_level,
            "sections": self.args.sections,
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
            "pythondontwritebytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
            "bytecode_precompiled": not self.args.no_compile,
        }

    def remove_bench_data(self) -> None:
        """In a database given by DATABASE_URL, delete the bench's owner, forms and rows."""
        import sqlalchemy as sa

        import dal

        with self.app.app_context():
            for form in self.forms.values():
                with dal.transaction() as conn:
                    dal.delete_form(conn, form.id)
            with dal.transaction() as conn:
                conn.execute(sa.delete(dal.users).where(dal.users.c.email == self.owner_email))
        log("removed the bench's owner, forms and submissions from DATABASE_URL")

    def close(self) -> None:
        """Stop every process and server; remove the temporary folder unless --keep."""
        self.procs.stop_all()
        if self.app is not None and self.database_url != self.default_database:
            try:
                self.remove_bench_data()
            except Exception as exc:  # noqa: BLE001 - clean-up goes on whatever happened
                log(f"could not remove the bench's data: {type(exc).__name__}: {exc}")
        if self.app is not None:
            with contextlib.suppress(Exception):
                self.app.extensions["mailslot.stores"].engine.dispose()
        self.down.stop()
        if self.args.keep:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _redis_ping(port: int) -> bool:
    """True when a Redis on this port answers PING."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


# =================================================================================================
# Targets and the report
# =================================================================================================


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 8 that this run measured, with PASS/MISS."""
    found = []

    def check(name: str, value: float, target: str, ok: bool, unit: str = "") -> None:
        found.append({"target": name, "value": f"{value}{unit}", "goal": target, "pass": bool(ok)})

    if "intake" in results:
        intake = results["intake"]
        check(
            "intake req/s ÷ healthz req/s",
            round(intake["ratio_to_baseline"] * 100, 1),
            "≥ 35 %",
            intake["ratio_to_baseline"] >= 0.35,
            " %",
        )
        p99 = round(intake["p99_ms"], 1)
        check("intake p99 (16 connections)", p99, "< 50 ms", p99 < 50, " ms")
    if "isolation" in results:
        ratio = results["isolation"]["p99_ratio"]
        check("isolation p99 ratio (2 s downstreams ÷ instant)", ratio, "≤ 1.2", ratio <= 1.2)
    if "export" in results:
        growth = results["export"]["peak_growth_mb"]
        check("export peak RSS growth 10k → 100k rows", growth, "< 30 MB", growth < 30, " MB")
    if "inbox" in results:
        p95 = results["inbox"]["deep"]["p95_ms"]
        check("inbox deep page p95", p95, "< 50 ms", p95 < 50, " ms")
    if "cold_start" in results:
        best = results["cold_start"]["import_create_app_ms_best"]
        check("import + create_app()", best, "< 400 ms", best < 400, " ms")
    return found


def report(results: dict[str, Any]) -> str:
    """The results as a Markdown table, then the targets."""
    meta = results["meta"]
    lines = [
        f"Mailslot bench — {meta['started_at']} — git {meta['git']}",
        f"machine: {meta['machine']}; Python {meta['python']}; database: {meta['database']}",
        f"load tool: {meta['load_tool']} ({meta['wrk_threads']} threads, "
        f"{meta['connections']} connections, {meta['duration_s']} s per run)",
        f"web: {meta['web']}; worker: {meta['worker']}; LOG_LEVEL={meta['log_level']}",
        f"load average (1/5/15 min) at start {' '.join(meta['loadavg_at_start'])}, at end "
        f"{' '.join(meta['loadavg_at_end'])}; bytecode precompiled: "
        f"{'yes' if meta['bytecode_precompiled'] else 'no'}",
        "",
        "| measure | result |",
        "|---|---|",
    ]

    def row(name: str, value: str) -> None:
        lines.append(f"| {name} | {value} |")

    def wrk_line(r: dict[str, Any]) -> str:
        text = (
            f"{r['req_per_s']:,.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
            f"{r['web_cpu_ms_per_request']:.2f} ms web CPU/req"
        )
        if r["non_2xx_3xx"] or r["socket_errors"]:
            text += f", {r['non_2xx_3xx']} non-2xx/3xx, {r['socket_errors']} socket errors"
        return text

    if "baseline" in results:
        row("`GET /healthz` (baseline)", wrk_line(results["baseline"]))
    if "intake" in results:
        intake = results["intake"]
        row("`POST /f/<id>` intake (5 fields, urlencoded → 303)", wrk_line(intake))
        row("intake ÷ baseline", f"**{intake['ratio_to_baseline'] * 100:.1f} %**")
        backlog = intake["backlog_after"]
        row(
            "stored during the intake run",
            f"{intake['stored']:,} submissions "
            f"(outbox at the end: {backlog.get('done', 0):,} delivered, "
            f"{backlog.get('pending', 0) + backlog.get('sending', 0):,} still queued)",
        )
    if "isolation" in results:
        iso = results["isolation"]
        row(
            f"intake with SMTP + webhook each taking {iso['delay_s']:g} s",
            wrk_line(iso["slow"]) + f"; p99 ratio **{iso['p99_ratio']:.2f}**",
        )
    if "drain" in results:
        drain = results["drain"]
        row(
            f"drain {drain['deliveries']:,} queued deliveries (1 worker, "
            f"concurrency {drain['worker_concurrency']})",
            f"**{drain['deliveries_per_s']:,.0f} deliveries/s** ({drain['seconds']:.1f} s; "
            f"{drain['emails_received']:,} emails + {drain['webhooks_received']:,} webhooks "
            "received)",
        )
    if "export" in results:
        export = results["export"]
        for key, value in export.items():
            if isinstance(value, dict):
                row(
                    f"CSV export, {int(key):,} rows",
                    f"{value['rows_per_s']:,} rows/s ({value['seconds']:.1f} s, "
                    f"{value['csv_mb']} MB); web peak RSS {value['peak_rss_mb']} MB",
                )
        row("export peak RSS growth 10k → 100k", f"**{export['peak_growth_mb']} MB**")
    if "inbox" in results:
        inbox = results["inbox"]
        for name in ("first", "deep"):
            label = "first page" if name == "first" else "deep page (?before=, 99.9 % in)"
            row(
                f"inbox {label}, 100k-row form",
                f"p50 {inbox[name]['p50_ms']} ms, **p95 {inbox[name]['p95_ms']} ms**",
            )
    if "cold_start" in results:
        cold = results["cold_start"]
        row(
            "cold start: process start → first `/healthz` 200",
            f"{cold['first_healthz_ms_best']:.0f} ms (median of 3: "
            f"{cold['first_healthz_ms_median']:.0f} ms)",
        )
        row(
            f"`import microapp` + `create_app()` (best of {len(cold['import_create_app_ms_all'])})",
            f"**{cold['import_create_app_ms_best']} ms** in the deploy install (with no "
            f"bytecode cache: {cold['import_create_app_ms_without_bytecode']:.0f} ms; in the "
            f"development venv, with the test tools: "
            f"{cold['import_create_app_ms_best_dev_venv']:.0f} ms)",
        )
        row("idle web RSS", f"{cold['idle_web_rss_mb']} MB")
    lines += ["", "| target | measured | goal | |", "|---|---|---|---|"]
    for item in results.get("targets", []):
        verdict = "PASS" if item["pass"] else "MISS"
        lines.append(f"| {item['target']} | {item['value']} | {item['goal']} | {verdict} |")
    return "\n".join(lines)


SECTIONS = ("intake", "isolation", "drain", "export", "inbox", "cold")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options (defaults as in issue 8)."""
    parser = argparse.ArgumentParser(
        prog="just bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--duration", type=int, default=20, help="seconds per wrk run (20)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the big form")
    parser.add_argument("--small-rows", type=int, default=10_000, help="rows of the small form")
    parser.add_argument("--drain", type=int, default=5000, help="deliveries to drain (5000)")
    parser.add_argument("--drain-timeout", type=float, default=900, help="seconds (900)")
    parser.add_argument("--delay", type=float, default=2.0, help="slow downstream delay (2 s)")
    parser.add_argument("--inbox-requests", type=int, default=100, help="per inbox page (100)")
    parser.add_argument("--cold-runs", type=int, default=5, help="import + create_app runs (5)")
    parser.add_argument("--web-threads", type=int, default=0, help="WEB_THREADS (the setting)")
    parser.add_argument("--log-level", default="WARNING", help="LOG_LEVEL of the app (WARNING)")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--py-spy",
        default="",
        help="record the intake run with py-spy to FILE (uv run --with py-spy python bench/...)",
    )
    parser.add_argument("--py-spy-args", default="", help='more py-spy options, e.g. "--gil"')
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip compiling .pyc files before the run"
    )
    parser.add_argument("--output", default="", help="JSON path (bench-results/bench-<ts>.json)")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    for name in ("duration", "connections", "wrk_threads", "drain", "inbox_requests", "cold_runs"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be greater than 0")
    if args.rows <= args.small_rows:
        parser.error("--rows must be greater than --small-rows")
    return args


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the run through the clean-up (even if SIGINT is ignored)."""

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {
        sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; print the table; write the JSON file."""
    args = parse_args(argv)
    ensure_wrk()
    bench = Bench(args)
    results: dict[str, Any] | None = None
    with signals_raise():
        try:
            results = bench.run()
        except KeyboardInterrupt:
            pass
        except BaseException:
            for name in ("web", "worker", "redis"):
                path = bench.tmp / f"{name}.log"
                if path.exists() and path.stat().st_size:
                    tail = path.read_text(errors="replace")[-3000:]
                    log(f"--- last lines of {name}.log ---\n{tail}")
            raise
        finally:
            bench.close()
    if results is None:
        log("interrupted: every process the bench started is stopped")
        return 130
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.output) if args.output else RESULTS_DIR / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.write(report(results) + "\n\n")
    sys.stdout.write(f"JSON: {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

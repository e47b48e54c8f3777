"""The app shell: health checks, error pages in HTML and JSON, request ids and request logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

import microapp
from conftest import free_port, start_serve

JSON = {"Accept": "application/json"}


def test_healthz_answers_when_the_process_runs(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok"}


def test_readyz_reports_ok_and_the_embedded_mode(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json == {
        "status": "ok",
        "mode": "embedded",
        "database": "ok",
        "redis": "ok",
        "warnings": [],
    }


def test_readyz_says_degraded_when_redis_is_unreachable(overrides: dict[str, Any]) -> None:
    app = microapp.create_app(**overrides, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    response = app.test_client().get("/readyz")
    assert response.status_code == 200
    assert response.json == {
        "status": "degraded",
        "mode": "connected",
        "database": "ok",
        "redis": "unreachable",
        "broker": "unreachable",
        "warnings": [],
    }


def test_readyz_answers_503_when_the_database_is_unreachable(overrides: dict[str, Any]) -> None:
    app = microapp.create_app(
        **overrides, database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    )
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json["status"] == "down"
    assert response.json["database"] == "unreachable"


# --- error pages ------------------------------------------------------------------------------


def test_unknown_page_is_an_html_404_for_browsers(client: FlaskClient) -> None:
    response = client.get("/no/such/page", headers={"Accept": "text/html"})
    assert response.status_code == 404
    assert response.mimetype == "text/html"
    assert "There is nothing at this address." in response.get_data(as_text=True)


def test_unknown_page_is_a_json_404_for_json_clients(client: FlaskClient) -> None:
    response = client.get("/no/such/page", headers=JSON)
    assert response.status_code == 404
    assert response.json == {
        "error": {"code": "not_found", "message": "There is nothing at this address.", "fields": {}}
    }


def test_api_paths_always_get_json_errors(client: FlaskClient) -> None:
    response = client.get("/api/v1/no-such-thing", headers={"Accept": "text/html"})
    assert response.status_code == 404
    assert response.json["error"]["code"] == "not_found"


@pytest.mark.parametrize("accept", ["text/html", "application/json"])
def test_wrong_method_is_405_with_allow(client: FlaskClient, accept: str) -> None:
    response = client.delete("/healthz", headers={"Accept": accept})
    assert response.status_code == 405
    assert "GET" in response.headers["Allow"]
    if accept == "application/json":
        assert response.json["error"]["code"] == "method_not_allowed"
    else:
        assert "does not accept that method" in response.get_data(as_text=True)


@pytest.mark.parametrize("accept", ["text/html", "application/json"])
def test_oversized_body_is_413(client: FlaskClient, accept: str) -> None:
    response = client.post(
        "/login", data={"email": "x" * (2 * 1024 * 1024)}, headers={"Accept": accept}
    )
    assert response.status_code == 413
    if accept == "application/json":
        assert response.json["error"]["code"] == "request_entity_too_large"
    else:
        assert "The request is too large." in response.get_data(as_text=True)


def test_unexpected_error_is_a_500_without_traceback_and_is_logged(
    overrides: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    app = microapp.create_app(**overrides, log_format="json")

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("secret internals")

    response = app.test_client().get("/boom", headers={"X-Request-ID": "req-500"})
    body = response.get_data(as_text=True)
    assert response.status_code == 500
    assert "Something went wrong on our side" in body
    assert "secret internals" not in body
    assert "Traceback" not in body
    lines = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
    ]
    failure = next(line for line in lines if line["event"] == "request.failed")
    assert failure["request_id"] == "req-500"
    assert "RuntimeError: secret internals" in failure["exception"]


def test_database_outage_during_a_request_is_503(overrides: dict[str, Any]) -> None:
    app = microapp.create_app(
        **overrides, database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    )
    client = app.test_client()
    with client.session_transaction() as session:
        session["uid"], session["sv"] = 1, 1
    response = client.get("/forms", headers=JSON)
    assert response.status_code == 503
    assert response.json["error"]["code"] == "service_unavailable"


# --- request ids and the request log line -----------------------------------------------------


def test_request_id_is_taken_from_the_header_and_echoed(client: FlaskClient) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"


def test_request_id_is_generated_when_missing_or_unsafe(client: FlaskClient) -> None:
    generated = client.get("/healthz").headers["X-Request-ID"]
    assert len(generated) == 32
    unsafe = client.get("/healthz", headers={"X-Request-ID": "x {evil}"}).headers["X-Request-ID"]
    assert unsafe != "x {evil}"
    assert len(unsafe) == 32


def test_csrf_rejection_still_has_a_request_id(client: FlaskClient) -> None:
    response = client.post("/login", headers={"X-Request-ID": "csrf-1"})
    assert response.status_code == 400
    assert response.headers["X-Request-ID"] == "csrf-1"


def test_each_request_ends_with_one_json_log_line(
    overrides: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    app = microapp.create_app(**overrides, log_format="json")
    capsys.readouterr()
    app.test_client().get("/healthz?x=1", headers={"X-Request-ID": "line-1"})
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    [line] = [entry for entry in lines if entry["event"] == "request"]
    assert line["method"] == "GET"
    assert line["path"] == "/healthz"
    assert line["status"] == 200
    assert line["request_id"] == "line-1"
    assert isinstance(line["duration_ms"], float)
    assert line["level"] == "info"


def test_start_up_log_names_the_mode_and_hides_passwords(
    overrides: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    microapp.create_app(**overrides, log_format="json", redis_url="redis://:hunter2@127.0.0.1:1/0")
    [start] = [
        json.loads(line)
        for line in capsys.readouterr().err.splitlines()
        if '"mailslot.start"' in line
    ]
    assert start["mode"] == "connected"
    assert start["redis"] == "redis://:***@127.0.0.1:1/0"
    assert "hunter2" not in json.dumps(start)


def test_development_logs_are_readable_console_lines(
    overrides: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    app = microapp.create_app(**overrides, log_format="console")
    capsys.readouterr()
    app.test_client().get("/healthz")
    err = capsys.readouterr().err
    assert "request" in err
    assert "path=/healthz" in err
    assert not err.lstrip().startswith("{")


def test_landing_page_says_what_mailslot_does(client: FlaskClient) -> None:
    page = client.get("/").get_data(as_text=True)
    assert "<h1>" in page
    assert "form" in page.lower()
    assert "Sign up" in page


def test_flask_and_waitress_records_go_through_the_same_pipeline(
    overrides: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    app = microapp.create_app(**overrides, log_format="console")
    capsys.readouterr()
    logging.getLogger("waitress").warning("queue depth high")
    app.logger.warning("from flask")
    err = capsys.readouterr().err
    assert "queue depth high" in err
    assert "from flask" in err
    assert err.count("[warning") == 2


def test_serve_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    # A platform restarting the web process sends SIGTERM: waitress should stop as on Ctrl-C
    # (running requests get up to 5 s) and hand over queued deliveries, not die mid-request.
    import os
    import signal
    import time
    import urllib.request

    port = free_port()
    env = {**os.environ, "INSTANCE_PATH": str(tmp_path / "instance"), "LOG_FORMAT": "json"}
    for name in ("REDIS_URL", "DATABASE_URL", "LOG_LEVEL"):
        env.pop(name, None)
    log_path = tmp_path / "serve.log"
    server = start_serve(port, env, log_path)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"the server did not start: {log_path.read_text()[-2000:]}")
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert '"event": "serve.stopped"' in log_path.read_text()

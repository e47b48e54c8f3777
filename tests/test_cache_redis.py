"""Two Redis roles: the cache and limits (CACHE_REDIS_URL) apart from the Celery broker (REDIS_URL),
and a warning wherever the broker's Redis may evict queued tasks."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from flask import Flask
from test_faults import PrivateRedis, wait_for

import dal
import microapp
import services
import settings as settings_module
import tasks
from conftest import free_port, need_service, start_serve

PROJECT = Path(__file__).resolve().parent.parent


# --- settings ---------------------------------------------------------------------------------


def test_cache_redis_url_defaults_to_the_broker_url(overrides: dict[str, Any]) -> None:
    settings = settings_module.load_settings(**overrides, redis_url="redis://127.0.0.1:6399/3")
    assert settings.cache_redis_url == ""
    assert settings.cache_redis_url_or_default == "redis://127.0.0.1:6399/3"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"redis_url": "redis://r/0", "cache_redis_url": "memcached://c/0"},
            "CACHE_REDIS_URL: must be empty (the same as REDIS_URL) or a redis:// or rediss:// URL",
        ),
        (
            {"redis_url": "redis://r/0", "cache_redis_url": "http://:hunter2@c/0"},
            "(got 'http://:***@c/0')",
        ),
        (
            {"cache_redis_url": "redis://c/0"},
            "CACHE_REDIS_URL needs REDIS_URL: in embedded mode (REDIS_URL empty)",
        ),
    ],
    ids=["scheme", "password-hidden", "embedded-mode"],
)
def test_a_bad_cache_redis_url_stops_start_up_with_the_key_named(
    overrides: dict[str, Any], values: dict[str, str], message: str
) -> None:
    with pytest.raises(settings_module.SettingsError) as info:
        settings_module.load_settings(**overrides, smtp_password="hunter2", **values)
    assert message in str(info.value)
    assert "hunter2" not in str(info.value)


def test_rediss_cache_url_is_accepted(overrides: dict[str, Any]) -> None:
    settings = settings_module.load_settings(
        **overrides, redis_url="redis://b/0", cache_redis_url="rediss://c:6380/1"
    )
    assert settings.cache_redis_url_or_default == "rediss://c:6380/1"


# --- the cache and limits on their own Redis --------------------------------------------------


def other_database(url: str, index: int) -> str:
    """The same Redis server, another database index."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{index}"))


@pytest.fixture
def split_app(overrides: dict[str, Any], redis_url: str) -> Iterator[Flask]:
    """Connected mode: the broker on the test Redis database, the cache on database 12."""
    queue = f"mailslot-test-{uuid.uuid4().hex[:8]}"
    app = microapp.create_app(
        **overrides,
        redis_url=redis_url,
        cache_redis_url=other_database(redis_url, 12),
        celery_queue=queue,
    )
    yield app
    prefix = overrides["redis_key_prefix"]
    for url in (redis_url, other_database(redis_url, 12)):
        client = redis.Redis.from_url(url)
        keys = [queue, *client.scan_iter(f"{prefix}*")]
        client.delete(*keys)


@pytest.mark.services
def test_cache_and_limit_keys_go_to_the_cache_redis_and_tasks_to_the_broker(
    split_app: Flask, overrides: dict[str, Any], redis_url: str
) -> None:
    with split_app.app_context():
        with dal.transaction() as conn:
            owner = dal.insert_user(conn, "split@example.com", "x")
            dal.mark_email_confirmed(conn, owner.id, owner.email)
        form = services.create_form(owner.id, {"name": "Split", "notify": True})
    response = split_app.test_client().post(f"/f/{form.public_id}", json={"message": "hi"})
    assert response.status_code == 201
    assert tasks.wait_for_idle(split_app, timeout=30)  # the delivery left for the broker

    prefix = overrides["redis_key_prefix"]
    broker = redis.Redis.from_url(redis_url, decode_responses=True)
    cache = redis.Redis.from_url(other_database(redis_url, 12), decode_responses=True)
    cached = sorted(cache.scan_iter(f"{prefix}*"))
    assert any(":form:" in key for key in cached), cached  # the form cache
    assert any(":rl:" in key for key in cached), cached  # the rate limits
    assert list(broker.scan_iter(f"{prefix}*")) == []
    queue = split_app.extensions["mailslot.settings"].celery_queue
    assert broker.llen(queue) == 1  # the publisher's message
    assert cache.exists(queue) == 0

    ready = split_app.test_client().get("/readyz")
    assert ready.status_code == 200
    assert ready.json == {
        "status": "ok",
        "mode": "connected",
        "database": "ok",
        "redis": "ok",
        "broker": "ok",
        "warnings": [],
    }


@pytest.mark.services
def test_broker_unreachable_beside_a_working_cache_is_degraded(
    overrides: dict[str, Any], redis_url: str
) -> None:
    app = microapp.create_app(
        **overrides, redis_url=f"redis://127.0.0.1:{free_port()}/0", cache_redis_url=redis_url
    )
    response = app.test_client().get("/readyz")
    assert response.status_code == 200
    assert response.json["status"] == "degraded"
    assert (response.json["redis"], response.json["broker"]) == ("ok", "unreachable")


# --- the eviction warning ---------------------------------------------------------------------


@pytest.fixture
def broker_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PrivateRedis]:
    """A private redis-server started with the test's options."""
    need_service(shutil.which("redis-server") is not None, "redis-server is not installed")
    server = PrivateRedis(tmp_path, *request.param)
    server.start()
    yield server
    server.stop()


EVICTING = ("--maxmemory-policy", "allkeys-lru")
NO_CONFIG = ("--rename-command", "CONFIG", "")  # as managed Redis services do


@pytest.mark.services
@pytest.mark.parametrize(
    ("broker_redis", "warned"),
    [
        (EVICTING, True),
        ((*EVICTING, *NO_CONFIG), True),
        (("--maxmemory-policy", "allkeys-lfu"), True),
        (("--maxmemory-policy", "noeviction"), False),
        (("--maxmemory-policy", "volatile-lru"), False),
    ],
    ids=["allkeys-lru", "allkeys-lru-without-CONFIG", "allkeys-lfu", "noeviction", "volatile-lru"],
    indirect=["broker_redis"],
)
def test_readyz_warns_when_the_broker_redis_may_evict_queued_tasks(
    overrides: dict[str, Any], broker_redis: PrivateRedis, warned: bool
) -> None:
    app = microapp.create_app(**overrides, redis_url=broker_redis.url)
    response = app.test_client().get("/readyz")
    assert response.status_code == 200
    body = response.json
    assert (body["status"], body["redis"], body["broker"]) == ("ok", "ok", "ok")
    if warned:
        [warning] = body["warnings"]
        assert "maxmemory-policy allkeys-l" in warning
        assert "noeviction" in warning
        assert "CACHE_REDIS_URL" in warning
    else:
        assert body["warnings"] == []


@pytest.mark.services
@pytest.mark.parametrize("broker_redis", [EVICTING], indirect=True)
def test_serve_logs_the_eviction_warning_at_start_up(
    tmp_path: Path, broker_redis: PrivateRedis
) -> None:
    port = free_port()
    env = {**os.environ, **_connected_env(tmp_path, broker_redis.url)}
    log_path = tmp_path / "serve.log"
    server = start_serve(port, env, log_path)
    try:
        wait_for(lambda: '"event": "serve"' in log_path.read_text(), 60, "serve did not start")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    log = log_path.read_text()
    assert re.search(r'"warning": "The broker\'s Redis has maxmemory-policy allkeys-lru', log)
    assert '"level": "warning"' in log


@pytest.mark.services
@pytest.mark.parametrize(
    ("broker_redis", "warned"), [(EVICTING, True), ((), False)], indirect=["broker_redis"]
)
def test_the_worker_logs_the_eviction_warning_at_start_up(
    tmp_path: Path, broker_redis: PrivateRedis, warned: bool
) -> None:
    result = _load_the_worker_app(tmp_path, broker_redis.url)
    assert result.returncode == 0, result.stderr
    assert ("broker.redis_warning" in result.stderr) is warned


def test_start_up_never_fails_when_the_broker_redis_is_down(tmp_path: Path) -> None:
    result = _load_the_worker_app(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 0, result.stderr
    assert "broker.redis_warning" not in result.stderr
    assert "redis.unavailable" in result.stderr  # said once, as for any Redis trouble


def _connected_env(tmp_path: Path, url: str) -> dict[str, str]:
    """Environment for a connected-mode process of this test."""
    return {
        "REDIS_URL": url,
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "SECRET_KEY": "cache-redis-test-secret-0123456789abcdef",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }


def _load_the_worker_app(tmp_path: Path, url: str) -> subprocess.CompletedProcess[str]:
    """Load ``microapp.celery_app`` as ``celery -A microapp.celery_app worker`` does at start."""
    env = {**os.environ, **_connected_env(tmp_path, url)}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-c", "import microapp; microapp.celery_app"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

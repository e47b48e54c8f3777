"""Mailslot's typed settings and how they are loaded: the leaf every other module may import.

Precedence: keyword overrides (tests) > environment > ``settings.toml`` > the defaults below. An
unknown key or a bad value stops start-up with one message naming the key. This module imports
nothing of Mailslot's.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from flask import current_app
from pydantic import (
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, TomlConfigSettingsSource

PROJECT_DIR = Path(__file__).resolve().parent


class SettingsError(RuntimeError):
    """A setting is missing, misspelled or has a bad value; the message names it."""


class Settings(BaseSettings):
    """Every knob of Mailslot, typed. Precedence: keywords > environment > settings.toml > code."""

    model_config = SettingsConfigDict(extra="forbid", case_sensitive=False, env_prefix="")

    env: Literal["development", "production"] = "development"
    base_url: str = "http://127.0.0.1:8000"
    host: str = "127.0.0.1"
    port: int = 8000
    web_threads: int = 8
    trusted_proxy: str = ""
    trusted_proxy_count: int = 1
    instance_path: str = "instance"
    secret_key: SecretStr = SecretStr("")

    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    database_url: str = ""
    redis_url: str = ""
    cache_redis_url: str = ""  # empty = REDIS_URL
    redis_timeout: float = 0.5
    redis_key_prefix: str = "mailslot:"

    celery_queue: str = "mailslot"
    celery_visibility_timeout: int = 3600
    celery_task_soft_time_limit: int = 60
    celery_task_time_limit: int = 90
    worker_concurrency: int = 2

    mail_backend: Literal["console", "smtp"] = "console"
    mail_from: str = "Mailslot <mailslot@localhost>"
    smtp_host: str = "localhost"
    smtp_port: int = 587
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_starttls: bool = True
    smtp_timeout: float = 10.0

    password_hash_method: str = "scrypt:32768:8:3"  # noqa: S105 - a method name, not a secret
    password_min_length: int = 8
    confirm_token_max_age: int = 3 * 24 * 3600

    delivery_retry_schedule: list[int] = [0, 30, 120, 600, 1800, 3600, 10800, 21600, 43200, 86400]
    delivery_lease_seconds: int = 300
    sweep_interval: int = 30
    webhook_allow_private: bool = False
    webhook_connect_timeout: float = 5.0
    webhook_read_timeout: float = 15.0
    webhook_dns_timeout: float = 2.0
    webhook_test_timeout: float = 5.0

    rate_limits_enabled: bool = True
    submit_limit_per_ip_minute: int = 10
    submit_limit_per_ip_hour: int = 100
    submit_limit_per_form_hour: int = 1000
    signup_limit_per_ip_hour: int = 20
    login_failure_limit: int = 10
    login_failure_window: int = 900
    spam_threshold: float = 1.0
    spam_max_links: int = 2
    spam_min_seconds: float = 2.0
    spam_velocity_limit: int = 20

    submission_max_bytes: int = 64 * 1024
    submission_max_fields: int = 100
    submission_max_value_length: int = 10_000
    max_content_length: int = 1024 * 1024

    api_rate_limit: str = "600/minute"  # calls per API token: "<count>/<second|minute|hour|day>"

    @classmethod
    def settings_customise_sources(  # type: ignore[override]
        cls, settings_cls: type[BaseSettings], init_settings: Any, env_settings: Any, **_: Any
    ) -> tuple[Any, ...]:
        """Keywords beat the environment, which beats settings.toml; no .env or secrets dir."""
        toml_file = os.environ.get("MAILSLOT_SETTINGS_FILE") or PROJECT_DIR / "settings.toml"
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file))

    @field_validator("database_url")
    @classmethod
    def _normalise_database_url(cls, value: str) -> str:
        """Accept the ``postgres://`` form a PaaS hands out and pick the psycopg driver."""
        for prefix in ("postgres://", "postgresql://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix) :]
        if value and not value.startswith(("sqlite://", "postgresql+psycopg://")):
            raise ValueError("must be empty (SQLite), sqlite://…, postgresql://… or postgres://…")
        return value

    @field_validator("redis_url", "cache_redis_url")
    @classmethod
    def _check_redis_url(cls, value: str, info: ValidationInfo) -> str:
        """Only redis:// and rediss:// URLs (or empty: embedded mode, or the cache on REDIS_URL)."""
        if value and not value.startswith(("redis://", "rediss://")):
            empty = "embedded mode" if info.field_name == "redis_url" else "the same as REDIS_URL"
            raise ValueError(f"must be empty ({empty}) or a redis:// or rediss:// URL")
        return value

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        """The public address must be an absolute http(s) URL; stored without a trailing slash."""
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an absolute http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("password_hash_method")
    @classmethod
    def _check_hash_method(cls, value: str) -> str:
        """Only werkzeug's scrypt or pbkdf2 methods."""
        if not re.fullmatch(r"scrypt(:\d+:\d+:\d+)?|pbkdf2(:sha256|:sha512)?(:\d+)?", value):
            raise ValueError("must be a werkzeug method such as scrypt:32768:8:3")
        return value

    @field_validator(
        "port", "web_threads", "trusted_proxy_count", "celery_visibility_timeout",
        "celery_task_soft_time_limit", "celery_task_time_limit", "worker_concurrency",
        "smtp_port", "password_min_length", "confirm_token_max_age", "submission_max_bytes",
        "delivery_lease_seconds", "sweep_interval", "submit_limit_per_ip_minute",
        "submit_limit_per_ip_hour", "submit_limit_per_form_hour", "signup_limit_per_ip_hour",
        "login_failure_limit", "login_failure_window", "spam_velocity_limit",
        "submission_max_fields", "submission_max_value_length", "max_content_length",
    )  # fmt: skip
    @classmethod
    def _positive(cls, value: int) -> int:
        """Counts, sizes and ports are positive."""
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @field_validator("delivery_retry_schedule")
    @classmethod
    def _check_schedule(cls, value: list[int]) -> list[int]:
        """At least one attempt; delays are seconds, never negative."""
        if not value or any(delay < 0 for delay in value):
            raise ValueError("must list at least one delay, each 0 seconds or more")
        return value

    @field_validator(
        "redis_timeout", "smtp_timeout", "webhook_connect_timeout", "webhook_read_timeout",
        "webhook_dns_timeout", "webhook_test_timeout",
    )  # fmt: skip
    @classmethod
    def _positive_seconds(cls, value: float) -> float:
        """Timeouts are positive seconds."""
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @field_validator("api_rate_limit")
    @classmethod
    def _check_api_rate_limit(cls, value: str) -> str:
        """A count per period, like 600/minute (Flask-Limiter's "600 per minute" works too)."""
        if _parse_rate(value) is None:
            raise ValueError("must look like 600/minute (second, minute, hour or day)")
        return value

    @model_validator(mode="after")
    def _cache_redis_needs_connected_mode(self) -> Settings:
        """Embedded mode keeps the cache and limits in process: a cache URL there is a mistake."""
        if self.cache_redis_url and not self.redis_url:
            raise ValueError(
                "CACHE_REDIS_URL needs REDIS_URL: in embedded mode (REDIS_URL empty) the cache "
                "and rate limits live in the web process"
            )
        return self

    @model_validator(mode="after")
    def _production_needs_a_secret(self) -> Settings:
        """In production a missing SECRET_KEY is an error, never a generated one."""
        if self.env == "production" and not self.secret_key.get_secret_value():
            raise ValueError("SECRET_KEY must be set when ENV=production")
        return self

    @property
    def embedded(self) -> bool:
        """Embedded mode: no Redis URL, so an in-process Redis and the web's delivery threads."""
        return not self.redis_url

    @property
    def cache_redis_url_or_default(self) -> str:
        """The Redis for the cache and rate limits: CACHE_REDIS_URL, else the broker's."""
        return self.cache_redis_url or self.redis_url

    @property
    def mode(self) -> str:
        """The name of the mode, for the start-up log line and /readyz."""
        return "embedded" if self.embedded else "connected"

    @property
    def instance_dir(self) -> Path:
        """The instance folder as an absolute path (relative paths are under the project)."""
        return (PROJECT_DIR / self.instance_path).resolve()

    @property
    def database_url_or_default(self) -> str:
        """The configured database, or the embedded SQLite file in the instance folder."""
        return self.database_url or f"sqlite:///{self.instance_dir / 'mailslot.db'}"

    @property
    def api_rate_limit_window(self) -> tuple[int, int]:
        """API_RATE_LIMIT as (calls, seconds)."""
        parsed = _parse_rate(self.api_rate_limit)
        assert parsed is not None  # checked by the validator
        return parsed


_RATE = re.compile(r"\s*([0-9]+)\s*(?:/|per)\s*(second|minute|hour|day)s?\s*", re.IGNORECASE)
_RATE_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def _parse_rate(text: str) -> tuple[int, int] | None:
    """Parse "600/minute" as (600, 60); None when it is not a positive count per period."""
    match = _RATE.fullmatch(text)
    if match is None or int(match.group(1)) <= 0:
        return None
    return int(match.group(1)), _RATE_SECONDS[match.group(2).lower()]


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning pydantic's report into one message that names each bad key."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]).upper()
            message = error["msg"].removeprefix("Value error, ")
            if not key:  # a rule across settings names its keys; its input is every setting
                problems.append(message)
                continue
            if error["type"] == "extra_forbidden":
                message = "unknown setting (misspelled?)"
            elif not any(word in key for word in ("SECRET", "PASSWORD")):
                given = error["input"]
                if key.endswith("_URL") and isinstance(given, str):
                    given = describe_url(given)  # a URL's password stays out of the message
                message += f" (got {given!r})"
            problems.append(f"{key}: {message}")
        raise SettingsError("Invalid Mailslot settings: " + "; ".join(problems)) from None


def resolve_secret_key(settings: Settings) -> str:
    """The configured secret, or in development one generated once and kept under instance/."""
    configured = settings.secret_key.get_secret_value()
    if configured:
        return configured
    key_file = settings.instance_dir / "secret_key"
    if key_file.exists():
        return key_file.read_text().strip()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return key


def current_settings() -> Settings:
    """The running app's settings (inside an app context: a request, a task, a CLI command)."""
    return current_app.extensions["mailslot.settings"]


def describe_url(url: str) -> str:
    """A URL fit for logs and messages: the password is replaced by ***."""
    password = urlsplit(url).password
    return url.replace(f":{password}@", ":***@", 1) if password else url

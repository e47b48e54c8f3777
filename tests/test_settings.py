"""Settings: precedence, validation messages, secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import microapp
import settings as settings_module


@pytest.fixture
def settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point Mailslot at a settings.toml of the test's own."""
    path = tmp_path / "settings.toml"
    path.write_text('PORT = 7000\nMAIL_FROM = "toml@example.com"\nSMTP_PORT = 2525\n')
    monkeypatch.setenv("MAILSLOT_SETTINGS_FILE", str(path))
    for name in ("PORT", "MAIL_FROM", "SMTP_PORT", "ENV", "SECRET_KEY", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return path


def test_precedence_is_keyword_then_environment_then_toml_then_default(
    settings_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAIL_FROM", "env@example.com")
    monkeypatch.setenv("SMTP_PORT", "2626")
    settings = settings_module.load_settings(smtp_port=2727)
    assert settings.port == 7000  # toml beats the code default 8000
    assert settings.mail_from == "env@example.com"  # environment beats toml
    assert settings.smtp_port == 2727  # keyword beats environment
    assert settings.smtp_timeout == 10.0  # code default


def test_project_settings_toml_matches_code_defaults() -> None:
    """settings.toml documents every default; it must agree with the code."""
    from_file = settings_module.load_settings()
    assert from_file.model_dump() == settings_module.Settings.model_construct().model_dump() | {
        key: getattr(from_file, key) for key in ("secret_key", "smtp_password")
    }


def test_bad_value_stops_start_up_with_a_message_naming_the_key(
    settings_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP_PORT", "twenty-five")
    with pytest.raises(settings_module.SettingsError) as info:
        microapp.create_app()
    assert "SMTP_PORT" in str(info.value)
    assert "'twenty-five'" in str(info.value)


def test_misspelled_key_in_settings_file_is_named(settings_file: Path) -> None:
    settings_file.write_text('DATABSE_URL = "sqlite:///x.db"\n')
    with pytest.raises(settings_module.SettingsError, match="DATABSE_URL: unknown setting"):
        settings_module.load_settings()


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("env", "staging", "ENV"),
        ("database_url", "mysql://x/y", "DATABASE_URL: must be empty (SQLite)"),
        ("redis_url", "http://localhost", "REDIS_URL: must be empty (embedded mode)"),
        ("base_url", "mailslot.example", "BASE_URL: must be an absolute"),
        ("port", 0, "PORT: must be greater than 0"),
        ("mail_backend", "sendmail", "MAIL_BACKEND"),
        ("password_hash_method", "md5", "PASSWORD_HASH_METHOD"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(
    settings_file: Path, key: str, value: object, fragment: str
) -> None:
    with pytest.raises(settings_module.SettingsError, match=re.escape(fragment)):
        settings_module.load_settings(**{key: value})


def test_secret_values_are_not_echoed_in_errors(settings_file: Path) -> None:
    with pytest.raises(settings_module.SettingsError) as info:
        settings_module.load_settings(smtp_password=["not", "a", "string"])
    assert "SMTP_PASSWORD" in str(info.value)
    assert "not" not in str(info.value).replace("not a valid", "")


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("postgres://u:p@db:5432/app", "postgresql+psycopg://u:p@db:5432/app"),
        ("postgresql://u@db/app", "postgresql+psycopg://u@db/app"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_database_urls_a_paas_gives_are_accepted(
    settings_file: Path, given: str, stored: str
) -> None:
    assert settings_module.load_settings(database_url=given).database_url == stored


def test_production_without_secret_key_is_an_error(settings_file: Path) -> None:
    with pytest.raises(
        settings_module.SettingsError, match="SECRET_KEY must be set when ENV=production"
    ):
        settings_module.load_settings(env="production")


def test_development_secret_key_is_generated_once(tmp_path: Path, settings_file: Path) -> None:
    instance = str(tmp_path / "inst")
    first = microapp.create_app(instance_path=instance)
    second = microapp.create_app(instance_path=instance)
    assert first.secret_key == second.secret_key
    assert len(first.secret_key) >= 32
    assert (tmp_path / "inst" / "secret_key").stat().st_mode & 0o077 == 0


def test_configured_secret_key_is_used(tmp_path: Path, settings_file: Path) -> None:
    app = microapp.create_app(instance_path=str(tmp_path), secret_key="s" * 40)
    assert app.secret_key == "s" * 40
    assert not (tmp_path / "secret_key").exists()


def test_production_cookies_are_secure(tmp_path: Path, settings_file: Path) -> None:
    app = microapp.create_app(
        instance_path=str(tmp_path), env="production", secret_key="k" * 40, log_format="json"
    )
    assert app.config["SESSION_COOKIE_SECURE"] is True
    assert app.config["SESSION_COOKIE_HTTPONLY"] is True
    assert app.config["SESSION_COOKIE_SAMESITE"] == "Lax"

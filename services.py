"""Mailslot's business rules: accounts, readiness, and (later) forms and submission intake.

Nothing here touches ``request`` or ``session`` or renders a page; views pass plain values in.
"""

from __future__ import annotations

from typing import Any

import structlog
from flask import current_app
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from werkzeug.security import check_password_hash, generate_password_hash

import dal
import tasks

log = structlog.get_logger("mailslot.services")

# A hash of a random password, checked when the email is unknown so that a wrong address takes as
# long as a wrong password and timing does not reveal which accounts exist.
_DUMMY_HASHES: dict[str, str] = {}


def settings() -> Any:
    """The running app's settings."""
    return current_app.extensions["mailslot.settings"]


# =================================================================================================
# Accounts
# =================================================================================================


class EmailTaken(ValueError):
    """Sign-up with an address that already has an account."""


def normalise_email(email: str) -> str:
    """Emails are stored and compared trimmed and lower-cased."""
    return email.strip().lower()


def hash_password(password: str) -> str:
    """Hash with the configured werkzeug method."""
    return generate_password_hash(password, method=settings().password_hash_method)


def sign_up(email: str, password: str) -> dal.Row:
    """Create an owner account and send the confirmation link."""
    email = normalise_email(email)
    try:
        with dal.transaction() as conn:
            user = dal.insert_user(conn, email, hash_password(password))
    except IntegrityError:
        raise EmailTaken(email) from None
    log.info("account.created", user=user.id)
    send_confirmation(user.id)
    return user


def log_in(email: str, password: str) -> dal.Row | None:
    """The owner for this email and password, or None; upgrades an outdated hash on success."""
    method = settings().password_hash_method
    with dal.connection() as conn:
        user = dal.user_by_email(conn, normalise_email(email))
    if user is None:
        if method not in _DUMMY_HASHES:
            _DUMMY_HASHES[method] = generate_password_hash("not-a-password", method=method)
        check_password_hash(_DUMMY_HASHES[method], password)
        log.info("login.failed", reason="unknown_email")
        return None
    if not check_password_hash(user.password_hash, password):
        log.info("login.failed", user=user.id, reason="wrong_password")
        return None
    if user.password_hash.split("$", 1)[0] != method:
        with dal.transaction() as conn:
            dal.set_password_hash(conn, user.id, hash_password(password))
        log.info("password.rehashed", user=user.id, method=method.split(":", 1)[0])
    log.info("login.succeeded", user=user.id)
    return user


def log_out(user_id: int) -> None:
    """End every session of this owner: cookies carry the old session version."""
    with dal.transaction() as conn:
        dal.bump_session_version(conn, user_id)


def user_for_session(user_id: Any, version: Any) -> dal.Row | None:
    """The owner a session cookie names, if the cookie is still current."""
    if not isinstance(user_id, int) or not isinstance(version, int):
        return None
    with dal.connection() as conn:
        user = dal.user_by_id(conn, user_id)
    if user is None or user.session_version != version:
        return None
    return user


def _confirm_serializer() -> URLSafeTimedSerializer:
    """Signs email-confirmation tokens with the app's secret."""
    return URLSafeTimedSerializer(current_app.secret_key, salt="mailslot.confirm-email")


def confirmation_link(user: dal.Row) -> str:
    """A signed, expiring link that confirms this owner's current address."""
    token = _confirm_serializer().dumps({"uid": user.id, "email": user.email})
    return f"{settings().base_url}/confirm/{token}"


def send_confirmation(user_id: int) -> bool:
    """Mail the confirmation link; False when the address is already confirmed."""
    with dal.connection() as conn:
        user = dal.user_by_id(conn, user_id)
    if user is None or user.email_confirmed_at is not None:
        return False
    tasks.enqueue(tasks.send_confirmation_email, user.id, confirmation_link(user))
    return True


def confirm_email(token: str) -> str:
    """Check a confirmation token: 'confirmed', 'already', 'expired' or 'invalid'."""
    try:
        payload = _confirm_serializer().loads(token, max_age=settings().confirm_token_max_age)
    except SignatureExpired:
        return "expired"
    except BadSignature:
        return "invalid"
    if not isinstance(payload, dict):
        return "invalid"
    user_id, email = payload.get("uid"), payload.get("email")
    with dal.transaction() as conn:
        user = dal.user_by_id(conn, user_id) if isinstance(user_id, int) else None
        if user is None or user.email != email:
            return "invalid"
        if not dal.mark_email_confirmed(conn, user.id, user.email):
            return "already"
    log.info("account.confirmed", user=user_id)
    return "confirmed"


# =================================================================================================
# Health
# =================================================================================================


def readiness() -> dict[str, Any]:
    """Reachability of the database and Redis; degraded (still accepting) without Redis."""
    report: dict[str, Any] = {"mode": settings().mode}
    try:
        version = dal.stored_schema_version()
        if version is None:
            report["database"] = "not initialised: run flask --app microapp init-db"
        elif version != dal.SCHEMA_VERSION:
            report["database"] = f"schema version {version}, expected {dal.SCHEMA_VERSION}"
        else:
            report["database"] = "ok"
    except SQLAlchemyError as exc:
        log.warning("readyz.database_unreachable", error=type(exc).__name__)
        report["database"] = "unreachable"
    report["redis"] = "ok" if dal.redis_reachable() else "unreachable"
    if report["database"] != "ok":
        report["status"] = "down"
    elif report["redis"] != "ok":
        report["status"] = "degraded"
    else:
        report["status"] = "ok"
    return report

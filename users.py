"""Mailslot's accounts: signing up, logging in (with its throttle), sessions, confirming an
address, the account emails (queued, listed, replayed) and API tokens.

Views pass plain values in and get records back. Nothing here touches ``request`` or
``session`` or renders a page; sending is an outbox row that ``tasks`` delivers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

import structlog
from itsdangerous import BadSignature, SignatureExpired
from werkzeug.security import check_password_hash, generate_password_hash

import cache
import dal
import delivery
import intake
import records
import tasks
from settings import current_settings

log = structlog.get_logger("mailslot.users")

# A hash of a random password, checked when the email is unknown so that a wrong address takes as
# long as a wrong password and timing does not reveal which accounts exist.
_DUMMY_HASHES: dict[str, str] = {}

# =================================================================================================
# Accounts
# =================================================================================================


def normalise_email(email: str) -> str:
    """Emails are stored and compared trimmed and lower-cased."""
    return email.strip().lower()


def hash_password(password: str) -> str:
    """Hash with the configured werkzeug method."""
    return generate_password_hash(password, method=current_settings().password_hash_method)


ACCOUNT_EXISTS_EVERY = 3600  # at most one "someone tried to sign up" email per address per hour
CONFIRMATION_RESENDS_PER_HOUR = 5


def sign_up(email: str, password: str) -> None:
    """Register an address, doing the same visible work whether or not it has an account.

    A new address gets its account and a confirmation email. A taken one gets no account and
    no answer that differs: its owner is told by email instead ("account_exists", at most one
    per address per ACCOUNT_EXISTS_EVERY). The password is hashed in both cases, so both take
    as long. Either way the only sending done here is putting a row in the outbox.
    """
    email = normalise_email(email)
    password_hash = hash_password(password)
    try:
        with dal.transaction() as conn:
            user = dal.insert_user(conn, email, password_hash)
            delivery_id = queue_account_email(conn, user, "confirm_email")
    except dal.Duplicate:
        delivery_id = _tell_existing_owner(email)
    else:
        log.info("account.created", user=user.id)
    if delivery_id is not None:
        tasks.dispatch_deliveries([(delivery_id, 0)])


def _tell_existing_owner(email: str) -> int | None:
    """Queue the "someone tried to sign up with your address" email, unless one went out in
    the last hour; its delivery id."""
    account = hashlib.sha256(email.encode()).hexdigest()[:24]
    limit = cache.Limit(f"account-exists:{account}", 1, ACCOUNT_EXISTS_EVERY)
    if cache.hit_limits([limit]).exceeded is not None:
        log.info("signup.address_taken", told_owner=False)
        return None
    with dal.transaction() as conn:
        user = dal.user_by_email(conn, email)
        delivery_id = queue_account_email(conn, user, "account_exists") if user else None
    log.info("signup.address_taken", told_owner=delivery_id is not None)
    return delivery_id


def queue_account_email(
    conn: Any,
    user: records.User,
    template: str,
    *,
    to: str | None = None,
    params: dict[str, Any] | None = None,
) -> int:
    """Put one account email (a key of delivery.ACCOUNT_EMAILS) in the outbox, in the caller's
    transaction, to the account's address unless ``to`` says otherwise; its delivery id.

    The caller hands the id to ``tasks.dispatch_deliveries`` after the commit.
    """
    if template not in delivery.ACCOUNT_EMAILS:
        raise ValueError(f"no account email called {template!r}")
    return dal.insert_account_delivery(conn, user.id, template, to or user.email, params)


def log_in(email: str, password: str, client_ip: str | None = None) -> records.User | None:
    """The owner for this email and password, or None; upgrades an outdated hash on success.

    Attempts are counted per account and per address before the password is checked, in one
    atomic step, so simultaneous guesses cannot all pass a limit that has one slot left; past
    the limit even the right password is refused (RateLimited) until the oldest counted
    attempts leave the window. A right password takes back its own attempt only: a success
    never clears the failures before it (or an attacker's own account would reset the count
    of the address it guesses from).
    """
    limits = _login_limits(email, client_ip)
    attempt = cache.admit_attempt(limits) if limits else None
    if attempt is not None and attempt.exceeded is not None:
        log.info("login.rate_limited", limit=attempt.exceeded.name)
        raise RateLimited(attempt.retry_after)
    user = _check_password(email, password)
    if user is not None and attempt is not None:
        cache.withdraw_attempt(limits, attempt.ticket)
    return user


def _check_password(email: str, password: str) -> records.User | None:
    """The owner if the password is right; constant work for unknown addresses."""
    method = current_settings().password_hash_method
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


def user_for_session(user_id: Any, version: Any) -> records.User | None:
    """The owner a session cookie names, if the cookie is still current."""
    if not isinstance(user_id, int) or not isinstance(version, int):
        return None
    with dal.connection() as conn:
        user = dal.user_by_id(conn, user_id)
    if user is None or user.session_version != version:
        return None
    return user


def send_confirmation(user_id: int) -> bool:
    """Queue a new confirmation email; False when the address is already confirmed.

    RateLimited past CONFIRMATION_RESENDS_PER_HOUR for one account: the address may be
    someone else's, typed by whoever made the account.
    """
    limit = cache.Limit(f"confirm-resend:{user_id}", CONFIRMATION_RESENDS_PER_HOUR, 3600)
    with dal.connection() as conn:
        user = dal.user_by_id(conn, user_id)
    if user is None or user.email_confirmed_at is not None:
        return False
    state = cache.hit_limits([limit])
    if state.exceeded is not None:
        raise RateLimited(state.retry_after)
    with dal.transaction() as conn:
        delivery_id = queue_account_email(conn, user, "confirm_email")
    tasks.dispatch_deliveries([(delivery_id, 0)])
    return True


@dataclass(frozen=True)
class AccountEmailRecord:
    """One account email as the owner's account page lists it."""

    id: int
    label: str
    target: str
    status: str
    attempts: int
    last_error: str | None
    updated_at: dt.datetime

    @property
    def replayable(self) -> bool:
        """Done and dead emails can be sent again."""
        return self.status in ("done", "dead")


def account_emails(user_id: int) -> list[AccountEmailRecord]:
    """The owner's most recent account emails, newest first."""
    with dal.connection() as conn:
        rows = dal.account_deliveries(conn, user_id)
    return [
        AccountEmailRecord(
            id=row.id,
            label=spec.label
            if (spec := delivery.ACCOUNT_EMAILS.get(row.template))
            else row.template,
            target=row.target,
            status=row.status,
            attempts=row.attempts,
            last_error=row.last_error,
            updated_at=row.updated_at,
        )
        for row in rows
    ]


def replay_account_email(user_id: int, delivery_id: int) -> bool:
    """Send one of the owner's done or dead account emails again (with fresh links); False if
    there is none to replay."""
    with dal.transaction() as conn:
        row = dal.owned_account_delivery(conn, user_id, delivery_id)
        replayed = row is not None and dal.requeue_delivery(conn, delivery_id)
    if replayed:
        log.info("account_email.replayed", user=user_id, delivery_id=delivery_id)
        tasks.dispatch_deliveries([(delivery_id, row.attempts)])
    return replayed


def confirm_email(token: str) -> str:
    """Check a confirmation token: 'confirmed', 'already', 'expired' or 'invalid'."""
    try:
        payload = delivery.confirm_serializer().loads(
            token, max_age=current_settings().confirm_token_max_age
        )
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
# Throttles: logins, sign-ups
# =================================================================================================


class RateLimited(Exception):
    """Too many attempts; try again in ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


def _login_limits(email: str, client_ip: str | None) -> list[cache.Limit]:
    """Failed logins per account and per client address."""
    conf = current_settings()
    if not conf.rate_limits_enabled:
        return []
    window, count = conf.login_failure_window, conf.login_failure_limit
    account = hashlib.sha256(normalise_email(email).encode()).hexdigest()[:24]
    limits = [cache.Limit(f"login:acct:{account}", count, window)]
    if client_ip:
        limits.append(cache.Limit(f"login:ip:{intake.hash_ip(client_ip)}", count, window))
    return limits


def check_signup_rate(client_ip: str | None) -> None:
    """Count a sign-up attempt from this address; RateLimited past the limit."""
    conf = current_settings()
    if not conf.rate_limits_enabled or not client_ip:
        return
    limit = cache.Limit(f"signup:{intake.hash_ip(client_ip)}", conf.signup_limit_per_ip_hour, 3600)
    result = cache.hit_limits([limit])
    if result.exceeded is not None:
        raise RateLimited(result.retry_after)


# =================================================================================================
# API tokens
# =================================================================================================

API_TOKEN_PREFIX = "ms_live_"  # noqa: S105 - a public marker, not a secret
API_TOKEN_VISIBLE = 12  # "ms_live_" and four more characters: enough to tell tokens apart
API_TOKEN_TOUCH_EVERY = 60  # seconds between last_used_at writes for one token
_API_TOKEN_RE = re.compile(r"ms_live_[A-Za-z0-9_-]{43}")


def hash_api_token(token: str) -> str:
    """What is stored for a token: the SHA-256 hex of the whole token."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_token(user_id: int, name: str) -> tuple[records.ApiToken, str]:
    """A new token for this owner: its stored row, and the token itself (shown once, never kept)."""
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    with dal.transaction() as conn:
        row = dal.insert_api_token(
            conn, user_id, name, token[:API_TOKEN_VISIBLE], hash_api_token(token)
        )
    log.info("api_token.created", user=user_id, token_id=row.id)
    return row, token


def list_api_tokens(user_id: int) -> list[records.ApiToken]:
    """The owner's active tokens, newest first."""
    with dal.connection() as conn:
        return dal.active_api_tokens(conn, user_id)


def revoke_api_token(user_id: int, token_id: int) -> bool:
    """Revoke one of the owner's tokens; False when it is not theirs or already revoked."""
    with dal.transaction() as conn:
        revoked = dal.revoke_api_token(conn, user_id, token_id)
    if revoked:
        log.info("api_token.revoked", user=user_id, token_id=token_id)
    return revoked


def api_token_owner(token: str) -> records.ApiTokenWithOwner | None:
    """The active token (with its owner's email) a bearer token names, or None; notes the use."""
    if not _API_TOKEN_RE.fullmatch(token):
        return None
    with dal.connection() as conn:
        row = dal.api_token_by_hash(conn, hash_api_token(token))
    if row is None:
        return None
    now = dal.utcnow()
    idle = None if row.last_used_at is None else (now - row.last_used_at).total_seconds()
    if idle is None or idle >= API_TOKEN_TOUCH_EVERY:
        with dal.transaction() as conn:
            dal.touch_api_token(conn, row.id, now, API_TOKEN_TOUCH_EVERY)
    return row


def api_rate_limit(token_id: int) -> int | None:
    """Count one call for this token; seconds to wait when it is over API_RATE_LIMIT, else None."""
    count, seconds = current_settings().api_rate_limit_window
    result = cache.hit_limits([cache.Limit(f"api:{token_id}", count, seconds)])
    return result.retry_after if result.exceeded is not None else None

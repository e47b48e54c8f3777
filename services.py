"""Mailslot's business rules: accounts, readiness, and (later) forms and submission intake.

Nothing here touches ``request`` or ``session`` or renders a page; views pass plain values in.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import hmac
import io
import ipaddress
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import structlog
from flask import current_app
from itsdangerous import BadData, BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from werkzeug.security import check_password_hash, generate_password_hash

import dal
import forms
import tasks
from settings import current_settings

log = structlog.get_logger("mailslot.services")

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
    except IntegrityError:
        delivery_id = _tell_existing_owner(email)
    else:
        log.info("account.created", user=user.id)
    if delivery_id is not None:
        dispatch_deliveries([(delivery_id, 0)])


def _tell_existing_owner(email: str) -> int | None:
    """Queue the "someone tried to sign up with your address" email, unless one went out in
    the last hour; its delivery id."""
    account = hashlib.sha256(email.encode()).hexdigest()[:24]
    limit = dal.Limit(f"account-exists:{account}", 1, ACCOUNT_EXISTS_EVERY)
    if dal.hit_limits([limit]).exceeded is not None:
        log.info("signup.address_taken", told_owner=False)
        return None
    with dal.transaction() as conn:
        user = dal.user_by_email(conn, email)
        delivery_id = queue_account_email(conn, user, "account_exists") if user else None
    log.info("signup.address_taken", told_owner=delivery_id is not None)
    return delivery_id


def queue_account_email(
    conn: Any,
    user: dal.Row,
    template: str,
    *,
    to: str | None = None,
    params: dict[str, Any] | None = None,
) -> int:
    """Put one account email (a key of tasks.ACCOUNT_EMAILS) in the outbox, in the caller's
    transaction, to the account's address unless ``to`` says otherwise; its delivery id.

    The caller hands the id to ``dispatch_deliveries`` after the commit.
    """
    if template not in tasks.ACCOUNT_EMAILS:
        raise ValueError(f"no account email called {template!r}")
    return dal.insert_account_delivery(conn, user.id, template, to or user.email, params)


def log_in(email: str, password: str, client_ip: str | None = None) -> dal.Row | None:
    """The owner for this email and password, or None; upgrades an outdated hash on success.

    Attempts are counted per account and per address before the password is checked, in one
    atomic step, so simultaneous guesses cannot all pass a limit that has one slot left; past
    the limit even the right password is refused (RateLimited) until the oldest counted
    attempts leave the window. A right password takes back its own attempt only: a success
    never clears the failures before it (or an attacker's own account would reset the count
    of the address it guesses from).
    """
    limits = _login_limits(email, client_ip)
    attempt = dal.admit_attempt(limits) if limits else None
    if attempt is not None and attempt.exceeded is not None:
        log.info("login.rate_limited", limit=attempt.exceeded.name)
        raise RateLimited(attempt.retry_after)
    user = _check_password(email, password)
    if user is not None and attempt is not None:
        dal.withdraw_attempt(limits, attempt.ticket)
    return user


def _check_password(email: str, password: str) -> dal.Row | None:
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


def confirmation_link(user_id: int, email: str) -> str:
    """A signed, expiring link that confirms this address for this owner (made at send time)."""
    token = _confirm_serializer().dumps({"uid": user_id, "email": email})
    return f"{current_settings().base_url}/confirm/{token}"


def send_confirmation(user_id: int) -> bool:
    """Queue a new confirmation email; False when the address is already confirmed.

    RateLimited past CONFIRMATION_RESENDS_PER_HOUR for one account: the address may be
    someone else's, typed by whoever made the account.
    """
    limit = dal.Limit(f"confirm-resend:{user_id}", CONFIRMATION_RESENDS_PER_HOUR, 3600)
    with dal.connection() as conn:
        user = dal.user_by_id(conn, user_id)
    if user is None or user.email_confirmed_at is not None:
        return False
    state = dal.hit_limits([limit])
    if state.exceeded is not None:
        raise RateLimited(state.retry_after)
    with dal.transaction() as conn:
        delivery_id = queue_account_email(conn, user, "confirm_email")
    dispatch_deliveries([(delivery_id, 0)])
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
            label=spec.label if (spec := tasks.ACCOUNT_EMAILS.get(row.template)) else row.template,
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
        dispatch_deliveries([(delivery_id, row.attempts)])
    return replayed


def confirm_email(token: str) -> str:
    """Check a confirmation token: 'confirmed', 'already', 'expired' or 'invalid'."""
    try:
        payload = _confirm_serializer().loads(
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
# Forms (the owner's side)
# =================================================================================================


class NotFound(LookupError):
    """The thing does not exist, or belongs to someone else: both answer 404."""


def new_public_id() -> str:
    """A random, URL-safe public id with 128 bits of entropy."""
    return secrets.token_urlsafe(16)


def list_forms(owner_id: int) -> list[dal.Row]:
    """The owner's forms with their submission counts and newest submission time."""
    with dal.connection() as conn:
        return dal.forms_with_counts(conn, owner_id)


def owned_form(owner_id: int, public_id: str) -> dal.Row:
    """The owner's form, or NotFound whether it is missing or someone else's."""
    with dal.connection() as conn:
        form = dal.owned_form(conn, owner_id, public_id)
    if form is None:
        raise NotFound(public_id)
    return form


def create_form(owner_id: int, values: dict[str, Any]) -> dal.Row:
    """Create a form from cleaned settings values."""
    with dal.transaction() as conn:
        form = dal.insert_form(conn, owner_id, new_public_id(), values)
    log.info("form.created", form=form.public_id)
    return form


def honeypot_problems(
    fields: list[dict[str, Any]] | None, honeypot: str, key: str
) -> dict[str, list[str]]:
    """The honeypot must not be one of the form's fields: ``{key: [why]}`` when it is, else {}."""
    clash = forms.honeypot_clash(fields or [], honeypot)
    return {key: [clash]} if clash else {}


def update_form_settings(form: dal.Row, values: dict[str, Any]) -> None:
    """Save a form's settings; InvalidInput (on honeypot_field) when the honeypot is a field."""
    honeypot = values.get("honeypot_field", form.honeypot_field)
    problems = honeypot_problems(form.fields, honeypot, "honeypot_field")
    if problems:
        raise InvalidInput(problems)
    with dal.form_write(form.public_id) as conn:
        dal.update_form(conn, form.id, values)
    log.info("form.updated", form=form.public_id)


def save_fields(form: dal.Row, specs: list[dict[str, Any]]) -> None:
    """Store a new field schema; its version goes up so old submissions keep their meaning.
    InvalidInput (on ``_form``) when one of the fields is named like the honeypot."""
    problems = honeypot_problems(specs, form.honeypot_field, "_form")
    if problems:
        raise InvalidInput(problems)
    with dal.form_write(form.public_id) as conn:
        dal.bump_schema_version(conn, form.id, specs)
    log.info("form.fields_saved", form=form.public_id, fields=len(specs))


def delete_form(form: dal.Row) -> None:
    """Remove a form and everything stored for it."""
    with dal.form_write(form.public_id) as conn:
        dal.delete_form(conn, form.id)
    log.info("form.deleted", form=form.public_id)


INBOX_PAGE_SIZE = 50


def inbox_page(
    form: dal.Row, *, before: int | None, query: str, spam: bool
) -> tuple[list[dal.Row], int | None]:
    """One page of the inbox, newest first, and the ``before`` cursor of the next page."""
    with dal.connection() as conn:
        rows = dal.submission_page(
            conn, form.id, before=before, limit=INBOX_PAGE_SIZE + 1, query=query, spam=spam
        )
    more = len(rows) > INBOX_PAGE_SIZE
    rows = rows[:INBOX_PAGE_SIZE]
    return rows, (rows[-1].id if more else None)


def owned_submission(form: dal.Row, public_id: str) -> dal.Row:
    """A submission of this (already owned) form, or NotFound."""
    with dal.connection() as conn:
        submission = dal.submission_in_form(conn, form.id, public_id)
    if submission is None:
        raise NotFound(public_id)
    return submission


def submission_deliveries(submission: dal.Row) -> list[dal.Row]:
    """The delivery log of one submission."""
    with dal.connection() as conn:
        return dal.deliveries_for(conn, submission.id)


def mark_spam(submission: dal.Row, is_spam: bool) -> None:
    """The owner's verdict on a submission."""
    reason = "marked as spam by the owner" if is_spam else None
    with dal.transaction() as conn:
        dal.set_spam(conn, submission.id, is_spam, reason)
        released = [] if is_spam else dal.release_spam_deliveries(conn, submission.id)
    _form_numbers_changed(submission.form_id)
    log.info("submission.marked", submission=submission.public_id, spam=is_spam)
    dispatch_deliveries([(delivery_id, 0) for delivery_id in released])  # never attempted


def delete_submission(submission: dal.Row) -> None:
    """Remove one submission."""
    with dal.transaction() as conn:
        dal.delete_submission(conn, submission.id)
    _form_numbers_changed(submission.form_id)
    log.info("submission.deleted", submission=submission.public_id)


def endpoint_url(form: dal.Row) -> str:
    """The address a website's form posts to."""
    return f"{current_settings().base_url}/f/{form.public_id}"


def install_data(form: dal.Row) -> dict[str, Any]:
    """What the install panel's snippets are made of: the form's address (also its hosted page),
    its fields (the default ones for an empty schema), and the honeypot's name."""
    url = endpoint_url(form)
    return {
        "action": url,
        "hosted": url,
        "fields": list(form.fields or forms.DEFAULT_FIELDS),
        "honeypot": form.honeypot_field,
    }


# =================================================================================================
# Exports
# =================================================================================================

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> str:
    """A cell's text; text that a spreadsheet would run as a formula gets a leading '."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if isinstance(value, str) and text.startswith(_FORMULA_STARTS):
        return "'" + text
    return text


def _export_columns(form: dal.Row) -> list[str]:
    """Schema fields in order, then every other key seen in the data, in first-seen order."""
    columns = [spec["name"] for spec in form.fields or []]
    seen = set(columns)
    with dal.connection() as conn:
        for row in dal.iter_submissions(conn, form.id):
            for key in row.data:
                if key not in seen:
                    seen.add(key)
                    columns.append(key)
    return columns


def export_csv(form: dal.Row) -> Iterator[str]:
    """The form's submissions as CSV (UTF-8 with BOM, RFC 4180), streamed row by row."""
    columns = _export_columns(form)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def flush() -> str:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    writer.writerow(["id", "submitted_at", *(spreadsheet_safe(c) for c in columns)])
    yield "\ufeff" + flush()
    with dal.connection() as conn:
        for row in dal.iter_submissions(conn, form.id):
            writer.writerow(
                [
                    row.public_id,
                    row.created_at.isoformat(),
                    *(spreadsheet_safe(row.data.get(column)) for column in columns),
                ]
            )
            yield flush()


def export_json(form: dal.Row) -> Iterator[str]:
    """The form's submissions as one JSON array, streamed one object at a time."""
    yield "["
    first = True
    with dal.connection() as conn:
        for row in dal.iter_submissions(conn, form.id):
            item = {
                "id": row.public_id,
                "submitted_at": row.created_at.isoformat(),
                "data": row.data,
            }
            yield ("\n" if first else ",\n") + json.dumps(item, ensure_ascii=False)
            first = False
    yield "\n]\n"


# =================================================================================================
# Submission intake (the public endpoint and the hosted page)
# =================================================================================================


STORED_SUBJECT_MAX_LENGTH = 250


class FormUnavailable(Exception):
    """Intake refused before storing anything; ``status`` and ``message`` say why."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass
class Payload:
    """What the view read from the request body, before any rule is applied."""

    kind: str  # "form", "json", "unreadable" (``problem`` says why), "unsupported"
    values: dict[str, Any] = field(default_factory=dict)
    has_files: bool = False
    problem: str = ""


@dataclass
class IntakeRequest:
    """Everything intake needs to know about one request; no Flask objects."""

    public_id: str
    payload: Payload
    origin: str | None = None
    referrer: str | None = None
    client_ip: str | None = None
    user_agent: str | None = None
    hosted: bool = False


@dataclass
class IntakeResult:
    """What happened: stored, trapped by the honeypot, or refused with per-field errors."""

    form: dal.Row
    outcome: str  # "stored", "honeypot", "invalid"
    submission_id: str = ""
    errors: dict[str, list[str]] = field(default_factory=dict)
    redirect_to: str = ""
    delivery_ids: list[int] = field(default_factory=list)


def public_form(public_id: str) -> dal.CachedForm:
    """A form by public id for the public side, through the Redis cache."""
    return _available(dal.public_form(public_id))


def _available(form: dal.CachedForm | None) -> dal.CachedForm:
    """The form, or the 404 every public route gives for an unknown id."""
    if form is None:
        raise FormUnavailable(404, "There is no form at this address. Check the form's action URL.")
    return form


def _on_trusted_site(form: dal.Row, url: forms.WebUrl, *, exact_port: bool) -> bool:
    """Whether ``url`` is on Mailslot's own site or on one of the form's allowed domains.

    An allowed entry that names a port matches that port only. One that names none matches
    any port of its host for the site a post comes from (``exact_port`` False), and only the
    scheme's default port for where a browser is sent (``exact_port`` True).
    """
    own = forms.parse_web_url(current_settings().base_url)
    if own is not None and (url.host, url.port) == (own.host, own.port):
        return True
    for entry in form.allowed_domains or []:
        name, _, port = entry.partition(":")
        if name != url.host:
            continue
        if port:
            if port.isdigit() and int(port) == url.port:
                return True
        elif not exact_port or url.port == forms.DEFAULT_PORTS[url.scheme]:
            return True
    return False


def origin_allowed(form: dal.Row, origin: str | None, referrer: str | None) -> bool:
    """Cross-site posts only from the allowed domains, when the owner listed any.

    ``Origin: null`` (a sandboxed frame, a local file, a privacy-preserving context) hides the
    site, so the Referer must then name an allowed one. No Origin and no Referer at all is not
    a browser posting from another page, and passes.
    """
    if not form.allowed_domains:
        return True
    if origin and origin.strip().lower() == "null":
        if not referrer:
            return False
        claimed = referrer
    else:
        claimed = origin or referrer
    if not claimed:
        return True
    url = forms.parse_web_url(claimed)
    return url is not None and _on_trusted_site(form, url, exact_port=False)


def cors_origin(form: dal.Row | None, origin: str | None) -> str | None:
    """The Access-Control-Allow-Origin value for this origin, or None to send none."""
    if form is None or not form.allowed_domains:
        return "*"
    url = forms.parse_web_url(origin)
    if url is not None and _on_trusted_site(form, url, exact_port=False):
        return origin
    return None


def safe_redirect(form: dal.Row, next_url: Any, posted_from: str | None) -> str | None:
    """``_next`` resolved against the posting page, if it stays on a site this form trusts.

    The answer is the URL as parsed and checked (see ``forms.parse_web_url``), never the text
    as sent; anything that does not parse is None, and the caller's default applies.
    """
    page = forms.parse_web_url(posted_from)
    target = forms.parse_web_url(
        next_url, base=page.url if page else current_settings().base_url + "/"
    )
    if target is None:
        return None
    if _on_trusted_site(form, target, exact_port=True):
        return target.url
    if not form.allowed_domains and page is not None:
        return target.url if (target.host, target.port) == (page.host, page.port) else None
    return None


def hash_ip(ip: str | None) -> str | None:
    """A salted hash of the client address: enough to count, never the address itself."""
    if not ip:
        return None
    key = current_app.secret_key.encode() if isinstance(current_app.secret_key, str) else b""
    return hmac.new(key, ip.encode(), hashlib.sha256).hexdigest()[:32]


def _control_value(values: dict[str, Any], name: str) -> str | None:
    """A control field's value as one string, or None."""
    value = values.get(name)
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def _submission_meta(values: dict[str, Any]) -> dict[str, str]:
    """``_subject`` and ``_replyto`` as stored: each on one line; a subject cut to length, a
    reply-to longer than any address dropped. Junk here never refuses the submission."""
    meta = {}
    subject = forms.one_line(_control_value(values, "_subject"))
    if subject:
        meta["subject"] = subject[:STORED_SUBJECT_MAX_LENGTH]
    reply_to = forms.one_line(_control_value(values, "_replyto"))
    if reply_to and len(reply_to) <= forms.EMAIL_ADDRESS_MAX_LENGTH:
        meta["reply_to"] = reply_to
    return meta


def record_submission(req: IntakeRequest) -> IntakeResult:
    """Intake: find the form, check it accepts this post, trap bots, validate, store, enqueue.

    Before the database write Redis is used once with a warm cache (the cached form, the rate
    limits and the velocity counter in one pipeline) and twice on a miss (the cache fill).
    """
    ip_hash = hash_ip(req.client_ip)
    form, limits = dal.intake_lookup(
        req.public_id,
        submission_limits(req.public_id, ip_hash),
        ((f"velocity:{ip_hash}", VELOCITY_WINDOW),) if ip_hash else (),
    )
    form = _available(form)
    if form.status != "active":
        raise FormUnavailable(403, "This form is paused and is not accepting submissions.")
    if not req.hosted and not origin_allowed(form, req.origin, req.referrer):
        raise FormUnavailable(403, "This form does not accept submissions from this website.")
    if limits.exceeded is not None:
        log.info("submission.rate_limited", form=form.public_id, limit=limits.exceeded.name)
        raise FormUnavailable(
            429,
            "Too many submissions; wait a moment and send the form again.",
            retry_after=limits.retry_after,
        )
    payload = req.payload
    if payload.kind == "unreadable":
        raise FormUnavailable(400, payload.problem)
    if payload.kind == "unsupported":
        raise FormUnavailable(
            415,
            "Send the form as application/x-www-form-urlencoded, multipart/form-data "
            "or application/json.",
        )
    if payload.has_files:
        raise FormUnavailable(
            415, "File uploads are not supported yet. Remove the file field and send again."
        )
    values = forms.decode_fields(payload.values)
    posted_from = req.referrer if not req.hosted else None
    redirect_to = (
        safe_redirect(form, _control_value(values, "_next"), posted_from)
        or form.redirect_url
        or f"{current_settings().base_url}/f/{form.public_id}/thanks"
    )
    if _control_value(values, form.honeypot_field):
        dal.bump_counter(f"form:{form.id}:honeypot")
        log.info("submission.honeypot", form=form.public_id)
        return IntakeResult(form, "honeypot", new_public_id(), redirect_to=redirect_to)

    data = {
        key: value
        for key, value in values.items()
        if not key.startswith("_") and key != form.honeypot_field and key != "csrf_token"
    }
    schema = form.fields or (forms.DEFAULT_FIELDS if req.hosted else [])
    conf = current_settings()
    clean, errors = forms.validate_submission(
        schema,
        data,
        strict=bool(form.strict or req.hosted),
        max_fields=conf.submission_max_fields,
        max_value_length=conf.submission_max_value_length,
    )
    if errors:
        return IntakeResult(form, "invalid", errors=errors, redirect_to=redirect_to)

    reasons = spam_reasons(
        form,
        clean,
        velocity=limits.counters.get(f"velocity:{ip_hash}", 0),
        rendered=values.get("_rendered") if req.hosted else None,
        hosted=req.hosted,
    )
    is_spam = sum(weight for weight, _ in reasons) >= conf.spam_threshold
    with dal.transaction() as conn:
        submission = dal.insert_submission(
            conn,
            {
                "public_id": new_public_id(),
                "form_id": form.id,
                "data": clean,
                "schema_version": form.schema_version,
                "is_spam": is_spam,
                "spam_reason": "; ".join(text for _, text in reasons) or None,
                "ip_hash": ip_hash,
                "user_agent": (forms.one_line(req.user_agent) or "")[:512] or None,
                "referrer": (forms.one_line(req.referrer) or "")[:2000] or None,
                "meta": _submission_meta(values),
            },
        )
        delivery_ids = _queue_deliveries(conn, form, submission, held=is_spam)
    log.info(
        "submission.stored", form=form.public_id, submission=submission.public_id, spam=is_spam
    )
    if not is_spam:
        dispatch_deliveries([(delivery_id, 0) for delivery_id in delivery_ids])
    return IntakeResult(
        form,
        "stored",
        submission.public_id,
        redirect_to=redirect_to,
        delivery_ids=delivery_ids,
    )


def _queue_deliveries(conn: Any, form: Any, submission: dal.Row, *, held: bool) -> list[int]:
    """Outbox rows for a new submission, in its transaction: email to a confirmed owner, webhook.

    Spam gets its rows too, ``held``: marking it "not spam" releases them.
    """
    targets = []
    if form.notify:
        owner = dal.owner_of_form(conn, form.id)
        if owner is not None and owner.email_confirmed_at is not None:
            targets.append(("email", owner.email))
    if form.webhook_url:
        targets.append(("webhook", form.webhook_url))
    return dal.insert_deliveries(conn, submission.id, targets, "held" if held else "pending")


def dispatch_deliveries(tickets: list[tuple[int, int]]) -> None:
    """Hand committed outbox rows, as (id, attempts so far), to the workers; rows that fail to
    enqueue wait for the sweeper."""
    tasks.enqueue_soon(tasks.deliver, tickets)


# =================================================================================================
# Rate limits and spam scoring (no third party sees the data)
# =================================================================================================

VELOCITY_WINDOW = 600
_URL_PATTERN = re.compile(r"https?://|www\.", re.IGNORECASE)


def submission_limits(public_id: str, ip_hash: str | None) -> list[dal.Limit]:
    """Per client IP per form (a minute and an hour) and per form overall (an hour)."""
    conf = current_settings()
    if not conf.rate_limits_enabled:
        return []
    limits = [dal.Limit(f"form:{public_id}", conf.submit_limit_per_form_hour, 3600)]
    if ip_hash:
        limits += [
            dal.Limit(f"ip:{ip_hash}:{public_id}:m", conf.submit_limit_per_ip_minute, 60),
            dal.Limit(f"ip:{ip_hash}:{public_id}:h", conf.submit_limit_per_ip_hour, 3600),
        ]
    return limits


class RateLimited(Exception):
    """Too many attempts; try again in ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


def _login_limits(email: str, client_ip: str | None) -> list[dal.Limit]:
    """Failed logins per account and per client address."""
    conf = current_settings()
    if not conf.rate_limits_enabled:
        return []
    window, count = conf.login_failure_window, conf.login_failure_limit
    account = hashlib.sha256(normalise_email(email).encode()).hexdigest()[:24]
    limits = [dal.Limit(f"login:acct:{account}", count, window)]
    if client_ip:
        limits.append(dal.Limit(f"login:ip:{hash_ip(client_ip)}", count, window))
    return limits


def check_signup_rate(client_ip: str | None) -> None:
    """Count a sign-up attempt from this address; RateLimited past the limit."""
    conf = current_settings()
    if not conf.rate_limits_enabled or not client_ip:
        return
    limit = dal.Limit(f"signup:{hash_ip(client_ip)}", conf.signup_limit_per_ip_hour, 3600)
    result = dal.hit_limits([limit])
    if result.exceeded is not None:
        raise RateLimited(result.retry_after)


def _render_serializer(public_id: str) -> URLSafeTimedSerializer:
    """Signs the render stamps of one form's hosted page: another form's stamp fails its check."""
    return URLSafeTimedSerializer(current_app.secret_key, salt=f"mailslot.render:{public_id}")


def render_token(public_id: str) -> str:
    """A signed timestamp for this form's hosted page, checked when the page is submitted."""
    return _render_serializer(public_id).dumps(round(time.time(), 3))


def _render_age(token: Any, public_id: str) -> float | None:
    """Seconds since this form's hosted page was rendered; None for a missing or forged token,
    or one rendered for another form."""
    if isinstance(token, list):
        token = token[0] if len(token) == 1 else None
    if not isinstance(token, str):
        return None
    try:
        rendered = _render_serializer(public_id).loads(token)
    except BadData:
        return None
    return time.time() - float(rendered) if isinstance(rendered, int | float) else None


def render_stamp_valid(token: Any, public_id: str) -> bool:
    """A genuine render stamp of this form's hosted page, at most a day old."""
    age = _render_age(token, public_id)
    return age is not None and -60 < age < 24 * 3600


def spam_reasons(
    form: Any, data: dict[str, Any], *, velocity: int, rendered: Any, hosted: bool
) -> list[tuple[float, str]]:
    """Each local spam signal that fired, with its weight and the reason shown to the owner."""
    conf = current_settings()
    reasons: list[tuple[float, str]] = []
    texts = [value for value in data.values() if isinstance(value, str)]
    links = sum(len(_URL_PATTERN.findall(text)) for text in texts)
    if links > conf.spam_max_links:
        reasons.append((0.6 if links < 2 * conf.spam_max_links + 1 else 1.0, f"{links} links"))
    if hosted:
        age = _render_age(rendered, form.public_id)
        if age is None:
            reasons.append((0.5, "the page's render stamp is missing or forged"))
        elif age < conf.spam_min_seconds:
            reasons.append((1.0, f"sent {max(age, 0):.1f} s after render"))
        elif age > 24 * 3600:
            reasons.append((0.5, "sent more than a day after the page was rendered"))
    if velocity > conf.spam_velocity_limit:
        reasons.append((0.6, f"{velocity} submissions from this address in 10 minutes"))
    rules = form.spam_rules or {}
    lowered = " ".join(texts).lower()
    for word in rules.get("words", []):
        if word.lower() in lowered:
            reasons.append((1.0, f"contains the blocked word “{word}”"))
            break
    blocked_domains = {d.lower() for d in rules.get("email_domains", [])}
    for text in texts:
        if "@" in text:
            domain = text.rsplit("@", 1)[1].strip().lower()
            if domain in blocked_domains:
                reasons.append((1.0, f"email from the blocked domain “{domain}”"))
                break
    return reasons


def inbox_numbers(form: Any) -> tuple[dict[str, int], list[dal.DayCount]]:
    """The inbox's stats block and its chart, consistent with each other and with the list.

    Today and the last 7 days (today and the six UTC days before it) come from the chart, whose
    today is live; spam caught is cached for a minute (and forgotten when the owner marks spam
    or deletes); honeypot hits are a Redis counter.
    """
    per_day = submissions_per_day(form)

    def spam() -> int:
        with dal.connection() as conn:
            return dal.spam_count(conn, form.id)

    stats = {
        "today": per_day[-1].count,
        "week": sum(day.count for day in per_day[-7:]),
        "spam": dal.cached_json(f"stats:{form.id}", dal.STATS_TTL, spam),
        "honeypot": dal.read_counter(f"form:{form.id}:honeypot"),
    }
    return stats, per_day


# =================================================================================================
# Deliveries and webhooks (the owner's side; sending lives in tasks.py)
# =================================================================================================


def replay_delivery(submission: dal.Row, delivery_id: int) -> bool:
    """Send a done or dead delivery of this submission again; False if there is none to replay."""
    with dal.transaction() as conn:
        row = next(
            (d for d in dal.deliveries_for(conn, submission.id) if d.id == delivery_id), None
        )
        replayed = row is not None and dal.requeue_delivery(conn, delivery_id)
    if replayed:
        log.info("delivery.replayed", submission=submission.public_id, delivery_id=delivery_id)
        dispatch_deliveries([(delivery_id, row.attempts)])
    return replayed


def dead_deliveries(form: dal.Row) -> list[dal.Row]:
    """The form's deliveries that ran out of attempts."""
    with dal.connection() as conn:
        return dal.dead_deliveries(conn, form.id)


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: whsec_ + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_webhook_url(url: str) -> str | None:
    """Why this URL cannot be a webhook target, or None when it can."""
    try:
        resolve_webhook_target(
            url,
            current_settings().webhook_allow_private,
            dns_timeout=current_settings().webhook_dns_timeout,
        )
    except BlockedAddress as exc:
        return str(exc)
    return None


WEBHOOK_REMOVED = "cancelled: the form's webhook was removed"


def set_webhook(form: dal.Row, url: str | None) -> str | None:
    """Set or remove the form's webhook; the new signing secret when a first URL made one.

    Deliveries still to send follow the change: they go to the new URL, or, when the webhook is
    removed, they are cancelled (dead, with WEBHOOK_REMOVED as their error, and replayable).
    """
    values = _webhook_values(form, url)
    with dal.form_write(form.public_id) as conn:
        dal.update_form(conn, form.id, values)
        _follow_webhook_change(conn, form, values["webhook_url"])
    log.info("form.webhook_set", form=form.public_id, enabled=bool(url))
    return values.get("webhook_secret")


def _webhook_values(form: dal.Row, url: str | None) -> dict[str, Any]:
    """The columns that set or remove a webhook: a first URL comes with a signing secret."""
    values: dict[str, Any] = {"webhook_url": url or None}
    if url and not form.webhook_secret:
        values["webhook_secret"] = new_webhook_secret()
    return values


def _follow_webhook_change(conn: Any, form: dal.Row, url: str | None) -> None:
    """Point the form's unsent webhook deliveries at ``url``, or cancel them when it is None."""
    if url == form.webhook_url:
        return
    if url is None:
        dal.cancel_webhook_deliveries(conn, form.id, WEBHOOK_REMOVED)
    else:
        dal.retarget_webhook_deliveries(conn, form.id, url)


def rotate_webhook_secret(form: dal.Row) -> str:
    """Replace the signing secret and return it; the receiver must be given the new one."""
    secret = new_webhook_secret()
    with dal.form_write(form.public_id) as conn:
        dal.update_form(conn, form.id, {"webhook_secret": secret})
    log.info("form.webhook_secret_rotated", form=form.public_id)
    return secret


def reveal_webhook_secret(form: dal.Row) -> str | None:
    """The form's signing secret, to show its owner once more (logged, the secret never is)."""
    if form.webhook_secret:
        log.info("form.webhook_secret_revealed", form=form.public_id)
    return form.webhook_secret


def masked_secret(secret: str) -> str:
    """A signing secret as the settings page shows it: enough to tell two apart, no more."""
    return f"whsec_…{secret[-4:]}"


def send_test_event(form: dal.Row) -> str:
    """POST a signed webhook.test event now and say how the receiver answered.

    This runs in a web request: DNS, connect and read are each held to short limits
    (WEBHOOK_DNS_TIMEOUT, WEBHOOK_TEST_TIMEOUT), and every failure is a sentence to show.
    """
    if not form.webhook_url or not form.webhook_secret:
        return "Set a webhook URL first."
    body = json.dumps(
        {
            "type": "webhook.test",
            "timestamp": dal.utcnow().isoformat(),
            "data": {"form": {"id": form.public_id, "name": form.name}},
        }
    ).encode()
    timeout = current_settings().webhook_test_timeout
    try:
        status, _ = tasks.post_webhook(
            form.webhook_url,
            form.webhook_secret,
            f"msg_test_{new_public_id()}",
            body,
            timeouts=(timeout, timeout),
        )
    except (tasks.PermanentFailure, tasks.TemporaryFailure) as exc:
        return f"The test event failed: {exc}."
    if 200 <= status < 300:
        return f"The receiver answered {status}: the webhook works."
    return f"The receiver answered {status}; only 2xx answers count as delivered."


def sign_webhook(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks signature: v1,base64(HMAC-SHA256(key, "id.timestamp.body"))."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


class BlockedAddress(ValueError):
    """A webhook URL that is not http(s) or resolves to a non-public address."""


class HostNotResolved(BlockedAddress):
    """The webhook's host name gave no address in time: worth trying again later."""


# How the webhook check sorts an address: "public" passes, "private" (loopback, the private and
# shared ranges) passes only with WEBHOOK_ALLOW_PRIVATE, "blocked" never does. Python's is_global
# is the base; the lists add what it gets wrong or what no webhook receiver can be (multicast,
# site-local, 6to4 relays, the IPv6 ranges that are not global unicast, ...).
PUBLIC, PRIVATE, BLOCKED = "public", "private", "blocked"
_SEVERITY = {PUBLIC: 0, PRIVATE: 1, BLOCKED: 2}
_PRIVATE_V4 = [
    ipaddress.IPv4Network(net)
    for net in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
]
_BLOCKED_V4 = [
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8", "169.254.0.0/16", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    )
]  # fmt: skip
_PRIVATE_V6 = [ipaddress.IPv6Network(net) for net in ("::1/128", "fc00::/7", "64:ff9b:1::/48")]
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_BLOCKED_V6 = [
    ipaddress.IPv6Network(net)
    # IETF protocol assignments (Teredo, benchmarking, ORCHID...), documentation, SRv6 SIDs
    for net in ("2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16")
]
# IPv6 prefixes that only carry an IPv4 address (to a translator): judged by that address alone.
_CARRIERS_V6 = [
    ipaddress.IPv6Network(net) for net in ("::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96")
]
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible (RFC 4291)
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def _ipv4_class(ip: ipaddress.IPv4Address) -> str:
    """PUBLIC, PRIVATE or BLOCKED for an IPv4 address."""
    if any(ip in net for net in _PRIVATE_V4):
        return PRIVATE
    if any(ip in net for net in _BLOCKED_V4) or not ip.is_global:
        return BLOCKED
    return PUBLIC


def _ipv6_own_class(ip: ipaddress.IPv6Address) -> str:
    """PUBLIC, PRIVATE or BLOCKED for an IPv6 address itself, leaving out what it carries."""
    if any(ip in net for net in _CARRIERS_V6):
        return PUBLIC
    if any(ip in net for net in _PRIVATE_V6):
        return PRIVATE
    if (
        ip not in _GLOBAL_UNICAST  # multicast, link- and site-local, ::/8, unassigned space
        or any(ip in net for net in _BLOCKED_V6)
        or not ip.is_global
    ):
        return BLOCKED
    return PUBLIC


def _low32(value: int) -> ipaddress.IPv4Address:
    """The IPv4 address in the low 32 bits of ``value``."""
    return ipaddress.IPv4Address(value & 0xFFFF_FFFF)


def embedded_ipv4_addresses(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address carries to a translator or tunnel, by its prefix.

    IPv4-mapped, -translated and -compatible and the NAT64 well-known prefix carry it in the low
    32 bits. The NAT64 local-use prefix may be cut at /48, /56, /64 or /96 (RFC 6052 section 2.2)
    and the address does not say which: each position is read and each is judged. 6to4 carries
    it in bits 16-47; Teredo carries its server in bits 32-63 and the client, inverted, last.
    """
    value = int(ip)
    if any(ip in net for net in _CARRIERS_V6):
        return [_low32(value)]
    if ip in _COMPATIBLE:
        return [_low32(value)] if value > 1 else []  # :: and ::1 are not compatible addresses
    if ip in _NAT64_LOCAL:
        return [
            _low32((value >> 64 & 0xFFFF) << 16 | value >> 40 & 0xFFFF),  # /48
            _low32((value >> 64 & 0xFF) << 24 | value >> 32 & 0xFF_FFFF),  # /56
            _low32(value >> 24),  # /64
            _low32(value),  # /96
        ]
    if ip in _SIX_TO_FOUR:
        return [_low32(value >> 80)]
    if ip in _TEREDO:
        return [_low32(value >> 64), _low32(~value)]
    return []


def address_class(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """PUBLIC, PRIVATE or BLOCKED: the worst of the address and every IPv4 address it carries."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _ipv4_class(ip)
    verdicts = [_ipv6_own_class(ip)] + [_ipv4_class(v4) for v4 in embedded_ipv4_addresses(ip)]
    return max(verdicts, key=_SEVERITY.__getitem__)


# A hanging resolver must not hold a web thread: lookups run on daemon threads that the caller
# waits for only so long. Those still stuck when every slot is taken make new lookups fail fast.
_DNS_SLOTS = threading.BoundedSemaphore(16)
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")


def _resolve(host: str, port: int, timeout: float) -> list[str]:
    """The addresses ``host`` resolves to, waiting at most ``timeout`` seconds for DNS."""
    if not _DNS_SLOTS.acquire(blocking=False):
        raise HostNotResolved(f"the DNS lookup for {host!r} is still waiting; try again")
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def lookup() -> None:
        """Resolve on this thread; the caller may have stopped waiting."""
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            outcome["error"] = exc
        finally:
            _DNS_SLOTS.release()
            done.set()

    threading.Thread(target=lookup, name="mailslot-dns", daemon=True).start()
    if not done.wait(timeout):
        raise HostNotResolved(
            f"the DNS lookup for {host!r} took longer than {timeout:g} s; try again"
        )
    if "error" in outcome:
        raise HostNotResolved(f"the host {host!r} does not resolve")
    return list(dict.fromkeys(info[4][0] for info in outcome["infos"]))


def _literal_address(host: str, bracketed: bool) -> str | None:
    """The address a numeric host stands for, in any spelling inet_aton accepts; None for names."""
    if bracketed:
        if "%" in host:
            raise BlockedAddress("the webhook URL must not name an IPv6 zone (%)")
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise BlockedAddress(f"{host!r} is not a valid IPv6 address") from None
    try:
        return socket.inet_ntoa(socket.inet_aton(host.removesuffix(".")))
    except OSError:
        return None


@dataclass(frozen=True)
class WebhookTarget:
    """Where a checked webhook URL points: scheme, ASCII host name, port, path with query."""

    scheme: str
    host: str
    port: int
    path: str


def resolve_webhook_target(
    url: str, allow_private: bool, dns_timeout: float
) -> tuple[WebhookTarget, list[str]]:
    """Check a webhook URL and resolve it; every address it stands for must be allowed.

    The caller connects to one of the returned addresses and never resolves the name again,
    so a name that changes its answer after the check (DNS rebinding) cannot redirect it.
    Numeric hosts in every spelling (127.1, 0x7f.1, 2130706433, full-width digits) are parsed
    here, never looked up.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BlockedAddress(
            "the webhook URL is not a valid URL (check its host and port)"
        ) from None
    if parts.scheme not in ("http", "https"):
        raise BlockedAddress("only http:// and https:// webhook URLs are allowed")
    if "@" in parts.netloc or not parts.hostname:
        raise BlockedAddress("the webhook URL needs a host name and no user name or password")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    elif port == 0:
        raise BlockedAddress("the webhook URL has an invalid port")
    bracketed = parts.netloc.startswith("[")
    host = parts.hostname
    if not bracketed:
        try:
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise BlockedAddress(f"{parts.hostname!r} is not a valid host name") from None
        if not _HOST_NAME.fullmatch(host):
            raise BlockedAddress(f"{parts.hostname!r} is not a valid host name")
    name = host.removesuffix(".")
    if not allow_private and (name == "localhost" or name.endswith(".localhost")):
        raise BlockedAddress(f"{host!r} always means this machine (a loopback name)")  # RFC 6761
    literal = _literal_address(host, bracketed)
    addresses = [literal] if literal else _resolve(host, port, dns_timeout)
    if not addresses:
        raise HostNotResolved(f"the host {host!r} does not resolve")
    allowed = (PUBLIC, PRIVATE) if allow_private else (PUBLIC,)
    for address in addresses:
        if address_class(ipaddress.ip_address(address.split("%", 1)[0])) not in allowed:
            where = f"{address} is" if literal else f"the host {host!r} resolves to {address},"
            raise BlockedAddress(f"{where} a private or reserved address")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookTarget(parts.scheme, host, port, path), addresses


CHART_DAYS = 30


def submissions_per_day(form: dal.Row) -> list[dal.DayCount]:
    """The inbox chart's data: non-spam submissions per UTC day for CHART_DAYS days, oldest
    first, today last.

    The days before today come from the cache: they change only when the owner marks spam or
    deletes, or retention purges, and each of those forgets them. Today's count is read live
    (an index range of one day), so a new submission shows at once, as it does in the list.
    """
    today = dal.utcnow().date()

    def past_days() -> list[tuple[str, int]]:
        with dal.connection() as conn:
            counts = dal.daily_counts(conn, form.id, CHART_DAYS)
        return [(item.day.isoformat(), item.count) for item in counts[:-1]]

    past = dal.cached_json(_chart_key(form.id, today), dal.STATS_TTL, past_days)
    with dal.connection() as conn:
        live = dal.daily_counts(conn, form.id, 1)
    return [dal.DayCount(dt.date.fromisoformat(day), count) for day, count in past] + live


def _chart_key(form_id: int, today: dt.date) -> str:
    """The cache key of a form's chart before ``today`` (a new key each UTC day)."""
    return f"chart:{form_id}:{today.isoformat()}"


def _form_numbers_changed(form_id: int) -> None:
    """Forget a form's cached spam count and chart days (the owner's change must show at once)."""
    dal.drop_cached(f"stats:{form_id}")
    dal.drop_cached(_chart_key(form_id, dal.utcnow().date()))


# =================================================================================================
# API tokens and the JSON API
# =================================================================================================

API_TOKEN_PREFIX = "ms_live_"  # noqa: S105 - a public marker, not a secret
API_TOKEN_VISIBLE = 12  # "ms_live_" and four more characters: enough to tell tokens apart
API_TOKEN_TOUCH_EVERY = 60  # seconds between last_used_at writes for one token
API_PAGE_MAX = 100
_API_TOKEN_RE = re.compile(r"ms_live_[A-Za-z0-9_-]{43}")


class InvalidInput(ValueError):
    """Input of the right shape that breaks a rule; ``errors`` maps each key to its messages."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__(errors)
        self.errors = errors


class Conflict(Exception):
    """A valid request the thing's current state does not allow (for example a queued replay)."""


def hash_api_token(token: str) -> str:
    """What is stored for a token: the SHA-256 hex of the whole token."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_token(user_id: int, name: str) -> tuple[dal.Row, str]:
    """A new token for this owner: its stored row, and the token itself (shown once, never kept)."""
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    with dal.transaction() as conn:
        row = dal.insert_api_token(
            conn, user_id, name, token[:API_TOKEN_VISIBLE], hash_api_token(token)
        )
    log.info("api_token.created", user=user_id, token_id=row.id)
    return row, token


def list_api_tokens(user_id: int) -> list[dal.Row]:
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


def api_token_owner(token: str) -> dal.Row | None:
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
    result = dal.hit_limits([dal.Limit(f"api:{token_id}", count, seconds)])
    return result.retry_after if result.exceeded is not None else None


def _clean_form_value(key: str, value: Any, errors: dict[str, list[str]]) -> Any:
    """One form setting sent over the API, checked beyond its JSON shape; problems go to errors."""
    if key == "name":
        value = value.strip()
        if not value:
            errors[key] = ["Give the form a name."]
    elif key in ("redirect_url", "webhook_url"):
        value = (value or "").strip() or None
        if value is not None and not forms.is_http_url(value):
            errors[key] = ["Use a full http:// or https:// address."]
        elif value is not None and key == "webhook_url":
            problem = check_webhook_url(value)
            if problem:
                errors[key] = [f"This address cannot receive webhooks: {problem}."]
    elif key == "allowed_domains":
        hosts: list[str] = []
        for index, entry in enumerate(value):
            try:
                found = forms.parse_allowed_domains(entry) if "\n" not in entry else None
            except ValueError as exc:
                found, message = None, str(exc)
            else:
                message = "Write one host name, like example.com."
            if not found or len(found) != 1:
                errors[f"{key}.{index}"] = [message]
            elif found[0] not in hosts:
                hosts.append(found[0])
        value = hosts
    elif key == "honeypot_field" and value in forms.CONTROL_FIELDS:
        errors[key] = [f"'{value}' is already a control field. Choose another name, like _gotcha."]
    elif key == "fields":
        value, problems = forms.validate_field_specs(value)
        errors.update(problems)
    elif key in ("description", "thanks_message"):
        value = value.strip()
    elif key == "spam_rules":
        value = forms.spam_rules(
            value.get("blocked_words", []), value.get("blocked_email_domains", [])
        )
    return value


def clean_form_input(values: dict[str, Any], current: dal.Row | None = None) -> dict[str, Any]:
    """The API's form settings (only the keys sent) checked and normalised, or InvalidInput.

    ``current`` is the form being changed: what is not sent keeps its stored value, and the
    honeypot must not be the name of a field either way.
    """
    errors: dict[str, list[str]] = {}
    clean = {key: _clean_form_value(key, value, errors) for key, value in values.items()}
    if not errors:
        fields = clean.get("fields", current.fields if current is not None else [])
        honeypot = clean.get(
            "honeypot_field",
            current.honeypot_field if current is not None else forms.DEFAULT_HONEYPOT_FIELD,
        )
        key = "honeypot_field" if "honeypot_field" in clean else "fields"
        errors.update(honeypot_problems(fields, honeypot, key))
    if errors:
        raise InvalidInput(errors)
    return clean


def create_form_via_api(owner_id: int, values: dict[str, Any]) -> tuple[dal.Row, str | None]:
    """Create a form from API input; the form and, when it has a webhook, its signing secret."""
    clean = clean_form_input(values)
    secret = new_webhook_secret() if clean.get("webhook_url") else None
    if secret:
        clean["webhook_secret"] = secret
    return create_form(owner_id, clean), secret


def update_form_via_api(
    form: dal.Row, values: dict[str, Any], *, rotate_secret: bool = False
) -> tuple[dal.Row, str | None]:
    """Apply an API PATCH; the fresh form and the signing secret when one was made or rotated.

    Everything is checked before anything is written, and written in one transaction: a
    failure part-way leaves the form as it was.
    """
    clean = clean_form_input(values, form)
    webhook_url = clean.pop("webhook_url") if "webhook_url" in clean else form.webhook_url
    if rotate_secret and not webhook_url:
        raise Conflict("This form has no webhook. Set webhook_url to create one first.")
    fields = clean.pop("fields", None)
    if webhook_url != form.webhook_url:
        clean |= _webhook_values(form, webhook_url)
    if rotate_secret:
        clean["webhook_secret"] = new_webhook_secret()
    with dal.form_write(form.public_id) as conn:
        if clean:
            dal.update_form(conn, form.id, clean)
        if fields is not None and fields != form.fields:
            dal.bump_schema_version(conn, form.id, fields)
        _follow_webhook_change(conn, form, webhook_url)
    log.info("form.updated", form=form.public_id, via="api", changed=sorted(clean))
    fresh = owned_form(form.owner_id, form.public_id)
    changed = fresh.webhook_secret != form.webhook_secret
    return fresh, (fresh.webhook_secret if changed else None)


def owner_submission(owner_id: int, public_id: str) -> dal.Row:
    """A submission of any of the owner's forms (with ``form_public_id``), or NotFound."""
    with dal.connection() as conn:
        submission = dal.owned_submission(conn, owner_id, public_id)
    if submission is None:
        raise NotFound(public_id)
    return submission


def api_submission_page(
    form: dal.Row,
    *,
    before: int | None,
    limit: int,
    query: str = "",
    spam: bool | None = None,
    since: Any = None,
    until: Any = None,
) -> tuple[list[dal.Row], int | None]:
    """One page of a form's submissions, newest first, and the ``before`` id of the next page."""
    limit = max(1, min(limit, API_PAGE_MAX))
    with dal.connection() as conn:
        rows = dal.submission_page(
            conn,
            form.id,
            before=before,
            limit=limit + 1,
            query=query,
            spam=spam,
            since=since,
            until=until,
        )
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more else None)


def replay_owned_delivery(submission: dal.Row, delivery_id: int) -> dal.Row:
    """Replay a done or dead delivery of this submission and return it; NotFound or Conflict."""
    current = {d.id: d for d in submission_deliveries(submission)}
    delivery = current.get(delivery_id)
    if delivery is None:
        raise NotFound(str(delivery_id))
    if delivery.status == "held":
        raise Conflict(
            "This delivery is held because the submission is marked as spam. "
            "Mark it as not spam to send it."
        )
    if delivery.status not in ("done", "dead"):
        raise Conflict(
            f"This delivery is {delivery.status}; only done or dead deliveries can be replayed."
        )
    if not replay_delivery(submission, delivery_id):
        raise Conflict("This delivery was picked up in the meantime; try again in a moment.")
    latest = {d.id: d for d in submission_deliveries(submission)}
    return latest.get(delivery_id, delivery)


# =================================================================================================
# Retention and erasure
# =================================================================================================

PURGE_BATCH = 1000


def purge_expired(now: dt.datetime | None = None) -> int:
    """Delete submissions older than their form's retention period; safe to run any time."""
    now = now or dal.utcnow()
    total = 0
    with dal.connection() as conn:
        targets = dal.forms_with_retention(conn)
    for form in targets:
        cutoff = now - dt.timedelta(days=form.retention_days)
        while True:
            with dal.transaction() as conn:
                deleted = dal.purge_before(conn, form.id, cutoff, PURGE_BATCH)
            total += deleted
            if deleted < PURGE_BATCH:
                break
        _form_numbers_changed(form.id)
    if total:
        log.info("retention.purged", submissions=total)
    return total


def _mentions(value: Any, address: str) -> bool:
    """Whether a stored value holds the address (as a whole address, any letter case)."""
    if isinstance(value, str):
        pattern = r"(?<![\w.+-])" + re.escape(address) + r"(?![\w-]|\.[\w-])"
        return re.search(pattern, value, re.IGNORECASE) is not None
    if isinstance(value, dict):
        return any(_mentions(v, address) for v in value.values())
    if isinstance(value, list):
        return any(_mentions(v, address) for v in value)
    return False


def submissions_about(owner_id: int, email: str) -> list[int]:
    """Ids of the owner's submissions, across all forms, that contain this email address."""
    address = normalise_email(email)
    with dal.connection() as conn:
        return [
            row.id
            for row in dal.submissions_mentioning(conn, owner_id, address)
            if _mentions(row.data, address) or _mentions(row.meta, address)
        ]


def erase_person(owner_id: int, email: str) -> int:
    """Delete everything this owner holds about an email address; how many submissions."""
    ids = submissions_about(owner_id, email)
    with dal.transaction() as conn:
        deleted = dal.delete_submissions(conn, ids)
    for form in list_forms(owner_id) if deleted else []:
        _form_numbers_changed(form.id)
    log.info("erasure.done", owner=owner_id, submissions=deleted)
    return deleted


# =================================================================================================
# Health
# =================================================================================================


_UPGRADE = "run flask --app microapp upgrade-db"
_SCHEMA_READINESS = {
    "current": "ok",
    "empty": f"not initialised: {_UPGRADE}",
    "release-1": f"made by release 1: {_UPGRADE}",
    "behind": f"at revision {{revision}}, this code needs {{head}}: {_UPGRADE}",
    "newer": "at revision {revision}, newer than this code ({head}): run the matching release",
    "unrecognised": "not a database this code recognises: see flask --app microapp upgrade-db",
}


def readiness() -> dict[str, Any]:
    """Reachability of the database and Redis; degraded (still accepting) without Redis.

    ``warnings`` lists what an operator should fix that does not stop Mailslot working now,
    such as a broker Redis that may evict queued tasks.
    """
    report: dict[str, Any] = {"mode": current_settings().mode}
    try:
        with dal.connection() as conn:
            state = dal.schema_state(conn)
        report["database"] = _SCHEMA_READINESS[state.kind].format(
            revision=state.revision, head=dal.SCHEMA_REVISION
        )
    except SQLAlchemyError as exc:
        log.warning("readyz.database_unreachable", error=type(exc).__name__)
        report["database"] = "unreachable"
    report["redis"] = "ok" if dal.redis_reachable() else "unreachable"
    report["warnings"] = []
    if not current_settings().embedded:
        report["broker"] = "ok" if dal.redis_reachable(broker=True) else "unreachable"
        report["warnings"] = broker_warnings() if report["broker"] == "ok" else []
    if report["database"] != "ok":
        report["status"] = "down"
    elif report["redis"] != "ok" or report.get("broker", "ok") != "ok":
        report["status"] = "degraded"
    else:
        report["status"] = "ok"
    return report


def broker_warnings() -> list[str]:
    """What is wrong with the broker's Redis though it works: an eviction policy that can drop
    queued tasks. Empty in embedded mode, when all is well, or when Redis cannot be asked.

    Celery's queues are keys with no expiry. ``allkeys-*`` policies evict any key when memory
    runs out, queued tasks included, without an error; ``volatile-*`` ones evict only keys that
    expire (the cache's and limits'), and ``noeviction`` refuses writes, which the web process
    notices (the outbox rows then wait for the sweeper).
    """
    policy = dal.broker_eviction_policy()
    if policy is None or policy == "noeviction" or policy.startswith("volatile-"):
        return []
    return [
        f"The broker's Redis has maxmemory-policy {policy}: when it fills up it can drop queued "
        "tasks silently. Set maxmemory-policy noeviction on it, and give the cache and rate "
        "limits a Redis of their own with CACHE_REDIS_URL."
    ]


def log_broker_warnings() -> list[str]:
    """Log each broker warning (at start-up: serve and the worker); the warnings."""
    warnings = broker_warnings()
    for warning in warnings:
        log.warning("broker.redis_warning", warning=warning)
    return warnings

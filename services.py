"""Mailslot's business rules for the owner's forms: creating and changing them (fields,
webhook settings), the inbox and its numbers, submissions, exports, deliveries (replay, dead),
the install snippets' data, the JSON API's form helpers, retention and erasure, and readiness.

Accounts live in ``users`` and the submission path in ``intake``. Nothing here touches
``request`` or ``session`` or renders a page; views pass plain values in and get records back.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import re
import secrets
from collections.abc import Iterator
from typing import Any

import structlog

import cache
import dal
import delivery
import migrate
import records
import tasks
import users
import validation
from links import external_url
from settings import current_settings

log = structlog.get_logger("mailslot.services")


# =================================================================================================
# Forms (the owner's side)
# =================================================================================================


class NotFound(LookupError):
    """The thing does not exist, or belongs to someone else: both answer 404."""


def list_forms(owner_id: int) -> list[records.FormWithCounts]:
    """The owner's forms with their submission counts and newest submission time."""
    with dal.connection() as conn:
        return dal.forms_with_counts(conn, owner_id)


def owned_form(owner_id: int, public_id: str) -> records.Form:
    """The owner's form, or NotFound whether it is missing or someone else's."""
    with dal.connection() as conn:
        form = dal.owned_form(conn, owner_id, public_id)
    if form is None:
        raise NotFound(public_id)
    return form


def create_form(owner_id: int, values: dict[str, Any]) -> records.Form:
    """Create a form from cleaned settings values."""
    with dal.transaction() as conn:
        form = dal.insert_form(conn, owner_id, dal.new_public_id(), values)
    log.info("form.created", form=form.public_id)
    return form


def honeypot_problems(
    fields: list[dict[str, Any]] | None, honeypot: str, key: str
) -> dict[str, list[str]]:
    """The honeypot must not be one of the form's fields: ``{key: [why]}`` when it is, else {}."""
    clash = validation.honeypot_clash(fields or [], honeypot)
    return {key: [clash]} if clash else {}


def update_form_settings(form: records.Form, values: dict[str, Any]) -> None:
    """Save a form's settings; InvalidInput (on honeypot_field) when the honeypot is a field."""
    honeypot = values.get("honeypot_field", form.honeypot_field)
    problems = honeypot_problems(form.fields, honeypot, "honeypot_field")
    if problems:
        raise InvalidInput(problems)
    with cache.form_write(form.public_id) as conn:
        dal.update_form(conn, form.id, values)
    log.info("form.updated", form=form.public_id)


def save_fields(form: records.Form, specs: list[dict[str, Any]]) -> None:
    """Store a new field schema; its version goes up so old submissions keep their meaning.
    InvalidInput (on ``_form``) when one of the fields is named like the honeypot."""
    problems = honeypot_problems(specs, form.honeypot_field, "_form")
    if problems:
        raise InvalidInput(problems)
    with cache.form_write(form.public_id) as conn:
        dal.bump_schema_version(conn, form.id, specs)
    log.info("form.fields_saved", form=form.public_id, fields=len(specs))


def delete_form(form: records.Form) -> None:
    """Remove a form and everything stored for it."""
    with cache.form_write(form.public_id) as conn:
        dal.delete_form(conn, form.id)
    log.info("form.deleted", form=form.public_id)


INBOX_PAGE_SIZE = 50


def inbox_page(
    form: records.Form, *, before: int | None, query: str, spam: bool
) -> tuple[list[records.Submission], int | None]:
    """One page of the inbox, newest first, and the ``before`` cursor of the next page."""
    with dal.connection() as conn:
        rows = dal.submission_page(
            conn, form.id, before=before, limit=INBOX_PAGE_SIZE + 1, query=query, spam=spam
        )
    more = len(rows) > INBOX_PAGE_SIZE
    rows = rows[:INBOX_PAGE_SIZE]
    return rows, (rows[-1].id if more else None)


def owned_submission(form: records.Form, public_id: str) -> records.Submission:
    """A submission of this (already owned) form, or NotFound."""
    with dal.connection() as conn:
        submission = dal.submission_in_form(conn, form.id, public_id)
    if submission is None:
        raise NotFound(public_id)
    return submission


def submission_deliveries(submission: records.Submission) -> list[records.Delivery]:
    """The delivery log of one submission."""
    with dal.connection() as conn:
        return dal.deliveries_for(conn, submission.id)


def mark_spam(submission: records.Submission, is_spam: bool) -> None:
    """The owner's verdict on a submission."""
    reason = "marked as spam by the owner" if is_spam else None
    with dal.transaction() as conn:
        dal.set_spam(conn, submission.id, is_spam, reason)
        released = [] if is_spam else dal.release_spam_deliveries(conn, submission.id)
    cache.forget_form_numbers(submission.form_id)
    log.info("submission.marked", submission=submission.public_id, spam=is_spam)
    tasks.dispatch_deliveries([(delivery_id, 0) for delivery_id in released])  # never attempted


def delete_submission(submission: records.Submission) -> None:
    """Remove one submission."""
    with dal.transaction() as conn:
        dal.delete_submission(conn, submission.id)
    cache.forget_form_numbers(submission.form_id)
    log.info("submission.deleted", submission=submission.public_id)


def endpoint_url(form: records.Form) -> str:
    """The address a website's form posts to."""
    return external_url("public.submit", public_id=form.public_id)


def install_data(form: records.Form) -> dict[str, Any]:
    """What the install panel's snippets are made of: the address a form posts to, the hosted
    page's, the fields (the default ones for an empty schema), and the honeypot's name."""
    return {
        "action": endpoint_url(form),
        "hosted": external_url("public.hosted_page", public_id=form.public_id),
        "fields": list(form.fields or validation.DEFAULT_FIELDS),
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


def _export_columns(form: records.Form) -> list[str]:
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


def export_csv(form: records.Form) -> Iterator[str]:
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


def export_json(form: records.Form) -> Iterator[str]:
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
# Deliveries and webhooks (the owner's side; sending lives in delivery.py)
# =================================================================================================


def replay_delivery(submission: records.Submission, delivery_id: int) -> bool:
    """Send a done or dead delivery of this submission again; False if there is none to replay."""
    with dal.transaction() as conn:
        row = next(
            (d for d in dal.deliveries_for(conn, submission.id) if d.id == delivery_id), None
        )
        replayed = row is not None and dal.requeue_delivery(conn, delivery_id)
    if replayed:
        log.info("delivery.replayed", submission=submission.public_id, delivery_id=delivery_id)
        tasks.dispatch_deliveries([(delivery_id, row.attempts)])
    return replayed


def dead_deliveries(form: records.Form) -> list[records.DeadDelivery]:
    """The form's deliveries that ran out of attempts."""
    with dal.connection() as conn:
        return dal.dead_deliveries(conn, form.id)


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: whsec_ + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_webhook_url(url: str) -> str | None:
    """Why this URL cannot be a webhook target, or None when it can."""
    try:
        delivery.resolve_webhook_target(
            url,
            current_settings().webhook_allow_private,
            dns_timeout=current_settings().webhook_dns_timeout,
        )
    except delivery.BlockedAddress as exc:
        return str(exc)
    return None


def set_webhook(form: records.Form, url: str | None) -> str | None:
    """Set or remove the form's webhook; the new signing secret when a first URL made one.

    Deliveries still to send follow the change: they go to the new URL, or, when the webhook is
    removed, they are cancelled (dead, with delivery.WEBHOOK_REMOVED as their error, and
    replayable).
    """
    values = _webhook_values(form, url)
    with cache.form_write(form.public_id) as conn:
        dal.update_form(conn, form.id, values)
        _follow_webhook_change(conn, form, values["webhook_url"])
    log.info("form.webhook_set", form=form.public_id, enabled=bool(url))
    return values.get("webhook_secret")


def _webhook_values(form: records.Form, url: str | None) -> dict[str, Any]:
    """The columns that set or remove a webhook: a first URL comes with a signing secret."""
    values: dict[str, Any] = {"webhook_url": url or None}
    if url and not form.webhook_secret:
        values["webhook_secret"] = new_webhook_secret()
    return values


def _follow_webhook_change(conn: Any, form: records.Form, url: str | None) -> None:
    """Point the form's unsent webhook deliveries at ``url``, or cancel them when it is None."""
    if url == form.webhook_url:
        return
    if url is None:
        dal.cancel_webhook_deliveries(conn, form.id, delivery.WEBHOOK_REMOVED)
    else:
        dal.retarget_webhook_deliveries(conn, form.id, url)


def rotate_webhook_secret(form: records.Form) -> str:
    """Replace the signing secret and return it; the receiver must be given the new one."""
    secret = new_webhook_secret()
    with cache.form_write(form.public_id) as conn:
        dal.update_form(conn, form.id, {"webhook_secret": secret})
    log.info("form.webhook_secret_rotated", form=form.public_id)
    return secret


def reveal_webhook_secret(form: records.Form) -> str | None:
    """The form's signing secret, to show its owner once more (logged, the secret never is)."""
    if form.webhook_secret:
        log.info("form.webhook_secret_revealed", form=form.public_id)
    return form.webhook_secret


def masked_secret(secret: str) -> str:
    """A signing secret as the settings page shows it: enough to tell two apart, no more."""
    return f"whsec_…{secret[-4:]}"


def send_test_event(form: records.Form) -> str:
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
        status, _ = delivery.post_webhook(
            form.webhook_url,
            form.webhook_secret,
            f"msg_test_{dal.new_public_id()}",
            body,
            timeouts=(timeout, timeout),
        )
    except (delivery.PermanentFailure, delivery.TemporaryFailure) as exc:
        return f"The test event failed: {exc}."
    if 200 <= status < 300:
        return f"The receiver answered {status}: the webhook works."
    return f"The receiver answered {status}; only 2xx answers count as delivered."


# =================================================================================================
# The inbox's numbers: the stats block and the chart
# =================================================================================================

CHART_DAYS = 30


def submissions_per_day(form: records.Form) -> list[records.DayCount]:
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

    past = cache.cached_json(cache.chart_name(form.id, today), cache.STATS_TTL, past_days)
    with dal.connection() as conn:
        live = dal.daily_counts(conn, form.id, 1)
    return [records.DayCount(dt.date.fromisoformat(day), count) for day, count in past] + live


def inbox_numbers(form: Any) -> tuple[dict[str, int], list[records.DayCount]]:
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
        "spam": cache.cached_json(cache.spam_count_name(form.id), cache.STATS_TTL, spam),
        "honeypot": cache.read_counter(f"form:{form.id}:honeypot"),
    }
    return stats, per_day


# =================================================================================================
# The JSON API's form helpers
# =================================================================================================

API_PAGE_MAX = 100


class InvalidInput(ValueError):
    """Input of the right shape that breaks a rule; ``errors`` maps each key to its messages."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__(errors)
        self.errors = errors


class Conflict(Exception):
    """A valid request the thing's current state does not allow (for example a queued replay)."""


def _clean_form_value(key: str, value: Any, errors: dict[str, list[str]]) -> Any:
    """One form setting sent over the API, checked beyond its JSON shape; problems go to errors."""
    if key == "name":
        value = value.strip()
        if not value:
            errors[key] = ["Give the form a name."]
    elif key in ("redirect_url", "webhook_url"):
        value = (value or "").strip() or None
        if value is not None and not validation.is_http_url(value):
            errors[key] = ["Use a full http:// or https:// address."]
        elif value is not None and key == "webhook_url":
            problem = check_webhook_url(value)
            if problem:
                errors[key] = [f"This address cannot receive webhooks: {problem}."]
    elif key == "allowed_domains":
        hosts: list[str] = []
        for index, entry in enumerate(value):
            try:
                found = validation.parse_allowed_domains(entry) if "\n" not in entry else None
            except ValueError as exc:
                found, message = None, str(exc)
            else:
                message = "Write one host name, like example.com."
            if not found or len(found) != 1:
                errors[f"{key}.{index}"] = [message]
            elif found[0] not in hosts:
                hosts.append(found[0])
        value = hosts
    elif key == "honeypot_field" and value in validation.CONTROL_FIELDS:
        errors[key] = [f"'{value}' is already a control field. Choose another name, like _gotcha."]
    elif key == "fields":
        value, problems = validation.validate_field_specs(value)
        errors.update(problems)
    elif key in ("description", "thanks_message"):
        value = value.strip()
    elif key == "spam_rules":
        value = validation.spam_rules(
            value.get("blocked_words", []), value.get("blocked_email_domains", [])
        )
    return value


def clean_form_input(values: dict[str, Any], current: records.Form | None = None) -> dict[str, Any]:
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
            current.honeypot_field if current is not None else validation.DEFAULT_HONEYPOT_FIELD,
        )
        key = "honeypot_field" if "honeypot_field" in clean else "fields"
        errors.update(honeypot_problems(fields, honeypot, key))
    if errors:
        raise InvalidInput(errors)
    return clean


def create_form_via_api(owner_id: int, values: dict[str, Any]) -> tuple[records.Form, str | None]:
    """Create a form from API input; the form and, when it has a webhook, its signing secret."""
    clean = clean_form_input(values)
    secret = new_webhook_secret() if clean.get("webhook_url") else None
    if secret:
        clean["webhook_secret"] = secret
    return create_form(owner_id, clean), secret


def update_form_via_api(
    form: records.Form, values: dict[str, Any], *, rotate_secret: bool = False
) -> tuple[records.Form, str | None]:
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
    with cache.form_write(form.public_id) as conn:
        if clean:
            dal.update_form(conn, form.id, clean)
        if fields is not None and fields != form.fields:
            dal.bump_schema_version(conn, form.id, fields)
        _follow_webhook_change(conn, form, webhook_url)
    log.info("form.updated", form=form.public_id, via="api", changed=sorted(clean))
    fresh = owned_form(form.owner_id, form.public_id)
    changed = fresh.webhook_secret != form.webhook_secret
    return fresh, (fresh.webhook_secret if changed else None)


def owner_submission(owner_id: int, public_id: str) -> records.SubmissionWithForm:
    """A submission of any of the owner's forms (with ``form_public_id``), or NotFound."""
    with dal.connection() as conn:
        submission = dal.owned_submission(conn, owner_id, public_id)
    if submission is None:
        raise NotFound(public_id)
    return submission


def api_submission_page(
    form: records.Form,
    *,
    before: int | None,
    limit: int,
    query: str = "",
    spam: bool | None = None,
    since: Any = None,
    until: Any = None,
) -> tuple[list[records.Submission], int | None]:
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


def replay_owned_delivery(submission: records.Submission, delivery_id: int) -> records.Delivery:
    """Replay a done or dead delivery of this submission and return it; NotFound or Conflict."""
    current = {d.id: d for d in submission_deliveries(submission)}
    found = current.get(delivery_id)
    if found is None:
        raise NotFound(str(delivery_id))
    if found.status == "held":
        raise Conflict(
            "This delivery is held because the submission is marked as spam. "
            "Mark it as not spam to send it."
        )
    if found.status not in ("done", "dead"):
        raise Conflict(
            f"This delivery is {found.status}; only done or dead deliveries can be replayed."
        )
    if not replay_delivery(submission, delivery_id):
        raise Conflict("This delivery was picked up in the meantime; try again in a moment.")
    latest = {d.id: d for d in submission_deliveries(submission)}
    return latest.get(delivery_id, found)


# =================================================================================================
# Retention and erasure
# =================================================================================================


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
    address = users.normalise_email(email)
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
        cache.forget_form_numbers(form.id)
    log.info("erasure.done", owner=owner_id, submissions=deleted)
    return deleted


# =================================================================================================
# Health
# =================================================================================================


def readiness() -> dict[str, Any]:
    """Reachability of the database and Redis; degraded (still accepting) without Redis.

    ``warnings`` lists what an operator should fix that does not stop Mailslot working now,
    such as a broker Redis that may evict queued tasks.
    """
    report: dict[str, Any] = {"mode": current_settings().mode}
    try:
        with dal.connection() as conn:
            state = migrate.schema_state(conn)
        report["database"] = migrate.readiness_text(state)
    except dal.DatabaseError as exc:
        log.warning("readyz.database_unreachable", error=type(exc).__name__)
        report["database"] = "unreachable"
    report["redis"] = "ok" if cache.redis_reachable() else "unreachable"
    report["warnings"] = []
    if not current_settings().embedded:
        report["broker"] = "ok" if cache.redis_reachable(broker=True) else "unreachable"
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
    policy = cache.broker_eviction_policy()
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

"""Mailslot's submission path: the public form lookup, which sites may post and where people
are sent afterwards (origin, CORS, redirect rules), rate limits, spam scoring and the hosted
page's render stamps, storing a submission with its outbox rows, and dispatching them after the
commit.

The view hands over an ``IntakeRequest`` of plain values and gets an ``IntakeResult`` back, or
FormUnavailable. Nothing here touches ``request`` or ``session`` or renders a page.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from flask import current_app
from itsdangerous import BadData, URLSafeTimedSerializer

import cache
import dal
import records
import tasks
import validation
from links import external_url
from settings import current_settings

log = structlog.get_logger("mailslot.intake")

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

    form: records.PublicForm
    outcome: str  # "stored", "honeypot", "invalid"
    submission_id: str = ""
    errors: dict[str, list[str]] = field(default_factory=dict)
    redirect_to: str = ""
    delivery_ids: list[int] = field(default_factory=list)


def public_form(public_id: str) -> records.PublicForm:
    """A form by public id for the public side, through the Redis cache."""
    return _available(cache.public_form(public_id))


def _available(form: records.PublicForm | None) -> records.PublicForm:
    """The form, or the 404 every public route gives for an unknown id."""
    if form is None:
        raise FormUnavailable(404, "There is no form at this address. Check the form's action URL.")
    return form


def _on_trusted_site(form: records.PublicForm, url: validation.WebUrl, *, exact_port: bool) -> bool:
    """Whether ``url`` is on Mailslot's own site or on one of the form's allowed domains.

    An allowed entry that names a port matches that port only. One that names none matches
    any port of its host for the site a post comes from (``exact_port`` False), and only the
    scheme's default port for where a browser is sent (``exact_port`` True).
    """
    own = validation.parse_web_url(current_settings().base_url)
    if own is not None and (url.host, url.port) == (own.host, own.port):
        return True
    for entry in form.allowed_domains or []:
        name, _, port = entry.partition(":")
        if name != url.host:
            continue
        if port:
            if port.isdigit() and int(port) == url.port:
                return True
        elif not exact_port or url.port == validation.DEFAULT_PORTS[url.scheme]:
            return True
    return False


def origin_allowed(form: records.PublicForm, origin: str | None, referrer: str | None) -> bool:
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
    url = validation.parse_web_url(claimed)
    return url is not None and _on_trusted_site(form, url, exact_port=False)


def cors_origin(form: records.PublicForm | None, origin: str | None) -> str | None:
    """The Access-Control-Allow-Origin value for this origin, or None to send none."""
    if form is None or not form.allowed_domains:
        return "*"
    url = validation.parse_web_url(origin)
    if url is not None and _on_trusted_site(form, url, exact_port=False):
        return origin
    return None


def safe_redirect(form: records.PublicForm, next_url: Any, posted_from: str | None) -> str | None:
    """``_next`` resolved against the posting page, if it stays on a site this form trusts.

    The answer is the URL as parsed and checked (see ``validation.parse_web_url``), never the text
    as sent; anything that does not parse is None, and the caller's default applies.
    """
    page = validation.parse_web_url(posted_from)
    target = validation.parse_web_url(
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
    subject = validation.one_line(_control_value(values, "_subject"))
    if subject:
        meta["subject"] = subject[:STORED_SUBJECT_MAX_LENGTH]
    reply_to = validation.one_line(_control_value(values, "_replyto"))
    if reply_to and len(reply_to) <= validation.EMAIL_ADDRESS_MAX_LENGTH:
        meta["reply_to"] = reply_to
    return meta


def record_submission(req: IntakeRequest) -> IntakeResult:
    """Intake: find the form, check it accepts this post, trap bots, validate, store, enqueue.

    Before the database write Redis is used once with a warm cache (the cached form, the rate
    limits and the velocity counter in one pipeline) and twice on a miss (the cache fill).
    """
    ip_hash = hash_ip(req.client_ip)
    form, limits = cache.intake_lookup(
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
    values = validation.decode_fields(payload.values)
    posted_from = req.referrer if not req.hosted else None
    redirect_to = (
        safe_redirect(form, _control_value(values, "_next"), posted_from)
        or form.redirect_url
        or external_url("public.thanks", public_id=form.public_id)
    )
    if _control_value(values, form.honeypot_field):
        cache.bump_counter(f"form:{form.id}:honeypot")
        log.info("submission.honeypot", form=form.public_id)
        return IntakeResult(form, "honeypot", dal.new_public_id(), redirect_to=redirect_to)

    data = {
        key: value
        for key, value in values.items()
        if not key.startswith("_") and key != form.honeypot_field and key != "csrf_token"
    }
    schema = form.fields or (validation.DEFAULT_FIELDS if req.hosted else [])
    conf = current_settings()
    clean, errors = validation.validate_submission(
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
                "public_id": dal.new_public_id(),
                "form_id": form.id,
                "data": clean,
                "schema_version": form.schema_version,
                "is_spam": is_spam,
                "spam_reason": "; ".join(text for _, text in reasons) or None,
                "ip_hash": ip_hash,
                "user_agent": (validation.one_line(req.user_agent) or "")[:512] or None,
                "referrer": (validation.one_line(req.referrer) or "")[:2000] or None,
                "meta": _submission_meta(values),
            },
        )
        delivery_ids = _queue_deliveries(conn, form, submission, held=is_spam)
    log.info(
        "submission.stored", form=form.public_id, submission=submission.public_id, spam=is_spam
    )
    if not is_spam:
        tasks.dispatch_deliveries([(delivery_id, 0) for delivery_id in delivery_ids])
    return IntakeResult(
        form,
        "stored",
        submission.public_id,
        redirect_to=redirect_to,
        delivery_ids=delivery_ids,
    )


def _queue_deliveries(
    conn: Any, form: records.PublicForm, submission: records.Submission, *, held: bool
) -> list[int]:
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


# =================================================================================================
# Rate limits and spam scoring (no third party sees the data)
# =================================================================================================

VELOCITY_WINDOW = 600
_URL_PATTERN = re.compile(r"https?://|www\.", re.IGNORECASE)


def submission_limits(public_id: str, ip_hash: str | None) -> list[cache.Limit]:
    """Per client IP per form (a minute and an hour) and per form overall (an hour)."""
    conf = current_settings()
    if not conf.rate_limits_enabled:
        return []
    limits = [cache.Limit(f"form:{public_id}", conf.submit_limit_per_form_hour, 3600)]
    if ip_hash:
        limits += [
            cache.Limit(f"ip:{ip_hash}:{public_id}:m", conf.submit_limit_per_ip_minute, 60),
            cache.Limit(f"ip:{ip_hash}:{public_id}:h", conf.submit_limit_per_ip_hour, 3600),
        ]
    return limits


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

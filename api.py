"""Blueprint ``api``: the JSON API v1 under /api/v1 — bearer-token authentication and the
per-token limit, MethodView resources, reading JSON bodies and query strings with the wire
models, and the API's one error envelope ``{"error": {"code", "message", "fields"}}``.

The wire models, the operation registry and the OpenAPI document live in ``openapi`` (imported
here, never the other way). Resources must not hold rules, SQL or Redis: they call ``services``.
It imports nothing from microapp; microapp registers the ``api`` blueprint.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
from typing import Any

import structlog
from flask import Blueprint, current_app, g, jsonify, request
from flask.views import MethodView
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

import records
import services
import users
import validation
from links import external_url
from openapi import (
    CURSOR_PATTERN,
    FIELD_NAME_PATTERN,
    HONEYPOT_PATTERN,
    HOST_PATTERN,
    NOT_BLANK,
    ONE_LINE,
    OPTIONAL_URL_PATTERN,
    PUBLIC_ID_PATTERN,
    DeliveryList,
    DeliveryOut,
    FormCreate,
    FormList,
    FormOut,
    FormUpdate,
    FormWithSecret,
    MeOut,
    SpamRules,
    SubmissionOut,
    SubmissionPage,
    SubmissionQuery,
    SubmissionUpdate,
    TokenOut,
    api_resource,
    api_url,
    openapi_document,
    operation,
)
from settings import current_settings
from web import csrf

log = structlog.get_logger("mailslot.api")

# =================================================================================================
# Blueprint: api (/api/v1)
# =================================================================================================

api = Blueprint("api", __name__, url_prefix="/api/v1")
csrf.exempt(api)  # bearer tokens only: the API never reads the session cookie


_PUBLIC_ID = re.compile(PUBLIC_ID_PATTERN)

# --- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """An API refusal, answered as ``{"error": {"code", "message", "fields"}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: dict[str, list[str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or {}
        self.headers = headers or {}


@api.errorhandler(ApiError)
def _api_error(exc: ApiError) -> Any:
    """The one error shape of the API."""
    response = jsonify(error={"code": exc.code, "message": exc.message, "fields": exc.fields})
    response.status_code = exc.status
    response.headers.update(exc.headers)
    return response


@api.errorhandler(RequestEntityTooLarge)
def _api_body_too_large(exc: RequestEntityTooLarge) -> Any:
    """A body over MAX_CONTENT_LENGTH."""
    limit = current_settings().max_content_length
    return _api_error(ApiError(413, "body_too_large", f"Send at most {limit} bytes."))


@api.errorhandler(services.InvalidInput)
def _api_invalid_input(exc: services.InvalidInput) -> Any:
    """Input of the right shape that breaks a rule: 422 naming each field."""
    return _api_error(ApiError(422, "invalid", "Some values need fixing; see fields.", exc.errors))


@api.errorhandler(services.Conflict)
def _api_conflict(exc: services.Conflict) -> Any:
    """A request the object's current state does not allow."""
    return _api_error(ApiError(409, "conflict", str(exc)))


# --- authentication, the per-token limit, and reading requests ------------------------------------

_OPEN_ENDPOINTS = frozenset({"api.api_root", "api.openapi_json"})


@api.before_request
def _authenticate() -> None:
    """Every resource needs ``Authorization: Bearer <token>``; never the session cookie."""
    if request.endpoint in _OPEN_ENDPOINTS:
        return
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    token = users.api_token_owner(credentials.strip()) if scheme.lower() == "bearer" else None
    if token is None:
        challenge = 'Bearer realm="mailslot"'
        if credentials:
            challenge += ', error="invalid_token"'
        raise ApiError(
            401,
            "unauthorized",
            "Send a valid API token as 'Authorization: Bearer <token>'. "
            "Create one on your account's API tokens page.",
            headers={"WWW-Authenticate": challenge},
        )
    retry_after = users.api_rate_limit(token.id)
    if retry_after is not None:
        raise ApiError(
            429,
            "rate_limited",
            f"This token made too many requests; try again in {retry_after} seconds.",
            headers={"Retry-After": str(retry_after)},
        )
    g.api_token = token


def _owner_id() -> int:
    """The id of the owner whose token made this request."""
    return g.api_token.user_id


_MESSAGES_BY_PATTERN = {
    FIELD_NAME_PATTERN: validation.MSG_FIELD_NAME,
    HONEYPOT_PATTERN: "Use letters, digits, _ and - (start with a letter or _).",
    NOT_BLANK: "Give the form a name.",
    ONE_LINE: "Write one rule a line, not an empty one.",
    OPTIONAL_URL_PATTERN: "Use a full http:// or https:// address, without a user name or "
    "password, with an ASCII host name (international names in their xn-- form).",
    HOST_PATTERN: "This is not a host name. Write one host, like example.com or localhost:8080.",
    CURSOR_PATTERN: "This cursor is not valid. Start again without one.",
}


def _message(error: Any) -> str:
    """One pydantic error in the words the rest of Mailslot uses."""
    kind = error["type"]
    if kind == "missing":
        return "This field is required."
    if kind == "extra_forbidden":
        return "There is no such field."
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "Send a JSON object."
    if kind == "string_pattern_mismatch":
        if "\x00" in error["input"]:
            return "Remove NUL characters from this text."
        return _MESSAGES_BY_PATTERN.get(error["ctx"]["pattern"], "This value has the wrong format.")
    if kind == "string_too_short" and error["ctx"].get("min_length") == 1:
        return "This cannot be empty."
    return str(error["msg"]).removeprefix("Value error, ")


def _validate(model: type[Any], data: Any) -> Any:
    """Validate with a wire model; 422 with a message per dotted field path."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields: dict[str, list[str]] = {}
        for error in exc.errors(include_url=False):
            key = ".".join(str(part) for part in error["loc"]) or "_body"
            fields.setdefault(key, []).append(_message(error))
        raise ApiError(422, "invalid", "Some values need fixing; see fields.", fields) from None


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


def _json_body(model: type[Any]) -> Any:
    """The request's JSON body validated with ``model``: 415, 413, 400 or 422 otherwise."""
    if not request.is_json:
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send the body as JSON with 'Content-Type: application/json'.",
        )
    raw = request.get_data(cache=True)
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "The body is not valid JSON.") from None
    return _validate(model, data)


_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:[.]([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)
_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,18}(?:[.]0+)?")  # 2.0 is an integer in JSON Schema
_GREGORIAN_CYCLE = dt.timedelta(days=146_097)  # 400 years: the calendar repeats after them
_START_OF_TIME = dt.datetime.min.replace(tzinfo=dt.UTC)
_END_OF_TIME = dt.datetime.max.replace(tzinfo=dt.UTC)


def parse_rfc3339(text: str) -> dt.datetime | None:
    """An RFC 3339 date-time (JSON Schema's ``date-time``) as an aware UTC datetime, else None.

    Every value the format admits is read: any number of fraction digits (kept to the
    microsecond), a leap second when it falls at 23:59:60 UTC, and moments outside the years
    1-9999 in UTC (year 0000, or year 1 with a positive offset), which become the first or last
    moment Python can hold: a filter's bound then lets everything or nothing through.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, off_hours, off_minutes = match.groups()
    if int(second) > 60 or (sign and (int(off_hours) > 23 or int(off_minutes) > 59)):
        return None
    early = int(year) < 400  # year 0 exists in RFC 3339, not in Python: count from 400 years on
    try:
        local = dt.datetime(
            int(year) + 400 * early,
            int(month),
            int(day),
            int(hour),
            int(minute),
            min(int(second), 59),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=dt.UTC,
        )
    except ValueError:
        return None
    offset = int(off_hours or 0) * 60 + int(off_minutes or 0)
    offset = -offset if sign == "-" else offset
    leap = second == "60"
    if leap and (int(hour) * 60 + int(minute) - offset) % 1440 != 23 * 60 + 59:
        return None  # a leap second is the last second of a UTC day
    try:
        moment = local - dt.timedelta(minutes=offset) + dt.timedelta(seconds=int(leap))
        return moment - _GREGORIAN_CYCLE if early else moment
    except OverflowError:
        return _START_OF_TIME if early else _END_OF_TIME


def _query_value(name: str, text: str) -> Any:
    """A query-string value typed for the strict model; what does not parse stays text."""
    if name == "limit" and _WHOLE_NUMBER.fullmatch(text):
        return int(text.partition(".")[0])
    if name == "spam" and text in ("true", "false"):
        return text == "true"
    if name in ("since", "until"):
        return parse_rfc3339(text) or text
    return text


def _query(model: type[Any]) -> Any:
    """The query string validated with ``model`` (unknown parameters are ignored)."""
    known = model.model_fields
    raw = {name: _query_value(name, value) for name, value in request.args.items() if name in known}
    return _validate(model, raw)


# A cursor is "the page before submission id N" in 9 bytes: any 12 base64url characters decode to
# 9 bytes, so every value of CURSOR_PATTERN is a position. The mask only keeps clients from
# reading ids into it; a position past every id either database can hold is the first page.
_CURSOR_MASK = int.from_bytes(hashlib.sha256(b"mailslot submission cursor").digest()[:9])
_LAST_POSITION = 2**63 - 1


def encode_cursor(before: int | None) -> str | None:
    """The cursor of the page after the submission ``before`` (None: there is none)."""
    if before is None:
        return None
    return base64.urlsafe_b64encode((before ^ _CURSOR_MASK).to_bytes(9)).decode()


def decode_cursor(cursor: str) -> int:
    """The submission id a cursor (of CURSOR_PATTERN) points before."""
    return min(int.from_bytes(base64.urlsafe_b64decode(cursor)) ^ _CURSOR_MASK, _LAST_POSITION)


def _api_form(form_id: str) -> records.Form:
    """The token owner's form, or 404 (also for someone else's)."""
    try:
        if _PUBLIC_ID.fullmatch(form_id):
            return services.owned_form(_owner_id(), form_id)
    except services.NotFound:
        pass
    raise ApiError(404, "not_found", "You have no form with this id.")


def _api_submission(submission_id: str) -> records.SubmissionWithForm:
    """A submission of one of the token owner's forms, or 404."""
    try:
        if _PUBLIC_ID.fullmatch(submission_id):
            return services.owner_submission(_owner_id(), submission_id)
    except services.NotFound:
        pass
    raise ApiError(404, "not_found", "You have no submission with this id.")


def _answer(model: BaseModel, status: int = 200) -> Any:
    """A JSON answer from a wire model."""
    response = jsonify(model.model_dump(mode="json"))
    response.status_code = status
    return response


def _no_content() -> Any:
    """204 with an empty body."""
    response = current_app.response_class(status=204)
    response.headers.pop("Content-Type", None)
    return response


def _form_values(form: Any) -> dict[str, Any]:
    """A stored form as FormOut's keyword arguments."""
    url = services.endpoint_url(form)
    return {
        "id": form.public_id,
        "name": form.name,
        "status": form.status,
        "fields": [validation.normalise_field_spec(spec) for spec in form.fields or []],
        "schema_version": form.schema_version,
        "strict": form.strict,
        "redirect_url": form.redirect_url,
        "allowed_domains": form.allowed_domains or [],
        "honeypot_field": form.honeypot_field,
        "notify": form.notify,
        "webhook_url": form.webhook_url,
        "retention_days": form.retention_days,
        "spam_rules": SpamRules(
            blocked_words=(form.spam_rules or {}).get("words", []),
            blocked_email_domains=(form.spam_rules or {}).get("email_domains", []),
        ),
        "description": form.description or "",
        "thanks_message": form.thanks_message or "",
        "show_branding": form.show_branding,
        "endpoint_url": url,
        "hosted_url": url,
        "created_at": form.created_at,
        "updated_at": form.updated_at,
    }


def _submission_out(row: Any, form_public_id: str) -> SubmissionOut:
    """A stored submission on the wire."""
    meta = row.meta or {}
    return SubmissionOut(
        id=row.public_id,
        form_id=form_public_id,
        created_at=row.created_at,
        data=row.data,
        schema_version=row.schema_version,
        is_spam=row.is_spam,
        spam_reason=row.spam_reason,
        subject=meta.get("subject"),
        reply_to=meta.get("reply_to"),
        referrer=row.referrer,
        user_agent=row.user_agent,
    )


def _delivery_out(row: Any) -> DeliveryOut:
    """A delivery row on the wire."""
    return DeliveryOut(
        id=row.id,
        kind=row.kind,
        target=row.target,
        status=row.status,
        attempts=row.attempts,
        last_error=row.last_error,
        next_attempt_at=row.next_attempt_at,
        updated_at=row.updated_at,
    )


# --- resources ------------------------------------------------------------------------------------

# What JSON Schema cannot say about a form: each is answered 422, naming the field.
FORM_RULES = (
    "webhook_url's host resolves, and only to public addresses",
    "no two fields have the same name",
    "a number field's min is not larger than its max",
    "honeypot_field is not the name of one of the form's fields (sent or stored)",
)

_FORM_LINKS = (
    ("GetForm", "getForm", (("form_id", "$response.body#/id"),)),
    ("UpdateForm", "updateForm", (("form_id", "$response.body#/id"),)),
    ("DeleteForm", "deleteForm", (("form_id", "$response.body#/id"),)),
    ("ListSubmissions", "listSubmissions", (("form_id", "$response.body#/id"),)),
)


@api_resource(api, "/forms", "forms")
class FormsResource(MethodView):
    """The token owner's forms."""

    @operation(
        id="listForms",
        summary="List your forms",
        status=200,
        response=FormList,
        links=(
            ("ListSubmissions", "listSubmissions", (("form_id", "$response.body#/data/0/id"),)),
        ),
    )
    def get(self) -> Any:
        """Every form of the owner, newest first."""
        rows = services.list_forms(_owner_id())
        return _answer(FormList(data=[FormOut(**_form_values(row)) for row in rows]))

    @operation(
        id="createForm",
        summary="Create a form",
        status=201,
        body=FormCreate,
        response=FormWithSecret,
        description="Answers 201 with a Location header. With a webhook_url, the answer carries "
        "the webhook signing secret, once.",
        rules=FORM_RULES,
        links=_FORM_LINKS,
    )
    def post(self) -> Any:
        """Create a form; a webhook URL must be reachable and public."""
        body = _json_body(FormCreate)
        form, secret = services.create_form_via_api(
            _owner_id(), body.model_dump(exclude_unset=True)
        )
        response = _answer(FormWithSecret(**_form_values(form), webhook_secret=secret), 201)
        response.headers["Location"] = external_url("api.form", form_id=form.public_id)
        return response


@api_resource(api, "/forms/<form_id>", "form")
class FormResource(MethodView):
    """One form."""

    @operation(id="getForm", summary="Get a form", status=200, response=FormOut)
    def get(self, form_id: str) -> Any:
        """The form's settings and schema (never its webhook secret)."""
        return _answer(FormOut(**_form_values(_api_form(form_id))))

    @operation(
        id="updateForm",
        summary="Change a form",
        status=200,
        body=FormUpdate,
        response=FormWithSecret,
        conflict="rotate_webhook_secret on a form without a webhook",
        rules=FORM_RULES,
        description="Send only the keys that change. Everything is checked before anything "
        "is saved. A new fields list raises schema_version.",
    )
    def patch(self, form_id: str) -> Any:
        """Change settings, fields, status or the webhook."""
        body = _json_body(FormUpdate)
        form = _api_form(form_id)
        values = body.model_dump(exclude_unset=True)
        rotate = bool(values.pop("rotate_webhook_secret", False))
        form, secret = services.update_form_via_api(form, values, rotate_secret=rotate)
        return _answer(FormWithSecret(**_form_values(form), webhook_secret=secret))

    @operation(id="deleteForm", summary="Delete a form and its submissions", status=204)
    def delete(self, form_id: str) -> Any:
        """Delete the form with everything stored for it."""
        services.delete_form(_api_form(form_id))
        return _no_content()


@api_resource(api, "/forms/<form_id>/submissions", "form_submissions")
class FormSubmissionsResource(MethodView):
    """A form's submissions."""

    @operation(
        id="listSubmissions",
        summary="List a form's submissions",
        status=200,
        query=SubmissionQuery,
        response=SubmissionPage,
        description="Newest first. Follow next_cursor until it is null.",
        links=(
            ("GetSubmission", "getSubmission", (("submission_id", "$response.body#/data/0/id"),)),
            (
                "NextPage",
                "listSubmissions",
                (
                    ("form_id", "$request.path.form_id"),
                    ("cursor", "$response.body#/next_cursor"),
                ),
            ),
            (
                "ListDeliveries",
                "listDeliveries",
                (("submission_id", "$response.body#/data/0/id"),),
            ),
        ),
    )
    def get(self, form_id: str) -> Any:
        """One page of submissions."""
        query = _query(SubmissionQuery)
        before = decode_cursor(query.cursor) if query.cursor is not None else None
        form = _api_form(form_id)
        rows, next_before = services.api_submission_page(
            form,
            before=before,
            limit=query.limit,
            query=(query.q or "").replace("\x00", "").strip(),
            spam=query.spam,
            since=query.since,
            until=query.until,
        )
        return _answer(
            SubmissionPage(
                data=[_submission_out(row, form.public_id) for row in rows],
                next_cursor=encode_cursor(next_before),
            )
        )


@api_resource(api, "/submissions/<submission_id>", "submission")
class SubmissionResource(MethodView):
    """One submission."""

    @operation(id="getSubmission", summary="Get a submission", status=200, response=SubmissionOut)
    def get(self, submission_id: str) -> Any:
        """The submission with its data."""
        row = _api_submission(submission_id)
        return _answer(_submission_out(row, row.form_public_id))

    @operation(
        id="updateSubmission",
        summary="Mark a submission spam or not spam",
        status=200,
        body=SubmissionUpdate,
        response=SubmissionOut,
        description="Marking spam as not spam sends its held deliveries.",
    )
    def patch(self, submission_id: str) -> Any:
        """Record the owner's verdict."""
        body = _json_body(SubmissionUpdate)
        row = _api_submission(submission_id)
        services.mark_spam(row, body.is_spam)
        row = _api_submission(submission_id)
        return _answer(_submission_out(row, row.form_public_id))

    @operation(id="deleteSubmission", summary="Delete a submission", status=204)
    def delete(self, submission_id: str) -> Any:
        """Delete the submission and its deliveries."""
        services.delete_submission(_api_submission(submission_id))
        return _no_content()


@api_resource(api, "/submissions/<submission_id>/deliveries", "submission_deliveries")
class DeliveriesResource(MethodView):
    """A submission's deliveries."""

    @operation(
        id="listDeliveries",
        summary="List a submission's deliveries",
        status=200,
        response=DeliveryList,
        links=(
            (
                "ReplayDelivery",
                "replayDelivery",
                (
                    ("submission_id", "$request.path.submission_id"),
                    ("delivery_id", "$response.body#/data/0/id"),
                ),
            ),
        ),
    )
    def get(self, submission_id: str) -> Any:
        """The email and webhook deliveries, with their state."""
        rows = services.submission_deliveries(_api_submission(submission_id))
        return _answer(DeliveryList(data=[_delivery_out(row) for row in rows]))


@api_resource(
    api, "/submissions/<submission_id>/deliveries/<int:delivery_id>/replay", "delivery_replay"
)
class DeliveryReplayResource(MethodView):
    """Send a delivery again."""

    @operation(
        id="replayDelivery",
        summary="Replay a done or dead delivery",
        status=202,
        response=DeliveryOut,
        conflict="the delivery is still pending, sending, or held as spam",
        description="Queues the delivery again (202); no body is needed.",
    )
    def post(self, submission_id: str, delivery_id: int) -> Any:
        """Queue a finished delivery again."""
        submission = _api_submission(submission_id)
        try:
            row = services.replay_owned_delivery(submission, delivery_id)
        except services.NotFound:
            raise ApiError(404, "not_found", "This submission has no such delivery.") from None
        return _answer(_delivery_out(row), 202)


@api_resource(api, "/me", "me")
class MeResource(MethodView):
    """Who the token belongs to."""

    @operation(id="getMe", summary="The token's account", status=200, response=MeOut)
    def get(self) -> Any:
        """The owner's address and the token in use."""
        token = g.api_token
        return _answer(
            MeOut(
                email=token.email,
                email_confirmed=token.email_confirmed_at is not None,
                created_at=token.user_created_at,
                token=TokenOut(
                    name=token.name,
                    prefix=token.prefix,
                    created_at=token.created_at,
                    last_used_at=token.last_used_at,
                ),
            )
        )


# --- the document ---------------------------------------------------------------------------------


@api.get("/")
def api_root() -> Any:
    """The API's entry point: where the document and the reference are."""
    return jsonify(
        name="Mailslot API",
        version="v1",
        openapi=external_url("api.openapi_json"),
        reference=external_url("dashboard.api_reference"),
    )


@api.get("/openapi.json")
def openapi_json() -> Any:
    """The OpenAPI document (no token needed)."""
    return jsonify(openapi_document(api_url()))

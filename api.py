"""Mailslot's JSON API v1: bearer tokens, MethodView resources, and the OpenAPI document.

Split out of microapp.py for size (DESIGN.md: a module that would otherwise pass ~600 lines).
It imports nothing from microapp; microapp registers the ``api`` blueprint.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, Literal

import structlog
from flask import Blueprint, current_app, g, jsonify, request
from flask.views import MethodView
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)
from pydantic.json_schema import models_json_schema
from werkzeug.exceptions import RequestEntityTooLarge

import records
import services
import users
import validation
from settings import current_settings

log = structlog.get_logger("mailslot.api")

# =================================================================================================
# Blueprint: api (/api/v1)
# =================================================================================================

api = Blueprint("api", __name__, url_prefix="/api/v1")


# How the pieces fit: every resource is a MethodView added with @api_resource, and every method
# carries an @operation that names its body, query and answer models (pydantic). The views parse
# with those models, answer with them, and openapi_document() builds OpenAPI 3.1 from the same
# registry and the models' JSON Schemas, so the document cannot drift from the code.

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


# --- wire models (pydantic): request bodies are strict, unknown keys are refused ------------------

# The document states every rule these models check, in JSON Schema: a request the document calls
# valid is one the API accepts, apart from the few rules an operation lists on its 422 answer
# (ApiOperation.rules). Patterns spell their characters out (no \s, \w or \d), because JSON
# Schema (ECMA-262), pydantic (Rust) and Python read those classes differently.

# Exactly what Python's str.strip() removes (the characters for which str.isspace() is true).
SPACE_CHARACTERS = (
    r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
)
NO_NUL = r"^[^\x00]*$"
NOT_BLANK = rf"^[^\x00]*[^\x00{SPACE_CHARACTERS}][^\x00]*$"  # something is left after strip()
ONE_LINE = r"^[^\x00\r\n]+$"  # a spam rule is one line, as on the settings page
FIELD_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
HONEYPOT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"
PUBLIC_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{12}$"  # any 12 base64url characters are a position
_PUBLIC_ID = re.compile(PUBLIC_ID_PATTERN)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
FieldType = Literal[validation.FIELD_TYPES]  # type: ignore[valid-type]
FormStatus = Literal[validation.FORM_STATUSES]  # type: ignore[valid-type]
LARGEST_FLOAT = sys.float_info.max


def _address_patterns() -> tuple[str, str]:
    """(host, http URL) patterns: the part of RFC 3986 that every check of ours accepts.

    A host is a DNS name (ASCII: international names in their xn-- form) with an optional port;
    allowed domains need two labels or localhost. A URL is http or https with a DNS name, an IPv4
    address or an IPv6 literal, an optional port, no user name or password, and no spaces or
    control characters.
    """
    label = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    port = (
        "(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
    )
    octet = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
    h16 = "[0-9A-Fa-f]{1,4}"
    ls32 = rf"(?:{h16}:{h16}|{octet}(?:\.{octet}){{3}})"
    # RFC 3986's IPv6address: at most `before` groups ahead of "::" for each tail after it.
    tails = [f"(?:{h16}:){{{n}}}{ls32}" for n in (5, 4, 3, 2, 1)] + [ls32, h16, ""]
    ipv6 = [f"(?:{h16}:){{6}}{ls32}"] + [
        (f"(?:(?:{h16}:){{0,{before - 1}}}{h16})?" if before else "") + "::" + tail
        for before, tail in enumerate(tails)
    ]
    url_host = rf"(?:{label}(?:\.{label})*|\[(?:{'|'.join(ipv6)})\])"
    rest = r"[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
    allowed_host = rf"(?:[Ll][Oo][Cc][Aa][Ll][Hh][Oo][Ss][Tt]|{label}(?:\.{label})+)"
    return (
        rf"^{allowed_host}(?::{port})?$",
        rf"^[Hh][Tt][Tt][Pp][Ss]?://{url_host}(?::{port})?(?:[/?#]{rest}*)?$",
    )


HOST_PATTERN, HTTP_URL_PATTERN = _address_patterns()
OPTIONAL_URL_PATTERN = rf"^$|{HTTP_URL_PATTERN}"  # empty, like null, means none


def _storable(value: str) -> str:
    """Refuse text no database can store: NUL characters and unpaired surrogates."""
    if _UNSTORABLE.search(value):
        raise ValueError("Remove NUL characters and unpaired surrogates from this text.")
    return value


def text(pattern: str = NO_NUL, **constraints: Any) -> Any:
    """A string type whose pattern and limits are checked and stated in the document.

    (The Field comes before the validator: pydantic leaves a pattern given after an
    AfterValidator out of the JSON Schema while still checking it.)
    """
    return Annotated[str, Field(pattern=pattern, **constraints), AfterValidator(_storable)]


def _tidy_schema(schema: dict[str, Any], _model: Any = None) -> None:
    """Optional properties that may not be null get no ``"default": null`` in the document."""
    for prop in schema.get("properties", {}).values():
        nullable = prop.get("type") == "null" or any(
            branch.get("type") == "null" for branch in prop.get("anyOf", [])
        )
        if "default" in prop and prop["default"] is None and not nullable:
            del prop["default"]


class ApiInput(BaseModel):
    """A request body or query: exact JSON types, unknown keys refused."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_tidy_schema)


def _field_spec_schema(schema: dict[str, Any], model: Any = None) -> None:
    """A select or radio field needs a choice that is not blank (JSON Schema's if/then)."""
    _tidy_schema(schema, model)
    schema["if"] = {
        "properties": {"type": {"enum": sorted(validation.CHOICE_TYPES)}},
        "required": ["type"],
    }
    schema["then"] = {
        "properties": {
            "choices": {"type": "array", "contains": {"type": "string", "pattern": NOT_BLANK}}
        },
        "required": ["choices"],
    }


Number = Annotated[float, Field(ge=-LARGEST_FLOAT, le=LARGEST_FLOAT)]


def _whole(value: Any) -> Any:
    """JSON Schema's integers include 2.0: a number with no fraction is that integer."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def whole(**constraints: Any) -> Any:
    """An integer type with its limits stated in the document; 2.0 counts as 2."""
    return Annotated[int, Field(**constraints), BeforeValidator(_whole)]


class FieldSpecIn(ApiInput):
    """One field of a form's schema, as you send it (names unique; min not above max)."""

    model_config = ConfigDict(json_schema_extra=_field_spec_schema)

    name: str = Field(pattern=FIELD_NAME_PATTERN, description="The input's name (a JSON key).")
    label: text(max_length=200) | None = Field(None, description="Shown on the hosted page.")
    type: FieldType = "text"
    required: bool = False
    max_length: whole(ge=1, le=10_000) | None = Field(
        None, description="For text, email, textarea and url fields."
    )
    min: Number | None = Field(None, description="For number fields.")
    max: Number | None = Field(None, description="For number fields.")
    choices: list[text(max_length=200)] | None = Field(
        None,
        max_length=500,
        description="For select and radio fields, which need one that is not blank.",
    )
    help: text(max_length=1000) | None = Field(None, description="A hint under the field.")


class SpamRules(ApiInput):
    """The owner's own spam rules: a submission that matches one is stored as spam."""

    blocked_words: list[text(ONE_LINE, max_length=100)] = Field(
        default_factory=list, max_length=200, description="Words or phrases, case-insensitive."
    )
    blocked_email_domains: list[text(ONE_LINE, max_length=260)] = Field(
        default_factory=list,
        max_length=200,
        description="Domains of the sender's email field (like spam.example).",
    )


NOT_A_CONTROL_FIELD = {"not": {"enum": sorted(validation.CONTROL_FIELDS)}}
REDIRECT_URL_TEXT = "Where browsers go after posting (http or https); empty or null: none."
WEBHOOK_URL_TEXT = (
    "Receives each submission as a signed POST (http or https); empty or null: none. "
    "Its host must resolve, and only to public addresses (checked when saved: 422 otherwise)."
)
NAME_TEXT = "Not only spaces (they are trimmed)."
HONEYPOT_TEXT = "The spam-trap input: not a control field, nor the name of one of the fields."


class FormCreate(ApiInput):
    """A new form. Only ``name`` is required."""

    name: text(NOT_BLANK, min_length=1, max_length=200) = Field(description=NAME_TEXT)
    fields: list[FieldSpecIn] = Field(
        default_factory=list, max_length=100, description="Empty: accept any fields."
    )
    strict: bool = Field(False, description="Refuse fields the schema does not name.")
    status: FormStatus = "active"
    redirect_url: text(OPTIONAL_URL_PATTERN, max_length=2000) | None = Field(
        None, description=REDIRECT_URL_TEXT
    )
    allowed_domains: list[text(HOST_PATTERN, max_length=253)] = Field(
        default_factory=list,
        max_length=50,
        description="Hosts that may post (like example.com or localhost:8080); empty: any site.",
    )
    honeypot_field: str = Field(
        "_gotcha",
        pattern=HONEYPOT_PATTERN,
        description=HONEYPOT_TEXT,
        json_schema_extra=NOT_A_CONTROL_FIELD,
    )
    notify: bool = Field(True, description="Email each submission to your confirmed address.")
    webhook_url: text(OPTIONAL_URL_PATTERN, max_length=2000) | None = Field(
        None, description=WEBHOOK_URL_TEXT
    )
    retention_days: whole(ge=1, le=3650) | None = Field(
        None, description="Delete submissions older than this; null: keep them."
    )
    spam_rules: SpamRules = Field(default_factory=SpamRules)
    description: text(max_length=2000) = Field("", description="Shown on the hosted page.")
    thanks_message: text(max_length=2000) = Field(
        "", description="Shown after a hosted-page submission."
    )
    show_branding: bool = Field(True, description="'Powered by Mailslot' on the hosted page.")


class FormUpdate(ApiInput):
    """Changes to a form: send only what changes. ``null`` clears redirect_url and webhook_url."""

    name: text(NOT_BLANK, min_length=1, max_length=200) = Field(None, description=NAME_TEXT)
    fields: list[FieldSpecIn] = Field(
        None, max_length=100, description="The whole new schema; its version goes up."
    )
    strict: bool = None  # type: ignore[assignment]
    status: FormStatus = None  # type: ignore[assignment]
    redirect_url: text(OPTIONAL_URL_PATTERN, max_length=2000) | None = Field(
        None, description=REDIRECT_URL_TEXT
    )
    allowed_domains: list[text(HOST_PATTERN, max_length=253)] = Field(None, max_length=50)
    honeypot_field: str = Field(
        None,
        pattern=HONEYPOT_PATTERN,
        description=HONEYPOT_TEXT,
        json_schema_extra=NOT_A_CONTROL_FIELD,
    )
    notify: bool = None  # type: ignore[assignment]
    webhook_url: text(OPTIONAL_URL_PATTERN, max_length=2000) | None = Field(
        None, description=WEBHOOK_URL_TEXT
    )
    retention_days: whole(ge=1, le=3650) | None = Field(None, description="null: keep them.")
    spam_rules: SpamRules = Field(None, description="Replaces both lists.")
    description: text(max_length=2000) = None
    thanks_message: text(max_length=2000) = None
    show_branding: bool = None  # type: ignore[assignment]
    rotate_webhook_secret: bool = Field(
        False, description="Make a new signing secret; the answer carries it, once."
    )


class SubmissionUpdate(ApiInput):
    """The owner's verdict on a submission."""

    is_spam: bool


class SubmissionQuery(ApiInput):
    """Filters and paging for a form's submissions (query parameters)."""

    limit: whole(ge=1, le=100) = Field(50, description="Submissions per page.")
    cursor: str = Field(
        None,
        pattern=CURSOR_PATTERN,
        description="`next_cursor` of the previous page; omit for the first. Opaque, and any "
        "value of the pattern is a position in the list: the page after it is answered.",
    )
    since: AwareDatetime = Field(None, description="Received at or after (RFC 3339).")
    until: AwareDatetime = Field(None, description="Received before (RFC 3339).")
    spam: bool = Field(None, description="true: only spam; false: no spam; omitted: both.")
    q: str = Field(None, max_length=200, description="Text that any value contains.")


class FieldSpecOut(BaseModel):
    """One field of a form's schema, with every key present."""

    name: str
    label: str
    type: FieldType
    required: bool
    max_length: int | None
    min: float | None
    max: float | None
    choices: list[str]
    help: str


class FormOut(BaseModel):
    """A form. ``id`` goes in the URLs; ``endpoint_url`` is where websites post."""

    id: str
    name: str
    status: FormStatus
    fields: list[FieldSpecOut]
    schema_version: int
    strict: bool
    redirect_url: str | None
    allowed_domains: list[str]
    honeypot_field: str
    notify: bool
    webhook_url: str | None
    retention_days: int | None
    spam_rules: SpamRules
    description: str
    thanks_message: str
    show_branding: bool
    endpoint_url: str = Field(description="Point an HTML form's action (POST) here.")
    hosted_url: str = Field(description="The form page Mailslot hosts (GET).")
    created_at: dt.datetime
    updated_at: dt.datetime


class FormWithSecret(FormOut):
    """A form, plus the webhook signing secret when this request created or rotated it."""

    webhook_secret: str | None = Field(
        description="Shown only in the answer that made it (null otherwise): store it now."
    )


class FormList(BaseModel):
    """Your forms, newest first."""

    data: list[FormOut]


class SubmissionOut(BaseModel):
    """One submission: the data as stored, and where it came from."""

    id: str
    form_id: str
    created_at: dt.datetime
    data: dict[str, Any]
    schema_version: int
    is_spam: bool
    spam_reason: str | None
    subject: str | None = Field(description="The `_subject` control field, if sent.")
    reply_to: str | None = Field(description="The `_replyto` control field, if sent.")
    referrer: str | None
    user_agent: str | None


class SubmissionPage(BaseModel):
    """One page of submissions, newest first."""

    data: list[SubmissionOut]
    next_cursor: str | None = Field(
        pattern=CURSOR_PATTERN, description="Pass as `cursor` for the next page; null: done."
    )


class DeliveryOut(BaseModel):
    """One email or webhook delivery of a submission (the outbox row)."""

    id: int
    kind: Literal["email", "webhook"]
    target: str
    status: Literal["pending", "sending", "done", "dead", "held"]
    attempts: int
    last_error: str | None
    next_attempt_at: dt.datetime
    updated_at: dt.datetime


class DeliveryList(BaseModel):
    """A submission's deliveries, oldest first."""

    data: list[DeliveryOut]


class TokenOut(BaseModel):
    """The token this request used."""

    name: str
    prefix: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None


class MeOut(BaseModel):
    """The account the token belongs to."""

    email: str
    email_confirmed: bool
    created_at: dt.datetime
    token: TokenOut


class ErrorDetail(BaseModel):
    """What went wrong; ``fields`` maps input keys (dotted paths) to messages."""

    code: str
    message: str
    fields: dict[str, list[str]]


class ErrorBody(BaseModel):
    """Every error answer of the API."""

    error: ErrorDetail


# --- the route registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiOperation:
    """How one method of a resource is called and answered (the source of the document)."""

    id: str
    summary: str
    status: int
    response: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    conflict: str = ""  # when set, the operation answers 409 for this reason
    rules: tuple[str, ...] = ()  # rules beyond the schema: 422 to schema-valid input
    description: str = ""
    links: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = ()


def operation(**spec: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Attach an ApiOperation to a resource method."""

    def mark(method: Callable[..., Any]) -> Callable[..., Any]:
        method.api_operation = ApiOperation(**spec)  # type: ignore[attr-defined]
        return method

    return mark


API_RESOURCES: list[tuple[str, type[MethodView]]] = []


def api_resource(rule: str, endpoint: str) -> Callable[[type[MethodView]], type[MethodView]]:
    """Route a MethodView under /api/v1 and record it for the OpenAPI document."""

    def register(view: type[MethodView]) -> type[MethodView]:
        api.add_url_rule(rule, view_func=view.as_view(endpoint))
        API_RESOURCES.append((rule, view))
        return view

    return register


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


@api_resource("/forms", "forms")
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
        base_url = current_settings().base_url
        response.headers["Location"] = f"{base_url}/api/v1/forms/{form.public_id}"
        return response


@api_resource("/forms/<form_id>", "form")
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


@api_resource("/forms/<form_id>/submissions", "form_submissions")
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


@api_resource("/submissions/<submission_id>", "submission")
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


@api_resource("/submissions/<submission_id>/deliveries", "submission_deliveries")
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


@api_resource("/submissions/<submission_id>/deliveries/<int:delivery_id>/replay", "delivery_replay")
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


@api_resource("/me", "me")
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


# --- the OpenAPI document, and the reference page at /api -----------------------------------------

_ERROR_DESCRIPTIONS = {
    400: "The body is not valid JSON.",
    401: "No token, or an unknown or revoked one.",
    404: "You have nothing with this id (someone else's objects are not found either).",
    409: "Conflict: {reason}.",
    413: "The body is larger than MAX_CONTENT_LENGTH.",
    415: "The body is not JSON.",
    422: "Some values need fixing; `fields` names each one.",
    429: "Over the token's API_RATE_LIMIT; wait Retry-After seconds.",
}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": 'Bearer realm="mailslot" (error="invalid_token" if one was sent)'},
    429: {"Retry-After": "Seconds to wait."},
}
_RULE_PARAMETER = re.compile(r"<(?:(\w+):)?(\w+)>")


def _error_statuses(rule: str, spec: ApiOperation) -> list[int]:
    """Every error status an operation can answer."""
    statuses = [401, 429]
    if "<" in rule:
        statuses.append(404)
    if spec.body is not None:
        statuses += [400, 413, 415, 422]
    if spec.query is not None:
        statuses.append(422)
    if spec.conflict:
        statuses.append(409)
    return sorted(set(statuses))


def _header_docs(headers: dict[str, str]) -> dict[str, Any]:
    """Response headers as OpenAPI header objects."""
    return {
        name: {"description": text, "required": True, "schema": {"type": "string"}}
        for name, text in headers.items()
    }


def _operation_doc(rule: str, spec: ApiOperation, schemas: dict[Any, Any]) -> dict[str, Any]:
    """One OpenAPI operation object."""
    doc: dict[str, Any] = {"operationId": spec.id, "summary": spec.summary}
    if spec.description:
        doc["description"] = spec.description
    parameters = []
    for converter, name in _RULE_PARAMETER.findall(rule):
        schema = (
            {"type": "integer", "minimum": 1}
            if converter == "int"
            else {"type": "string", "pattern": PUBLIC_ID_PATTERN}
        )
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    if spec.query is not None:
        for name, prop in spec.query.model_json_schema()["properties"].items():
            prop = {key: value for key, value in prop.items() if key != "title"}
            description = prop.pop("description", "")
            parameters.append(
                {"name": name, "in": "query", "required": False, "description": description}
                | {"schema": prop}
            )
    if parameters:
        doc["parameters"] = parameters
    if spec.body is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas[(spec.body, "validation")]}},
        }
    success: dict[str, Any] = {"description": HTTPStatus(spec.status).phrase}
    if spec.response is not None:
        success["content"] = {
            "application/json": {"schema": schemas[(spec.response, "serialization")]}
        }
    if spec.status == 201:
        success["headers"] = _header_docs({"Location": "The new form's API URL."})
    if spec.links:
        success["links"] = {
            name: {"operationId": target, "parameters": dict(link_parameters)}
            for name, target, link_parameters in spec.links
        }
    responses: dict[str, Any] = {str(spec.status): success}
    for status in _error_statuses(rule, spec):
        description = _ERROR_DESCRIPTIONS[status].format(reason=spec.conflict)
        if status == 422 and spec.rules:
            description += " Besides the schema, these rules apply: " + "; ".join(spec.rules) + "."
        answer: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
        if status in _ERROR_HEADERS:
            answer["headers"] = _header_docs(_ERROR_HEADERS[status])
        responses[str(status)] = answer
    doc["responses"] = responses
    return doc


def _operations() -> list[tuple[str, str, ApiOperation]]:
    """(rule, method, operation) for every documented method, in registration order."""
    found = []
    for rule, view in API_RESOURCES:
        for method in ("get", "post", "patch", "delete"):
            handler = getattr(view, method, None)
            if handler is not None:
                found.append((rule, method, handler.api_operation))
    return found


@functools.cache
def openapi_document(base_url: str) -> dict[str, Any]:
    """OpenAPI 3.1 for /api/v1, built from the route registry and the wire models."""
    operations = _operations()
    wanted: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (ErrorBody, "serialization")
    ]
    for _, _, spec in operations:
        if spec.body is not None:
            wanted.append((spec.body, "validation"))
        if spec.response is not None:
            wanted.append((spec.response, "serialization"))
    schemas, definitions = models_json_schema(
        list(dict.fromkeys(wanted)), ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, Any] = {}
    for rule, method, spec in operations:
        path = _RULE_PARAMETER.sub(r"{\2}", rule)
        paths.setdefault(path, {})[method] = _operation_doc(rule, spec, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Mailslot API",
            "version": "1",
            "description": "Manage forms, read submissions and replay deliveries. Authenticate "
            "with 'Authorization: Bearer <token>' (create tokens under Account → API tokens). "
            'Errors are always {"error": {"code", "message", "fields"}}.',
        },
        "servers": [{"url": f"{base_url}/api/v1"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "ms_live_…"}
            },
        },
    }


@api.get("/")
def api_root() -> Any:
    """The API's entry point: where the document and the reference are."""
    base = current_settings().base_url
    return jsonify(
        name="Mailslot API",
        version="v1",
        openapi=f"{base}/api/v1/openapi.json",
        reference=f"{base}/api",
    )


@api.get("/openapi.json")
def openapi_json() -> Any:
    """The OpenAPI document (no token needed)."""
    return jsonify(openapi_document(current_settings().base_url))


def _type_label(schema: dict[str, Any]) -> str:
    """A JSON Schema as a short phrase for people: "string", "list of FieldSpecIn", ..."""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[1]
    if "anyOf" in schema:
        return " or ".join(_type_label(branch) for branch in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(value) for value in schema["enum"])
    kind = str(schema.get("type", "any"))
    if kind == "array":
        return "list of " + _type_label(schema.get("items", {}))
    if schema.get("format"):
        return f"{kind} ({schema['format']})"
    return kind


_LIMIT_WORDS = (
    ("minLength", "at least {} characters"),
    ("maxLength", "at most {} characters"),
    ("minItems", "at least {} items"),
    ("maxItems", "at most {} items"),
    ("minimum", "at least {}"),
    ("maximum", "at most {}"),
)
_LONG_PATTERN = 80  # longer patterns are named, not shown: people read them in openapi.json


def _constraint_words(schema: dict[str, Any]) -> list[str]:
    """One schema's own constraints in words (items of a list included)."""
    parts = [words.format(schema[key]) for key, words in _LIMIT_WORDS if key in schema]
    if "pattern" in schema:
        pattern = schema["pattern"]
        parts.append(
            f"matches {pattern}"
            if len(pattern) <= _LONG_PATTERN
            else "matches the pattern in openapi.json"
        )
    if "enum" in schema.get("not", {}):
        parts.append("not " + ", ".join(json.dumps(value) for value in schema["not"]["enum"]))
    if "items" in schema:
        parts += [f"each {words}" for words in _constraint_words(schema["items"])]
    return parts


def _limits_text(schema: dict[str, Any]) -> str:
    """A schema's constraints and default in words."""
    parts = []
    for branch in [schema, *schema.get("anyOf", [])]:
        parts += _constraint_words(branch)
    if "default" in schema:
        parts.append(f"default {json.dumps(schema['default'])}")
    return "; ".join(parts)


def reference_context(document: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document flattened for the reference template."""
    operations = []
    for path, methods in document["paths"].items():
        for method, spec in methods.items():
            body = spec.get("requestBody", {}).get("content", {}).get("application/json")
            operations.append(
                {
                    "id": spec["operationId"],
                    "method": method.upper(),
                    "path": "/api/v1" + path,
                    "summary": spec["summary"],
                    "description": spec.get("description", ""),
                    "parameters": [
                        {
                            "name": p["name"],
                            "where": p["in"],
                            "type": _type_label(p["schema"]),
                            "required": p["required"],
                            "notes": "; ".join(
                                filter(None, [p.get("description", ""), _limits_text(p["schema"])])
                            ),
                        }
                        for p in spec.get("parameters", [])
                    ],
                    "body": _type_label(body["schema"]) if body else None,
                    "responses": [
                        {
                            "status": status,
                            "description": answer["description"],
                            "type": _type_label(
                                answer.get("content", {})
                                .get("application/json", {})
                                .get("schema", {"type": "no body"})
                            ),
                            "headers": list(answer.get("headers", {})),
                        }
                        for status, answer in spec["responses"].items()
                    ],
                }
            )
    models = []
    for name, schema in document["components"]["schemas"].items():
        required = set(schema.get("required", []))
        models.append(
            {
                "name": name,
                "description": schema.get("description", ""),
                "properties": [
                    {
                        "name": prop_name,
                        "type": _type_label(prop),
                        "required": prop_name in required,
                        "notes": "; ".join(
                            filter(None, [prop.get("description", ""), _limits_text(prop)])
                        ),
                    }
                    for prop_name, prop in schema.get("properties", {}).items()
                ],
            }
        )
    return {"document": document, "operations": operations, "models": models}

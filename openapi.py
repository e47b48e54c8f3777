"""The JSON API's contract: the wire models (pydantic), the operation registry that every
resource method is recorded in (``operation``, ``api_resource``, ``ApiOperation``), the OpenAPI
3.1 document built from them, and the context of the reference page at /api.

How the pieces fit: every resource is a MethodView added with @api_resource, and every method
carries an @operation that names its body, query and answer models. The views (in ``api``) parse
with those models and answer with them, and openapi_document() builds the document from the
same registry and the models' JSON Schemas, so the document cannot drift from the code.

It must not import ``api`` (``api`` imports it), read requests, or call services.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, Literal

from flask import Blueprint
from flask.views import MethodView
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
)
from pydantic.json_schema import models_json_schema

import validation
from links import external_url

# =================================================================================================
# Wire models (pydantic): request bodies are strict, unknown keys are refused
# =================================================================================================


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


# =================================================================================================
# The operation registry
# =================================================================================================


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


def api_resource(
    blueprint: Blueprint, rule: str, endpoint: str
) -> Callable[[type[MethodView]], type[MethodView]]:
    """Route a MethodView on the API's blueprint and record it for the OpenAPI document."""

    def register(view: type[MethodView]) -> type[MethodView]:
        blueprint.add_url_rule(rule, view_func=view.as_view(endpoint))
        API_RESOURCES.append((rule, view))
        return view

    return register


# =================================================================================================
# The OpenAPI document
# =================================================================================================


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


def api_url() -> str:
    """The API's base URL at BASE_URL (the document's ``servers`` entry), from its URL map."""
    return external_url("api.api_root").rstrip("/")


@functools.cache
def openapi_document(api_base_url: str) -> dict[str, Any]:
    """OpenAPI 3.1 for /api/v1 served at ``api_base_url``, built from the route registry and
    the wire models (cached: both are fixed once the API module is imported)."""
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
        "servers": [{"url": api_base_url}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "ms_live_…"}
            },
        },
    }


# =================================================================================================
# The reference page's context
# =================================================================================================


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
    return {
        "document": document,
        "operations": operations,
        "models": models,
        "model_names": [model["name"] for model in models],
    }

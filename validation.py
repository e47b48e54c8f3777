"""Pure validation and normalisation: field specs (a form's schema), decoding what submitters
send, the one URL parser every site check uses (``parse_web_url``), checking a submission against
its schema (``validate_submission``), JSON bodies, and an owner's form settings (allowed domains,
the honeypot, spam rules).

Every function here is pure: it takes values and returns values, or the messages for a person
(``parse_allowed_domains`` raises them as ValueError), and never fails on hostile input. It must
not touch the database, Flask's request or session, or WTForms (``forms`` builds on this).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

# =============================================================================
# Field schema: the specs stored in a form's `fields` column
# =============================================================================

FIELD_TYPES = ("text", "email", "textarea", "number", "url", "date", "select", "checkbox", "radio")
TEXT_TYPES = frozenset({"text", "email", "textarea", "url"})
CHOICE_TYPES = frozenset({"select", "radio"})
SPEC_KEYS = ("name", "label", "type", "required", "max_length", "min", "max", "choices", "help")
CONTROL_FIELDS = frozenset({"_next", "_subject", "_replyto"})
MAX_SCHEMA_FIELDS = 100
MAX_LENGTH_LIMIT = 10_000
CHOICE_MAX_LENGTH = 200
LABEL_MAX_LENGTH = 200
HELP_MAX_LENGTH = 1000
FIELD_NAME_MAX_LENGTH = 100

MSG_FIELD_NAME = "Use letters, digits, _ and -, starting with a letter."
MSG_MIN_OVER_MAX = "The minimum is larger than the maximum."
MSG_MAX_LENGTH_RANGE = f"Use a whole number from 1 to {MAX_LENGTH_LIMIT}."
MSG_NUMBER = "Enter a number."
MSG_CHOICE_TOO_LONG = f"Keep each choice to at most {CHOICE_MAX_LENGTH} characters."

FIELD_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def _stripped(value: Any) -> str:
    """`value` trimmed when it is a string, otherwise the empty string."""
    return value.strip() if isinstance(value, str) else ""


def _spec_whole_number(value: Any) -> int | None:
    """`value` when it is a usable `max_length` (an int from 1 to 10000), otherwise None."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_LENGTH_LIMIT:
        return value
    return None


def _spec_number(value: Any) -> float | None:
    """`value` as a finite float when it is a real number (not a bool), otherwise None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _clean_choices(items: Any) -> list[str]:
    """Trimmed, non-empty, distinct string choices of acceptable length, in their given order."""
    if not isinstance(items, list | tuple):
        return []
    choices: list[str] = []
    for item in items:
        choice = _stripped(item)
        if choice and len(choice) <= CHOICE_MAX_LENGTH and choice not in choices:
            choices.append(choice)
    return choices


def normalise_field_spec(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Return the spec with every key present and defaults filled in; never raises.

    Values of the wrong kind fall back to their defaults, and attributes that do not apply to the
    field's type are dropped (choices only for select/radio, min/max only for number, max_length
    only for text, email, textarea and url), so stored specs have one canonical shape.
    """
    if not isinstance(raw, Mapping):
        raw = {}
    name = _stripped(raw.get("name"))
    raw_type = raw.get("type")
    field_type = raw_type if isinstance(raw_type, str) and raw_type in FIELD_TYPES else "text"
    is_number = field_type == "number"
    return {
        "name": name,
        "label": _stripped(raw.get("label")) or name,
        "type": field_type,
        "required": raw.get("required") is True,
        "max_length": (
            _spec_whole_number(raw.get("max_length")) if field_type in TEXT_TYPES else None
        ),
        "min": _spec_number(raw.get("min")) if is_number else None,
        "max": _spec_number(raw.get("max")) if is_number else None,
        "choices": _clean_choices(raw.get("choices")) if field_type in CHOICE_TYPES else [],
        "help": _stripped(raw.get("help")),
    }


# The fields of a form that has no schema, on its hosted page and in its install snippet.
DEFAULT_FIELDS: tuple[dict[str, Any], ...] = tuple(
    normalise_field_spec(spec)
    for spec in (
        {"name": "name", "label": "Name", "type": "text", "max_length": 200},
        {"name": "email", "label": "Email", "type": "email", "required": True},
        {"name": "message", "label": "Message", "type": "textarea", "required": True},
    )
)


def schema_specs(fields: Any) -> list[dict[str, Any]]:
    """The usable specs of a stored schema: normalised, named validly, first of each name only."""
    if not isinstance(fields, list | tuple):
        return []
    specs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for raw in fields:
        spec = normalise_field_spec(raw)
        if FIELD_NAME_RE.fullmatch(spec["name"]) and spec["name"] not in seen:
            seen.add(spec["name"])
            specs.append(spec)
    return specs


def _spec_problems(item: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for everything wrong with one raw field spec sent over the API."""
    problems: list[tuple[str, str]] = [
        (str(key), "Field specs have no such key.") for key in item if key not in SPEC_KEYS
    ]
    name = item.get("name")
    if not isinstance(name, str) or not FIELD_NAME_RE.fullmatch(name):
        problems.append(("name", MSG_FIELD_NAME))
    field_type = item.get("type", "text")
    if not isinstance(field_type, str) or field_type not in FIELD_TYPES:
        problems.append(("type", f"Use one of: {', '.join(FIELD_TYPES)}."))
        field_type = "text"
    for key, limit in (("label", LABEL_MAX_LENGTH), ("help", HELP_MAX_LENGTH)):
        value = item.get(key)
        if value is not None and not isinstance(value, str):
            problems.append((key, "Use text."))
        elif isinstance(value, str) and len(value.strip()) > limit:
            problems.append((key, f"Use at most {limit} characters."))
    if "required" in item and not isinstance(item["required"], bool):
        problems.append(("required", "Use true or false."))
    if item.get("max_length") is not None and _spec_whole_number(item["max_length"]) is None:
        problems.append(("max_length", MSG_MAX_LENGTH_RANGE))
    for key in ("min", "max"):
        if item.get(key) is not None and _spec_number(item[key]) is None:
            problems.append((key, MSG_NUMBER))
    low, high = _spec_number(item.get("min")), _spec_number(item.get("max"))
    if low is not None and high is not None and low > high:
        problems.append(("min", MSG_MIN_OVER_MAX))
    if field_type in CHOICE_TYPES:
        choices = item.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            problems.append(("choices", "List the choices as text."))
        elif any(len(c.strip()) > CHOICE_MAX_LENGTH for c in choices):
            problems.append(("choices", MSG_CHOICE_TOO_LONG))
        elif not _clean_choices(choices):
            problems.append(("choices", "List at least one choice."))
    return problems


def validate_field_specs(raw: Any) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Check a field schema sent as JSON (the API); return (normalised specs, errors).

    Errors are keyed `fields`, `fields.<i>` or `fields.<i>.<key>`; when there are any, the specs
    list is empty. Attributes that do not apply to a field's type are accepted and dropped.
    """
    if not isinstance(raw, list):
        return [], {"fields": ["Send the fields as a list of objects."]}
    if len(raw) > MAX_SCHEMA_FIELDS:
        return [], {"fields": [f"Use at most {MAX_SCHEMA_FIELDS} fields."]}
    errors: dict[str, list[str]] = {}
    seen: set[str] = set()
    for index, item in enumerate(raw):
        where = f"fields.{index}"
        if not isinstance(item, Mapping):
            errors[where] = ["Send each field as an object."]
            continue
        for key, message in _spec_problems(item):
            errors.setdefault(f"{where}.{key}", []).append(message)
        name = item.get("name")
        if isinstance(name, str):
            if name in seen:
                errors.setdefault(f"{where}.name", []).append(f"Two fields are named '{name}'.")
            seen.add(name)
    if errors:
        return [], errors
    return [normalise_field_spec(item) for item in raw], {}


# =============================================================================
# Decoding what submitters send: one step for every value, one URL parser
# =============================================================================

JSON_MAX_DEPTH = 32
URL_MAX_LENGTH = 2000
DEFAULT_PORTS = {"http": 80, "https": 443}

MSG_JSON = "The body is not valid JSON. Send a JSON object of fields."
MSG_JSON_DEPTH = (
    f"The JSON is nested more than {JSON_MAX_DEPTH} levels deep. Send an object of fields with "
    "plain values."
)

# NUL and lone surrogates cannot be stored in PostgreSQL text/JSONB or encoded as UTF-8.
_UNSTORABLE_RE = re.compile("[\x00\ud800-\udfff]")
# A JSON string, or an unterminated one up to the end; linear however the body is built.
_JSON_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)
_JSON_BRACKETS_RE = re.compile(r"[\[\]{}]")
# Line breaks, tabs and other controls (C0, DEL, C1, the Unicode line separators).
_CONTROLS_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Anything a browser reads differently from Python's URL parser: white space and controls (the
# URL standard drops tabs and newlines inside a URL), backslashes (read as "/"), surrogates.
_URL_REJECT_RE = re.compile("[\\s\x00-\x1f\x7f-\x9f\\\\\ud800-\udfff]")
_URL_HOST_RE = re.compile(r"[a-z0-9_.-]+")
_URL_SAFE = "/:@!$&'()*+,;=-._~%"


def storable_text(text: str) -> str:
    """`text` without what no database can store: NUL dropped, lone surrogates as U+FFFD."""
    if not _UNSTORABLE_RE.search(text):
        return text
    return _UNSTORABLE_RE.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", text)


def decode_text(text: str) -> str:
    """Submitted text as Mailslot keeps it: storable, and in Unicode normal form C.

    NFC only joins what is canonically the same text (`e` + combining acute is `é`), so a
    name, a search or a blocked word matches however the submitter's keyboard composed it.
    """
    if text.isascii():
        return text.replace("\x00", "") if "\x00" in text else text
    return unicodedata.normalize("NFC", storable_text(text))


def _decode_value(value: Any) -> Any:
    """Every string inside a submitted value decoded; other scalars unchanged."""
    if isinstance(value, str):
        return decode_text(value)
    if isinstance(value, list):
        return [_decode_value(item) for item in value]
    if isinstance(value, dict):
        return decode_fields(value)
    return value


def decode_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """Submitted fields with every name and every string value decoded (see `decode_text`).

    Names that become equal (`café` typed two ways) are one field holding both values, as a
    repeated name in a form body is. A part without a name (multipart allows one; browsers never
    send one) is dropped.
    """
    decoded: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            continue
        name, clean = decode_text(key), _decode_value(value)
        if name in decoded:
            before = decoded[name]
            clean = (before if isinstance(before, list) else [before]) + (
                clean if isinstance(clean, list) else [clean]
            )
        decoded[name] = clean
    return decoded


def one_line(value: Any) -> str | None:
    """A value for one line (a subject, a header we store): every run of white space and
    control characters as one space, trimmed; None when nothing is left."""
    if not isinstance(value, str):
        return None
    return " ".join(_CONTROLS_RE.sub(" ", decode_text(value)).split()) or None


def request_header_text(value: str | None) -> str:
    """A request header as the text the client meant: servers hand header bytes over as
    latin-1, browsers send UTF-8. Decoded like any submitted text."""
    if not value:
        return ""
    with contextlib.suppress(UnicodeEncodeError):  # not a server's bytes (a test client): text
        value = value.encode("latin-1").decode("utf-8", "replace")
    return decode_text(value)


def _json_too_deep(text: str) -> bool:
    """Whether JSON `text` nests arrays and objects more than JSON_MAX_DEPTH deep."""
    brackets = _JSON_BRACKETS_RE.findall(_JSON_STRING_RE.sub("", text))
    if len(brackets) <= JSON_MAX_DEPTH:
        return False
    depth = 0
    for bracket in brackets:
        depth += 1 if bracket in "[{" else -1
        if depth > JSON_MAX_DEPTH:
            return True
    return False


def load_json_fields(body: bytes) -> tuple[dict[str, Any], str | None]:
    """A JSON body as fields, or ({}, the message for the client). Never raises.

    The depth is bounded before parsing: deep nesting would exhaust the parser's recursion.
    """
    try:
        text = body.decode(json.detect_encoding(body))
    except UnicodeDecodeError:
        return {}, MSG_JSON
    if _json_too_deep(text):
        return {}, MSG_JSON_DEPTH
    try:
        data = json.loads(text)
    except ValueError:  # not JSON; or an integer longer than Python converts
        return {}, MSG_JSON
    return (data, None) if isinstance(data, dict) else ({}, MSG_JSON)


@dataclass(frozen=True)
class WebUrl:
    """An absolute http(s) URL that parsed cleanly: what every site check compares.

    `host` is lower-case ASCII (IDNA for names, no brackets for IPv6); `port` is the one written
    or the scheme's default; `url` is re-assembled from these checked parts, ASCII only.
    """

    scheme: str
    host: str
    port: int
    url: str


def _web_host(name: str) -> str | None:
    """A URL's host as a lower-case ASCII name or IP address, or None when it is neither."""
    if ":" in name:  # from [brackets]: Python has checked it is an IPv6 address
        if "%" in name:
            return None  # a zone id names an interface of the client's machine
        try:
            return ipaddress.IPv6Address(name).compressed
        except ValueError:
            return None
    try:
        host = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    return host if _URL_HOST_RE.fullmatch(host) else None


def parse_web_url(text: Any, base: str | None = None) -> WebUrl | None:
    """`text`, resolved against `base` when given, as an absolute http(s) URL; else None.

    Never raises. None for anything a browser might read differently from us: white space,
    controls or backslashes anywhere, user info, a port outside 1-65535, a host that is not a
    name (after IDNA) or an IP address, a host that Unicode normalisation would turn into URL
    syntax (the full-width forms of `#` and `/`). A Location header built from `.url` sends the
    browser exactly where the checks looked.
    """
    if not isinstance(text, str) or not text or len(text) > URL_MAX_LENGTH:
        return None
    if _URL_REJECT_RE.search(text):
        return None
    try:
        parts = urlsplit(urljoin(base, text) if base else text)
        port, name = parts.port, parts.hostname
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not name or "@" in parts.netloc or port == 0:
        return None
    host = _web_host(name)
    if host is None:
        return None
    port = DEFAULT_PORTS[scheme] if port is None else port
    netloc = f"[{host}]" if ":" in host else host
    if port != DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    path, query, fragment = (
        quote(part, safe=_URL_SAFE + "?") for part in (parts.path, parts.query, parts.fragment)
    )
    url = urlunsplit((scheme, netloc, path, query, fragment))
    return WebUrl(scheme, host, port, url) if len(url) <= URL_MAX_LENGTH else None


# =============================================================================
# Submission validation: one pure function, the single source of truth
# =============================================================================

MSG_REQUIRED = "This field is required."
MSG_ONE_VALUE = "Send one value for this field."
MSG_PLAIN_VALUE = "Send a plain value, not an object or list."
MSG_UNKNOWN_FIELD = "This form has no field with this name."
MSG_EMAIL = "Enter a valid email address."
MSG_URL = "Enter a full http:// or https:// address."
MSG_DATE = "Enter a date as YYYY-MM-DD."
MSG_CHOICE = "Choose one of the listed options."
MSG_CHECKBOX = "Tick the box or leave it empty."
MSG_CHECKBOX_REQUIRED = "This box must be ticked."
MSG_NAME_TOO_LONG = f"Field names can be at most {FIELD_NAME_MAX_LENGTH} characters."
MSG_NAME_UNPRINTABLE = "Field names can contain only printable characters."
MSG_NOT_A_MAPPING = "Send the fields as names with values."

CHECKBOX_TRUE = frozenset({"on", "true", "1", "yes"})
CHECKBOX_FALSE = frozenset({"", "off", "false", "0", "no"})
EMAIL_ADDRESS_MAX_LENGTH = 254

_MISSING: Any = object()
UNPRINTABLE_RE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_EMAIL_RE = re.compile(r"[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_URL_FORBIDDEN_RE = re.compile(r"[\s\x00-\x1f\x7f]")
# Beyond float range a "number" is noise, and huge ints are slow to print and compare.
_INT_MAX_BITS = 1024


def format_number(value: float) -> str:
    """A number for people and HTML attributes: `5`, `2.5`, `1e+20`, without float noise."""
    return f"{value:.15g}"


def _clean_text(value: str) -> str:
    """`value` trimmed, without characters no database can store (NUL; lone surrogates)."""
    return storable_text(value).strip()


def _collapse_value(value: Any, max_value_length: int) -> tuple[Any, str | None]:
    """One plain submitted value (`_MISSING` for an empty list), or an error message.

    Strings come back trimmed; None, bools, ints and finite floats come back unchanged.
    """
    if isinstance(value, list | tuple):
        if any(isinstance(item, Mapping | list | tuple) for item in value):
            return _MISSING, MSG_PLAIN_VALUE
        if not value:
            return _MISSING, None
        if len(value) > 1:
            return _MISSING, MSG_ONE_VALUE
        value = value[0]
    if value is None or isinstance(value, bool):
        return value, None
    if isinstance(value, int):
        return (value, None) if value.bit_length() <= _INT_MAX_BITS else (_MISSING, MSG_NUMBER)
    if isinstance(value, float):
        return (value, None) if math.isfinite(value) else (_MISSING, MSG_NUMBER)
    if isinstance(value, str):
        if len(value) > max_value_length:
            return _MISSING, f"Use at most {max_value_length} characters."
        return _clean_text(value), None
    return _MISSING, MSG_PLAIN_VALUE


def _field_name_problem(name: str) -> str | None:
    """Why a submitted key cannot be a field name, or None when it can."""
    if len(name) > FIELD_NAME_MAX_LENGTH:
        return MSG_NAME_TOO_LONG
    if UNPRINTABLE_RE.search(name):
        return MSG_NAME_UNPRINTABLE
    return None


def _as_text(value: Any) -> str:
    """A plain scalar as text: strings as they are, JSON true/false as `true`/`false`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _parse_number(text: str) -> int | float | None:
    """An int when `text` is a whole number, else a finite float, else None."""
    if _INT_RE.fullmatch(text):
        try:
            whole = int(text)
        except ValueError:
            pass  # longer than Python's int-string limit: float() below makes it inf
        else:
            return whole if whole.bit_length() <= _INT_MAX_BITS else None
    if _FLOAT_RE.fullmatch(text):
        number = float(text)
        if math.isfinite(number):
            return number
    return None


def is_http_url(value: str) -> bool:
    """True when `value` is an absolute http:// or https:// URL with a host and no spaces."""
    if _URL_FORBIDDEN_RE.search(value):
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        return False
    return parts.scheme.lower() in {"http", "https"} and bool(parts.hostname)


def _check_email(text: str) -> tuple[Any, str | None]:
    """One email address, its domain lower-cased."""
    if len(text) > EMAIL_ADDRESS_MAX_LENGTH or not _EMAIL_RE.fullmatch(text):
        return _MISSING, MSG_EMAIL
    local, _, domain = text.rpartition("@")
    return f"{local}@{domain.lower()}", None


def _check_date(text: str) -> tuple[Any, str | None]:
    """An ISO date `YYYY-MM-DD` that exists on the calendar, kept as that string."""
    if not _DATE_RE.fullmatch(text):
        return _MISSING, MSG_DATE
    try:
        date.fromisoformat(text)
    except ValueError:
        return _MISSING, MSG_DATE
    return text, None


def _check_number(value: Any, spec: Mapping[str, Any]) -> tuple[Any, str | None]:
    """A number within the spec's min and max; bools are not numbers."""
    if isinstance(value, bool):
        return _MISSING, MSG_NUMBER
    number = value if isinstance(value, int | float) else _parse_number(_as_text(value))
    if number is None:
        return _MISSING, MSG_NUMBER
    if spec["min"] is not None and number < spec["min"]:
        return _MISSING, f"Use a number of at least {format_number(spec['min'])}."
    if spec["max"] is not None and number > spec["max"]:
        return _MISSING, f"Use a number of at most {format_number(spec['max'])}."
    return number, None


def _checkbox_state(value: Any) -> bool | None:
    """True for a ticked box, False for an empty one, None when the value is neither."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return value == 1
    if isinstance(value, str):
        lowered = value.lower()
        if lowered in CHECKBOX_TRUE:
            return True
        if lowered in CHECKBOX_FALSE:
            return False
    return None


def _check_field(spec: Mapping[str, Any], value: Any) -> tuple[Any, str | None]:
    """The clean value of one schema field (`_MISSING` = leave it out), or an error message."""
    kind = spec["type"]
    blank = value is _MISSING or value is None or (isinstance(value, str) and not value)
    if kind == "checkbox":
        # Browsers send nothing for an unticked box, so a missing checkbox is an empty one.
        ticked = False if blank else _checkbox_state(value)
        if ticked is None:
            return _MISSING, MSG_CHECKBOX
        if spec["required"] and not ticked:
            return _MISSING, MSG_CHECKBOX_REQUIRED
        return ticked, None
    if blank:
        return _MISSING, MSG_REQUIRED if spec["required"] else None
    if kind == "number":
        return _check_number(value, spec)
    text = _as_text(value)
    if kind in TEXT_TYPES and spec["max_length"] is not None and len(text) > spec["max_length"]:
        return _MISSING, f"Use at most {spec['max_length']} characters."
    if kind == "email":
        return _check_email(text)
    if kind == "url":
        return (text, None) if is_http_url(text) else (_MISSING, MSG_URL)
    if kind == "date":
        return _check_date(text)
    if kind in CHOICE_TYPES:
        return (text, None) if text in spec["choices"] else (_MISSING, MSG_CHOICE)
    return text, None


def _plain_value(value: Any) -> Any:
    """A value kept without a schema: trimmed strings, None as "", other scalars unchanged."""
    return "" if value is None else value


def validate_submission(
    fields: Sequence[Mapping[str, Any]],
    data: Mapping[str, Any],
    *,
    strict: bool,
    max_fields: int = 100,
    max_value_length: int = 10_000,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Check submitted `data` against the field schema; return (clean_data, errors).

    When `errors` is non-empty the submission is refused and `clean_data` is empty. Form-wide
    problems are under the key `_form`. An empty schema accepts any fields. Keys starting with
    `_` are control fields and are ignored. Never raises, whatever the schema or data.
    """
    if not isinstance(data, Mapping):
        return {}, {"_form": [MSG_NOT_A_MAPPING]}
    submitted = [(key if isinstance(key, str) else str(key), value) for key, value in data.items()]
    submitted = [(key, value) for key, value in submitted if not key.startswith("_")]
    if len(submitted) > max_fields:
        return {}, {"_form": [f"Too many fields: at most {max_fields}."]}

    specs = schema_specs(fields)
    known = {spec["name"] for spec in specs}
    errors: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    for key, raw in submitted:
        problem = _field_name_problem(key)
        if problem is not None:
            if problem not in errors.setdefault("_form", []):
                errors["_form"].append(problem)
            continue
        if strict and specs and key not in known:
            errors[key] = [MSG_UNKNOWN_FIELD]
            continue
        value, error = _collapse_value(raw, max_value_length)
        if error is not None:
            errors[key] = [error]
        else:
            values[key] = value

    clean: dict[str, Any] = {}
    for spec in specs:
        name = spec["name"]
        if name in errors:
            continue
        value, error = _check_field(spec, values.get(name, _MISSING))
        if error is not None:
            errors[name] = [error]
        elif value is not _MISSING:
            clean[name] = value
    for key, value in values.items():
        if key not in known and value is not _MISSING:
            clean[key] = _plain_value(value)
    if errors:
        return {}, errors
    return clean, {}


# =============================================================================
# A form's settings: allowed domains, the honeypot, spam rules
# =============================================================================

MAX_ALLOWED_DOMAINS = 50
REDIRECT_URL_MAX_LENGTH = 2000
FORM_NAME_MAX_LENGTH = 200
FORM_STATUSES = ("active", "paused")
DEFAULT_HONEYPOT_FIELD = "_gotcha"

_HOST_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HOST_PORT_RE = re.compile(r"([^:]+)(?::([0-9]{1,5}))?")


def _normalise_host(entry: str) -> str | None:
    """`entry` as a lower-case `host` or `host:port`, or None when it is not one."""
    match = _HOST_PORT_RE.fullmatch(entry)
    if match is None:
        return None
    host, port = match.group(1).lower(), match.group(2)
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = host.split(".")
    if host != "localhost" and (
        len(host) > 253 or len(labels) < 2 or not all(_HOST_LABEL_RE.fullmatch(x) for x in labels)
    ):
        return None
    if port is None:
        return host
    if not 1 <= int(port) <= 65535:
        return None
    return f"{host}:{int(port)}"


def parse_allowed_domains(text: str | None) -> list[str]:
    """The hosts in `text`, one a line: lower-cased, blank lines and repeats skipped.

    Raises ValueError, with a message for the owner, at the first line that is not a host name
    (like `example.com`, `www.example.com`, `localhost`, optionally with `:port`) or when there
    are more than 50 hosts.
    """
    hosts: list[str] = []
    for line in (text or "").splitlines():
        entry = line.strip()
        if not entry:
            continue
        host = _normalise_host(entry)
        if host is None:
            raise ValueError(
                f"'{entry}' is not a host name. Write one host a line, like example.com."
            )
        if host not in hosts:
            hosts.append(host)
        if len(hosts) > MAX_ALLOWED_DOMAINS:
            raise ValueError(f"List at most {MAX_ALLOWED_DOMAINS} hosts.")
    return hosts


def honeypot_clash(specs: Sequence[Mapping[str, Any]], honeypot: str) -> str | None:
    """Why a honeypot name cannot be used with these fields (a real field would be trapped)."""
    if any(spec.get("name") == honeypot for spec in specs):
        return (
            f"A field of this form is named '{honeypot}': it cannot also be the spam trap. "
            "Choose another name for one of them, like _gotcha."
        )
    return None


def spam_rules(words: Sequence[str], email_domains: Sequence[str]) -> dict[str, list[str]]:
    """An owner's spam rules as stored: trimmed, without blanks or repeats, 200 of each at most;
    domains lower-cased and without a leading @."""
    domains = (d.strip().lower().lstrip("@") for d in email_domains)
    return {
        "words": list(dict.fromkeys(w.strip() for w in words if w.strip()))[:200],
        "email_domains": list(dict.fromkeys(d for d in domains if d))[:200],
    }

"""Flask-WTF forms, and pure validation and normalisation of submitted data. No database here."""

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

from flask_wtf import FlaskForm
from werkzeug.datastructures import MultiDict
from wtforms import (
    BooleanField,
    ButtonField,
    EmailField,
    FieldList,
    FloatField,
    Form,
    FormField,
    IntegerField,
    PasswordField,
    RadioField,
    SelectChoice,
    SelectField,
    StringField,
    TextAreaField,
    URLField,
)
from wtforms.validators import (
    DataRequired,
    Email,
    EqualTo,
    Length,
    NumberRange,
    Optional,
    ValidationError,
)
from wtforms.widgets import DateInput, ListWidget, NumberInput

from settings import current_settings

EMAIL_MAX_LENGTH = 254
PASSWORD_MAX_LENGTH = 128


def _strip(value: str | None) -> str | None:
    """Surrounding spaces are never part of an address."""
    return value.strip() if isinstance(value, str) else value


def _min_password_length() -> int:
    """The configured minimum password length."""
    return current_settings().password_min_length


def _email_field(label: str, missing: str, *, check_format: bool = True) -> EmailField:
    """An email input: trimmed, required, at most 254 characters, optionally well-formed."""
    validators: list[Any] = [
        DataRequired(missing),
        Length(max=EMAIL_MAX_LENGTH, message="Use an address of at most 254 characters."),
    ]
    if check_format:
        validators.append(Email("Enter a valid email address, like you@example.com."))
    return EmailField(label, filters=[_strip], validators=validators)


class ActionForm(FlaskForm):
    """A form with nothing but its CSRF token, for POST buttons (log out, resend, delete)."""


class _Button(ButtonField):
    """A submit button: its data is the value of the button pressed, or the default when the
    form was sent without one (WTForms' own ButtonField gives None then)."""

    def process_data(self, value: Any) -> None:
        """Start from the default."""
        self.data = value

    def process_formdata(self, valuelist: list[Any]) -> None:
        """The pressed button's value, if any."""
        if valuelist:
            self.data = valuelist[0]


class _VerdictButton(_Button):
    """A submit button that says yes (value ``1``) or no (any other value): its data is a bool."""

    def process_formdata(self, valuelist: list[Any]) -> None:
        """True only for the value 1."""
        if valuelist:
            self.data = valuelist[0] == "1"


class SpamVerdictForm(FlaskForm):
    """The owner's verdict on a submission: its one button sends spam=1 (spam) or spam=0 (not)."""

    spam = _VerdictButton("Mark as spam", default=False)


class SignupForm(FlaskForm):
    """Sign-up: an address we can mail, and a password typed twice."""

    email = _email_field("Email", "Enter your email address.")
    password = PasswordField(
        "Password", validators=[DataRequired("Choose a password.")], description=""
    )
    confirm = PasswordField(
        "Confirm password",
        validators=[
            DataRequired("Type the password again."),
            EqualTo("password", "The two passwords do not match."),
        ],
    )

    def validate_password(self, field: Any) -> None:
        """Long enough to resist guessing, short enough to hash quickly."""
        minimum = _min_password_length()
        if len(field.data) < minimum:
            raise ValidationError(f"Use at least {minimum} characters.")
        if len(field.data) > PASSWORD_MAX_LENGTH:
            raise ValidationError(f"Use at most {PASSWORD_MAX_LENGTH} characters.")


class LoginForm(FlaskForm):
    """Log in with email and password."""

    email = _email_field("Email", "Enter your email address.", check_format=False)
    password = PasswordField(
        "Password",
        validators=[
            DataRequired("Enter your password."),
            Length(max=PASSWORD_MAX_LENGTH, message="Wrong email or password."),
        ],
    )


# =============================================================================
# Field schema: the specs stored in a form's `fields` column
# =============================================================================

FIELD_TYPES = ("text", "email", "textarea", "number", "url", "date", "select", "checkbox", "radio")
FIELD_TYPE_LABELS = {
    "text": "Short text",
    "email": "Email address",
    "textarea": "Long text",
    "number": "Number",
    "url": "Web address",
    "date": "Date",
    "select": "Drop-down list",
    "checkbox": "Checkbox",
    "radio": "Radio buttons",
}
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

DEFAULT_FIELDS: tuple[dict[str, Any], ...] = (
    {
        "name": "name",
        "label": "Name",
        "type": "text",
        "required": False,
        "max_length": 200,
        "min": None,
        "max": None,
        "choices": [],
        "help": "",
    },
    {
        "name": "email",
        "label": "Email",
        "type": "email",
        "required": True,
        "max_length": None,
        "min": None,
        "max": None,
        "choices": [],
        "help": "",
    },
    {
        "name": "message",
        "label": "Message",
        "type": "textarea",
        "required": True,
        "max_length": None,
        "min": None,
        "max": None,
        "choices": [],
        "help": "",
    },
)

MSG_FIELD_NAME = "Use letters, digits, _ and -, starting with a letter."
MSG_MIN_OVER_MAX = "The minimum is larger than the maximum."
MSG_MAX_LENGTH_RANGE = f"Use a whole number from 1 to {MAX_LENGTH_LIMIT}."
MSG_NUMBER = "Enter a number."
MSG_CHOICE_TOO_LONG = f"Keep each choice to at most {CHOICE_MAX_LENGTH} characters."

_FIELD_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


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


def _schema_specs(fields: Any) -> list[dict[str, Any]]:
    """The usable specs of a stored schema: normalised, named validly, first of each name only."""
    if not isinstance(fields, list | tuple):
        return []
    specs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for raw in fields:
        spec = normalise_field_spec(raw)
        if _FIELD_NAME_RE.fullmatch(spec["name"]) and spec["name"] not in seen:
            seen.add(spec["name"])
            specs.append(spec)
    return specs


def _spec_problems(item: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for everything wrong with one raw field spec sent over the API."""
    problems: list[tuple[str, str]] = [
        (str(key), "Field specs have no such key.") for key in item if key not in SPEC_KEYS
    ]
    name = item.get("name")
    if not isinstance(name, str) or not _FIELD_NAME_RE.fullmatch(name):
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
_UNPRINTABLE_KEY_RE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_EMAIL_RE = re.compile(r"[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_URL_FORBIDDEN_RE = re.compile(r"[\s\x00-\x1f\x7f]")
# Beyond float range a "number" is noise, and huge ints are slow to print and compare.
_INT_MAX_BITS = 1024


def _format_number(value: float) -> str:
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
    if _UNPRINTABLE_KEY_RE.search(name):
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
        return _MISSING, f"Use a number of at least {_format_number(spec['min'])}."
    if spec["max"] is not None and number > spec["max"]:
        return _MISSING, f"Use a number of at most {_format_number(spec['max'])}."
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

    specs = _schema_specs(fields)
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
# Owner forms: form settings
# =============================================================================

MAX_ALLOWED_DOMAINS = 50
REDIRECT_URL_MAX_LENGTH = 2000
FORM_NAME_MAX_LENGTH = 200
FORM_STATUSES = ("active", "paused")
DEFAULT_HONEYPOT_FIELD = "_gotcha"

_HOST_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HOST_PORT_RE = re.compile(r"([^:]+)(?::([0-9]{1,5}))?")
_HONEYPOT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def _strip_filter(value: Any) -> Any:
    """WTForms filter: trim strings, leave anything else (None) alone."""
    return value.strip() if isinstance(value, str) else value


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


class FormSettingsForm(FlaskForm):
    """A form's settings: name, where to send people afterwards, who may post, spam trap."""

    name = StringField(
        "Name",
        filters=[_strip_filter],
        validators=[
            DataRequired("Give the form a name."),
            Length(max=FORM_NAME_MAX_LENGTH, message="Use at most 200 characters."),
        ],
    )
    redirect_url = StringField(
        "Redirect after submitting",
        filters=[_strip_filter],
        validators=[
            Optional(),
            Length(max=REDIRECT_URL_MAX_LENGTH, message="Use at most 2000 characters."),
        ],
        description="Leave empty to show Mailslot's thank-you page.",
    )
    allowed_domains = TextAreaField(
        "Allowed domains",
        description="One host a line, like example.com. Leave empty to accept posts from anywhere.",
    )
    notify = BooleanField("Email me each submission", default=True)
    status = SelectField(
        "Status",
        choices=[
            SelectChoice("active", "Active: accepting submissions"),
            SelectChoice("paused", "Paused"),
        ],
        default="active",
        invalid_choice_message="Choose active or paused.",
    )
    honeypot_field = StringField(
        "Honeypot field name",
        filters=[_strip_filter],
        default=DEFAULT_HONEYPOT_FIELD,
        description="A hidden field that people leave empty and spam bots fill in.",
    )
    strict = BooleanField("Strict schema: refuse fields the schema does not name")
    description = TextAreaField(
        "Description",
        filters=[_strip_filter],
        validators=[Length(max=2000, message="Use at most 2000 characters.")],
    )
    thanks_message = TextAreaField(
        "Thank-you message",
        filters=[_strip_filter],
        validators=[Length(max=2000, message="Use at most 2000 characters.")],
    )
    show_branding = BooleanField("Show “Powered by Mailslot” on the hosted page", default=True)
    retention_days = IntegerField(
        "Keep submissions for (days)",
        validators=[
            Optional(),
            NumberRange(min=1, max=3650, message="Use a number of days from 1 to 3650."),
        ],
    )
    blocked_words = TextAreaField(
        "Blocked words",
        filters=[_strip_filter],
        validators=[Length(max=5000, message="Use at most 5000 characters.")],
    )
    blocked_email_domains = TextAreaField(
        "Blocked email domains",
        filters=[_strip_filter],
        validators=[Length(max=5000, message="Use at most 5000 characters.")],
    )

    def validate_redirect_url(self, field: Any) -> None:
        """Only absolute web addresses: a relative one would redirect within Mailslot."""
        if not is_http_url(field.data):
            raise ValidationError("Use a full http:// or https:// address.")

    def validate_allowed_domains(self, field: Any) -> None:
        """Each line must be a host name; the parser holds the rules and the messages."""
        try:
            parse_allowed_domains(field.data)
        except ValueError as error:
            raise ValidationError(str(error)) from error

    def validate_honeypot_field(self, field: Any) -> None:
        """A name a browser can send that does not clash with another control field."""
        if not _HONEYPOT_RE.fullmatch(field.data or ""):
            raise ValidationError("Use letters, digits, _ and - (start with a letter or _).")
        if field.data in CONTROL_FIELDS:
            raise ValidationError(
                f"'{field.data}' is already a control field. Choose another name, like _gotcha."
            )


def honeypot_clash(specs: Sequence[Mapping[str, Any]], honeypot: str) -> str | None:
    """Why a honeypot name cannot be used with these fields (a real field would be trapped)."""
    if any(spec.get("name") == honeypot for spec in specs):
        return (
            f"A field of this form is named '{honeypot}': it cannot also be the spam trap. "
            "Choose another name for one of them, like _gotcha."
        )
    return None


def settings_values(form: FormSettingsForm) -> dict[str, Any]:
    """The cleaned settings of a validated FormSettingsForm, ready to store."""
    return {
        "name": form.name.data,
        "redirect_url": form.redirect_url.data or None,
        "allowed_domains": parse_allowed_domains(form.allowed_domains.data),
        "notify": bool(form.notify.data),
        "status": form.status.data,
        "honeypot_field": form.honeypot_field.data,
        "strict": bool(form.strict.data),
        "retention_days": form.retention_days.data,
        "description": form.description.data or "",
        "thanks_message": form.thanks_message.data or "",
        "show_branding": bool(form.show_branding.data),
        "spam_rules": spam_rules(
            _split_lines(form.blocked_words.data), _split_lines(form.blocked_email_domains.data)
        ),
    }


def spam_rules(words: Sequence[str], email_domains: Sequence[str]) -> dict[str, list[str]]:
    """An owner's spam rules as stored: trimmed, without blanks or repeats, 200 of each at most;
    domains lower-cased and without a leading @."""
    domains = (d.strip().lower().lstrip("@") for d in email_domains)
    return {
        "words": list(dict.fromkeys(w.strip() for w in words if w.strip()))[:200],
        "email_domains": list(dict.fromkeys(d for d in domains if d))[:200],
    }


def settings_form_data(values: Mapping[str, Any]) -> dict[str, Any]:
    """Stored settings as `data=` for FormSettingsForm on GET (domains one a line)."""
    return {
        "name": values.get("name") or "",
        "redirect_url": values.get("redirect_url") or "",
        "allowed_domains": "\n".join(values.get("allowed_domains") or []),
        "notify": bool(values.get("notify", True)),
        "status": values.get("status") or "active",
        "honeypot_field": values.get("honeypot_field") or DEFAULT_HONEYPOT_FIELD,
        "strict": bool(values.get("strict", False)),
        "retention_days": values.get("retention_days"),
        "description": values.get("description") or "",
        "thanks_message": values.get("thanks_message") or "",
        "show_branding": bool(values.get("show_branding", True)),
        "blocked_words": "\n".join((values.get("spam_rules") or {}).get("words", [])),
        "blocked_email_domains": "\n".join(
            (values.get("spam_rules") or {}).get("email_domains", [])
        ),
    }


# =============================================================================
# Owner forms: the field builder (works without JavaScript)
# =============================================================================

_ROW_ACTION_RE = re.compile(r"(remove|up|down)-([0-9]{1,4})")


def _split_lines(text: str | None) -> list[str]:
    """The non-blank lines of `text`, trimmed."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _whole_number_between(low: int, high: int, message: str) -> Any:
    """WTForms validator: the parsed int lies in [low, high] (parse errors are reported once)."""

    def check(form: Any, field: Any) -> None:
        """Refuse a whole number outside the range; None means blank or already reported."""
        if field.data is not None and not low <= field.data <= high:
            raise ValidationError(message)

    return check


def _finite_number(form: Any, field: Any) -> None:
    """WTForms validator: FloatField accepts `nan` and `inf`; a schema cannot use them."""
    if field.data is not None and not math.isfinite(field.data):
        raise ValidationError(MSG_NUMBER)


class FieldSpecForm(Form):
    """One row of the field builder (used inside FormField, so no CSRF token of its own)."""

    name = StringField(
        "Field name",
        filters=[_strip_filter],
        validators=[DataRequired("Give the field a name.")],
    )
    label = StringField(
        "Label",
        filters=[_strip_filter],
        validators=[Length(max=LABEL_MAX_LENGTH, message="Use at most 200 characters.")],
    )
    type = SelectField(
        "Type",
        choices=[SelectChoice(value, label) for value, label in FIELD_TYPE_LABELS.items()],
        default="text",
        invalid_choice_message="Choose a field type from the list.",
    )
    required = BooleanField("Required")
    max_length = IntegerField(
        "Maximum length",
        validators=[
            Optional(),
            _whole_number_between(1, MAX_LENGTH_LIMIT, MSG_MAX_LENGTH_RANGE),
        ],
        invalid_value_message=MSG_MAX_LENGTH_RANGE,
    )
    min = FloatField(
        "Minimum", validators=[Optional(), _finite_number], invalid_value_message=MSG_NUMBER
    )
    max = FloatField(
        "Maximum", validators=[Optional(), _finite_number], invalid_value_message=MSG_NUMBER
    )
    choices = TextAreaField("Choices (one a line)")
    help = StringField(
        "Help text",
        filters=[_strip_filter],
        validators=[Length(max=HELP_MAX_LENGTH, message="Use at most 1000 characters.")],
    )

    def validate_name(self, field: Any) -> None:
        """Names become JSON keys and HTML input names; `_` names are control fields."""
        if not _FIELD_NAME_RE.fullmatch(field.data):
            raise ValidationError(MSG_FIELD_NAME)

    def validate_choices(self, field: Any) -> None:
        """Drop-down lists and radio buttons need something to choose from."""
        if self.type.data not in CHOICE_TYPES:
            return
        lines = _split_lines(field.data)
        if not lines:
            raise ValidationError("List at least one choice, one a line.")
        if any(len(line) > CHOICE_MAX_LENGTH for line in lines):
            raise ValidationError(MSG_CHOICE_TOO_LONG)

    def validate_min(self, field: Any) -> None:
        """A range nobody can satisfy is a mistake worth pointing out."""
        low, high = field.data, self.max.data
        if (
            self.type.data == "number"
            and low is not None
            and high is not None
            and math.isfinite(low)
            and math.isfinite(high)
            and low > high
        ):
            raise ValidationError(MSG_MIN_OVER_MAX)


class FieldsForm(FlaskForm):
    """The field builder: one FieldSpecForm row per field, edited with submit buttons.

    Every button is the ``action`` field with its own value (see apply_builder_action); a post
    without any button saves.
    """

    fields = FieldList(FormField(FieldSpecForm), min_entries=0, max_entries=MAX_SCHEMA_FIELDS)
    action = _Button("Save fields", default="save")

    def validate(self, extra_validators: Mapping[str, Sequence[Any]] | None = None) -> bool:
        """Validate every row, then refuse two rows with the same name."""
        valid = super().validate(extra_validators)
        seen: set[str] = set()
        duplicated = False
        for entry in self.fields:
            name_field = entry.form["name"]
            if not name_field.data:
                continue
            if name_field.data in seen:
                name_field.errors.append(f"Two fields are named '{name_field.data}'.")
                duplicated = True
            seen.add(name_field.data)
        if duplicated:
            self.fields.errors = [entry.errors for entry in self.fields]
        return valid and not duplicated


def _row_formdata(entry: Any) -> dict[str, str]:
    """One builder row's inputs as sent (raw text, so typing mistakes survive a re-render)."""
    row: dict[str, str] = {}
    for subfield in entry.form:
        if isinstance(subfield, BooleanField):
            if subfield.data:
                row[subfield.short_name] = "y"
        elif subfield.raw_data:
            row[subfield.short_name] = str(subfield.raw_data[0])
        else:
            row[subfield.short_name] = "" if subfield.data is None else str(subfield.data)
    return row


def apply_builder_action(form: FieldsForm, action: str) -> bool:
    """Apply a builder button to the rows; True = re-render the page, False = validate and save.

    `action` is the value of the submit button named `action`: `save`, `add`, or `remove-<i>`,
    `up-<i>`, `down-<i>` where <i> is the row's position from 0. An unknown action or position
    changes nothing but still re-renders, so a stray button never saves by surprise.
    """
    if action == "save":
        return False
    rows = [_row_formdata(entry) for entry in form.fields]
    match = _ROW_ACTION_RE.fullmatch(action or "")
    if match is not None:
        verb, index = match.group(1), int(match.group(2))
        if index < len(rows):
            if verb == "remove":
                del rows[index]
            elif verb == "up" and index > 0:
                rows[index - 1], rows[index] = rows[index], rows[index - 1]
            elif verb == "down" and index < len(rows) - 1:
                rows[index], rows[index + 1] = rows[index + 1], rows[index]
    formdata = MultiDict()
    for position, row in enumerate(rows):
        for key, value in row.items():
            formdata.add(f"{form.fields.name}-{position}-{key}", value)
    form.fields.process(formdata)
    form.fields.post_process(formdata)
    if action == "add":
        if len(form.fields) < MAX_SCHEMA_FIELDS:
            form.fields.append_entry()
        else:
            form.form_errors.append(f"A form can have at most {MAX_SCHEMA_FIELDS} fields.")
    return True


def field_specs(form: FieldsForm) -> list[dict[str, Any]]:
    """The normalised specs of a validated FieldsForm, in row order."""
    specs = []
    for entry in form.fields:
        row = dict(entry.data)
        row["choices"] = _split_lines(row.get("choices"))
        specs.append(normalise_field_spec(row))
    return specs


def fields_form_data(specs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stored specs as `data=` for FieldsForm on GET (choices one a line)."""
    rows = []
    for spec in specs:
        row = normalise_field_spec(spec)
        row["choices"] = "\n".join(row["choices"])
        rows.append(row)
    return {"fields": rows}


# =============================================================================
# Hosted form page: a WTForms form built from the schema, for rendering only
# =============================================================================


class _RadioList(ListWidget):
    """The radio buttons' list, without `required`: that belongs on each button, not the list."""

    def __call__(self, field: Any, **kwargs: Any) -> Any:
        """Render the list; the buttons still get `required` from the field's `render_kw`."""
        kwargs.pop("required", None)
        return super().__call__(field, **kwargs)


def _hosted_field(spec: Mapping[str, Any]) -> Any:
    """The unbound WTForms field that renders one spec, with browser-side hints."""
    render_kw: dict[str, Any] = {}
    if spec["required"]:
        render_kw["required"] = True
    if spec["max_length"] is not None:
        render_kw["maxlength"] = spec["max_length"]
    options: dict[str, Any] = {
        "label": spec["label"],
        "name": spec["name"],
        "description": spec["help"],
        "render_kw": render_kw,
    }
    kind = spec["type"]
    if kind == "email":
        render_kw.setdefault("maxlength", EMAIL_ADDRESS_MAX_LENGTH)
        return EmailField(**options)
    if kind == "url":
        return URLField(**options)
    if kind == "textarea":
        return TextAreaField(**options)
    if kind == "number":
        for key in ("min", "max"):
            if spec[key] is not None:
                render_kw[key] = _format_number(spec[key])
        # A StringField keeps what was typed; the server checks it with validate_submission.
        return StringField(widget=NumberInput(step="any"), **options)
    if kind == "date":
        return StringField(widget=DateInput(), **options)
    if kind == "select":
        choices = [SelectChoice("", "Choose one"), *(SelectChoice(c) for c in spec["choices"])]
        return SelectField(choices=choices, validate_choice=False, **options)
    if kind == "radio":
        choices = [SelectChoice(c) for c in spec["choices"]]
        return RadioField(
            choices=choices, validate_choice=False, widget=_RadioList(prefix_label=False), **options
        )
    if kind == "checkbox":
        render_kw["value"] = "on"
        return BooleanField(false_values=tuple(CHECKBOX_FALSE), **options)
    return StringField(**options)


def hosted_form_class(fields: Sequence[Mapping[str, Any]]) -> type[FlaskForm]:
    """A FlaskForm subclass that renders the schema (DEFAULT_FIELDS when it is empty).

    For rendering only: validate the POST with `validate_submission` and show its errors with
    `attach_errors`. Fields sit under attribute names `field_<i>` with their HTML name set to the
    spec's name, so names like `data` or `errors` cannot clash with the form's own attributes;
    iterate the form to render it. CSRF follows the app's setting, like every FlaskForm, so the
    caller must drop the `csrf_token` key before validating the submitted data.
    """
    specs = _schema_specs(fields) or _schema_specs(DEFAULT_FIELDS)

    class HostedForm(FlaskForm):
        """The hosted page's form, built from a field schema."""

    for index, spec in enumerate(specs):
        setattr(HostedForm, f"field_{index}", _hosted_field(spec))
    return HostedForm


def attach_errors(form: Form, errors: Mapping[str, Sequence[str]]) -> None:
    """Show validate_submission's errors on a hosted form.

    Messages for a field go to that field's `errors` (matched by HTML name); `_form` messages, and
    those for names the form does not have (prefixed with the name), go to `form.form_errors`.
    """
    by_name = {field.name: field for field in form}
    for key, messages in errors.items():
        field = by_name.get(key)
        if field is not None:
            field.errors = [*field.errors, *messages]
        elif key == "_form":
            form.form_errors.extend(messages)
        else:
            form.form_errors.extend(f"{key}: {message}" for message in messages)


# =============================================================================
# Owner forms: the webhook
# =============================================================================


WEBHOOK_SAVE, WEBHOOK_TEST, WEBHOOK_ROTATE = "save", "test", "rotate"


class WebhookForm(FlaskForm):
    """The form's webhook address (empty removes it), and which button sent it."""

    action = _Button("Save webhook", default=WEBHOOK_SAVE)

    url = URLField(
        "Webhook URL",
        filters=[_strip_filter],
        validators=[
            Optional(),
            Length(max=2000, message="Use at most 2000 characters."),
        ],
    )

    def validate_url(self, field: Any) -> None:
        """Only absolute http(s) URLs; the address check happens in services."""
        if field.data and not is_http_url(field.data):
            raise ValidationError("Use a full http:// or https:// address.")


# =============================================================================
# Account: API tokens
# =============================================================================

API_TOKEN_NAME_MAX_LENGTH = 100


class ApiTokenForm(FlaskForm):
    """Create an API token: a name that says where it is used."""

    name = StringField(
        "Token name",
        filters=[_strip_filter],
        validators=[
            DataRequired("Name the token, for example after the script that uses it."),
            Length(max=API_TOKEN_NAME_MAX_LENGTH, message="Use at most 100 characters."),
        ],
        description="For example “CRM sync”. Only you see it.",
    )

    def validate_name(self, field: Any) -> None:
        """The name is shown in the token list: printable characters only."""
        if _UNPRINTABLE_KEY_RE.search(field.data or ""):
            raise ValidationError("Use printable characters only.")


ERASE_COUNT, ERASE_DELETE = "count", "delete"


class EraseForm(FlaskForm):
    """Find (then delete) everything an owner holds about one email address; ``action`` is the
    button pressed: count (the default) or delete."""

    email = _email_field("Email address", "Enter the email address to look for.")
    action = _Button("Find submissions", default=ERASE_COUNT)

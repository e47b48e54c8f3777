"""Flask-WTF forms: the account, settings, webhook and API-token forms, the no-JavaScript field
builder, and the hosted page's form built from a field schema (for rendering only).

The rules these forms apply live in ``validation`` (pure functions), so that the JSON API and the
submission path apply the same ones. This module must not touch the database.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

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

import validation
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
# Field schema: the builder's type names
# =============================================================================

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


# =============================================================================
# Owner forms: form settings
# =============================================================================

_HONEYPOT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def _strip_filter(value: Any) -> Any:
    """WTForms filter: trim strings, leave anything else (None) alone."""
    return value.strip() if isinstance(value, str) else value


class FormSettingsForm(FlaskForm):
    """A form's settings: name, where to send people afterwards, who may post, spam trap."""

    name = StringField(
        "Name",
        filters=[_strip_filter],
        validators=[
            DataRequired("Give the form a name."),
            Length(max=validation.FORM_NAME_MAX_LENGTH, message="Use at most 200 characters."),
        ],
    )
    redirect_url = StringField(
        "Redirect after submitting",
        filters=[_strip_filter],
        validators=[
            Optional(),
            Length(max=validation.REDIRECT_URL_MAX_LENGTH, message="Use at most 2000 characters."),
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
        default=validation.DEFAULT_HONEYPOT_FIELD,
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
        if not validation.is_http_url(field.data):
            raise ValidationError("Use a full http:// or https:// address.")

    def validate_allowed_domains(self, field: Any) -> None:
        """Each line must be a host name; the parser holds the rules and the messages."""
        try:
            validation.parse_allowed_domains(field.data)
        except ValueError as error:
            raise ValidationError(str(error)) from error

    def validate_honeypot_field(self, field: Any) -> None:
        """A name a browser can send that does not clash with another control field."""
        if not _HONEYPOT_RE.fullmatch(field.data or ""):
            raise ValidationError("Use letters, digits, _ and - (start with a letter or _).")
        if field.data in validation.CONTROL_FIELDS:
            raise ValidationError(
                f"'{field.data}' is already a control field. Choose another name, like _gotcha."
            )


def settings_values(form: FormSettingsForm) -> dict[str, Any]:
    """The cleaned settings of a validated FormSettingsForm, ready to store."""
    return {
        "name": form.name.data,
        "redirect_url": form.redirect_url.data or None,
        "allowed_domains": validation.parse_allowed_domains(form.allowed_domains.data),
        "notify": bool(form.notify.data),
        "status": form.status.data,
        "honeypot_field": form.honeypot_field.data,
        "strict": bool(form.strict.data),
        "retention_days": form.retention_days.data,
        "description": form.description.data or "",
        "thanks_message": form.thanks_message.data or "",
        "show_branding": bool(form.show_branding.data),
        "spam_rules": validation.spam_rules(
            _split_lines(form.blocked_words.data), _split_lines(form.blocked_email_domains.data)
        ),
    }


def settings_form_data(values: Mapping[str, Any]) -> dict[str, Any]:
    """Stored settings as `data=` for FormSettingsForm on GET (domains one a line)."""
    return {
        "name": values.get("name") or "",
        "redirect_url": values.get("redirect_url") or "",
        "allowed_domains": "\n".join(values.get("allowed_domains") or []),
        "notify": bool(values.get("notify", True)),
        "status": values.get("status") or "active",
        "honeypot_field": values.get("honeypot_field") or validation.DEFAULT_HONEYPOT_FIELD,
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
        raise ValidationError(validation.MSG_NUMBER)


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
        validators=[Length(max=validation.LABEL_MAX_LENGTH, message="Use at most 200 characters.")],
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
            _whole_number_between(1, validation.MAX_LENGTH_LIMIT, validation.MSG_MAX_LENGTH_RANGE),
        ],
        invalid_value_message=validation.MSG_MAX_LENGTH_RANGE,
    )
    min = FloatField(
        "Minimum",
        validators=[Optional(), _finite_number],
        invalid_value_message=validation.MSG_NUMBER,
    )
    max = FloatField(
        "Maximum",
        validators=[Optional(), _finite_number],
        invalid_value_message=validation.MSG_NUMBER,
    )
    choices = TextAreaField("Choices (one a line)")
    help = StringField(
        "Help text",
        filters=[_strip_filter],
        validators=[Length(max=validation.HELP_MAX_LENGTH, message="Use at most 1000 characters.")],
    )

    def validate_name(self, field: Any) -> None:
        """Names become JSON keys and HTML input names; `_` names are control fields."""
        if not validation.FIELD_NAME_RE.fullmatch(field.data):
            raise ValidationError(validation.MSG_FIELD_NAME)

    def validate_choices(self, field: Any) -> None:
        """Drop-down lists and radio buttons need something to choose from."""
        if self.type.data not in validation.CHOICE_TYPES:
            return
        lines = _split_lines(field.data)
        if not lines:
            raise ValidationError("List at least one choice, one a line.")
        if any(len(line) > validation.CHOICE_MAX_LENGTH for line in lines):
            raise ValidationError(validation.MSG_CHOICE_TOO_LONG)

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
            raise ValidationError(validation.MSG_MIN_OVER_MAX)


class FieldsForm(FlaskForm):
    """The field builder: one FieldSpecForm row per field, edited with submit buttons.

    Every button is the ``action`` field with its own value (see apply_builder_action); a post
    without any button saves.
    """

    fields = FieldList(
        FormField(FieldSpecForm), min_entries=0, max_entries=validation.MAX_SCHEMA_FIELDS
    )
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
        if len(form.fields) < validation.MAX_SCHEMA_FIELDS:
            form.fields.append_entry()
        else:
            form.form_errors.append(
                f"A form can have at most {validation.MAX_SCHEMA_FIELDS} fields."
            )
    return True


def field_specs(form: FieldsForm) -> list[dict[str, Any]]:
    """The normalised specs of a validated FieldsForm, in row order."""
    specs = []
    for entry in form.fields:
        row = dict(entry.data)
        row["choices"] = _split_lines(row.get("choices"))
        specs.append(validation.normalise_field_spec(row))
    return specs


def fields_form_data(specs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stored specs as `data=` for FieldsForm on GET (choices one a line)."""
    rows = []
    for spec in specs:
        row = validation.normalise_field_spec(spec)
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
        render_kw.setdefault("maxlength", validation.EMAIL_ADDRESS_MAX_LENGTH)
        return EmailField(**options)
    if kind == "url":
        return URLField(**options)
    if kind == "textarea":
        return TextAreaField(**options)
    if kind == "number":
        for key in ("min", "max"):
            if spec[key] is not None:
                render_kw[key] = validation.format_number(spec[key])
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
        return BooleanField(false_values=tuple(validation.CHECKBOX_FALSE), **options)
    return StringField(**options)


def hosted_form_class(fields: Sequence[Mapping[str, Any]]) -> type[FlaskForm]:
    """A FlaskForm subclass that renders the schema (validation.DEFAULT_FIELDS when it is empty).

    For rendering only: validate the POST with `validate_submission` and show its errors with
    `attach_errors`. Fields sit under attribute names `field_<i>` with their HTML name set to the
    spec's name, so names like `data` or `errors` cannot clash with the form's own attributes;
    iterate the form to render it. CSRF follows the app's setting, like every FlaskForm, so the
    caller must drop the `csrf_token` key before validating the submitted data.
    """
    specs = validation.schema_specs(fields) or validation.schema_specs(validation.DEFAULT_FIELDS)

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
        if field.data and not validation.is_http_url(field.data):
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
        if validation.UNPRINTABLE_RE.search(field.data or ""):
            raise ValidationError("Use printable characters only.")


ERASE_COUNT, ERASE_DELETE = "count", "delete"


class EraseForm(FlaskForm):
    """Find (then delete) everything an owner holds about one email address; ``action`` is the
    button pressed: count (the default) or delete."""

    email = _email_field("Email address", "Enter the email address to look for.")
    action = _Button("Find submissions", default=ERASE_COUNT)

"""The records rows leave ``dal`` as: small, frozen, slotted dataclasses (never SQLAlchemy rows),
the types every layer above the database passes around.

``dal`` builds each from a row by position, the cheapest way, which exports of many rows rely on:
those that mirror a table list its columns in the table's order (test_dal holds them to it), the
others are selected in their fields' order; joined shapes add their columns after. Every layer
names them from here (``records.Form``). This module holds data shapes only: it must not import
anything of ours or SQLAlchemy, run a query or know Flask.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

# =================================================================================================
# Accounts and forms
# =================================================================================================


@dataclass(frozen=True, slots=True)
class User:
    """An owner's account."""

    id: int
    email: str
    password_hash: str
    email_confirmed_at: dt.datetime | None
    session_version: int
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class PublicForm:
    """What the submission path and the hosted page know of a form (cached in Redis): never
    its webhook secret."""

    id: int
    public_id: str
    owner_id: int
    name: str
    fields: list[dict[str, Any]]
    schema_version: int
    strict: bool
    redirect_url: str | None
    allowed_domains: list[str]
    honeypot_field: str
    webhook_url: str | None
    notify: bool
    status: str
    spam_rules: dict[str, list[str]]
    description: str
    thanks_message: str
    show_branding: bool


@dataclass(frozen=True, slots=True)
class Form(PublicForm):
    """A form as its owner sees it: the public view, its signing secret, retention and times.

    ``dal`` selects its columns in this order (not the table's), so it builds by position too.
    """

    webhook_secret: str | None
    retention_days: int | None
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class FormWithCounts(Form):
    """A form on the owner's list: its non-spam submissions and when the newest came."""

    submission_count: int
    newest_at: dt.datetime | None


# =================================================================================================
# Submissions
# =================================================================================================


@dataclass(frozen=True, slots=True)
class Submission:
    """One stored submission."""

    id: int
    public_id: str
    form_id: int
    data: dict[str, Any]
    schema_version: int
    is_spam: bool
    spam_reason: str | None
    ip_hash: str | None
    user_agent: str | None
    referrer: str | None
    meta: dict[str, Any]
    search_text: str
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class SubmissionWithForm(Submission):
    """A submission found by its own id, with its form's public id."""

    form_public_id: str


@dataclass(frozen=True, slots=True)
class ExportedSubmission:
    """What an export writes of one submission."""

    id: int
    public_id: str
    data: dict[str, Any]
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class SubmissionValues:
    """A submission's values and control values (what erasure searches)."""

    id: int
    data: dict[str, Any]
    meta: dict[str, Any]


# =================================================================================================
# Deliveries (the outbox)
# =================================================================================================


@dataclass(frozen=True, slots=True)
class Delivery:
    """One outbox row: a notification, a webhook call or an account email."""

    id: int
    submission_id: int | None
    kind: str
    target: str
    status: str
    attempts: int
    next_attempt_at: dt.datetime
    last_error: str | None
    updated_at: dt.datetime
    user_id: int | None
    template: str | None
    params: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class DeadDelivery(Delivery):
    """A delivery that ran out of attempts, with its submission's public id."""

    submission_public_id: str


@dataclass(frozen=True, slots=True)
class SubmissionDelivery:
    """What sending a submission's notification or webhook needs: the delivery, the submission,
    its form and the form's owner."""

    delivery_id: int
    kind: str
    target: str
    attempts: int
    submission_id: int
    submission_public_id: str
    data: dict[str, Any]
    meta: dict[str, Any]
    created_at: dt.datetime
    is_spam: bool
    form_id: int
    form_public_id: str
    form_name: str
    webhook_url: str | None
    webhook_secret: str | None
    owner_email: str
    owner_confirmed_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class AccountDelivery:
    """What sending an account email needs: the delivery and the account."""

    delivery_id: int
    kind: str
    target: str
    attempts: int
    template: str
    params: dict[str, Any] | None
    user_id: int
    user_email: str
    user_confirmed_at: dt.datetime | None


# =================================================================================================
# API tokens
# =================================================================================================


@dataclass(frozen=True, slots=True)
class ApiToken:
    """An API token as stored: its hash and visible prefix, never the token."""

    id: int
    user_id: int
    name: str
    prefix: str
    token_hash: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class ApiTokenWithOwner(ApiToken):
    """A token a request presented, with its owner's address and account age."""

    email: str
    email_confirmed_at: dt.datetime | None
    user_created_at: dt.datetime


# =================================================================================================
# Numbers
# =================================================================================================


@dataclass(frozen=True, slots=True)
class DayCount:
    """Submissions received on one UTC day."""

    day: dt.date
    count: int

"""Hypothesis properties of the account pages."""

from __future__ import annotations

from typing import Any

import email_validator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_accounts import signup_answer

import microapp
from conftest import csrf_token, settle_deliveries

_emails = st.one_of(st.emails(), st.text(max_size=60), st.just(""), st.just("a@b"))
_passwords = st.one_of(st.text(min_size=0, max_size=140), st.text(min_size=7, max_size=9))


def well_formed(address: str, password: str, confirm: str) -> bool:
    """The sign-up rules as a user reads them in the messages."""
    address = address.strip()
    if not address or len(address) > 254:
        return False
    try:
        email_validator.validate_email(address, check_deliverability=False)
    except email_validator.EmailNotValidError:
        return False
    return bool(password.strip()) and 8 <= len(password) <= 128 and confirm == password


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(address=_emails, password=_passwords, same=st.booleans(), other=st.text(max_size=10))
def test_signup_never_fails_and_accepts_exactly_well_formed_pairs(
    overrides: dict[str, Any], address: str, password: str, same: bool, other: str
) -> None:
    app = _shared_app(overrides)
    confirm = password if same else other
    client = app.test_client()
    token = csrf_token(client, "/signup")
    response = client.post(
        "/signup",
        data={"email": address, "password": password, "confirm": confirm, "csrf_token": token},
    )
    settle_deliveries(app)  # its email is out before hypothesis draws the next example
    assert response.status_code in (302, 422)
    # A taken address is answered like a free one: the answer depends on the input alone.
    expected = well_formed(address, password, confirm)
    assert (response.status_code == 302) == expected, response.get_data(as_text=True)[:2000]


_TAKEN = "taken@example.com"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    spelling=st.tuples(st.sampled_from(["", " ", "  "]), st.booleans(), st.sampled_from(["", " "])),
    password=st.text(min_size=8, max_size=40).filter(str.strip),
    fresh_local=st.from_regex(r"[a-z][a-z0-9]{0,20}", fullmatch=True),
)
def test_a_taken_address_signs_up_exactly_like_a_free_one(
    overrides: dict[str, Any], spelling: tuple[str, bool, str], password: str, fresh_local: str
) -> None:
    app = _shared_app(overrides)
    if not _TAKEN_READY:
        assert signup_answer(app, _TAKEN)["status"] == 302
        _TAKEN_READY.append(True)
    before, upper, after = spelling
    taken = before + (_TAKEN.upper() if upper else _TAKEN) + after
    fresh = f"{before}{fresh_local}.new@example.com{after}"
    assert signup_answer(app, taken, password) == signup_answer(app, fresh, password)


_TAKEN_READY: list[bool] = []
_APPS: dict[str, Any] = {}


def _shared_app(overrides: dict[str, Any]) -> Any:
    """One app for all examples of a run (creating one per example would dominate the time)."""
    key = overrides["instance_path"]
    if key not in _APPS:
        _APPS.clear()
        _TAKEN_READY.clear()
        _APPS[key] = microapp.create_app(**overrides, rate_limits_enabled=False)
    return _APPS[key]

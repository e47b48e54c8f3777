"""Email headers: every value bound for a header is decoded, then flattened or refused.

A hostile ``_subject``, ``_replyto`` or ``email`` value (RFC 2047 encoded words that decode to
CR/LF, folding tricks, control characters, lone surrogates) must never add a header, change a
recipient or cost the owner the notification. The messages are built by the real delivery path
(the ``deliver`` task called directly) and read back from the bytes that were sent.
"""

from __future__ import annotations

import base64
import email
import email.policy
import types
import unicodedata
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import dal
import delivery
import microapp
import records
import services
import tasks
from conftest import SMTPSink, free_port

# The reproductions from issue 12, item 1.
INJECTED_SUBJECT = "=?utf-8?q?Hello=0D=0ABcc:_victim@evil.example=0D=0AX-Injected:_yes?="
INJECTED_BODY = (
    "=?utf-8?q?Invoice=0D=0AFrom:_ceo@evil.example=0D=0AContent-Type:_text/html=0D=0A=0D=0A"
    "<h1>Pay_now</h1>?="
)
INJECTED_ADDRESS = "=?utf-8?q?Ada=0D=0ABcc=3A_victim=40evil.example?= <ada@example.org>"

NOTIFICATION_HEADERS = [
    "content-type",
    "date",
    "from",
    "message-id",
    "mime-version",
    "subject",
    "to",
]


@pytest.fixture
def quiet_app(overrides: dict[str, Any]) -> Flask:
    """Connected mode with an unreachable broker and the console backend: intake stores the
    outbox rows and nothing is sent until a test calls the task."""
    app = microapp.create_app(**overrides, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app.config["TESTING"] = True
    return app


def make_form(app: Flask, name: str = "Contact") -> records.Form:
    """A confirmed owner with one lenient form that notifies."""
    with app.app_context():
        with dal.transaction() as conn:
            owner = dal.insert_user(conn, f"owner{free_port()}@example.com", "x")
            dal.mark_email_confirmed(conn, owner.id, owner.email)
        form = services.create_form(
            owner.id, {"name": name, "notify": True, "allowed_domains": [], "strict": False}
        )
        return services.owned_form(owner.id, form.public_id)


def deliver_newest(app: Flask) -> str:
    """Run the deliver task for the newest outbox row, as a worker would."""
    with app.app_context(), dal.connection() as conn:
        row_id = conn.execute(sa.select(sa.func.max(dal.deliveries.c.id))).scalar_one()
    with app.app_context():
        return tasks.deliver(row_id)


def notify(app: Flask, form: records.Form, values: dict[str, Any]) -> str:
    """Post a submission, then deliver its notification; the task's outcome."""
    response = app.test_client().post(f"/f/{form.public_id}", data=values)
    assert response.status_code == 303, response.get_data(as_text=True)
    return deliver_newest(app)


def sent_bytes(app: Flask) -> bytes:
    """The bytes of the newest message the console backend wrote."""
    files = sorted((Path(app.instance_path) / "outbox").glob("*.eml"))
    assert files, "no message was written"
    return files[-1].read_bytes()


def header_names(raw: bytes) -> list[str]:
    """The top-level header names of a message, lower-cased, as both parsers read them."""
    modern = email.message_from_bytes(raw, policy=email.policy.default)
    legacy = email.message_from_bytes(raw)
    names = sorted(name.lower() for name in modern)
    assert names == sorted(name.lower() for name in legacy)
    return names


def parsed(raw: bytes) -> EmailMessage:
    """The message as a mail client reads it."""
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


# --- the reproductions --------------------------------------------------------------------------


def test_an_encoded_word_subject_cannot_add_headers(quiet_app: Flask) -> None:
    form = make_form(quiet_app)
    assert notify(quiet_app, form, {"message": "hi", "_subject": INJECTED_SUBJECT}) == "done"
    raw = sent_bytes(quiet_app)
    assert header_names(raw) == NOTIFICATION_HEADERS
    message = parsed(raw)
    assert message["Bcc"] is None
    assert message["X-Injected"] is None
    assert message["Subject"] == "Hello Bcc: victim@evil.example X-Injected: yes"
    assert b"\nBcc:" not in raw
    assert b"\nX-Injected:" not in raw


def test_an_encoded_word_subject_cannot_add_a_sender_or_a_body(quiet_app: Flask) -> None:
    form = make_form(quiet_app)
    assert notify(quiet_app, form, {"message": "hi", "_subject": INJECTED_BODY}) == "done"
    raw = sent_bytes(quiet_app)
    assert header_names(raw) == NOTIFICATION_HEADERS
    message = parsed(raw)
    assert message.get_all("From") == [quiet_app.extensions["mailslot.settings"].mail_from]
    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    assert "Pay now" not in message.get_body(preferencelist=("html",)).get_content()


@pytest.mark.parametrize("field", ["_replyto", "email"])
def test_an_encoded_word_reply_to_is_left_out_and_the_notification_still_goes(
    quiet_app: Flask, field: str
) -> None:
    form = make_form(quiet_app)
    assert notify(quiet_app, form, {"message": "hi", field: INJECTED_ADDRESS}) == "done"
    raw = sent_bytes(quiet_app)
    assert header_names(raw) == NOTIFICATION_HEADERS  # no Reply-To, no Bcc
    with quiet_app.app_context(), dal.connection() as conn:
        [row] = conn.execute(sa.select(dal.deliveries)).all()
    assert (row.status, row.attempts) == ("done", 1)


def test_an_injected_reply_to_over_real_smtp_reaches_only_the_owner(
    overrides: dict[str, Any], smtp_sink: SMTPSink
) -> None:
    app = microapp.create_app(
        **overrides,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        mail_backend="smtp",
        smtp_host="127.0.0.1",
        smtp_port=smtp_sink.port,
        smtp_starttls=False,
        mail_from="Mailslot <noreply@mailslot.test>",
    )
    form = make_form(app)
    values = {"message": "hi", "_subject": INJECTED_SUBJECT, "_replyto": INJECTED_ADDRESS}
    assert notify(app, form, values) == "done"
    [(mail_from, recipients, message)] = smtp_sink.messages
    with app.app_context():
        owner = dal.owner_of_form(dal.database().engine.connect(), form.id)
    assert mail_from == "noreply@mailslot.test"
    assert recipients == [owner.email]
    assert sorted(name.lower() for name in message) == NOTIFICATION_HEADERS
    assert message["Subject"] == "Hello Bcc: victim@evil.example X-Injected: yes"


def test_a_plain_reply_to_is_kept_as_one_bare_address(quiet_app: Flask) -> None:
    form = make_form(quiet_app)
    values = {"message": "hi", "_replyto": "=?utf-8?q?Ada_Lovelace?= <Ada@Example.ORG>"}
    assert notify(quiet_app, form, values) == "done"
    message = parsed(sent_bytes(quiet_app))
    assert message["Reply-To"] == "Ada@example.org"


def test_a_form_name_with_line_breaks_is_one_line_in_the_default_subject(
    quiet_app: Flask,
) -> None:
    form = make_form(quiet_app, name="Quotes\r\nBcc: victim@evil.example")
    assert notify(quiet_app, form, {"message": "hi"}) == "done"
    raw = sent_bytes(quiet_app)
    assert header_names(raw) == NOTIFICATION_HEADERS
    assert parsed(raw)["Subject"] == "New submission: Quotes Bcc: victim@evil.example"


# --- the pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Quote request", "Quote request"),
        ("  Two\r\nlines\tand\x00more  ", "Two lines and more"),
        (INJECTED_SUBJECT, "Hello Bcc: victim@evil.example X-Injected: yes"),
        ("=?utf-8?q?Caf=C3=A9?=", "Café"),
        ("=?iso-8859-1?b?" + base64.b64encode("Café".encode("latin-1")).decode() + "?=", "Café"),
        ("=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),  # whitespace between encoded words goes
        ("=?x-no-such-charset?q?Hi=0AThere?=", "Hi There"),
        ("=?utf-8?b?!!not-base64?=", "!!not-base64"),
        ("=?utf-8?q?=3D=3Futf-8=3Fq=3FBcc=3A=5Fx=0A=3F=3D?=", "Bcc: x"),  # encoded twice
        ("=?utf-16?b?ANg=?=", "= ?utf-16?b?ANg= ?="),  # undecodable: no reader may decode it
        ("line\u2028separator\u2029paragraph\x85next", "line separator paragraph next"),
        ("bidi \u202etxt.exe", "bidi txt.exe"),
        ("lone \ud800 surrogate", "lone surrogate"),
        ("e\u0301", "é"),  # NFC
        ("x" * 500, "x" * delivery.SUBJECT_MAX_LENGTH),
        ("\r\n\t ", None),
        ("=?utf-8?q?=0D=0A?=", None),
        (None, None),
        (42, None),
    ],
)
def test_header_text_decodes_then_flattens_to_one_line(value: Any, expected: str | None) -> None:
    assert delivery.header_text(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ada@example.org", "ada@example.org"),
        ("  Ada@Example.ORG ", "Ada@example.org"),
        ("Ada <ada@example.org>", "ada@example.org"),
        ('"boss@bank.example" <ada@example.org>', "ada@example.org"),  # the name never shows
        ("=?utf-8?q?ada@example.org?=", "ada@example.org"),
        ("ada@exämple.org", "ada@xn--exmple-cua.org"),
        (INJECTED_ADDRESS, None),
        ("=?utf-8?q?Ada=0D=0ABcc:_victim@evil.example?= <ada@example.org>", None),
        ("=?utf-8?q?ada@example.org=0D=0ABcc:_victim@evil.example?=", None),
        ("ada@example.org\r\nBcc: victim@evil.example", None),
        ("ada@example.org\nBcc: victim@evil.example", None),
        ("ada@example.org, eve@evil.example", None),
        ("Ada <ada@example.org>, eve@evil.example", None),
        ("group: ada@example.org, eve@evil.example;", None),
        ("ada@example.org (a comment)", "ada@example.org"),  # comments go with the name
        ("not an address", None),
        ("ädä@example.org", None),  # would need SMTPUTF8
        ('"quoted"@example.org', "quoted@example.org"),  # the quotes were not needed
        ('"two words"@example.org', None),
        ("ada@[127.0.0.1]", None),
        ("ada@localhost", None),
        ("ada\ud800@example.org", None),
        ("", None),
        (None, None),
        (["ada@example.org"], None),
    ],
)
def test_header_address_accepts_exactly_one_plain_address(value: Any, expected: str | None) -> None:
    assert delivery.header_address(value) == expected


@pytest.mark.parametrize(
    ("mail_from", "name", "address"),
    [
        ("Mailslot <mailslot@localhost>", "Mailslot", "mailslot@localhost"),
        ("noreply@mailslot.test", "", "noreply@mailslot.test"),
        ('"Forms, Inc." <forms@example.org>', "Forms, Inc.", "forms@example.org"),
        ("=?utf-8?q?Caf=C3=A9_Forms?= <forms@example.org>", "Café Forms", "forms@example.org"),
    ],
)
def test_sender_keeps_a_display_name_flattened(mail_from: str, name: str, address: str) -> None:
    sender = delivery.sender_address(mail_from)
    assert sender is not None
    assert (sender.display_name, sender.addr_spec) == (name, address)


@pytest.mark.parametrize(
    "mail_from",
    [
        "",
        "a@b\r\nBcc: c@d",
        "two@a.example, three@b.example",
        "Forms, Inc. <forms@example.org>",  # unquoted comma: two mailboxes
        "=?utf-8?q?Evil=0D=0ABcc:_x@y?= <forms@example.org>",
    ],
)
def test_an_unusable_mail_from_is_refused(mail_from: str) -> None:
    assert delivery.sender_address(mail_from) is None


def test_the_serialised_check_refuses_a_message_with_an_extra_header(app: Flask) -> None:
    # What CVE-2024-6923 did: the value set was one header, the bytes hold two.
    message = EmailMessage()
    message["From"] = "a@example.org"
    message["To"] = "b@example.org"
    message["Subject"] = INJECTED_SUBJECT
    message.set_content("x")
    with pytest.raises(delivery.UnsafeMessage, match="bcc"):
        delivery.check_serialised(message)


# --- properties ---------------------------------------------------------------------------------

_NAMES = st.one_of(
    st.sampled_from(
        [
            "Bcc",
            "Cc",
            "To",
            "From",
            "Reply-To",
            "Subject",
            "X-Injected",
            "Content-Type",
            "MIME-Version",
            "Content-Transfer-Encoding",
        ]
    ),
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True),
)
_BREAKS = st.sampled_from(
    ["\r\n", "\n", "\r", "\r\n\r\n", "\r\n ", "\n\t", "\x0b", "\x0c", "\x00", "\x1c", "\x85",
     "\u2028", "\u2029", "\r\n\r\n<html><body>pay</body></html>\r\n"]
)  # fmt: skip
_FOLDS = st.sampled_from(["", " ", "\t", "\r\n ", "\r\n\t", "\n ", "  "])
_CHARSETS = st.sampled_from(
    ["utf-8", "UTF-8", "iso-8859-1", "us-ascii", "utf-16", "x-no-such-charset", "utf-8*en"]
)


def _q_encode(data: bytes) -> str:
    """RFC 2047 "Q" encoding, written from the RFC rather than the email package."""
    safe = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!*+-/"
    return "".join(
        chr(byte) if byte in safe else "_" if byte == 0x20 else f"={byte:02X}" for byte in data
    )


@st.composite
def encoded_words(draw: st.DrawFn, payload: st.SearchStrategy[str]) -> str:
    """One encoded word carrying ``payload`` (q or b, any charset label, even unknown ones)."""
    text = draw(payload)
    charset = draw(_CHARSETS)
    codec = charset.split("*")[0] if charset.split("*")[0] != "x-no-such-charset" else "utf-8"
    data = text.encode(codec, errors="surrogatepass" if "utf" in codec else "replace")
    if draw(st.booleans()):
        return f"=?{charset}?{draw(st.sampled_from(['q', 'Q']))}?{_q_encode(data)}?="
    return f"=?{charset}?{draw(st.sampled_from(['b', 'B']))}?{base64.b64encode(data).decode()}?="


_INJECTION = st.builds(
    lambda before, br, name, value: f"{before}{br}{name}: {value}",
    st.text(max_size=12),
    _BREAKS,
    _NAMES,
    st.one_of(st.emails(), st.text(max_size=20)),
)
_PIECE = st.one_of(
    st.text(max_size=30),
    _INJECTION,
    encoded_words(_INJECTION),
    encoded_words(encoded_words(_INJECTION)),
    st.emails(),
)
HOSTILE = st.builds(
    lambda pieces, folds: "".join(p + f for p, f in zip(pieces, folds, strict=False)),
    st.lists(_PIECE, max_size=4),
    st.lists(_FOLDS, min_size=4, max_size=4),
)


def no_surrogates(text: str) -> bool:
    """Intake may not store lone surrogates (issue 12 item 2 decides what it does with them)."""
    return not any("\ud800" <= ch <= "\udfff" for ch in text)


def check_notification(raw: bytes, subject: str, expected_reply_to: str | None) -> None:
    """The sent bytes hold exactly our headers, once each, with the values we meant."""
    expected = sorted(NOTIFICATION_HEADERS + (["reply-to"] if expected_reply_to else []))
    assert header_names(raw) == expected
    message = parsed(raw)
    # Folding a long mixed-script subject can lose a space between two encoded words (a bug
    # of the email package): the text must be ours, spaces aside.
    assert "".join(message["Subject"].split()) == "".join(subject.split())
    assert "\n" not in message["Subject"]
    assert "\r" not in message["Subject"]
    assert message["Reply-To"] == expected_reply_to
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]


_SHARED: dict[str, Any] = {}


def shared(overrides: dict[str, Any]) -> tuple[Flask, records.Form]:
    """One quiet app and form for all examples of a run."""
    key = overrides["instance_path"]
    if _SHARED.get("key") != key:
        app = microapp.create_app(
            **overrides, redis_url=f"redis://127.0.0.1:{free_port()}/0", rate_limits_enabled=False
        )
        _SHARED.update(key=key, app=app, form=make_form(app))
    return _SHARED["app"], _SHARED["form"]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(subject=HOSTILE, reply_to=HOSTILE, email_field=HOSTILE)
@example(subject=INJECTED_SUBJECT, reply_to=INJECTED_ADDRESS, email_field=INJECTED_ADDRESS)
@example(subject=INJECTED_BODY, reply_to="", email_field="ada@example.org")
def test_no_submitted_value_adds_a_header_to_the_notification(
    overrides: dict[str, Any], subject: str, reply_to: str, email_field: str
) -> None:
    app, form = shared(overrides)
    values = {"_subject": subject, "_replyto": reply_to, "email": email_field, "m": "x"}
    values = {k: v for k, v in values.items() if no_surrogates(v) and "\x00" not in v}
    response = app.test_client().post(f"/f/{form.public_id}", data=values)
    if response.status_code != 303:
        return  # refused by intake's own rules (for example an email field it cannot store)
    assert deliver_newest(app) == "done"
    with app.app_context(), dal.connection() as conn:
        meta, data = conn.execute(
            sa.select(dal.submissions.c.meta, dal.submissions.c.data).order_by(
                dal.submissions.c.id.desc()
            )
        ).first()
    expected_subject = delivery.header_text(meta.get("subject")) or "New submission: Contact"
    expected_reply_to = delivery.reply_to_address(meta, data)
    check_notification(sent_bytes(app), expected_subject, expected_reply_to)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.one_of(HOSTILE, st.text()))
def test_header_values_are_fixed_points_with_no_breaks(value: str) -> None:
    text = delivery.header_text(value)
    if text is not None:
        assert text == delivery.header_text(text)
        assert text == str(email.policy.default.header_factory("subject", text))
        assert not any(unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") for ch in text)
        assert "\n" not in text
        assert text.strip() == text
        assert 0 < len(text) <= delivery.SUBJECT_MAX_LENGTH
        assert "=?" not in text
    address = delivery.header_address(value)
    if address is not None:
        assert address.isascii()
        assert address.isprintable()
        assert " " not in address
        assert address.count("@") == 1


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(subject=HOSTILE, reply_to=HOSTILE, form_name=HOSTILE)
def test_building_a_notification_never_raises_and_adds_no_header(
    app: Flask, subject: str, reply_to: str, form_name: str
) -> None:
    # Straight through send_notification, with values intake could never store (surrogates).
    context = types.SimpleNamespace(
        owner_confirmed_at=dal.utcnow(),
        owner_email="owner@example.com",
        target="owner@example.com",
        form_public_id="f" * 22,
        submission_public_id="s" * 22,
        form_name=form_name,
        data={"email": reply_to, "message": "x"},
        meta={"subject": subject},
        created_at=dal.utcnow(),
    )
    with app.app_context():
        delivery.send_notification(context)
    fallback = delivery.header_text(f"New submission: {form_name}") or "New submission"
    check_notification(
        sent_bytes(app),
        delivery.header_text(subject) or fallback,
        delivery.header_address(reply_to),
    )


@pytest.fixture(autouse=True)
def _forget_shared() -> Iterator[None]:
    """Each test function starts with its own shared app."""
    yield
    _SHARED.clear()

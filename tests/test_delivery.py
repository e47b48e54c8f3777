"""Delivery: the outbox, the email and webhook tasks called directly, retries, SSRF, the sweeper."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import itertools
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

import dal
import delivery
import intake
import microapp
import records
import services
import tasks
from conftest import SMTPSink, WebhookReceiver, free_port, settle_deliveries


@pytest.fixture
def outbox_app(overrides: dict[str, Any], smtp_sink: SMTPSink) -> Flask:
    """Connected mode with Redis unreachable: intake stores rows, nothing is sent until we say."""
    app = microapp.create_app(
        **overrides,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        mail_backend="smtp",
        smtp_host="127.0.0.1",
        smtp_port=smtp_sink.port,
        smtp_starttls=False,
        mail_from="Mailslot <noreply@mailslot.test>",
        webhook_allow_private=True,
        webhook_read_timeout=0.5,
        delivery_retry_schedule=[0, 0, 0, 0, 0],
    )
    app.config["TESTING"] = True
    return app


def make_form(
    app: Flask, *, webhook_url: str | None = None, notify: bool = True, confirmed: bool = True
) -> records.Form:
    """An owner (confirmed unless told otherwise) with one lenient form."""
    with app.app_context():
        with dal.transaction() as conn:
            # A port number is no unique name: the system hands a released port out again.
            owner = dal.insert_user(conn, f"owner-{uuid.uuid4().hex[:12]}@example.com", "x")
            if confirmed:
                dal.mark_email_confirmed(conn, owner.id, owner.email)
        form = services.create_form(
            owner.id,
            {"name": "Contact", "notify": notify, "allowed_domains": [], "strict": False},
        )
        if webhook_url:
            services.set_webhook(form, webhook_url)
        return services.owned_form(owner.id, form.public_id)


def submit(app: Flask, form: records.Form, data: dict[str, Any]) -> str:
    """Post a JSON submission; the submission's public id."""
    response = app.test_client().post(f"/f/{form.public_id}", json=data)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.json["id"]


def deliveries(app: Flask, kind: str | None = None) -> list[sa.Row[Any]]:
    """Every delivery row, oldest first (after the deliveries handed off so far settled)."""
    settle_deliveries(app)
    with app.app_context(), dal.connection() as conn:
        query = sa.select(dal.deliveries).order_by(dal.deliveries.c.id)
        if kind:
            query = query.where(dal.deliveries.c.kind == kind)
        return list(conn.execute(query))


def run(app: Flask, fn: Callable[..., Any], *args: Any) -> Any:
    """Call a task function directly, inside the app context."""
    with app.app_context():
        return fn(*args)


# --- the outbox -------------------------------------------------------------------------------


def test_intake_writes_email_and_webhook_rows_in_the_submission_transaction(
    outbox_app: Flask, webhook_receiver: WebhookReceiver
) -> None:
    form = make_form(outbox_app, webhook_url=webhook_receiver.url)
    submit(outbox_app, form, {"message": "hi"})
    rows = deliveries(outbox_app)
    assert [(r.kind, r.status, r.attempts) for r in rows] == [
        ("email", "pending", 0),
        ("webhook", "pending", 0),
    ]
    assert rows[1].target == webhook_receiver.url


def test_unconfirmed_owner_gets_no_email_row(outbox_app: Flask) -> None:
    form = make_form(outbox_app, confirmed=False)
    submit(outbox_app, form, {"message": "hi"})
    assert deliveries(outbox_app) == []


def test_notify_off_means_no_email_row(outbox_app: Flask) -> None:
    form = make_form(outbox_app, notify=False)
    submit(outbox_app, form, {"message": "hi"})
    assert deliveries(outbox_app) == []


# --- the email task ---------------------------------------------------------------------------


def test_email_task_sends_the_notification_to_the_confirmed_owner(
    outbox_app: Flask, smtp_sink: SMTPSink
) -> None:
    form = make_form(outbox_app)
    sub_id = submit(
        outbox_app,
        form,
        {"name": "Ada", "email": "ada@example.org", "message": "Hello there", "_subject": "Quote"},
    )
    [row] = deliveries(outbox_app)
    assert run(outbox_app, tasks.deliver, row.id) == "done"
    [(mail_from, recipients, message)] = smtp_sink.messages
    assert mail_from == "noreply@mailslot.test"
    assert recipients == [row.target]
    assert message["Subject"] == "Quote"
    assert message["Reply-To"] == "ada@example.org"
    text = message.get_body(preferencelist=("plain",)).get_content()
    assert "name: Ada" in text
    assert "message: Hello there" in text
    assert f"http://mailslot.test/forms/{form.public_id}/submissions/{sub_id}" in text
    assert message.get_body(preferencelist=("html",)) is not None
    assert deliveries(outbox_app)[0].status == "done"


def test_default_subject_names_the_form(outbox_app: Flask, smtp_sink: SMTPSink) -> None:
    form = make_form(outbox_app)
    submit(outbox_app, form, {"message": "x"})
    run(outbox_app, tasks.deliver, deliveries(outbox_app)[0].id)
    assert smtp_sink.messages[0][2]["Subject"] == "New submission: Contact"
    assert smtp_sink.messages[0][2]["Reply-To"] is None


def test_header_injection_through_replyto_yields_one_recipient_and_no_bcc(
    outbox_app: Flask, smtp_sink: SMTPSink
) -> None:
    form = make_form(outbox_app)
    submit(
        outbox_app,
        form,
        {
            "message": "x",
            "_replyto": "a@example.org\r\nBcc: x@y.example",
            "_subject": "S\r\nBcc: z@y",
        },
    )
    run(outbox_app, tasks.deliver, deliveries(outbox_app)[0].id)
    [(_, recipients, message)] = smtp_sink.messages
    assert len(recipients) == 1
    assert message["Bcc"] is None
    assert "\n" not in message["Subject"]
    assert message["Reply-To"] is None  # not exactly one plain address: no Reply-To at all


@pytest.mark.parametrize(
    ("meta", "data", "expected"),
    [
        ({"reply_to": "a@example.org"}, {}, "a@example.org"),
        ({}, {"email": "Ada <ada@example.org>"}, "ada@example.org"),  # the name is dropped
        ({"reply_to": "not one"}, {"email": "ada@example.org"}, "ada@example.org"),
        ({}, {"email": "a@example.org, b@example.org"}, None),
        ({}, {"email": "not an address"}, None),
        ({"reply_to": "a@example.org\nBcc: b@example.org"}, {}, None),
        ({}, {"email": 42}, None),
    ],
)
def test_reply_to_is_used_only_when_it_is_one_address(
    meta: dict[str, Any], data: dict[str, Any], expected: str | None
) -> None:
    assert delivery.reply_to_address(meta, data) == expected


def test_permanent_smtp_refusal_goes_dead_at_once(outbox_app: Flask, smtp_sink: SMTPSink) -> None:
    smtp_sink.refuse_rcpt = "550 5.1.1 no such user"
    form = make_form(outbox_app)
    submit(outbox_app, form, {"message": "x"})
    assert run(outbox_app, tasks.deliver, deliveries(outbox_app)[0].id) == "dead"
    [row] = deliveries(outbox_app)
    assert row.status == "dead"
    assert row.attempts == 1
    assert "550" in row.last_error


def test_temporary_smtp_refusal_is_retried(outbox_app: Flask, smtp_sink: SMTPSink) -> None:
    smtp_sink.refuse_rcpt = "451 4.3.0 try later"
    form = make_form(outbox_app)
    submit(outbox_app, form, {"message": "x"})
    row_id = deliveries(outbox_app)[0].id
    assert run(outbox_app, tasks.deliver, row_id) == "retry"
    smtp_sink.refuse_rcpt = None
    assert run(outbox_app, tasks.deliver, row_id) == "done"
    assert deliveries(outbox_app)[0].attempts == 2


def test_a_message_left_from_an_earlier_attempt_sends_nothing(
    outbox_app: Flask, smtp_sink: SMTPSink
) -> None:
    # The sweeper may publish a row whose first message is still queued; after that message's
    # attempt failed, the second must not bring the retry forward (or ignore a Retry-After).
    smtp_sink.refuse_rcpt = "451 4.3.0 try later"
    form = make_form(outbox_app)
    submit(outbox_app, form, {"message": "x"})
    row_id = deliveries(outbox_app)[0].id
    assert run(outbox_app, tasks.deliver, row_id, 0) == "retry"
    smtp_sink.refuse_rcpt = None
    assert run(outbox_app, tasks.deliver, row_id, 0) == "skipped"  # stale: written for attempt 1
    assert smtp_sink.messages == []
    assert run(outbox_app, tasks.deliver, row_id, 1) == "done"  # the sweeper's, for attempt 2
    assert deliveries(outbox_app)[0].attempts == 2


def test_smtp_connection_refused_is_retried_then_dead_after_the_last_attempt(
    outbox_app: Flask, smtp_sink: SMTPSink
) -> None:
    outbox_app.extensions["mailslot.settings"].smtp_port = free_port()  # nobody listens there
    form = make_form(outbox_app)
    submit(outbox_app, form, {"message": "x"})
    row_id = deliveries(outbox_app)[0].id
    outcomes = [run(outbox_app, tasks.deliver, row_id) for _ in range(5)]
    assert outcomes == ["retry", "retry", "retry", "retry", "dead"]
    row = deliveries(outbox_app)[0]
    assert row.status == "dead"
    assert "SMTP" in row.last_error


# --- the webhook task -------------------------------------------------------------------------


def test_signature_matches_the_standard_webhooks_vector() -> None:
    signature = delivery.sign_webhook(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """A receiver's check, written from the Standard Webhooks spec rather than our code."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        part.split(",", 1)[1] == expected for part in headers["webhook-signature"].split(" ")
    )


def test_webhook_is_signed_and_carries_the_submission(
    outbox_app: Flask, webhook_receiver: WebhookReceiver
) -> None:
    form = make_form(outbox_app, webhook_url=webhook_receiver.url, notify=False)
    sub_id = submit(outbox_app, form, {"message": "hello"})
    [row] = deliveries(outbox_app)
    assert run(outbox_app, tasks.deliver, row.id) == "done"
    [request] = webhook_receiver.requests
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"] == f"msg_{row.id}"
    assert verify(form.webhook_secret, headers, request["body"])
    assert form.webhook_secret.startswith("whsec_")
    assert len(base64.b64decode(form.webhook_secret.removeprefix("whsec_"))) >= 24
    body = webhook_receiver.bodies()[0]
    assert body["type"] == "submission.created"
    assert body["data"]["form"] == {"id": form.public_id, "name": "Contact"}
    assert body["data"]["submission"]["id"] == sub_id
    assert body["data"]["submission"]["data"] == {"message": "hello"}


def test_webhook_500_500_timeout_200_takes_four_attempts_then_done(
    outbox_app: Flask, webhook_receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    webhook_receiver.script = [500, 500, "timeout", 200]
    clock = itertools.count(1_800_000_000, 60)
    monkeypatch.setattr(delivery.time, "time", lambda: next(clock))
    form = make_form(outbox_app, webhook_url=webhook_receiver.url, notify=False)
    submit(outbox_app, form, {"message": "x"})
    row_id = deliveries(outbox_app)[0].id
    outcomes = [run(outbox_app, tasks.deliver, row_id) for _ in range(4)]
    assert outcomes == ["retry", "retry", "retry", "done"]
    row = deliveries(outbox_app)[0]
    assert (row.status, row.attempts) == ("done", 4)
    ids = {r["headers"]["webhook-id"] for r in webhook_receiver.requests}
    stamps = [int(r["headers"]["webhook-timestamp"]) for r in webhook_receiver.requests]
    assert ids == {f"msg_{row_id}"}
    assert len(set(stamps)) == 4
    assert stamps == sorted(stamps)
    assert all(
        verify(form.webhook_secret, r["headers"], r["body"]) for r in webhook_receiver.requests
    )


def test_webhook_410_disables_the_webhook(
    outbox_app: Flask, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script = [410]
    form = make_form(outbox_app, webhook_url=webhook_receiver.url, notify=False)
    submit(outbox_app, form, {"message": "x"})
    assert run(outbox_app, tasks.deliver, deliveries(outbox_app)[0].id) == "dead"
    with outbox_app.app_context():
        assert intake.public_form(form.public_id).webhook_url is None
    assert "410" in deliveries(outbox_app)[0].last_error


def test_webhook_redirect_is_a_failure_and_not_followed(
    outbox_app: Flask, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script = [(302, {"Location": "http://127.0.0.1:1/elsewhere"})]
    form = make_form(outbox_app, webhook_url=webhook_receiver.url, notify=False)
    submit(outbox_app, form, {"message": "x"})
    assert run(outbox_app, tasks.deliver, deliveries(outbox_app)[0].id) == "retry"
    assert len(webhook_receiver.requests) == 1
    assert "302" in deliveries(outbox_app)[0].last_error


def test_webhook_429_honours_retry_after(
    outbox_app: Flask, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script = [(429, {"Retry-After": "120"})]
    form = make_form(outbox_app, webhook_url=webhook_receiver.url, notify=False)
    submit(outbox_app, form, {"message": "x"})
    before = dal.utcnow()
    assert run(outbox_app, tasks.deliver, deliveries(outbox_app)[0].id) == "retry"
    row = deliveries(outbox_app)[0]
    assert row.status == "pending"
    assert row.next_attempt_at >= before + dt.timedelta(seconds=119)


@pytest.fixture
def second_receiver() -> Any:
    """Another running webhook receiver: where the owner moves their webhook to."""
    receiver = WebhookReceiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def current_form(app: Flask, form: records.Form) -> records.Form:
    """The form as stored now."""
    with app.app_context():
        return services.owned_form(form.owner_id, form.public_id)


def test_a_retry_goes_to_the_url_and_secret_the_form_has_now(
    outbox_app: Flask, webhook_receiver: WebhookReceiver, second_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script = [500]
    form = make_form(outbox_app, webhook_url=webhook_receiver.url, notify=False)
    submit(outbox_app, form, {"message": "x"})
    row_id = deliveries(outbox_app)[0].id
    assert run(outbox_app, tasks.deliver, row_id) == "retry"
    with outbox_app.app_context():
        services.set_webhook(form, second_receiver.url)
        services.rotate_webhook_secret(form)
    assert deliveries(outbox_app)[0].target == second_receiver.url  # the list shows the new one
    assert run(outbox_app, tasks.deliver, row_id) == "done"
    assert len(webhook_receiver.requests) == 1
    [request] = second_receiver.requests
    secret = current_form(outbox_app, form).webhook_secret
    assert secret != form.webhook_secret
    assert verify(secret, {k.lower(): v for k, v in request["headers"].items()}, request["body"])
    row = deliveries(outbox_app)[0]
    assert (row.status, row.target) == ("done", second_receiver.url)


def test_a_replay_goes_to_the_current_url_and_records_it(
    outbox_app: Flask, webhook_receiver: WebhookReceiver, second_receiver: WebhookReceiver
) -> None:
    form = make_form(outbox_app, webhook_url=webhook_receiver.url, notify=False)
    sub_id = submit(outbox_app, form, {"message": "x"})
    row_id = deliveries(outbox_app)[0].id
    assert run(outbox_app, tasks.deliver, row_id) == "done"
    with outbox_app.app_context():
        services.set_webhook(form, second_receiver.url)
        assert deliveries(outbox_app)[0].target == webhook_receiver.url  # done: where it went
        assert services.replay_delivery(services.owned_submission(form, sub_id), row_id)
        assert tasks.deliver(row_id) == "done"
    assert len(second_receiver.requests) == 1
    assert deliveries(outbox_app)[0].target == second_receiver.url


def test_removing_the_webhook_cancels_its_pending_and_held_deliveries(
    outbox_app: Flask, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script = [500]
    form = make_form(outbox_app, webhook_url=webhook_receiver.url)
    submit(outbox_app, form, {"message": "first"})
    submit(outbox_app, form, {"message": "second"})
    first_webhook = deliveries(outbox_app, "webhook")[0].id
    assert run(outbox_app, tasks.deliver, first_webhook) == "retry"  # pending, retry scheduled
    with outbox_app.app_context(), dal.transaction() as conn:  # the second as spam would be
        conn.execute(
            sa.update(dal.deliveries)
            .where(dal.deliveries.c.id == deliveries(outbox_app, "webhook")[1].id)
            .values(status="held")
        )
    with outbox_app.app_context():
        services.set_webhook(form, None)
    webhooks = deliveries(outbox_app, "webhook")
    assert [(r.status, r.last_error) for r in webhooks] == [
        ("dead", "cancelled: the form's webhook was removed"),
    ] * 2
    assert {r.status for r in deliveries(outbox_app, "email")} == {"pending"}  # untouched
    assert [run(outbox_app, tasks.deliver, r.id) for r in webhooks] == ["skipped"] * 2
    assert len(webhook_receiver.requests) == 1  # only the first attempt, before the removal
    with outbox_app.app_context():
        assert [r.id for r in services.dead_deliveries(form)] == [r.id for r in webhooks][::-1]


def test_a_410_cancels_the_forms_other_webhook_deliveries(
    outbox_app: Flask, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script = [410]
    form = make_form(outbox_app, webhook_url=webhook_receiver.url, notify=False)
    submit(outbox_app, form, {"message": "first"})
    submit(outbox_app, form, {"message": "second"})
    first, second = (r.id for r in deliveries(outbox_app))
    assert run(outbox_app, tasks.deliver, first) == "dead"
    assert run(outbox_app, tasks.deliver, second) == "skipped"
    assert len(webhook_receiver.requests) == 1
    row = deliveries(outbox_app)[1]
    assert row.status == "dead"
    assert "410" in row.last_error


@pytest.mark.parametrize(
    ("hangs", "error"), [(False, "does not resolve"), (True, "took longer than 0.2 s")]
)
def test_a_webhook_host_that_does_not_resolve_now_is_retried_not_dead(
    outbox_app: Flask, monkeypatch: pytest.MonkeyPatch, hangs: bool, error: str
) -> None:
    released = threading.Event()

    def resolver(host: Any, *args: Any, **kwargs: Any) -> Any:
        if hangs:
            released.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    outbox_app.extensions["mailslot.settings"].webhook_dns_timeout = 0.2
    form = make_form(outbox_app, webhook_url="https://hooks.example.com/in", notify=False)
    submit(outbox_app, form, {"message": "x"})
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    try:
        assert run(outbox_app, tasks.deliver, deliveries(outbox_app)[0].id) == "retry"
    finally:
        released.set()
    row = deliveries(outbox_app)[0]
    assert row.status == "pending"
    assert error in row.last_error


def test_the_connection_goes_to_the_address_that_was_checked(
    outbox_app: Flask, webhook_receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DNS rebinding: the name answers the checked address once, then somewhere else.
    answers = iter(["127.0.0.1", "127.0.0.2", "127.0.0.2"])
    lookups: list[str] = []
    real = socket.getaddrinfo

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.evil.test":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        return real(next(answers), port, *args, **kwargs)

    port = webhook_receiver.url.split(":")[2].split("/")[0]
    form = make_form(outbox_app, webhook_url=f"http://rebind.evil.test:{port}/hook", notify=False)
    submit(outbox_app, form, {"message": "x"})
    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    assert run(outbox_app, tasks.deliver, deliveries(outbox_app)[0].id) == "done"
    assert lookups == ["rebind.evil.test"]
    [request] = webhook_receiver.requests
    assert request["headers"]["Host"] == f"rebind.evil.test:{port}"


# --- SSRF -------------------------------------------------------------------------------------

HOSTILE_URLS = [
    "http://127.0.0.1/",
    "http://127.1/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0177.0.0.1/",
    "http://017700000001/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://localhost/",
    "http://localhost./",
    "http://api.localhost/",  # every *.localhost name is loopback (RFC 6761)
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://[fc00::1]/",
    "http://loopback.evil.test/",  # a name that resolves to loopback (patched resolver)
    "http://mixed.evil.test/",  # one public record and one private one
    "ftp://example.com/",
    "file:///etc/passwd",
    "http://user:pass@93.184.215.14/",
    "http://@93.184.215.14/",
    "http://example.com\\@127.0.0.1/",
    # IPv6 forms that carry an IPv4 address, each carrying a non-public one
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 well-known prefix: 169.254.169.254
    "http://[64:ff9b::127.0.0.1]/",
    "http://[64:ff9b:1::a9fe:a9fe]/",  # NAT64 local-use prefix (RFC 8215), /96 position
    "http://[64:ff9b:1:a9fe:a9:fe00::]/",  # ... /48 position
    "http://[64:ff9b:1:7f00:1::]/",  # ... /64 position: 127.0.0.1
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "http://[2002:a9fe:a9fe::1]/",
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",  # Teredo, client 127.0.0.1
    "http://[2001:0:a9fe:a9fe::]/",  # Teredo, server 169.254.169.254
    "http://[::127.0.0.1]/",  # IPv4-compatible
    "http://[::a9fe:a9fe]/",
    "http://[::ffff:0:7f00:1]/",  # IPv4-translated
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:0.0.0.0]/",
    # IPv4 spellings, zones, dots and the ranges is_global gets wrong
    "http://0x7f.1/",
    "http://0/",
    "http://127.0.0.1./",
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/",  # 127.0.0.1 in full-width digits
    "http://[fe80::1%25eth0]/",
    "http://[::1%25lo]/",
    "http://255.255.255.255/",
    "http://192.88.99.1/",  # 6to4 relay anycast
    "http://198.18.0.1/",  # benchmarking
    "http://192.0.2.1/",  # documentation
    "http://240.0.0.1/",
    "http://239.255.255.250/",
    "http://[ff02::1]/",
    "http://[ff0e::1]/",  # global-scope multicast: is_global says True
    "http://[fec0::1]/",  # site-local: is_global says True
    "http://[2001:db8::1]/",
    "http://[3fff::1]/",  # documentation (RFC 9637)
    "http://[5f00::1]/",  # SRv6 SIDs (RFC 9602)
    "http://[100::1]/",  # discard-only
    "http://[2001:2::1]/",  # benchmarking
    "http://[4000::1]/",  # not global unicast
]


@pytest.fixture
def evil_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make one test name resolve to loopback, as a hostile DNS record would."""
    real = socket.getaddrinfo

    def fake(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "loopback.evil.test":
            return real("127.0.0.1", *args, **kwargs)
        if host == "mixed.evil.test":
            return real("93.184.215.14", *args, **kwargs) + real("10.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


@pytest.mark.usefixtures("evil_dns")
@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_hostile_webhook_urls_are_refused_on_save(app: Flask, url: str) -> None:
    with app.app_context():
        assert services.check_webhook_url(url) is not None


@pytest.mark.usefixtures("evil_dns")
@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_hostile_webhook_urls_are_refused_on_send(outbox_app: Flask, url: str) -> None:
    outbox_app.extensions["mailslot.settings"].webhook_allow_private = False
    form = make_form(outbox_app, webhook_url=url, notify=False)
    submit(outbox_app, form, {"message": "x"})
    assert run(outbox_app, tasks.deliver, deliveries(outbox_app)[0].id) == "dead"
    assert "webhook refused" in deliveries(outbox_app)[0].last_error


def test_public_address_passes_the_check(app: Flask) -> None:
    with app.app_context():
        assert services.check_webhook_url("http://93.184.215.14/hook") is None


# --- claiming, the sweeper and deliver-pending --------------------------------------------------


def test_the_same_task_run_twice_at_once_sends_once(
    outbox_app: Flask, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script = ["timeout"]
    webhook_receiver.slow_seconds = 0.3
    outbox_app.extensions["mailslot.settings"].webhook_read_timeout = 5
    form = make_form(outbox_app, webhook_url=webhook_receiver.url, notify=False)
    submit(outbox_app, form, {"message": "x"})
    row_id = deliveries(outbox_app)[0].id
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(run(outbox_app, tasks.deliver, row_id)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["done", "skipped"]
    assert len(webhook_receiver.requests) == 1
    assert run(outbox_app, tasks.deliver, row_id) == "skipped"


def test_sweeper_picks_due_and_stale_rows_and_nothing_else(outbox_app: Flask) -> None:
    form = make_form(outbox_app)
    for _ in range(6):
        submit(outbox_app, form, {"message": "x"})
    ids = [r.id for r in deliveries(outbox_app)]
    now = dal.utcnow()
    states = {
        ids[0]: ("pending", now - dt.timedelta(seconds=1)),  # due
        ids[1]: ("pending", now + dt.timedelta(hours=1)),  # retry not due yet
        ids[2]: ("sending", now - dt.timedelta(seconds=1)),  # lease ran out: stale
        ids[3]: ("sending", now + dt.timedelta(minutes=5)),  # live lease
        ids[4]: ("done", now - dt.timedelta(hours=1)),
        ids[5]: ("dead", now - dt.timedelta(hours=1)),
    }
    with outbox_app.app_context(), dal.transaction() as conn:
        for row_id, (status, when) in states.items():
            conn.execute(
                sa.update(dal.deliveries)
                .where(dal.deliveries.c.id == row_id)
                .values(status=status, next_attempt_at=when)
            )
    with outbox_app.app_context(), dal.transaction() as conn:
        picked = dal.due_deliveries(conn, 100, push_back_seconds=300)
    assert sorted(picked) == [(ids[0], 0), (ids[2], 0)]
    with outbox_app.app_context(), dal.transaction() as conn:
        assert dal.due_deliveries(conn, 100, push_back_seconds=300) == [(ids[2], 0)]


def test_deliver_pending_command_delivers_with_no_worker(
    outbox_app: Flask, smtp_sink: SMTPSink, webhook_receiver: WebhookReceiver
) -> None:
    form = make_form(outbox_app, webhook_url=webhook_receiver.url)
    for n in range(3):
        submit(outbox_app, form, {"n": n})
    result = outbox_app.test_cli_runner().invoke(args=["deliver-pending"])
    assert result.exit_code == 0, result.output
    assert "6 pending deliveries" in result.output
    assert len(smtp_sink.messages) == 3
    assert len(webhook_receiver.requests) == 3
    assert {r.status for r in deliveries(outbox_app)} == {"done"}


def test_replay_sends_a_dead_delivery_again(
    outbox_app: Flask, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script = [410]
    form = make_form(outbox_app, webhook_url=webhook_receiver.url, notify=False)
    sub_id = submit(outbox_app, form, {"message": "x"})
    row_id = deliveries(outbox_app)[0].id
    run(outbox_app, tasks.deliver, row_id)
    with outbox_app.app_context():
        services.set_webhook(
            services.owned_form(form.owner_id, form.public_id), webhook_receiver.url
        )
        submission = services.owned_submission(form, sub_id)
        assert services.replay_delivery(submission, row_id)
        assert not services.replay_delivery(submission, row_id + 999)
        tasks.deliver(row_id)
    assert deliveries(outbox_app)[0].status == "done"
    assert len(webhook_receiver.requests) == 2


def test_a_failure_to_enqueue_never_reaches_the_submitter(outbox_app: Flask) -> None:
    form = make_form(outbox_app)
    response = outbox_app.test_client().post(
        f"/f/{form.public_id}", data={"message": "x"}, headers={"Accept": "text/html"}
    )
    assert response.status_code == 303
    assert deliveries(outbox_app)[0].status == "pending"


@pytest.mark.parametrize(
    ("attempts", "retry_after", "low", "high"),
    [(1, None, 27, 33), (2, None, 108, 132), (1, 600, 600, 600), (10, None, None, None)],
)
def test_retry_schedule_has_jitter_and_an_end(
    attempts: int, retry_after: float | None, low: float | None, high: float | None
) -> None:
    schedule = [0, 30, 120, 600, 1800, 3600, 10800, 21600, 43200, 86400]
    delay = tasks.next_attempt_delay(attempts, schedule, retry_after)
    if low is None:
        assert delay is None
    else:
        assert delay is not None
        assert low <= delay <= high

"""How each delivery is made, apart from Celery: checking every header value, building and
sending email (the console and SMTP backends), the account emails and their links, composing the
notification, and webhooks (the Standard Webhooks body and signature, the address checks that keep
them off private networks, and connections pinned to the checked address).

``tasks`` claims an outbox row and calls ``send_notification``, ``send_account_email`` or
``send_webhook``; each raises PermanentFailure or TemporaryFailure when the attempt failed. This
module must not know Celery, the retry schedule or outbox claims.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.errors
import email.policy
import hashlib
import hmac
import http.client
import ipaddress
import json
import re
import smtplib
import socket
import ssl
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import email_validator
import structlog
from flask import current_app, render_template
from itsdangerous import URLSafeTimedSerializer

import dal
import records
from links import external_url
from settings import current_settings

if TYPE_CHECKING:
    from settings import Settings

log = structlog.get_logger("mailslot.delivery")

# =================================================================================================
# How an attempt failed
# =================================================================================================


class PermanentFailure(Exception):
    """Trying again cannot help (5xx to RCPT, webhook refused by policy, 410 Gone)."""

    def __init__(self, message: str, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


class TemporaryFailure(Exception):
    """Worth another attempt later (connection errors, 4xx SMTP, 429/5xx/timeouts)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# =================================================================================================
# Header values: decoded, then flattened or refused, before any message is built
# =================================================================================================
# Python's email package decodes RFC 2047 encoded words in a header value it is given, so a
# value with no CR or LF can still become several headers once it is set (CVE-2024-6923). Every
# value bound for a header is therefore decoded here first, exactly as the package would read
# it, and only then judged: text is flattened to one line, an address is taken or refused whole.

SUBJECT_MAX_LENGTH = 200
DISPLAY_NAME_MAX_LENGTH = 100
_DECODE_ROUNDS = 4  # an encoded word may carry another one; more nesting than this is refused
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_LINE_LIKE = frozenset({"Cc", "Zl", "Zp"})
_STRICT_PARSE = email.policy.default.clone(raise_on_defect=True)


class UnsafeMessage(PermanentFailure):
    """A message whose headers are not exactly the ones we set, or lack a usable address.

    Permanent: the same values would fail the same way on every attempt.
    """


def _without_surrogates(text: str) -> str:
    """``text`` without lone surrogates (no encoding can carry them)."""
    return "".join(ch for ch in text if not "\ud800" <= ch <= "\udfff")


def _parsed_unstructured(text: str) -> str | None:
    """What the email package makes of ``text`` as a header value; None if it cannot."""
    try:
        return str(email.policy.default.header_factory("subject", text))
    except Exception:  # noqa: BLE001 - hostile input: whatever the parser chokes on is refused
        return None


def _decoded(value: Any) -> str | None:
    """A string with its encoded words decoded until none is left, NFC; None if unreadable."""
    if not isinstance(value, str):
        return None
    text = _without_surrogates(value)
    for _ in range(_DECODE_ROUNDS):
        decoded = _parsed_unstructured(text)
        if decoded is None:
            return None
        decoded = _without_surrogates(decoded)  # undecodable bytes come back as surrogates
        if decoded == text:
            return unicodedata.normalize("NFC", text)
        text = decoded
    return None


def _flatten(text: str) -> str:
    """One line: line breaks, other control characters and separators become single spaces,
    bidirectional overrides go."""
    kept = (
        " " if unicodedata.category(ch) in _LINE_LIKE else ch
        for ch in text
        if ch not in _BIDI_CONTROLS
    )
    return " ".join("".join(kept).split())


def header_text(value: Any, max_length: int = SUBJECT_MAX_LENGTH) -> str | None:
    """A value fit for an unstructured header (Subject, a display name), or None when nothing
    usable is left.

    Encoded words are decoded (nested ones too), the text is normalised (NFC) and flattened to
    one line of at most ``max_length`` characters, and what still looks like an encoded word
    (unknown charset, bad encoding) is broken up ("=?" -> "= ?") so that no reader decodes it
    later. The result reads back unchanged through the email package.
    """
    decoded = _decoded(value)
    if decoded is None:
        return None
    text = _flatten(decoded).replace("=?", "= ?")[:max_length].rstrip()
    if not text or _parsed_unstructured(text) != text:
        return None
    return text


def _single_mailbox(value: Any) -> tuple[str, str] | None:
    """(display name, addr-spec) when ``value`` decodes to exactly one mailbox, else None.

    Refused rather than repaired: line breaks or other control characters anywhere, groups,
    several addresses, anything the address parser finds a defect in.
    """
    if isinstance(value, str) and _without_surrogates(value) != value:
        return None  # an address is taken whole or not at all
    text = _decoded(value)
    if text is None:
        return None
    text = text.strip()
    if not text or any(
        unicodedata.category(ch) in _LINE_LIKE or ch in _BIDI_CONTROLS for ch in text
    ):
        return None
    try:
        header = email.policy.default.header_factory("reply-to", text)
        groups = header.groups
    except Exception:  # noqa: BLE001 - hostile input: whatever the parser chokes on is refused
        return None
    if header.defects or len(groups) != 1 or groups[0].display_name is not None:
        return None
    if len(groups[0].addresses) != 1:
        return None
    mailbox = groups[0].addresses[0]
    if not mailbox.addr_spec or any(ch.isspace() for ch in mailbox.addr_spec):
        return None
    return mailbox.display_name, mailbox.addr_spec


def header_address(value: Any, *, checked: bool = True) -> str | None:
    """One bare address for To or Reply-To, or None.

    ``value`` must decode to exactly one mailbox; its display name is dropped (a submitter's
    name is no one's business in a header, and ``"boss@bank.example" <eve@…>`` is a trick).
    ``checked`` (submitted values) also requires an address email-validator accepts, with no
    quoted local part, IP literal or non-ASCII local part; the domain comes back in ASCII.
    Stored addresses (the owner's, validated at sign-up) need only the mailbox shape.
    """
    mailbox = _single_mailbox(value)
    if mailbox is None:
        return None
    address = mailbox[1]
    if not checked:
        return address if address.count("@") == 1 else None
    try:
        valid = email_validator.validate_email(
            address,
            check_deliverability=False,
            allow_smtputf8=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
        )
    except email_validator.EmailNotValidError:
        return None
    return valid.ascii_email


def sender_address(mail_from: str) -> Address | None:
    """MAIL_FROM as a From header: one mailbox, its display name flattened; None if unusable."""
    mailbox = _single_mailbox(mail_from)
    if mailbox is None or mailbox[1].count("@") != 1:
        return None
    name = header_text(mailbox[0], DISPLAY_NAME_MAX_LENGTH) or ""
    try:
        return Address(display_name=name, addr_spec=mailbox[1])
    except (ValueError, IndexError, email.errors.HeaderParseError):
        return None


def _squeezed(text: str) -> str:
    """``text`` without any whitespace."""
    return "".join(text.split())


def check_serialised(message: EmailMessage) -> bytes:
    """The message's bytes, once they are shown to hold exactly the headers that were set.

    Defence in depth: the bytes are parsed back (strictly, and by the lenient legacy parser a
    receiver may use) and must name the same headers, once each, with the same values and no
    line break inside any of them. Anything else raises UnsafeMessage.
    """
    raw = bytes(message)
    expected = sorted(name.lower() for name in message)
    try:
        strict = email.message_from_bytes(raw, policy=_STRICT_PARSE)
    except (email.errors.MessageError, ValueError) as exc:
        raise UnsafeMessage(f"the message does not parse back: {exc}") from None
    legacy = email.message_from_bytes(raw)
    for reader in (strict, legacy):
        found = sorted(name.lower() for name in reader)
        if found != expected:
            raise UnsafeMessage(f"the message would carry {found}, not {expected}")
    for name in message:
        value = str(strict[name])
        # The email package's folding may move the value to the next line, or lose the space
        # between two encoded words (a known bug): compare the text without its spaces.
        if _squeezed(value) != _squeezed(str(message[name])) or "\r" in value or "\n" in value:
            raise UnsafeMessage(f"the {name} header does not read back as it was set")
    return raw


# =================================================================================================
# Mail backends
# =================================================================================================


def build_message(
    *, to: str, subject: str, text: str, html: str | None = None, reply_to: str | None = None
) -> EmailMessage:
    """A text (and optional HTML) message from MAIL_FROM, every header value checked first.

    Each value goes through ``header_text`` or ``header_address`` before the message exists:
    an unusable subject becomes "Mailslot", an unusable Reply-To is left out, and an unusable
    sender or recipient raises UnsafeMessage. The bytes are then read back (``check_serialised``).
    """
    settings = current_settings()
    sender = sender_address(settings.mail_from)
    if sender is None:
        raise UnsafeMessage("MAIL_FROM is not one usable address; fix the setting")
    recipient = header_address(to, checked=False)
    if recipient is None:
        raise UnsafeMessage("the recipient is not one usable address")
    message = EmailMessage()
    message["From"] = sender
    message["To"] = Address(addr_spec=recipient)
    message["Subject"] = header_text(subject) or "Mailslot"
    message["Date"] = formatdate(localtime=False)
    # Our own ids, not make_msgid's or the generator's: those draw on the global random state,
    # which delivery threads must leave alone.
    message["Message-ID"] = f"<{uuid.uuid4().hex}@mailslot>"
    reply_address = header_address(reply_to)
    if reply_address:
        message["Reply-To"] = Address(addr_spec=reply_address)
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
        message.set_boundary(f"=_mailslot_{uuid.uuid4().hex}")
    check_serialised(message)
    return message


def send_mail(
    *, to: str, subject: str, text: str, html: str | None = None, reply_to: str | None = None
) -> EmailMessage:
    """Build a message and send it through the configured backend."""
    message = build_message(to=to, subject=subject, text=text, html=html, reply_to=reply_to)
    transmit(message)
    return message


def transmit(message: EmailMessage) -> None:
    """Send a built message: SMTP, or the console (log + .eml in the outbox)."""
    settings = current_settings()
    if settings.mail_backend == "smtp":
        _send_smtp(settings, message)
    else:
        _write_outbox(settings, message)


def _write_outbox(settings: Settings, message: EmailMessage) -> None:
    """Console backend: write the message under instance/outbox/ and log where it is."""
    outbox = settings.instance_dir / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    path = outbox / f"{stamp}-{uuid.uuid4().hex[:8]}.eml"
    path.write_bytes(bytes(message))
    log.info("mail.written", to=message["To"], subject=message["Subject"], path=str(path))


def _send_smtp(settings: Settings, message: EmailMessage) -> None:
    """SMTP backend: connect with a timeout, STARTTLS and log in when configured, send."""
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout) as s:
        if settings.smtp_starttls:
            s.starttls(context=ssl.create_default_context())
        if settings.smtp_username:
            s.login(settings.smtp_username, settings.smtp_password.get_secret_value())
        # The envelope names exactly the checked sender and recipient, whatever the headers say.
        s.send_message(
            message,
            from_addr=message["From"].addresses[0].addr_spec,
            to_addrs=[message["To"].addresses[0].addr_spec],
        )
    log.info("mail.sent", to=message["To"], subject=message["Subject"])


# =================================================================================================
# Notification email
# =================================================================================================


def reply_to_address(meta: dict[str, Any], data: dict[str, Any]) -> str | None:
    """Reply-To from _replyto, else from an ``email`` field: the first that is exactly one
    usable address (see ``header_address``)."""
    for candidate in (meta.get("reply_to"), data.get("email")):
        address = header_address(candidate)
        if address:
            return address
    return None


def send_notification(context: records.SubmissionDelivery) -> None:
    """Email the form's owner about one submission, only ever to the confirmed address.

    A submitter's subject or reply address that cannot be used is left out, never the email:
    if the checked message still does not read back as built, it goes with Mailslot's own
    subject and no Reply-To.
    """
    if context.owner_confirmed_at is None or context.target != context.owner_email:
        raise PermanentFailure("the owner's address is not confirmed (or changed)")
    link = external_url(
        "dashboard.submission_detail",
        public_id=context.form_public_id,
        submission_id=context.submission_public_id,
    )
    values = {
        "form_name": context.form_name,
        "data": context.data,
        "received_at": context.created_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "link": link,
    }
    default_subject = header_text(f"New submission: {context.form_name}") or "New submission"
    parts = {
        "to": context.owner_email,
        "text": render_template("email/submission.txt", **values),
        "html": render_template("email/submission.html", **values),
    }
    try:
        message = build_message(
            subject=header_text(context.meta.get("subject")) or default_subject,
            reply_to=reply_to_address(context.meta, context.data),
            **parts,
        )
    except UnsafeMessage as exc:
        log.warning("mail.submitted_headers_dropped", reason=str(exc)[:300])
        message = build_message(subject="New submission", **parts)
    transmit_or_classify(message)


def transmit_or_classify(message: EmailMessage) -> None:
    """Send a built message; SMTP refusals become Permanent- or TemporaryFailure."""
    try:
        transmit(message)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        text = f"recipient refused: {codes}"
        if codes and all(code >= 500 for code in codes):
            raise PermanentFailure(text) from None
        raise TemporaryFailure(text) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise TemporaryFailure(f"SMTP: {type(exc).__name__}: {exc}") from None


# =================================================================================================
# Account emails
# =================================================================================================
# Each is an outbox row naming its account and its template: claimed, retried, listed and
# replayed like a notification. Links are made from ids when the email is sent, so a row never
# holds a token, and no email ever holds a password or a code.


@dataclass(frozen=True)
class AccountEmail:
    """One kind of account email: its subject, its templates and what they are given."""

    label: str  # what the owner's account page calls it
    subject: str
    template: str  # "email/<name>": .txt and .html
    # The templates' values, or None when the email is no longer needed (the note says why).
    values: Callable[[records.AccountDelivery], dict[str, Any] | None]
    skipped_note: str = ""
    # Sent to the account's current address only (a row queued for an old address is dead).
    to_account_address: bool = True


def confirm_serializer() -> URLSafeTimedSerializer:
    """Signs email-confirmation tokens with the app's secret (``users`` checks them)."""
    return URLSafeTimedSerializer(current_app.secret_key, salt="mailslot.confirm-email")


def confirmation_link(user_id: int, email: str) -> str:
    """A signed, expiring link that confirms this address for this owner (made at send time)."""
    token = confirm_serializer().dumps({"uid": user_id, "email": email})
    return external_url("accounts.confirm_email", token=token)


def _confirm_values(context: records.AccountDelivery) -> dict[str, Any] | None:
    """A fresh confirmation link for the account's current address; None once confirmed."""
    if context.user_confirmed_at is not None:
        return None
    link = confirmation_link(context.user_id, context.user_email)
    return {"link": link, "email": context.user_email}


def _account_exists_values(context: records.AccountDelivery) -> dict[str, Any]:
    """The address and where to log in (nothing secret: the person asking may not own it)."""
    return {"email": context.user_email, "login_link": external_url("accounts.login")}


ACCOUNT_EMAILS: dict[str, AccountEmail] = {
    "confirm_email": AccountEmail(
        label="Address confirmation",
        subject="Confirm your Mailslot address",
        template="email/confirm",
        values=_confirm_values,
        skipped_note="not sent: the address was confirmed before it went out",
    ),
    "account_exists": AccountEmail(
        label="Sign-up attempt with your address",
        subject="Someone tried to sign up to Mailslot with your address",
        template="email/account_exists",
        values=_account_exists_values,
    ),
}


def send_account_email(context: records.AccountDelivery) -> str | None:
    """Send one account email; a note when it was no longer needed and was not sent."""
    spec = ACCOUNT_EMAILS.get(context.template)
    if spec is None:
        raise PermanentFailure(f"Mailslot has no account email called {context.template!r}")
    if spec.to_account_address and context.target != context.user_email:
        raise PermanentFailure("the account's address changed after this email was queued")
    values = spec.values(context)
    if values is None:
        return spec.skipped_note
    message = build_message(
        to=context.target,
        subject=spec.subject,
        text=render_template(f"{spec.template}.txt", **values),
        html=render_template(f"{spec.template}.html", **values),
    )
    transmit_or_classify(message)
    return None


# =================================================================================================
# Webhook addresses: only public ones, checked once and then pinned
# =================================================================================================


class BlockedAddress(ValueError):
    """A webhook URL that is not http(s) or resolves to a non-public address."""


class HostNotResolved(BlockedAddress):
    """The webhook's host name gave no address in time: worth trying again later."""


# How the webhook check sorts an address: "public" passes, "private" (loopback, the private and
# shared ranges) passes only with WEBHOOK_ALLOW_PRIVATE, "blocked" never does. Python's is_global
# is the base; the lists add what it gets wrong or what no webhook receiver can be (multicast,
# site-local, 6to4 relays, the IPv6 ranges that are not global unicast, ...).
PUBLIC, PRIVATE, BLOCKED = "public", "private", "blocked"
_SEVERITY = {PUBLIC: 0, PRIVATE: 1, BLOCKED: 2}
_PRIVATE_V4 = [
    ipaddress.IPv4Network(net)
    for net in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
]
_BLOCKED_V4 = [
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8", "169.254.0.0/16", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    )
]  # fmt: skip
_PRIVATE_V6 = [ipaddress.IPv6Network(net) for net in ("::1/128", "fc00::/7", "64:ff9b:1::/48")]
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_BLOCKED_V6 = [
    ipaddress.IPv6Network(net)
    # IETF protocol assignments (Teredo, benchmarking, ORCHID...), documentation, SRv6 SIDs
    for net in ("2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16")
]
# IPv6 prefixes that only carry an IPv4 address (to a translator): judged by that address alone.
_CARRIERS_V6 = [
    ipaddress.IPv6Network(net) for net in ("::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96")
]
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible (RFC 4291)
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def _ipv4_class(ip: ipaddress.IPv4Address) -> str:
    """PUBLIC, PRIVATE or BLOCKED for an IPv4 address."""
    if any(ip in net for net in _PRIVATE_V4):
        return PRIVATE
    if any(ip in net for net in _BLOCKED_V4) or not ip.is_global:
        return BLOCKED
    return PUBLIC


def _ipv6_own_class(ip: ipaddress.IPv6Address) -> str:
    """PUBLIC, PRIVATE or BLOCKED for an IPv6 address itself, leaving out what it carries."""
    if any(ip in net for net in _CARRIERS_V6):
        return PUBLIC
    if any(ip in net for net in _PRIVATE_V6):
        return PRIVATE
    if (
        ip not in _GLOBAL_UNICAST  # multicast, link- and site-local, ::/8, unassigned space
        or any(ip in net for net in _BLOCKED_V6)
        or not ip.is_global
    ):
        return BLOCKED
    return PUBLIC


def _low32(value: int) -> ipaddress.IPv4Address:
    """The IPv4 address in the low 32 bits of ``value``."""
    return ipaddress.IPv4Address(value & 0xFFFF_FFFF)


def embedded_ipv4_addresses(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address carries to a translator or tunnel, by its prefix.

    IPv4-mapped, -translated and -compatible and the NAT64 well-known prefix carry it in the low
    32 bits. The NAT64 local-use prefix may be cut at /48, /56, /64 or /96 (RFC 6052 section 2.2)
    and the address does not say which: each position is read and each is judged. 6to4 carries
    it in bits 16-47; Teredo carries its server in bits 32-63 and the client, inverted, last.
    """
    value = int(ip)
    if any(ip in net for net in _CARRIERS_V6):
        return [_low32(value)]
    if ip in _COMPATIBLE:
        return [_low32(value)] if value > 1 else []  # :: and ::1 are not compatible addresses
    if ip in _NAT64_LOCAL:
        return [
            _low32((value >> 64 & 0xFFFF) << 16 | value >> 40 & 0xFFFF),  # /48
            _low32((value >> 64 & 0xFF) << 24 | value >> 32 & 0xFF_FFFF),  # /56
            _low32(value >> 24),  # /64
            _low32(value),  # /96
        ]
    if ip in _SIX_TO_FOUR:
        return [_low32(value >> 80)]
    if ip in _TEREDO:
        return [_low32(value >> 64), _low32(~value)]
    return []


def address_class(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """PUBLIC, PRIVATE or BLOCKED: the worst of the address and every IPv4 address it carries."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _ipv4_class(ip)
    verdicts = [_ipv6_own_class(ip)] + [_ipv4_class(v4) for v4 in embedded_ipv4_addresses(ip)]
    return max(verdicts, key=_SEVERITY.__getitem__)


# A hanging resolver must not hold a web thread: lookups run on daemon threads that the caller
# waits for only so long. Those still stuck when every slot is taken make new lookups fail fast.
_DNS_SLOTS = threading.BoundedSemaphore(16)
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")


def _resolve(host: str, port: int, timeout: float) -> list[str]:
    """The addresses ``host`` resolves to, waiting at most ``timeout`` seconds for DNS."""
    if not _DNS_SLOTS.acquire(blocking=False):
        raise HostNotResolved(f"the DNS lookup for {host!r} is still waiting; try again")
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def lookup() -> None:
        """Resolve on this thread; the caller may have stopped waiting."""
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            outcome["error"] = exc
        finally:
            _DNS_SLOTS.release()
            done.set()

    threading.Thread(target=lookup, name="mailslot-dns", daemon=True).start()
    if not done.wait(timeout):
        raise HostNotResolved(
            f"the DNS lookup for {host!r} took longer than {timeout:g} s; try again"
        )
    if "error" in outcome:
        raise HostNotResolved(f"the host {host!r} does not resolve")
    return list(dict.fromkeys(info[4][0] for info in outcome["infos"]))


def _literal_address(host: str, bracketed: bool) -> str | None:
    """The address a numeric host stands for, in any spelling inet_aton accepts; None for names."""
    if bracketed:
        if "%" in host:
            raise BlockedAddress("the webhook URL must not name an IPv6 zone (%)")
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise BlockedAddress(f"{host!r} is not a valid IPv6 address") from None
    try:
        return socket.inet_ntoa(socket.inet_aton(host.removesuffix(".")))
    except OSError:
        return None


@dataclass(frozen=True)
class WebhookTarget:
    """Where a checked webhook URL points: scheme, ASCII host name, port, path with query."""

    scheme: str
    host: str
    port: int
    path: str


def resolve_webhook_target(
    url: str, allow_private: bool, dns_timeout: float
) -> tuple[WebhookTarget, list[str]]:
    """Check a webhook URL and resolve it; every address it stands for must be allowed.

    The caller connects to one of the returned addresses and never resolves the name again,
    so a name that changes its answer after the check (DNS rebinding) cannot redirect it.
    Numeric hosts in every spelling (127.1, 0x7f.1, 2130706433, full-width digits) are parsed
    here, never looked up.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BlockedAddress(
            "the webhook URL is not a valid URL (check its host and port)"
        ) from None
    if parts.scheme not in ("http", "https"):
        raise BlockedAddress("only http:// and https:// webhook URLs are allowed")
    if "@" in parts.netloc or not parts.hostname:
        raise BlockedAddress("the webhook URL needs a host name and no user name or password")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    elif port == 0:
        raise BlockedAddress("the webhook URL has an invalid port")
    bracketed = parts.netloc.startswith("[")
    host = parts.hostname
    if not bracketed:
        try:
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise BlockedAddress(f"{parts.hostname!r} is not a valid host name") from None
        if not _HOST_NAME.fullmatch(host):
            raise BlockedAddress(f"{parts.hostname!r} is not a valid host name")
    name = host.removesuffix(".")
    if not allow_private and (name == "localhost" or name.endswith(".localhost")):
        raise BlockedAddress(f"{host!r} always means this machine (a loopback name)")  # RFC 6761
    literal = _literal_address(host, bracketed)
    addresses = [literal] if literal else _resolve(host, port, dns_timeout)
    if not addresses:
        raise HostNotResolved(f"the host {host!r} does not resolve")
    allowed = (PUBLIC, PRIVATE) if allow_private else (PUBLIC,)
    for address in addresses:
        if address_class(ipaddress.ip_address(address.split("%", 1)[0])) not in allowed:
            where = f"{address} is" if literal else f"the host {host!r} resolves to {address},"
            raise BlockedAddress(f"{where} a private or reserved address")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookTarget(parts.scheme, host, port, path), addresses


# =================================================================================================
# Webhooks
# =================================================================================================


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to an address we checked, whatever the name resolves to now."""

    def __init__(self, host: str, port: int, address: str, **kwargs: Any) -> None:
        super().__init__(host, port, **kwargs)
        self._address = address

    def connect(self) -> None:
        """Connect to the checked address."""
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked address, verifying the certificate for the URL's host name."""

    def __init__(self, host: str, port: int, address: str, **kwargs: Any) -> None:
        super().__init__(host, port, context=ssl.create_default_context(), **kwargs)
        self._address = address

    def connect(self) -> None:
        """Connect to the checked address, then TLS with SNI for the host name."""
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def sign_webhook(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks signature: v1,base64(HMAC-SHA256(key, "id.timestamp.body"))."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def webhook_body(context: records.SubmissionDelivery, timestamp: int) -> bytes:
    """The JSON event for one submission."""
    event = {
        "type": "submission.created",
        "timestamp": dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(),
        "data": {
            "form": {"id": context.form_public_id, "name": context.form_name},
            "submission": {
                "id": context.submission_public_id,
                "created_at": context.created_at.isoformat(),
                "data": context.data,
            },
        },
    }
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


def post_webhook(
    url: str,
    secret: str,
    message_id: str,
    body: bytes,
    *,
    timeouts: tuple[float, float] | None = None,
) -> tuple[int, dict[str, str]]:
    """POST a signed body to a checked, pinned address; no redirects followed.

    ``timeouts`` is (connect, read) in seconds; by default the worker's WEBHOOK_*_TIMEOUT.
    A refused address is a PermanentFailure; a name that does not resolve (now) is temporary.
    """
    settings = current_settings()
    connect_timeout, read_timeout = timeouts or (
        settings.webhook_connect_timeout,
        settings.webhook_read_timeout,
    )
    try:
        target, addresses = resolve_webhook_target(
            url, settings.webhook_allow_private, dns_timeout=settings.webhook_dns_timeout
        )
    except HostNotResolved as exc:
        raise TemporaryFailure(str(exc)) from None
    except BlockedAddress as exc:
        raise PermanentFailure(f"webhook refused: {exc}") from None
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Mailslot-Webhooks/1",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign_webhook(secret, message_id, timestamp, body),
    }
    connection_class = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    connection = connection_class(target.host, target.port, addresses[0], timeout=connect_timeout)
    try:
        connection.connect()
        connection.sock.settimeout(read_timeout)
        connection.request("POST", target.path, body=body, headers=headers)
        response = connection.getresponse()
        response.read(64 * 1024)
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    except (OSError, http.client.HTTPException) as exc:
        raise TemporaryFailure(f"webhook: {type(exc).__name__}: {exc}") from None
    finally:
        connection.close()


def _retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds (delta or HTTP date), or None."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


WEBHOOK_GONE = "the receiver answered 410 Gone; webhook disabled"
# What a removed webhook's unsent deliveries say (services cancels them; a send finds it too).
WEBHOOK_REMOVED = "cancelled: the form's webhook was removed"


def send_webhook(context: records.SubmissionDelivery) -> None:
    """Deliver the submission.created event; 2xx done, 410 disables, 429/5xx retry.

    It goes to the form's webhook URL and secret as they are now, not as they were when the
    submission arrived; the row's target is brought up to date to say so.
    """
    if not context.webhook_url or not context.webhook_secret:
        raise PermanentFailure(WEBHOOK_REMOVED)
    if context.target != context.webhook_url:
        with dal.transaction() as conn:
            dal.set_delivery_target(conn, context.delivery_id, context.webhook_url)
    body = webhook_body(context, int(time.time()))
    status, headers = post_webhook(
        context.webhook_url, context.webhook_secret, f"msg_{context.delivery_id}", body
    )
    if 200 <= status < 300:
        return
    if status == 410:
        raise PermanentFailure(WEBHOOK_GONE, gone=True)
    if 300 <= status < 400:
        raise TemporaryFailure(f"the receiver answered {status} (redirects are not followed)")
    raise TemporaryFailure(
        f"the receiver answered {status}",
        retry_after=_retry_after_seconds(headers.get("retry-after")),
    )

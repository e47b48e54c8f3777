"""Webhook address checks: every IPv6 form that carries an IPv4 address, judged by both.

The embeddings below are written from the RFCs (6052 and 8215 for NAT64, 4291 for mapped and
compatible, 2765 for translated, 3056 for 6to4, 4380 for Teredo), not from our code, and the
list of IPv4 ranges that are not public from the IANA special-purpose registry.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

import delivery

V4 = IPv4Network
# Not globally reachable (IANA IPv4 special-purpose registry), plus multicast and broadcast.
NON_PUBLIC_V4 = [
    V4("0.0.0.0/8"), V4("10.0.0.0/8"), V4("100.64.0.0/10"), V4("127.0.0.0/8"),
    V4("169.254.0.0/16"), V4("172.16.0.0/12"), V4("192.0.0.0/24"), V4("192.0.2.0/24"),
    V4("192.88.99.0/24"), V4("192.168.0.0/16"), V4("198.18.0.0/15"), V4("198.51.100.0/24"),
    V4("203.0.113.0/24"), V4("224.0.0.0/4"), V4("240.0.0.0/4"),
]  # fmt: skip
# What WEBHOOK_ALLOW_PRIVATE lets through: loopback and the private and shared ranges.
PRIVATE_V4 = [
    V4("10.0.0.0/8"), V4("100.64.0.0/10"), V4("127.0.0.0/8"), V4("172.16.0.0/12"),
    V4("192.168.0.0/16"),
]  # fmt: skip

non_public_v4 = st.sampled_from(NON_PUBLIC_V4).flatmap(lambda net: st.ip_addresses(network=net))
blocked_v4 = non_public_v4.filter(lambda ip: not any(ip in net for net in PRIVATE_V4))
public_v4 = st.ip_addresses(v=4).filter(lambda ip: not any(ip in net for net in NON_PUBLIC_V4))
bits = st.integers  # bits(0, 2**n - 1): n free bits of an address
METADATA, LOOPBACK, PUBLIC = (IPv4Address(a) for a in ("169.254.169.254", "127.0.0.1", "8.8.8.8"))


def _nat64_local(v4: int, prefix_length: int, free: int) -> int:
    """v4 in 64:ff9b:1::/48 at the RFC 6052 position for ``prefix_length`` (u octet zero)."""
    prefix = 0x0064_FF9B_0001 << 80
    if prefix_length == 48:
        return prefix | (v4 >> 16) << 64 | (v4 & 0xFFFF) << 40
    if prefix_length == 56:
        return prefix | (free & 0xFF) << 72 | (v4 >> 24) << 64 | (v4 & 0xFF_FFFF) << 32
    if prefix_length == 64:
        return prefix | (free & 0xFFFF) << 64 | v4 << 24
    return prefix | (free & (2**48 - 1)) << 32 | v4


EMBEDDINGS: dict[str, Callable[[int, int, int], int]] = {
    # name: (embedded address, a public IPv4 for the other slot (Teredo), free bits) -> IPv6
    "mapped ::ffff:0:0/96": lambda v4, _other, _free: 0xFFFF << 32 | v4,
    "compatible ::/96": lambda v4, _other, _free: v4,
    "translated ::ffff:0:0:0/96": lambda v4, _other, _free: 0xFFFF << 48 | v4,
    "NAT64 64:ff9b::/96": lambda v4, _other, _free: 0x0064_FF9B << 96 | v4,
    "NAT64 local /48": lambda v4, _other, free: _nat64_local(v4, 48, free),
    "NAT64 local /56": lambda v4, _other, free: _nat64_local(v4, 56, free),
    "NAT64 local /64": lambda v4, _other, free: _nat64_local(v4, 64, free),
    "NAT64 local /96": lambda v4, _other, free: _nat64_local(v4, 96, free),
    "6to4 2002::/16": lambda v4, _other, free: 0x2002 << 112 | v4 << 80 | (free & (2**80 - 1)),
    "Teredo client": lambda v4, server, free: (
        0x2001_0000 << 96 | server << 64 | (free & (2**32 - 1)) << 32 | (v4 ^ 0xFFFF_FFFF)
    ),
    "Teredo server": lambda v4, client, free: (
        0x2001_0000 << 96 | v4 << 64 | (free & (2**32 - 1)) << 32 | (client ^ 0xFFFF_FFFF)
    ),
}
# Embeddings where the IPv6 address is itself public: a public IPv4 inside must pass whole.
PUBLIC_CARRIERS = ["mapped ::ffff:0:0/96", "translated ::ffff:0:0:0/96", "NAT64 64:ff9b::/96"]


def embed(kind: str, v4: IPv4Address, other: IPv4Address, free: int) -> IPv6Address:
    """The IPv6 address of ``kind`` that carries ``v4``."""
    return IPv6Address(EMBEDDINGS[kind](int(v4), int(other), free))


# Any embedding: which one, a public IPv4 for Teredo's other slot, the bits nobody reads.
ANY_EMBEDDING = {
    "kind": st.sampled_from(sorted(EMBEDDINGS)),
    "other": public_v4,
    "free": bits(0, 2**80 - 1),
}


def refused(v6: IPv6Address, allow_private: bool) -> bool:
    """Whether the webhook check refuses http://[v6]/ (a literal: no DNS involved)."""
    try:
        delivery.resolve_webhook_target(f"http://[{v6}]/hook", allow_private, dns_timeout=1.0)
    except delivery.BlockedAddress:
        return True
    return False


@given(v4=non_public_v4, **ANY_EMBEDDING)
@example(v4=METADATA, kind="NAT64 64:ff9b::/96", other=PUBLIC, free=0)
@example(v4=LOOPBACK, kind="6to4 2002::/16", other=PUBLIC, free=0)
@example(v4=LOOPBACK, kind="compatible ::/96", other=PUBLIC, free=0)
@example(v4=IPv4Address(0), kind="translated ::ffff:0:0:0/96", other=PUBLIC, free=0)
def test_every_ipv6_embedding_of_a_non_public_ipv4_is_refused(
    v4: IPv4Address, kind: str, other: IPv4Address, free: int
) -> None:
    v6 = embed(kind, v4, other, free)
    if v6 not in (IPv6Address("::"), IPv6Address("::1")):  # RFC 4291: these are not compatible
        assert v4 in delivery.embedded_ipv4_addresses(v6)
    assert delivery.address_class(v6) != "public"
    assert refused(v6, allow_private=False)


@given(v4=blocked_v4, **ANY_EMBEDDING)
@example(v4=METADATA, kind="mapped ::ffff:0:0/96", other=PUBLIC, free=0)
def test_allow_private_still_refuses_embeddings_of_link_local_and_reserved_ipv4(
    v4: IPv4Address, kind: str, other: IPv4Address, free: int
) -> None:
    v6 = embed(kind, v4, other, free)
    assume(v6 != IPv6Address("::1"))  # ::0.0.0.1 is loopback, which allow_private lets through
    assert delivery.address_class(v6) == "blocked"
    assert refused(v6, allow_private=True)


@given(
    v4=public_v4,
    kind=st.sampled_from(sorted(set(EMBEDDINGS) - {k for k in EMBEDDINGS if "local" in k})),
    other=public_v4,
    free=bits(0, 2**80 - 1),
)
def test_embedding_logic_finds_a_public_ipv4_public(
    v4: IPv4Address, kind: str, other: IPv4Address, free: int
) -> None:
    # The local-use NAT64 prefix has no single position: every RFC 6052 position is judged, so
    # a public address there may be refused for the bits another position reads. The prefix is
    # not public anyway (RFC 8215), so it is refused whatever it carries.
    v6 = embed(kind, v4, other, free)
    found = delivery.embedded_ipv4_addresses(v6)
    assert v4 in found
    assert all(delivery.address_class(ip) == "public" for ip in found)


@given(v4=public_v4, kind=st.sampled_from(PUBLIC_CARRIERS))
@example(v4=IPv4Address("93.184.215.14"), kind="NAT64 64:ff9b::/96")
def test_a_public_ipv4_behind_a_public_translator_prefix_is_accepted(
    v4: IPv4Address, kind: str
) -> None:
    v6 = embed(kind, v4, PUBLIC, 0)
    assert not refused(v6, allow_private=False)


@given(v4=public_v4, subnet=bits(0, 2**80 - 1))
def test_a_6to4_address_of_a_public_ipv4_is_accepted(v4: IPv4Address, subnet: int) -> None:
    v6 = embed("6to4 2002::/16", v4, PUBLIC, subnet)
    assert not refused(v6, allow_private=False)


@pytest.mark.parametrize(
    "address",
    ["::1", "127.0.0.1", "127.8.9.10", "::ffff:127.0.0.1", "10.1.2.3", "192.168.0.10", "fd00::1"],
)
def test_allow_private_lets_loopback_and_private_addresses_through(address: str) -> None:
    url = f"http://[{address}]/" if ":" in address else f"http://{address}/"
    _, addresses = delivery.resolve_webhook_target(url, True, dns_timeout=1.0)
    assert addresses == [str(ipaddress.ip_address(address))]
    with pytest.raises(delivery.BlockedAddress, match="private or reserved"):
        delivery.resolve_webhook_target(url, False, dns_timeout=1.0)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/",
        "http://[fe80::1]/",
        "http://0.0.0.0/",
        "http://[::]/",
        "http://224.0.0.1/",
        "http://[ff02::1]/",
        "http://255.255.255.255/",
        "http://[64:ff9b::a9fe:a9fe]/",
    ],
)
def test_allow_private_still_refuses_link_local_unspecified_and_multicast(url: str) -> None:
    with pytest.raises(delivery.BlockedAddress):
        delivery.resolve_webhook_target(url, True, dns_timeout=1.0)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://93.184.215.14/", "93.184.215.14"),
        ("http://1572394766/", "93.184.215.14"),  # the decimal spelling is the same address
        ("http://0x5d.0xb8.0xd7.0x0e/", "93.184.215.14"),
        (
            "http://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/",
            "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
        ),
        ("http://[64:ff9b::5db8:d70e]/", "64:ff9b::5db8:d70e"),
        ("http://93.184.215.14./", "93.184.215.14"),
    ],
)
def test_public_literals_are_accepted_and_pinned_to_their_address(url: str, address: str) -> None:
    _, addresses = delivery.resolve_webhook_target(url, False, dns_timeout=1.0)
    assert addresses == [address]


# --- DNS answers --------------------------------------------------------------------------------


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A resolver for *.dns.test names: each maps to its answers, or to an Event to hang on."""
    answers: dict[str, Any] = {}
    calls: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(host, str) and host.rstrip(".").endswith(".dns.test")):
            return real(host, port, *args, **kwargs)
        calls.append(host)
        found = answers.get(host.rstrip("."))
        if isinstance(found, threading.Event):
            found.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if not found:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [info for a in found for info in real(a, port, type=socket.SOCK_STREAM)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    answers["_calls"] = calls
    yield answers
    for value in answers.values():
        if isinstance(value, threading.Event):
            value.set()


@pytest.mark.parametrize(
    "records",
    [
        ["127.0.0.1"],
        ["93.184.215.14", "127.0.0.1"],
        ["93.184.215.14", "::1"],
        ["93.184.215.14", "10.0.0.1"],
        ["2606:2800:21f:cb07:6820:80da:af6b:8b2c", "64:ff9b::a9fe:a9fe"],
        ["93.184.215.14", "::ffff:169.254.169.254"],
    ],
)
def test_a_name_with_any_non_public_record_is_refused(
    dns: dict[str, Any], records: list[str]
) -> None:
    dns["mixed.dns.test"] = records
    with pytest.raises(delivery.BlockedAddress, match="private or reserved"):
        delivery.resolve_webhook_target("https://mixed.dns.test/hook", False, dns_timeout=1.0)


def test_a_name_with_only_public_records_resolves_to_all_of_them(dns: dict[str, Any]) -> None:
    dns["public.dns.test"] = ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    _, addresses = delivery.resolve_webhook_target(
        "https://PUBLIC.dns.test./hook", False, dns_timeout=1.0
    )
    assert addresses == ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    assert dns["_calls"] == ["public.dns.test."]


def test_a_hanging_resolver_is_given_up_on_with_a_clear_message(dns: dict[str, Any]) -> None:
    dns["slow.dns.test"] = threading.Event()
    with pytest.raises(delivery.HostNotResolved, match=r"took longer than 0\.2 s"):
        delivery.resolve_webhook_target("https://slow.dns.test/hook", False, dns_timeout=0.2)


def test_an_unknown_name_is_refused_as_not_resolving(dns: dict[str, Any]) -> None:
    with pytest.raises(delivery.HostNotResolved, match="does not resolve"):
        delivery.resolve_webhook_target("https://nowhere.dns.test/", False, dns_timeout=1.0)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[fe80::1%25eth0]/", "zone"),
        ("http://[::ffff:93.184.215.14%25eth0]/", "zone"),
        ("http://user@93.184.215.14/", "user name"),
        ("http://:secret@93.184.215.14/", "user name"),
        ("http://@93.184.215.14/", "user name"),
        ("http://example.com\\@127.0.0.1/", "user name"),
        ("http://93.184.215.14:0/", "port"),
        ("http://93.184.215.14:99999/", "port"),
        ("http://[/", "not a valid URL"),
        ("http://exa mple.com/", "host name"),
        ("http://a..b.example/", "host name"),
        ("http://ex%41mple.com/", "host name"),
        ("gopher://93.184.215.14/", "http"),
        ("http:///path", "host name"),
    ],
)
def test_malformed_hosts_are_refused_before_any_lookup(
    dns: dict[str, Any], url: str, message: str
) -> None:
    with pytest.raises(delivery.BlockedAddress, match=message):
        delivery.resolve_webhook_target(url, True, dns_timeout=1.0)
    assert dns["_calls"] == []


def fullwidth(text: str) -> str:
    """``text`` with its digits as full-width digits (U+FF10...)."""
    return text.translate({ord(digit): ord(digit) + 0xFEE0 for digit in "0123456789"})


def test_unicode_digits_are_the_ascii_address_they_stand_for() -> None:
    with pytest.raises(delivery.BlockedAddress, match="private or reserved"):
        delivery.resolve_webhook_target(fullwidth("http://127.0.0.1/"), False, dns_timeout=1.0)
    _, addresses = delivery.resolve_webhook_target(
        fullwidth("http://93.184.215.14/"), False, dns_timeout=1.0
    )
    assert addresses == ["93.184.215.14"]

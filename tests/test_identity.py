"""Client identity: who the rate limit counts, and when forwarding headers are believed."""
from __future__ import annotations

from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.identity import client_address, is_trusted, normalize

PROXIES = (ip_network("10.0.0.0/8"), ip_network("2001:db8:ffff::/48"))
PEER = "10.0.0.1"                       # a trusted proxy in front of the gateway


# --- untrusted peers -----------------------------------------------------------------------

@pytest.mark.parametrize(("xff", "forwarded"), [
    ("198.51.100.7", None),
    (None, "for=198.51.100.7"),
    ("198.51.100.7, 10.0.0.2", 'for="[2001:db8::1]:4711"'),
])
def test_untrusted_peer_cannot_buy_a_new_identity_with_forwarding_headers(
        xff: str | None, forwarded: str | None) -> None:
    assert client_address("203.0.113.5", xff, forwarded, PROXIES) == "203.0.113.5"


def test_forwarding_headers_ignored_when_no_proxy_is_trusted() -> None:
    assert client_address("10.0.0.1", "198.51.100.7", "for=198.51.100.8", ()) == "10.0.0.1"


def test_each_spoofed_header_value_maps_to_the_same_untrusted_peer() -> None:
    identities = {client_address("203.0.113.5", f"198.51.100.{i}", f"for=192.0.2.{i}", PROXIES)
                  for i in range(1, 50)}
    assert identities == {"203.0.113.5"}


# --- trusted peers: X-Forwarded-For ----------------------------------------------------------

def test_trusted_peer_xff_single_client() -> None:
    assert client_address(PEER, "198.51.100.7", None, PROXIES) == "198.51.100.7"


def test_trusted_peer_xff_walked_right_to_left_skipping_trusted_hops() -> None:
    # the leftmost entry is whatever the client claimed; only trusted hops are believed
    xff = "1.1.1.1, 198.51.100.7, 10.0.0.3, 10.0.0.2"
    assert client_address(PEER, xff, None, PROXIES) == "198.51.100.7"


def test_trusted_peer_xff_spoofed_prefix_does_not_change_identity() -> None:
    honest = client_address(PEER, "198.51.100.7, 10.0.0.2", None, PROXIES)
    spoofed = client_address(PEER, "6.6.6.6, 198.51.100.7, 10.0.0.2", None, PROXIES)
    assert honest == spoofed == "198.51.100.7"


def test_all_trusted_chain_yields_leftmost_address() -> None:
    assert client_address(PEER, "10.0.0.4, 10.0.0.3, 10.0.0.2", None, PROXIES) == "10.0.0.4"


def test_garbage_entry_stops_walk_at_last_vouched_address() -> None:
    # 10.0.0.2 (trusted, vouched for by the peer) vouches for "garbage": stop at 10.0.0.2
    xff = "198.51.100.7, garbage, 10.0.0.2"
    assert client_address(PEER, xff, None, PROXIES) == "10.0.0.2"


def test_garbage_rightmost_entry_leaves_the_peer_as_client() -> None:
    assert client_address(PEER, "198.51.100.7, not-an-ip", None, PROXIES) == PEER


def test_empty_xff_entry_stops_the_walk() -> None:
    assert client_address(PEER, "198.51.100.7,, 10.0.0.2", None, PROXIES) == "10.0.0.2"


def test_xff_ipv4_with_port() -> None:
    assert client_address(PEER, "198.51.100.7:8080", None, PROXIES) == "198.51.100.7"


def test_xff_ipv6_is_canonicalized() -> None:
    assert client_address(PEER, "2001:0DB8:0000:0000::0001", None, PROXIES) == "2001:db8::1"


def test_xff_ipv4_mapped_ipv6_normalized_to_ipv4() -> None:
    assert client_address(PEER, "::ffff:198.51.100.7", None, PROXIES) == "198.51.100.7"


def test_multiple_xff_lines_joined_by_caller_with_comma() -> None:
    lines = ["6.6.6.6, 198.51.100.7", "10.0.0.3", "10.0.0.2"]
    assert client_address(PEER, ",".join(lines), None, PROXIES) == "198.51.100.7"


def test_trusted_peer_without_forwarding_headers_is_the_client() -> None:
    assert client_address(PEER, None, None, PROXIES) == PEER


# --- trusted peers: RFC 7239 Forwarded -----------------------------------------------------

def test_forwarded_quoted_ipv6_with_port() -> None:
    assert client_address(PEER, None, 'for="[2001:db8:cafe::17]:4711"', PROXIES) == "2001:db8:cafe::17"


def test_forwarded_ipv4_with_port_and_other_parameters() -> None:
    header = 'for="198.51.100.7:8080";proto=https;by=10.0.0.1;host=example.com'
    assert client_address(PEER, None, header, PROXIES) == "198.51.100.7"


def test_forwarded_parameter_name_case_insensitive_and_order_free() -> None:
    assert client_address(PEER, None, "proto=http;For=198.51.100.7", PROXIES) == "198.51.100.7"


def test_forwarded_chain_walked_right_to_left() -> None:
    header = 'for=6.6.6.6, for=198.51.100.7, for="[2001:db8:ffff::2]"'
    assert client_address(PEER, None, header, PROXIES) == "198.51.100.7"


def test_forwarded_unknown_or_obfuscated_stops_walk() -> None:
    assert client_address(PEER, None, "for=198.51.100.7, for=unknown, for=10.0.0.2",
                          PROXIES) == "10.0.0.2"
    assert client_address(PEER, None, "for=_hidden", PROXIES) == PEER


def test_forwarded_preferred_over_xff_when_both_present() -> None:
    assert client_address(PEER, "198.51.100.99", "for=198.51.100.7", PROXIES) == "198.51.100.7"


# --- IPv6 zone ids and hostile text --------------------------------------------------------

def test_every_zone_variant_of_an_ipv6_address_from_a_trusted_hop_is_one_identity() -> None:
    zones = ["a", "b", "eth0", "25eth0", "evil id", '"quoted"', "\x1b[31m", "\x07", "z" * 80]
    identities = {client_address(PEER, f"fe80::1%{zone}", None, PROXIES) for zone in zones}
    identities |= {client_address(PEER, None, f'for="[fe80::1%{zone}]:4711"', PROXIES)
                   for zone in zones}
    identities.add(client_address(PEER, None, 'for="[fe80::1%evil id]"', PROXIES))
    assert identities == {"fe80::1"}


def test_zone_id_does_not_hide_a_trusted_hop() -> None:
    assert client_address(PEER, "198.51.100.7, 2001:db8:ffff::2%eth1", None, PROXIES) == "198.51.100.7"


@pytest.mark.parametrize(("xff", "forwarded"), [
    ("fe80::1%", None), ("fe80::1%a%b", None), ("1.2.3.4%x", None), ('1.2.3.4"', None),
    ("fe80::1%" + "z" * 200, None), ("[fe80::1%x", None), ("\x1b[2J", None), ("fe80::1%\n", None),
    (None, 'for="[fe80::1%a"b]"'), (None, 'for="\x1b[2J"'), (None, "for=fe80::1%%"),
    (None, 'for="[fe80::1%' + "z" * 200 + ']"'), (None, 'for="[::ffff:1.2.3.4%x]"'),
])
def test_text_that_is_not_a_canonical_address_never_becomes_an_identity(
        xff: str | None, forwarded: str | None) -> None:
    identity = client_address(PEER, xff, forwarded, PROXIES)
    assert ip_address(identity).compressed == identity and "%" not in identity


# --- the peer itself -----------------------------------------------------------------------

def test_none_peer_is_unknown() -> None:
    assert client_address(None, None, None, PROXIES) == "unknown"


def test_none_peer_ignores_forwarding_headers() -> None:
    everything = (ip_network("0.0.0.0/0"), ip_network("::/0"))
    assert client_address(None, "198.51.100.7", "for=198.51.100.8", everything) == "unknown"


def test_ipv4_mapped_peer_normalized_and_trusted() -> None:
    assert client_address("::ffff:10.0.0.1", "198.51.100.7", None, PROXIES) == "198.51.100.7"
    assert client_address("::ffff:203.0.113.5", "198.51.100.7", None, PROXIES) == "203.0.113.5"


def test_ipv6_peer_in_trusted_network() -> None:
    assert client_address("2001:db8:ffff::1", "198.51.100.7", None, PROXIES) == "198.51.100.7"


# --- is_trusted / normalize ----------------------------------------------------------------

@pytest.mark.parametrize(("address", "expected"), [
    ("10.1.2.3", True), ("::ffff:10.1.2.3", True), ("2001:db8:ffff::9", True),
    ("11.0.0.1", False), ("2001:db8::1", False), ("garbage", False), ("", False), (None, False),
    ("unknown", False),
])
def test_is_trusted(address: str | None, expected: bool) -> None:
    assert is_trusted(address, PROXIES) is expected


def test_is_trusted_false_without_trusted_networks() -> None:
    assert is_trusted("10.1.2.3", ()) is False


@pytest.mark.parametrize(("text", "expected"), [
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("::FFFF:c000:0201", "192.0.2.1"),
    ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
    ("192.0.2.1", "192.0.2.1"),
    ("fe80::1%eth0", "fe80::1"),
    ("unknown", "unknown"),
    ("not an ip", "unknown"),
    ('1.2.3.4" evil', "unknown"),
    ("\x1b[31m", "unknown"),
])
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


# --- through the gateway -------------------------------------------------------------------

async def test_zone_variants_through_a_trusted_proxy_share_one_budget_and_one_key(
        start_gateway: Any, redis: Redis) -> None:
    async with start_gateway(RATE_LIMIT=1, TRUSTED_PROXIES="127.0.0.1") as gw, gw.client() as client:
        statuses = [(await client.get("/echo", headers={"X-Forwarded-For": f"fe80::1%{zone}"})).status_code
                    for zone in ("a", "b", "evil id")]
        forwarded = await client.get("/echo", headers={"Forwarded": 'for="[fe80::1%evil id]"'})
    # (a zone with control bytes never gets this far: the server edge refuses such a header)
    assert statuses == [200, 429, 429] and forwarded.status_code == 429
    assert await redis.keys("*") == [b"rl:fw1:{fe80::1}"]

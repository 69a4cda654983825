"""Who is the client: the TCP peer, or what trusted proxies in front of us say it is."""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

Networks = Sequence[IPv4Network | IPv6Network]
MAX_ADDRESS_TEXT = 128                 # a quoted, bracketed IPv6 address with zone id and port


def client_address(peer: str | None, forwarded_for: str | None, forwarded: str | None,
                   trusted: Networks) -> str:
    """The client's address: a canonical IP (IPv6 zone ids dropped) or "unknown".

    Forwarding headers are believed only when the peer is a trusted proxy; the chain is walked
    right to left past trusted hops, and the first untrusted address is the client. An entry we
    cannot parse ends the walk at the last address a trusted hop vouched for."""
    client = normalize(peer) if peer else "unknown"
    if not is_trusted(client, trusted):
        return client
    if forwarded:
        chain = _forwarded_for(forwarded)
    elif forwarded_for:
        chain = [part.strip() for part in forwarded_for.split(",")]
    else:
        return client
    for hop in reversed(chain):
        address = _parse_ip(hop)
        if address is None:
            break
        client = address
        if not _is_trusted(client, tuple(trusted)):
            break
    return client


def is_trusted(address: str | None, trusted: Networks) -> bool:
    """Whether `address` (normalized or not) lies in one of the trusted networks."""
    if not address or not trusted:
        return False
    return _is_trusted(normalize(address), tuple(trusted))


def normalize(address: str) -> str:
    """Canonical text of an IP address (IPv4-mapped IPv6 as IPv4, no zone id); "unknown" for
    anything else, so no other text can become an identity."""
    return _parse_ip(address) or "unknown"


def _parse_ip(text: str) -> str | None:
    # longer than any address with a port: refused before it can take room in the cache
    return _canonical(text) if len(text) <= MAX_ADDRESS_TEXT else None


@lru_cache(maxsize=4096)
def _canonical(text: str) -> str | None:
    text = text.strip().strip('"')
    if text.startswith("["):                      # "[2001:db8::1]:4711" (RFC 7239)
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:                    # "192.0.2.1:8080"
        text = text.partition(":")[0]
    try:
        address: IPv4Address | IPv6Address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address):
        if address.scope_id is not None:
            # a zone only names the sender's interface; kept, every zone would be a new client
            address = IPv6Address(int(address))
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
    return address.compressed


@lru_cache(maxsize=4096)
def _is_trusted(address: str, trusted: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def _forwarded_for(header: str) -> list[str]:
    """The `for=` values of an RFC 7239 Forwarded header, in order (missing ones as '')."""
    hops = []
    for element in header.split(","):
        value = ""
        for pair in element.split(";"):
            name, _, raw = pair.strip().partition("=")
            if name.lower() == "for":
                value = raw.strip()
        hops.append(value)
    return hops

"""Header rewriting between client and upstream: pure functions over ASGI header lists."""
from __future__ import annotations

from collections.abc import Iterable

Header = tuple[bytes, bytes]

# RFC 9110 7.6.1 plus the legacy ones proxies still see; Proxy-Authorization is meant for us.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})


def connection_tokens(headers: Iterable[Header]) -> frozenset[bytes]:
    """Header names listed in Connection headers: hop-by-hop by declaration."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def strip_hop_by_hop(headers: Iterable[Header]) -> list[Header]:
    """Headers without hop-by-hop ones, names lowercased, repeated headers kept apart."""
    headers = list(headers)
    named = connection_tokens(headers)
    return [(n, v) for n, v in ((n.lower(), v) for n, v in headers)
            if n not in HOP_BY_HOP and n not in named]


def upstream_request_headers(headers: Iterable[Header], *, peer: str, scheme: str,
                             trust_forwarding: bool, request_id: bytes | None = None) -> list[Header]:
    """What goes upstream: hop-by-hop, Host and Expect removed; X-Forwarded-* set; the
    request's X-Request-ID (when given) replaces the client's.

    Forwarding headers from an untrusted peer are dropped rather than extended, so the
    upstream never sees a chain the client invented."""
    out: list[Header] = []
    chain: list[bytes] = []
    host = proto = forwarded_host = None
    for name, value in strip_hop_by_hop(headers):
        if name == b"host":
            host = value
        elif name == b"expect" or (name == b"x-request-id" and request_id is not None):
            continue                                  # 100-continue is ours to answer
        elif name in FORWARDING:
            if not trust_forwarding:
                continue
            if name == b"x-forwarded-for":
                chain.append(value)
            elif name == b"x-forwarded-proto":
                proto = value
            elif name == b"x-forwarded-host":
                forwarded_host = value
            else:
                out.append((name, value))
        else:
            out.append((name, value))
    chain.append(peer.encode())
    out.append((b"x-forwarded-for", b", ".join(chain)))
    out.append((b"x-forwarded-proto", proto or scheme.encode()))
    if forwarded_host or host:
        out.append((b"x-forwarded-host", forwarded_host or host or b""))
    if request_id is not None:
        out.append((b"x-request-id", request_id))
    return out


class RateLimitHeaders:
    """draft-ietf-httpapi-ratelimit-headers-10 fields plus the common X-RateLimit-* ones."""

    def __init__(self, limit: int, window: int, policy: str = "default") -> None:
        self.policy = policy.encode()
        self.fixed: list[Header] = [
            (b"ratelimit-policy", b'"%s";q=%d;w=%d' % (self.policy, limit, window)),
            (b"x-ratelimit-limit", b"%d" % limit),
        ]

    def for_decision(self, remaining: int, reset: int) -> list[Header]:
        return [
            *self.fixed,
            (b"ratelimit", b'"%s";r=%d;t=%d' % (self.policy, remaining, reset)),
            (b"x-ratelimit-remaining", b"%d" % remaining),
            (b"x-ratelimit-reset", b"%d" % reset),
        ]

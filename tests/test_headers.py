"""Header rewriting: hop-by-hop stripping, what goes upstream, and the rate-limit fields."""
from __future__ import annotations

from proxy.headers import Header, RateLimitHeaders, strip_hop_by_hop, upstream_request_headers


def names(headers: list[Header]) -> list[bytes]:
    return [n for n, _ in headers]


def values(headers: list[Header], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


# --- strip_hop_by_hop ----------------------------------------------------------------------

def test_strip_hop_by_hop_removes_standard_hop_by_hop_headers() -> None:
    headers = [
        (b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"), (b"TE", b"trailers"), (b"Trailer", b"X-Sum"),
        (b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"h2c"),
        (b"Content-Type", b"text/plain"),
    ]
    assert strip_hop_by_hop(headers) == [(b"content-type", b"text/plain")]


def test_strip_hop_by_hop_removes_headers_named_in_connection_case_insensitively() -> None:
    headers = [
        (b"Connection", b"X-Secret, close"),
        (b"CONNECTION", b" x-other ,X-THIRD"),
        (b"x-SECRET", b"1"), (b"X-Other", b"2"), (b"x-third", b"3"),
        (b"X-Kept", b"yes"),
    ]
    assert strip_hop_by_hop(headers) == [(b"x-kept", b"yes")]


def test_strip_hop_by_hop_keeps_repeated_headers_apart_and_in_order() -> None:
    headers = [
        (b"Set-Cookie", b"a=1"), (b"Connection", b"close"), (b"X-Mid", b"m"),
        (b"set-cookie", b"b=2"), (b"Set-Cookie", b"c=3"),
    ]
    assert strip_hop_by_hop(headers) == [
        (b"set-cookie", b"a=1"), (b"x-mid", b"m"), (b"set-cookie", b"b=2"), (b"set-cookie", b"c=3"),
    ]


def test_strip_hop_by_hop_keeps_values_untouched() -> None:
    headers = [(b"X-Value", b"  Mixed Case, with; params  ")]
    assert strip_hop_by_hop(headers) == [(b"x-value", b"  Mixed Case, with; params  ")]


# --- upstream_request_headers --------------------------------------------------------------

CLIENT = [
    (b"Host", b"api.example.com"), (b"Expect", b"100-continue"), (b"Accept", b"*/*"),
    (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"drop me"), (b"Content-Length", b"3"),
]


def test_upstream_headers_drop_host_expect_and_hop_by_hop() -> None:
    out = upstream_request_headers(CLIENT, peer="198.51.100.7", scheme="http",
                                   trust_forwarding=False)
    assert b"host" not in names(out)
    assert b"expect" not in names(out)
    assert b"connection" not in names(out)
    assert b"x-hop" not in names(out)
    assert values(out, b"accept") == [b"*/*"]
    assert values(out, b"content-length") == [b"3"]


def test_upstream_headers_set_forwarded_proto_from_scheme_and_host() -> None:
    out = upstream_request_headers(CLIENT, peer="198.51.100.7", scheme="https",
                                   trust_forwarding=False)
    assert values(out, b"x-forwarded-for") == [b"198.51.100.7"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"api.example.com"]


def test_upstream_headers_without_host_have_no_forwarded_host() -> None:
    out = upstream_request_headers([(b"accept", b"*/*")], peer="198.51.100.7", scheme="http",
                                   trust_forwarding=False)
    assert b"x-forwarded-host" not in names(out)
    assert values(out, b"x-forwarded-proto") == [b"http"]


def test_untrusted_peer_forwarding_headers_are_replaced_not_extended() -> None:
    spoofed = [
        (b"Host", b"api.example.com"),
        (b"X-Forwarded-For", b"6.6.6.6"), (b"x-forwarded-for", b"7.7.7.7"),
        (b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"evil.example"),
        (b"Forwarded", b"for=6.6.6.6;proto=https"),
    ]
    out = upstream_request_headers(spoofed, peer="203.0.113.5", scheme="http",
                                   trust_forwarding=False)
    assert values(out, b"x-forwarded-for") == [b"203.0.113.5"]
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"x-forwarded-host") == [b"api.example.com"]
    assert values(out, b"forwarded") == []
    assert b"6.6.6.6" not in b"".join(v for _, v in out)
    assert b"evil.example" not in b"".join(v for _, v in out)


def test_trusted_peer_appended_to_x_forwarded_for() -> None:
    headers = [(b"Host", b"api.example.com"), (b"X-Forwarded-For", b"198.51.100.7")]
    out = upstream_request_headers(headers, peer="10.0.0.1", scheme="http", trust_forwarding=True)
    assert values(out, b"x-forwarded-for") == [b"198.51.100.7, 10.0.0.1"]


def test_trusted_peer_multiple_xff_lines_joined_in_order_then_peer() -> None:
    headers = [(b"X-Forwarded-For", b"198.51.100.7, 10.0.0.3"), (b"X-Forwarded-For", b"10.0.0.2")]
    out = upstream_request_headers(headers, peer="10.0.0.1", scheme="http", trust_forwarding=True)
    assert values(out, b"x-forwarded-for") == [b"198.51.100.7, 10.0.0.3, 10.0.0.2, 10.0.0.1"]


def test_trusted_peer_forwarded_proto_and_host_kept() -> None:
    headers = [(b"Host", b"internal:8000"), (b"X-Forwarded-Proto", b"https"),
               (b"X-Forwarded-Host", b"api.example.com"), (b"Forwarded", b"for=198.51.100.7")]
    out = upstream_request_headers(headers, peer="10.0.0.1", scheme="http", trust_forwarding=True)
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"api.example.com"]
    assert values(out, b"forwarded") == [b"for=198.51.100.7"]
    assert values(out, b"x-forwarded-for") == [b"10.0.0.1"]


def test_upstream_headers_keep_repeated_end_to_end_headers_in_order() -> None:
    headers = [(b"X-Multi", b"1"), (b"Accept", b"a"), (b"x-multi", b"2")]
    out = upstream_request_headers(headers, peer="198.51.100.7", scheme="http",
                                   trust_forwarding=False)
    assert [(n, v) for n, v in out if n in (b"x-multi", b"accept")] == [
        (b"x-multi", b"1"), (b"accept", b"a"), (b"x-multi", b"2")]


# --- RateLimitHeaders ----------------------------------------------------------------------

def test_rate_limit_headers_exact_fields() -> None:
    out = RateLimitHeaders(5, 60).for_decision(remaining=2, reset=41)
    assert sorted(out) == sorted([
        (b"ratelimit-policy", b'"default";q=5;w=60'),
        (b"ratelimit", b'"default";r=2;t=41'),
        (b"x-ratelimit-limit", b"5"),
        (b"x-ratelimit-remaining", b"2"),
        (b"x-ratelimit-reset", b"41"),
    ])
    assert len(set(names(out))) == len(out) == 5


def test_rate_limit_fixed_headers_are_policy_and_limit_only() -> None:
    fixed = RateLimitHeaders(100, 3600).fixed
    assert sorted(fixed) == sorted([
        (b"ratelimit-policy", b'"default";q=100;w=3600'), (b"x-ratelimit-limit", b"100")])


def test_rate_limit_headers_named_policy() -> None:
    out = dict(RateLimitHeaders(3, 10, policy="burst").for_decision(0, 7))
    assert out[b"ratelimit-policy"] == b'"burst";q=3;w=10'
    assert out[b"ratelimit"] == b'"burst";r=0;t=7'

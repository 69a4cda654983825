"""HTTP/1.1 response heads: parsing and body framing (RFC 9112), pure functions for the
upstream transport."""
from __future__ import annotations

import httpx

NO_BODY_STATUS = frozenset({204, 304})
# body framing of a response
NONE, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)


def parse_head(head: bytes) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit() \
            or code[:1] == b"0":
        raise httpx.RemoteProtocolError(f"malformed status line from upstream: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in b" \t" or line[:1] in b" \t":
            raise httpx.RemoteProtocolError(f"malformed header line from upstream: {line[:80]!r}")
        headers.append((name, value.strip(b" \t")))
    return int(code), version, reason, headers


def framing(method: bytes, status: int, headers: list[tuple[bytes, bytes]]) -> tuple[int, int, bool]:
    """(body mode, length, connection reusable) of a response, per RFC 9112 6.3."""
    lengths: set[bytes] = set()
    chunked = closing = has_te = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            lengths.update(v.strip() for v in value.split(b","))
        elif lower == b"transfer-encoding":
            has_te = True
            chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        elif lower == b"connection":
            closing = closing or b"close" in value.lower()
    if method == b"HEAD" or status in NO_BODY_STATUS or status < 200:
        return NONE, 0, not closing
    if has_te:
        return (CHUNKED, 0, not closing) if chunked else (UNTIL_CLOSE, 0, False)
    if lengths:
        if len(lengths) != 1 or not next(iter(lengths)).isdigit():
            raise httpx.RemoteProtocolError("invalid Content-Length from upstream")
        return LENGTH, int(next(iter(lengths))), not closing
    return UNTIL_CLOSE, 0, False

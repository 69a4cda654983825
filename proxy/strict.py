"""Strict request checks of the server edge (RFC 9112, RFC 9113), shared by HTTP/1.1 and h2c:
what h11 and h2 let through (bare LF, obs-fold, control bytes, lower-case methods, two Hosts)
is refused here before any request reaches the app."""
from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import (BadRequest, HeadersTooLarge, MethodNotAllowed,
                     NotImplementedByGateway, VersionNotSupported)
from .headers import Header

CLOSE: Header = (b"connection", b"close")
ALLOW = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
HEAD_LIMIT = 32 * 1024                       # request line + headers, the README's promise
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
METHOD = re.compile(TOKEN)
TARGET = re.compile(rb"[\x21-\x7e]+")
REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r\n")
# RFC 9112 forbids in a head: a bare LF or CR (2.2), obs-fold (5.2), control bytes (5.5; HTAB
# is fine). Counting CRs and LFs against CRLFs and one character-class search are C-speed passes
CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
HOST_LINE = re.compile(rb"\r\nhost:[ \t]*([^\r]*?)[ \t]*(?=\r\n)", re.IGNORECASE)
# RFC 9110 7.2 / RFC 3986 3.2.2: uri-host [":" port]; a comma means two Hosts folded into one
HOST_VALUE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+;=%]*)(?::[0-9]*)?")
FIELD_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")
ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")
H2C_PREFACE = b"PRI * HTTP/2.0\r\n\r\n"
# the common head in one linear pass: an upper-case method, an origin- or absolute-form target,
# HTTP/1.0 or 1.1, CRLF-ended "name:value" lines without control bytes (so no obs-fold, no bare
# CR or LF). Anything else takes the slow path, which names the fault (or lets it through)
PLAIN_HEAD = re.compile(
    rb"(?:[!#$%&'*+\-.^_`|~0-9A-Z]+) (?:/[\x21-\x7e]*|[A-Za-z][A-Za-z0-9+.\-]*://[\x21-\x7e]*)"
    rb" HTTP/1\.[01]\r\n(?:" + TOKEN + rb":[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*\r\n")


def head_end(data: bytearray, start: int) -> int:
    """The index just past the blank line ending the head at the start of `data`, or -1."""
    end = data.find(b"\r\n\r\n", max(0, start - 3), HEAD_LIMIT + 4)
    return -1 if end < 0 else end + 4


def check_partial(data: bytearray, start: int) -> int:
    """Refuse an incomplete head early: too long already, or a fault in what has arrived.
    Scans from `start` (what an earlier call returned), so a slow head is scanned once."""
    if len(data) > HEAD_LIMIT:
        raise too_large()
    end = len(data) - 1 if data.endswith(b"\r") else len(data)    # its LF may be next
    _check_faults(data, start, end)
    return data.rfind(b"\n", start, end) + 1 or start


def check_head(data: bytearray, end: int, h2c: bool = False) -> None:
    """Refuse the complete head `data[:end]` unless it is a plain, unambiguous HTTP/1.x
    request head; `h2c` lets the HTTP/2 prior-knowledge preface through."""
    if end > HEAD_LIMIT:
        raise too_large()
    if h2c and data.startswith(H2C_PREFACE):
        return
    if PLAIN_HEAD.fullmatch(data, 0, end) is not None and not data.startswith(b"CONNECT "):
        _check_hosts(HOST_LINE.findall(data, 0, end))
        return
    _check_faults(data, 0, end)
    line = REQUEST_LINE.match(data, 0, end)
    if line is None:
        raise BadRequest("The request line is not 'method SP target SP HTTP/1.x'.",
                         headers=[CLOSE])
    method, target, major, minor = line.groups()
    if major != b"1":
        raise VersionNotSupported("Only HTTP/1.1 (and HTTP/1.0) is served on this port.",
                                  headers=[CLOSE])
    if minor not in (b"0", b"1"):
        raise BadRequest(f"HTTP/1.{minor.decode()} is not a version this gateway speaks.",
                         headers=[CLOSE])
    hosts: list[bytes] = HOST_LINE.findall(data, line.end() - 2, end)
    check_request(method, target, hosts)


def check_request(method: bytes, target: bytes, hosts: Iterable[bytes]) -> None:
    """The checks HTTP/1.1 and HTTP/2 share: a known-case method, a target the gateway can
    route (origin or absolute form), at most one valid Host."""
    if not METHOD.fullmatch(method):
        raise BadRequest("The method is not a token.", headers=[CLOSE])
    if method.upper() != method:
        raise NotImplementedByGateway("Methods are case-sensitive: this one is not implemented.",
                                      headers=[CLOSE])
    if method == b"CONNECT":
        raise MethodNotAllowed("The gateway does not tunnel (CONNECT).",
                               headers=[CLOSE, (b"allow", ALLOW)])
    if not TARGET.fullmatch(target):
        raise BadRequest("The request target must be visible ASCII.", headers=[CLOSE])
    if not (target.startswith(b"/") or ABSOLUTE_FORM.match(target)):
        raise BadRequest("The request target must be an absolute path.", headers=[CLOSE])
    _check_hosts(hosts)


def _check_hosts(hosts: Iterable[bytes]) -> None:
    """At most one Host, and that one a valid host[:port] (RFC 9112 3.2)."""
    seen = 0
    for host in hosts:
        seen += 1
        if seen > 1:
            raise BadRequest("The request carries more than one Host.", headers=[CLOSE])
        if not HOST_VALUE.fullmatch(host):
            raise BadRequest("The Host header is not a valid host[:port].", headers=[CLOSE])


def check_fields(headers: list[Header]) -> list[Header]:
    """HTTP/2 fields checked as HTTP/1.1's head is: no control bytes, one Content-Length
    (identical repeats folded into one, as h11 does). Returns the fields to hand on."""
    length: bytes | None = None
    out: list[Header] = []
    for name, value in headers:
        if not FIELD_VALUE.fullmatch(value) or not FIELD_VALUE.fullmatch(name):
            raise BadRequest("A header field carries a control byte.", headers=[CLOSE])
        if name == b"content-length":
            if not value.isdigit() or (length is not None and value != length):
                raise BadRequest("Content-Length is not one decimal number.", headers=[CLOSE])
            if length is not None:
                continue
            length = value
        out.append((name, value))
    return out


def too_large() -> HeadersTooLarge:
    """The 431 for a head over HEAD_LIMIT."""
    return HeadersTooLarge(f"The request line and headers exceed {HEAD_LIMIT // 1024} KiB.",
                           headers=[CLOSE])


def _check_faults(data: bytearray, start: int, end: int) -> None:
    """`start` must be 0 or just past an LF: no CRLF straddles it."""
    crlf = data.count(b"\r\n", start, end)
    if data.count(b"\n", start, end) != crlf:
        raise _fault("a bare LF line ending")
    if data.count(b"\r", start, end) != crlf:
        raise _fault("a bare CR")
    folded = max(0, start - 1)
    if data.find(b"\n ", folded, end) >= 0 or data.find(b"\n\t", folded, end) >= 0:
        raise _fault("an obs-fold continuation line")
    if CONTROL.search(data, start, end) is not None:
        raise _fault("a control byte")


def _fault(kind: str) -> BadRequest:
    return BadRequest(f"The request head contains {kind} (RFC 9112).", headers=[CLOSE])

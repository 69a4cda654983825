"""The reference reading of a client's raw HTTP/1.1 stream: what the README and RFC 9112 say
the gateway must do with each request in it.

Each request found is one the gateway must forward (FORWARD), may forward or refuse (EITHER:
harmless leniency, e.g. a repeated identical Content-Length, or a choice left open, e.g. how to
treat dot segments), or must not forward (REFUSE). Where framing turns ambiguous the reading
stops: nothing after that point may ever reach the upstream."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from tests.strict_upstream import DIGITS, Head, Malformed, parse_chunked, parse_head

Header = tuple[bytes, bytes]
FORWARD, EITHER, REFUSE = "forward", "either", "refuse"

BASE = b"/base"                       # the upstream's base path: nothing may climb out of it
PEER = "127.0.0.2"                    # the fuzzing client's address
MAX_BODY = 4096
MAX_HEAD = 32 * 1024                  # README: request line and headers are capped at 32 KiB

OWN_PATHS = frozenset({"/health", "/metrics"})
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"proxy-authenticate",
                        b"proxy-authorization"})
NOT_FORWARDED = frozenset({b"host", b"expect", b"x-request-id", b"forwarded", b"x-forwarded-for",
                           b"x-forwarded-proto", b"x-forwarded-host", b"content-length"})
SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=~-]{1,128}")
REQUEST_ID_IN_HEAD = re.compile(rb"(?im)^x-request-id:[ \t]*([A-Za-z0-9._:+/=~-]{1,128})[ \t]*\r?$")
HOST = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+;=-]|%[0-9A-Fa-f]{2})*|\[[0-9A-Fa-f:.]+\]")
PORT = re.compile(rb"[0-9]*")
ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?]*)(.*)", re.S)
PATH_CHARS = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
QUERY_CHARS = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")
PCT_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
DOT = re.compile(rb"(?i)\.|%2e")


@dataclass
class Expected:
    """What the reference says about the n-th request of a stream."""

    index: int
    request_id: bytes | None
    verdict: str
    reasons: list[str]
    stop: bool                        # nothing after this request may reach the upstream
    method: bytes = b""
    targets: frozenset[bytes] = frozenset()
    headers: list[Header] = field(default_factory=list)
    body: bytes = b""
    own: bool = False                 # /health or /metrics: the gateway's own answer
    may_cut_off: bool = False         # refused midway (413, a stalled body): a partial upstream copy is fine
    may_close: bool = False           # the gateway may end the connection after answering it

    def describe(self) -> str:
        return (f"#{self.index} {self.request_id!r} {self.verdict}"
                f"{' stop' if self.stop else ''}: {'; '.join(self.reasons) or 'valid'}")


def interpret(data: bytes, *, peer: str = PEER, base: bytes = BASE,
              max_body: int = MAX_BODY) -> list[Expected]:
    """The reference reading of a client's byte stream (see the module docstring)."""
    out: list[Expected] = []
    pos = 0
    while pos < len(data):
        index = len(out)
        blank = index > 0 and data.startswith(b"\r\n", pos)
        if blank:
            pos += 2                              # RFC 9112 2.2: SHOULD ignore one empty line
        head_end = data.find(b"\r\n\r\n", pos)
        guess = REQUEST_ID_IN_HEAD.search(data, pos, len(data) if head_end < 0 else head_end + 4)
        rid = guess.group(1) if guess else None
        try:
            head = parse_head(data, pos)
        except Malformed as exc:
            out.append(Expected(index, rid, REFUSE, [str(exc)], stop=True))
            break
        if head is None:
            out.append(Expected(index, rid, REFUSE, ["the stream ends inside a request head"],
                                stop=True, may_cut_off=True))
            break
        exp = Expected(index, request_id(head), FORWARD, [], stop=False, method=head.method)
        out.append(exp)
        if blank:
            _either(exp, "an empty line before the request line")
        if head.size > MAX_HEAD:
            exp.verdict, exp.stop = REFUSE, True
            exp.reasons.append(f"head of {head.size} bytes is over the 32 KiB cap")
            break
        body_end = _body(exp, head, data, pos + head.size, max_body)
        if body_end is None:
            break
        pos = body_end
        _check_head(exp, head, peer, base)
        if exp.verdict == REFUSE:
            exp.headers, exp.targets = [], frozenset()
        if exp.stop:
            break
    return out


def _refuse(exp: Expected, reason: str, *, stop: bool = False) -> None:
    exp.verdict = REFUSE
    exp.reasons.append(reason)
    exp.stop = exp.stop or stop


def _either(exp: Expected, reason: str) -> None:
    if exp.verdict == FORWARD:
        exp.verdict = EITHER
    exp.reasons.append(reason)


def request_id(head: Head) -> bytes | None:
    for value in head.values(b"x-request-id"):
        if SANE_REQUEST_ID.fullmatch(value):
            return value
    return None


def _body(exp: Expected, head: Head, data: bytes, start: int, max_body: int) -> int | None:
    """Reads the body into `exp`; returns where the request ends, None when reading stops."""
    lengths = [v.strip() for value in head.values(b"content-length") for v in value.split(b",")]
    codings = [c.strip().lower() for v in head.values(b"transfer-encoding") for c in v.split(b",")]
    if codings and head.version == b"HTTP/1.0":
        _refuse(exp, "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1: faulty framing)", stop=True)
        return None
    if codings and lengths:
        _refuse(exp, "both Content-Length and Transfer-Encoding", stop=True)
        return None
    if codings:
        if codings != [b"chunked"]:
            _refuse(exp, f"transfer codings {codings!r}: only one 'chunked' frames a request", stop=True)
            return None
        size_lines: list[bytes] = []
        try:
            parsed = parse_chunked(data, start, size_lines=size_lines)
        except Malformed as exc:
            try:
                parsed = parse_chunked(data, start, ows=True)
            except Malformed:
                _refuse(exp, f"chunked body: {exc}", stop=True)
                exp.may_cut_off = True            # found mid-body: the upstream has the head already
                return None
            # RFC 9112 7.1.1 allows BWS before a chunk-ext, h11 refuses it: refusing is safe
            # (nothing after it can be read as a request), but it ends the connection mid-body
            _either(exp, "whitespace after a chunk size")
            exp.stop = exp.may_cut_off = True
        if parsed is None:
            _refuse(exp, "the stream ends inside a chunked body", stop=True)
            exp.may_cut_off = True
            return None
        exp.body, _, end = parsed
        if any(b" " in line or b"\t" in line for line in size_lines):
            _either(exp, "whitespace in a chunk-size line (BWS; h11 refuses it midway)")
            exp.may_cut_off = True
        if len(exp.body) > max_body:
            _refuse(exp, f"chunked body of {len(exp.body)} bytes is over MAX_BODY_SIZE")
            exp.may_cut_off = True
        return end
    if not lengths:
        return start
    if not all(DIGITS.fullmatch(v) for v in lengths):
        _refuse(exp, f"Content-Length is not a number: {lengths!r}", stop=True)
        return None
    if len(set(lengths)) != 1:
        _refuse(exp, f"conflicting Content-Length values {lengths!r}", stop=True)
        return None
    if len(lengths) > 1:
        _either(exp, "Content-Length repeated with one value")
    length = int(lengths[0])
    if length > max_body:
        _refuse(exp, f"Content-Length {length} is over MAX_BODY_SIZE")
        exp.may_cut_off = True
        return start + length
    if len(data) < start + length:
        _refuse(exp, "the stream ends inside the body", stop=True)
        exp.may_cut_off = True
        return None
    exp.body = data[start:start + length]
    return start + length


def _check_head(exp: Expected, head: Head, peer: str, base: bytes) -> None:
    """Method, version, Host, target and connection rules; fills the expected upstream view."""
    if head.version not in (b"HTTP/1.1", b"HTTP/1.0"):
        _refuse(exp, f"unsupported version {head.version!r}", stop=True)
        return
    tokens = {t.strip().lower() for v in head.values(b"connection") for t in v.split(b",")}
    if b"close" in tokens or (head.version == b"HTTP/1.0" and b"keep-alive" not in tokens):
        exp.stop = True
    elif head.version == b"HTTP/1.0":
        exp.may_close = True                       # RFC 9112 9.3: honouring keep-alive is optional
    if head.method != head.method.upper():
        _refuse(exp, f"method {head.method!r} is not upper case (methods are case-sensitive)")
    elif head.method == b"CONNECT":
        _refuse(exp, "CONNECT is not proxied")
    elif not head.method.isalpha():
        _either(exp, f"unusual method token {head.method!r}")
    hosts = head.values(b"host")
    if head.version == b"HTTP/1.1" and len(hosts) != 1:
        _refuse(exp, f"{len(hosts)} Host fields in an HTTP/1.1 request")
    elif len(hosts) > 1:
        _refuse(exp, "more than one Host field")
    elif hosts:
        host, _, port = hosts[0].rpartition(b":") if hosts[0].rfind(b":") > hosts[0].rfind(b"]") \
            else (hosts[0], b"", b"")
        if not HOST.fullmatch(host) or not PORT.fullmatch(port):
            _refuse(exp, f"invalid Host {hosts[0]!r}")
    _target(exp, head.target, base)
    exp.headers = _expected_headers(head, peer, exp.request_id)


def _target(exp: Expected, target: bytes, base: bytes) -> None:
    if target == b"*":
        _refuse(exp, "asterisk-form target")
        return
    path, qmark, query = target.partition(b"?")
    if not target.startswith(b"/"):
        absolute = ABSOLUTE.fullmatch(path)
        if absolute is None:
            _refuse(exp, f"target {target[:60]!r} is neither origin- nor absolute-form")
            return
        scheme, authority, rest = absolute.groups()
        if scheme.lower() not in (b"http", b"https") or not HOST.fullmatch(authority.split(b":")[0]):
            _either(exp, f"absolute-form target {target[:60]!r}")
        path = rest if rest.startswith(b"/") else b"/" + rest
    if unquote(path.decode("ascii")) in OWN_PATHS:
        exp.own = True
        _refuse(exp, "the gateway's own path")
        return
    if not PATH_CHARS.fullmatch(path) or not QUERY_CHARS.fullmatch(query) \
            or PCT_ESCAPE.search(target):
        _either(exp, f"characters outside RFC 3986 in {target[:60]!r}")
    # ASGI's query_string cannot tell "/a?" from "/a": an empty query is forwarded without its
    # "?" (README, Known issues)
    tail = qmark + query if query else b""
    targets = set()
    segments = path.split(b"/")
    if any(DOT.sub(b".", s) in (b".", b"..") for s in segments):
        resolved, climbs = _remove_dot_segments(segments)
        _either(exp, "dot segments" + (" climbing above /" if climbs else ""))
        targets.add(base + resolved + tail)
        if not climbs:
            targets.add(base + path + tail)
    else:
        targets.add(base + path + tail)
    if b"#" in target:
        targets |= {t.replace(b"#", b"%23") for t in targets}
    exp.targets = frozenset(targets)


def _remove_dot_segments(segments: list[bytes]) -> tuple[bytes, bool]:
    """RFC 3986 5.2.4 on a path's segments (%2e counts as a dot); whether it climbed above /."""
    out: list[bytes] = []
    climbs = False
    for i, segment in enumerate(segments[1:], 1):
        last = i == len(segments) - 1
        dots = DOT.sub(b".", segment)
        if dots == b".":
            if last:
                out.append(b"")
        elif dots == b"..":
            if out:
                out.pop()
            else:
                climbs = True
            if last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out), climbs


def _expected_headers(head: Head, peer: str, request_id: bytes | None) -> list[Header]:
    """The README's forwarding rules: hop-by-hop (and Connection-named) fields, Host, Expect and
    untrusted forwarding fields dropped; X-Forwarded-For/-Proto/-Host and X-Request-ID added.
    Content-Length is left out: the body is compared instead."""
    fields = [(n.lower(), v) for n, v in head.headers]
    named = {t.strip().lower() for n, v in fields if n == b"connection" for t in v.split(b",")}
    out: list[Header] = []
    host = None
    for name, value in fields:
        if name in HOP_BY_HOP or name in named:
            continue
        if name == b"host":
            host = value
        elif name not in NOT_FORWARDED:
            out.append((name, value))
    out += [(b"x-forwarded-for", peer.encode()), (b"x-forwarded-proto", b"http")]
    if host:
        out.append((b"x-forwarded-host", host))
    if request_id is not None:
        out.append((b"x-request-id", request_id))
    return out

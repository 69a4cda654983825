"""Hypothesis strategies for raw HTTP/1.1 client streams: mostly valid requests, each with a
few mutations from the families a test enables. Request n carries `X-Request-ID: fz-n`; a
request hidden in a body (a smuggling canary) carries `sm-n`."""
from __future__ import annotations

import re

from hypothesis import strategies as st

Field = tuple[bytes, bytes]
RUN = re.compile(rb"(.)\1{39,}", re.S)


class Stream(bytes):
    """Raw client bytes whose repr folds long runs (a 40 KiB header) into `b'v' * 40000`."""

    def __repr__(self) -> str:
        parts, pos = [], 0
        for run in RUN.finditer(self):
            parts += [repr(bytes(self[pos:run.start()])), f"{bytes(run.group(1))!r} * {len(run.group())}"]
            pos = run.end()
        parts.append(repr(bytes(self[pos:])))
        return " + ".join(p for p in parts if p != "b''") or "b''"

HEAD = frozenset({"bare_lf", "bare_cr", "obs_fold", "ctl_value", "bad_name", "version",
                  "dup_host", "host_list", "no_host", "odd_host"})
TARGET = frozenset({"lower_method", "connect", "odd_method", "star", "absolute", "absolute_own",
                    "own_path", "authority", "dots", "unwise", "empty_query", "upgrade_h2c"})
FRAMING = frozenset({"cl_te", "dup_cl", "cl_list", "bad_cl", "cl_short", "cl_long", "te_variant",
                     "chunk_bad", "chunk_ows", "chunk_no_crlf", "big_body", "http10_te"})
SIZE = frozenset({"huge_value", "many_fields"})
PIPELINE = frozenset({"trailing_garbage", "leading_crlf", "close_midway"})
ALL = HEAD | TARGET | FRAMING | SIZE | PIPELINE

METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"TRACE", b"PURGE"]
VISIBLE = "".join(chr(c) for c in range(0x21, 0x7f))
PCHAR = "abcXYZ019-._~!$&'()*+,;=:@"
NAMES = [b"Accept", b"User-Agent", b"Cookie", b"Content-Type", b"X-Custom", b"x-lower",
         b"X-Dup", b"Cache-Control", b"If-None-Match", b"Authorization", b"traceparent"]
# fields with a documented effect: dropped (hop-by-hop, untrusted forwarding, Expect) or kept
SPECIAL: list[list[Field]] = [
    [(b"Connection", b"keep-alive")], [(b"Keep-Alive", b"timeout=5")], [(b"TE", b"trailers")],
    [(b"Connection", b"X-Drop"), (b"X-Drop", b"secret")], [(b"Proxy-Authorization", b"Basic eA==")],
    [(b"X-Forwarded-For", b"6.6.6.6")], [(b"Forwarded", b"for=6.6.6.6")],
    [(b"X-Forwarded-Host", b"evil.example")], [(b"Expect", b"100-continue")],
    [(b"X-Dup", b"1"), (b"X-Dup", b"2")], [(b"Accept-Encoding", b"gzip")],
]
GARBAGE = [b"hello\r\n", b"\r\n", b"GET /after-close HTTP/1.1\r\nHost: h\r\nX-Request-ID: sm-g\r\n\r\n",
           b"\x00\xff junk", b"HTTP/1.1 200 OK\r\n\r\n"]


def _text(alphabet: str, min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[bytes]:
    return st.text(alphabet, min_size=min_size, max_size=max_size).map(lambda s: s.encode("latin-1"))


field_values = st.one_of(
    _text(VISIBLE + " \t", max_size=20).map(lambda v: v.strip(b" \t")),
    _text(VISIBLE + "\x80\xe9\xff", min_size=1, max_size=8),           # obs-text is allowed
    st.sampled_from([b"", b"a  b", b"\tx\t"]).map(lambda v: v.strip(b" \t")),
)


@st.composite
def _segment(draw: st.DrawFn, mutations: frozenset[str]) -> bytes:
    choices = [_text(PCHAR, min_size=1, max_size=6), st.sampled_from([b"%20", b"%2F", b"%25", b"%41", b""])]
    if "dots" in mutations:
        choices.append(st.sampled_from([b".", b"..", b"%2e%2e", b"%2E.", b".%2e", b"%2e"]))
    if "unwise" in mutations:
        choices.append(st.sampled_from([b"a|b", b"{x}", b"^", b"`", b"\\", b"<>", b"\"", b"a#b", b"%zz"]))
    return draw(st.one_of(choices))


@st.composite
def targets(draw: st.DrawFn, mutations: frozenset[str]) -> bytes:
    """A request target: origin-form mostly, the other forms and odd paths by mutation."""
    segments = draw(st.lists(_segment(mutations), max_size=4))
    path = b"/" + b"/".join(segments)
    query = draw(st.one_of(st.just(b""), _text(PCHAR + "/?=&%", min_size=1, max_size=10).map(lambda q: b"?" + q)))
    if "empty_query" in mutations and not query:
        query = b"?"
    target = path + query
    forms = ["origin"]
    if "star" in mutations:
        forms.append("star")
    if "absolute" in mutations:
        forms.append("absolute")
    if "absolute_own" in mutations:
        forms.append("absolute_own")
    if "own_path" in mutations:
        forms.append("own")
    if "authority" in mutations:
        forms.append("authority")
    form = draw(st.sampled_from(forms))
    if form == "star":
        return b"*"
    if form == "absolute":
        scheme = draw(st.sampled_from([b"http", b"https", b"HTTP", b"ftp"]))
        return scheme + b"://" + draw(st.sampled_from([b"fuzz.example", b"127.0.0.1:8000", b"x"])) + target
    if form == "absolute_own":
        return b"http://fuzz.example" + draw(st.sampled_from([b"/health", b"/metrics", b"/%68ealth"]))
    if form == "own":
        return draw(st.sampled_from([b"/health", b"/metrics", b"/health?x=1", b"/%68ealth", b"/metrics/"]))
    if form == "authority":
        return draw(st.sampled_from([b"fuzz.example:443", b"127.0.0.1:80", b"x"]))
    return target


def methods(mutations: frozenset[str]) -> st.SearchStrategy[bytes]:
    choices = [st.sampled_from(METHODS)]
    if "lower_method" in mutations:
        choices.append(st.sampled_from([b"get", b"head", b"Post", b"pUT"]))
    if "connect" in mutations:
        choices.append(st.just(b"CONNECT"))
    if "odd_method" in mutations:
        choices.append(st.sampled_from([b"M-SEARCH", b"GET!", b"X", b"PROPFIND"]))
    return st.one_of(choices)


@st.composite
def _chunked(draw: st.DrawFn, body: bytes, mutations: frozenset[str]) -> bytes:
    """`body` in chunks of drawn sizes, size lines written in the valid odd ways (leading zeros,
    upper case, extensions) and, by mutation, invalid ones."""
    out = bytearray()
    pos = 0
    while pos < len(body):
        size = draw(st.integers(1, max(1, len(body) - pos)))
        out += _size_line(draw, size, mutations) + body[pos:pos + size]
        out += b"\r\n" if "chunk_no_crlf" not in mutations or draw(st.booleans()) else b""
        pos += size
    out += _size_line(draw, 0, mutations)
    out += draw(st.sampled_from([b"", b"X-Trailer: t\r\n"]))
    return bytes(out) + b"\r\n"


def _size_line(draw: st.DrawFn, size: int, mutations: frozenset[str]) -> bytes:
    text = draw(st.sampled_from([b"%x", b"%X", b"000%x"])) % size
    ext = draw(st.sampled_from([b"", b"", b";a", b";a=b", b';a="b c"']))
    if "chunk_ows" in mutations and draw(st.booleans()):
        ext = draw(st.sampled_from([ext + b" ", b" ;a=b", b"; a = b"]))
    if "chunk_bad" in mutations and draw(st.booleans()):
        text = draw(st.sampled_from([b"0x%x", b"+%x", b"-%x", b" %x", b"%x_", b"g", b"",
                                     b"1%016x"])).replace(b"%x", b"%x" % size)
    return text + ext + b"\r\n"


@st.composite
def _body(draw: st.DrawFn, index: int, mutations: frozenset[str]) -> bytes:
    if "big_body" in mutations and draw(st.booleans()):
        return b"b" * draw(st.integers(4097, 9000))
    return draw(st.one_of(
        st.just(b""),
        st.binary(max_size=40),
        st.just(b"GET /smuggled HTTP/1.1\r\nHost: h\r\nX-Request-ID: sm-%d\r\n\r\n" % index),
        st.just(b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\nX-Request-ID: sm-%d\r\n\r\n" % index),
    ))


@st.composite
def _framing(draw: st.DrawFn, version: bytes, body: bytes, mutations: frozenset[str]
             ) -> tuple[list[Field], bytes]:
    """Framing fields and the body as sent."""
    length = b"%d" % len(body)
    kind = draw(st.sampled_from(["none", "length", "chunked"] if body else ["none", "length"]))
    if kind == "none" and body:
        kind = "length"
    if kind == "chunked" and version == b"HTTP/1.0" and "http10_te" not in mutations:
        kind = "length"
    fields: list[Field] = []
    if kind == "length":
        fields.append((b"Content-Length", draw(st.sampled_from([length, b"0" + length]))))
        if "dup_cl" in mutations and draw(st.booleans()):
            fields.append((b"Content-Length", draw(st.sampled_from([length, b"%d" % (len(body) + 1)]))))
        if "cl_list" in mutations and draw(st.booleans()):
            fields[0] = (b"Content-Length", length + draw(st.sampled_from([b", ", b","])) +
                         draw(st.sampled_from([length, b"%d" % (len(body) + 3)])))
        if "bad_cl" in mutations and draw(st.booleans()):
            fields[0] = (b"Content-Length", draw(st.sampled_from(
                [b"+" + length, b"-1", b"0x%x" % len(body), length + b"a", b"", b"1e2", b"9" * 30])))
        if "cl_short" in mutations and body and draw(st.booleans()):
            fields[0] = (b"Content-Length", b"%d" % draw(st.integers(0, len(body) - 1)))
        if "cl_long" in mutations and draw(st.booleans()):
            fields[0] = (b"Content-Length", b"%d" % (len(body) + draw(st.integers(1, 60))))
        if "cl_te" in mutations and draw(st.booleans()):
            fields.append((b"Transfer-Encoding", b"chunked"))
        return fields, body
    if kind == "chunked":
        coding = b"chunked"
        if "te_variant" in mutations and draw(st.booleans()):
            coding = draw(st.sampled_from([b"Chunked", b"gzip, chunked", b"chunked, chunked", b"identity",
                                           b" chunked", b"chunked,", b"xchunked"]))
        fields.append((b"Transfer-Encoding", coding))
        if "cl_te" in mutations and draw(st.booleans()):
            fields.append((b"Content-Length", length))
        return fields, draw(_chunked(body, mutations))
    return fields, body


@st.composite
def requests(draw: st.DrawFn, index: int, enabled: frozenset[str], close: bool = False,
             last: bool = True) -> bytes:
    """One raw request (with `Connection: close` when `close`); half of them carry up to two
    mutations of the enabled families. Bytes after an HTTP/1.0 request are discarded, so
    only the `last` one may be HTTP/1.0, unless "close_midway" is enabled."""
    mutations = frozenset(draw(st.one_of(
        st.just([]), st.lists(st.sampled_from(sorted(enabled)), max_size=2, unique=True)))
        if enabled else [])
    version = draw(st.sampled_from([b"HTTP/1.1"] * 5 + [b"HTTP/1.0"])) \
        if last or "close_midway" in enabled else b"HTTP/1.1"
    if "version" in mutations:
        version = draw(st.sampled_from([b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"HTTP/11", b"HTTP/1.1 "]))
    method, target = draw(methods(mutations)), draw(targets(mutations))
    fields: list[Field] = [(b"X-Request-ID", b"fz-%d" % index)]
    host = draw(st.sampled_from([b"fuzz.example", b"127.0.0.1:8000", b"[::1]:8080", b"FUZZ.example", b""]))
    if "odd_host" in mutations:
        host = draw(st.sampled_from([b"a b", b"a/b", b"a@b", b"h:x", b"[::1"]))
    if "host_list" in mutations:
        host = b"a.example, b.example"
    if version == b"HTTP/1.1" or draw(st.booleans()):
        fields.append((b"Host", host))
    if "dup_host" in mutations:
        fields.append((b"Host", draw(st.sampled_from([host, b"other.example"]))))
    if "no_host" in mutations:
        fields = [f for f in fields if f[0] != b"Host"]
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(NAMES))
        fields.append((draw(st.sampled_from([name, name.lower(), name.upper()])), draw(field_values)))
    fields += draw(st.sampled_from([[]] * 3 + SPECIAL))
    if "upgrade_h2c" in mutations:
        fields += [(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c"),
                   (b"HTTP2-Settings", b"AAMAAABkAAQCAAAAAAIAAAAA")]
    if close or "close_midway" in mutations:
        fields.append((b"Connection", b"close"))
    if "huge_value" in mutations:
        fields.append((b"X-Huge", b"v" * draw(st.sampled_from([20_000, 40_000, 70_000]))))
    if "many_fields" in mutations:
        fields += [(b"X-F%d" % i, b"v") for i in range(draw(st.sampled_from([2_000, 6_000, 10_000])))]
    body = draw(_body(index, mutations)) if method not in (b"HEAD",) or draw(st.booleans()) else b""
    framing, wire_body = draw(_framing(version, body, mutations))
    fields = draw(st.permutations(fields)) + framing
    lines = [method + b" " + target + b" " + version]
    lines += [name + b":" + draw(st.sampled_from([b" ", b"", b"  ", b"\t"])) + value
              + draw(st.sampled_from([b"", b"", b" "])) for name, value in fields]
    ends = [b"\r\n"] * (len(lines) + 1)
    _mutate_head(draw, lines, ends, mutations)
    return b"".join(line + end for line, end in zip(lines + [b""], ends)) + wire_body


def _mutate_head(draw: st.DrawFn, lines: list[bytes], ends: list[bytes], mutations: frozenset[str]) -> None:
    """Lenient-parser bait: bare line breaks, obs-fold, control bytes, broken field names."""
    last = len(lines)                 # ends[last] closes the head
    if "bare_lf" in mutations:
        for i in draw(st.lists(st.integers(0, last), min_size=1, max_size=last + 1, unique=True)):
            ends[i] = b"\n"
    if "bare_cr" in mutations:
        ends[draw(st.integers(1, max(1, last - 1)))] = b"\r"
    if "obs_fold" in mutations and last > 1:
        i = draw(st.integers(1, last - 1))
        lines[i] += b"\r\n" + draw(st.sampled_from([b" ", b"\t", b"   "])) + b"folded"
    if "ctl_value" in mutations and last > 1:
        i = draw(st.integers(1, last - 1))
        ctl = bytes([draw(st.sampled_from([0, 1, 8, 0x0b, 0x0c, 0x1b, 0x1f, 0x7f]))])
        lines[i] += draw(st.sampled_from([ctl, ctl + b"x", b"x" + ctl + b"y"]))
    if "bad_name" in mutations:
        lines.insert(draw(st.integers(1, last)), draw(st.sampled_from(
            [b"X Bad: v", b"X-Space : v", b": v", b"X(a): v", b"no-colon", b"X\x01: v", b"\xe9t\xe9: v"])))
        ends.append(b"\r\n")


@st.composite
def streams(draw: st.DrawFn, enabled: frozenset[str], max_requests: int = 3) -> Stream:
    """One to `max_requests` pipelined requests; optionally the last one closes the connection
    and bytes follow it in the same write."""
    count = draw(st.integers(1, max_requests))
    garbage = "trailing_garbage" in enabled and draw(st.booleans())
    out = bytearray()
    for index in range(count):
        if "leading_crlf" in enabled and index and draw(st.integers(0, 3)) == 0:
            out += b"\r\n"
        last = index == count - 1
        out += draw(requests(index, enabled, close=garbage and last, last=last))
    if garbage:
        out += draw(st.sampled_from(GARBAGE))
    return Stream(out)

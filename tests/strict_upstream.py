"""A strict HTTP/1.1 parser (RFC 9112, no leniency at all) and a recording upstream built on it.

The upstream is what the fuzzer puts behind the gateway: it frames what it receives with the
strict parser only (CRLF line endings, no obs-fold, token methods, visible-ASCII targets, exactly
one well-formed Content-Length or a chunked body), records every request it could frame and
every byte it could not, and answers each request 200 with an id of its own (header `X-Echo`,
body `echo <id>`) so the client side can tell which answer belongs to which recorded request."""
from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass, field

Header = tuple[bytes, bytes]

TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
TARGET = re.compile(rb"[\x21-\x7e]+")
VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
# field-value: VCHAR / obs-text with SP and HTAB inside; OWS around it is not part of it
FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")
DIGITS = re.compile(rb"[0-9]+")
CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*[-!#$%&'*+.^_`|~0-9A-Za-z]+"
                        rb"(?:[ \t]*=[ \t]*(?:[-!#$%&'*+.^_`|~0-9A-Za-z]+|\"[^\"\\\r\n]*\"))?)*)")
CHUNK_LINE_OWS = re.compile(CHUNK_LINE.pattern + rb"[ \t]*")    # the leniency h11 allows
MAX_HEAD = 256 * 1024
BARE = re.compile(rb"(?<!\r)\n|\r(?!\n)")


class Malformed(Exception):
    """Bytes that a strict HTTP/1.1 recipient cannot frame; `reason` says what is wrong."""


@dataclass
class Head:
    """A request line and its header fields, exactly as received (values without OWS)."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[Header]
    size: int                                  # bytes of the head including its final CRLF CRLF

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]


@dataclass
class Request:
    """One framed request: its head, the body after de-chunking, and the trailer fields."""

    head: Head
    body: bytes
    chunked: bool = False
    trailers: list[Header] = field(default_factory=list)


def has_bare_line_break(region: bytes, complete: bool) -> bool:
    """A CR not followed by LF or an LF not preceded by CR (a final CR may await its LF)."""
    if not complete and region.endswith(b"\r"):
        region = region[:-1]
    return BARE.search(region) is not None


def parse_head(data: bytes, start: int = 0) -> Head | None:
    """The head starting at `start`, or None while it is incomplete; Malformed when a strict
    parser must refuse it (bare CR or LF, obs-fold, bad tokens, control bytes)."""
    end = data.find(b"\r\n\r\n", start)
    if has_bare_line_break(data[start:] if end < 0 else data[start:end + 4], end >= 0):
        raise Malformed("bare CR or LF in the head")
    if end < 0:
        if len(data) - start > MAX_HEAD:
            raise Malformed("head too large")
        return None
    lines = data[start:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise Malformed(f"request line is not 'method SP target SP version': {lines[0][:80]!r}")
    method, target, version = parts
    if not TOKEN.fullmatch(method):
        raise Malformed(f"method is not a token: {method[:40]!r}")
    if not TARGET.fullmatch(target):
        raise Malformed(f"request target is not visible ASCII: {target[:80]!r}")
    if not VERSION.fullmatch(version):
        raise Malformed(f"not an HTTP version: {version[:20]!r}")
    return Head(method, target, version, parse_fields(lines[1:]), end + 4 - start)


def parse_fields(lines: list[bytes]) -> list[Header]:
    """Header or trailer field lines (without their CRLF); Malformed on any leniency."""
    fields: list[Header] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise Malformed(f"obs-fold (a line starting with whitespace): {line[:80]!r}")
        name, sep, value = line.partition(b":")
        if not sep or not TOKEN.fullmatch(name):
            raise Malformed(f"field name is not a token followed by ':': {line[:80]!r}")
        value = value.strip(b" \t")
        if not FIELD_VALUE.fullmatch(value):
            raise Malformed(f"control byte in field value of {name.decode('latin-1')}: {value[:80]!r}")
        fields.append((name, value))
    return fields


def framing(head: Head) -> tuple[str, int]:
    """("none" | "length" | "chunked", length) of a request body, per RFC 9112 6.3; Malformed
    when the framing is ambiguous (both headers, differing lengths, unknown codings)."""
    lengths = head.values(b"content-length")
    codings = [c.strip().lower() for v in head.values(b"transfer-encoding") for c in v.split(b",")]
    if codings:
        if lengths:
            raise Malformed("both Content-Length and Transfer-Encoding")
        if codings != [b"chunked"]:
            raise Malformed(f"transfer codings other than one 'chunked': {codings!r}")
        return "chunked", 0
    if not lengths:
        return "none", 0
    if len(lengths) != 1 or not DIGITS.fullmatch(lengths[0]):
        raise Malformed(f"Content-Length not exactly one number: {lengths!r}")
    return "length", int(lengths[0])


def parse_chunked(data: bytes, pos: int, ows: bool = False, size_lines: list[bytes] | None = None
                  ) -> tuple[bytes, list[Header], int] | None:
    """(body, trailers, end) of a chunked body starting at `pos`, None while incomplete;
    `ows` tolerates whitespace after a chunk size; `size_lines` collects the chunk-size lines."""
    line_re = CHUNK_LINE_OWS if ows else CHUNK_LINE
    body = bytearray()
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            if has_bare_line_break(data[pos:], False) or len(data) - pos > 4096:
                raise Malformed("malformed chunk-size line")
            return None
        match = line_re.fullmatch(data, pos, eol)
        if match is None:
            raise Malformed(f"malformed chunk-size line: {data[pos:eol][:40]!r}")
        if size_lines is not None:
            size_lines.append(data[pos:eol])
        size = int(match.group(1), 16)
        pos = eol + 2
        if size == 0:
            break
        if len(data) < pos + size + 2:
            return None
        body += data[pos:pos + size]
        if data[pos + size:pos + size + 2] != b"\r\n":
            raise Malformed("chunk data not followed by CRLF")
        pos += size + 2
    end = data.find(b"\r\n\r\n", pos - 2)
    if end < 0:
        if has_bare_line_break(data[pos:], False):
            raise Malformed("bare CR or LF in the trailer section")
        return None
    section = data[pos:end + 2]
    if has_bare_line_break(section, True):
        raise Malformed("bare CR or LF in the trailer section")
    lines = section.split(b"\r\n")[:-1] if section else []
    return bytes(body), parse_fields(lines), end + 4


def parse_request(data: bytes, pos: int = 0) -> tuple[Request, int] | None:
    """The strict request starting at `pos` and where it ends, None while incomplete."""
    head = parse_head(data, pos)
    if head is None:
        return None
    mode, length = framing(head)
    start = pos + head.size
    if mode == "none":
        return Request(head, b""), start
    if mode == "length":
        if len(data) < start + length:
            return None
        return Request(head, data[start:start + length]), start + length
    parsed = parse_chunked(data, start)
    if parsed is None:
        return None
    body, trailers, end = parsed
    return Request(head, body, chunked=True, trailers=trailers), end


@dataclass
class Recorded:
    """A request the upstream framed, with the id it answered with."""

    echo: int
    connection: int
    request: Request

    @property
    def request_id(self) -> bytes | None:
        ids = self.request.head.values(b"x-request-id")
        return ids[0] if len(ids) == 1 else None


@dataclass
class Rejected:
    """Bytes the upstream could not frame (`reason`), or a request cut off by a close."""

    connection: int
    reason: str
    data: bytes
    head: Head | None = None


class StrictUpstream:
    """The recording upstream; thread-safe snapshots for a test running beside its loop."""

    def __init__(self) -> None:
        self.records: list[Recorded] = []
        self.rejected: list[Rejected] = []
        self.busy: set[int] = set()        # connections holding part of a request
        self.lock = threading.Lock()
        self._echo = 0
        self._connections = 0
        self._writers: set[asyncio.StreamWriter] = set()

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return len(self.records), len(self.rejected)

    def since(self, mark: tuple[int, int]) -> tuple[list[Recorded], list[Rejected]]:
        with self.lock:
            return self.records[mark[0]:], self.rejected[mark[1]:]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        conn = self._connections
        self._writers.add(writer)
        data = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data, go_on = self._frame(conn, data + chunk, writer)
                if data:
                    self.busy.add(conn)
                else:
                    self.busy.discard(conn)
                await writer.drain()
                if not go_on:
                    break
        except ConnectionError:
            pass
        finally:
            if data:
                self._cut_off(conn, data)
            self.busy.discard(conn)
            self._writers.discard(writer)
            writer.close()

    def _frame(self, conn: int, data: bytes, writer: asyncio.StreamWriter) -> tuple[bytes, bool]:
        """Answer every complete request in `data`; returns the rest and whether to go on."""
        pos = 0
        while pos < len(data):
            try:
                parsed = parse_request(data, pos)
            except Malformed as exc:
                with self.lock:
                    self.rejected.append(Rejected(conn, str(exc), data[pos:]))
                return b"", False
            if parsed is None:
                break
            request, pos = parsed
            self._echo += 1
            with self.lock:
                self.records.append(Recorded(self._echo, conn, request))
            body = b"echo %d" % self._echo
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Echo: %d\r\n"
                         b"Content-Length: %d\r\n\r\n%b" % (self._echo, len(body),
                                                            b"" if request.head.method == b"HEAD" else body))
        return data[pos:], True

    def _cut_off(self, conn: int, data: bytes) -> None:
        try:
            head = parse_head(data)
        except Malformed:
            head = None
        with self.lock:
            self.rejected.append(Rejected(conn, "connection closed inside a request", data, head))

    def close_all(self) -> None:
        for writer in list(self._writers):
            writer.close()

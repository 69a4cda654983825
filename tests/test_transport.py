"""UpstreamTransport (proxy/transport.py) against real loopback servers.

Most tests run a raw `asyncio.start_server` that reads the request head and writes scripted
bytes, so the response framing is exactly what the test says; a few use the in-process
Hypercorn upstream. Waiting is done on events or by polling with a deadline, never by sleeping
a fixed time, and no assertion depends on how long something took."""
from __future__ import annotations

import asyncio
import gc
import hashlib
import inspect
import logging
import re
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from proxy.forwarding import Forwarder
from proxy.transport import HIGH_WATER, MAX_HEAD, BodySourceTimeout, UpstreamTransport, _Connection
from tests.servers import closed_port, serving
from tests.upstream import Upstream

TIMEOUTS = httpx.Timeout(5.0).as_dict()       # a hang shows up as ReadTimeout, not a stuck test
DEADLINE = 10.0                               # only to turn a missing event into a failure


# --- helpers ---------------------------------------------------------------------------------

async def wait_until(predicate: Callable[[], object], what: str, deadline: float = DEADLINE) -> None:
    """Poll `predicate` until it is true; fail (never hang) after `deadline` seconds."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def wait_event(event: asyncio.Event, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), DEADLINE)
    except asyncio.TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    """A keep-alive 200 with Content-Length; `extra` is more raw header lines."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


def request(method: str, url: str | httpx.URL, timeout: dict[str, Any] | None = None,
            **kwargs: Any) -> httpx.Request:
    return httpx.Request(method, url, extensions={"timeout": timeout or TIMEOUTS}, **kwargs)


async def fetch(transport: UpstreamTransport, method: str, url: str | httpx.URL,
                **kwargs: Any) -> tuple[httpx.Response, bytes]:
    """One exchange straight on the transport (no client headers); the body read and closed."""
    response = await transport.handle_async_request(request(method, url, **kwargs))
    try:
        body = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
    finally:
        await response.aclose()
    return response, body


@dataclass
class Received:
    """One request as the raw server read it."""
    conn: int
    line: bytes
    headers: list[tuple[bytes, bytes]]
    head: bytes
    body: bytes = b""

    @property
    def method(self) -> bytes:
        return self.line.split(b" ")[0]

    @property
    def target(self) -> bytes:
        return self.line.split(b" ")[1]

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class ServerProtocolError(Exception):
    """The transport sent something the strict test server does not accept."""


@dataclass
class Reply:
    data: bytes
    close: bool = False        # close the connection after writing


ReplyFn = Callable[[Received], "bytes | Reply | None | Awaitable[bytes | Reply | None]"]
Handler = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    """A loopback server. By default each request is read (head and body, strictly framed) and
    answered with `reply(request)`: bytes (keep the connection), Reply, or None (close without
    answering). `handler` replaces that loop for a whole connection."""

    reply: ReplyFn | None = None
    handler: Handler | None = None
    connections: int = 0
    requests: list[Received] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    eof: set[int] = field(default_factory=set)              # connections the client ended
    ended: defaultdict[int, asyncio.Event] = field(default_factory=lambda: defaultdict(asyncio.Event))
    url: str = ""

    async def __aenter__(self) -> RawServer:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            await (self.handler or self.serve)(index, reader, writer)
        except asyncio.CancelledError:
            pass      # the test's end; a cancelled handler task upsets asyncio.streams' callback
        except (ConnectionError, asyncio.IncompleteReadError):
            pass                                   # the client went away; tests look at eof/ended
        except BaseException as exc:               # noqa: BLE001 - recorded for the test to assert
            self.errors.append(exc)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass
            self.ended[index].set()

    async def read_request(self, index: int, reader: asyncio.StreamReader,
                           body: bool = True) -> Received | None:
        """The next request on a connection (None at a clean EOF); the body framed strictly."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise ServerProtocolError(f"truncated request head {exc.partial[:80]!r}") from None
            self.eof.add(index)
            return None
        except ConnectionError:
            self.eof.add(index)
            return None
        line, *lines = head[:-4].split(b"\r\n")
        headers = []
        for raw in lines:
            name, sep, value = raw.partition(b":")
            if not sep or not re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
                raise ServerProtocolError(f"bad request header line {raw!r}")
            headers.append((name, value.strip(b" \t")))
        received = Received(index, line, headers, head)
        self.requests.append(received)
        if body:
            received.body = await read_request_body(reader, received)
        return received

    async def serve(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.reply is not None
        while (received := await self.read_request(index, reader)) is not None:
            answer = self.reply(received)
            if inspect.isawaitable(answer):
                answer = await answer
            if answer is None:
                return
            if isinstance(answer, bytes):
                answer = Reply(answer)
            writer.write(answer.data)
            await writer.drain()
            if answer.close:
                return


async def read_request_body(reader: asyncio.StreamReader, received: Received) -> bytes:
    te = received.header(b"transfer-encoding")
    cl = received.header(b"content-length")
    if te and cl:
        raise ServerProtocolError("request has both Transfer-Encoding and Content-Length")
    if te:
        if te != [b"chunked"]:
            raise ServerProtocolError(f"unexpected Transfer-Encoding {te!r}")
        body = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            size = line[:-2].split(b";")[0]
            if not re.fullmatch(rb"[0-9A-Fa-f]+", size):
                raise ServerProtocolError(f"bad chunk size line {line!r}")
            if int(size, 16) == 0:
                break
            body += await reader.readexactly(int(size, 16))
            if await reader.readexactly(2) != b"\r\n":
                raise ServerProtocolError("chunk data not followed by CRLF")
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass                                   # trailer fields
        return bytes(body)
    if cl:
        if len(cl) != 1 or not cl[0].isdigit():
            raise ServerProtocolError(f"bad Content-Length {cl!r}")
        return await reader.readexactly(int(cl[0]))
    return b""


@dataclass
class Reads:
    """Every data_received of the transport's connections: a count, an event, the peak buffer."""
    count: int = 0
    peak_buffer: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    spy = Reads()
    original = _Connection.data_received

    def data_received(self: _Connection, data: bytes) -> None:
        original(self, data)
        spy.count += 1
        spy.peak_buffer = max(spy.peak_buffer, len(self.buffer))
        spy.event.set()

    monkeypatch.setattr(_Connection, "data_received", data_received)
    return spy


async def write_in_reads(writer: asyncio.StreamWriter, pieces: list[bytes], spy: Reads) -> None:
    """Write each piece only after the client read the previous one: separate socket reads."""
    for piece in pieces:
        spy.event.clear()
        writer.write(piece)
        await writer.drain()
        await wait_event(spy.event, "the transport to read a piece")


@pytest.fixture
async def transport() -> AsyncIterator[UpstreamTransport]:
    t = UpstreamTransport()
    yield t
    await t.aclose()


@pytest.fixture(autouse=True)
async def loop_errors(caplog: pytest.LogCaptureFixture) -> AsyncIterator[list[dict[str, Any]]]:
    """Nothing may reach the loop's exception handler ("Task exception was never retrieved",
    "Exception in callback") or the asyncio logger at ERROR, in any test."""
    loop = asyncio.get_running_loop()
    calls: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: calls.append(context))
    caplog.set_level(logging.WARNING, logger="asyncio")
    try:
        yield calls
        gc.collect()                               # finalise dropped tasks while still recording
        await asyncio.sleep(0)
        asyncio_errors = [r.getMessage() for r in caplog.records
                          if r.name == "asyncio" and r.levelno >= logging.ERROR]
        assert not calls, [c.get("message") for c in calls]
        assert not asyncio_errors, asyncio_errors
    finally:
        loop.set_exception_handler(previous)


# --- response framing: Content-Length ---------------------------------------------------------

async def test_content_length_body_read_exactly(transport: UpstreamTransport) -> None:
    body = bytes(range(256)) * 64 + b"\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"
    async with RawServer(reply=lambda r: ok(body, b"Content-Type: application/octet-stream\r\n")) as server:
        response, got = await fetch(transport, "GET", server.url + "/x")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.extensions["http_version"] == b"HTTP/1.1"
    assert response.extensions["reason_phrase"] == b"OK"
    assert got == body


async def test_content_length_body_in_several_tcp_writes_reassembled_exactly(
        transport: UpstreamTransport, reads: Reads) -> None:
    body = b"".join(b"%05d," % i for i in range(2000))
    response_bytes = ok(body)
    cuts = [5, 17, len(response_bytes) - len(body) - 2, len(response_bytes) - len(body) + 1, 4000, 9000]
    pieces = [response_bytes[a:b] for a, b in zip([0, *cuts], [*cuts, len(response_bytes)])]

    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(index, reader) is not None:
            await write_in_reads(writer, pieces, reads)

    async with RawServer(handler=handler) as server:
        _, first = await fetch(transport, "GET", server.url + "/a")
        _, second = await fetch(transport, "GET", server.url + "/b")
    assert first == body and second == body
    assert reads.count >= 2 * len(pieces)          # every piece was its own socket read
    assert server.connections == 1                 # and the split body left the connection usable


# --- response framing: chunked ----------------------------------------------------------------

CHUNKED_BODY = (b"5;ext=1\r\nhello\r\n"
                b"A\r\n0123456789\r\n"
                b"a;name=\"quoted;value\"\r\nabcdefghij\r\n"
                b"1F\r\n" + b"U" * 31 + b"\r\n"
                b"1f ; spaced=ext\r\n" + b"l" * 31 + b"\r\n"
                b"0;last=yes\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n")
CHUNKED_DECODED = b"hello" + b"0123456789" + b"abcdefghij" + b"U" * 31 + b"l" * 31


async def test_chunked_body_with_extensions_hex_case_and_trailers_decoded_exactly_then_reused(
        transport: UpstreamTransport) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Trailer, X-Other\r\n\r\n"
    async with RawServer(reply=lambda r: head + CHUNKED_BODY) as server:
        _, first = await fetch(transport, "GET", server.url + "/one")
        _, second = await fetch(transport, "GET", server.url + "/two")
    assert first == CHUNKED_DECODED
    assert second == CHUNKED_DECODED
    assert [r.target for r in server.requests] == [b"/one", b"/two"]
    assert server.connections == 1


async def test_chunked_body_split_at_every_byte_decoded_exactly_then_reused(
        transport: UpstreamTransport, reads: Reads) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"3;x=y\r\nabc\r\nA\r\n0123456789\r\n0\r\nT: 1\r\n\r\n"
    pieces = [head] + [body[i:i + 1] for i in range(len(body))]

    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(index, reader) is not None:
            await write_in_reads(writer, pieces, reads)

    async with RawServer(handler=handler) as server:
        _, first = await fetch(transport, "GET", server.url + "/a")
        _, second = await fetch(transport, "GET", server.url + "/b")
    assert first == second == b"abc0123456789"
    assert server.connections == 1


# --- response framing: until close, no body -----------------------------------------------------

@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",       # not chunked last: read to close
    b"HTTP/1.0 200 OK\r\n\r\n",
], ids=["no-length", "te-not-chunked", "http10"])
async def test_until_close_body_read_to_eof_and_connection_not_reused(
        transport: UpstreamTransport, head: bytes) -> None:
    body = b"until-close body\r\n\r\n" * 100
    async with RawServer(reply=lambda r: Reply(head + body, close=True)) as server:
        _, first = await fetch(transport, "GET", server.url + "/a")
        _, second = await fetch(transport, "GET", server.url + "/b")
    assert first == body and second == body
    assert server.connections == 2


async def test_http10_response_with_content_length_not_reused(transport: UpstreamTransport) -> None:
    async with RawServer(reply=lambda r: b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok") as server:
        await fetch(transport, "GET", server.url + "/a")
        await fetch(transport, "GET", server.url + "/b")
    assert server.connections == 2


async def test_head_with_content_length_reads_no_body_and_reuses_connection(
        transport: UpstreamTransport) -> None:
    def reply(r: Received) -> bytes:
        if r.method == b"HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n"
        return ok(b"after-head")

    async with RawServer(reply=reply) as server:
        response, body = await fetch(transport, "HEAD", server.url + "/h")
        assert response.headers["content-length"] == "1000"
        assert body == b""
        _, after = await fetch(transport, "GET", server.url + "/g")
    assert after == b"after-head"
    assert server.connections == 1


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: \"e\"\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
], ids=["204", "304-with-length", "304-with-chunked"])
async def test_no_body_statuses_read_no_body_and_reuse_connection(
        transport: UpstreamTransport, head: bytes) -> None:
    answers = iter([head, ok(b"next")])
    async with RawServer(reply=lambda r: next(answers)) as server:
        response, body = await fetch(transport, "GET", server.url + "/nb")
        _, after = await fetch(transport, "GET", server.url + "/next")
    assert response.status_code in (204, 304)
    assert body == b""
    assert after == b"next"
    assert server.connections == 1


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\n\r\n",
], ids=["100", "103", "100-then-103"])
async def test_interim_1xx_responses_skipped_before_final_response(
        transport: UpstreamTransport, interim: bytes) -> None:
    async with RawServer(reply=lambda r: interim + ok(b"final", b"X-Final: 1\r\n")) as server:
        response, body = await fetch(transport, "POST", server.url + "/i", content=b"data")
        _, again = await fetch(transport, "GET", server.url + "/again")
    assert response.status_code == 200
    assert body == b"final"
    assert response.headers["x-final"] == "1"
    assert "link" not in response.headers
    assert again == b"final"
    assert server.requests[0].body == b"data"
    assert server.connections == 1


async def test_connection_close_response_not_reused(transport: UpstreamTransport) -> None:
    # the server itself keeps the connection open: closing it is the transport's decision
    async with RawServer(reply=lambda r: ok(b"bye", b"Connection: close\r\n")) as server:
        _, body = await fetch(transport, "GET", server.url + "/a")
        await wait_event(server.ended[0], "the transport to close the Connection: close connection")
        _, body2 = await fetch(transport, "GET", server.url + "/b")
    assert body == body2 == b"bye"
    assert 0 in server.eof
    assert server.connections == 2


# --- malformed responses ----------------------------------------------------------------------

BIG_FIELD = b"X-Big: " + b"v" * 1000 + b"\r\n"
MALFORMED = {
    "status-no-code": b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
    "status-garbage": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "status-bad-version": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "status-two-digits": b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    "status-not-digits": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "status-below-100": b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    "header-obs-fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n",
    "header-no-colon": b"HTTP/1.1 200 OK\r\nNoColonHere\r\nContent-Length: 0\r\n\r\n",
    "header-space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "header-empty-name": b"HTTP/1.1 200 OK\r\n: v\r\nContent-Length: 0\r\n\r\n",
    "content-length-two-values": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "content-length-list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok",
    "content-length-negative": b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
    "content-length-not-number": b"HTTP/1.1 200 OK\r\nContent-Length: two\r\n\r\nok",
    "chunk-size-not-hex": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "chunk-size-empty": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\nok\r\n0\r\n\r\n",
    "chunk-size-negative": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nok\r\n0\r\n\r\n",
    "chunk-size-plus": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nok\r\n0\r\n\r\n",
    "chunk-size-0x-prefix": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nok\r\n0\r\n\r\n",
    "chunk-size-underscore": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0_2\r\nok\r\n0\r\n\r\n",
    "chunk-data-overrun": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n0\r\n\r\n",
    "chunk-line-endless": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 5000,
    "switching-protocols-unasked": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
    "head-over-64k-unterminated": b"HTTP/1.1 200 OK\r\n" + BIG_FIELD * 70,
    "head-over-64k-complete": b"HTTP/1.1 200 OK\r\n" + BIG_FIELD * 70 + b"Content-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_response_raises_remote_protocol_error(
        transport: UpstreamTransport, raw: bytes) -> None:
    """Never another exception type, never a hang (the server keeps the connection open, so a
    hang would end in ReadTimeout, which fails this test)."""
    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(index, reader)
        writer.write(raw)                          # one write: the client gets it in one read
        await writer.drain()
        await reader.read()                        # keep the connection open until the client ends it

    async with RawServer(handler=handler) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(transport, "GET", server.url + "/m")
        await wait_event(server.ended[0], "the broken connection to be closed")
    assert not transport._idle                     # noqa: SLF001 - nothing broken was pooled


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n0123456789",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
], ids=["content-length", "chunked-mid-data", "chunked-between-chunks"])
async def test_server_closing_mid_body_raises_protocol_or_read_error(
        transport: UpstreamTransport, raw: bytes) -> None:
    async with RawServer(reply=lambda r: Reply(raw, close=True)) as server:
        response = await transport.handle_async_request(request("GET", server.url + "/cut"))
        received = b""
        try:
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                async for chunk in response.stream:  # type: ignore[union-attr]
                    received += chunk
        finally:
            await response.aclose()
    assert received == b"0123456789"
    assert not transport._idle                     # noqa: SLF001


# --- connect and read failures -----------------------------------------------------------------

async def test_connection_refused_raises_connect_error(transport: UpstreamTransport) -> None:
    with pytest.raises(httpx.ConnectError):
        await fetch(transport, "GET", f"http://127.0.0.1:{closed_port()}/")


async def test_server_that_never_answers_raises_read_timeout(transport: UpstreamTransport) -> None:
    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(index, reader)
        await reader.read()                        # never answers; waits for the client to give up

    async with RawServer(handler=handler) as server:
        with pytest.raises(httpx.ReadTimeout):
            await fetch(transport, "GET", server.url + "/silent",
                        timeout=httpx.Timeout(5.0, read=0.2).as_dict())
        assert len(server.requests) == 1
        await wait_event(server.ended[0], "the timed-out connection to be closed")


async def test_body_that_stalls_raises_read_timeout_while_iterating(transport: UpstreamTransport) -> None:
    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(index, reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nstart")
        await reader.read()                        # the rest never comes

    async with RawServer(handler=handler) as server:
        response = await transport.handle_async_request(request(
            "GET", server.url + "/stall", timeout=httpx.Timeout(5.0, read=0.2).as_dict()))
        try:
            with pytest.raises(httpx.ReadTimeout):
                async for _ in response.stream:    # type: ignore[union-attr]
                    pass
        finally:
            await response.aclose()
        await wait_event(server.ended[0], "the stalled connection to be closed")
    assert not transport._idle                     # noqa: SLF001


# --- stale keep-alive connections -------------------------------------------------------------

async def test_stale_keepalive_closed_while_idle_next_get_succeeds_on_new_connection(
        transport: UpstreamTransport) -> None:
    pooled = asyncio.Event()

    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if index == 0:                             # answer once with keep-alive, close when idle
            await server.read_request(index, reader)
            writer.write(ok(b"first"))
            await writer.drain()
            await pooled.wait()
            return
        await server.serve(index, reader, writer)

    async with RawServer(handler=handler, reply=lambda r: ok(b"second")) as server:
        _, first = await fetch(transport, "GET", server.url + "/one")
        assert len(transport._idle) == 1           # noqa: SLF001 - kept alive
        pooled.set()
        await wait_event(server.ended[0], "the server to close the idle connection")
        _, second = await fetch(transport, "GET", server.url + "/two")
    assert (first, second) == (b"first", b"second")
    assert server.connections == 2
    assert [r.target for r in server.requests] == [b"/one", b"/two"]


async def test_get_on_reused_connection_closed_without_answer_is_retried_once_on_new_connection(
        transport: UpstreamTransport) -> None:
    """The deterministic form of the idle-close race: the server takes the second request on
    the pooled connection and closes without a byte of answer."""
    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if index == 0:
            await server.read_request(index, reader)
            writer.write(ok(b"first"))
            await writer.drain()
            await server.read_request(index, reader)
            return                                 # closes without answering
        await server.serve(index, reader, writer)

    async with RawServer(handler=handler, reply=lambda r: ok(b"retried")) as server:
        await fetch(transport, "GET", server.url + "/one")
        response, body = await fetch(transport, "GET", server.url + "/two")
    assert response.status_code == 200 and body == b"retried"
    assert server.connections == 2
    assert [(r.conn, r.target) for r in server.requests] == [(0, b"/one"), (0, b"/two"), (1, b"/two")]


async def test_stale_retry_happens_only_once(transport: UpstreamTransport) -> None:
    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(index, reader)
        if index == 0:
            writer.write(ok(b"first"))
            await writer.drain()
            await server.read_request(index, reader)
        # every later connection closes without answering as well

    async with RawServer(handler=handler) as server:
        await fetch(transport, "GET", server.url + "/one")
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(transport, "GET", server.url + "/two")
    assert server.connections == 2


async def hang_up_on_second(server: RawServer, index: int, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
    """The idle close racing a request: the first connection answers its first request, then
    reads the next head and closes without a byte of answer; later connections are served."""
    if index == 0:
        await server.read_request(index, reader)
        writer.write(ok(b"first"))
        await writer.drain()
        await server.read_request(index, reader, body=False)
        return
    await server.serve(index, reader, writer)


async def test_post_whose_body_was_pulled_is_not_resent_when_the_reused_connection_dies(
        transport: UpstreamTransport) -> None:
    """A bytes body is taken from its source at once; once a chunk is out of the source the
    request cannot be sent whole again, and the upstream might have acted on it."""
    async with RawServer(handler=lambda *conn: hang_up_on_second(server, *conn),
                         reply=lambda r: ok(b"must not happen")) as server:
        await fetch(transport, "GET", server.url + "/one")
        with pytest.raises(httpx.TransportError):
            await fetch(transport, "POST", server.url + "/post", content=b"payload")
    assert server.connections == 1                 # not silently sent again
    assert [r.target for r in server.requests] == [b"/one", b"/post"]


async def test_put_whose_body_has_not_started_is_resent_on_a_fresh_connection_when_the_reused_one_dies(
        transport: UpstreamTransport) -> None:
    """The idle close racing the request: the upstream takes the head on the pooled connection
    and closes without a byte of answer. No chunk was pulled from the body's source yet, so the
    request can still go whole on a fresh connection, body and all."""
    started = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        await started.wait()                       # the client sends only once the retry is on
        yield b"part one, "
        yield b"part two"

    async with RawServer(handler=lambda *conn: hang_up_on_second(server, *conn),
                         reply=lambda r: ok(b"got " + r.body)) as server:
        await fetch(transport, "GET", server.url + "/one")
        posting = asyncio.ensure_future(fetch(transport, "PUT", server.url + "/post", content=body()))
        await wait_until(lambda: len(server.requests) == 3 or posting.done(),
                         "the PUT's head on a second connection")
        started.set()
        response, got = await posting
    assert response.status_code == 200 and got == b"got part one, part two"
    assert [(r.conn, r.target) for r in server.requests] == [(0, b"/one"), (0, b"/post"), (1, b"/post")]
    assert server.requests[2].header(b"transfer-encoding") == [b"chunked"]


async def test_post_whose_head_the_reused_connection_took_is_not_resent(
        transport: UpstreamTransport) -> None:
    """The same race for a POST: its head was written, so the upstream may have taken it and a
    second send could run it twice (RFC 9110 9.2.2). It fails once, as a 502 would."""
    async with RawServer(handler=lambda *conn: hang_up_on_second(server, *conn),
                         reply=lambda r: ok(b"got " + r.body)) as server:
        await fetch(transport, "GET", server.url + "/one")
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(transport, "POST", server.url + "/post")     # no body: nothing to pull
    assert [(r.conn, r.target) for r in server.requests] == [(0, b"/one"), (0, b"/post")]


async def test_unsolicited_bytes_on_idle_connection_never_taken_as_next_response(
        transport: UpstreamTransport, reads: Reads) -> None:
    """Bytes an upstream sends on an idle keep-alive connection (a stray response, a 408
    before closing) belong to no request; the next request must not get them as its answer."""
    pooled = asyncio.Event()

    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if index == 0:
            await server.read_request(index, reader)
            writer.write(ok(b"first"))
            await writer.drain()
            await pooled.wait()
            reads.event.clear()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
            await writer.drain()
            await wait_event(reads.event, "the idle connection to receive the stray bytes")
            stray_received.set()
        await server.serve(index, reader, writer)

    stray_received = asyncio.Event()
    async with RawServer(handler=handler, reply=lambda r: ok(b"real")) as server:
        await fetch(transport, "GET", server.url + "/one")
        pooled.set()
        await wait_event(stray_received, "the stray bytes to arrive")
        _, body = await fetch(transport, "GET", server.url + "/two")
    assert body == b"real"


# --- request framing as the server sees it -----------------------------------------------------

async def test_post_bytes_sent_with_content_length_and_no_transfer_encoding(
        transport: UpstreamTransport) -> None:
    payload = bytes(range(256)) * 300
    async with RawServer(reply=lambda r: ok()) as server:
        await fetch(transport, "POST", server.url + "/p", content=payload)
    seen = server.requests[0]
    assert seen.header(b"content-length") == [str(len(payload)).encode()]
    assert seen.header(b"transfer-encoding") == []
    assert seen.body == payload
    assert server.errors == []


async def test_post_async_iterator_without_length_sent_chunked_and_decoded_exactly(
        transport: UpstreamTransport) -> None:
    parts = [b"first", b"", b"x" * 100_000, b"\r\n0\r\n\r\n", b"", b"last"]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with RawServer(reply=lambda r: ok()) as server:
        await fetch(transport, "POST", server.url + "/c", content=body())
        _, after = await fetch(transport, "GET", server.url + "/after")
    seen = server.requests[0]
    assert seen.header(b"transfer-encoding") == [b"chunked"]
    assert seen.header(b"content-length") == []
    assert seen.body == b"".join(parts)
    assert after == b"ok" and server.connections == 1
    assert server.errors == []


async def test_post_async_iterator_chunked_upload_to_hypercorn_arrives_exactly(
        transport: UpstreamTransport) -> None:
    parts = [b"a" * 70_000, b"b" * 5, b"", b"c" * 123_456]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    app = Upstream()
    async with serving(app) as url:
        response, got = await fetch(transport, "POST", url + "/upload", content=body())
        _, big = await fetch(transport, "GET", url + "/big?size=300000")
    assert response.status_code == 200
    assert got == b'{"size": %d}' % sum(map(len, parts))
    assert app.seen[0].body_sha256 == hashlib.sha256(b"".join(parts)).hexdigest()
    assert big == b"x" * 300_000


async def test_host_header_comes_from_url(transport: UpstreamTransport) -> None:
    async with RawServer(reply=lambda r: ok()) as server:
        await fetch(transport, "GET", server.url + "/h")
    assert server.requests[0].header(b"host") == [f"127.0.0.1:{server.port}".encode()]


async def test_repeated_request_headers_stay_separate_lines(transport: UpstreamTransport) -> None:
    headers = [(b"x-multi", b"1"), (b"x-other", b"o"), (b"x-multi", b"2, 3"), (b"Set-Thing", b"a=1")]
    async with RawServer(reply=lambda r: ok()) as server:
        await fetch(transport, "GET", server.url + "/r", headers=headers)
    seen = server.requests[0]
    assert seen.header(b"x-multi") == [b"1", b"2, 3"]
    assert [(n, v) for n, v in seen.headers if n.lower() != b"host"] == headers


async def test_no_automatic_headers_added(transport: UpstreamTransport) -> None:
    async with RawServer(reply=lambda r: ok()) as server:
        await fetch(transport, "GET", server.url + "/g", headers=[(b"x-only", b"1")])
        await fetch(transport, "POST", server.url + "/p", content=b"payload")
    get, post = server.requests
    assert {n.lower() for n, _ in get.headers} == {b"host", b"x-only"}
    assert {n.lower() for n, _ in post.headers} == {b"host", b"content-length"}


@pytest.mark.parametrize(("raw_path", "query"), [
    (b"/a%2Fb/c%20d", b"q=%2F&x=1&x=2"),
    (b"/a/../b", b""),
    (b"/x/./y/%2e%2e/z", b"k=v"),
    (b"//evil.example/x", b""),
    (b"/p;param=1/q", b"a=1;b=2"),
])
async def test_request_target_is_exactly_url_raw_path(raw_path: bytes, query: bytes) -> None:
    async with RawServer(reply=lambda r: ok()) as server:
        async with httpx.AsyncClient(transport=UpstreamTransport(), timeout=5) as client:
            forwarder = Forwarder(client, httpx.URL(server.url), 5.0)
            url = forwarder.target(raw_path, query)
            response = await forwarder.open("GET", url, [], None)
            await response.aread()
            await response.aclose()
    expected = raw_path + (b"?" + query if query else b"")
    assert url.raw_path == expected
    assert server.requests[0].line == b"GET " + expected + b" HTTP/1.1"


@pytest.mark.parametrize("value", [b"a\r\nInjected: yes", b"a\nInjected: yes", b"a\rInjected: yes"],
                         ids=["crlf", "lf", "cr"])
async def test_header_value_with_line_break_never_reaches_the_wire(
        transport: UpstreamTransport, value: bytes) -> None:
    """A CR or LF in a header value would let it start a header (or request) of its own;
    httpx's default transport (h11) refuses such a request. Refusing is fine here too, sending
    it is not."""
    async with RawServer(reply=lambda r: ok()) as server:
        try:
            await fetch(transport, "GET", server.url + "/inj", headers=[(b"x-a", value)])
        except (httpx.TransportError, ValueError):
            pass
        for seen in server.requests:
            assert b"Injected" not in seen.head, seen.head


# --- pauses during an upload: one timeout from the last move ---------------------------------------

PAUSE_TIMEOUT = 0.5


async def test_client_pausing_its_upload_times_out_one_timeout_after_its_last_chunk(
        transport: UpstreamTransport) -> None:
    """The pause is measured from the moment the body last moved, not sampled once per timeout
    window (which let a pause starting early in a window run to nearly two timeouts). The
    upper bound is the behaviour under test, with half a timeout of margin."""
    never = asyncio.Event()
    last_chunk = 0.0

    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(index, reader, body=False)
        await reader.read()                        # takes the body as it comes, never answers

    async def body() -> AsyncIterator[bytes]:
        nonlocal last_chunk
        last_chunk = time.monotonic()
        yield b"x" * 1000
        await never.wait()                         # ... and the client pauses
        yield b"never sent"

    async with RawServer(handler=handler) as server:
        with pytest.raises(BodySourceTimeout):
            await fetch(transport, "POST", server.url + "/up", content=body(),
                        timeout=httpx.Timeout(5.0, read=PAUSE_TIMEOUT).as_dict())
        paused = time.monotonic() - last_chunk
    assert paused < 1.5 * PAUSE_TIMEOUT, paused


async def test_upstream_that_stops_taking_the_upload_times_out_one_timeout_after_it_stopped(
        transport: UpstreamTransport) -> None:
    """The other side of the same clock: the upstream stops reading, the body stops moving
    (the last chunk pulled from the source is when the socket buffers had room last), and
    ReadTimeout comes one timeout later, not the client's BodySourceTimeout."""
    hold = asyncio.Event()
    last_chunk = 0.0

    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(index, reader, body=False)
        await hold.wait()                          # never reads the body

    async def body() -> AsyncIterator[bytes]:
        nonlocal last_chunk
        for _ in range(1024):                      # 64 MiB at most: far more than socket buffers hold
            last_chunk = time.monotonic()
            yield b"b" * 65536

    async with RawServer(handler=handler) as server:
        with pytest.raises(httpx.ReadTimeout) as caught:
            await fetch(transport, "POST", server.url + "/up", content=body(),
                        timeout=httpx.Timeout(5.0, read=PAUSE_TIMEOUT).as_dict())
        stalled = time.monotonic() - last_chunk
        hold.set()
    assert not isinstance(caught.value, BodySourceTimeout)
    assert stalled < 1.5 * PAUSE_TIMEOUT, stalled


# --- early response during upload ---------------------------------------------------------------

async def test_early_response_during_upload_not_reused_and_nothing_logged(
        transport: UpstreamTransport, loop_errors: list[dict[str, Any]]) -> None:
    gate = asyncio.Event()
    discarded = 0

    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal discarded
        if index == 0:                             # answer after the head, then read and discard
            await server.read_request(index, reader, body=False)
            writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
            await writer.drain()
            while data := await reader.read(65536):
                discarded += len(data)
            server.eof.add(index)
            return
        await server.serve(index, reader, writer)

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 65536
        await gate.wait()                          # the rest only after the answer came
        yield b"y" * 65536

    async with RawServer(handler=handler, reply=lambda r: ok(b"next")) as server:
        response, got = await fetch(transport, "POST", server.url + "/upload", content=body())
        gate.set()
        assert response.status_code == 413 and got == b"too big!"
        await wait_event(server.ended[0], "the transport to close the interrupted upload")
        _, after = await fetch(transport, "GET", server.url + "/next")
    assert after == b"next"
    assert server.connections == 2                 # the interrupted connection was not reused
    assert 0 in server.eof
    assert discarded < 2 * 65536 + 100             # the upload stopped at the early answer
    gc.collect()
    await asyncio.sleep(0)
    assert loop_errors == []


async def test_early_response_while_upload_blocked_releases_connection(
        transport: UpstreamTransport) -> None:
    """The upstream answers 413 and stops reading (but keeps its socket open). A large body is
    still queued in the transport's write buffer: closing the response must let go of the
    socket (and that buffer) instead of waiting forever for a flush that cannot happen."""
    hold = asyncio.Event()

    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(index, reader, body=False)
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!")
        await writer.drain()
        await hold.wait()                          # never reads the body

    async with RawServer(handler=handler) as server:
        response, got = await fetch(transport, "POST", server.url + "/upload",
                                    content=b"z" * (32 * 1024 * 1024))
        assert response.status_code == 413 and got == b"too big!"
        conn: _Connection = response.stream.conn  # type: ignore[union-attr]
        assert conn.transport is not None
        # connection_lost (which sets eof: the server never closes) means the socket is gone
        await wait_until(lambda: conn.eof and conn.transport.get_write_buffer_size() == 0,  # type: ignore[union-attr]
                         "the transport to close the socket and drop the unsendable body")


# --- backpressure ------------------------------------------------------------------------------

async def test_slow_consumer_keeps_buffer_bounded_by_high_water_plus_one_read(
        transport: UpstreamTransport, reads: Reads) -> None:
    size = 4 * 1024 * 1024
    block = bytes(range(256)) * 256                # 64 KiB

    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(index, reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        await reader.read()

    async with RawServer(handler=handler) as server:
        response = await transport.handle_async_request(request("GET", server.url + "/big"))
        conn: _Connection = response.stream.conn  # type: ignore[union-attr]
        one_read = getattr(conn.transport, "max_size", 256 * 1024)
        bound = HIGH_WATER + one_read
        received = 0
        digest = hashlib.sha256()
        paused = 0
        try:
            async for chunk in response.stream:    # type: ignore[union-attr]
                received += len(chunk)
                digest.update(chunk)
                # consume slowly: let the transport read until it stops by itself or has the rest
                await wait_until(lambda: conn.paused_reading or received + len(conn.buffer) >= size,
                                 "the transport to pause reading")
                paused += conn.paused_reading
                assert len(conn.buffer) <= bound
        finally:
            await response.aclose()
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(block * (size // len(block))).hexdigest()
    assert paused > 0                              # backpressure actually engaged
    assert reads.peak_buffer <= bound, (reads.peak_buffer, bound)


# --- pool lifecycle ----------------------------------------------------------------------------

async def test_transport_aclose_closes_idle_pooled_connections() -> None:
    transport = UpstreamTransport()
    async with RawServer(reply=lambda r: ok()) as server:
        await fetch(transport, "GET", server.url + "/a")
        await fetch(transport, "GET", server.url + "/b")
        assert server.connections == 1 and not server.ended[0].is_set()
        await transport.aclose()
        await wait_event(server.ended[0], "the server to see the pooled connection end")
    assert 0 in server.eof


def test_oversized_heads_really_exceed_the_limit_and_fit_one_socket_read() -> None:
    """The head-over-64k cases above are meaningful only if they are over MAX_HEAD, and the
    complete one reaches the transport in a single read (asyncio reads up to 256 KiB)."""
    for case in ("head-over-64k-unterminated", "head-over-64k-complete"):
        assert MAX_HEAD < len(MALFORMED[case]) < 256 * 1024


async def test_pooled_connection_paused_by_a_large_body_reads_again_and_sees_the_upstream_close(
        transport: UpstreamTransport) -> None:
    """A body bigger than HIGH_WATER pauses reading; when its rest was buffered already the
    pause outlived the response. Pooled like that, the connection would never see the
    upstream close it."""
    body = b"L" * (HIGH_WATER + 100_000)
    hang_up = asyncio.Event()

    async def handler(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(index, reader)
        writer.write(ok(body))
        await writer.drain()
        await hang_up.wait()                       # keep-alive, then closed while idle

    async with RawServer(handler=handler) as server:
        response = await transport.handle_async_request(request("GET", server.url + "/big"))
        conn: _Connection = response.stream.conn  # type: ignore[union-attr]
        await wait_until(lambda: conn.paused_reading, "the transport to pause reading")
        got = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
        await response.aclose()
        assert got == body and transport._idle == deque([conn])      # noqa: SLF001
        hang_up.set()
        await wait_until(lambda: conn.eof, "the pooled connection to see the upstream's close")

"""UpstreamTransport: an httpx transport with its own HTTP/1.1 keep-alive pool on asyncio protocols.

httpx stays the client API (Request, Response, exceptions); underneath, the request head is one
bytes join and the response is parsed straight from the socket buffer. Tuned for a reverse
proxy: no cookie jar, no automatic headers, no decompression, the request target sent exactly as
the URL holds it, duplicate headers kept apart. Profiling showed httpx's default transport and
aiohttp's client costing several times what the forwarding itself needs.

Errors are httpx's, by what happened: refused -> ConnectError, slow to connect -> ConnectTimeout,
slow to answer -> ReadTimeout, broken or malformed answer -> RemoteProtocolError / ReadError."""
from __future__ import annotations

import asyncio
import re
import select
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .http1 import CHUNKED, LENGTH, NONE, UNTIL_CLOSE, framing, parse_head

MAX_HEAD = 64 * 1024                   # status line + headers of one response
MAX_CHUNK_LINE = 4096
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
HIGH_WATER = 256 * 1024                # stop reading the socket past this much unconsumed
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})
SKIP_REQUEST_HEADERS = frozenset({b"transfer-encoding", b"connection", b"keep-alive"})
CONNECT_ERRORS = (OSError, ssl.SSLError)
TIMER_SLACK = 0.001                    # uvloop's timers tick in milliseconds: re-arming for less spins

# chunked decoder states
SIZE, DATA, DATA_END, TRAILER, DONE = range(5)


class BodySourceTimeout(httpx.TimeoutException):
    """The request body's source (the client) sent nothing for a whole timeout period while
    the upstream was waiting for it: the client's delay, not the upstream's."""


class _Unanswered(httpx.RemoteProtocolError):
    """The upstream closed or reset the connection before a single byte of the response."""


class _Retry(Exception):
    """The reused connection was dead before our request could have been processed, and the
    request can still be sent whole: send it again on a fresh connection."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; reading is pull-based with a bounded buffer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.closed = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        self.paused_reading = False
        self.last_used = time.monotonic()
        self.served = 0
        self.poller: select.poll | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.upload: _Upload | None = None     # a body still streaming while the head is awaited
        # response body state
        self.mode = NONE
        self.remaining = 0
        self.chunk_state = SIZE

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(select, "poll"):
            # a poll object holds no fd of its own: nothing to close, no syscall until used
            self.poller = select.poll()
            self.poller.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > HIGH_WATER and not self.paused_reading and self.transport:
            self.paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.eof = True
        self.error = exc
        self._wake()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        if self.drain_waiter is None or self.drain_waiter.done():
            self.drain_waiter = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    # -- helpers -----------------------------------------------------------------------------
    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        """Wait for more data, EOF or loss, at most `timeout` seconds (then ReadTimeout)."""
        self.resume()
        waiter = self.waiter = self.loop.create_future()
        if timeout is not None:
            self.timer = self.loop.call_later(timeout, self._expire, waiter, timeout)
        try:
            await waiter
        finally:
            self.waiter = None
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    def _expire(self, waiter: asyncio.Future[None], timeout: float) -> None:
        """`timeout` passed without a byte from the upstream. While a request body streams, the
        pause is counted from the body's last move instead: the timer is re-armed for the rest."""
        if waiter.done():
            return
        upload = self.upload
        if upload is not None:
            rest = upload.moved + timeout - self.loop.time()
            if rest > TIMER_SLACK:
                self.timer = self.loop.call_later(rest, self._expire, waiter, timeout)
                return
            if upload.waiting_source:
                waiter.set_exception(BodySourceTimeout(
                    f"the request body stalled: nothing to send for {timeout:g} s"))
                return
        waiter.set_exception(httpx.ReadTimeout("upstream did not answer in time"))

    def resume(self) -> None:
        """Let the socket be read again (an idle connection must see the upstream's EOF)."""
        if self.paused_reading and self.transport is not None:
            self.paused_reading = False
            self.transport.resume_reading()

    @property
    def alive(self) -> bool:
        """Nothing pending on the idle socket: no EOF, reset or stray bytes the event loop has
        not reported yet. One poll(2) with no timeout, well under a microsecond."""
        if self.closed or self.eof or self.buffer:
            return False
        return self.poller is None or not self.poller.poll(0)

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise httpx.WriteError("upstream connection closed while sending")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.drain_waiter is not None and not self.drain_waiter.done():
            await self.drain_waiter
        if self.closed:
            raise httpx.WriteError("upstream connection closed while sending")

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            if self.transport.get_write_buffer_size():
                self.transport.abort()                    # unsent body: never wait to flush it
            else:
                self.transport.close()

    # -- response ----------------------------------------------------------------------------
    async def read_head(self, timeout: float | None) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        """Status, version, reason and headers of the next response head."""
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end > MAX_HEAD:
                raise httpx.RemoteProtocolError("upstream response head too large")
            if end >= 0:
                head = bytes(self.buffer[:end])
                del self.buffer[:end + 4]
                return parse_head(head)
            if len(self.buffer) > MAX_HEAD:
                raise httpx.RemoteProtocolError("upstream response head too large")
            if self.eof:
                if self.buffer:
                    raise httpx.RemoteProtocolError(
                        "upstream closed the connection without a complete response")
                raise _Unanswered("upstream closed the connection without answering")
            await self._wait(timeout)

    def start_body(self, mode: int, length: int) -> None:
        self.mode, self.remaining, self.chunk_state = mode, length, SIZE

    @property
    def body_done(self) -> bool:
        return (self.mode == NONE or (self.mode == LENGTH and self.remaining == 0)
                or (self.mode == CHUNKED and self.chunk_state == DONE))

    async def read_body(self, timeout: float | None) -> bytes:
        """The next piece of the response body; b'' once it is complete."""
        while True:
            chunk = self._take()
            if chunk is not None:
                return chunk
            if self.eof:
                if self.mode == UNTIL_CLOSE:
                    self.mode = NONE
                    return b""
                raise httpx.RemoteProtocolError("upstream closed the connection mid-body")
            await self._wait(timeout)

    def _take_remaining(self) -> bytes:
        """Up to `remaining` buffered bytes (of a Content-Length body or of one chunk)."""
        buf = self.buffer
        n = min(self.remaining, len(buf))
        out = bytes(buf[:n]) if n < len(buf) else bytes(buf)
        del buf[:n]
        self.remaining -= n
        return out

    def _take(self) -> bytes | None:
        """Body bytes available now, b'' at the end, None when more must be read."""
        buf = self.buffer
        if self.mode == NONE:
            return b""
        if self.mode == LENGTH:
            if self.remaining == 0:
                return b""
            return self._take_remaining() if buf else None
        if self.mode == UNTIL_CLOSE:
            if not buf:
                return None
            out = bytes(buf)
            buf.clear()
            return out
        while True:                                   # chunked
            state = self.chunk_state
            if state == DATA:
                if not buf:
                    return None
                out = self._take_remaining()
                if self.remaining == 0:
                    self.chunk_state = DATA_END
                return out
            if state == DONE:
                return b""
            if state == DATA_END:
                if len(buf) < 2:
                    return None
                if buf[:2] != b"\r\n":
                    raise httpx.RemoteProtocolError("malformed chunked body from upstream")
                del buf[:2]
                self.chunk_state = SIZE
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_CHUNK_LINE:
                    raise httpx.RemoteProtocolError("malformed chunked body from upstream")
                return None
            line = bytes(buf[:end])
            del buf[:end + 2]
            if state == TRAILER:
                if not line:
                    self.chunk_state = DONE
                continue
            size = line.split(b";", 1)[0].strip()
            if not CHUNK_SIZE.fullmatch(size):             # no '0x', signs or '_' (smuggling)
                raise httpx.RemoteProtocolError("malformed chunk size from upstream")
            self.remaining = int(size, 16)
            self.chunk_state = DATA if self.remaining else TRAILER


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, pool: UpstreamTransport, conn: _Connection, reusable: bool,
                 timeout: float | None, sender: asyncio.Task[None] | None) -> None:
        self.pool = pool
        self.conn = conn
        self.reusable = reusable
        self.timeout = timeout
        self.sender = sender
        self.released = False

    @property
    def buffered_all(self) -> bool:
        """The whole body is already in memory: relaying it cannot wait on the upstream."""
        conn = self.conn
        return conn.mode == NONE or (conn.mode == LENGTH and len(conn.buffer) >= conn.remaining)

    @property
    def done(self) -> bool:
        """The last body byte has been handed out."""
        return self.conn.body_done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self.conn
        try:
            while chunk := await conn.read_body(self.timeout):
                yield chunk
        except OSError as exc:
            raise httpx.ReadError(str(exc)) from exc

    async def aclose(self) -> None:
        if self.released:
            return
        self.released = True
        conn = self.conn
        sender = self.sender
        sender_busy = sender is not None and not sender.done()
        if sender is not None:
            if sender_busy:
                sender.cancel()                       # the upstream answered before the body
            elif not sender.cancelled() and sender.exception() is not None:
                sender_busy = True                    # retrieved; the connection is unusable
        if self.reusable and not sender_busy and conn.body_done and not conn.buffer:
            self.pool._put(conn)
        else:
            conn.close()


class UpstreamTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to one upstream origin with a LIFO pool of keep-alive connections."""

    def __init__(self, *, max_idle: int = 100, keepalive_expiry: float = 4.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_idle = max_idle
        # below the 5 s idle timeout of common servers (Hypercorn, Node): reuse never races a close
        self.keepalive_expiry = keepalive_expiry
        self.ssl_context = ssl_context
        self._idle: deque[_Connection] = deque()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        read_timeout = timeouts.get("read")
        url = request.url
        method = request.method.encode()
        head = [method, b" ", url.raw_path, b" HTTP/1.1\r\n"]
        length = chunked = None
        for name, value in request.headers.raw:
            lower = name.lower()
            if lower in SKIP_REQUEST_HEADERS:
                chunked = chunked or (lower == b"transfer-encoding")
                continue
            if lower == b"content-length":
                length = value
            head += (name, b": ", value, b"\r\n")
        has_body = chunked or (length is not None and length != b"0")
        if has_body and length is None:
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        data = b"".join(head)
        lines = 2 + (len(head) - 5) // 4 + (has_body and length is None)   # one CRLF per line
        if data.count(b"\r\n") != lines or data.count(b"\r") != lines \
                or data.count(b"\n") != lines or b"\0" in data:
            raise httpx.LocalProtocolError("line break or NUL in the request line or a header")

        upload = _Upload(request.stream, length is None, asyncio.get_running_loop()) if has_body else None
        reused, conn = self._take()
        if conn is None:
            conn = await self._connect(url, timeouts.get("connect"))
        try:
            return await self._exchange(conn, request, method, data, upload, reused, read_timeout)
        except _Retry:
            pass
        try:
            conn = await self._connect(url, timeouts.get("connect"))
        except BaseException:
            if upload is not None:
                upload.cancel()
            raise
        return await self._exchange(conn, request, method, data, upload, False, read_timeout)

    async def _exchange(self, conn: _Connection, request: httpx.Request, method: bytes, head: bytes,
                        upload: _Upload | None, reused: bool, timeout: float | None) -> httpx.Response:
        """One request on `conn`. Raises _Retry when a reused connection turns out dead before
        the upstream could have taken the request: closed before the head was written, or, for
        an idempotent method, closed without a byte of answer before a body chunk was pulled."""
        answered = written = False
        try:
            conn.write(head)
            written = True
            if upload is not None:
                upload.attach(conn)
            while True:
                status, version, reason, headers = await conn.read_head(timeout)
                answered = True
                if status >= 200 or status == 101:
                    break                                 # 1xx interim answers are skipped
            if status == 101:
                raise httpx.RemoteProtocolError("upstream switched protocols unasked")
            mode, length, reusable = framing(method, status, headers)
        except BaseException as exc:
            conn.upload = None
            conn.close()
            # resent only where it cannot run twice: nothing left this side, or the method is
            # idempotent (RFC 9110 9.2.2); a POST whose head was written may have been taken
            if reused and not answered and isinstance(exc, (_Unanswered, httpx.WriteError)) \
                    and (upload is None or upload.movable) \
                    and (not written or method in IDEMPOTENT):
                if upload is not None:
                    upload.detach()
                raise _Retry() from exc
            sender = None if upload is None else upload.task
            if sender is not None:
                sender.cancel()
            if isinstance(exc, OSError):
                raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
            if isinstance(exc, httpx.TransportError) and sender is not None and sender.done() \
                    and not sender.cancelled() and sender.exception() is not None:
                raise exc from sender.exception()
            raise
        conn.upload = None
        conn.start_body(mode, length)
        conn.served += 1
        extensions = {"http_version": version, "reason_phrase": reason}
        return httpx.Response(status, headers=headers, request=request, extensions=extensions,
                              stream=_ResponseStream(self, conn, reusable and version == b"HTTP/1.1",
                                                     timeout, None if upload is None else upload.task))

    def _take(self) -> tuple[bool, _Connection | None]:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.last_used < self.keepalive_expiry and conn.alive:
                return True, conn
            conn.close()
        return False, None

    def _put(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= self.max_idle or conn.closed or conn.eof:
            conn.close()
            return
        conn.resume()
        conn.last_used = time.monotonic()
        self._idle.append(conn)

    async def _connect(self, url: httpx.URL, timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        secure = url.scheme == "https"
        if secure and self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        port = url.port or (443 if secure else 80)
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(loop), url.host, port,
                ssl=self.ssl_context if secure else None,
                server_hostname=url.host if secure else None), timeout)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {url.host}:{port} timed out") from None
        except CONNECT_ERRORS as exc:
            raise httpx.ConnectError(f"cannot connect to {url.host}:{port}: {exc}") from exc
        return conn

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


class _Upload:
    """A request body on its way upstream, pulled from its source by one task. Until the
    first chunk is pulled it can move to another connection: nothing of it is lost yet."""

    def __init__(self, stream: httpx.SyncByteStream | httpx.AsyncByteStream, chunked: bool,
                 loop: asyncio.AbstractEventLoop) -> None:
        assert isinstance(stream, httpx.AsyncByteStream)
        self.stream = stream
        self.chunked = chunked
        self.loop = loop
        self.conn: _Connection | None = None
        self.task: asyncio.Task[None] | None = None
        self.pulled = False                   # a chunk came from the source: no replay from here on
        self.waiting_source = False           # waiting on the client, not on the upstream
        self.moved = loop.time()              # when the body last moved, on either side
        self._attached: asyncio.Future[None] | None = None

    @property
    def movable(self) -> bool:
        """The body can still be sent whole elsewhere: nothing pulled, the source not failed."""
        return not self.pulled and self.task is not None and not self.task.done()

    def attach(self, conn: _Connection) -> None:
        """Send the body on `conn`, which carries the request head already."""
        self.conn = conn
        conn.upload = self
        self.moved = self.loop.time()
        task = self.task
        if task is None:
            self.task = self.loop.create_task(self._send())
        elif task.done():
            if not task.cancelled() and task.exception() is not None:
                conn.close()      # the source failed while the body was between connections
        elif self._attached is not None and not self._attached.done():
            self._attached.set_result(None)

    def detach(self) -> None:
        """The connection died under a body not started yet: hold it for the next one."""
        self.conn = None
        self._attached = self.loop.create_future()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _connection(self) -> _Connection:
        if self.conn is None:
            assert self._attached is not None
            await self._attached
        assert self.conn is not None
        return self.conn

    async def _send(self) -> None:
        """Stream the body with backpressure; a failure here closes the connection."""
        try:
            self.waiting_source = True
            async for chunk in self.stream:
                self.pulled = True
                self.waiting_source = False
                self.moved = self.loop.time()
                conn = await self._connection()
                if chunk:
                    conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk)
                    await conn.drain()
                    self.moved = self.loop.time()
                self.waiting_source = True
            self.waiting_source = False
            if self.chunked:
                (await self._connection()).write(b"0\r\n\r\n")
            self.moved = self.loop.time()
        except asyncio.CancelledError:
            raise
        except BaseException:
            if self.conn is not None:
                self.conn.close()                         # wakes the response reader
            raise

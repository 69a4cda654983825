"""The fastest upstream Python can offer: a raw asyncio (uvloop when installed) HTTP/1.1 server
with keep-alive that answers constant, precomputed responses.

  GET /         200, SMALL_BODY
  GET /large    200, LARGE_SIZE bytes
  * /upload     reads and discards the request body (Content-Length or chunked), 200 "ok"
  anything else 404

`python -m bench.upstream --port N [--host 127.0.0.1]`; SIGTERM or SIGINT stops it.
Used by the benchmark only when nginx is not on PATH."""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

SMALL_BODY = b"hello from the bench upstream\n"
LARGE_SIZE = 64 * 1024
UPLOAD_SIZE = 1024 * 1024
UPLOAD_REPLY = b"ok"
MAX_HEAD = 64 * 1024


def response(status: bytes, body: bytes, close: bool = False) -> bytes:
    head = (b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n")
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


LARGE_BODY = (b"0123456789abcdef" * (LARGE_SIZE // 16 + 1))[:LARGE_SIZE]
ROUTES = {b"/": response(b"200 OK", SMALL_BODY),
          b"/large": response(b"200 OK", LARGE_BODY),
          b"/upload": response(b"200 OK", UPLOAD_REPLY)}
NOT_FOUND = response(b"404 Not Found", b"not found\n")
BAD_REQUEST = response(b"400 Bad Request", b"bad request\n", close=True)

HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILER = range(6)
MORE, DONE, BAD = range(3)


class BodySkipper:
    """Discards a message body framed by Content-Length (state BODY, `left` bytes) or chunked
    encoding (state CHUNK_SIZE); shared by this upstream (request bodies) and the load
    generator (response bodies)."""

    state: int
    left: int

    def skip_body(self, buf: bytearray) -> int:
        """Consume body bytes from `buf`: DONE once the body has ended (state back to HEAD),
        MORE when more bytes are needed, BAD when the chunked framing is malformed."""
        while True:
            if self.state in (BODY, CHUNK_DATA):
                n = min(len(buf), self.left)
                del buf[:n]
                self.left -= n
                if self.left:
                    return MORE
                if self.state == BODY:
                    self.state = HEAD
                    return DONE
                self.state = CHUNK_CRLF
            elif self.state == CHUNK_CRLF:
                if len(buf) < 2:
                    return MORE
                del buf[:2]
                self.state = CHUNK_SIZE
            else:                                   # CHUNK_SIZE or TRAILER: one line
                end = buf.find(b"\r\n")
                if end < 0:
                    return BAD if len(buf) > MAX_HEAD else MORE
                line = bytes(buf[:end])
                del buf[:end + 2]
                if self.state == TRAILER:
                    if not line:
                        self.state = HEAD
                        return DONE
                    continue
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    return BAD
                if size == 0:
                    self.state = TRAILER
                else:
                    self.left, self.state = size, CHUNK_DATA


class UpstreamProtocol(asyncio.Protocol, BodySkipper):
    """One connection: parses requests (pipelining allowed), discards bodies, answers constants."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = HEAD
        self.left = 0
        self.reply = b""
        self.close_after = False
        self.head_only = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        if self.state in (BODY, CHUNK_DATA) and not buf:
            # fast path for body bytes: discard without copying into the buffer
            n = min(len(data), self.left)
            self.left -= n
            data = data[n:]
            if self.left == 0:
                if self.state == BODY:
                    self._respond()
                else:
                    self.state = CHUNK_CRLF
            if not data:
                return
        buf += data
        while self.transport is not None and not self.transport.is_closing():
            if self.state == HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        self._fail()
                    return
                head = bytes(buf[:end])
                del buf[:end + 4]
                if not self._parse_head(head):
                    self._fail()
                    return
            else:
                outcome = self.skip_body(buf)
                if outcome == MORE:
                    return
                if outcome == BAD:
                    self._fail()
                    return
                self._respond()

    def _parse_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            return False
        method, target, version = parts
        path = target.split(b"?", 1)[0]
        length = 0
        chunked = False
        connection = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    return False
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                connection = value.strip().lower()
        self.close_after = (connection == b"close"
                            or (version == b"HTTP/1.0" and connection != b"keep-alive"))
        self.head_only = method == b"HEAD"
        reply = ROUTES.get(path, NOT_FOUND)
        if self.close_after:
            reply = reply.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        self.reply = reply
        if chunked:
            self.state = CHUNK_SIZE
        elif length > 0:
            self.state, self.left = BODY, length
        else:
            self._respond()
        return True

    def _respond(self) -> None:
        assert self.transport is not None
        reply = self.reply
        if self.head_only:
            reply = reply[:reply.index(b"\r\n\r\n") + 4]
        self.transport.write(reply)
        self.state = HEAD
        if self.close_after:
            self.transport.close()

    def _fail(self) -> None:
        assert self.transport is not None
        self.transport.write(BAD_REQUEST)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=1024,
                                      reuse_address=True)
    try:
        await stop.wait()
    finally:
        server.close()                  # open connections die with the process


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(args.host, args.port))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

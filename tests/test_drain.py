"""An upstream that answers before reading the request body (413 on a large upload), end to end
through the gateway: the client's keep-alive connection must stay usable when the rest of the
body is small enough to drain, nothing may hang when it is not, and the forwarding slot is
always released."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from proxy.settings import Settings

SettingsFactory = Callable[..., Settings]
DEADLINE = 10.0                        # a hang guard, never a performance threshold
TOO_LARGE = b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\ntoo large"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


async def eventually(predicate: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}")
        await asyncio.sleep(0.01)


class EarlyAnswerUpstream:
    """A raw HTTP/1.1 upstream: a request with a body is answered 413 as soon as its head is
    read, and the body is then read and discarded; anything else is answered 200 "ok"."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[bytes, bytes, int]] = []     # method, target, content-length
        self.discarded = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                self.requests.append((method, target, length))
                if length:
                    writer.write(TOO_LARGE)                   # before reading any of the body
                    await writer.drain()
                    while length:                             # then keep reading, discarding
                        chunk = await reader.read(min(length, 65536))
                        if not chunk:
                            return
                        length -= len(chunk)
                        self.discarded += len(chunk)
                else:
                    writer.write(OK)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                                              # the gateway gave up on this one
        finally:
            writer.close()


@asynccontextmanager
async def early_upstream() -> AsyncIterator[tuple[EarlyAnswerUpstream, str]]:
    app = EarlyAnswerUpstream()
    server = await asyncio.start_server(app.serve, "127.0.0.1", 0)
    try:
        yield app, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in app.writers:
            writer.close()
        await server.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one Content-Length framed response."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


async def send_body(writer: asyncio.StreamWriter, size: int) -> int:
    """Write `size` body bytes with backpressure; returns how many were handed to the socket
    before the gateway closed the connection (if it did)."""
    sent = 0
    chunk = b"x" * 65536
    try:
        while sent < size:
            piece = chunk[:size - sent]
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
    except (ConnectionError, OSError):
        pass
    return sent


async def upload(url: str, size: int, first: int | None = None) -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[int], tuple[int, bytes]]:
    """POST a `size`-byte body on a fresh raw connection; returns the connection, the body
    sender and the (early) response. With `first`, only that many body bytes are sent before
    the response is read and the rest after it, so the gateway relays the answer while most of
    the body is still to come (without it, loopback buffers may take the whole body first)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /upload HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Length: %d\r\n\r\n" % size)
    if first is None:
        sender = asyncio.create_task(send_body(writer, size))
        response = await asyncio.wait_for(read_response(reader), DEADLINE)
    else:
        assert await send_body(writer, first) == first
        response = await asyncio.wait_for(read_response(reader), DEADLINE)
        sender = asyncio.create_task(send_body(writer, size - first))
    return reader, writer, sender, response


async def next_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, bytes] | None:
    """GET /next on the same connection: its response, or None if the gateway closed it."""
    try:
        writer.write(b"GET /next HTTP/1.1\r\nHost: gateway\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), DEADLINE)
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        return None


SMALL = 200 * 1024                     # within the drain cap
LARGE = 3 * 1024 * 1024                # past the 1 MiB the gateway drains
FIRST = 16 * 1024                      # body bytes sent before the early answer arrives


@pytest.mark.parametrize("first", [None, FIRST], ids=["whole-body-at-once", "rest-after-answer"])
async def test_early_413_keeps_the_client_connection_usable(start_gateway, make_settings, first) -> None:
    async with early_upstream() as (app, upstream_url):
        settings = make_settings(UPSTREAM_BACKEND_URL=upstream_url)
        async with start_gateway(settings) as gw:
            reader, writer, sender, (status, body) = await upload(gw.url, SMALL, first)
            try:
                assert (status, body) == (413, b"too large")
                sent = await asyncio.wait_for(sender, DEADLINE) + (first or 0)
                second = await next_request(reader, writer)        # on the same socket
                assert sent == SMALL and second == (200, b"ok"), (
                    f"the gateway closed the client's connection after the early 413 instead of "
                    f"draining the body ({sent} of {SMALL} bytes taken; next request got {second})")
                assert [(m, t) for m, t, _ in app.requests][-1] == (b"GET", b"/next")
            finally:
                sender.cancel()
                writer.close()
            await eventually(lambda: gw.gateway.slots.in_use == 0, "the forwarding slot to be released")


@pytest.mark.parametrize("first", [None, FIRST], ids=["whole-body-at-once", "rest-after-answer"])
async def test_early_413_with_a_body_past_the_drain_cap_does_not_hang(
        start_gateway, make_settings, first) -> None:
    async with early_upstream() as (app, upstream_url):
        settings = make_settings(UPSTREAM_BACKEND_URL=upstream_url)
        async with start_gateway(settings) as gw:
            reader, writer, sender, (status, body) = await upload(gw.url, LARGE, first)
            try:
                assert (status, body) == (413, b"too large")
                # the gateway takes the whole body or closes the connection, within the deadline
                sent = await asyncio.wait_for(sender, DEADLINE) + (first or 0)
                second = await next_request(reader, writer) if sent == LARGE else None
                assert second in (None, (200, b"ok"))
            finally:
                sender.cancel()
                writer.close()
            await eventually(lambda: gw.gateway.slots.in_use == 0, "the forwarding slot to be released")
            async with gw.client() as client:                    # still serving
                assert (await client.get("/after")).status_code == 200


async def test_early_answer_from_an_upstream_that_stops_reading_closes_the_client_connection(
        start_gateway, make_settings) -> None:
    """The upstream answers early, slowly, and never reads the upload: by the answer's end the
    server's queue of unread body chunks is full. The gateway must still end the exchange and
    close the client's connection, not wedge it until shutdown."""
    done = asyncio.Event()

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Too Large\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"9\r\ntoo large\r\n")
        await asyncio.sleep(0.5)                         # the body is never read
        writer.write(b"0\r\n\r\n")
        await done.wait()
        writer.close()
    server = await asyncio.start_server(early, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        settings = make_settings(UPSTREAM_BACKEND_URL=f"http://127.0.0.1:{port}")
        async with start_gateway(settings) as gw:
            host, gport = gw.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(gport))
            size = 64 << 20
            writer.write(b"POST /upload HTTP/1.1\r\nHost: gateway\r\nContent-Length: %d\r\n\r\n" % size)
            sender = asyncio.create_task(send_body(writer, size))
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
                sent = await asyncio.wait_for(sender, DEADLINE)        # ends when the gateway closes
            finally:
                sender.cancel()
                writer.close()
            await eventually(lambda: gw.gateway.slots.in_use == 0, "the forwarding slot to be released")
        done.set()
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    assert sent < size

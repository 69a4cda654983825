"""Keep-alive connections the upstream closes while they sit in the pool, without ever saying
`Connection: close`: requests with bodies must not fail on them, straight on UpstreamTransport
and through the gateway. The upstream is a small asyncio server on loopback; the tests wait on
its own close events, never on sleeps."""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from proxy.transport import UpstreamTransport
from tests.test_transport import wait_until

TIMEOUTS = httpx.Timeout(5.0).as_dict()
DEADLINE = 10.0                               # only to turn a missing event into a failure


async def wait_event(event: asyncio.Event, what: str) -> None:
    """Wait on `event` itself, with no task in between (asyncio.wait_for would add one, and
    with it a loop iteration that lets the client notice the close first)."""
    task = asyncio.current_task()
    assert task is not None
    guard = asyncio.get_running_loop().call_later(DEADLINE, task.cancel)
    try:
        await event.wait()
    except asyncio.CancelledError:
        pytest.fail(f"timed out waiting for {what}")
    finally:
        guard.cancel()


@dataclass
class Seen:
    conn: int
    target: bytes
    body: bytes


@dataclass
class IdleClosingUpstream:
    """Answers every request `200` with keep-alive framing (Content-Length, no `Connection:
    close`) and closes a connection once it has been idle for `idle` seconds. With `hang_up`,
    a request head arriving on an already used connection is met with a close instead of an
    answer (the idle close racing the request)."""

    idle: float = 0.05
    hang_up: bool = False
    connections: int = 0
    requests: list[Seen] = field(default_factory=list)
    heads: list[tuple[int, bytes]] = field(default_factory=list)   # (connection, target) as they arrive
    idle_closed: defaultdict[int, asyncio.Event] = field(default_factory=lambda: defaultdict(asyncio.Event))
    transports: list[asyncio.Transport] = field(default_factory=list)

    def protocol(self) -> asyncio.Protocol:
        return _IdleClosing(self)


class _IdleClosing(asyncio.Protocol):
    def __init__(self, server: IdleClosingUpstream) -> None:
        self.server = server
        self.index = server.connections
        server.connections += 1
        self.buffer = bytearray()
        self.answered = 0
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.idle_close = False
        self.noted = False                                # the pending request's head is in `heads`

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end])
            target = head.split(b" ", 2)[1]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if not self.noted:
                self.noted = True
                self.server.heads.append((self.index, target))
            if self.server.hang_up and self.answered:
                self.close(idle=True)
                return
            if len(self.buffer) < end + 4 + length:
                return                                    # the rest of the body is still to come
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            self.noted = False
            self.server.requests.append(Seen(self.index, target, body))
            answer = b"got %d" % len(body)
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(answer), answer))
            self.answered += 1
        if not self.buffer:
            self.timer = asyncio.get_running_loop().call_later(self.server.idle, self.close, True)

    def close(self, idle: bool) -> None:
        self.idle_close = idle
        assert self.transport is not None
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.idle_close:           # set before the socket is closed: the FIN is still to come
            self.server.idle_closed[self.index].set()


@asynccontextmanager
async def idle_closing(idle: float = 0.05, hang_up: bool = False
                       ) -> AsyncIterator[tuple[IdleClosingUpstream, str]]:
    upstream = IdleClosingUpstream(idle=idle, hang_up=hang_up)
    server = await asyncio.get_running_loop().create_server(upstream.protocol, "127.0.0.1", 0)
    try:
        yield upstream, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for transport in upstream.transports:
            transport.abort()
        await server.wait_closed()


async def post(transport: UpstreamTransport, url: str, content: bytes) -> tuple[int, bytes]:
    request = httpx.Request("POST", url, content=content, extensions={"timeout": TIMEOUTS})
    response = await transport.handle_async_request(request)
    try:
        body = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
    finally:
        await response.aclose()
    return response.status_code, body


async def test_posts_after_the_upstream_closed_the_idle_pooled_connection_all_succeed() -> None:
    """Each POST goes out right after the upstream closed the pooled connection it would have
    reused, before the event loop has read that close: the pool must notice the dead socket
    before writing, whatever the body is (bytes are pulled at once and could not be resent)."""
    count = 20
    async with idle_closing() as (upstream, url):
        transport = UpstreamTransport()
        try:
            results = []
            for i in range(count):
                payload = b"payload-%d-" % i * 100
                results.append(await post(transport, f"{url}/p{i}", payload))
                await wait_event(upstream.idle_closed[i], "the upstream to close the idle connection")
        finally:
            await transport.aclose()
    assert results == [(200, b"got %d" % len(b"payload-%d-" % i * 100)) for i in range(count)]
    assert [(r.target, r.body) for r in upstream.requests] == [
        (f"/p{i}".encode(), b"payload-%d-" % i * 100) for i in range(count)]
    assert upstream.connections == count                 # one fresh connection after every close


async def test_sequential_posts_through_the_gateway_survive_the_upstream_closing_idle_connections(
        start_gateway, make_settings) -> None:
    count = 10
    async with idle_closing() as (upstream, url):
        async with start_gateway(make_settings(UPSTREAM_BACKEND_URL=url)) as gw, gw.client() as client:
            statuses = []
            for i in range(count):
                response = await client.post(f"/p{i}", content=b"body-%d" % i)
                statuses.append((response.status_code, response.text))
                await wait_event(upstream.idle_closed[i], "the upstream to close the idle connection")
    assert statuses == [(200, "got %d" % len(b"body-%d" % i)) for i in range(count)]
    assert [r.body for r in upstream.requests] == [b"body-%d" % i for i in range(count)]


async def test_put_through_the_gateway_is_resent_when_the_pooled_connection_dies_under_its_head(
        start_gateway, make_settings) -> None:
    """The upstream meets the head on its used connection with a close (its idle close racing
    the request). The client's body has not arrived yet, so nothing was pulled from it: the
    gateway sends the request again on a fresh connection instead of answering 502."""
    async with idle_closing(idle=DEADLINE, hang_up=True) as (upstream, url):
        async with start_gateway(make_settings(UPSTREAM_BACKEND_URL=url)) as gw:
            async with gw.client() as client:
                first = await client.post("/first", content=b"warm")
            host, port = gw.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(b"PUT /second HTTP/1.1\r\nHost: gw\r\nContent-Length: 11\r\n\r\n")
                await writer.drain()
                await wait_until(lambda: (1, b"/second") in upstream.heads,
                                 "the request head on a fresh upstream connection")
                writer.write(b"second body")
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            finally:
                writer.close()
    assert first.status_code == 200
    assert head.startswith(b"HTTP/1.1 200"), head
    assert upstream.heads == [(0, b"/first"), (0, b"/second"), (1, b"/second")]
    assert [(r.conn, r.target, r.body) for r in upstream.requests] == [
        (0, b"/first", b"warm"), (1, b"/second", b"second body")]

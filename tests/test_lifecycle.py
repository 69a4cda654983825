"""A request's life when one side leaves early: clients that disconnect while queued or while
their request is at the upstream, and an upstream that fails in the middle of its body."""
from __future__ import annotations

import asyncio
import hashlib
import logging

import httpx
import pytest

from proxy.app import create_app
from tests.servers import gateway_config, serving
from tests.test_observability import samples, value
from tests.test_proxy import DEADLINE, cutting_upstream, eventually

QUEUED = 6                                     # clients that queue and leave


async def connect(url: str, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port), local_addr=(source, 0))


def request(method: bytes, target: bytes, body: bytes = b"") -> bytes:
    head = b"%s %s HTTP/1.1\r\nHost: gateway\r\n" % (method, target)
    if body:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


async def leave(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def test_queued_clients_that_leave_are_not_forwarded(start_gateway):
    """Each queued client (without a body, or with a small one) closes its socket: it leaves the
    queue at once and never reaches the upstream, even after the slot frees up."""
    async with start_gateway(MAX_CONCURRENT_REQUESTS=1, QUEUE_TIMEOUT=60) as gw, \
            gw.client() as client:
        holder = asyncio.create_task(client.get("/hold"))
        await eventually(lambda: gw.upstream.in_flight == 1, "the slot to be held upstream")
        writers = []
        for i in range(QUEUED):
            _, writer = await connect(gw.url, f"127.0.0.{2 + i}")
            writer.write(request(b"POST", b"/gone-%d" % i, b"x" * 100) if i % 2
                         else request(b"GET", b"/gone-%d" % i))
            await writer.drain()
            writers.append(writer)
            await eventually(lambda: gw.gateway.slots.waiting == len(writers), f"client {i} queued")
        for writer in writers:
            await leave(writer)
        await eventually(lambda: gw.gateway.slots.waiting == 0, "the queue to empty")
        gauges = samples((await client.get("/metrics")).text)
        gw.upstream.release.set()
        assert (await holder).status_code == 200
        after = await client.get("/after")          # first come first served: behind any waiter
        scrape = samples((await client.get("/metrics")).text)
    assert after.status_code == 200
    assert [s.raw_path for s in gw.upstream.seen] == [b"/hold", b"/after"]
    assert value(gauges, "gateway_queue_waiting") == 0
    assert value(gauges, "gateway_upstream_in_flight") == 1
    closed = {m: value(scrape, "gateway_requests_total", outcome="client_closed", method=m,
                       status_class="4xx") for m in ("GET", "POST")}
    assert closed == {"GET": QUEUED // 2, "POST": QUEUED // 2}
    assert gw.gateway.slots.in_use == 0 and not gw.gateway.slots.waiters


@pytest.mark.parametrize("method, body", [(b"GET", b""), (b"POST", b"y" * 1000)])
async def test_client_that_leaves_while_upstream_holds_frees_its_slot(start_gateway, caplog,
                                                                      method, body):
    """The request at the upstream is cancelled and its slot is free again while the upstream
    is still holding it; the next request goes through without waiting for the upstream."""
    caplog.set_level(logging.INFO, logger="proxy.access")
    async with start_gateway(MAX_CONCURRENT_REQUESTS=1, QUEUE_TIMEOUT=60) as gw, \
            gw.client() as client:
        _, writer = await connect(gw.url)
        writer.write(request(method, b"/hold", body))
        await writer.drain()
        await eventually(lambda: gw.upstream.in_flight == 1 and gw.gateway.slots.in_use == 1,
                         "the request to be held upstream")
        await leave(writer)
        await eventually(lambda: gw.gateway.slots.in_use == 0, "the slot to be freed")
        assert gw.upstream.in_flight == 1                 # the upstream has not answered
        next_one = await client.get("/echo")
        scrape = samples((await client.get("/metrics")).text)
    assert next_one.status_code == 200
    assert value(scrape, "gateway_requests_total", outcome="client_closed",
                 method=method.decode(), status_class="4xx") == 1
    lines = [r.fields for r in caplog.records if r.name == "proxy.access"]
    assert [(f["path"], f["status"], f["outcome"]) for f in lines][0] == ("/hold", 499, "client_closed")


async def test_client_that_leaves_mid_download_is_counted_client_closed(start_gateway):
    async with start_gateway(MAX_CONCURRENT_REQUESTS=1) as gw, gw.client() as client:
        reader, writer = await connect(gw.url)
        writer.write(request(b"GET", b"/stream"))
        await writer.drain()
        assert b"first;" in await reader.readuntil(b"first;")
        await leave(writer)
        await eventually(lambda: gw.gateway.slots.in_use == 0, "the slot to be freed")
        scrape = samples((await client.get("/metrics")).text)
    assert value(scrape, "gateway_requests_total", outcome="client_closed", method="GET",
                 status_class="4xx") == 1
    assert value(scrape, "gateway_requests_total", outcome="forwarded", method="GET",
                 status_class="2xx") == 0


async def test_upstream_failing_mid_body_is_counted_upstream_aborted(start_gateway, make_settings,
                                                                    caplog):
    """The status the client already got stays in the log; the outcome says the body was cut."""
    caplog.set_level(logging.INFO, logger="proxy.access")

    async with cutting_upstream() as url:
        settings = make_settings(UPSTREAM_BACKEND_URL=url)
        async with start_gateway(settings) as gw, gw.client() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/cut")
            await eventually(lambda: gw.gateway.slots.in_use == 0, "slot release")
            scrape = samples((await client.get("/metrics")).text)
    assert value(scrape, "gateway_requests_total", outcome="upstream_aborted", method="GET",
                 status_class="2xx") == 1
    assert value(scrape, "gateway_requests_total", outcome="forwarded", method="GET",
                 status_class="2xx") == 0
    lines = [r.fields for r in caplog.records if r.name == "proxy.access"]
    assert [(f["path"], f["status"], f["outcome"], f["bytes"]) for f in lines] == [
        ("/cut", 200, "upstream_aborted", 10)]
    culprit = [r.getMessage() for r in caplog.records if r.name == "proxy.gateway"]
    assert any("upstream failed mid-body" in m and "/cut" in m for m in culprit)


async def test_idle_connection_is_closed_as_soon_as_its_client_closes(make_settings, redis):
    """Between requests, a client's FIN must close the server's side at once, not after the
    keep-alive timeout (a socket and fd left in CLOSE-WAIT per closed connection meanwhile).
    The keep-alive timeout here is far past the hang guard, so waiting for it fails."""
    settings = make_settings()
    config = gateway_config(settings)
    config.keep_alive_timeout = 10 * DEADLINE
    async with serving(create_app(settings), config) as url:
        reader, writer = await connect(url)
        try:
            writer.write(request(b"GET", b"/echo"))
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            await reader.readexactly(length)
            writer.write_eof()                   # the client is done: its FIN, the socket kept
            assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
        finally:
            writer.close()


@pytest.mark.parametrize("size", [100, 3 * 65536 + 7])
async def test_queued_upload_that_stays_reaches_the_upstream_intact(start_gateway, size):
    """What the watch reads ahead of a queued upload is handed on, in order, to the forwarding."""
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    async with start_gateway(MAX_CONCURRENT_REQUESTS=1, QUEUE_TIMEOUT=60) as gw, \
            gw.client() as client, gw.client("127.0.0.2") as other:
        holder = asyncio.create_task(client.get("/hold"))
        await eventually(lambda: gw.upstream.in_flight == 1, "the slot to be held upstream")
        upload = asyncio.create_task(other.post("/echo", content=body))
        await eventually(lambda: gw.gateway.slots.waiting == 1, "the upload to queue")
        gw.upstream.release.set()
        assert (await holder).status_code == 200
        echo = (await upload).json()
    assert echo["body_size"] == size
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_queued_client_that_leaves_mid_upload_frees_everything_once_its_turn_comes(
        start_gateway):
    """Past the read-ahead the watch cannot see the disconnect; the body's reader does, when the
    slot comes: the request is counted client_closed and nothing stays taken."""
    async with start_gateway(MAX_CONCURRENT_REQUESTS=1, QUEUE_TIMEOUT=60) as gw, \
            gw.client() as client:
        holder = asyncio.create_task(client.get("/hold"))
        await eventually(lambda: gw.upstream.in_flight == 1, "the slot to be held upstream")
        _, writer = await connect(gw.url, "127.0.0.2")
        writer.write(b"POST /cut HTTP/1.1\r\nHost: gateway\r\nContent-Length: %d\r\n\r\n" % (1 << 20))
        writer.write(b"u" * (300 << 10))
        await writer.drain()
        await eventually(lambda: gw.gateway.slots.waiting == 1, "the upload to queue")
        await leave(writer)
        gw.upstream.release.set()
        assert (await holder).status_code == 200
        await eventually(lambda: gw.gateway.slots.waiting == 0 and gw.gateway.slots.in_use == 0,
                         "the slot and the queue to be free")
        scrape = samples((await client.get("/metrics")).text)
        assert (await client.get("/echo")).status_code == 200
    assert value(scrape, "gateway_requests_total", outcome="client_closed", method="POST",
                 status_class="4xx") == 1


async def test_streamed_responses_that_complete_are_counted_forwarded(start_gateway):
    """Hypercorn queues an http.disconnect of its own once a response ends: the watch of a
    streamed download must be gone by then, or finished requests would count as client_closed."""
    async with start_gateway() as gw, gw.client() as client:
        gw.upstream.proceed.set()
        bodies = [(await client.get("/stream?chunks=4")).content for _ in range(5)]
        scrape = samples((await client.get("/metrics")).text)
    assert bodies == [b"first;chunk1;chunk2;chunk3;"] * 5
    assert value(scrape, "gateway_requests_total", outcome="forwarded", method="GET",
                 status_class="2xx") == 5
    assert value(scrape, "gateway_requests_total", outcome="client_closed", method="GET",
                 status_class="4xx") == 0

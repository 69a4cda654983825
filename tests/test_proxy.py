"""The gateway driven from outside over real sockets: forwarding, limits, shaping, errors."""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from redis.asyncio import Redis

from proxy.embedded_redis import RedisProcess, free_port
from tests.servers import closed_port
from tests.test_drain import send_body

DEADLINE = 10.0


async def eventually(predicate, what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def raw_exchange(url: str, payload: bytes, deadline: float = DEADLINE) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or the deadline)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), deadline):
            data += chunk
            if b"\r\n\r\n" in data and _complete(data):
                break
    finally:
        writer.close()
    return data


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


# --- forwarding ------------------------------------------------------------------------------

async def test_request_forwarded_exactly(start_gateway):
    async with start_gateway() as gw, gw.client() as client:
        body = b"payload-" * 1000
        response = await client.request(
            "PATCH", "/a%2Fb/c%20d;p=1?x=1&x=2&y=%20&z", content=body,
            headers=[("X-Multi", "one"), ("X-Multi", "two"), ("Content-Type", "application/x-test")])
    assert response.status_code == 200
    echo = response.json()
    assert echo["method"] == "PATCH"
    assert echo["raw_path"] == "/a%2Fb/c%20d;p=1"
    assert echo["query"] == "x=1&x=2&y=%20&z"
    assert echo["body_size"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    headers = [(n, v) for n, v in echo["headers"]]
    assert [v for n, v in headers if n == "x-multi"] == ["one", "two"]
    assert ("content-type", "application/x-test") in headers


async def test_host_is_upstream_and_forwarded_headers_are_set(start_gateway, upstream):
    async with start_gateway() as gw, gw.client() as client:
        response = await client.get("/echo", headers={"Host": "public.example"})
    headers = dict((n, v) for n, v in response.json()["headers"])
    assert headers["host"] == upstream[1].removeprefix("http://")
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "public.example"


async def test_hop_by_hop_request_headers_are_dropped(start_gateway):
    async with start_gateway() as gw, gw.client() as client:
        response = await client.get("/echo", headers={
            "Connection": "keep-alive, X-Private", "X-Private": "secret", "Keep-Alive": "timeout=5",
            "Proxy-Connection": "keep-alive", "TE": "trailers", "Trailer": "x", "Upgrade": "foo/1",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==", "X-Kept": "yes"})
    names = {n for n, _ in response.json()["headers"]}
    assert names.isdisjoint({"connection", "x-private", "keep-alive", "proxy-connection", "te",
                             "trailer", "upgrade", "proxy-authorization", "transfer-encoding"})
    assert "x-kept" in names


async def test_hop_by_hop_response_headers_are_dropped_and_repeats_kept(start_gateway):
    async with start_gateway() as gw, gw.client() as client:
        response = await client.get("/hop")
    names = [n.decode().lower() for n, _ in response.headers.raw]
    assert {"x-secret-hop", "keep-alive", "proxy-connection", "trailer", "upgrade"}.isdisjoint(names)
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert response.headers["x-kept"] == "yes"


async def test_compressed_body_passes_through_untouched(start_gateway):
    async with start_gateway() as gw, gw.client() as client:
        async with client.stream("GET", "/gzip", headers={"Accept-Encoding": "gzip"}) as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.headers["content-encoding"] == "gzip"
    assert raw == gw.upstream.gzip_body
    assert gzip.decompress(raw).startswith(b'{"compressed": true}')


@pytest.mark.parametrize("target", [b"//evil.example/x", b"/@evil.example/x",
                                    b"http://evil.example/x", b"http://evil.example:80//y"])
async def test_request_target_cannot_redirect_the_upstream(start_gateway, target):
    async with start_gateway() as gw:
        answer = await raw_exchange(
            gw.url, b"GET " + target + b" HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    seen = gw.upstream.seen[-1]
    assert seen.raw_path.startswith(b"/") and b"://" not in seen.raw_path
    expected_host = gw.gateway.settings.upstream_backend_url.netloc
    assert seen.header(b"host") == [expected_host]


async def test_asterisk_target_is_a_bad_request(start_gateway):
    async with start_gateway() as gw:
        answer = await raw_exchange(gw.url, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"application/problem+json" in answer
    assert gw.upstream.seen == []


# --- streaming ---------------------------------------------------------------------------------

async def test_upload_is_streamed_not_buffered(start_gateway):
    """The upstream sees the first bytes while the client is still holding back the rest:
    a gateway that buffered the whole body would deadlock here and time out."""
    async with start_gateway() as gw, gw.client() as client:
        async def body() -> AsyncIterator[bytes]:
            yield b"a" * 65536
            await asyncio.wait_for(gw.upstream.first_chunk.wait(), DEADLINE)
            for _ in range(15):
                yield b"b" * 65536
        response = await client.post("/upload", content=body())
    assert response.status_code == 200
    assert response.json() == {"size": 16 * 65536}


async def test_download_is_streamed_not_buffered(start_gateway):
    async with start_gateway() as gw, gw.client() as client:
        async with client.stream("GET", "/stream?chunks=4") as response:
            chunks = response.aiter_raw()
            first = await asyncio.wait_for(chunks.__anext__(), DEADLINE)
            assert first == b"first;"               # arrived while the upstream still waits
            gw.upstream.proceed.set()
            rest = b"".join([c async for c in chunks])
    assert rest == b"chunk1;chunk2;chunk3;"


async def test_declared_body_over_limit_is_refused_with_413(start_gateway):
    async with start_gateway(MAX_BODY_SIZE=1000) as gw, gw.client() as client:
        response = await client.post("/upload", content=b"x" * 1001)
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"
    assert gw.upstream.seen == []


# --- slow uploads: UPSTREAM_TIMEOUT is the longest pause, not the longest upload ------------------

async def test_steady_upload_longer_than_the_upstream_timeout_goes_through(start_gateway):
    """A client uploading slowly but steadily (never pausing for UPSTREAM_TIMEOUT) is not cut
    off by the timer that waits for the upstream's answer: it restarts on every chunk sent."""
    timeout = 0.5
    async with start_gateway(UPSTREAM_TIMEOUT=timeout) as gw, gw.client() as client:
        async def body() -> AsyncIterator[bytes]:
            start = time.monotonic()
            while time.monotonic() - start < 3 * timeout:
                yield b"s" * 1000
                await asyncio.sleep(timeout / 10)
        response = await client.post("/upload", content=body())
    assert response.status_code == 200, response.text
    assert response.json()["size"] >= 10_000 and response.json()["size"] % 1000 == 0


async def test_client_pausing_mid_upload_gets_408_and_a_closed_connection(start_gateway):
    async with start_gateway(UPSTREAM_TIMEOUT=0.3) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                     + b"p" * 1000)                         # ... and the rest never comes
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(), DEADLINE)    # until the server closes
        finally:
            writer.close()
        await eventually(lambda: gw.gateway.slots.in_use == 0, "slot release")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"\r\nconnection: close" in head.lower()
    assert json.loads(body)["error"] == "request_timeout"
    assert gw.upstream.seen[-1].body_size < 100000


async def test_upstream_that_stops_reading_an_upload_is_504(start_gateway, make_settings):
    """The other side of the same timer: the client keeps sending, the upstream has stopped
    reading, nothing moves for UPSTREAM_TIMEOUT -> 504, and the slot comes back."""
    done = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")              # the head, then never another byte
        await done.wait()
        writer.close()            # 3.12+: `async with server` waits for every connection to end
    server = await asyncio.start_server(deaf, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        settings = make_settings(UPSTREAM_BACKEND_URL=f"http://127.0.0.1:{port}",
                                 UPSTREAM_TIMEOUT=0.3)
        async with start_gateway(settings) as gw:
            host, gport = gw.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(gport))
            size = 64 << 20                    # far more than the socket buffers on the way
            writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
            sender = asyncio.create_task(send_body(writer, size))
            try:
                answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            finally:
                sender.cancel()
                writer.close()
            await eventually(lambda: gw.gateway.slots.in_use == 0, "slot release")
        done.set()
        server.close()
    assert answer.startswith(b"HTTP/1.1 504"), answer[:200]


async def test_streamed_body_over_limit_is_refused_with_413(start_gateway):
    async with start_gateway(MAX_BODY_SIZE=100_000) as gw, gw.client() as client:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 65536
        response = await client.post("/upload", content=body())
    assert response.status_code == 413
    await eventually(lambda: gw.gateway.slots.in_use == 0, "slot release")


# --- rate limiting -----------------------------------------------------------------------------

async def test_limit_enforced_with_headers_on_every_answer(start_gateway):
    async with start_gateway(RATE_LIMIT=3, TIME_WINDOW=60) as gw, gw.client() as client:
        responses = [await client.get("/echo") for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    for remaining, response in zip([2, 1, 0, 0], responses):
        assert response.headers["ratelimit-policy"] == '"default";q=3;w=60'
        reset = int(response.headers["x-ratelimit-reset"])
        assert 1 <= reset <= 60
        assert response.headers["ratelimit"] == f'"default";r={remaining};t={reset}'
        assert response.headers["x-ratelimit-limit"] == "3"
        assert response.headers["x-ratelimit-remaining"] == str(remaining)
    refused = responses[-1]
    assert refused.headers["content-type"] == "application/problem+json"
    retry_after = refused.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= 60
    problem = refused.json()
    assert problem["status"] == 429 and problem["title"] and problem["detail"]
    assert problem["retry_after"] == int(retry_after)
    assert "cache-control" not in refused.headers       # RFC 6585: a 429 is never stored anyway
    assert len(gw.upstream.seen) == 3


async def test_refusals_with_different_retry_delays_get_their_own_bodies(start_gateway, redis):
    """Problem bodies are encoded once per distinct answer: the cache must not hand one
    client's retry delay to another."""
    async with start_gateway(RATE_LIMIT=1, TIME_WINDOW=600) as gw:
        refused = []
        for source, ttl_ms in (("127.0.0.2", 600_000), ("127.0.0.3", 300_000)):
            async with gw.client(source) as client:
                assert (await client.get("/echo")).status_code == 200
                await redis.pexpire(gw.gateway.limiter.key(source), ttl_ms)
                refused.append(await client.get("/echo"))
    assert [int(r.headers["retry-after"]) for r in refused] == [600, 300]
    for response, delay in zip(refused, (600, 300)):
        problem = response.json()
        assert problem["retry_after"] == delay and f"retry in {delay} s" in problem["detail"]
        assert int(response.headers["content-length"]) == len(response.content)


async def test_prepared_refusals_carry_only_their_own_request_id(start_gateway):
    """Refusals share one prepared answer per retry delay; each still gets its own request id,
    once, and nothing accumulates in the shared header list."""
    async with start_gateway(RATE_LIMIT=1, TIME_WINDOW=600) as gw, gw.client() as client:
        await client.get("/echo")
        refused = [await client.get("/echo", headers={"X-Request-ID": f"r{i}"}) for i in range(5)]
    assert [r.status_code for r in refused] == [429] * 5
    for i, response in enumerate(refused):
        assert response.headers.get_list("x-request-id") == [f"r{i}"]
        assert len(response.headers.raw) == len(refused[0].headers.raw)
    assert len({r.content for r in refused}) <= 2       # one body per retry delay (600, maybe 599)


async def test_distinct_client_addresses_have_distinct_budgets(start_gateway):
    async with start_gateway(RATE_LIMIT=2) as gw:
        codes = {}
        for source in ("127.0.0.2", "127.0.0.3"):
            async with gw.client(source) as client:
                codes[source] = [(await client.get("/echo")).status_code for _ in range(3)]
    assert codes == {"127.0.0.2": [200, 200, 429], "127.0.0.3": [200, 200, 429]}


async def test_untrusted_forwarded_headers_buy_no_new_budget(start_gateway):
    async with start_gateway(RATE_LIMIT=2) as gw, gw.client() as client:
        codes = [(await client.get("/echo", headers={
            "X-Forwarded-For": f"203.0.113.{i}", "Forwarded": f"for=198.51.100.{i}"})).status_code
            for i in range(4)]
        echo = (await gw.client("127.0.0.4").get("/echo", headers={"X-Forwarded-For": "1.2.3.4"})).json()
    assert codes == [200, 200, 429, 429]
    assert dict((n, v) for n, v in echo["headers"])["x-forwarded-for"] == "127.0.0.4"


async def test_trusted_proxy_forwarded_for_identifies_clients(start_gateway):
    async with start_gateway(RATE_LIMIT=1, TRUSTED_PROXIES="127.0.0.0/8") as gw, gw.client() as client:
        first = await client.get("/echo", headers={"X-Forwarded-For": "203.0.113.7"})
        again = await client.get("/echo", headers={"X-Forwarded-For": "203.0.113.7"})
        other = await client.get("/echo", headers={"X-Forwarded-For": "203.0.113.8"})
    assert [first.status_code, again.status_code, other.status_code] == [200, 429, 200]
    forwarded = dict((n, v) for n, v in first.json()["headers"])["x-forwarded-for"]
    assert forwarded == "203.0.113.7, 127.0.0.1"


async def test_rejected_requests_do_not_extend_the_window(start_gateway, redis: Redis):
    async with start_gateway(RATE_LIMIT=1, TIME_WINDOW=60) as gw, gw.client() as client:
        await client.get("/echo")
        key = gw.gateway.limiter.key("127.0.0.1")
        before = await redis.pttl(key)
        for _ in range(3):
            assert (await client.get("/echo")).status_code == 429
        after = await redis.pttl(key)
    assert 0 < after <= before


async def test_script_flush_is_recovered_transparently(start_gateway, redis: Redis):
    async with start_gateway(RATE_LIMIT=3) as gw, gw.client() as client:
        assert (await client.get("/echo")).status_code == 200
        await redis.script_flush()
        assert (await client.get("/echo")).status_code == 200
        assert (await client.get("/echo")).headers["x-ratelimit-remaining"] == "0"
        assert gw.gateway.limiter.script.reloads == 1


@pytest.mark.parametrize("mode,status", [("open", 200), ("closed", 503)])
async def test_redis_down_fails_open_or_closed(start_gateway, make_settings, mode, status):
    own = RedisProcess(port=free_port())
    own.start()
    try:
        settings = make_settings(REDIS_URL=own.url, RATE_LIMIT_FAIL_MODE=mode, REDIS_TIMEOUT=0.2)
        async with start_gateway(settings) as gw, gw.client() as client:
            assert (await client.get("/echo")).status_code == 200
            own.stop()
            down = await client.get("/echo")
            assert down.status_code == status
            if status == 503:
                assert down.json()["error"] == "limiter_unavailable"
                assert down.headers["retry-after"] == "1"
            assert gw.gateway.limiter.errors >= 1
            health = await client.get("/health")
            assert health.status_code == 503
            assert health.json()["redis_status"] == "Disconnected"
    finally:
        own.stop()


# --- shaping -----------------------------------------------------------------------------------

async def test_concurrency_cap_is_never_exceeded(start_gateway):
    async with start_gateway(MAX_CONCURRENT_REQUESTS=3, QUEUE_TIMEOUT=30) as gw, gw.client() as client:
        tasks = [asyncio.create_task(client.get("/hold")) for _ in range(10)]
        await eventually(lambda: gw.gateway.slots.waiting == 7 and gw.upstream.in_flight == 3,
                         "3 requests upstream and 7 queued")
        gw.upstream.release.set()
        responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200] * 10
    assert gw.upstream.max_in_flight == 3
    assert gw.gateway.slots.in_use == 0 and gw.gateway.slots.peak == 3


async def test_queue_timeout_answers_503_with_retry_after(start_gateway):
    async with start_gateway(MAX_CONCURRENT_REQUESTS=1, QUEUE_TIMEOUT=0.2) as gw, gw.client() as client:
        holder = asyncio.create_task(client.get("/hold"))
        await eventually(lambda: gw.upstream.in_flight == 1, "the slot to be taken")
        shed = await client.get("/echo")
        gw.upstream.release.set()
        assert (await holder).status_code == 200
    assert shed.status_code == 503
    assert shed.json()["error"] == "queue_timeout"
    assert int(shed.headers["retry-after"]) >= 1
    assert "x-ratelimit-remaining" in shed.headers
    assert shed.headers["cache-control"] == "no-store"
    assert gw.gateway.slots.in_use == 0 and not gw.gateway.slots.waiters


async def test_slot_released_when_client_disconnects_mid_stream(start_gateway):
    async with start_gateway(MAX_CONCURRENT_REQUESTS=1) as gw:
        async with gw.client() as client:
            async with client.stream("GET", "/stream") as response:
                assert await response.aiter_raw().__anext__() == b"first;"
                assert gw.gateway.slots.in_use == 1
        # the client is gone while the upstream still holds the stream open
        await eventually(lambda: gw.gateway.slots.in_use == 0, "slot release after disconnect")
        async with gw.client() as client:
            assert (await client.get("/echo")).status_code == 200


async def test_slot_released_after_upstream_errors(start_gateway, make_settings):
    settings = make_settings(UPSTREAM_BACKEND_URL=f"http://127.0.0.1:{closed_port()}",
                             MAX_CONCURRENT_REQUESTS=1)
    async with start_gateway(settings) as gw, gw.client() as client:
        responses = [await client.get("/x") for _ in range(3)]
    assert [r.status_code for r in responses] == [502] * 3
    assert gw.gateway.slots.in_use == 0


# --- upstream faults -----------------------------------------------------------------------------

async def test_unreachable_upstream_is_502_problem(start_gateway, make_settings):
    settings = make_settings(UPSTREAM_BACKEND_URL=f"http://127.0.0.1:{closed_port()}")
    async with start_gateway(settings) as gw, gw.client() as client:
        response = await client.get("/users/1")
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["error"] == "upstream_unreachable"
    assert "x-ratelimit-remaining" in response.headers


async def test_slow_upstream_is_504_problem(start_gateway):
    async with start_gateway(UPSTREAM_TIMEOUT=0.2) as gw, gw.client() as client:
        response = await client.get("/slow?delay=5")
    assert response.status_code == 504
    assert response.json()["error"] == "upstream_timeout"
    assert gw.gateway.slots.in_use == 0


# --- /health and /metrics -----------------------------------------------------------------------

async def test_health_ok_is_never_limited_nor_forwarded(start_gateway):
    async with start_gateway(RATE_LIMIT=1) as gw, gw.client() as client:
        await client.get("/echo")
        await client.get("/echo")
        answers = [await client.get("/health") for _ in range(5)]
    assert {a.status_code for a in answers} == {200}
    assert answers[-1].json() == {"status": "OK", "redis_status": "Connected",
                                  "backend_status": "Connected", "total_requests": 2,
                                  "blocked_requests": 1}
    assert [s.raw_path for s in gw.upstream.seen].count(b"/health") == 0
    assert "ratelimit" not in answers[-1].headers


async def test_health_degraded_when_backend_down(start_gateway, make_settings):
    settings = make_settings(UPSTREAM_BACKEND_URL=f"http://127.0.0.1:{closed_port()}")
    async with start_gateway(settings) as gw, gw.client() as client:
        response = await client.get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "DEGRADED"
    assert response.json()["backend_status"] == "Disconnected"
    assert response.json()["redis_status"] == "Connected"


# --- hostile or broken clients ------------------------------------------------------------------

@pytest.mark.parametrize("payload", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GE T / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
])
async def test_malformed_request_gets_4xx_or_close_and_server_survives(start_gateway, payload):
    async with start_gateway() as gw:
        answer = await raw_exchange(gw.url, payload)
        assert answer == b"" or answer[9:10] == b"4"
        assert gw.upstream.seen == []
        async with gw.client() as client:
            assert (await client.get("/echo")).status_code == 200


async def test_rate_limited_client_with_unread_body_keeps_connection_usable(start_gateway):
    async with start_gateway(RATE_LIMIT=1) as gw, gw.client() as client:
        assert (await client.post("/echo", content=b"x" * 10)).status_code == 200
        refused = await client.post("/echo", content=b"y" * 200_000)
        assert refused.status_code == 429
        assert (await client.get("/health")).status_code == 200


# --- hanging dependencies ----------------------------------------------------------------------

async def _silent_server() -> tuple[asyncio.AbstractServer, int]:
    """Accepts connections and never answers: a hung Redis or upstream."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()                    # until the peer gives up
        writer.close()
    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_hung_redis_fails_open_fast_and_health_degrades(start_gateway, make_settings):
    server, port = await _silent_server()
    async with server:
        settings = make_settings(REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_TIMEOUT=0.2)
        async with start_gateway(settings) as gw, gw.client() as client:
            admitted = await client.get("/echo")
            health = await client.get("/health")
    assert admitted.status_code == 200
    assert "ratelimit-policy" in admitted.headers
    assert health.status_code == 503
    assert health.json()["redis_status"] == "Disconnected"
    assert health.json()["backend_status"] == "Connected"


async def test_hung_upstream_health_answers_disconnected(start_gateway, make_settings):
    server, port = await _silent_server()
    async with server:
        settings = make_settings(UPSTREAM_BACKEND_URL=f"http://127.0.0.1:{port}")
        async with start_gateway(settings) as gw, gw.client() as client:
            health = await client.get("/health")
    assert health.status_code == 503
    assert health.json() == {**health.json(), "status": "DEGRADED", "backend_status": "Disconnected",
                             "redis_status": "Connected"}


async def test_client_that_stops_reading_a_download_loses_its_slot(start_gateway, caplog):
    """A client that never reads its response must not hold a forwarding slot (and an upstream
    connection) forever: once a send has been stuck for UPSTREAM_TIMEOUT, the response is
    aborted and the slot goes to the next request."""
    async with start_gateway(MAX_CONCURRENT_REQUESTS=1, UPSTREAM_TIMEOUT=0.3,
                             QUEUE_TIMEOUT=DEADLINE) as gw, gw.client() as client:
        host, port = gw.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /big?size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (64 << 20))
        await writer.drain()                     # ... and never read a byte of the answer
        try:
            await eventually(lambda: gw.gateway.slots.in_use == 1, "the download to take the slot")
            after = await client.get("/echo")    # queued behind the stuck download
            await eventually(lambda: gw.gateway.slots.in_use == 0, "slot release")
        finally:
            writer.close()
    assert after.status_code == 200
    assert any("stopped reading" in r.getMessage() for r in caplog.records)


@asynccontextmanager
async def cutting_upstream() -> AsyncIterator[str]:
    """An upstream that sends a response head and 10 of its 1,000 body bytes, then closes."""
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(half, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_upstream_failure_mid_body_aborts_the_response(start_gateway, make_settings):
    """Headers already sent: the client must see a broken stream, never a clean short body."""
    async with cutting_upstream() as url:
        settings = make_settings(UPSTREAM_BACKEND_URL=url)
        async with start_gateway(settings) as gw, gw.client() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/x")
            await eventually(lambda: gw.gateway.slots.in_use == 0, "slot release")
            assert (await client.get("/health")).status_code == 200    # still serving


async def test_refused_upload_over_the_drain_cap_closes_instead_of_hanging(start_gateway):
    async with start_gateway(RATE_LIMIT=1) as gw, gw.client() as client:
        assert (await client.get("/echo")).status_code == 200
        refused = await client.post("/echo", content=b"z" * (3 << 20))
        assert refused.status_code == 429
        assert refused.headers.get("connection") == "close"
        assert (await client.get("/health")).status_code == 200    # on a new connection

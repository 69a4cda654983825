"""Forwarder (target URL, error translation), RequestBody, and the upstream transport."""
from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import httpx
import pytest

from proxy.errors import BadRequest, RequestTooLarge, UpstreamTimeout, UpstreamUnreachable
from proxy.forwarding import ClientDisconnected, Forwarder, RequestBody, make_client
from proxy.settings import load_settings
from proxy.transport import UpstreamTransport
from tests.servers import closed_port
from tests.test_proxy import raw_exchange
from tests.upstream import Upstream

UPSTREAM = httpx.URL("http://127.0.0.1:8001")


def forwarder(upstream: str | httpx.URL = UPSTREAM, client: httpx.AsyncClient | None = None
              ) -> Forwarder:
    return Forwarder(client, httpx.URL(upstream), 5.0)  # type: ignore[arg-type]


def on_upstream(url: httpx.URL) -> None:
    assert (url.scheme, url.host, url.port) == ("http", "127.0.0.1", 8001), str(url)


# --- Forwarder.target ----------------------------------------------------------------------

@pytest.mark.parametrize(("raw_path", "query"), [
    (b"/", b""),
    (b"/a%2Fb/c%20d", b""),
    (b"/search", b"q=caf%C3%A9&x=1&x=2&x=3"),
    (b"/p;param=1/q;v=2", b"a=1;b=2"),
    (b"/a+b/%7Euser", b"plus=a+b&empty=&flag"),
    (b"/UPPER/%2e%2e/Case", b"K=V"),
    (b'/odd"<>{}|^`[]\\chars', b'q="<>{}|^`[]'),
])
def test_origin_form_target_kept_exactly(raw_path: bytes, query: bytes) -> None:
    url = forwarder().target(raw_path, query)
    on_upstream(url)
    assert url.raw_path == raw_path + (b"?" + query if query else b"")


@pytest.mark.parametrize("raw_path", [b"//evil.example/x", b"/@evil.example", b"//evil.example:80",
                                      b"/\\evil.example", b"///evil.example/x"])
def test_authority_lookalike_paths_stay_paths_on_configured_host(raw_path: bytes) -> None:
    url = forwarder().target(raw_path, b"")
    on_upstream(url)
    assert url.raw_path == raw_path


def test_absolute_form_keeps_only_path_and_query() -> None:
    url = forwarder().target(b"http://evil.example/p", b"q")
    on_upstream(url)
    assert url.raw_path == b"/p?q"


@pytest.mark.parametrize(("raw_path", "expected"), [
    (b"https://evil.example:8443/a/b", b"/a/b"),
    (b"http://evil.example", b"/"),
    (b"http://user:pw@evil.example/x", b"/x"),
])
def test_absolute_form_loses_scheme_and_authority(raw_path: bytes, expected: bytes) -> None:
    url = forwarder().target(raw_path, b"")
    on_upstream(url)
    assert url.raw_path == expected


@pytest.mark.parametrize("raw_path", [b"*", b"evil.example/x", b"", b"evil.example:80",
                                      b"1http://evil.example/x", b"mailto:x@evil.example"])
def test_non_path_targets_are_bad_requests(raw_path: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        forwarder().target(raw_path, b"")
    assert info.value.status == 400


def test_configured_base_path_is_prefixed() -> None:
    settings = load_settings({"UPSTREAM_BACKEND_URL": "http://127.0.0.1:8001/api/v1/"}, None)
    f = forwarder(settings.upstream_backend_url)
    assert f.target(b"/users", b"id=1").raw_path == b"/api/v1/users?id=1"
    assert f.target(b"/", b"").raw_path == b"/api/v1/"
    assert f.target(b"http://evil.example/x", b"").raw_path == b"/api/v1/x"
    assert f.target(b"//evil.example/x", b"").raw_path == b"/api/v1//evil.example/x"
    on_upstream(f.target(b"//evil.example/x", b""))


def test_non_ascii_bytes_percent_encoded() -> None:
    url = forwarder().target(b"/caf\xc3\xa9/%41", b"q=\xc3\xa9&r=%20")
    on_upstream(url)
    assert url.raw_path == b"/caf%C3%A9/%41?q=%C3%A9&r=%20"


@pytest.mark.parametrize(("raw_path", "query"), [(b"/a#b", b""), (b"/p", b"a=1#frag")])
def test_hash_in_target_is_encoded_or_bad_request_never_a_crash(raw_path: bytes, query: bytes) -> None:
    """Hypercorn hands a literal '#' in the request target through to raw_path/query_string
    (h11 accepts any VCHAR). It must not become an unexpected exception (a 500)."""
    try:
        url = forwarder().target(raw_path, query)
    except BadRequest:
        return
    on_upstream(url)
    assert url.fragment == ""
    assert b"%23" in url.raw_path


@pytest.mark.parametrize(("raw_path", "query"), [
    (b"/a\x01b", b""), (b"/a\tb", b""), (b"/a\x7fb", b""), (b"/a\x00b", b""),
    (b"/p", b"a=\x01"), (b"/p", b"a=\tb"),
])
def test_control_characters_in_target_are_encoded_or_bad_request(raw_path: bytes, query: bytes) -> None:
    """HTTP/2 lets control characters (not CR/LF) through to raw_path; they cannot go on an
    HTTP/1.1 request line as they are."""
    try:
        url = forwarder().target(raw_path, query)
    except BadRequest:
        return
    on_upstream(url)
    assert all(0x21 <= byte <= 0x7E for byte in url.raw_path), url.raw_path


# --- Forwarder.open: error translation -----------------------------------------------------

def failing_client(exc_type: type[httpx.TransportError]) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


@pytest.mark.parametrize("exc_type", [httpx.ConnectError, httpx.ReadError,
                                      httpx.RemoteProtocolError, httpx.WriteError])
async def test_transport_errors_become_upstream_unreachable(exc_type: type[httpx.TransportError]) -> None:
    async with failing_client(exc_type) as client:
        f = forwarder(client=client)
        with pytest.raises(UpstreamUnreachable) as info:
            await f.open("GET", f.target(b"/x", b""), [], None)
    assert info.value.status == 502
    assert isinstance(info.value.__cause__, exc_type)


@pytest.mark.parametrize("exc_type", [httpx.ReadTimeout, httpx.ConnectTimeout,
                                      httpx.WriteTimeout, httpx.PoolTimeout])
async def test_timeouts_become_upstream_timeout(exc_type: type[httpx.TransportError]) -> None:
    async with failing_client(exc_type) as client:
        f = forwarder(client=client)
        with pytest.raises(UpstreamTimeout) as info:
            await f.open("GET", f.target(b"/x", b""), [], None)
    assert info.value.status == 504
    assert isinstance(info.value.__cause__, exc_type)


async def test_open_returns_upstream_response_with_status_and_headers() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, headers=[("x-a", "1"), ("x-a", "2")], content=b"ok")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        f = forwarder(client=client)
        response = await f.open("PUT", f.target(b"/r", b"k=v"), [(b"x-in", b"1")], None)
        assert response.status_code == 201
        assert response.headers.get_list("x-a") == ["1", "2"]
        await response.aclose()
    assert seen[0].method == "PUT"
    assert seen[0].url.raw_path == b"/r?k=v"
    assert seen[0].headers["x-in"] == "1"


# --- RequestBody ---------------------------------------------------------------------------

Receive = Callable[[], Awaitable[dict[str, Any]]]


def feeder(*messages: dict[str, Any]) -> Receive:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if not queue:
            raise AssertionError("read past the end of the request")
        return queue.pop(0)
    return receive


def chunk(body: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


async def read_all(body: RequestBody) -> list[bytes]:
    return [c async for c in body]


async def test_request_body_streams_chunks_until_complete() -> None:
    body = RequestBody(feeder(chunk(b"abc", True), chunk(b"", True), chunk(b"def", False)), 6)
    assert await read_all(body) == [b"abc", b"def"]
    assert body.complete and body.received == 6
    assert not body.too_large and not body.client_gone


async def test_request_body_over_limit_raises_request_too_large() -> None:
    body = RequestBody(feeder(chunk(b"abc", True), chunk(b"def", True), chunk(b"g", False)), 5)
    with pytest.raises(RequestTooLarge) as info:
        await read_all(body)
    assert info.value.status == 413
    assert body.too_large
    assert not body.complete


async def test_request_body_single_oversize_chunk_refused_before_yield() -> None:
    body = RequestBody(feeder(chunk(b"x" * 11, False)), 10)
    got: list[bytes] = []
    with pytest.raises(RequestTooLarge):
        async for c in body:
            got.append(c)
    assert got == []


async def test_request_body_reports_client_disconnect() -> None:
    body = RequestBody(feeder(chunk(b"ab", True), {"type": "http.disconnect"}), 100)
    got: list[bytes] = []
    with pytest.raises(ClientDisconnected):
        async for c in body:
            got.append(c)
    assert got == [b"ab"]
    assert body.client_gone
    assert not body.complete


async def test_open_reports_oversize_body_as_413_not_502() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        f = forwarder(client=client)
        body = RequestBody(feeder(chunk(b"x" * 8, True), chunk(b"x" * 8, False)), 10)
        with pytest.raises(RequestTooLarge):
            await f.open("POST", f.target(b"/u", b""), [], body)


async def test_open_reports_client_disconnect_not_upstream_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        f = forwarder(client=client)
        body = RequestBody(feeder(chunk(b"x", True), {"type": "http.disconnect"}), 10)
        with pytest.raises(ClientDisconnected):
            await f.open("POST", f.target(b"/u", b""), [], body)


# --- AiohttpTransport on real sockets ------------------------------------------------------

async def test_transport_closed_port_raises_connect_error_not_timeout() -> None:
    port = closed_port()
    async with httpx.AsyncClient(transport=UpstreamTransport(), timeout=30) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.send(httpx.Request("GET", f"http://127.0.0.1:{port}/"))
    assert not isinstance(info.value, httpx.TimeoutException)


async def test_forwarder_to_closed_port_is_upstream_unreachable() -> None:
    settings = load_settings({"UPSTREAM_BACKEND_URL": f"http://127.0.0.1:{closed_port()}"}, None)
    async with make_client(settings) as client:
        f = Forwarder(client, settings.upstream_backend_url, settings.upstream_timeout)
        with pytest.raises(UpstreamUnreachable) as info:
            await f.open("GET", f.target(b"/", b""), [], None)
    assert isinstance(info.value.__cause__, httpx.ConnectError)


@pytest.fixture
async def transport_client() -> Any:
    async with httpx.AsyncClient(transport=UpstreamTransport(), timeout=30) as client:
        yield client


async def test_transport_sends_repeated_headers_as_separate_lines(
        upstream: tuple[Upstream, str], transport_client: httpx.AsyncClient) -> None:
    app, url = upstream
    request = httpx.Request("GET", f"{url}/echo",
                            headers=[(b"x-multi", b"1"), (b"x-other", b"o"), (b"x-multi", b"2, 3")])
    response = await transport_client.send(request)
    assert response.status_code == 200
    assert app.seen[-1].header(b"x-multi") == [b"1", b"2, 3"]


async def test_transport_adds_no_automatic_headers(
        upstream: tuple[Upstream, str], transport_client: httpx.AsyncClient) -> None:
    app, url = upstream
    await transport_client.send(httpx.Request("GET", f"{url}/echo"))
    await transport_client.send(httpx.Request("POST", f"{url}/echo", content=b"payload"))
    for seen in app.seen:
        names = {n for n, _ in seen.headers}
        assert not names & {b"user-agent", b"accept-encoding", b"content-type", b"accept"}, seen.headers
    assert app.seen[1].body_size == len(b"payload")


async def test_forwarder_adds_no_automatic_headers_on_production_client(
        upstream: tuple[Upstream, str]) -> None:
    app, url = upstream
    settings = load_settings({"UPSTREAM_BACKEND_URL": url}, None)
    async with make_client(settings) as client:
        f = Forwarder(client, settings.upstream_backend_url, settings.upstream_timeout)
        response = await f.open("GET", f.target(b"/echo", b""), [(b"x-only", b"1")], None)
        await response.aread()
        await response.aclose()
    names = {n for n, _ in app.seen[-1].headers}
    assert names == {b"host", b"x-only"}, app.seen[-1].headers


async def test_transport_relays_gzip_response_still_compressed(
        upstream: tuple[Upstream, str], transport_client: httpx.AsyncClient) -> None:
    app, url = upstream
    response = await transport_client.send(httpx.Request("GET", f"{url}/gzip"), stream=True)
    raw = b"".join([c async for c in response.aiter_raw()])
    await response.aclose()
    assert response.headers["content-encoding"] == "gzip"
    assert raw == app.gzip_body
    assert gzip.decompress(raw).startswith(b'{"compressed": true}')


async def test_transport_sends_gzip_request_body_still_compressed(
        upstream: tuple[Upstream, str], transport_client: httpx.AsyncClient) -> None:
    app, url = upstream
    body = gzip.compress(b"hello " * 1000)
    response = await transport_client.send(httpx.Request(
        "POST", f"{url}/upload", content=body, headers={"content-encoding": "gzip"}))
    assert response.json() == {"size": len(body)}
    assert app.seen[-1].body_sha256 == hashlib.sha256(body).hexdigest()


async def test_forwarder_streams_request_body_to_real_upstream(upstream: tuple[Upstream, str]) -> None:
    app, url = upstream
    settings = load_settings({"UPSTREAM_BACKEND_URL": url}, None)
    parts = [b"a" * 70_000, b"b" * 5, b"c" * 123_456]
    body = RequestBody(feeder(*(chunk(p, i < len(parts) - 1) for i, p in enumerate(parts))), 1 << 20)
    async with make_client(settings) as client:
        f = Forwarder(client, settings.upstream_backend_url, settings.upstream_timeout)
        response = await f.open("POST", f.target(b"/upload", b""), [], body)
        assert (await response.aread()) == b'{"size": %d}' % sum(map(len, parts))
        await response.aclose()
    assert app.seen[-1].body_sha256 == hashlib.sha256(b"".join(parts)).hexdigest()


@pytest.mark.parametrize("raw_path", [b"/a%2Fb/c%20d;x=1", b"//evil.example/x", b"/@evil.example"])
async def test_real_upstream_receives_target_unchanged(upstream: tuple[Upstream, str],
                                                       raw_path: bytes) -> None:
    app, url = upstream
    settings = load_settings({"UPSTREAM_BACKEND_URL": url}, None)
    async with make_client(settings) as client:
        f = Forwarder(client, settings.upstream_backend_url, settings.upstream_timeout)
        response = await f.open("GET", f.target(raw_path, b"x=1&x=2"), [], None)
        await response.aread()
        await response.aclose()
    assert app.seen[-1].raw_path == raw_path
    assert app.seen[-1].query == b"x=1&x=2"
    host = app.seen[-1].header(b"host")
    assert host == [url.removeprefix("http://").encode()]


@pytest.mark.parametrize("raw_path", [b"/a/../b", b"/x/./y", b"/static/css/%2e%2e/../secret"])
async def test_real_upstream_receives_dot_segments_unnormalized(upstream: tuple[Upstream, str],
                                                                raw_path: bytes) -> None:
    """RFC 9110 7.7: a proxy MUST NOT modify the absolute-path and query it forwards."""
    app, url = upstream
    settings = load_settings({"UPSTREAM_BACKEND_URL": url}, None)
    async with make_client(settings) as client:
        f = Forwarder(client, settings.upstream_backend_url, settings.upstream_timeout)
        response = await f.open("GET", f.target(raw_path, b""), [], None)
        await response.aread()
        await response.aclose()
    assert app.seen[-1].raw_path == raw_path


@pytest.mark.parametrize("raw_path", [b"/a\tb", b"/a\x01b", b"/a\x7fb"])
async def test_control_characters_reach_upstream_recoverably_or_are_refused(
        upstream: tuple[Upstream, str], raw_path: bytes) -> None:
    """Never silently altered (a tab dropped), never an unexpected exception (a 500)."""
    app, url = upstream
    settings = load_settings({"UPSTREAM_BACKEND_URL": url}, None)
    async with make_client(settings) as client:
        f = Forwarder(client, settings.upstream_backend_url, settings.upstream_timeout)
        try:
            target = f.target(raw_path, b"")
        except BadRequest:
            return
        response = await f.open("GET", target, [], None)
        await response.aread()
        await response.aclose()
    assert unquote_to_bytes(app.seen[-1].raw_path) == raw_path


# --- dot segments ---------------------------------------------------------------------------

BASE = httpx.URL("http://127.0.0.1:8001/api/v1")
CLIMBING = [
    b"/../etc/passwd", b"/../../etc/passwd", b"/..", b"/a/../../etc/passwd", b"/./../x",
    b"/%2e%2e/etc/passwd", b"/%2E%2e/etc/passwd", b"/.%2e/etc/passwd", b"/%2e./x",
    b"/a/%2E%2E/%2e%2e/x", b"//../x", b"/a//../../x", b"/..;/manager", b"/a/..;x=1/..;/x",
    b"/a%2f..%2f..%2fetc", b"/a/b%2F..%2F..%2F..%2Fx",
]


@pytest.mark.parametrize("upstream", [UPSTREAM, BASE])
@pytest.mark.parametrize("raw_path", CLIMBING)
def test_dot_segments_climbing_above_the_root_are_bad_requests(
        upstream: httpx.URL, raw_path: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        forwarder(upstream).target(raw_path, b"")
    status, headers, body = info.value.render()
    assert status == 400 and (b"content-type", b"application/problem+json") in headers
    problem = json.loads(body)
    assert problem["error"] == "bad_request" and "dot segments" in problem["detail"]


def test_absolute_form_target_climbing_above_the_root_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        forwarder(BASE).target(b"http://evil.example/../x", b"")


@pytest.mark.parametrize("raw_path", [
    b"/a/../b", b"/a/./b", b"/.", b"/./a", b"/a/%2e%2e/b", b"/a/b/../../c", b"/a/..",
    b"/..\\..\\etc/passwd", b"/%252e%252e/%252e%252e/x", b"/...", b"/..a/x", b"/a.b/..c",
    b"/%20/x", b"/a%2fb/../c",
])
def test_dot_segments_that_stay_below_the_root_are_forwarded_unchanged(raw_path: bytes) -> None:
    assert forwarder().target(raw_path, b"q=/../..").raw_path == raw_path + b"?q=/../.."
    assert forwarder(BASE).target(raw_path, b"").raw_path == b"/api/v1" + raw_path


async def test_gateway_refuses_a_target_climbing_out_of_the_upstream_base_path(
        start_gateway: Any, upstream: tuple[Upstream, str]) -> None:
    async with start_gateway(UPSTREAM_BACKEND_URL=upstream[1] + "/api/v1") as gw:
        answers = [await raw_exchange(gw.url, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
                   for target in (b"/../../etc/passwd", b"/%2e%2e/%2E%2e/etc/passwd")]
        async with gw.client() as client:
            inside = await client.get("/echo")
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ") and b"application/problem+json" in head
        assert json.loads(body)["error"] == "bad_request"
    assert inside.status_code == 200
    assert [seen.raw_path for seen in gw.upstream.seen] == [b"/api/v1/echo"]

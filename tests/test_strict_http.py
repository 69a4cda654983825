"""The server edge is strict: raw requests over TCP to the real gateway in front of the real
upstream; every refusal is problem+json, closes the connection and forwards nothing."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from tests.conftest import GatewayFactory

HOST = b"Host: gw\r\n"
DEADLINE = 10.0


async def exchange(url: str, data: bytes, source: str = "127.0.0.2") -> bytes:
    """Send raw bytes, read until the gateway closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(source, 0))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()


def responses(raw: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split a byte stream of Content-Length framed responses."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {n.strip().lower(): v.strip() for n, _, v in (line.partition(b":") for line in lines[1:])}
        size = int(headers.get(b"content-length", b"0"))
        out.append((int(lines[0].split()[1]), headers, rest[:size]))
        raw = rest[size:]
    return out


def refused(raw: bytes, status: int, error: str) -> dict[str, Any]:
    [(got, headers, body)] = responses(raw)
    assert got == status, raw
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"connection"] == b"close"
    problem: dict[str, Any] = json.loads(body)
    assert (problem["status"], problem["error"]) == (status, error)
    return problem


LENIENT = {
    "bare-lf": b"GET /a HTTP/1.1\nHost: gw\n\n",
    "bare-lf-in-one-line": b"GET /a HTTP/1.1\r\nHost: gw\nX-A: 1\r\n\r\n",
    "bare-cr": b"GET /a HTTP/1.1\r\nHost: gw\r\nX-A: 1\r\r\n\r\n",
    "obs-fold": b"GET /a HTTP/1.1\r\nHost: gw\r\nX-A: 1\r\n  folded\r\n\r\n",
    "http-1.2": b"GET /a HTTP/1.2\r\nHost: gw\r\n\r\n",
    "two-hosts": b"GET /a HTTP/1.1\r\nHost: gw\r\nhost: other\r\n\r\n",
    "host-list": b"GET /a HTTP/1.1\r\nHost: a, b\r\n\r\n",
    "control-01": b"GET /a HTTP/1.1\r\nHost: gw\r\nX-A: a\x01b\r\n\r\n",
    "control-1f": b"GET /a HTTP/1.1\r\nHost: gw\r\nX-A: a\x1fb\r\n\r\n",
    "control-7f": b"GET /a HTTP/1.1\r\nHost: gw\r\nX-A: a\x7fb\r\n\r\n",
    "asterisk": b"GET * HTTP/1.1\r\nHost: gw\r\n\r\n",
}


@pytest.mark.parametrize("head", LENIENT.values(), ids=LENIENT.keys())
async def test_lenient_head_is_refused_with_400_and_never_forwarded(
        start_gateway: GatewayFactory, head: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "proxy.server")
    async with start_gateway() as gw:
        refused(await exchange(gw.url, head), 400, "bad_request")
        assert gw.upstream.seen == []
    assert any("127.0.0.2" in r.getMessage() and "400 bad_request" in r.getMessage()
               for r in caplog.records if r.name == "proxy.server")


async def test_htab_in_a_field_value_is_forwarded(start_gateway: GatewayFactory) -> None:
    async with start_gateway() as gw:
        raw = await exchange(gw.url, b"GET /a HTTP/1.1\r\nHost: gw\r\nX-A: a\tb\r\n"
                                     b"Connection: close\r\n\r\n")
        [(status, _, _)] = responses(raw)
        assert status == 200
        assert gw.upstream.seen[0].header(b"x-a") == [b"a\tb"]


async def test_bytes_after_a_closing_request_are_discarded_and_it_is_answered(
        start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "proxy.access")
    async with start_gateway() as gw:
        raw = await exchange(gw.url, b"POST /order HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
                                     b"Connection: close\r\n\r\nhello\r\n")
        [(status, _, body)] = responses(raw)
        assert status == 200
        assert json.loads(body)["body_size"] == 5
        assert [s.raw_path for s in gw.upstream.seen] == [b"/order"]
    [line] = [r.getMessage() for r in caplog.records if r.name == "proxy.access"]
    assert '"POST /order" 200 forwarded' in line


async def test_a_second_http10_request_in_the_same_read_is_not_run(
        start_gateway: GatewayFactory) -> None:
    async with start_gateway() as gw:
        raw = await exchange(gw.url, b"GET /first HTTP/1.0\r\n\r\nGET /second HTTP/1.0\r\n\r\n")
        [(status, _, body)] = responses(raw)
        assert status == 200
        assert json.loads(body)["raw_path"] == "/first"
        assert [s.raw_path for s in gw.upstream.seen] == [b"/first"]


async def test_lower_case_method_is_501_and_not_forwarded_upper_cased(
        start_gateway: GatewayFactory) -> None:
    async with start_gateway() as gw:
        refused(await exchange(gw.url, b"head /a HTTP/1.1\r\n" + HOST + b"\r\n"), 501,
                "not_implemented")
        assert gw.upstream.seen == []


async def test_connect_is_405_without_a_traceback(
        start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture) -> None:
    async with start_gateway() as gw:
        raw = await exchange(gw.url, b"CONNECT /x HTTP/1.1\r\n" + HOST + b"\r\n")
        refused(raw, 405, "method_not_allowed")
        assert b"allow: get" in raw.lower()
        assert gw.upstream.seen == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize("path", [b"/health", b"/metrics"])
async def test_absolute_form_own_paths_are_served_by_the_gateway_never_limited(
        start_gateway: GatewayFactory, path: bytes) -> None:
    async with start_gateway(RATE_LIMIT=1) as gw:
        for _ in range(3):
            raw = await exchange(gw.url, b"GET http://gw" + path + b" HTTP/1.1\r\n" + HOST
                                 + b"Connection: close\r\n\r\n")
            [(status, headers, body)] = responses(raw)
            assert status in (200, 503)
            assert b"ratelimit" not in headers
            assert (b"redis_status" in body) if path == b"/health" else (b"gateway_" in body)
        assert [s for s in gw.upstream.seen if s.raw_path.endswith(path)] == []   # probes only


async def test_unroutable_target_spends_no_budget(start_gateway: GatewayFactory) -> None:
    async with start_gateway(RATE_LIMIT=1) as gw:
        refused(await exchange(gw.url, b"GET * HTTP/1.1\r\n" + HOST + b"\r\n"), 400,
                "bad_request")
        raw = await exchange(gw.url, b"GET /a HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
        [(status, _, _)] = responses(raw)
        assert status == 200
        assert len(gw.upstream.seen) == 1


@pytest.mark.parametrize("count", [4005, 10000])
async def test_head_over_32_kib_is_431_and_never_forwarded(
        start_gateway: GatewayFactory, count: int) -> None:
    fields = b"".join(b"X-%05d: v\r\n" % i for i in range(count))
    assert len(fields) > 32 * 1024
    async with start_gateway() as gw:
        raw = await exchange(gw.url, b"GET /a HTTP/1.1\r\n" + HOST + fields + b"\r\n")
        refused(raw, 431, "headers_too_large")
        assert gw.upstream.seen == []


async def test_head_just_under_32_kib_is_forwarded(start_gateway: GatewayFactory) -> None:
    filler = b"X-Fill: " + b"f" * (31 * 1024) + b"\r\n"
    async with start_gateway() as gw:
        raw = await exchange(gw.url, b"GET /a HTTP/1.1\r\n" + HOST + filler
                             + b"Connection: close\r\n\r\n")
        assert responses(raw)[0][0] == 200
        assert len(gw.upstream.seen) == 1


async def test_h2c_off_prior_knowledge_is_505_and_closed(start_gateway: GatewayFactory) -> None:
    async with start_gateway() as gw:
        raw = await exchange(gw.url, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        refused(raw, 505, "http_version_not_supported")
        assert gw.upstream.seen == []


async def test_h2c_off_upgrade_is_ignored_and_served_as_http11(
        start_gateway: GatewayFactory) -> None:
    async with start_gateway() as gw:
        raw = await exchange(gw.url, b"GET /a HTTP/1.1\r\n" + HOST + b"Connection: Upgrade, "
                             b"HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__"
                             b"\r\n\r\n")
        [(status, _, _)] = responses(raw)
        assert status == 200
        [seen] = gw.upstream.seen
        assert seen.header(b"upgrade") == [] and seen.header(b"http2-settings") == []


# --- h2c on: the same rules as HTTP/1.1 ---------------------------------------------------

async def h2_exchange(url: str, headers: list[tuple[bytes, bytes]], body: bytes | None = None
                      ) -> tuple[int, bytes]:
    """One request over prior-knowledge h2c; returns (status, body), or (-error code, b"")
    when the server ends the connection (GOAWAY); headers go as given."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=("127.0.0.3", 0))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=body is None)
    if body is not None:
        conn.send_data(1, body, end_stream=True)
    writer.write(conn.data_to_send())
    status, data = 0, b""
    end = time.monotonic() + DEADLINE
    try:
        while time.monotonic() < end:
            chunk = await asyncio.wait_for(reader.read(65536), DEADLINE)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return status, data
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return -event.error_code, data
            writer.write(conn.data_to_send())
        raise AssertionError("no end of stream")
    finally:
        writer.close()


def h2_request(method: bytes = b"GET", path: bytes = b"/a",
               *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":path", path), (b":scheme", b"http"),
            (b":authority", b"gw"), *extra]


async def test_h2c_on_post_without_content_length_is_forwarded_with_its_body(
        start_gateway: GatewayFactory) -> None:
    async with start_gateway(GATEWAY_H2C="on") as gw:
        status, body = await h2_exchange(gw.url, h2_request(b"POST", b"/order"), b"hello" * 100)
        assert status == 200
        assert json.loads(body)["body_size"] == 500
        assert gw.upstream.seen[0].body_size == 500


NO_AUTHORITY = [(b":method", b"GET"), (b":path", b"/a"), (b":scheme", b"http")]
H2_BAD = {
    "method-with-space": (h2_request(b"GET /smuggled", b"/h2-msp"), 400, "bad_request"),
    "lower-case-method": (h2_request(b"get"), 501, "not_implemented"),
    "connect": ([(b":method", b"CONNECT"), (b":authority", b"gw:443")], 405, "method_not_allowed"),
    "non-ascii-path": (h2_request(b"GET", "/caf\u00e9".encode()), 400, "bad_request"),
    "asterisk": (h2_request(b"GET", b"*"), 400, "bad_request"),
    "control-byte": (h2_request(b"GET", b"/a", (b"x-a", b"a\x01b")), 400, "bad_request"),
    "host-list": (NO_AUTHORITY + [(b"host", b"a, b")], 400, "bad_request"),
}
# malformed in ways the h2 library itself refuses with GOAWAY PROTOCOL_ERROR (RFC 9113 8.1.1)
H2_MALFORMED = {
    "two-content-lengths": h2_request(b"POST", b"/a", (b"content-length", b"0"),
                                      (b"content-length", b"5")),
    "authority-and-other-host": h2_request(b"GET", b"/a", (b"host", b"other")),
    "connection-header": h2_request(b"GET", b"/a", (b"connection", b"close")),
    "two-hosts": NO_AUTHORITY + [(b"host", b"a"), (b"host", b"b")],
}


@pytest.mark.parametrize(("headers", "status", "error"), H2_BAD.values(), ids=H2_BAD.keys())
async def test_h2c_on_requests_obey_http11_validation(
        start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture,
        headers: list[tuple[bytes, bytes]], status: int, error: str) -> None:
    async with start_gateway(GATEWAY_H2C="on") as gw:
        got, body = await h2_exchange(gw.url, headers)
        assert got == status
        assert json.loads(body)["error"] == error
        assert gw.upstream.seen == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize("headers", H2_MALFORMED.values(), ids=H2_MALFORMED.keys())
async def test_h2c_on_malformed_requests_end_the_connection_unforwarded(
        start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture,
        headers: list[tuple[bytes, bytes]]) -> None:
    async with start_gateway(GATEWAY_H2C="on") as gw:
        got, _ = await h2_exchange(gw.url, headers, b"hello")
        assert got == -h2.errors.ErrorCodes.PROTOCOL_ERROR
        assert gw.upstream.seen == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_h2c_on_a_valid_request_is_forwarded(start_gateway: GatewayFactory) -> None:
    async with start_gateway(GATEWAY_H2C="on") as gw:
        status, body = await h2_exchange(gw.url, h2_request(b"GET", b"/a?x=1", (b"x-a", b"a\tb")))
        assert status == 200
        assert (json.loads(body)["raw_path"], json.loads(body)["query"]) == ("/a", "x=1")
        assert gw.upstream.seen[0].header(b"x-a") == [b"a\tb"]


async def poll(condition: Any, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not within {DEADLINE}s: {what}")
        await asyncio.sleep(0.01)


async def test_h2c_on_a_closed_connection_frees_its_slot_when_the_upstream_answers(
        start_gateway: GatewayFactory) -> None:
    # UPSTREAM_TIMEOUT far beyond the deadline: only the release on close can free the slot
    async with start_gateway(GATEWAY_H2C="on", UPSTREAM_TIMEOUT=120) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port), local_addr=("127.0.0.3", 0))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, h2_request(b"GET", b"/hold"), end_stream=True)
        writer.write(conn.data_to_send())
        await poll(lambda: gw.upstream.in_flight == 1, "request held upstream")
        writer.close()
        await writer.wait_closed()
        gw.upstream.release.set()
        await poll(lambda: gw.gateway.slots.in_use == 0, "slot freed")


async def test_pipelined_requests_and_an_empty_line_before_one_are_all_answered(
        start_gateway: GatewayFactory) -> None:
    async with start_gateway() as gw:
        raw = await exchange(gw.url, b"GET /one HTTP/1.1\r\n" + HOST + b"\r\n\r\n"
                             b"GET /two HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
        assert [status for status, _, _ in responses(raw)] == [200, 200]
        assert [s.raw_path for s in gw.upstream.seen] == [b"/one", b"/two"]

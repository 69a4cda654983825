"""A client pausing its upload through the gateway: 408 one UPSTREAM_TIMEOUT after its body last
moved, and its forwarding slot back, not after up to twice that."""
from __future__ import annotations

import asyncio
import json
import time

TIMEOUT = 1.0
DEADLINE = 10.0                        # a hang guard only


async def test_client_pausing_mid_upload_gets_408_one_timeout_after_its_last_bytes(start_gateway) -> None:
    """The bound (1.5 x UPSTREAM_TIMEOUT) is the behaviour under test: the old sampling of
    progress once per window answered only after about 2 x UPSTREAM_TIMEOUT."""
    async with start_gateway(UPSTREAM_TIMEOUT=TIMEOUT) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            await writer.drain()
            writer.write(b"p" * 1000)                     # part of the body, then the pause
            await writer.drain()
            paused_at = time.monotonic()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            answered = time.monotonic() - paused_at
            body = await asyncio.wait_for(reader.read(), DEADLINE)        # until the server closes
        finally:
            writer.close()
        end = time.monotonic() + DEADLINE
        while gw.gateway.slots.in_use and time.monotonic() < end:
            await asyncio.sleep(0.01)
        in_use = gw.gateway.slots.in_use
    assert head.startswith(b"HTTP/1.1 408"), head
    assert json.loads(body)["error"] == "request_timeout"
    assert answered < 1.5 * TIMEOUT, answered
    assert in_use == 0

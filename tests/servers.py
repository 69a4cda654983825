"""Serve an ASGI app with a real Hypercorn on a free loopback port inside the test's loop."""
from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

from proxy.__main__ import hypercorn_config
from proxy.embedded_redis import free_port
from proxy.settings import Settings


async def wait_for_port(host: str, port: int, deadline: float = 10.0) -> None:
    """Poll until something accepts TCP connections on host:port."""
    end = time.monotonic() + deadline
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError(f"nothing listens on {host}:{port} after {deadline}s") from None
            await asyncio.sleep(0.01)
            continue
        writer.close()
        await writer.wait_closed()
        return


@asynccontextmanager
async def serving(app: Any, config: Config | None = None) -> AsyncIterator[str]:
    """Run `app` until the block ends; yields its base URL."""
    config = config or Config()
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.graceful_timeout = 1
    config.workers = 1
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        await wait_for_port("127.0.0.1", port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def gateway_config(settings: Settings) -> Config:
    """The gateway's own production Hypercorn settings (limits, headers), bound by serving()."""
    return hypercorn_config(settings)


def closed_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    port = free_port()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    return port

"""A counting upstream for the multi-process tests: ``python integration/counting_upstream.py PORT``.

Serves on 127.0.0.1:PORT with Hypercorn until SIGTERM/SIGINT. It counts what reaches it, so a
test can check how many requests the gateways really let through:

    GET  /__count    JSON: {"paths": {path: n}, "clients": {x-forwarded-for: n},
                           "in_flight": n, "max_in_flight": n}
                     (``clients`` and ``paths`` leave out ``/`` -- the gateways' health probe --
                     and the ``/__`` control paths)
    POST /__reset    zero every counter and re-arm /hold
    POST /__release  let every held request (and every later one) finish until the next reset
    /hold...         counted, then waits for /__release; ``in_flight``/``max_in_flight`` track
                     how many wait at once
    anything else    counted, 200 with a small JSON body
"""
from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections import Counter
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config


class CountingApp:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.paths: Counter[str] = Counter()
        self.clients: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        release = getattr(self, "release", None)
        if release is not None:
            release.set()                     # whoever still waits on the old event goes home
        self.release = asyncio.Event()

    def snapshot(self) -> dict[str, Any]:
        return {"paths": dict(self.paths), "clients": dict(self.clients),
                "in_flight": self.in_flight, "max_in_flight": self.max_in_flight}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        await _drain(receive)
        if path == "/__count":
            await _respond(send, 200, self.snapshot())
            return
        if path == "/__reset" and method == "POST":
            self.reset()
            await _respond(send, 200, {"reset": True})
            return
        if path == "/__release" and method == "POST":
            self.release.set()
            await _respond(send, 200, {"released": True})
            return
        if path != "/" and not path.startswith("/__"):
            self.paths[path] += 1
            xff = b", ".join(v for n, v in scope["headers"] if n == b"x-forwarded-for")
            self.clients[xff.decode("latin-1")] += 1
        if path.startswith("/hold"):
            release = self.release
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await release.wait()
            finally:
                self.in_flight -= 1
            await _respond(send, 200, {"held": path})
            return
        await _respond(send, 200, {"ok": path})


async def _drain(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def _respond(send: Any, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def main(port: int) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.graceful_timeout = 1
    config.keep_alive_timeout = 30
    config.backlog = 1024
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app = CountingApp()
    await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        print("usage: python integration/counting_upstream.py PORT", file=sys.stderr)
        sys.exit(2)
    asyncio.run(main(int(sys.argv[1])))

"""A real upstream for the tests: a small ASGI app served by Hypercorn on loopback, in the
test's own event loop, so tests can look at what it received and steer it with events."""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Seen:
    method: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body_size: int = 0
    body_sha256: str = ""

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


@dataclass(repr=False)
class Upstream:
    """Endpoints:
    /echo            JSON of what arrived (method, path, query, headers, body size and hash)
    /hold            counts concurrency, waits for `release` to be set, answers 200
    /slow?delay=S    answers after S seconds
    /stream?chunks=N first chunk, waits for `proceed`, then the other chunks
    /upload          reads the body, sets `first_chunk` on its first bytes, answers the size
    /gzip            a gzip body with Content-Encoding: gzip
    /hop             answers with hop-by-hop and repeated headers
    /big?size=N      N bytes
    anything else    /echo
    """

    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    proceed: asyncio.Event = field(default_factory=asyncio.Event)
    first_chunk: asyncio.Event = field(default_factory=asyncio.Event)
    gzip_body: bytes = gzip.compress(b'{"compressed": true}' * 50)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        seen = Seen(scope["method"], scope["raw_path"], scope["query_string"], list(scope["headers"]))
        self.seen.append(seen)
        params = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        path = scope["path"]
        if path == "/upload":
            await self._read_body(receive, seen)
            await _respond(send, 200, json.dumps({"size": seen.body_size}).encode())
        elif path == "/hold":
            await self._read_body(receive, seen)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await self.release.wait()
            finally:
                self.in_flight -= 1
            await _respond(send, 200, b"held")
        elif path == "/slow":
            await asyncio.sleep(float(params.get("delay", "1")))
            await _respond(send, 200, b"slow")
        elif path == "/stream":
            chunks = int(params.get("chunks", "3"))
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/octet-stream")]})
            await send({"type": "http.response.body", "body": b"first;", "more_body": True})
            await self.proceed.wait()
            for i in range(1, chunks):
                await send({"type": "http.response.body", "body": b"chunk%d;" % i, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif path == "/gzip":
            await _respond(send, 200, self.gzip_body,
                           [(b"content-encoding", b"gzip"), (b"content-type", b"application/json")])
        elif path == "/hop":
            await _respond(send, 200, b"hop", [
                (b"connection", b"x-secret-hop"), (b"x-secret-hop", b"1"),
                (b"keep-alive", b"timeout=5"), (b"proxy-connection", b"keep-alive"),
                (b"trailer", b"x-trailer"), (b"upgrade", b"h2c"),
                (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"x-kept", b"yes")])
        elif path == "/big":
            await _respond(send, 200, b"x" * int(params.get("size", "65536")))
        else:
            await self._read_body(receive, seen)
            await _respond(send, 200, json.dumps({
                "method": seen.method, "raw_path": seen.raw_path.decode("latin-1"),
                "query": seen.query.decode("latin-1"),
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in seen.headers],
                "body_size": seen.body_size, "body_sha256": seen.body_sha256,
            }).encode(), [(b"content-type", b"application/json")])

    async def _read_body(self, receive: Receive, seen: Seen) -> None:
        digest = hashlib.sha256()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if chunk:
                seen.body_size += len(chunk)
                digest.update(chunk)
                self.first_chunk.set()
            if not message.get("more_body", False):
                break
        seen.body_sha256 = digest.hexdigest()


async def _respond(send: Send, status: int, body: bytes,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})

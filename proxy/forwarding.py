"""Forwarder: sends the client's request to the configured upstream and streams both ways.

httpx's exceptions are translated here: too slow -> UpstreamTimeout (504), anything else on the
wire -> UpstreamUnreachable (502)."""
from __future__ import annotations

import asyncio
import copy
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, cast
from urllib.parse import quote_from_bytes

import httpx

from .errors import (BadRequest, RequestTimeout, RequestTooLarge, UpstreamTimeout,
                     UpstreamUnreachable)
from .headers import Header
from .settings import Settings
from .transport import BodySourceTimeout, UpstreamTransport

Receive = Callable[[], Awaitable[dict[str, Any]]]
log = logging.getLogger("proxy.forwarding")
DRAIN_LIMIT = 1 << 20                          # unread upload bytes worth reading to keep a connection
ON_THE_WIRE = re.compile(rb"[\x21\x22\x24-\x7e]*")        # visible ASCII but '#'
WIRE_SAFE = "!$&'()*+,;=:@/?%-._~[]|{}^`\\\"<>"


class ClientDisconnected(Exception):
    """The client went away while we were reading its request body."""


class RequestBody:
    """The ASGI request body as an async iterator, enforcing the size limit as it streams."""

    def __init__(self, receive: Receive, limit: int, length: int | None = None) -> None:
        self.receive = receive
        self.limit = limit
        self.length = length                   # declared Content-Length; None when chunked
        self.received = 0
        self.complete = False
        self.too_large = False
        self.client_gone = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while not self.complete:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.client_gone = True
                raise ClientDisconnected("client disconnected during the request body")
            chunk: bytes = message.get("body", b"")
            self.received += len(chunk)
            if self.received > self.limit:
                self.too_large = True
                raise self.too_large_error()
            self.complete = not message.get("more_body", False)
            if chunk:
                yield chunk

    @property
    def drainable(self) -> bool:
        """Whether the unread rest is known and small enough to read and throw away."""
        return self.complete or (self.length is not None
                                 and self.length - self.received <= DRAIN_LIMIT)

    async def drain(self, timeout: float = 5.0) -> None:
        """Read and discard what nobody read (the upstream answered early, or the gateway
        refused), so the client's connection can carry its next request. Callers check
        `drainable` first and answer `Connection: close` otherwise; past `timeout` seconds
        this gives up and the server closes the connection."""
        async def discard() -> None:
            while not self.complete:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    self.client_gone = True
                    return
                self.received += len(message.get("body", b""))
                self.complete = not message.get("more_body", False)
        try:
            await asyncio.wait_for(discard(), timeout)
        except asyncio.TimeoutError:
            pass

    def too_large_error(self) -> RequestTooLarge:
        return body_too_large(self.limit)


def body_too_large(limit: int) -> RequestTooLarge:
    """The 413 for a body over `limit` bytes, declared or streamed."""
    return RequestTooLarge(f"The request body exceeds the gateway's limit of {limit} bytes.")


def make_client(settings: Settings) -> httpx.AsyncClient:
    """The process's one upstream client: our HTTP/1.1 pool, no redirects, no cookie memory."""
    no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(
        transport=UpstreamTransport(max_idle=settings.max_concurrent_requests),
        timeout=httpx.Timeout(settings.upstream_timeout), cookies=no_cookies,
        follow_redirects=False, trust_env=False)


class Forwarder:
    """Builds the upstream request (always to the configured upstream) and opens its response."""

    def __init__(self, client: httpx.AsyncClient, upstream: httpx.URL, timeout: float) -> None:
        self.client = client
        # the hot path goes straight to the client's transport: AsyncClient.send would add
        # auth, redirect and cookie handling a proxy must not do (httpx 0.28's attribute)
        self.transport = cast(httpx.AsyncBaseTransport, getattr(client, "_transport", None))
        self.upstream = upstream
        self.base_path = upstream.raw_path.rstrip(b"/").decode("ascii")
        self.timeout = timeout
        self.timeouts = {"timeout": httpx.Timeout(timeout).as_dict()}

    def target(self, raw_path: bytes, query: bytes) -> httpx.URL:
        """The upstream URL for a request target. Only the path and query are taken from the
        client; an absolute-form target loses its scheme and authority, anything else is 400.

        RFC 9110 7.7: a proxy must not rewrite the path it forwards, so the client's bytes are
        placed into the URL as they are (httpx's parser would drop dot segments); only what
        cannot go on the wire as is (non-ASCII, '#') is percent-encoded. A path whose dot
        segments would climb above its root (and so out of the upstream's base path) is 400."""
        if not raw_path.startswith(b"/"):
            scheme, sep, rest = raw_path.partition(b"://")
            if not sep or not scheme.isalpha():
                raise BadRequest("The request target must be an absolute path.")
            raw_path = b"/" + rest.partition(b"/")[2]
        if (b"." in raw_path or b"%2" in raw_path) and _climbs(raw_path):
            raise BadRequest("The request target's dot segments climb above its root.")
        url = copy.copy(self.upstream)
        # httpx 0.28 keeps the parsed URL in _uri_reference; pinned in requirements.txt and
        # covered by tests/test_forwarding.py, so an upgrade that changes it fails loudly
        url._uri_reference = url._uri_reference._replace(            # noqa: SLF001
            path=self.base_path + _wire(raw_path), query=_wire(query) if query else None)
        return url

    async def open(self, method: str, url: httpx.URL, headers: list[Header],
                   body: RequestBody | None) -> httpx.Response:
        """Send the request; the response's headers are read, its body is left to stream."""
        request = httpx.Request(method, url, headers=headers, extensions=self.timeouts,
                                content=body.__aiter__() if body is not None else None)
        try:
            return await self.transport.handle_async_request(request)
        except BodySourceTimeout as exc:
            self._body_fault(body, exc)
            log.info("client too slow: %s %s, its body paused for %gs", method, url, self.timeout)
            raise RequestTimeout(f"The request body paused for more than {self.timeout:g} s.") from exc
        except httpx.TimeoutException as exc:
            self._body_fault(body, exc)
            log.warning("upstream timeout: %s %s after %gs (%s)", method, url, self.timeout, _reason(exc))
            raise UpstreamTimeout(
                f"The upstream did not answer within {self.timeout:g} s.") from exc
        except (httpx.TransportError, ClientDisconnected, RequestTooLarge) as exc:
            self._body_fault(body, exc)
            log.warning("upstream unreachable: %s %s (%s)", method, url, _reason(exc))
            raise UpstreamUnreachable("The upstream could not be reached.") from exc

    @staticmethod
    def _body_fault(body: RequestBody | None, exc: BaseException) -> None:
        """A failure caused by the client's body is the client's, not the upstream's."""
        if body is not None and body.too_large:
            raise body.too_large_error() from exc
        if body is not None and body.client_gone:
            raise ClientDisconnected("client disconnected during the request body") from exc


def _wire(raw: bytes) -> str:
    """Request-target bytes as URL text: printable ASCII kept, the rest percent-encoded."""
    if ON_THE_WIRE.fullmatch(raw):
        return raw.decode("ascii")
    return quote_from_bytes(raw, WIRE_SAFE)     # controls, space, '#', non-ASCII -> %XX


def _climbs(raw_path: bytes) -> bool:
    """Whether some reading of the path's dot segments takes it above its root: '.' and '..'
    also percent-encoded or with ';' parameters (Java servers strip those), empty segments not
    counted (servers that merge slashes), and '%2F' taken as a '/' as well (servers that
    decode it first)."""
    path = raw_path.lower().replace(b"%2e", b".")
    if _below_root(path):
        return True
    return b"%2f" in path and _below_root(path.replace(b"%2f", b"/"))


def _below_root(path: bytes) -> bool:
    depth = 0
    for segment in path.split(b"/"):
        name = segment.partition(b";")[0]
        if name == b"..":
            if not depth:
                return True
            depth -= 1
        elif name and name != b".":
            depth += 1
    return False


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__

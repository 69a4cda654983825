"""Forwarder: sends the client's request to the configured upstream and streams both ways.

httpx's exceptions are translated here: too slow -> UpstreamTimeout (504), anything else on the
wire -> UpstreamUnreachable (502)."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import quote_from_bytes

import httpx

from .errors import BadRequest, RequestTooLarge, UpstreamTimeout, UpstreamUnreachable
from .headers import Header
from .settings import Settings
from .transport import AiohttpTransport

Receive = Callable[[], Awaitable[dict[str, Any]]]
log = logging.getLogger("proxy.forwarding")
PATH_SAFE = "!$&'()*+,;=:@/%-._~"


class ClientDisconnected(Exception):
    """The client went away while we were reading its request body."""


class RequestBody:
    """The ASGI request body as an async iterator, enforcing the size limit as it streams."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
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

    def too_large_error(self) -> RequestTooLarge:
        return RequestTooLarge(f"The request body exceeds the gateway's limit of {self.limit} bytes.")


def make_client(settings: Settings) -> httpx.AsyncClient:
    """The process's one upstream client: aiohttp transport, no redirects, no cookie memory."""
    no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(
        transport=AiohttpTransport(max_connections=settings.max_concurrent_requests),
        timeout=httpx.Timeout(settings.upstream_timeout), cookies=no_cookies,
        follow_redirects=False, trust_env=False)


class Forwarder:
    """Builds the upstream request (always to the configured upstream) and opens its response."""

    def __init__(self, client: httpx.AsyncClient, upstream: httpx.URL, timeout: float) -> None:
        self.client = client
        self.upstream = upstream
        self.base_path = upstream.raw_path.rstrip(b"/")
        self.timeout = timeout

    def target(self, raw_path: bytes, query: bytes) -> httpx.URL:
        """The upstream URL for a request target. Only the path and query are taken from the
        client; an absolute-form target loses its scheme and authority, anything else is 400."""
        if not raw_path.startswith(b"/"):
            scheme, sep, rest = raw_path.partition(b"://")
            if not sep or not scheme.isalpha():
                raise BadRequest("The request target must be an absolute path.")
            raw_path = b"/" + rest.partition(b"/")[2]
        path = raw_path if raw_path.isascii() else quote_from_bytes(raw_path, PATH_SAFE).encode()
        if query:
            path += b"?" + (query if query.isascii() else quote_from_bytes(query, PATH_SAFE + "?").encode())
        return self.upstream.copy_with(raw_path=self.base_path + path)

    async def open(self, method: str, url: httpx.URL, headers: list[Header],
                   body: RequestBody | None) -> httpx.Response:
        """Send the request; the response's headers are read, its body is left to stream."""
        request = httpx.Request(method, url, headers=headers,
                                content=body.__aiter__() if body is not None else None)
        try:
            return await self.client.send(request, stream=True)
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


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__

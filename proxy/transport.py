"""An httpx transport on aiohttp's client: httpx's API, aiohttp's faster HTTP/1.1 machinery.

Tuned for a reverse proxy: no cookie jar, no automatic headers or decompression, the request
target sent exactly as given, duplicate headers kept apart, and aiohttp's exceptions mapped
onto httpx's by what happened (refused -> ConnectError, slow -> timeouts)."""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import httpx
from multidict import CIMultiDict
from yarl import URL

SKIP_HEADERS = {b"host", b"transfer-encoding"}
NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


@contextmanager
def httpx_errors() -> Iterator[None]:
    """Translate aiohttp's exceptions into httpx's (most specific first)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
    except (aiohttp.SocketTimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc)) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError,
            aiohttp.ClientPayloadError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
    except aiohttp.ClientError as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
    except asyncio.TimeoutError as exc:
        raise httpx.ReadTimeout("timed out") from exc


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with httpx_errors():
            async for chunk in self.response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        # a fully read body returns the connection to the pool; a partial one must not
        if self.response.content.is_eof():
            self.response.release()
        else:
            self.response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp ClientSession, created lazily inside the running loop."""

    def __init__(self, *, max_connections: int = 100, keepalive_expiry: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.max_connections, limit_per_host=0,
            keepalive_timeout=self.keepalive_expiry,
            ssl=self.ssl_context if self.ssl_context is not None else True)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=NO_AUTO_HEADERS, trust_env=False, timeout=aiohttp.ClientTimeout(),
            read_bufsize=64 * 1024)
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        timeout = request.extensions.get("timeout", {})
        headers = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in request.headers.raw if name.lower() not in SKIP_HEADERS)
        has_body = "content-length" in headers or "transfer-encoding" in request.headers
        with httpx_errors():
            response = await session.request(
                request.method, URL(str(request.url), encoded=True), headers=headers,
                data=_chunks(request.stream) if has_body else None,
                allow_redirects=False, auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout.get("connect"),
                                              sock_read=timeout.get("read")))
        extensions = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("latin-1", "replace")
        return httpx.Response(response.status, headers=list(response.raw_headers),
                              stream=_ResponseStream(response), request=request,
                              extensions=extensions)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _chunks(stream: httpx.SyncByteStream | httpx.AsyncByteStream) -> AsyncIterator[bytes]:
    assert isinstance(stream, httpx.AsyncByteStream)
    async for chunk in stream:
        yield chunk

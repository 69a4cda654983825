"""Gateway: owns the clients, and handle() is the request pipeline of the catch-all route.

The catch-all route is served at the ASGI level (Quart's request machinery would cost about as
much as the Redis round trip); /health, /metrics and the lifecycle stay in Quart."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import (BadRequest, GatewayError, LimiterUnavailable, QueueTimeout, RateLimited,
                     RequestTooLarge, UpstreamTimeout, UpstreamUnreachable)
from .forwarding import ClientDisconnected, Forwarder, RequestBody, make_client
from .headers import Header, strip_hop_by_hop, upstream_request_headers
from .health import HealthProbe
from .identity import client_address, is_trusted, normalize
from .limiter import Decision, RateLimiter
from .metrics import Metrics
from .settings import Settings
from .shaping import ForwardSlots, Release

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("proxy.gateway")
OUTCOME_BY_ERROR: dict[type[GatewayError], str] = {
    QueueTimeout: "shed", LimiterUnavailable: "limiter_error", BadRequest: "client_error",
    RequestTooLarge: "client_error", UpstreamUnreachable: "upstream_error",
    UpstreamTimeout: "upstream_error", GatewayError: "internal_error",
}


def make_redis(settings: Settings) -> Redis:
    """A bounded pool with short timeouts and no retries: a down Redis must fail fast."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url or "", max_connections=max(16, settings.max_concurrent_requests * 2),
        timeout=settings.redis_timeout, socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout, retry=Retry(NoBackoff(), 0),
        health_check_interval=30)
    return Redis(connection_pool=pool)


class Gateway:
    """The request pipeline: identify, limit (one EVALSHA), take a slot, forward, relay."""

    def __init__(self, settings: Settings, redis: Redis | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self._redis = redis
        self._client = client
        self.metrics = Metrics()

    async def start(self) -> None:
        """Create what needs the running loop; Redis being down here is not fatal."""
        settings = self.settings
        self.redis = self._redis or make_redis(settings)
        self.client = self._client or make_client(settings)
        self.limiter = RateLimiter(self.redis, settings)
        self.slots = ForwardSlots(settings.max_concurrent_requests, settings.queue_timeout)
        self.forwarder = Forwarder(self.client, settings.upstream_backend_url, settings.upstream_timeout)
        self.health = HealthProbe(self.redis, self.client, settings.upstream_backend_url)
        try:
            await self.limiter.script.load(self.redis)
            log.info("loaded %s as %s", self.limiter.script.name, self.limiter.script.sha)
        except Exception as exc:  # noqa: BLE001 - any failure here is retried on first use
            log.warning("redis not ready at startup (%s); scripts load on first use", exc)

    async def close(self) -> None:
        await self.client.aclose()
        await self.redis.aclose()

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request of the catch-all route."""
        headers: list[Header] = scope["headers"]
        peer = normalize(scope["client"][0]) if scope.get("client") else "unknown"
        trusted = self.settings.trusted_proxies
        client = client_address(peer, *_forwarding(headers) if trusted else (None, None), trusted)
        decision: Decision | None = None
        try:
            decision = await self.limiter.check(client)                 # one EVALSHA
            if not decision.allowed:
                self.metrics.count("rate_limited")
                raise self.limiter.reject(decision)
            url = self.forwarder.target(scope.get("raw_path") or scope["path"].encode(),
                                        scope["query_string"])
            body = self._body(headers, receive)
            release = await self.slots.acquire()                       # QueueTimeout -> 503
            try:
                upstream = await self.forwarder.open(                   # 502 / 504
                    scope["method"], url,
                    upstream_request_headers(headers, peer=peer,
                                             scheme=scope["scheme"],
                                             trust_forwarding=is_trusted(peer, trusted)),
                    body)
            except BaseException:
                release()
                raise
        except ClientDisconnected:
            self.metrics.count("client_closed")
            return
        except GatewayError as err:
            await self._refuse(send, err, decision)
            return
        except Exception:  # noqa: BLE001 - the one place a bug becomes a clean 500
            log.exception("unexpected error before the response started")
            await self._refuse(send, GatewayError("The gateway failed to handle the request."),
                               decision)
            return
        self.metrics.count("forwarded")
        await relay(upstream, decision.headers, send, receive, body, release)

    def _body(self, headers: list[Header], receive: Receive) -> RequestBody | None:
        length = chunked = None
        for name, value in headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = value
        if length is not None and chunked is not None:
            # RFC 9112 6.3: ambiguous framing is the stuff of request smuggling; refuse it
            raise BadRequest("Content-Length and Transfer-Encoding must not both be sent.")
        if length is not None and length.isdigit() and int(length) > self.settings.max_body_size:
            raise RequestBody(receive, self.settings.max_body_size).too_large_error()
        if chunked is not None or (length is not None and length != b"0"):
            return RequestBody(receive, self.settings.max_body_size)
        return None

    async def _refuse(self, send: Send, err: GatewayError, decision: Decision | None) -> None:
        """Answer with the error; every limited-path answer carries the rate-limit headers."""
        if not isinstance(err, RateLimited):                            # counted where decided
            if decision is not None:
                err.headers.extend(decision.headers)
            self.metrics.count(OUTCOME_BY_ERROR.get(type(err), "upstream_error"))
        await _send_error(send, err)


async def relay(upstream: httpx.Response, extra: list[Header], send: Send, receive: Receive,
                body: RequestBody | None, release: Release) -> None:
    """Stream the upstream response to the client. The slot is held until the last byte is
    relayed or the client goes away: a watcher closes the upstream as soon as it disconnects."""
    watcher: asyncio.Task[None] | None = None
    try:
        await send({"type": "http.response.start", "status": upstream.status_code,
                    "headers": strip_hop_by_hop(upstream.headers.raw) + extra})
        if body is None or body.complete:
            watcher = asyncio.create_task(_close_on_disconnect(receive, upstream))
        try:
            async for chunk in upstream.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            if not (watcher is not None and watcher.done()):
                log.warning("upstream failed mid-body (%s); aborting the response", exc)
            return                                   # ends the stream without its last chunk
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        if watcher is not None:
            watcher.cancel()
        await upstream.aclose()
        release()


async def _close_on_disconnect(receive: Receive, upstream: httpx.Response) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    await upstream.aclose()


async def _send_error(send: Send, err: GatewayError) -> None:
    status, headers, body = err.render()
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _forwarding(headers: list[Header]) -> tuple[str | None, str | None]:
    xff: list[bytes] = []
    fwd: list[bytes] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            xff.append(value)
        elif name == b"forwarded":
            fwd.append(value)
    return (b",".join(xff).decode("latin-1") if xff else None,
            b",".join(fwd).decode("latin-1") if fwd else None)



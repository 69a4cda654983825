"""Gateway: owns the clients, and handle() is the request pipeline of the catch-all route.

The catch-all route is served at the ASGI level (Quart's request machinery would cost about as
much as the Redis round trip); /health, /metrics and the lifecycle stay in Quart."""
from __future__ import annotations

import asyncio
import gc
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from random import getrandbits
from typing import Any

import httpx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from .errors import (BadRequest, GatewayError, LimiterUnavailable, QueueTimeout, RateLimited,
                     RequestTimeout, RequestTooLarge, UpstreamTimeout, UpstreamUnreachable)
from .forwarding import ClientDisconnected, Forwarder, RequestBody, body_too_large, make_client
from .headers import Header, strip_hop_by_hop, upstream_request_headers
from .health import HealthProbe
from .identity import client_address, is_trusted, normalize
from .limiter import Decision, RateLimiter
from .logs import access_log
from .metrics import Metrics
from .pipeline import Pipeline
from .settings import Settings
from .shaping import ForwardSlots, Release
from .watch import ClientWatch

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("proxy.gateway")
OUTCOME_BY_ERROR: dict[type[GatewayError], str] = {
    QueueTimeout: "shed", LimiterUnavailable: "limiter_error", BadRequest: "client_error",
    RequestTooLarge: "client_error", RequestTimeout: "client_error",
    UpstreamUnreachable: "upstream_error",
    UpstreamTimeout: "upstream_error", RateLimited: "rate_limited", GatewayError: "internal_error",
}
REQUEST_ID = b"x-request-id"
CLOSE = (b"connection", b"close")
DISCONNECT_WAIT = 5.0          # longest wait for http.disconnect after an answer that left a body unread
# a request still waiting for the upstream's head after this long gets a watch for its client
# leaving; a quicker upstream costs no watch task
WATCH_AFTER = 0.1
SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=~-]{1,128}")


def make_redis(settings: Settings) -> Redis:
    """A small pool with short timeouts and no retries: a down Redis must fail fast. Only
    /health and start-up use it (the limiter has its own pipeline), and a new connection sends
    no command before the caller's: RESP2 needs no HELLO, no CLIENT SETINFO, no health-check
    PING; only the URL's AUTH / SELECT."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url or "", max_connections=4,
        timeout=settings.redis_timeout, socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout, retry=Retry(NoBackoff(), 0),
        protocol=2, driver_info=None,
        # redis-py 8 skips its is-the-socket-still-open check while this is "auto": a Redis
        # restart would then fail one command per pooled connection
        maint_notifications_config=MaintNotificationsConfig(enabled=False))
    return Redis(connection_pool=pool)


@dataclass(slots=True)
class Exchange:
    """What one request did, for the access log and the metrics."""

    request_id: bytes
    client: str
    method: str
    path: str                          # the raw request target, query included
    start: float
    status: int = 0
    outcome: str = "internal_error"
    decision: Decision | None = None
    body: RequestBody | None = None
    queue: float = 0.0
    upstream: float = 0.0
    sent: int = 0


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
        self.pipeline = Pipeline(self.redis, settings.redis_timeout)
        self.limiter = RateLimiter(self.pipeline, settings, metrics=self.metrics)
        self.slots = ForwardSlots(settings.max_concurrent_requests, settings.queue_timeout,
                                  observer=self.metrics.slots)
        self.forwarder = Forwarder(self.client, settings.upstream_backend_url, settings.upstream_timeout)
        self.health = HealthProbe(self.redis, self.client, settings.upstream_backend_url)
        try:
            await self.limiter.script.load(self.pipeline)       # opens the limiter's connection
            info = await self.redis.info("server")
            log.info("redis %s answering; loaded %s as %s", info.get("redis_version", "?"),
                     self.limiter.script.name, self.limiter.script.sha)
        except (RedisError, OSError, RuntimeError) as exc:
            log.warning("redis not ready at startup (%s); scripts load on first use", exc)
        # everything built so far lives as long as the process: keep it out of the collector's
        # full passes, which otherwise walk the whole Quart/httpx/redis object graph
        gc.freeze()

    async def close(self) -> None:
        await self.client.aclose()
        await self.pipeline.aclose()
        await self.redis.aclose()

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request of the catch-all route."""
        headers: list[Header] = scope["headers"]
        peer = normalize(scope["client"][0]) if scope.get("client") else "unknown"
        trusted = self.settings.trusted_proxies
        client = client_address(peer, *_forwarding(headers) if trusted else (None, None), trusted)
        ex = Exchange(_request_id(headers), client, scope["method"], _target(scope), time.perf_counter())
        watch = ClientWatch(receive)
        try:
            await self._serve(ex, scope, headers, peer, watch, send)
        except asyncio.CancelledError:
            if not watch.absorb():
                raise
            ex.outcome, ex.status = "client_closed", 499
        finally:
            watch.stop()
            self._finish(ex)

    async def _serve(self, ex: Exchange, scope: Scope, headers: list[Header], peer: str,
                     watch: ClientWatch, send: Send) -> None:
        try:
            ex.body = body = self._body(headers, watch.receive)
            decision = await self._decide(ex)
            if decision.allowed:
                upstream, release = await self._open(ex, scope, headers, peer, body, watch)
            elif body is not None:
                raise self.limiter.reject(decision)     # the unread upload needs _refuse's care
        except ClientDisconnected:
            ex.outcome, ex.status = "client_closed", 499
            return
        except GatewayError as err:
            await self._refuse(ex, send, watch, err)
            return
        except Exception:  # noqa: BLE001 - the one place a bug becomes a clean 500
            log.exception("unexpected error before the response started")
            await self._refuse(ex, send, watch,
                               GatewayError("The gateway failed to handle the request."))
            return
        if not decision.allowed:              # the flood case: a prepared answer, nothing raised
            ex.outcome = "rate_limited"
            await self._answer(ex, send, *self.limiter.answer(decision))
            return
        ex.outcome, ex.status = "forwarded", upstream.status_code
        extra = [*decision.headers, (REQUEST_ID, ex.request_id)]
        try:
            ex.sent = await relay(upstream, extra, send, watch, body, release,
                                  self.settings.upstream_timeout)
        except ClientStalled as stalled:
            ex.sent = stalled.sent
            log.warning("client %s stopped reading its response for %gs; aborted after %d bytes",
                        ex.client, self.settings.upstream_timeout, stalled.sent)
        except ClientClosed as closed:
            ex.outcome, ex.status, ex.sent = "client_closed", 499, closed.sent
        except UpstreamAborted as aborted:
            ex.outcome, ex.sent = "upstream_aborted", aborted.sent

    async def _decide(self, ex: Exchange) -> Decision:
        asked = time.perf_counter()
        ex.decision = decision = await self.limiter.check(ex.client)    # one EVALSHA
        if not decision.local:
            self.metrics.limiter_seconds.observe(time.perf_counter() - asked)
        if decision is not self.limiter.unknown:
            self.metrics.decision(decision.allowed, decision.remaining, self.limiter.limit)
        return decision

    async def _open(self, ex: Exchange, scope: Scope, headers: list[Header], peer: str,
                    body: RequestBody | None, watch: ClientWatch) -> tuple[httpx.Response, Release]:
        """Wait for a forwarding slot and send the request upstream; the slot is the caller's
        once the upstream's response head has arrived. A client leaving meanwhile cancels this
        (the watch starts at once in the queue, after WATCH_AFTER at the upstream)."""
        url = self.forwarder.target(scope.get("raw_path") or scope["path"].encode(),
                                    scope["query_string"])
        timer = asyncio.get_running_loop().call_later(WATCH_AFTER, watch.start)
        try:
            queued = time.perf_counter()
            release = await self.slots.acquire(watch.start)                # QueueTimeout -> 503
            sent = time.perf_counter()
            ex.queue = sent - queued
            try:
                outgoing = upstream_request_headers(
                    headers, peer=peer, scheme=scope["scheme"], request_id=ex.request_id,
                    trust_forwarding=is_trusted(peer, self.settings.trusted_proxies))
                upstream = await self.forwarder.open(scope["method"], url, outgoing, body)  # 502/504
            except BaseException:
                release()
                raise
        finally:
            timer.cancel()
        ex.upstream = time.perf_counter() - sent
        return upstream, release

    def _body(self, headers: list[Header], receive: Receive) -> RequestBody | None:
        length = chunked = None
        for name, value in headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = value
        if length is not None and chunked is not None:
            # RFC 9112 6.3: ambiguous framing is the stuff of request smuggling; refuse it
            raise BadRequest("Content-Length and Transfer-Encoding must not both be sent.",
                             headers=[CLOSE])
        if length is not None and length.isdigit() and int(length) > self.settings.max_body_size:
            error = body_too_large(self.settings.max_body_size)
            error.headers.append(CLOSE)                                 # never read that much
            raise error
        if chunked is not None or (length is not None and length != b"0"):
            declared = int(length) if length is not None and length.isdigit() else None
            return RequestBody(receive, self.settings.max_body_size, declared)
        return None

    async def _refuse(self, ex: Exchange, send: Send, watch: ClientWatch, err: GatewayError) -> None:
        """Answer with the error; every limited-path answer carries the rate-limit headers."""
        watch.stop()
        if ex.decision is not None and not isinstance(err, RateLimited):
            err.headers.extend(ex.decision.headers)
        upload = ex.body
        if upload is not None and not upload.complete and not upload.client_gone:
            # an unread upload would wedge the connection: read a small rest, else close after
            if upload.drainable and not isinstance(err, RequestTimeout):   # a stalled one won't
                await upload.drain()
            if not upload.complete:
                err.headers.append(CLOSE)
        ex.outcome = OUTCOME_BY_ERROR.get(type(err), "internal_error")
        # closing (here, or _body's refusals, which read nothing): the body may be left unread
        unread = CLOSE in err.headers and not (upload is not None and upload.client_gone)
        await self._answer(ex, send, *err.render(), receive=watch.receive if unread else None)

    @staticmethod
    async def _answer(ex: Exchange, send: Send, status: int, headers: list[Header],
                      body: bytes, receive: Receive | None = None) -> None:
        """Send a complete answer of the gateway's own, with the request id added; with
        `receive`, the request body is left unread and the rest is discarded (end_unread)."""
        ex.status = status
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (REQUEST_ID, ex.request_id)]})
        last = {"type": "http.response.body", "body": body, "more_body": False}
        if receive is None:
            await send(last)
        else:
            await end_unread(send, receive, last)
        ex.sent = len(body)

    def _finish(self, ex: Exchange) -> None:
        total = time.perf_counter() - ex.start
        self.metrics.count(ex.outcome, ex.method, ex.status, total)
        if ex.outcome == "forwarded":
            self.metrics.queue_seconds.observe(ex.queue)
            self.metrics.upstream_seconds.observe(ex.upstream)
        if access_log.isEnabledFor(logging.INFO):
            decision = ex.decision
            verdict = ("unknown" if decision is None or decision is self.limiter.unknown
                       else "allowed" if decision.allowed else "limited")
            fields = {
                "request_id": ex.request_id.decode("latin-1"), "client": ex.client,
                "method": ex.method, "path": ex.path, "status": ex.status, "outcome": ex.outcome,
                "decision": verdict,
                "remaining": decision.remaining if verdict in ("allowed", "limited") and decision else None,
                "queue_s": round(ex.queue, 6), "upstream_s": round(ex.upstream, 6),
                "total_s": round(total, 6), "bytes": ex.sent,
            }
            access_log.info(
                '%(request_id)s %(client)s "%(method)s %(path)s" %(status)s %(outcome)s '
                "decision=%(decision)s remaining=%(remaining)s queue=%(queue_s).4f "
                "upstream=%(upstream_s).4f total=%(total_s).4f bytes=%(bytes)s",
                fields, extra={"fields": fields})


class ClientStalled(Exception):
    """The client took none of the response for a whole timeout period."""

    def __init__(self, sent: int) -> None:
        super().__init__(f"client stalled after {sent} bytes")
        self.sent = sent


class ClientClosed(Exception):
    """The client disconnected while its response was being relayed."""

    def __init__(self, sent: int) -> None:
        super().__init__(f"client closed after {sent} bytes")
        self.sent = sent


class UpstreamAborted(Exception):
    """The upstream failed in the middle of its response body; the client's response is cut."""

    def __init__(self, sent: int) -> None:
        super().__init__(f"upstream aborted after {sent} bytes")
        self.sent = sent


async def relay(upstream: httpx.Response, extra: list[Header], send: Send, watch: ClientWatch,
                body: RequestBody | None, release: Release, timeout: float) -> int:
    """Stream the upstream response to the client; returns the body bytes relayed. The slot is
    held until the last byte is relayed or the client goes away: unless the whole body is
    already in memory, the watch cancels the relay as soon as the client disconnects
    (ClientClosed). A send stuck for `timeout` (a client that stopped reading) aborts the
    response: ClientStalled; an upstream failing mid-body: UpstreamAborted."""
    stream = upstream.stream
    sent = 0
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    stalled = False

    def stall() -> None:
        nonlocal stalled
        stalled = True
        task.cancel()

    try:
        headers = [h for h in strip_hop_by_hop(upstream.headers.raw) if h[0] != REQUEST_ID]
        if body is not None and not body.drainable:
            headers.append(CLOSE)                    # the upload may outlive the answer
        await send({"type": "http.response.start", "status": upstream.status_code,
                    "headers": headers + extra})
        if not getattr(stream, "buffered_all", False) and (body is None or body.complete):
            watch.start()
        finished = False
        try:
            async for chunk in stream:                   # type: ignore[union-attr]
                # the last chunk ends the response itself, unless an upload is still coming
                finished = getattr(stream, "done", False) and (body is None or body.complete)
                if finished:
                    watch.stop()
                timer = loop.call_later(timeout, stall)  # a timer, not wait_for: no task per chunk
                try:
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": not finished})
                finally:
                    timer.cancel()
                sent += len(chunk)
        except asyncio.CancelledError:
            if stalled:
                if sys.version_info >= (3, 11):
                    task.uncancel()
                raise ClientStalled(sent) from None
            if watch.absorb():
                raise ClientClosed(sent) from None
            raise
        except httpx.HTTPError as exc:
            log.warning("upstream failed mid-body: %s %s after %d bytes (%s); response aborted",
                        upstream.request.method, upstream.request.url, sent, exc)
            raise UpstreamAborted(sent) from exc      # ends the stream without its last chunk
        if body is not None and not body.complete and not body.client_gone:
            # the upstream answered without reading the whole upload: stop sending it on, and
            # read a small rest before the response ends so the keep-alive connection survives
            await upstream.aclose()
            release()
            if body.drainable:
                await body.drain()
        if not finished:
            watch.stop()
            last = {"type": "http.response.body", "body": b"", "more_body": False}
            if body is not None and not body.complete and not body.client_gone:
                await end_unread(send, watch.receive, last)     # too much left: close instead
            else:
                await send(last)
        return sent
    finally:
        await upstream.aclose()
        release()


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def end_unread(send: Send, receive: Receive, last: Message) -> None:
    """Send the response's last message when the request body is left unread (the answer
    says Connection: close), reading and throwing away the rest until http.disconnect.

    Hypercorn feeds body chunks through a bounded queue (max_app_queue_size) and puts
    http.disconnect into that same queue *inside* this last send (StreamClosed). With the
    queue full of chunks nobody reads, that put, and so this send, never returns; its reader
    is stuck on the next chunk, so the connection is neither read nor closed until the server
    shuts down (on Python 3.12+ asyncio, Server.wait_closed() then waits for it forever). The
    queue must be emptied while the last message goes out, not after."""
    discarder = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await send(last)
        await asyncio.wait_for(discarder, DISCONNECT_WAIT)
    except asyncio.TimeoutError:
        pass                  # a server that does not say so: the answer is out, leave it be
    finally:
        discarder.cancel()


def _request_id(headers: list[Header]) -> bytes:
    """The client's X-Request-ID when it is sane, else a fresh random one."""
    for name, value in headers:
        if name == REQUEST_ID and SANE_REQUEST_ID.fullmatch(value):
            return value
    # a correlation id, not a secret (clients may pick their own): Python's PRNG, reseeded
    # after fork, costs no system call, unlike os.urandom (~4% of a refused request)
    return b"%032x" % getrandbits(128)


def _target(scope: Scope) -> str:
    """The request target as the client sent it, for the log: the decoded path would let
    %0d%0a write a line of its own."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope["query_string"]
    return (raw + b"?" + query if query else raw).decode("latin-1")


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

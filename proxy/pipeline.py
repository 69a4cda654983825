"""Pipeline: the limiter's Redis commands share one connection, written back to back as
requests arrive and answered in order (auto-pipelining).

Under load this turns one round trip and one pool checkout per request into a stream of
commands on a single socket: Redis reads many per wake-up and the gateway parses many replies
per read. The socket is redis-py's own (URL, TLS, unix sockets), made by the client's pool;
AUTH and SELECT are written together with the first command instead of costing round trips of
their own. Every call has a deadline that covers connecting too; the pooled client is left to
/health and start-up."""
from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.credentials import CredentialProvider, UsernamePasswordCredentialProvider
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

T = TypeVar("T")
log = logging.getLogger("proxy.pipeline")
STALE_AFTER = 4        # timeouts a link's oldest unanswered command may wait before it is dropped
OK = (b"OK", "OK")


def lost(exc: OSError | RuntimeError) -> RedisConnectionError:
    """A socket-level failure as redis-py's ConnectionError. uvloop raises RuntimeError
    ("unable to perform operation on <TCPTransport closed=True>") on a transport a reset has
    closed, where asyncio raises OSError or drops the write; any other RuntimeError is a bug
    and propagates."""
    if isinstance(exc, RuntimeError) and "closed" not in str(exc):
        raise exc
    return RedisConnectionError(f"redis connection lost: {exc}")


def _writer(conn: AbstractConnection) -> asyncio.StreamWriter | None:
    """The connection's writer, or None when there is none or its transport is closed or
    closing: a write already failed on it (asyncio closes the socket on its next iteration) or
    it was closed. Nothing may be written to it: on Python 3.12+ the selector transport's
    writelines() does not check for a lost connection (write() does) and registers a writer for
    the dying socket's fd in the loop's selector; once the socket is closed that fd number is
    reused by the next connection, whose sock_connect then waits for a write event that never
    comes (CPython gh-136234)."""
    writer: asyncio.StreamWriter | None = conn._writer      # noqa: SLF001 - redis-py 8's stream
    return None if writer is None or writer.is_closing() else writer


class _Link:
    """One connection and the calls waiting for its replies, in the order they were written,
    each with the loop time it was written at."""

    def __init__(self, conn: AbstractConnection, greeting: deque[str]) -> None:
        self.conn = conn
        self.greeting = greeting               # AUTH / SELECT replies still to come, first
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.reader: asyncio.Task[None] | None = None
        self.broken = False

    def usable(self) -> bool:
        """Connected, not being torn down after a failed write, and (when idle) not closed by
        the server in the meantime."""
        if self.broken or not self.conn.is_connected or _writer(self.conn) is None:
            return False
        reader = self.conn._reader                          # noqa: SLF001 - redis-py 8's stream
        return bool(self.pending) or reader is None or not reader.at_eof()

    def fail(self, error: RedisError) -> None:
        """Fail every call in flight and close the connection; nothing is reused after."""
        if self.broken:
            return
        self.broken = True
        pending, self.pending = self.pending, deque()
        for waiter, _ in pending:
            if not waiter.done():
                waiter.set_exception(type(error)(str(error)))
        if self.reader is not None and self.reader is not asyncio.current_task():
            self.reader.cancel()
        asyncio.ensure_future(self.conn.disconnect(nowait=True))


class Pipeline:
    """evalsha() and script_load() as on redis-py's client, plus a `deadline` (loop time) that
    bounds the call, connecting included; without one a call gets `timeout` seconds (by default
    the pool's socket timeout, REDIS_TIMEOUT)."""

    def __init__(self, redis: Redis, timeout: float | None = None) -> None:
        self.redis = redis
        if timeout is None:
            timeout = redis.connection_pool.connection_kwargs.get("socket_timeout")
        self.timeout: float = timeout if timeout is not None else math.inf
        self.link: _Link | None = None
        self.connecting: asyncio.Future[_Link] | None = None
        self.closed = False

    @property
    def conn(self) -> AbstractConnection | None:
        """The connection calls currently go to, if any."""
        return self.link.conn if self.link is not None else None

    @property
    def pending(self) -> deque[tuple[asyncio.Future[Any], float]]:
        """Calls written and waiting for their replies."""
        return self.link.pending if self.link is not None else deque()

    def deadline(self) -> float:
        """The loop time by which a call started now must be answered."""
        return asyncio.get_running_loop().time() + self.timeout

    async def script_load(self, source: bytes, *, deadline: float | None = None) -> Any:
        return await self.call("SCRIPT", "LOAD", source, deadline=deadline)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any,
                      deadline: float | None = None) -> Any:
        return await self.call("EVALSHA", sha, numkeys, *keys_and_args, deadline=deadline)

    async def call(self, *command: Any, deadline: float | None = None) -> Any:
        """Write one command on the shared connection and wait for its reply until `deadline`;
        a reply arriving later is read and dropped, so the replies behind it still match."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.timeout
        link = self.link
        if link is None or not link.usable():
            link = await self._connect(deadline)
            if loop.time() >= deadline:     # connecting took it all: spare Redis the command
                raise RedisTimeoutError("connecting to redis took the whole REDIS_TIMEOUT")
        writer = _writer(link.conn)
        try:
            if writer is None:
                raise OSError("not connected")
            # written whole and in call order, never awaited in between: replies match pending
            writer.writelines(link.conn.pack_command(*command))
        except (OSError, RuntimeError) as exc:              # closed under us
            error = lost(exc)
            self._forget(link, error)
            raise error from exc
        reply: asyncio.Future[Any] = loop.create_future()
        link.pending.append((reply, loop.time()))
        if link.reader is None or link.reader.done():
            link.reader = asyncio.create_task(self._read(link))
        if deadline == math.inf:
            return await reply
        timer = loop.call_at(deadline, self._expire, link, reply)
        try:
            return await reply
        finally:
            timer.cancel()

    def _expire(self, link: _Link, reply: asyncio.Future[Any]) -> None:
        """A call's deadline passed: fail it alone, and drop the link once its oldest unanswered
        command is so old that every reply behind it is late too."""
        if reply.done():
            return
        reply.set_exception(RedisTimeoutError("no reply from redis within REDIS_TIMEOUT"))
        if link.pending:
            age = asyncio.get_running_loop().time() - link.pending[0][1]
            if age > STALE_AFTER * self.timeout:
                log.warning("redis has not answered for %.1fs; dropping its connection", age)
                self._forget(link, RedisTimeoutError(f"no reply from redis for {age:.1f}s"))

    async def _connect(self, deadline: float) -> _Link:
        """The current link, opening one if needed; concurrent callers share one attempt, each
        waits for it until its own deadline, and a caller cancelled or timed out meanwhile does
        not end it for the others."""
        if self.closed:
            raise RedisConnectionError("pipeline closed")
        if self.link is not None and not self.link.usable():
            self._forget(self.link, RedisConnectionError("redis connection closed by the server"))
        if self.link is not None:
            return self.link
        if self.connecting is None:
            self.connecting = asyncio.ensure_future(self._open())
            self.connecting.add_done_callback(_retrieve)
        return await until(self.connecting, deadline)

    async def _open(self) -> _Link:
        """Connect the socket and write AUTH / SELECT (when the URL asks for them) without
        waiting for their replies: the reader checks them before any call's."""
        try:
            pool = self.redis.connection_pool
            conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
            handshake: list[tuple[Any, ...]] = []
            greeting: deque[str] = deque()
            credentials = await _credentials(conn)
            if credentials:
                handshake.append(("AUTH", *credentials))
                greeting.append("AUTH")
            if int(conn.db or 0):
                handshake.append(("SELECT", conn.db))
                greeting.append("SELECT")
            try:
                await conn._connect()  # type: ignore[no-untyped-call]  # noqa: SLF001 - the socket alone
                conn._parser.on_connect(conn)  # type: ignore[no-untyped-call]  # noqa: SLF001
                writer = _writer(conn)
                if writer is None:
                    raise OSError("connection closed while opening")
                if handshake:
                    writer.writelines(conn.pack_commands(handshake))
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            self.link = _Link(conn, greeting)
            return self.link
        except asyncio.TimeoutError as exc:
            raise RedisTimeoutError("timeout connecting to redis") from exc
        except (OSError, RuntimeError) as exc:
            raise lost(exc) from exc
        finally:
            self.connecting = None

    async def _read(self, link: _Link) -> None:
        """Match replies to calls in order while any call waits on this link."""
        while (link.pending or link.greeting) and not link.broken:
            try:
                reply: Any = await link.conn.read_response()   # socket_timeout bounds each read
            except ResponseError as exc:                   # an error reply: this call's alone
                reply = exc
            except (RedisError, OSError, RuntimeError) as exc:   # the connection is done for
                self._forget(link, exc if isinstance(exc, RedisError) else lost(exc))
                return
            if link.greeting:
                command = link.greeting.popleft()
                if reply not in OK:
                    error = (AuthenticationError if command == "AUTH" else RedisConnectionError)(
                        f"redis refused {command}: {reply}")
                    self._forget(link, error)
                    return
                continue
            waiter, _ = link.pending.popleft()
            if waiter.done():
                continue                                   # its caller timed out or left
            if isinstance(reply, ResponseError):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)

    def _forget(self, link: _Link, error: RedisError) -> None:
        if self.link is link:
            self.link = None
        link.fail(error)

    async def aclose(self) -> None:
        self.closed = True
        if self.link is not None:
            link, self.link = self.link, None
            link.fail(RedisConnectionError("pipeline closed"))
            await link.conn.disconnect(nowait=True)


async def _credentials(conn: AbstractConnection) -> tuple[str, ...]:
    """AUTH's arguments for this connection, empty without credentials."""
    provider: CredentialProvider | None = conn.credential_provider
    if provider is None and (conn.username or conn.password):
        provider = UsernamePasswordCredentialProvider(conn.username, conn.password)
    if provider is None:
        return ()
    return tuple(await provider.get_credentials_async())


async def until(future: asyncio.Future[T], deadline: float | None) -> T:
    """The future's result, or RedisTimeoutError at `deadline` (loop time; None: no limit);
    leaving, by timing out or being cancelled, does not cancel the future."""
    if not future.done():
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)
        future.add_done_callback(wake)
        timer = loop.call_at(deadline, wake) if deadline not in (None, math.inf) else None
        try:
            await woken
        finally:
            future.remove_done_callback(wake)
            if timer is not None:
                timer.cancel()
        if not future.done():
            raise RedisTimeoutError("no answer from redis within REDIS_TIMEOUT")
    return future.result()


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a shared attempt's failure as seen: its callers may all have left already."""
    if not future.cancelled():
        future.exception()

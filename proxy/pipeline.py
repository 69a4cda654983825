"""Pipeline: the limiter's EVALSHA calls share one Redis connection, written back to back as
requests arrive and answered in order (auto-pipelining).

Under load this turns one round trip and one pool checkout per request into a stream of
commands on a single socket: Redis reads many per wake-up and the gateway parses many replies
per read. The connection is redis-py's own (URL, auth, TLS, unix sockets, timeouts), made by
the client's pool; everything else (SCRIPT LOAD, /health) uses the pooled client."""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger("proxy.pipeline")


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
    """One connection and the calls waiting for its replies, in the order they were written."""

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn
        self.pending: deque[asyncio.Future[Any]] = deque()
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
        self.broken = True
        pending, self.pending = self.pending, deque()
        for waiter in pending:
            if not waiter.done():
                waiter.set_exception(type(error)(str(error)))
        if self.reader is not None and self.reader is not asyncio.current_task():
            self.reader.cancel()
        asyncio.ensure_future(self.conn.disconnect(nowait=True))


class Pipeline:
    """evalsha() and script_load() with the signatures of redis-py's client."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.link: _Link | None = None
        self.connecting: asyncio.Future[_Link] | None = None
        self.closed = False

    @property
    def conn(self) -> AbstractConnection | None:
        """The connection calls currently go to, if any."""
        return self.link.conn if self.link is not None else None

    @property
    def pending(self) -> deque[asyncio.Future[Any]]:
        """Calls written and waiting for their replies."""
        return self.link.pending if self.link is not None else deque()

    async def script_load(self, source: bytes) -> Any:
        return await self.redis.script_load(source)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        link = self.link
        if link is None or not link.usable():
            link = await self._connect()
        writer = _writer(link.conn)
        try:
            if writer is None:
                raise OSError("not connected")
            # written whole and in call order, never awaited in between: replies match pending
            writer.writelines(link.conn.pack_command("EVALSHA", sha, numkeys, *keys_and_args))
        except OSError as exc:                              # closed under us
            error = RedisConnectionError(f"redis connection lost: {exc}")
            self._forget(link, error)
            raise error from exc
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.pending.append(reply)
        if link.reader is None or link.reader.done():
            link.reader = asyncio.create_task(self._read(link))
        return await reply

    async def _connect(self) -> _Link:
        """The current link, opening one if needed; concurrent callers share one attempt, and
        a caller cancelled meanwhile does not cancel it for the others."""
        if self.closed:
            raise RedisConnectionError("pipeline closed")
        if self.link is not None and not self.link.usable():
            self._forget(self.link, RedisConnectionError("redis connection closed by the server"))
        if self.link is not None:
            return self.link
        if self.connecting is None:
            self.connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self.connecting)

    async def _open(self) -> _Link:
        try:
            conn: AbstractConnection = self.redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            self.link = _Link(conn)
            return self.link
        except OSError as exc:
            raise RedisConnectionError(str(exc)) from exc
        finally:
            self.connecting = None

    async def _read(self, link: _Link) -> None:
        """Match replies to calls in order while any call waits on this link."""
        while link.pending and not link.broken:
            try:
                reply: Any = await link.conn.read_response()   # socket_timeout bounds each read
            except ResponseError as exc:                   # an error reply: this call's alone
                reply = exc
            except (RedisError, OSError) as exc:           # the connection is done for
                self._forget(link, exc if isinstance(exc, RedisError)
                             else RedisConnectionError(str(exc)))
                return
            waiter = link.pending.popleft()
            if waiter.done():
                continue                                   # its caller was cancelled
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

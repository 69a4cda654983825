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


class Pipeline:
    """evalsha() and script_load() with the signatures of redis-py's client."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.conn: AbstractConnection | None = None
        self.connecting: asyncio.Future[AbstractConnection] | None = None
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.reader: asyncio.Task[None] | None = None

    async def script_load(self, source: bytes) -> Any:
        return await self.redis.script_load(source)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        conn = self.conn if self.conn is not None and self.conn.is_connected else await self._connect()
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        writer = conn._writer                              # noqa: SLF001 - redis-py 8's stream
        try:
            if writer is None:
                raise OSError("not connected")
            # written whole and in call order, never awaited in between: replies match pending
            writer.writelines(conn.pack_command("EVALSHA", sha, numkeys, *keys_and_args))
        except OSError as exc:                             # closed under us
            self._drop(conn, RedisConnectionError(f"redis connection lost: {exc}"))
            raise RedisConnectionError(f"redis connection lost: {exc}") from exc
        self.pending.append(reply)
        if self.reader is None or self.reader.done():
            self.reader = asyncio.create_task(self._read(conn))
        return await reply

    async def _connect(self) -> AbstractConnection:
        if self.connecting is not None:
            shared: AbstractConnection = await asyncio.shield(self.connecting)
            return shared
        self.connecting = asyncio.get_running_loop().create_future()
        try:
            conn: AbstractConnection = self.redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            await conn.connect()  # type: ignore[no-untyped-call]
        except BaseException as exc:
            error = exc if isinstance(exc, RedisError) else RedisConnectionError(str(exc))
            self.connecting.set_exception(error)
            self.connecting.exception()                      # retrieved: waiters re-raise it
            raise error from exc
        else:
            self.conn = conn
            self.connecting.set_result(conn)
            return conn
        finally:
            self.connecting = None

    async def _read(self, conn: AbstractConnection) -> None:
        """Match replies to calls in order while any call waits."""
        while self.pending and conn is self.conn:
            try:
                reply: Any = await conn.read_response()    # socket_timeout bounds each read
            except ResponseError as exc:                   # an error reply: this call's alone
                reply = exc
            except (RedisError, OSError) as exc:           # the connection is done for
                self._drop(conn, exc if isinstance(exc, RedisError)
                           else RedisConnectionError(str(exc)))
                return
            waiter = self.pending.popleft()
            if waiter.done():
                continue                                   # its caller was cancelled
            if isinstance(reply, ResponseError):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)

    def _drop(self, conn: AbstractConnection, error: RedisError) -> None:
        """Fail every call in flight on `conn` and forget it; the next call reconnects."""
        if self.conn is conn:
            self.conn = None
        pending, self.pending = self.pending, deque()
        for waiter in pending:
            if not waiter.done():
                waiter.set_exception(type(error)(str(error)))
        asyncio.ensure_future(conn.disconnect(nowait=True))

    async def aclose(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.conn is not None:
            await self.conn.disconnect(nowait=True)
            self.conn = None

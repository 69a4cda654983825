"""FaultProxy: a TCP proxy on loopback that injects network faults between two parties.

It runs its own event loop in a thread, so the same proxy serves an in-process gateway (whose
loop it must not block) and real processes alike. Faults are switched while it runs, from any
thread: `proxy.set(latency_down=0.5)`, `proxy.set(blackhole=True)`, `proxy.set()` to heal.

    with FaultProxy("127.0.0.1", redis_port) as proxy:
        settings = make_settings(REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0")
        proxy.set(reset_after_down=1)          # the next reply is cut after its first byte
"""
from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from proxy.embedded_redis import free_port

T = TypeVar("T")
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Faults:
    """What the proxy does to traffic. Down is server -> client, up is client -> server; byte
    counts are per connection, from its start."""

    latency_up: float = 0.0            # seconds each chunk waits before it is passed on
    latency_down: float = 0.0
    reset_after_up: int | None = None  # pass this many bytes, then reset both sides (RST)
    reset_after_down: int | None = None
    reset_pause: float = 0.0           # seconds between passing those bytes and the reset: an
                                       # RST at once can overtake them (the peer's kernel drops
                                       # unread data on RST), a pause lets the peer read them
    half_close_after_down: int | None = None  # pass this many bytes down, then FIN to the client
    blackhole: bool = False            # connections stay open, nothing passes either way
    refuse: bool = False               # not listening: connects are refused


class _Pair:
    """One client connection and its server side."""

    def __init__(self, client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.client_reader, self.client_writer = client
        self.server_writer: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        """Reset both sides: SO_LINGER 0 makes close() send RST instead of FIN."""
        for writer in (self.client_writer, self.server_writer):
            if writer is None or writer.is_closing():
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            writer.transport.abort()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


class FaultProxy:
    """Listens on 127.0.0.1:`port` (free by default) and forwards to target_host:target_port."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.faults = Faults()
        self.accepted = 0                  # connections accepted since start
        self.pairs: set[_Pair] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set(self, **faults: Any) -> None:
        """Replace the faults (unnamed ones are off); applies to open connections at once."""
        new = replace(Faults(), **faults)
        self.faults = new                  # one reference swap: read by the pumps per chunk
        if new.refuse:
            self._call(self._unlisten())
        else:
            self._call(self._listen())

    def cut(self) -> int:
        """Reset every open connection; returns how many there were."""
        async def cut_all() -> int:
            pairs = list(self.pairs)
            for pair in pairs:
                pair.abort()
            return len(pairs)
        return self._call(cut_all())

    @property
    def open_connections(self) -> int:
        return len(self.pairs)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port,
                                                      reuse_address=True)

    async def _unlisten(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            await server.wait_closed()

    async def _shutdown(self) -> None:
        await self._unlisten()
        for pair in list(self.pairs):
            pair.abort()
        # the handlers see their connections gone and end; none may be left pending at close
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        pair = _Pair((reader, writer))
        self.pairs.add(pair)
        try:
            if self.faults.blackhole:
                await self._swallow(reader)
                return
            try:
                server_reader, pair.server_writer = await asyncio.open_connection(*self.target)
            except OSError:
                pair.abort()
                return
            pair.tasks = [asyncio.ensure_future(self._pump(pair, reader, pair.server_writer, "up")),
                          asyncio.ensure_future(self._pump(pair, server_reader, writer, "down"))]
            await asyncio.gather(*pair.tasks, return_exceptions=True)
        finally:
            self.pairs.discard(pair)
            pair.abort()

    @staticmethod
    async def _swallow(reader: asyncio.StreamReader) -> None:
        while await reader.read(CHUNK):
            pass

    async def _pump(self, pair: _Pair, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        passed = 0
        try:
            while data := await reader.read(CHUNK):
                faults = self.faults
                if faults.blackhole:
                    continue
                delay = faults.latency_up if direction == "up" else faults.latency_down
                if delay:
                    await asyncio.sleep(delay)
                reset = faults.reset_after_up if direction == "up" else faults.reset_after_down
                half = faults.half_close_after_down if direction == "down" else None
                stops = [at for at in (reset, half) if at is not None]
                if stops and passed + len(data) >= min(stops):
                    writer.write(data[:max(0, min(stops) - passed)])
                    await writer.drain()
                    if reset is not None and passed + len(data) >= reset:
                        if faults.reset_pause:
                            await asyncio.sleep(faults.reset_pause)
                        pair.abort()
                        return
                    writer.write_eof()             # half-close: FIN, keep reading the other way
                    await self._swallow(reader)
                    return
                writer.write(data)
                passed += len(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pair.abort()

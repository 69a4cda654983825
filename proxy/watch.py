"""ClientWatch: notices a client that leaves while its request waits, and cancels the request.

Hypercorn does not cancel the app when a client disconnects: it queues `http.disconnect`
behind the request body, where only a reader of receive() finds it."""
from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
PEEK_LIMIT = 1 << 16       # request body bytes read ahead while no one else reads them


class ClientWatch:
    """The reader of a request's ASGI messages while no one else needs them.

    Started, it reads receive() in a task of its own: request-body messages are kept for
    `receive` (up to PEEK_LIMIT bytes; past that it stops and the body's reader finds the
    disconnect), and `http.disconnect` cancels the request's task. Everyone else reads through
    `receive`, which pauses the watch while it reads and resumes it once the body has ended."""

    __slots__ = ("_receive", "_task", "_watcher", "_kept", "_peeked", "_reading", "wanted",
                 "ended", "gone")

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._receive = receive
        self._task = task
        self._watcher: asyncio.Task[None] | None = None
        self._kept: deque[Message] = deque()
        self._peeked = 0
        self._reading = False
        self.wanted = False          # between start() and stop()
        self.ended = False           # the request body's last message has been read
        self.gone = False            # the client disconnected and the request was cancelled

    def start(self) -> None:
        """Watch from now until stop(); idempotent, and safe to call from a loop callback."""
        self.wanted = True
        if self._reading or self.gone or (self._watcher is not None and not self._watcher.done()):
            return
        if not self.ended and self._peeked >= PEEK_LIMIT:
            return
        self._watcher = asyncio.ensure_future(self._watch())

    def stop(self) -> None:
        """Stop watching; call it before the response's last message, whose sending makes
        Hypercorn queue an `http.disconnect` of its own."""
        self.wanted = False
        self._pause()

    def _pause(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()     # asyncio.Queue.get loses no message to a cancellation
            self._watcher = None

    async def _watch(self) -> None:
        while self.ended or self._peeked < PEEK_LIMIT:
            message = await self._receive()
            self._kept.append(message)
            if message["type"] == "http.disconnect":
                self.gone = True
                self._task.cancel()
                return
            self._peeked += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.ended = True

    async def receive(self) -> Message:
        """The next message for a reader other than the watch (the request body, a drain)."""
        self._pause()
        if self._kept:
            message = self._kept.popleft()
        else:
            self._reading = True
            try:
                message = await self._receive()
            finally:
                self._reading = False
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.ended = True
            if self.wanted:
                self.start()           # nobody reads after the body's end: watch again
        return message

    def absorb(self) -> bool:
        """Whether the CancelledError being handled is the watch's doing (the client left);
        if so it is taken back, so the request can finish its bookkeeping."""
        if not self.gone:
            return False
        if sys.version_info >= (3, 11):
            return self._task.uncancel() == 0
        return True

"""ForwardSlots: caps requests in flight to the upstream (per process), first come first served."""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from .errors import QueueTimeout

Release = Callable[[], None]
Observer = Callable[[int, int], None]


class ForwardSlots:
    """A FIFO semaphore with a queue timeout.

    A released slot is handed straight to the oldest waiter, so a newcomer can never overtake
    the queue; a waiter that times out or is cancelled after being handed a slot passes it on."""

    def __init__(self, capacity: int, queue_timeout: float, observer: Observer | None = None) -> None:
        self.capacity = capacity
        self.queue_timeout = queue_timeout
        self.observer = observer               # told (in_use, waiting) after every change
        self.in_use = 0
        self.peak = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self.waiters)               # served and abandoned waiters leave the deque

    def _changed(self) -> None:
        if self.observer is not None:
            self.observer(self.in_use, len(self.waiters))

    async def acquire(self, on_wait: Callable[[], None] | None = None) -> Release:
        """Wait for a slot; returns an idempotent release. Raises QueueTimeout after the timeout;
        `on_wait` is called when the caller has to queue, a cancelled waiter leaves the queue."""
        if self.in_use < self.capacity and not self.waiters:
            self.in_use += 1
            self.peak = max(self.peak, self.in_use)
            self._changed()
            return self._releaser()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self._changed()
        if on_wait is not None:
            on_wait()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()                   # handed a slot as we gave up: pass it on
            else:
                waiter.cancel()
                self._drop(waiter)
                self._changed()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise QueueTimeout(
                f"No upstream slot freed within {self.queue_timeout:g} s; try again shortly.",
                retry_after=max(1, round(self.queue_timeout))) from None
        return self._releaser()

    def _releaser(self) -> Release:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release()
        return release

    def _release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)           # the slot changes hands; in_use stays
                self._changed()
                return
        self.in_use -= 1
        self._changed()

    def _drop(self, waiter: asyncio.Future[None]) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

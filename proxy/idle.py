"""Hypercorn 0.18 keeps a keep-alive connection open for keep_alive_timeout after its client
closed it; install() makes the server close it at once."""
from __future__ import annotations

from hypercorn.asyncio import run as hypercorn_run
from hypercorn.asyncio.tcp_server import TCPServer


class PromptCloseTCPServer(TCPServer):
    """Hypercorn's TCPServer, closing as soon as reading has ended.

    Hypercorn reads the client's EOF at once, but between requests nothing acts on it: the
    keep-alive timer task keeps the connection's task group, and so its socket (in CLOSE-WAIT)
    and fd, alive until keep_alive_timeout. Once reading has ended no request can follow, so
    the timer is stopped; a request still in progress runs on (the timer is off meanwhile)."""

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()


def install() -> None:
    """Make this process's Hypercorn asyncio (and uvloop) workers serve with the class above;
    fails loudly if an upgraded Hypercorn no longer looks the class up there."""
    if getattr(hypercorn_run, "TCPServer", None) not in (TCPServer, PromptCloseTCPServer):
        raise RuntimeError("hypercorn.asyncio.run.TCPServer is gone: revisit proxy/idle.py")
    setattr(hypercorn_run, "TCPServer", PromptCloseTCPServer)   # noqa: B010 - not re-exported

"""Run the demo backend: ``python -m backend``.

Configuration comes from the environment: ``BACKEND_HOST`` (default
127.0.0.1) and ``BACKEND_PORT`` (default 8001).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config

from backend.app import create_app

log = logging.getLogger("backend")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001


def parse_port(raw: str) -> int | None:
    """Return ``raw`` as a TCP port, or None if it is not an integer in 1..65535."""
    try:
        port = int(raw)
    except ValueError:
        return None
    return port if 1 <= port <= 65535 else None


async def _serve(host: str, port: int) -> None:
    """Serve the app until SIGINT or SIGTERM arrives, then shut down gracefully."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    # Hypercorn's own access log is noisy for a demo; errors still go to stderr.
    config.accesslog = None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Handling the signals on the loop (instead of KeyboardInterrupt) lets
        # Hypercorn finish its shutdown and the process exit with status 0.
        loop.add_signal_handler(sig, stop.set)

    log.info("backend listening on http://%s:%d", host, port)
    await serve(create_app(), config, shutdown_trigger=stop.wait)


def main() -> int:
    """Entry point; returns the process exit status."""
    host = os.environ.get("BACKEND_HOST", DEFAULT_HOST)
    raw_port = os.environ.get("BACKEND_PORT", str(DEFAULT_PORT))
    port = parse_port(raw_port)
    if port is None:
        print(
            f"backend: BACKEND_PORT must be an integer port 1-65535, got {raw_port!r}",
            file=sys.stderr,
        )
        return 2

    # Configure only our logger: a root handler would also re-print every
    # line Hypercorn already logs through its own handler.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        import uvloop
    except ImportError:
        # uvloop is only a speed-up; the stdlib loop works the same.
        asyncio.run(_serve(host, port))
    else:
        uvloop.run(_serve(host, port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

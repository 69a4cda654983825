"""The floor: a bare ASGI app answering every request with the upstream's small body, served by
Hypercorn with the gateway's own Hypercorn configuration (same worker class, keep-alive, limits).

No gateway can be faster than the server it runs in, so gateway req/s divided by this app's
req/s is the share of the server's capacity the gateway logic leaves.

`python -m bench.floor --port N [--host 127.0.0.1]`; SIGTERM or SIGINT stops it."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from bench.upstream import SMALL_BODY

HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(SMALL_BODY)).encode())]
START = {"type": "http.response.start", "status": 200, "headers": HEADERS}
BODY = {"type": "http.response.body", "body": SMALL_BODY, "more_body": False}


async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
              send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "http":
        return
    await send(START)
    await send(BODY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    from hypercorn.run import run

    from proxy.__main__ import hypercorn_config
    from proxy.settings import load_settings

    settings = load_settings({"GATEWAY_HOST": args.host, "GATEWAY_PORT": str(args.port),
                              "GATEWAY_WORKERS": "1", "LOG_LEVEL": "WARNING"}, dotenv=None)
    config = hypercorn_config(settings)          # the gateway's server settings, another app
    config.application_path = "bench.floor:app"
    return run(config)


if __name__ == "__main__":
    sys.exit(main())

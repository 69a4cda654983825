"""The floor: a bare ASGI app answering every request with the upstream's small body, served by
Hypercorn with the gateway's own Hypercorn configuration (same worker class, keep-alive, limits).

No gateway can be faster than the server it runs in, so gateway req/s divided by this app's
req/s is the share of the server's capacity the gateway logic leaves.

Two more variants measure what the server alone spends on the gateway's harder cases:
`--variant refusal` answers every request with the gateway's own 429 (its headers and problem
body, rendered by the gateway's code), `--variant sink` reads and discards the request body
before answering (the upload scenario without the forwarding).

`python -m bench.floor --port N [--host 127.0.0.1] [--variant plain|refusal|sink]`; SIGTERM or
SIGINT stops it."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from bench.upstream import SMALL_BODY

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
VARIANTS = ("plain", "refusal", "sink")

HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(SMALL_BODY)).encode())]
START = {"type": "http.response.start", "status": 200, "headers": HEADERS}
BODY = {"type": "http.response.body", "body": SMALL_BODY, "more_body": False}


def refusal_answer() -> tuple[dict[str, Any], dict[str, Any]]:
    """The gateway's 429 to a client over RATE_LIMIT=1 per 60 s, as its own code renders it,
    with a request id as the gateway adds one."""
    from proxy.limiter import Decision, RateLimiter
    from proxy.settings import load_settings

    settings = load_settings({"RATE_LIMIT": "1", "TIME_WINDOW": "60"}, dotenv=None)
    limiter = RateLimiter(None, settings)  # type: ignore[arg-type]  # renders only, no Redis
    decision = Decision(False, 0, 59, limiter.headers.for_decision(0, 59))
    status, headers, body = limiter.answer(decision)
    headers = [*headers, (b"x-request-id", b"0" * 32)]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "http":
        await send(START)
        await send(BODY)


_refusal: list[dict[str, Any]] = []          # rendered at start-up, only by that variant


async def refusal(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        _refusal[:] = refusal_answer()          # the plain floor never imports the gateway
        await _lifespan(receive, send)
    elif scope["type"] == "http":
        await send(_refusal[0])
        await send(_refusal[1])


async def sink(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "http":
        while (await receive()).get("more_body"):
            pass
        await send(START)
        await send(BODY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--variant", choices=VARIANTS, default="plain",
                        help="plain: constant 200 (the floor); refusal: the gateway's 429; "
                             "sink: read the request body, then the constant 200")
    args = parser.parse_args(argv)

    from hypercorn.run import run

    from proxy.__main__ import hypercorn_config
    from proxy.settings import load_settings

    settings = load_settings({"GATEWAY_HOST": args.host, "GATEWAY_PORT": str(args.port),
                              "GATEWAY_WORKERS": "1", "LOG_LEVEL": "WARNING"}, dotenv=None)
    config = hypercorn_config(settings)          # the gateway's server settings, another app
    config.application_path = f"bench.floor:{'app' if args.variant == 'plain' else args.variant}"
    return run(config)


if __name__ == "__main__":
    sys.exit(main())

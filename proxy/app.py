"""create_app(): the Quart app (/health, /metrics, errors, lifecycle) around the gateway's
ASGI-level catch-all route. No request logic lives here."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quart import Quart, Response
from werkzeug.exceptions import HTTPException

from . import idle, server
from .gateway import Gateway, Receive, Scope, Send
from .logs import configure_from
from .metrics import CONTENT_TYPE
from .settings import Settings, load_settings

OWN_PATHS = frozenset({"/health", "/metrics"})


class ProxyRoute:
    """ASGI callable in front of Quart: every HTTP request except the gateway's own paths goes
    straight to Gateway.handle; lifespan and /health, /metrics go to Quart."""

    def __init__(self, gateway: Gateway, quart_asgi: Any) -> None:
        self.gateway = gateway
        self.quart_asgi = quart_asgi

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.quart_asgi(scope, receive, send)
            return
        path: str = scope["path"]
        if path[:1] != "/":               # absolute form: the gateway's own paths stay its own
            path = "/" + path.partition("://")[2].partition("/")[2]
            if path in OWN_PATHS:
                scope = {**scope, "path": path, "raw_path": path.encode()}
        if path in OWN_PATHS:
            await self.quart_asgi(scope, receive, send)
        else:
            await self.gateway.handle(scope, receive, send)


def create_app(settings: Settings | None = None) -> Quart:
    """The gateway as an ASGI app; settings are loaded from the environment when not given."""
    if settings is None:                              # a Hypercorn worker: configure it fully
        settings = load_settings(os.environ, Path(".env"))
        configure_from(settings)
    idle.install()                                    # before the worker accepts connections
    server.install()                                  # a spawned worker's Hypercorn, too
    gateway = Gateway(settings)
    app = Quart(__name__)
    app.config.update(MAX_CONTENT_LENGTH=64 * 1024, BODY_TIMEOUT=10, RESPONSE_TIMEOUT=10)
    app.extensions["gateway"] = gateway
    app.asgi_app = ProxyRoute(gateway, app.asgi_app)  # type: ignore[method-assign,assignment]

    @app.while_serving
    async def lifecycle() -> Any:
        await gateway.start()
        yield
        await gateway.close()

    @app.get("/health")
    async def health() -> tuple[dict[str, Any], int]:
        state = await gateway.health.check()
        total, blocked = gateway.metrics.totals()
        return {
            "status": "OK" if state.ok else "DEGRADED",
            "redis_status": "Connected" if state.redis else "Disconnected",
            "backend_status": "Connected" if state.backend else "Disconnected",
            "total_requests": total,
            "blocked_requests": blocked,
        }, 200 if state.ok else 503

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), content_type=CONTENT_TYPE)

    @app.errorhandler(HTTPException)
    async def http_error(err: HTTPException) -> Response:
        problem = {"type": "about:blank", "title": err.name, "status": err.code,
                   "detail": err.description}
        return Response(json.dumps(problem), status=err.code or 500,
                        content_type="application/problem+json")

    return app

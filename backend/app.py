"""Quart application for the demo upstream service.

The data lives in memory and is per process: it only exists so the gateway
has something realistic (lookups, 404s, writes, slow calls) to sit in front of.
"""

from __future__ import annotations

import asyncio
import copy
import math
from typing import Any

from quart import Quart, jsonify, request
from quart.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

MAX_BODY_BYTES = 1024 * 1024
SLOW_DEFAULT_SECONDS = 1.0
SLOW_MAX_SECONDS = 60.0

_SEED_USERS: dict[int, dict[str, Any]] = {
    1: {"id": 1, "name": "Alice", "email": "alice@example.com"},
    2: {"id": 2, "name": "Bob", "email": "bob@example.com"},
    3: {"id": 3, "name": "Carol", "email": "carol@example.com"},
}

_PRODUCTS: list[dict[str, Any]] = [
    {"id": 1, "name": "Widget", "price": 9.99},
    {"id": 2, "name": "Gadget", "price": 24.5},
    {"id": 3, "name": "Gizmo", "price": 99.0},
]

_ENDPOINTS: list[str] = [
    "GET /",
    "GET /users/",
    "POST /users/",
    "GET /users/<id>",
    "GET /products/",
    "GET /slow?delay=SECONDS",
    "GET /health",
]


def _error(status: int, error: str, detail: str) -> ResponseReturnValue:
    """Build the JSON error body every endpoint uses."""
    return jsonify({"error": error, "detail": detail}), status


def create_app() -> Quart:
    """Create the demo backend app with its own fresh in-memory user store."""
    app = Quart(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    # Per-app copy so tests (and several apps in one process) don't share writes.
    users: dict[int, dict[str, Any]] = copy.deepcopy(_SEED_USERS)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> ResponseReturnValue:
        # Keep framework errors (404 on unknown paths, 405, 413 ...) JSON too,
        # so clients behind the gateway never have to parse HTML.
        name = (exc.name or "error").lower().replace(" ", "_")
        return _error(exc.code or 500, name, exc.description or "")

    @app.get("/")
    async def index() -> ResponseReturnValue:
        """Describe the service and list its endpoints."""
        return {"message": "Demo backend", "endpoints": _ENDPOINTS}

    @app.get("/users/")
    async def list_users() -> ResponseReturnValue:
        """Return all users ordered by id."""
        return jsonify([users[uid] for uid in sorted(users)])

    @app.post("/users/")
    async def create_user() -> ResponseReturnValue:
        """Create a user from a JSON body with string ``name`` and ``email``."""
        data = await request.get_json(force=True, silent=True)
        if not isinstance(data, dict):
            return _error(400, "bad_request", "body must be a JSON object")
        name, email = data.get("name"), data.get("email")
        if not isinstance(name, str) or not name.strip():
            return _error(400, "bad_request", "'name' must be a non-empty string")
        if not isinstance(email, str) or "@" not in email:
            return _error(400, "bad_request", "'email' must be a string containing '@'")
        user_id = max(users, default=0) + 1
        user = {"id": user_id, "name": name.strip(), "email": email.strip()}
        users[user_id] = user
        return jsonify(user), 201

    @app.get("/users/<int:user_id>")
    async def get_user(user_id: int) -> ResponseReturnValue:
        """Return one user, or a JSON 404."""
        user = users.get(user_id)
        if user is None:
            return _error(404, "not_found", f"user {user_id} does not exist")
        return user

    @app.get("/products/")
    async def list_products() -> ResponseReturnValue:
        """Return the fixed product catalogue."""
        return jsonify(_PRODUCTS)

    @app.get("/slow")
    async def slow() -> ResponseReturnValue:
        """Sleep ``delay`` seconds (0..60) so the gateway's concurrency limits can be tried."""
        raw = request.args.get("delay")
        if raw is None:
            delay = SLOW_DEFAULT_SECONDS
        else:
            try:
                delay = float(raw)
            except ValueError:
                return _error(400, "bad_request", f"'delay' must be a number, got {raw!r}")
            # float() accepts "nan"/"inf"; neither is a meaningful sleep.
            if math.isnan(delay):
                return _error(400, "bad_request", f"'delay' must be a number, got {raw!r}")
            delay = min(max(delay, 0.0), SLOW_MAX_SECONDS)
        await asyncio.sleep(delay)
        return {"delay": delay}

    @app.get("/health")
    async def health() -> ResponseReturnValue:
        """Liveness probe."""
        return {"status": "OK"}

    return app

"""Tests for the demo upstream service in ``backend/``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from quart.testing import QuartClient

from backend.app import create_app

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_DEADLINE_S = 15.0
EXIT_DEADLINE_S = 10.0


@pytest.fixture
def client() -> QuartClient:
    """A test client for a fresh app, so in-memory writes don't leak between tests."""
    return create_app().test_client()


# --- endpoints -------------------------------------------------------------


@pytest.mark.asyncio
async def test_index(client: QuartClient) -> None:
    resp = await client.get("/")
    assert resp.status_code == 200
    body = await resp.get_json()
    assert body["message"] == "Demo backend"
    assert "GET /health" in body["endpoints"]


@pytest.mark.asyncio
async def test_health(client: QuartClient) -> None:
    resp = await client.get("/health")
    assert resp.status_code == 200
    assert await resp.get_json() == {"status": "OK"}


@pytest.mark.asyncio
async def test_get_user(client: QuartClient) -> None:
    resp = await client.get("/users/1")
    assert resp.status_code == 200
    user = await resp.get_json()
    assert set(user) == {"id", "name", "email"}
    assert user["id"] == 1


@pytest.mark.asyncio
async def test_get_unknown_user_is_json_404(client: QuartClient) -> None:
    resp = await client.get("/users/999")
    assert resp.status_code == 404
    body = await resp.get_json()
    assert body["error"] == "not_found"
    assert "999" in body["detail"]


@pytest.mark.asyncio
async def test_unknown_path_is_json_404(client: QuartClient) -> None:
    resp = await client.get("/no/such/thing")
    assert resp.status_code == 404
    assert (await resp.get_json())["error"] == "not_found"


@pytest.mark.asyncio
async def test_list_users(client: QuartClient) -> None:
    resp = await client.get("/users/")
    assert resp.status_code == 200
    users = await resp.get_json()
    assert [u["id"] for u in users] == [1, 2, 3]


@pytest.mark.asyncio
async def test_create_user(client: QuartClient) -> None:
    resp = await client.post("/users/", json={"name": "Dave", "email": "dave@example.com"})
    assert resp.status_code == 201
    created = await resp.get_json()
    assert created == {"id": 4, "name": "Dave", "email": "dave@example.com"}

    # The new user is visible through both read endpoints.
    assert await (await client.get("/users/4")).get_json() == created
    assert len(await (await client.get("/users/")).get_json()) == 4


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"data": "{not json", "headers": {"Content-Type": "application/json"}}, id="invalid-json"),
        pytest.param({}, id="empty-body"),
        pytest.param({"json": ["Dave", "dave@example.com"]}, id="not-an-object"),
        pytest.param({"json": {"email": "dave@example.com"}}, id="missing-name"),
        pytest.param({"json": {"name": "Dave"}}, id="missing-email"),
        pytest.param({"json": {"name": 5, "email": "dave@example.com"}}, id="name-not-string"),
    ],
)
async def test_create_user_rejects_bad_body(client: QuartClient, kwargs: dict[str, Any]) -> None:
    resp = await client.post("/users/", **kwargs)
    assert resp.status_code == 400
    body = await resp.get_json()
    assert body["error"] == "bad_request"
    assert body["detail"]
    # A rejected request must not have created anything.
    assert len(await (await client.get("/users/")).get_json()) == 3


@pytest.mark.asyncio
async def test_body_over_limit_is_413(client: QuartClient) -> None:
    assert create_app().config["MAX_CONTENT_LENGTH"] == 1024 * 1024
    resp = await client.post(
        "/users/", data=b"x" * (1024 * 1024 + 1), headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 413


@pytest.mark.asyncio
async def test_list_products(client: QuartClient) -> None:
    resp = await client.get("/products/")
    assert resp.status_code == 200
    products = await resp.get_json()
    assert len(products) >= 2
    assert all({"id", "name", "price"} <= set(p) for p in products)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("query", "expected"),
    [("?delay=0", 0.0), ("?delay=0.05", 0.05), ("?delay=-3", 0.0)],
)
async def test_slow(client: QuartClient, query: str, expected: float) -> None:
    start = time.monotonic()
    resp = await client.get(f"/slow{query}")
    elapsed = time.monotonic() - start
    assert resp.status_code == 200
    assert await resp.get_json() == {"delay": expected}
    assert elapsed >= expected


@pytest.mark.asyncio
async def test_slow_default_is_one_second(client: QuartClient) -> None:
    start = time.monotonic()
    resp = await client.get("/slow")
    assert resp.status_code == 200
    assert await resp.get_json() == {"delay": 1.0}
    assert time.monotonic() - start >= 1.0


@pytest.mark.asyncio
async def test_slow_clamps_to_sixty(client: QuartClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # Don't really wait a minute: record the requested sleep instead.
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("backend.app.asyncio.sleep", fake_sleep)
    resp = await client.get("/slow?delay=1000")
    assert resp.status_code == 200
    assert await resp.get_json() == {"delay": 60.0}
    assert slept == [60.0]


@pytest.mark.asyncio
@pytest.mark.parametrize("value", ["abc", "", "nan"])
async def test_slow_rejects_non_number(client: QuartClient, value: str) -> None:
    resp = await client.get("/slow", query_string={"delay": value})
    assert resp.status_code == 400
    assert (await resp.get_json())["error"] == "bad_request"


# --- python -m backend -----------------------------------------------------


def _free_port() -> int:
    """Ask the OS for a currently unused localhost port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_backend(port: str) -> subprocess.Popen[str]:
    """Start ``python -m backend`` from the repo root with BACKEND_PORT set."""
    env = {**os.environ, "BACKEND_HOST": "127.0.0.1", "BACKEND_PORT": port}
    return subprocess.Popen(
        [sys.executable, "-m", "backend"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    """Kill a still-running subprocess so a failing test never leaks it."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=EXIT_DEADLINE_S)


def test_module_serves_and_exits_cleanly_on_sigterm() -> None:
    port = _free_port()
    proc = _start_backend(str(port))
    try:
        url = f"http://127.0.0.1:{port}/health"
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        resp: httpx.Response | None = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"backend exited early: {proc.communicate()}"
            try:
                resp = httpx.get(url, timeout=0.5)
                break
            except httpx.TransportError:
                # Refused until Hypercorn has bound the port. This is only the
                # poll interval; readiness itself is decided by /health answering.
                time.sleep(0.05)
        assert resp is not None, "backend did not answer /health before the deadline"
        assert resp.status_code == 200
        assert resp.json() == {"status": "OK"}

        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=EXIT_DEADLINE_S)
        assert proc.returncode == 0, stderr
        assert f"backend listening on http://127.0.0.1:{port}" in stderr
        assert "Traceback" not in stderr
    finally:
        _stop(proc)


@pytest.mark.parametrize("bad_port", ["x", "0", "65536", "80.5"])
def test_module_rejects_bad_port(bad_port: str) -> None:
    proc = _start_backend(bad_port)
    try:
        _, stderr = proc.communicate(timeout=EXIT_DEADLINE_S)
        assert proc.returncode == 2
        lines = stderr.splitlines()
        assert lines == [
            f"backend: BACKEND_PORT must be an integer port 1-65535, got '{bad_port}'"
        ]
    finally:
        _stop(proc)

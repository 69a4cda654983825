"""Fixtures: one real redis-server per session, a real upstream and the gateway on loopback."""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from proxy.app import create_app
from proxy.embedded_redis import RedisProcess, free_port
from proxy.gateway import Gateway
from proxy.settings import Settings, load_settings
from tests.servers import gateway_config, serving
from tests.upstream import Upstream


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """A private redis-server on a free port for the whole session (never 6379)."""
    server = RedisProcess(port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    await client.script_flush()
    yield client
    await client.aclose()


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    app = Upstream()
    async with serving(app) as url:
        try:
            yield app, url
        finally:                               # let held handlers finish before shutdown
            app.release.set()
            app.proceed.set()


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(redis_server: RedisProcess, upstream: tuple[Upstream, str]) -> SettingsFactory:
    """Settings from env-style overrides, pointed at the test redis and upstream."""
    def make(**env: Any) -> Settings:
        base = {"REDIS_URL": redis_server.url, "UPSTREAM_BACKEND_URL": upstream[1],
                "RATE_LIMIT": "100", "TIME_WINDOW": "60", "LOG_LEVEL": "DEBUG"}
        return load_settings({**base, **{k: str(v) for k, v in env.items()}}, dotenv=None)
    return make


@dataclass
class RunningGateway:
    url: str
    gateway: Gateway
    upstream: Upstream

    def client(self, source: str = "127.0.0.1", **kwargs: Any) -> httpx.AsyncClient:
        """An HTTP client whose requests come from `source` (a distinct client IP)."""
        transport = httpx.AsyncHTTPTransport(local_address=source)
        return httpx.AsyncClient(base_url=self.url, transport=transport, timeout=30, **kwargs)


GatewayFactory = Callable[..., Any]


@pytest.fixture
def start_gateway(make_settings: SettingsFactory, upstream: tuple[Upstream, str],
                  redis: Redis) -> GatewayFactory:
    """`async with start_gateway(RATE_LIMIT=3) as gw:` runs the real app on a free port."""
    @asynccontextmanager
    async def start(settings: Settings | None = None, **env: Any) -> AsyncIterator[RunningGateway]:
        settings = settings or make_settings(**env)
        app = create_app(settings)
        async with serving(app, gateway_config(settings)) as url:
            yield RunningGateway(url, app.extensions["gateway"], upstream[0])
    return start

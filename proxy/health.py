"""Dependency probes behind /health: short timeouts, one probe at a time, briefly cached so a
flood of /health requests cannot become a flood on Redis or the upstream."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .pipeline import lost


@dataclass(frozen=True, slots=True)
class Health:
    redis: bool
    backend: bool

    @property
    def ok(self) -> bool:
        return self.redis and self.backend


class HealthProbe:
    """Probes Redis (PING) and the upstream (any HTTP answer counts as reachable)."""

    def __init__(self, redis: Redis, client: httpx.AsyncClient, upstream: httpx.URL,
                 timeout: float = 1.0, cache_for: float = 0.5) -> None:
        self.redis = redis
        self.client = client
        self.upstream = upstream.copy_with(raw_path=upstream.raw_path or b"/")
        self.timeout = timeout
        self.cache_for = cache_for
        self._last: tuple[float, Health] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> Health:
        async with self._lock:                       # concurrent callers share one probe
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < self.cache_for:
                return self._last[1]
            redis_ok, backend_ok = await asyncio.gather(self._redis(), self._backend())
            health = Health(redis_ok, backend_ok)
            self._last = (time.monotonic(), health)
            return health

    async def _redis(self) -> bool:
        """PING, connecting included, within one timeout."""
        try:
            return bool(await asyncio.wait_for(self._ping(), self.timeout))
        except (RedisError, asyncio.TimeoutError):
            return False
        except (OSError, RuntimeError) as exc:
            lost(exc)                  # raises unless a transport a reset closed (uvloop)
            return False

    async def _ping(self) -> bool:
        """A pooled socket the server reset while it sat idle fails its next command: that one
        failure gets a second PING, on a fresh connection."""
        try:
            return bool(await self.redis.ping())
        except RedisConnectionError:
            pass
        except (OSError, RuntimeError) as exc:
            lost(exc)
        return bool(await self.redis.ping())

    async def _backend(self) -> bool:
        try:
            async with self.client.stream("GET", self.upstream, timeout=self.timeout):
                return True
        except httpx.HTTPError:
            return False

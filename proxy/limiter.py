"""RateLimiter: one EVALSHA per request decides, counts and reports the window's reset.

Whether a Redis failure admits (fail open) or refuses (fail closed) is decided here only."""
from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import LimiterUnavailable, RateLimited
from .headers import Header, RateLimitHeaders
from .metrics import Metrics
from .pipeline import Pipeline
from .scripts import LuaScript
from .settings import Settings

log = logging.getLogger("proxy.limiter")
SCRIPT = "fixed_window.v1"
KEY_TAG = "fw1"                       # names the script version that owns the key layout
DENY_CACHE_SIZE = 65536               # refused clients remembered per process (~10 MiB at most)
REFUSAL_CACHE_SIZE = 4096             # rendered 429s kept, one per retry delay in seconds
DENY_MARGIN = 0.01                    # seconds a local refusal ends before the Redis window


class DenyCache(OrderedDict[str, float]):
    """Refused clients and the monotonic time their window ends, oldest first, bounded in size:
    each add drops lapsed entries from the oldest end, then the oldest while still full."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def add(self, client: str, until: float) -> None:
        # an OrderedDict, not a dict: a dict's first key after many deletions at its front is
        # found by skipping every hole they left, so evicting the oldest would not be O(1)
        self.pop(client, None)
        now = time.monotonic()
        while self:
            oldest = next(iter(self))
            if len(self) < self.capacity and self[oldest] > now:
                break
            del self[oldest]
        self[client] = until


@dataclass(frozen=True, slots=True)
class Decision:
    """The limiter's answer; `headers` go on every response of the limited path."""

    allowed: bool
    remaining: int
    reset: int                         # whole seconds until the window ends, >= 1
    headers: list[Header] = field(default_factory=list)
    local: bool = False                # answered from the deny cache, without Redis


class RateLimiter:
    """Fixed-window limit per client, shared by every replica through Redis."""

    def __init__(self, redis: Redis | Pipeline, settings: Settings, script: LuaScript | None = None,
                 metrics: Metrics | None = None) -> None:
        self.redis = redis
        self.script = script or LuaScript.named(SCRIPT)
        self.metrics = metrics
        if metrics is not None:
            self.script.on_reload = metrics.script_reloads.inc
        self.prefix = settings.redis_key_prefix
        self.limit = settings.rate_limit
        self.window = settings.time_window
        self.args = (settings.rate_limit, settings.time_window * 1000)
        self.fail_open = settings.rate_limit_fail_mode == "open"
        self.headers = RateLimitHeaders(settings.rate_limit, settings.time_window)
        self.unknown = Decision(True, settings.rate_limit, settings.time_window,
                                list(self.headers.fixed))
        self.errors = 0
        self.available = True
        self.denied = DenyCache(DENY_CACHE_SIZE)
        self.local_denials = 0
        self._answers: dict[int, tuple[int, list[Header], bytes]] = {}

    def key(self, client: str) -> str:
        return f"{self.prefix}:{KEY_TAG}:{{{client}}}"

    async def check(self, client: str) -> Decision:
        """Count this request for `client` and decide; raises LimiterUnavailable (fail closed).

        A client Redis has refused is refused locally until its window ends: in a fixed window
        the count only grows until the key expires, so no replica could decide otherwise."""
        asked = time.monotonic()
        until = self.denied.get(client)
        if until is not None:
            if until > asked:
                self.local_denials += 1
                reset = math.ceil(until - asked)
                return Decision(False, 0, reset, self.headers.for_decision(0, reset), local=True)
            del self.denied[client]
        try:
            allowed, remaining, ttl_ms = await self.script.run(
                self.redis, (self.key(client),), self.args)
        except RedisError as exc:
            return self._failed(exc)
        if not self.available:
            self.available = True
            log.warning("redis is answering again; rate limits enforced")
        if not allowed:
            # from before the call, less a margin for Redis's cached clock: the local entry
            # lapses no later than the Redis key
            self.denied.add(client, asked + ttl_ms / 1000 - DENY_MARGIN)
        reset = max(1, math.ceil(ttl_ms / 1000))
        return Decision(bool(allowed), remaining, reset,
                        self.headers.for_decision(remaining, reset))

    def reject(self, decision: Decision) -> RateLimited:
        """The 429 for a refused decision."""
        return RateLimited(
            f"Rate limit of {self.limit} requests per {self.window} s exceeded; "
            f"retry in {decision.reset} s.",
            retry_after=decision.reset, headers=decision.headers)

    def answer(self, decision: Decision) -> tuple[int, list[Header], bytes]:
        """The rendered 429 (status, headers, body) for a refused decision, built once per
        retry delay: under a flood the same few answers go out thousands of times a second.
        Callers add their own headers to a copy, never to the list returned."""
        rendered = self._answers.get(decision.reset)
        if rendered is None:
            if len(self._answers) >= REFUSAL_CACHE_SIZE:
                self._answers.clear()
            rendered = self._answers[decision.reset] = self.reject(decision).render()
        return rendered

    def _failed(self, exc: RedisError) -> Decision:
        self.errors += 1
        if self.metrics is not None:
            self.metrics.redis_errors.labels(error_kind(exc)).inc()
        if self.available:
            self.available = False
            log.error("redis unavailable for rate limiting (%s: %s); failing %s",
                      type(exc).__name__, exc, "open" if self.fail_open else "closed")
        if self.fail_open:
            return self.unknown
        raise LimiterUnavailable("The rate limiter cannot reach its store; try again shortly.",
                                 retry_after=1) from exc


def error_kind(exc: RedisError) -> str:
    """A bounded label for a Redis failure."""
    if isinstance(exc, RedisTimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError):
        return "connection"
    if isinstance(exc, ResponseError):
        return "response"
    return "other"

"""RateLimiter against a real redis-server: counting, windows, keys, sharing and failure modes."""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.embedded_redis import RedisProcess, free_port
from proxy.errors import LimiterUnavailable, RateLimited
from proxy.gateway import make_redis
from proxy.limiter import DENY_CACHE_SIZE, DenyCache, RateLimiter
from proxy.settings import Settings

SettingsFactory = Callable[..., Settings]


def key(client: str, prefix: str = "rl") -> str:
    return f"{prefix}:fw1:{{{client}}}"


async def wait_until_gone(redis: Redis, name: str, deadline: float = 10.0) -> None:
    """Poll (with a deadline) until redis has expired `name`."""
    end = time.monotonic() + deadline
    while await redis.exists(name):
        if time.monotonic() > end:
            raise AssertionError(f"{name} did not expire within {deadline} s")
        await asyncio.sleep(0.02)


async def test_admits_exactly_rate_limit_then_refuses(redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=5, TIME_WINDOW=60))
    decisions = [await limiter.check("198.51.100.7") for _ in range(8)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    assert await redis.get(key("198.51.100.7")) == b"5"      # rejected hits are not counted


async def test_remaining_counts_down_to_zero(redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=5, TIME_WINDOW=60))
    decisions = [await limiter.check("c") for _ in range(7)]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]


async def test_reset_is_between_one_second_and_window(redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=3, TIME_WINDOW=60))
    for _ in range(6):
        decision = await limiter.check("c")
        assert 1 <= decision.reset <= 60


async def test_reset_is_ttl_rounded_up_to_whole_seconds(redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=5, TIME_WINDOW=60))
    await limiter.check("c")
    await redis.pexpire(key("c"), 1_500)
    decision = await limiter.check("c")
    after = await redis.pttl(key("c"))
    if after > 0:                                # the key outlived the check (it always should)
        assert math.ceil(after / 1000) <= decision.reset <= 2


async def test_reset_is_at_least_one_second_near_window_end(
        redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=1, TIME_WINDOW=60))
    await limiter.check("c")
    await redis.pexpire(key("c"), 900)
    decision = await limiter.check("c")
    if not decision.allowed:                     # still in the old window: under a second left
        assert decision.reset == 1
        assert dict(decision.headers)[b"x-ratelimit-reset"] == b"1"


async def test_decision_headers_match_decision(redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=5, TIME_WINDOW=60))
    await limiter.check("c")
    decision = await limiter.check("c")
    headers = dict(decision.headers)
    assert headers[b"ratelimit-policy"] == b'"default";q=5;w=60'
    assert headers[b"ratelimit"] == b'"default";r=3;t=%d' % decision.reset
    assert headers[b"x-ratelimit-remaining"] == b"3"
    assert headers[b"x-ratelimit-reset"] == b"%d" % decision.reset


async def test_key_uses_prefix_tag_and_hash_tag_and_always_has_ttl(
        redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=3, TIME_WINDOW=60))
    assert limiter.key("203.0.113.9") == "rl:fw1:{203.0.113.9}"
    for _ in range(6):                                       # counted and rejected calls
        await limiter.check("203.0.113.9")
        assert await redis.pttl("rl:fw1:{203.0.113.9}") > 0
    assert await redis.keys("*") == [b"rl:fw1:{203.0.113.9}"]


async def test_window_starts_at_first_counted_request(redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=5, TIME_WINDOW=60))
    first = await limiter.check("c")
    assert first.reset == 60                                 # the full window, from now
    pttl = await redis.pttl(key("c"))
    assert 30_000 < pttl <= 60_000


async def test_counted_request_does_not_restart_window(redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=5, TIME_WINDOW=60))
    await limiter.check("c")
    await redis.pexpire(key("c"), 20_000)                    # as if 40 s had passed
    decision = await limiter.check("c")
    assert decision.allowed
    assert await redis.pttl(key("c")) <= 20_000
    assert decision.reset <= 20


async def test_rejected_request_does_not_extend_window(redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=2, TIME_WINDOW=60))
    await limiter.check("c")
    await limiter.check("c")
    await redis.pexpire(key("c"), 20_000)
    before = await redis.pttl(key("c"))
    for _ in range(3):
        decision = await limiter.check("c")
        assert not decision.allowed
        assert decision.reset <= 20
    assert 0 < await redis.pttl(key("c")) <= before


async def test_key_without_ttl_is_repaired_on_counted_request(
        redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=5, TIME_WINDOW=60))
    await redis.set(key("c"), 2)                             # no expiry: would block forever
    assert await redis.pttl(key("c")) == -1
    decision = await limiter.check("c")
    assert decision.allowed and decision.remaining == 2
    assert 0 < await redis.pttl(key("c")) <= 60_000
    assert 1 <= decision.reset <= 60


async def test_exhausted_key_without_ttl_is_repaired_on_rejected_request(
        redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=5, TIME_WINDOW=60))
    await redis.set(key("c"), 5)
    decision = await limiter.check("c")
    assert not decision.allowed and decision.remaining == 0
    assert 0 < await redis.pttl(key("c")) <= 60_000
    assert 1 <= decision.reset <= 60


async def test_after_window_expires_client_admitted_with_fresh_budget(
        redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=2, TIME_WINDOW=1))
    assert [(await limiter.check("c")).allowed for _ in range(3)] == [True, True, False]
    await wait_until_gone(redis, key("c"))
    decision = await limiter.check("c")
    assert decision.allowed
    assert decision.remaining == 1
    assert decision.reset == 1


async def test_two_limiters_on_same_redis_share_one_budget(
        redis: Redis, redis_server: RedisProcess, make_settings: SettingsFactory) -> None:
    settings = make_settings(RATE_LIMIT=4, TIME_WINDOW=60)
    other_client = Redis.from_url(redis_server.url)
    try:
        a, b = RateLimiter(redis, settings), RateLimiter(other_client, settings)
        results = []
        for i in range(8):
            results.append((await (a if i % 2 == 0 else b).check("c")).allowed)
        assert results.count(True) == 4
        assert results == [True] * 4 + [False] * 4
    finally:
        await other_client.aclose()


async def test_concurrent_checks_never_admit_more_than_limit(
        redis: Redis, redis_server: RedisProcess, make_settings: SettingsFactory) -> None:
    settings = make_settings(RATE_LIMIT=10, TIME_WINDOW=60)
    clients = [Redis.from_url(redis_server.url) for _ in range(3)]
    try:
        limiters = [RateLimiter(c, settings) for c in clients]
        decisions = await asyncio.gather(*(limiters[i % 3].check("c") for i in range(40)))
        assert sum(d.allowed for d in decisions) == 10
        assert sorted(d.remaining for d in decisions if d.allowed) == list(range(10))
    finally:
        for c in clients:
            await c.aclose()


async def test_distinct_clients_have_distinct_budgets(redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=2, TIME_WINDOW=60))
    for _ in range(3):
        await limiter.check("198.51.100.1")
    assert not (await limiter.check("198.51.100.1")).allowed
    other = await limiter.check("198.51.100.2")
    assert other.allowed and other.remaining == 1
    v6 = await limiter.check("2001:db8::1")
    assert v6.allowed and v6.remaining == 1


async def test_key_prefix_respected(redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(REDIS_KEY_PREFIX="gw-test", RATE_LIMIT=2))
    await limiter.check("c")
    assert await redis.exists("gw-test:fw1:{c}") == 1
    assert await redis.exists(key("c")) == 0
    assert await redis.keys("*") == [b"gw-test:fw1:{c}"]


async def test_different_prefixes_do_not_share_budgets(redis: Redis, make_settings: SettingsFactory) -> None:
    a = RateLimiter(redis, make_settings(REDIS_KEY_PREFIX="a", RATE_LIMIT=1))
    b = RateLimiter(redis, make_settings(REDIS_KEY_PREFIX="b", RATE_LIMIT=1))
    assert (await a.check("c")).allowed
    assert (await b.check("c")).allowed
    assert not (await a.check("c")).allowed


async def test_reject_builds_429_with_retry_after_and_headers(
        redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=1, TIME_WINDOW=60))
    await limiter.check("c")
    decision = await limiter.check("c")
    assert not decision.allowed
    error = limiter.reject(decision)
    assert isinstance(error, RateLimited)
    assert error.status == 429
    assert error.retry_after == decision.reset
    assert error.headers == decision.headers
    status, headers, _ = error.render()
    assert status == 429
    rendered = dict(headers)
    assert rendered[b"retry-after"] == b"%d" % decision.reset
    assert rendered[b"ratelimit"] == b'"default";r=0;t=%d' % decision.reset
    assert rendered[b"x-ratelimit-remaining"] == b"0"


# --- Redis failures ------------------------------------------------------------------------

@pytest.fixture
async def own_redis() -> AsyncIterator[RedisProcess]:
    """A redis-server only this test uses, so it can be stopped and restarted."""
    server = RedisProcess(port=free_port())
    server.start()
    yield server
    server.stop()


async def stopped(server: RedisProcess, make_settings: SettingsFactory, **env: Any
                  ) -> tuple[RateLimiter, Redis, Settings]:
    settings = make_settings(REDIS_URL=server.url, RATE_LIMIT=2, TIME_WINDOW=60, **env)
    client = make_redis(settings)                 # the gateway's own client: fails fast
    limiter = RateLimiter(client, settings)
    assert (await limiter.check("c")).allowed     # it works while redis is up
    server.stop()
    return limiter, client, settings


async def test_fail_open_admits_and_counts_errors(own_redis: RedisProcess,
                                                  make_settings: SettingsFactory) -> None:
    limiter, client, _ = await stopped(own_redis, make_settings, RATE_LIMIT_FAIL_MODE="open")
    try:
        first = await limiter.check("c")
        second = await limiter.check("c")
        third = await limiter.check("c")          # beyond the limit of 2: still admitted
        assert first.allowed and second.allowed and third.allowed
        assert limiter.errors == 3
        assert limiter.available is False
        assert first.remaining == 2 and first.reset == 60
    finally:
        await client.aclose()


async def test_fail_closed_raises_limiter_unavailable(own_redis: RedisProcess,
                                                      make_settings: SettingsFactory) -> None:
    limiter, client, _ = await stopped(own_redis, make_settings, RATE_LIMIT_FAIL_MODE="closed")
    try:
        with pytest.raises(LimiterUnavailable) as info:
            await limiter.check("c")
        assert info.value.status == 503
        assert info.value.retry_after == 1
        assert limiter.errors == 1
        with pytest.raises(LimiterUnavailable):
            await limiter.check("c")
        assert limiter.errors == 2
    finally:
        await client.aclose()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_enforcement_resumes_when_redis_returns(own_redis: RedisProcess,
                                                      make_settings: SettingsFactory,
                                                      mode: str) -> None:
    limiter, client, _ = await stopped(own_redis, make_settings, RATE_LIMIT_FAIL_MODE=mode)
    port = int(own_redis.url.rsplit(":", 1)[1].split("/")[0])
    replacement = RedisProcess(port=port)         # same address, empty data, no scripts
    try:
        try:
            await limiter.check("c")
        except LimiterUnavailable:
            assert mode == "closed"
        assert limiter.errors == 1
        replacement.start()
        end = time.monotonic() + 10
        while not limiter.available:               # poll: the pool reconnects on next use
            if time.monotonic() > end:
                raise AssertionError("the limiter never saw redis again")
            try:
                await limiter.check("c")
            except LimiterUnavailable:
                pass
            if not limiter.available:
                await asyncio.sleep(0.02)
        assert limiter.available is True
        await limiter.redis.delete(key("c"))
        results = [(await limiter.check("c")).allowed for _ in range(4)]
        assert results == [True, True, False, False]
        assert limiter.script.reloads >= 1        # the new server needed the script loaded
    finally:
        await client.aclose()
        replacement.stop()


# --- local deny cache ----------------------------------------------------------------------------

async def evalsha_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_refused_client_is_refused_locally_until_the_window_ends(
        redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=2, TIME_WINDOW=1))
    assert [(await limiter.check("c")).allowed for _ in range(3)] == [True, True, False]
    before = await evalsha_calls(redis)
    refusals = [await limiter.check("c") for _ in range(20)]
    assert await evalsha_calls(redis) == before            # not one more round trip
    assert all(not d.allowed and d.remaining == 0 and 1 <= d.reset <= 1 for d in refusals)
    assert limiter.local_denials == 20
    end = time.monotonic() + 10
    while not (await limiter.check("c")).allowed:          # the window ends: Redis decides again
        assert time.monotonic() < end, "never admitted again"
        await asyncio.sleep(0.02)
    assert await evalsha_calls(redis) > before


async def test_local_refusal_never_outlives_the_redis_window(
        redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=1, TIME_WINDOW=60))
    await limiter.check("c")
    await limiter.check("c")
    pttl = await redis.pttl(key("c"))
    assert limiter.denied["c"] - time.monotonic() <= pttl / 1000


async def test_other_clients_are_not_refused_by_the_cache(
        redis: Redis, make_settings: SettingsFactory) -> None:
    limiter = RateLimiter(redis, make_settings(RATE_LIMIT=1, TIME_WINDOW=60))
    await limiter.check("a")
    assert not (await limiter.check("a")).allowed
    assert (await limiter.check("b")).allowed


def test_deny_cache_drops_lapsed_entries_first_then_the_oldest() -> None:
    cache = DenyCache(3)
    now = time.monotonic()
    cache.add("lapsed", now - 1)
    cache.add("old", now + 100)                            # the lapsed entry goes, room or not
    assert list(cache) == ["old"]
    cache.add("mid", now + 100)
    cache.add("new", now + 100)
    cache.add("newer", now + 100)                          # full, none lapsed: the oldest goes
    assert list(cache) == ["mid", "new", "newer"]
    cache.add("mid", now + 200)                            # refused again: now the youngest
    cache.add("newest", now + 100)
    assert list(cache) == ["newer", "mid", "newest"] and cache["mid"] == now + 200


def test_deny_cache_keeps_a_live_refused_client_while_there_is_room() -> None:
    cache = DenyCache(4)
    now = time.monotonic()
    cache.add("refused", now + 100)
    for client in ("a", "b", "c"):
        cache.add(client, now + 100)
    assert cache.get("refused") == now + 100 and len(cache) == 4


class CountingDenyCache(DenyCache):
    """Counts every entry a DenyCache method reads, yields or removes, and fails as soon as
    more than `budget` were touched."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.touched = 0
        self.budget: float = math.inf

    def touch(self) -> None:
        self.touched += 1
        if self.touched > self.budget:
            raise AssertionError(f"touched more than {self.budget} entries")

    def __iter__(self) -> Any:
        for client in super().__iter__():
            self.touch()
            yield client

    def items(self) -> Any:
        for item in super().items():
            self.touch()
            yield item

    def __getitem__(self, client: str) -> float:
        self.touch()
        return super().__getitem__(client)

    def __delitem__(self, client: str) -> None:
        self.touch()
        super().__delitem__(client)

    def pop(self, client: str, *default: Any) -> Any:
        self.touch()
        return super().pop(client, *default)


def test_adding_to_a_full_deny_cache_touches_a_bounded_number_of_entries() -> None:
    cache = CountingDenyCache(DENY_CACHE_SIZE)
    until = time.monotonic() + 3600
    for i in range(DENY_CACHE_SIZE):
        cache.add(f"old-{i}", until)
    cache.touched, cache.budget = 0, 5 * 10_000
    for i in range(10_000):
        cache.add(f"new-{i}", until)
    assert len(cache) == DENY_CACHE_SIZE
    assert "old-9999" not in cache and "old-10000" in cache and "new-9999" in cache

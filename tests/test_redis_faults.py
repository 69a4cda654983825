"""The gateway against a faulty Redis: a FaultProxy between the in-process gateway and a real
redis-server resets, delays and cuts connections; Redis restarts and SCRIPT FLUSH hit it under a
burst. Each scenario runs on asyncio's loop and on uvloop (production's loop, whose transports
raise RuntimeError where asyncio's raise OSError or drop the write), in a loop the test makes."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvloop
from redis.asyncio import Redis

from proxy.app import create_app
from proxy.embedded_redis import RedisProcess, free_port
from proxy.settings import load_settings
from tests.conftest import RunningGateway
from tests.faultproxy import FaultProxy
from tests.test_pipeline import eventually
from tests.servers import gateway_config, serving
from tests.upstream import Upstream

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
DEADLINE = 10.0                        # a hang guard, never a performance threshold
SCENARIO_DEADLINE = 90.0
REDIS_TIMEOUT = 0.3
MARGIN = 0.5                           # the bound: a decision within REDIS_TIMEOUT + this
FIRST_REPLY = len(b"+OK\r\n")          # SELECT's reply: the first one on every new connection


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    """Run a scenario to its end in a fresh loop of the parametrized kind."""
    def run(scenario: Coroutine[Any, Any, None]) -> None:
        loop = LOOPS[request.param]()
        try:
            loop.run_until_complete(asyncio.wait_for(scenario, SCENARIO_DEADLINE))
        finally:
            loop.close()
    return run


@pytest.fixture
def own_redis() -> Any:
    """A private redis-server this test may restart, so CLIENT LIST shows only its clients."""
    server = RedisProcess(port=free_port())
    server.start()
    yield server
    server.stop()


@asynccontextmanager
async def gateway(redis_url: str, **env: Any) -> AsyncIterator[RunningGateway]:
    """The real app on a free port in the running loop, with its own upstream."""
    upstream = Upstream()
    async with serving(upstream) as upstream_url:
        settings = load_settings({
            "REDIS_URL": redis_url, "UPSTREAM_BACKEND_URL": upstream_url, "RATE_LIMIT": "100",
            "TIME_WINDOW": "60", "LOG_LEVEL": "DEBUG", **{k: str(v) for k, v in env.items()}},
            dotenv=None)
        app = create_app(settings)
        try:
            async with serving(app, gateway_config(settings)) as url:
                yield RunningGateway(url, app.extensions["gateway"], upstream)
        finally:
            upstream.release.set()
            upstream.proceed.set()


def counted(gw: RunningGateway, kind: str) -> float:
    """gateway_redis_errors_total{kind=...} of this gateway."""
    value = gw.gateway.metrics.registry.get_sample_value("gateway_redis_errors_total", {"kind": kind})
    return value or 0.0


def internal_errors(gw: RunningGateway) -> float:
    total = 0.0
    for family in gw.gateway.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "gateway_requests_total" and sample.labels["outcome"] == "internal_error":
                total += sample.value
    return total


def decided(response: httpx.Response) -> bool:
    """The answer carries a decision Redis made (not the fail-open default)."""
    return "x-ratelimit-remaining" in response.headers


def sockets_closed(gw: RunningGateway) -> bool:
    """Every Redis socket of the gateway (pipeline and pool) has seen its connection end."""
    conns = [*gw.gateway.redis.connection_pool._available_connections]
    if gw.gateway.pipeline.conn is not None:
        conns.append(gw.gateway.pipeline.conn)
    return all(c._writer is None or c._writer.is_closing() for c in conns)


# --- (1) resets: the documented fail-open / fail-closed answers, never a 500 ----------------

@pytest.mark.parametrize("mode", ["open", "closed"])
def test_reset_connections_get_the_fail_mode_answer_and_health_503_never_500(
        run, redis_server: RedisProcess, mode: str) -> None:
    async def scenario() -> None:
        assert redis_server.port is not None
        admin = Redis(host="127.0.0.1", port=redis_server.port, db=1)
        await admin.flushdb()
        with FaultProxy("127.0.0.1", redis_server.port) as proxy:
            async with gateway(f"redis://127.0.0.1:{proxy.port}/1", RATE_LIMIT_FAIL_MODE=mode,
                               REDIS_TIMEOUT=2) as gw, gw.client("127.0.0.2") as client:
                assert (await client.get("/x")).status_code == 200
                assert (await client.get("/health")).status_code == 200   # a pooled socket

                # every socket reset while idle: /health's pooled one is replaced in the probe
                proxy.cut()
                await eventually(lambda: sockets_closed(gw), "the gateway to see the resets")
                await eventually(lambda: _lapsed(gw), "the cached /health answer to lapse")
                assert await _healthy(client, 200)

                # a restart as the limiter sees it: sockets reset, scripts gone; reloaded at once
                proxy.cut()
                await admin.script_flush()
                await eventually(lambda: sockets_closed(gw), "the gateway to see the resets")
                answer = await client.get("/x")
                assert answer.status_code == 200 and decided(answer), (answer.status_code, answer.text)
                assert await admin.get(gw.gateway.limiter.key("127.0.0.2")) == b"2"

                # Redis answers the first command of each connection, then resets it
                proxy.set(reset_after_down=FIRST_REPLY)
                errors = sum(counted(gw, k) for k in ("connection", "timeout", "other"))
                for _ in range(5):
                    answer = await client.get("/x")
                    if mode == "open":
                        assert answer.status_code == 200 and not decided(answer), answer.text
                    else:
                        assert answer.status_code == 503, answer.text
                        assert answer.headers["content-type"] == "application/problem+json"
                        assert answer.json()["error"] == "limiter_unavailable"
                        assert answer.headers["retry-after"] == "1"
                assert sum(counted(gw, k) for k in ("connection", "timeout", "other")) == errors + 5
                await eventually(lambda: _healthy(client, 503), "/health to answer 503")
                health = await client.get("/health")
                assert health.json()["redis_status"] == "Disconnected"

                proxy.set()
                await eventually(lambda: _decides(client), "decisions after healing")
                assert internal_errors(gw) == 0
        await admin.aclose()
    run(scenario())


async def _healthy(client: httpx.AsyncClient, status: int) -> bool:
    response = await client.get("/health")
    assert response.status_code in (200, 503), (response.status_code, response.text)
    return response.status_code == status


def _lapsed(gw: RunningGateway) -> bool:
    probe = gw.gateway.health
    return probe._last is None or time.monotonic() - probe._last[0] >= probe.cache_for


async def _decides(client: httpx.AsyncClient) -> bool:
    response = await client.get("/x")
    assert response.status_code == 200, (response.status_code, response.text)
    return decided(response)


# --- (2) a slow Redis: REDIS_TIMEOUT bounds the whole decision ------------------------------

async def _timed(client: httpx.AsyncClient, n: int) -> list[tuple[int, float, bool]]:
    """n concurrent requests: (status, seconds, decided by Redis) each."""
    async def one() -> tuple[int, float, bool]:
        started = time.monotonic()
        response = await client.get("/x")
        return response.status_code, time.monotonic() - started, decided(response)
    return list(await asyncio.gather(*(one() for _ in range(n))))


def test_slow_redis_decisions_end_within_redis_timeout_counted_as_timeouts_then_exact_again(
        run, redis_server: RedisProcess) -> None:
    async def scenario() -> None:
        assert redis_server.port is not None
        admin = Redis(host="127.0.0.1", port=redis_server.port)
        await admin.flushall()
        bound = REDIS_TIMEOUT + MARGIN
        with FaultProxy("127.0.0.1", redis_server.port) as proxy:
            async with gateway(f"redis://127.0.0.1:{proxy.port}/0", REDIS_TIMEOUT=REDIS_TIMEOUT,
                               RATE_LIMIT=5) as gw, gw.client("127.0.0.2") as client:
                assert all(ok for _, _, ok in await _timed(client, 1))

                # replies a little under REDIS_TIMEOUT late, on a fresh connection: a handshake of
                # its own round trips would add up past the deadline
                proxy.cut()
                await eventually(lambda: sockets_closed(gw), "the gateway to see the reset")
                proxy.set(latency_down=0.25)
                for status, seconds, _ in await _timed(client, 1):
                    assert status == 200 and seconds <= bound, (status, seconds)

                # replies 1 to 3 s late: every decision gives up at REDIS_TIMEOUT, counted
                for latency in (1.0, 2.0, 3.0):
                    proxy.set(latency_down=latency)
                    before = counted(gw, "timeout")
                    results = await _timed(client, 5)
                    for status, seconds, ok in results:
                        assert status == 200 and not ok and seconds <= bound, (latency, results)
                    assert counted(gw, "timeout") - before == 5, latency
                    assert counted(gw, "connection") == 0

                # healed: late replies still in flight are dropped, and limits are exact again
                proxy.set()
                proxy.cut()
                async with gw.client("127.0.0.4") as probe:
                    await eventually(lambda: _decides(probe), "decisions after healing")
                async with gw.client("127.0.0.3") as fresh:
                    statuses = [(await fresh.get("/x")).status_code for _ in range(7)]
                assert statuses == [200] * 5 + [429] * 2
                assert internal_errors(gw) == 0
                keys = await admin.keys("rl:*")
                assert keys
                ttls = [await admin.pttl(key) for key in keys]
                assert all(ttl > 0 for ttl in ttls), dict(zip(keys, ttls))
        await admin.aclose()
    run(scenario())


# --- (3) NOSCRIPT after SCRIPT FLUSH or a restart: one SCRIPT LOAD, few connections ----------

async def _script_loads(admin: Redis) -> int:
    stats = await admin.info("commandstats")
    return int(stats.get("cmdstat_script|load", {}).get("calls", 0))


async def _gateway_connections(admin: Redis) -> int:
    me = await admin.client_id()
    return sum(1 for c in await admin.client_list() if int(c["id"]) != me)


@pytest.mark.parametrize("event", ["script_flush", "restart"])
def test_burst_after_noscript_shares_one_script_load_over_few_connections(
        run, own_redis: RedisProcess, event: str) -> None:
    async def scenario() -> None:
        async with gateway(own_redis.url) as gw, gw.client("127.0.0.2") as client:
            assert (await client.get("/x")).status_code == 200
            assert (await client.get("/health")).status_code == 200
            if event == "restart":
                own_redis.stop()
                own_redis.start()
            admin = Redis.from_url(own_redis.url)
            await admin.script_flush()
            await admin.config_resetstat()
            # all 50 EVALSHAs reach Redis before it answers any: CLIENT PAUSE WRITE holds them
            await admin.client_pause(60_000, all=False)
            burst = [asyncio.ensure_future(client.get("/x")) for _ in range(50)]
            await eventually(lambda: len(gw.gateway.pipeline.pending) == 50, "50 calls in flight")
            await admin.client_unpause()
            answers = await asyncio.gather(*burst)
            assert [a.status_code for a in answers] == [200] * 50
            assert all(decided(a) for a in answers)
            assert await _gateway_connections(admin) <= 3
            assert await _script_loads(admin) == 1
            assert gw.gateway.metrics.registry.get_sample_value("gateway_script_reloads_total") == 1
            key = gw.gateway.limiter.key("127.0.0.2")
            assert int(await admin.get(key) or 0) == 50 + (1 if event == "script_flush" else 0)
            assert await admin.pttl(key) > 0
            assert (await client.get("/health")).status_code == 200
            assert await _gateway_connections(admin) <= 3           # /health added none
            await admin.aclose()
    run(scenario())

"""Pipeline (auto-pipelined EVALSHA over one redis-py connection) against real redis-servers:
reply matching under concurrency, error replies, NOSCRIPT, killed/stopped/hung servers,
cancelled callers and closing.

Calls are held "in flight" deterministically with CLIENT PAUSE WRITE on a private
redis-server: Redis blocks every EVAL/EVALSHA of a paused client (whatever the script) while
still serving CLIENT LIST / CLIENT KILL / CLIENT UNPAUSE to the admin connection. DEBUG is
disabled by default since Redis 7, so DEBUG SLEEP is not used."""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from proxy.embedded_redis import RedisProcess, free_port
from proxy.gateway import make_redis
from proxy.limiter import RateLimiter
from proxy.pipeline import Pipeline
from proxy.scripts import LuaScript
from proxy.settings import Settings

SettingsFactory = Callable[..., Settings]
DEADLINE = 10.0                        # a hang guard, never a performance threshold
ECHO = b"return ARGV[1]"               # each call gets its own argument back
ECHO_SHA = hashlib.sha1(ECHO).hexdigest()
NOT_A_SCRIPT = "0" * 40


# --- helpers ---------------------------------------------------------------------------------

async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str,
                     deadline: float = DEADLINE) -> None:
    """Poll `check` (sync or async) until it holds; fail after `deadline` seconds."""
    end = time.monotonic() + deadline
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}")
        await asyncio.sleep(0.01)


async def evalsha_clients(admin: Redis) -> list[dict[str, Any]]:
    """CLIENT LIST entries whose last command was EVALSHA: only the pipeline sends EVALSHA."""
    return [c for c in await admin.client_list() if c.get("cmd") == "evalsha"]


async def blocked_evalsha(admin: Redis) -> bool:
    """A connection is blocked by CLIENT PAUSE with an EVALSHA: the calls are truly in flight."""
    return any("b" in c.get("flags", "") for c in await evalsha_clients(admin))


async def echo(pipeline: Pipeline, value: Any) -> Any:
    return await pipeline.evalsha(ECHO_SHA, 0, value)


@pytest.fixture
async def pipelines() -> AsyncIterator[Callable[[Settings], Pipeline]]:
    """Pipeline(make_redis(settings)) factory; everything made is closed afterwards."""
    made: list[Pipeline] = []

    def make(settings: Settings) -> Pipeline:
        pipeline = Pipeline(make_redis(settings))
        made.append(pipeline)
        return pipeline
    yield make
    for pipeline in made:
        await pipeline.aclose()
        await pipeline.redis.aclose()


@pytest.fixture
async def own_redis() -> AsyncIterator[tuple[RedisProcess, Redis]]:
    """A private redis-server this test may pause, kill clients on, stop and restart, and an
    admin client for it."""
    server = RedisProcess(port=free_port())
    server.start()
    # a pooled connection the old server closed is replaced, not reused (redis-py 8 skips that
    # check while maintenance notifications are "auto")
    admin = Redis.from_url(server.url, maint_notifications_config=MaintNotificationsConfig(enabled=False))
    try:
        yield server, admin
    finally:
        if server.pid is not None:
            try:
                await admin.client_unpause()
            except Exception:   # noqa: BLE001 - best effort; the server is stopped next
                pass
        await admin.aclose()
        server.stop()


def own_settings(make_settings: SettingsFactory, server: RedisProcess, **env: Any) -> Settings:
    return make_settings(REDIS_URL=server.url, REDIS_TIMEOUT=env.pop("REDIS_TIMEOUT", 0.2), **env)


async def warm(pipeline: Pipeline, admin: Redis) -> int:
    """Load the echo script, make one call, return the pipeline connection's CLIENT ID."""
    assert await admin.script_load(ECHO) == ECHO_SHA
    assert await echo(pipeline, "warm") == b"warm"
    clients = await evalsha_clients(admin)
    assert len(clients) == 1, clients
    return int(clients[0]["id"])


async def pending_calls(pipeline: Pipeline, admin: Redis, values: list[str]) -> list[asyncio.Task[Any]]:
    """Start one echo call per value while the server is paused; return once all of them are
    written and Redis holds the pipeline's connection blocked on them."""
    tasks = [asyncio.create_task(echo(pipeline, v)) for v in values]
    await eventually(lambda: len(pipeline.pending) == len(values), "all calls to be pending")
    await eventually(lambda: blocked_evalsha(admin), "redis to block the EVALSHA calls")
    assert not any(t.done() for t in tasks)
    return tasks


async def outcomes(tasks: list[asyncio.Task[Any]]) -> list[Any]:
    """Each task's result or exception, failing (not hanging) if any is still waiting."""
    _, waiting = await asyncio.wait(tasks, timeout=DEADLINE)
    assert not waiting, f"{len(waiting)} of {len(tasks)} calls still waiting after {DEADLINE} s"
    results: list[Any] = []
    for task in tasks:
        if task.cancelled():
            results.append("cancelled")
        else:
            results.append(task.exception() or task.result())
    return results


# --- replies matched to callers --------------------------------------------------------------

async def test_500_concurrent_checks_each_client_admitted_exactly_limit_on_one_connection(
        redis: Redis, make_settings: SettingsFactory, pipelines) -> None:
    settings = make_settings(RATE_LIMIT=7, TIME_WINDOW=60)
    pipeline = pipelines(settings)
    limiter = RateLimiter(pipeline, settings)
    await limiter.script.load(redis)                       # through the admin connection
    before = (await redis.info("stats"))["total_connections_received"]

    clients = [f"client-{i % 50}" for i in range(500)]
    decisions = await asyncio.gather(*(limiter.check(c) for c in clients))

    assert limiter.errors == 0
    seen: dict[str, list[tuple[bool, int]]] = defaultdict(list)
    for client, decision in zip(clients, decisions):
        seen[client].append((decision.allowed, decision.remaining))
    assert len(seen) == 50
    for client, got in seen.items():
        admitted = sorted((r for ok, r in got if ok), reverse=True)
        refused = [r for ok, r in got if not ok]
        assert admitted == [6, 5, 4, 3, 2, 1, 0], (client, got)   # each count seen exactly once
        assert refused == [0, 0, 0], (client, got)
        assert {r for _, r in got} == set(range(7)), (client, got)
        assert await redis.get(limiter.key(client)) == b"7"
    # one connection carried every EVALSHA, and it was the only one the pipeline opened
    assert len(await evalsha_clients(redis)) == 1
    after = (await redis.info("stats"))["total_connections_received"]
    assert after - before == 1


async def test_500_concurrent_calls_each_get_their_own_reply(
        redis: Redis, make_settings: SettingsFactory, pipelines) -> None:
    pipeline = pipelines(make_settings())
    assert await redis.script_load(ECHO) == ECHO_SHA
    values = [f"v{i}" for i in range(500)]
    replies = await asyncio.gather(*(echo(pipeline, v) for v in values))
    assert replies == [v.encode() for v in values]
    assert len(await evalsha_clients(redis)) == 1


async def test_error_replies_go_to_their_own_callers_only(
        redis: Redis, make_settings: SettingsFactory, pipelines) -> None:
    pipeline = pipelines(make_settings())
    assert await redis.script_load(ECHO) == ECHO_SHA
    # a script that fails at run time: INCR of a non-integer value
    failing_sha = await redis.script_load(b"return redis.call('INCR', KEYS[1])")
    await redis.set("not-a-number", "x")

    calls: list[Awaitable[Any]] = []
    expected: list[Any] = []
    for i in range(60):
        if i % 10 == 3:
            calls.append(pipeline.evalsha(NOT_A_SCRIPT, 0))
            expected.append(NoScriptError)
        elif i % 10 == 7:
            calls.append(pipeline.evalsha(failing_sha, 1, "not-a-number"))
            expected.append(ResponseError)
        else:
            calls.append(echo(pipeline, f"ok-{i}"))
            expected.append(f"ok-{i}".encode())
    results = await asyncio.gather(*calls, return_exceptions=True)

    for i, (got, want) in enumerate(zip(results, expected)):
        if isinstance(want, type):
            assert isinstance(got, want), (i, got)
            if want is ResponseError:
                assert not isinstance(got, NoScriptError), (i, got)
        else:
            assert got == want, (i, got)
    # the connection survived the error replies
    assert await echo(pipeline, "after") == b"after"
    assert len(await evalsha_clients(redis)) == 1


async def test_noscript_error_is_a_noscript_error(
        redis: Redis, make_settings: SettingsFactory, pipelines) -> None:
    pipeline = pipelines(make_settings())
    with pytest.raises(NoScriptError):
        await pipeline.evalsha(NOT_A_SCRIPT, 0)


async def test_noscript_after_script_flush_recovers_through_the_pipeline(
        redis: Redis, make_settings: SettingsFactory, pipelines) -> None:
    pipeline = pipelines(make_settings())
    script = LuaScript.named("fixed_window.v1")
    key = "rl:fw1:{noscript}"
    args = (5, 60_000)
    await script.load(pipeline)                            # script_load goes via the pool
    first = await script.run(pipeline, (key,), args)
    assert first[:2] == [1, 4]
    assert script.reloads == 0

    await redis.script_flush()
    second = await script.run(pipeline, (key,), args)      # NOSCRIPT -> SCRIPT LOAD -> EVALSHA
    assert second[:2] == [1, 3]
    assert script.reloads == 1

    await redis.script_flush()                             # concurrent callers all recover
    results = await asyncio.gather(*(script.run(pipeline, (key,), args) for _ in range(5)))
    assert sorted(r[1] for r in results if r[0] == 1) == [0, 1, 2]
    assert [r[:2] for r in results if r[0] == 0] == [[0, 0], [0, 0]]
    assert script.reloads >= 2
    assert await redis.get(key) == b"5"
    assert len(await evalsha_clients(redis)) == 1


# --- connection failures ---------------------------------------------------------------------

async def test_connection_killed_mid_flight_fails_every_pending_call_then_reconnects(
        own_redis, make_settings: SettingsFactory, pipelines) -> None:
    server, admin = own_redis
    pipeline = pipelines(own_settings(make_settings, server, REDIS_TIMEOUT=5))
    old_id = await warm(pipeline, admin)

    await admin.client_pause(60_000, all=False)            # WRITE pause: EVALSHA blocks
    tasks = await pending_calls(pipeline, admin, [f"k{i}" for i in range(20)])
    killed = await admin.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    results = await outcomes(tasks)
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    assert not pipeline.pending

    await admin.client_unpause()
    assert await echo(pipeline, "again") == b"again"       # the next call reconnects
    clients = await evalsha_clients(admin)
    assert len(clients) == 1 and int(clients[0]["id"]) != old_id


async def test_redis_stopped_fails_fast_and_restarted_redis_is_used_again(
        own_redis, make_settings: SettingsFactory, pipelines) -> None:
    server, admin = own_redis
    pipeline = pipelines(own_settings(make_settings, server))
    await warm(pipeline, admin)

    server.stop()
    # the dead connection, then refused reconnects: each an error, none a hang, and none a
    # connect timeout (on Python 3.12+ a write to the dying transport once left a stale selector
    # registration that made the next connect on the reused fd wait for REDIS_TIMEOUT)
    for _ in range(3):
        results = await outcomes([asyncio.create_task(echo(pipeline, i)) for i in range(5)])
        assert all(isinstance(r, RedisConnectionError) for r in results), results
    assert not pipeline.pending

    server.start()                                         # same port, empty script cache
    assert await admin.script_load(ECHO) == ECHO_SHA
    assert await asyncio.wait_for(echo(pipeline, "back"), DEADLINE) == b"back"
    replies = await asyncio.gather(*(echo(pipeline, i) for i in range(20)))
    assert replies == [str(i).encode() for i in range(20)]
    assert len(await evalsha_clients(admin)) == 1


async def test_script_reload_after_redis_restart_succeeds_first_time(
        own_redis, make_settings: SettingsFactory, pipelines, tmp_path: Path) -> None:
    """The limiter's real path: after an outage the restarted Redis has no scripts, so the
    first call gets NOSCRIPT and reloads through the pooled client (Pipeline.script_load).
    That reload must not fail on a pooled connection the old server closed."""
    server, admin = own_redis
    pipeline = pipelines(own_settings(make_settings, server))
    (tmp_path / "echo.lua").write_bytes(ECHO)
    script = LuaScript(tmp_path / "echo.lua")
    assert await script.run(pipeline, (), (1,)) == b"1"     # NOSCRIPT: loaded via the pool
    assert script.reloads == 1

    server.stop()
    results = await outcomes([asyncio.create_task(script.run(pipeline, (), (i,))) for i in range(5)])
    assert all(isinstance(r, RedisConnectionError) for r in results), results

    server.start()
    assert await asyncio.wait_for(script.run(pipeline, (), (2,)), DEADLINE) == b"2"
    assert script.reloads == 2


async def test_redis_restarted_while_idle_next_call_succeeds(
        own_redis, make_settings: SettingsFactory, pipelines, tmp_path: Path) -> None:
    """A restart (or failover) while no call is in flight leaves a socket the old server closed.
    Nothing was in flight on it, so nothing needs to fail: the pipeline must notice the EOF
    before writing, or the first burst of requests after a quiet restart fails (503s when
    failing closed, uncounted admissions when failing open)."""
    server, admin = own_redis
    pipeline = pipelines(own_settings(make_settings, server))
    (tmp_path / "echo.lua").write_bytes(ECHO)
    script = LuaScript(tmp_path / "echo.lua")
    assert await script.run(pipeline, (), (1,)) == b"1"
    server.stop()
    server.start()
    await eventually(lambda: pipeline.conn is not None and pipeline.conn._reader is not None
                     and pipeline.conn._reader.at_eof(), "the old connection to see EOF")
    assert await asyncio.wait_for(script.run(pipeline, (), (2,)), DEADLINE) == b"2"


async def test_redis_hung_pending_calls_time_out_then_recover(
        own_redis, make_settings: SettingsFactory, pipelines) -> None:
    server, admin = own_redis
    pipeline = pipelines(own_settings(make_settings, server, REDIS_TIMEOUT=0.2))
    await warm(pipeline, admin)

    await admin.client_pause(60_000, all=False)            # Redis stops answering EVALSHA
    tasks = [asyncio.create_task(echo(pipeline, f"h{i}")) for i in range(10)]
    results = await outcomes(tasks)                        # REDIS_TIMEOUT, not the pause, ends them
    assert all(isinstance(r, RedisTimeoutError) for r in results), results
    assert not pipeline.pending
    with pytest.raises(RedisTimeoutError):                 # still hung: a fresh call times out too
        await asyncio.wait_for(echo(pipeline, "still"), DEADLINE)

    await admin.client_unpause()
    assert await asyncio.wait_for(echo(pipeline, "back"), DEADLINE) == b"back"
    replies = await asyncio.gather(*(echo(pipeline, f"b{i}") for i in range(20)))
    assert replies == [f"b{i}".encode() for i in range(20)]


async def test_silent_server_times_out_instead_of_hanging(
        make_settings: SettingsFactory, pipelines) -> None:
    """A server that accepts and never answers (the connect handshake hangs): every caller
    gets a TimeoutError, bounded by REDIS_TIMEOUT, instead of waiting forever."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()                                # until the client goes away
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        pipeline = pipelines(make_settings(REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_TIMEOUT=0.2))
        results = await outcomes([asyncio.create_task(echo(pipeline, i)) for i in range(5)])
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert accepted
        for writer in accepted:
            writer.close()


# --- cancellation ----------------------------------------------------------------------------

async def test_cancelled_callers_do_not_shift_replies(
        own_redis, make_settings: SettingsFactory, pipelines) -> None:
    server, admin = own_redis
    pipeline = pipelines(own_settings(make_settings, server, REDIS_TIMEOUT=5))
    await warm(pipeline, admin)

    await admin.client_pause(60_000, all=False)
    values = [f"c{i}" for i in range(30)]
    tasks = await pending_calls(pipeline, admin, values)
    cancelled = {0, 13, 14, 29}                            # the head, a pair, the tail
    for i in cancelled:
        tasks[i].cancel()
    await admin.client_unpause()

    results = await outcomes(tasks)
    for i, (value, got) in enumerate(zip(values, results)):
        assert got == ("cancelled" if i in cancelled else value.encode()), (i, got)
    assert not pipeline.pending
    # and later callers are not shifted either
    assert await asyncio.gather(*(echo(pipeline, f"n{i}") for i in range(10))) == \
        [f"n{i}".encode() for i in range(10)]


async def test_cancelled_limiter_checks_do_not_shift_decisions(
        own_redis, make_settings: SettingsFactory, pipelines) -> None:
    server, admin = own_redis
    settings = own_settings(make_settings, server, REDIS_TIMEOUT=5, RATE_LIMIT=3)
    pipeline = pipelines(settings)
    limiter = RateLimiter(pipeline, settings)
    await limiter.script.load(admin)
    await warm(pipeline, admin)

    await admin.client_pause(60_000, all=False)
    clients = [f"client-{i % 10}" for i in range(50)]
    tasks = [asyncio.create_task(limiter.check(c)) for c in clients]
    await eventually(lambda: len(pipeline.pending) == 50, "all checks to be pending")
    await eventually(lambda: blocked_evalsha(admin), "redis to block the checks")
    for i in (0, 25, 49):
        tasks[i].cancel()
    await admin.client_unpause()
    results = await outcomes(tasks)

    assert limiter.errors == 0
    by_client: dict[str, list[int]] = defaultdict(list)
    for i, (client, got) in enumerate(zip(clients, results)):
        if i in (0, 25, 49):
            assert got == "cancelled"
        elif got.allowed:
            by_client[client].append(got.remaining)
    for client in set(clients):
        # Redis ran every call, cancelled or not: a client's admitted answers are distinct
        # counts from {2, 1, 0}; a shifted reply would repeat one or hand out another's
        remaining = by_client[client]
        assert len(remaining) == len(set(remaining)) and set(remaining) <= {0, 1, 2}, (client, remaining)
        assert await admin.get(limiter.key(client)) == b"3"


async def test_caller_cancelled_while_connecting_does_not_fail_the_others(
        own_redis, make_settings: SettingsFactory, pipelines) -> None:
    """The first caller opens the connection that later callers wait for; cancelling that
    caller (its client went away) must not fail everyone queued behind the connect, and the
    cancelled task must end cancelled."""
    server, admin = own_redis
    assert await admin.script_load(ECHO) == ECHO_SHA
    pipeline = pipelines(own_settings(make_settings, server, REDIS_TIMEOUT=5))
    first = asyncio.create_task(echo(pipeline, "first"))
    await asyncio.sleep(0)                                 # first now waits for its connect
    second = asyncio.create_task(echo(pipeline, "second"))
    await asyncio.sleep(0)                                 # second waits on the same connect
    assert pipeline.connecting is not None and not pipeline.connecting.done()
    assert not second.done()
    first.cancel()
    results = await outcomes([first, second])
    assert results == ["cancelled", b"second"], (
        f"the cancelled caller ended with {results[0]!r}; "
        f"the caller waiting on its connect got {results[1]!r}")


# --- closing ---------------------------------------------------------------------------------

async def test_aclose_closes_the_connection(
        redis: Redis, make_settings: SettingsFactory, pipelines) -> None:
    pipeline = pipelines(make_settings())
    assert await redis.script_load(ECHO) == ECHO_SHA
    assert await echo(pipeline, "x") == b"x"
    (client,) = await evalsha_clients(redis)

    await pipeline.aclose()

    async def gone() -> bool:
        return all(c["id"] != client["id"] for c in await redis.client_list())
    await eventually(gone, "redis to drop the pipeline's connection")
    assert pipeline.conn is None


async def test_aclose_fails_calls_in_flight_instead_of_leaving_them_hanging(
        own_redis, make_settings: SettingsFactory, pipelines) -> None:
    server, admin = own_redis
    pipeline = pipelines(own_settings(make_settings, server, REDIS_TIMEOUT=5))
    await warm(pipeline, admin)
    await admin.client_pause(60_000, all=False)
    tasks = await pending_calls(pipeline, admin, ["a", "b", "c"])

    await pipeline.aclose()

    done, waiting = await asyncio.wait(tasks, timeout=DEADLINE)
    assert not waiting, f"{len(waiting)} calls in flight still wait after aclose()"
    assert all(isinstance(t.exception(), RedisConnectionError) for t in tasks)


# --- connecting: no round trips of its own ---------------------------------------------------

async def commands_run(admin: Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT, the admin's own left out."""
    stats = await admin.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    for own in ("info", "config|resetstat"):
        calls.pop(own, None)
    return calls


async def test_a_fresh_connection_sends_nothing_before_the_first_call(
        own_redis, make_settings: SettingsFactory, pipelines) -> None:
    """No PING, HELLO or CLIENT SETINFO round trips ahead of the script on a new connection."""
    server, admin = own_redis
    assert await admin.script_load(ECHO) == ECHO_SHA
    pipeline = pipelines(own_settings(make_settings, server))
    await admin.config_resetstat()
    assert await echo(pipeline, "first") == b"first"
    assert await commands_run(admin) == {"evalsha": 1}


async def test_auth_and_select_are_written_with_the_first_call(
        own_redis, make_settings: SettingsFactory, pipelines) -> None:
    server, admin = own_redis
    await admin.acl_setuser("gw", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all"])
    url = server.url.replace("redis://", "redis://gw:secret@").rsplit("/", 1)[0] + "/3"
    pipeline = pipelines(make_settings(REDIS_URL=url, REDIS_TIMEOUT=5))
    script = LuaScript.named("fixed_window.v1")
    await admin.config_resetstat()
    assert (await script.run(pipeline, ("rl:fw1:{auth}",), (5, 60_000)))[:2] == [1, 4]
    handshake = {"auth", "select", "ping", "hello", "client|setinfo", "evalsha", "script|load"}
    assert {c: n for c, n in (await commands_run(admin)).items() if c in handshake} == \
        {"auth": 1, "select": 1, "evalsha": 2, "script|load": 1}
    db3 = Redis.from_url(server.url.rsplit("/", 1)[0] + "/3")
    assert await db3.get("rl:fw1:{auth}") == b"1"                # SELECT came first
    await db3.aclose()


async def test_wrong_password_fails_the_call_with_an_authentication_error(
        own_redis, make_settings: SettingsFactory, pipelines) -> None:
    server, admin = own_redis
    await admin.acl_setuser("gw", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all"])
    assert await admin.script_load(ECHO) == ECHO_SHA
    url = server.url.replace("redis://", "redis://gw:wrong@")
    pipeline = pipelines(make_settings(REDIS_URL=url, REDIS_TIMEOUT=5))
    results = await outcomes([asyncio.create_task(echo(pipeline, i)) for i in range(3)])
    assert all(isinstance(r, AuthenticationError) for r in results), results


async def test_a_call_times_out_at_its_deadline_and_its_late_reply_shifts_nothing(
        own_redis, make_settings: SettingsFactory, pipelines) -> None:
    """The deadline bounds the call, whatever the socket timeout; the reply that comes after
    it is read and dropped, so the next caller still gets its own."""
    server, admin = own_redis
    pipeline = pipelines(own_settings(make_settings, server, REDIS_TIMEOUT=5))
    await warm(pipeline, admin)
    slow = await admin.script_load(                        # busy for 0.6 s, then returns 1
        b"local t = redis.call('TIME'); local e = t[1] * 1e6 + t[2] + 600000 "
        b"repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= e return 1")
    deadline = asyncio.get_running_loop().time() + 0.1
    with pytest.raises(RedisTimeoutError):
        await asyncio.wait_for(pipeline.evalsha(slow, 0, deadline=deadline), DEADLINE)
    assert len(pipeline.pending) == 1                      # its reply is still to come
    assert await asyncio.wait_for(echo(pipeline, "next"), DEADLINE) == b"next"
    assert not pipeline.pending

"""LuaScript and fixed_window.v1.lua against a real redis-server."""
from __future__ import annotations

import hashlib
import re

from redis.asyncio import Redis

from proxy.scripts import LUA_DIR, LuaScript

LUA_FILE = LUA_DIR / "fixed_window.v1.lua"
KEY = "rl:fw1:{198.51.100.7}"


def test_sha_is_sha1_of_the_file() -> None:
    script = LuaScript.named("fixed_window.v1")
    assert script.name == "fixed_window.v1"
    assert script.source == LUA_FILE.read_bytes()
    assert script.sha == hashlib.sha1(LUA_FILE.read_bytes()).hexdigest()


async def test_local_sha_matches_the_server(redis: Redis) -> None:
    script = LuaScript.named("fixed_window.v1")
    server_sha = await redis.script_load(script.source)
    if isinstance(server_sha, bytes):
        server_sha = server_sha.decode()
    assert server_sha == script.sha


async def test_load_registers_the_script(redis: Redis) -> None:
    script = LuaScript.named("fixed_window.v1")
    assert await redis.script_exists(script.sha) == [False]
    await script.load(redis)
    assert await redis.script_exists(script.sha) == [True]


async def test_run_after_script_flush_reloads_once_and_answers(redis: Redis) -> None:
    script = LuaScript.named("fixed_window.v1")
    await script.load(redis)
    assert await script.run(redis, (KEY,), (5, 60_000)) == [1, 4, 60_000]
    await redis.script_flush()
    assert await redis.script_exists(script.sha) == [False]
    before = script.reloads
    allowed, remaining, ttl = await script.run(redis, (KEY,), (5, 60_000))
    assert (allowed, remaining) == (1, 3)
    assert 0 < ttl <= 60_000
    assert script.reloads == before + 1
    assert await redis.script_exists(script.sha) == [True]
    await script.run(redis, (KEY,), (5, 60_000))          # loaded now: no further reload
    assert script.reloads == before + 1


async def test_run_without_prior_load_loads_it(redis: Redis) -> None:
    script = LuaScript.named("fixed_window.v1")
    assert await script.run(redis, (KEY,), (1, 1000)) == [1, 0, 1000]
    assert script.reloads == 1


def lua_header() -> str:
    lines = []
    for line in LUA_FILE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("--"):
            break
        lines.append(line)
    return "\n".join(lines)


def test_lua_header_documents_keys_args_and_return() -> None:
    header = lua_header()
    assert header.startswith("-- fixed_window.v1")
    assert re.search(r"KEYS\[1\]\s+\S", header), header
    assert re.search(r"ARGV\[1\]\s+\S", header), header
    assert re.search(r"ARGV\[2\]\s+\S", header), header
    assert re.search(r"^--\s*returns?\s+\S", header, re.MULTILINE | re.IGNORECASE), header


def test_lua_uses_only_declared_keys_and_args() -> None:
    body = LUA_FILE.read_text(encoding="utf-8")
    assert set(re.findall(r"KEYS\[(\d+)\]", body)) == {"1"}
    assert set(re.findall(r"ARGV\[(\d+)\]", body)) == {"1", "2"}


def assert_integers(reply: object) -> list[int]:
    assert isinstance(reply, list) and len(reply) == 3, reply
    for value in reply:
        # a Lua false would arrive as None, a Lua true as 1: only real integers are allowed
        assert type(value) is int, reply
    assert reply[0] in (0, 1)
    return reply


async def test_script_returns_integers_in_every_branch(redis: Redis) -> None:
    script = LuaScript.named("fixed_window.v1")
    args = (2, 60_000)
    assert assert_integers(await script.run(redis, (KEY,), args)) == [1, 1, 60_000]   # first
    second = assert_integers(await script.run(redis, (KEY,), args))                   # counted
    assert second[:2] == [1, 0]
    rejected = assert_integers(await script.run(redis, (KEY,), args))                 # rejected
    assert rejected[:2] == [0, 0]
    await redis.persist(KEY)                                                          # no TTL
    repaired = assert_integers(await script.run(redis, (KEY,), args))                 # repair
    assert repaired == [0, 0, 60_000]
    await redis.set(KEY, 1)                                                            # no TTL
    assert assert_integers(await script.run(redis, (KEY,), args)) == [1, 0, 60_000]


async def test_raw_eval_reply_has_integer_types(redis: Redis) -> None:
    source = LUA_FILE.read_text(encoding="utf-8")
    reply = await redis.eval(source, 1, KEY, 1, 5000)
    assert_integers(reply)
    reply = await redis.eval(source, 1, KEY, 1, 5000)
    assert assert_integers(reply)[:2] == [0, 0]

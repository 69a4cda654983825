"""Versioned Lua scripts: loaded with SCRIPT LOAD, run with EVALSHA, reloaded on NOSCRIPT."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from .pipeline import Pipeline

Store = Redis | Pipeline

LUA_DIR = Path(__file__).resolve().parent.parent / "lua"
log = logging.getLogger("proxy.scripts")


class LuaScript:
    """One script file; its SHA is computed locally so EVALSHA needs no prior round trip."""

    def __init__(self, path: Path) -> None:
        self.name = path.name.removesuffix(".lua")            # "fixed_window.v1"
        self.source = path.read_bytes()
        self.sha = hashlib.sha1(self.source).hexdigest()
        self.reloads = 0
        self.on_reload: Callable[[], None] | None = None

    @classmethod
    def named(cls, name: str) -> LuaScript:
        return cls(LUA_DIR / f"{name}.lua")

    async def load(self, redis: Store) -> None:
        sha = await redis.script_load(self.source)
        if isinstance(sha, bytes):
            sha = sha.decode()
        if sha != self.sha:
            raise RuntimeError(f"{self.name}: server SHA {sha} differs from local {self.sha}")

    async def run(self, redis: Store, keys: Sequence[str], args: Sequence[int]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:                                 # restart, SCRIPT FLUSH, failover
            self.reloads += 1
            if self.on_reload is not None:
                self.on_reload()
            log.warning("%s: NOSCRIPT from redis, reloading", self.name)
            await self.load(redis)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)

"""Versioned Lua scripts: loaded with SCRIPT LOAD, run with EVALSHA, reloaded on NOSCRIPT."""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from .pipeline import Pipeline, until

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
        self._reloading: asyncio.Future[None] | None = None

    @classmethod
    def named(cls, name: str) -> LuaScript:
        return cls(LUA_DIR / f"{name}.lua")

    async def load(self, redis: Store, deadline: float | None = None) -> None:
        """SCRIPT LOAD; on a Pipeline, answered by `deadline` (loop time) at the latest."""
        if isinstance(redis, Pipeline):
            sha = await redis.script_load(self.source, deadline=deadline)
        else:
            sha = await redis.script_load(self.source)
        if isinstance(sha, bytes):
            sha = sha.decode()
        if sha != self.sha:
            raise RuntimeError(f"{self.name}: server SHA {sha} differs from local {self.sha}")

    async def run(self, redis: Store, keys: Sequence[str], args: Sequence[int],
                  deadline: float | None = None) -> Any:
        """EVALSHA, reloading the script once on NOSCRIPT; on a Pipeline the whole run, reload
        included, is answered by `deadline` (loop time) at the latest."""
        if isinstance(redis, Pipeline) and deadline is None:
            deadline = redis.deadline()
        try:
            return await self._evalsha(redis, keys, args, deadline)
        except NoScriptError:                                 # restart, SCRIPT FLUSH, failover
            await self._reload(redis, deadline)
            return await self._evalsha(redis, keys, args, deadline)

    async def _evalsha(self, redis: Store, keys: Sequence[str], args: Sequence[int],
                       deadline: float | None) -> Any:
        if isinstance(redis, Pipeline):
            return await redis.evalsha(self.sha, len(keys), *keys, *args, deadline=deadline)
        return await redis.evalsha(self.sha, len(keys), *keys, *args)

    async def _reload(self, redis: Store, deadline: float | None) -> None:
        """One SCRIPT LOAD for every caller that got NOSCRIPT meanwhile: on one connection
        their NOSCRIPT replies all precede the load's reply, so they all find it in flight."""
        if self._reloading is None:
            self.reloads += 1
            if self.on_reload is not None:
                self.on_reload()
            log.warning("%s: NOSCRIPT from redis, reloading", self.name)
            self._reloading = asyncio.ensure_future(self.load(redis, deadline))
            self._reloading.add_done_callback(self._reloaded)
        await until(self._reloading, deadline)

    def _reloaded(self, reloading: asyncio.Future[None]) -> None:
        self._reloading = None
        if not reloading.cancelled():
            reloading.exception()                 # seen: its callers may all have left

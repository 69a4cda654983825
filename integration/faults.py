"""Helpers of the fault-injection suite (integration/test_faults.py): one ``python -m proxy``
with a FaultProxy in front of its Redis and one in front of its upstream, traffic from many
client addresses, and the properties every scenario checks.

Client addresses: traffic comes from 127.1.x.y (a fresh address every `per_client` requests,
so Redis keeps being asked instead of the deny cache), recovery probes from 127.2.0.x and the
exact-limit check from 127.3.0.x."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from redis.asyncio import Redis

from integration.conftest import POLL, CountingUpstream, Replica, Replicas
from tests.faultproxy import FaultProxy

REDIS_TIMEOUT = 0.3
UPSTREAM_TIMEOUT = 1.0
RATE_LIMIT = 5
# What a decision may take beyond REDIS_TIMEOUT, measured by the client: the gateway's own work
# and loopback round trips on a loaded 2-core machine. Well below a second REDIS_TIMEOUT, so a
# decision that waits out two timeouts in a row (connect, then reply) is caught.
DECISION_MARGIN = 0.25
SETTINGS: dict[str, Any] = {
    "RATE_LIMIT": RATE_LIMIT, "TIME_WINDOW": 60, "REDIS_TIMEOUT": REDIS_TIMEOUT,
    "UPSTREAM_TIMEOUT": UPSTREAM_TIMEOUT, "QUEUE_TIMEOUT": 2, "MAX_CONCURRENT_REQUESTS": 4,
    "SHUTDOWN_TIMEOUT": 2, "LOG_LEVEL": "INFO",
}
LOAD_DEADLINE = 30.0           # seconds one traffic run may last
WAIT_DEADLINE = 15.0           # seconds a condition (slots, fds, recovery) may take
CLIENT_TIMEOUT = 10.0          # longer than anything the gateway may take to answer
# answers the gateway may give; (status, problem "error"), None for the upstream's own
NORMAL = {(200, None), (429, "rate_limited")}
LIMITER_DOWN = (503, "limiter_unavailable")
UPSTREAM_DOWN = (502, "upstream_unreachable")
UPSTREAM_SLOW = (504, "upstream_timeout")
SHED = (503, "queue_timeout")
# plain HTTP only; one context for every client: httpx builds one per transport otherwise, and
# loading the CA store costs more than a request
NO_TLS = ssl.create_default_context()


def traffic_address(n: int) -> str:
    return f"127.1.{n // 250}.{n % 250 + 1}"


@dataclass
class Answer:
    """One request as the client saw it."""

    client: str
    status: int | None                 # None: no response at all (a transport error)
    error: str | None                  # the problem's "error", or the transport error's name
    whole: bool                        # the body arrived complete
    remaining: int | None              # X-RateLimit-Remaining: present only on real decisions
    seconds: float

    @property
    def kind(self) -> tuple[int | None, str | None]:
        return self.status, self.error


async def ask(client: httpx.AsyncClient, address: str, path: str) -> Answer:
    """GET `path`, reading the whole body; a body cut short keeps its status, whole=False."""
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    remaining: int | None = None
    whole = False
    try:
        async with client.stream("GET", path) as response:
            status = response.status_code
            left = response.headers.get("x-ratelimit-remaining")
            remaining = int(left) if left is not None else None
            body = await response.aread()
            whole = True
            if response.headers.get("content-type", "").startswith("application/problem+json"):
                error = json.loads(body).get("error")
    except httpx.TransportError as exc:
        error = type(exc).__name__
    return Answer(address, status, error, whole, remaining, time.monotonic() - started)


def open_client(url: str, address: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=address, verify=NO_TLS)
    return httpx.AsyncClient(base_url=url, transport=transport, timeout=CLIENT_TIMEOUT,
                             trust_env=False)


class Traffic:
    """`concurrency` workers, each taking the next fresh client address and sending
    `per_client` GETs from it one after the other, until stop() or `limit` requests or
    LOAD_DEADLINE. Answers are recorded as they arrive."""

    def __init__(self, url: str, path: str, *, concurrency: int, per_client: int = RATE_LIMIT + 2,
                 limit: int = 600, first_address: int = 0) -> None:
        self.url = url
        self.path = path
        self.concurrency = concurrency
        self.per_client = per_client
        self.limit = limit
        self.answers: list[Answer] = []
        self.by_client: dict[str, list[Answer]] = {}
        self._next = first_address
        self._sent = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        return self

    def stop(self) -> None:
        self._stop.set()

    async def wait(self) -> list[Answer]:
        assert self._task is not None
        await self._task
        return self.answers

    async def finish(self) -> list[Answer]:
        self.stop()
        return await self.wait()

    async def until(self, count: int, deadline: float = LOAD_DEADLINE) -> None:
        """Wait until `count` answers in all have arrived (or the traffic ended)."""
        assert self._task is not None
        end = time.monotonic() + deadline
        while len(self.answers) < count and not self._task.done():
            if time.monotonic() > end:
                raise AssertionError(f"only {len(self.answers)} of {count} answers in {deadline}s")
            await asyncio.sleep(POLL)
        if self._task.done():
            self._task.result()                 # a crashed worker fails the test here

    async def _run(self) -> None:
        await asyncio.wait_for(asyncio.gather(*(self._worker() for _ in range(self.concurrency))),
                               LOAD_DEADLINE)

    async def _worker(self) -> None:
        while not self._stop.is_set() and self._sent < self.limit:
            address = traffic_address(self._next)
            self._next += 1
            answers = self.by_client.setdefault(address, [])
            async with open_client(self.url, address) as client:
                for _ in range(self.per_client):
                    if self._stop.is_set() or self._sent >= self.limit:
                        break
                    self._sent += 1
                    answer = await ask(client, address, self.path)
                    answers.append(answer)
                    self.answers.append(answer)

    def complete_clients(self) -> dict[str, list[Answer]]:
        """The addresses that sent all their requests."""
        return {a: got for a, got in self.by_client.items() if len(got) == self.per_client}


async def until(condition: Callable[[], Awaitable[bool]], what: str,
                deadline: float = WAIT_DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not await condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline}s waiting for {what}")
        await asyncio.sleep(POLL)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def keys_and_ttls(redis_url: str, prefix: str) -> dict[str, int]:
    """Every key under `prefix` (SCAN on the real Redis) with its PTTL in ms (-1: none)."""
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        found = [k async for k in client.scan_iter(match=f"{prefix}:*", count=500)]
        return {k: await client.pttl(k) for k in found}
    finally:
        await client.aclose()


def response_head_length(port: int, path: str = "/") -> int:
    """Bytes of the status line and headers the upstream on `port` sends for GET `path`."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        # keep-alive, like the gateway's requests: a `Connection: close` answer has a longer head
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            assert chunk, f"no complete head from :{port}: {data!r}"
            data += chunk
    return data.index(b"\r\n\r\n") + 4


@dataclass
class Rig:
    """One gateway process, its Redis behind `redis_proxy`, its upstream behind `upstream_proxy`."""

    gateway: Replica
    redis_proxy: FaultProxy
    upstream_proxy: FaultProxy
    upstream: CountingUpstream
    redis_url: str                     # the real Redis, not through the fault proxy
    key_prefix: str
    fail_mode: str
    baseline_fds: int = 0
    log_offset: int = 0
    probes_whole: int = 0              # probe answers relayed whole from the upstream
    probes: Iterator[str] = field(default_factory=lambda: (f"127.2.0.{i}" for i in range(1, 250)))

    @property
    def pid(self) -> int:
        return self.gateway.process.pid

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for sample, value in (await self.samples()).items():
            base, _, rest = sample.partition("{")
            if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    async def samples(self) -> dict[str, float]:
        async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
            text = (await client.get(f"{self.gateway.url}/metrics")).text
        return {m.group(1): float(m.group(2))
                for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    async def slots(self) -> tuple[float, float]:
        samples = await self.samples()
        return samples.get("gateway_upstream_in_flight", -1), samples.get("gateway_queue_waiting", -1)

    async def slots_free(self) -> None:
        last: list[tuple[float, float]] = []

        async def free() -> bool:
            last[:] = [await self.slots()]
            return last[0] == (0, 0)
        try:
            await until(free, "gateway_upstream_in_flight and gateway_queue_waiting back to 0")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: (in flight, waiting) = {last}") from None

    async def warm_up(self, path: str, concurrency: int) -> None:
        """Fill the pools as the scenario's traffic will, then note the baseline fd count."""
        traffic = Traffic(self.gateway.url, path, concurrency=concurrency, per_client=3,
                          limit=concurrency * 6, first_address=10_000)
        answers = await traffic.start().wait()
        assert {a.kind for a in answers} == {(200, None)}, Counter(a.kind for a in answers)
        assert (await self.gateway.health()).status_code == 200
        await self.slots_free()
        self.baseline_fds = fd_count(self.pid)
        self.log_offset = self.log_size()

    async def fds_back(self) -> None:
        last: list[int] = []

        async def back() -> bool:
            last[:] = [fd_count(self.pid)]
            return last[0] <= self.baseline_fds
        try:
            await until(back, "the gateway's fds back to baseline")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {last[0]} open, baseline {self.baseline_fds}; "
                                 f"{sorted(fd_targets(self.pid))}") from None

    async def recovered(self, path: str) -> list[Answer]:
        """Wait until a probe address gets a real decision from Redis, then send RATE_LIMIT + 2
        requests from a fresh address; returns those answers."""
        probe = next(self.probes)

        async def decided() -> bool:
            nonlocal probe
            async with open_client(self.gateway.url, probe) as client:
                answer = await ask(client, probe, path)
            if answer.status == 429:
                probe = next(self.probes)      # spent: the next probe is a fresh address
                return False
            self.probes_whole += answer.status == 200 and answer.whole
            return answer.status == 200 and answer.whole and answer.remaining is not None
        await until(decided, "a real rate-limit decision after healing")
        fresh = "127.3.0.1"
        async with open_client(self.gateway.url, fresh) as client:
            return [await ask(client, fresh, path) for _ in range(RATE_LIMIT + 2)]

    async def keys_without_ttl(self) -> dict[str, int]:
        keys = await keys_and_ttls(self.redis_url, self.key_prefix)
        assert keys, "no keys at all under the test's prefix"
        return {k: t for k, t in keys.items() if t <= 0}

    def log_size(self) -> int:
        return self.gateway.process.log_path.stat().st_size

    def log_since_warm_up(self) -> str:
        with open(self.gateway.process.log_path, "rb") as log:
            log.seek(self.log_offset)
            return log.read().decode("utf-8", "replace")


def fd_targets(pid: int) -> Counter[str]:
    """What the process's fds point at, by kind (socket, pipe, file path)."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds[target.split(":")[0] if ":" in target else target] += 1
    return kinds


async def start_rig(tmp_path: Path, redis_url: str, key_prefix: str, upstream: CountingUpstream,
                    fail_mode: str, stack: list[object]) -> Rig:
    """The fault proxies and the gateway; everything started is appended to `stack` (in order)
    for the caller to stop."""
    target = urlsplit(redis_url)
    assert target.hostname and target.port
    redis_proxy = FaultProxy(target.hostname, target.port).start()
    stack.append(redis_proxy)
    upstream_proxy = FaultProxy("127.0.0.1", upstream.port).start()
    stack.append(upstream_proxy)
    replicas = Replicas(tmp_path, f"redis://127.0.0.1:{redis_proxy.port}/0", key_prefix)
    stack.append(replicas)
    [gateway] = await replicas.start(1, upstream=f"http://127.0.0.1:{upstream_proxy.port}",
                                     RATE_LIMIT_FAIL_MODE=fail_mode, **SETTINGS)
    return Rig(gateway, redis_proxy, upstream_proxy, upstream, redis_url, key_prefix, fail_mode)

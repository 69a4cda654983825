"""Soak run: `./dev soak --minutes N` (or `python -m tools.soak`).

Starts a private redis-server, the demo backend and one `python -m proxy`, with a FaultProxy
between the gateway and each of them. Measures what the whole set-up serves for a few seconds
(closed loop), then drives mixed traffic -- admitted, refused, slow, uploads, clients that
leave early -- paced at 80% of that, while a fault (Redis and upstream ones in turn) is switched
on every minute for about 10 s. One line every ~15 s: the gateway's RSS and fds, its in-flight
and queue gauges, keys without a TTL. At the end: the verdict (flat or not) and exit status 0
(flat, nothing left behind) or 1. Everything it starts is stopped at the end, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx
from redis.asyncio import Redis

from bench.procs import Service, status_kb, wait_ready
from proxy.embedded_redis import RedisProcess, free_port
from tests.faultproxy import FaultProxy

# plain HTTP only; one context for every client: httpx builds one per transport otherwise, and
# loading the CA store costs more than a request
NO_TLS = ssl.create_default_context()
ROOT = Path(__file__).resolve().parent.parent
PREFIX = "soak"
RATE_LIMIT = 100
TIME_WINDOW = 10
ADMITTED_CLIENTS = 200          # 127.10.x.y, round robin: each stays well under its limit
REFUSED_CLIENT = "127.9.0.1"    # far over its limit all the time
MAX_OUTSTANDING = 400           # requests in flight from the driver, beyond that: skipped
DOCUMENTED = {200, 201, 400, 404, 408, 413, 429, 502, 503, 504}
GATEWAY_ENV = {
    "RATE_LIMIT": RATE_LIMIT, "TIME_WINDOW": TIME_WINDOW, "REDIS_TIMEOUT": 0.3,
    "UPSTREAM_TIMEOUT": 2, "QUEUE_TIMEOUT": 2, "MAX_CONCURRENT_REQUESTS": 20,
    "SHUTDOWN_TIMEOUT": 3, "REDIS_KEY_PREFIX": PREFIX, "ACCESS_LOG": "off", "LOG_LEVEL": "INFO",
}
GATEWAY_ENV_POOL = 20          # idle upstream connections kept: MAX_CONCURRENT_REQUESTS
# (side, name, FaultProxy.set() arguments, also cut the open connections)
FAULTS: list[tuple[str, str, dict[str, object], bool]] = [
    ("redis", "redis latency 0.5s", {"latency_down": 0.5}, False),
    ("upstream", "upstream latency 3s", {"latency_down": 3.0}, False),
    ("redis", "redis blackhole", {"blackhole": True}, False),
    ("upstream", "upstream reset mid-body", {"reset_after_down": 150, "reset_pause": 0.1}, False),
    ("redis", "redis reset after the first reply", {"reset_after_down": 7}, False),
    ("upstream", "upstream blackhole", {"blackhole": True}, False),
    ("redis", "redis refuses", {"refuse": True}, True),
    ("upstream", "upstream refuses", {"refuse": True}, True),
    ("redis", "redis half-close", {"half_close_after_down": 0}, False),
    ("upstream", "upstream half-close", {"half_close_after_down": 0}, False),
]


@dataclass(frozen=True)
class Profile:
    seconds: float
    measure: float = 5.0           # seconds of closed-loop capacity measurement
    sample_every: float = 15.0
    fault_every: float = 60.0
    fault_length: float = 10.0
    warm_up: float = 30.0          # samples before this are left out of the verdict
    share: float = 0.8             # of the measured capacity


@dataclass
class Sample:
    at: float
    rss_kib: int
    fds: int
    in_flight: float
    waiting: float
    ttl_less: int
    keys: int
    rate: float
    fault: str


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    done: int = 0
    skipped: int = 0

    def add(self, what: str) -> None:
        self.statuses[what] += 1
        self.done += 1


class Rig:
    """The processes and proxies of one soak run; stop() undoes start(), in reverse."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.redis = RedisProcess(port=free_port())
        self.backend_port = free_port()
        self.gateway_port = free_port()
        self.redis_proxy: FaultProxy | None = None
        self.upstream_proxy: FaultProxy | None = None
        self.backend: Service | None = None
        self.gateway: Service | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def start(self) -> None:
        self.redis.start()
        assert self.redis.port is not None
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.backend = Service("backend", [sys.executable, "-m", "backend"],
                               env={**env, "BACKEND_HOST": "127.0.0.1",
                                    "BACKEND_PORT": str(self.backend_port)},
                               cwd=self.workdir, log_dir=self.workdir).start()
        wait_ready(self.backend, "127.0.0.1", self.backend_port, "/health")
        self.redis_proxy = FaultProxy("127.0.0.1", self.redis.port).start()
        self.upstream_proxy = FaultProxy("127.0.0.1", self.backend_port).start()
        gateway_env = {k: v for k, v in env.items() if not k.startswith(("GATEWAY_", "REDIS_"))}
        gateway_env.update({k: str(v) for k, v in GATEWAY_ENV.items()})
        gateway_env.update({
            "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(self.gateway_port),
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_proxy.port}/0",
            "UPSTREAM_BACKEND_URL": f"http://127.0.0.1:{self.upstream_proxy.port}"})
        self.gateway = Service("gateway", [sys.executable, "-m", "proxy"], env=gateway_env,
                               cwd=self.workdir, log_dir=self.workdir).start()
        wait_ready(self.gateway, "127.0.0.1", self.gateway_port, "/health")
        print(f"soak: redis-server pid {self.redis.pid}, backend pid {self.backend.pid}, "
              f"gateway pid {self.gateway.pid} at {self.url}", flush=True)

    def heal(self) -> None:
        for proxy in (self.redis_proxy, self.upstream_proxy):
            if proxy is not None:
                proxy.set()

    def stop(self) -> None:
        for service in (self.gateway, self.backend):
            if service is not None:
                service.stop()
        for proxy in (self.upstream_proxy, self.redis_proxy):
            if proxy is not None:
                proxy.stop()
        self.redis.stop()


class Driver:
    """The traffic mix, one request at a time, from the right client address."""

    def __init__(self, url: str, tally: Tally, seed: int = 1) -> None:
        self.url = url
        self.tally = tally
        self.random = random.Random(seed)
        self.clients: dict[str, httpx.AsyncClient] = {}
        self.addresses = (f"127.10.{i // 250}.{i % 250 + 1}" for i in _forever())
        self.pool = [next(self.addresses) for _ in range(ADMITTED_CLIENTS)]
        self.turn = 0
        self.upload = b'{"pad": "' + b"x" * 4_000 + b'"}'     # read whole upstream, then 400

    def client(self, address: str) -> httpx.AsyncClient:
        client = self.clients.get(address)
        if client is None:
            transport = httpx.AsyncHTTPTransport(local_address=address, verify=NO_TLS)
            client = self.clients[address] = httpx.AsyncClient(
                base_url=self.url, transport=transport, timeout=15, trust_env=False)
        return client

    def admitted(self) -> httpx.AsyncClient:
        self.turn = (self.turn + 1) % len(self.pool)
        return self.client(self.pool[self.turn])

    async def one(self) -> None:
        roll = self.random.random()
        try:
            if roll < 0.55:
                await self._get(self.admitted(), "/products/")
            elif roll < 0.80:
                await self._get(self.client(REFUSED_CLIENT), "/users/1")
            elif roll < 0.88:
                await self._get(self.admitted(), "/slow?delay=0.3")
            elif roll < 0.96:
                response = await self.admitted().post("/users/", content=self.upload,
                                                      headers={"content-type": "application/json"})
                self.tally.add(str(response.status_code))
            else:
                await self._leave_early(self.admitted())
        except httpx.TransportError as exc:
            self.tally.add(type(exc).__name__)

    async def _get(self, client: httpx.AsyncClient, path: str) -> None:
        response = await client.get(path)
        self.tally.add(str(response.status_code))

    async def _leave_early(self, client: httpx.AsyncClient) -> None:
        """A client that gives up on a slow answer: its connection is closed mid-request."""
        try:
            await asyncio.wait_for(client.get("/slow?delay=1"), 0.2)
            self.tally.add("200")
        except asyncio.TimeoutError:
            self.tally.add("left")

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients.values()))


def _forever() -> Iterator[int]:
    n = 0
    while True:
        yield n
        n += 1


async def measure_capacity(driver: Driver, seconds: float, concurrency: int = 32) -> float:
    """Requests per second the whole set-up completes with `concurrency` always waiting."""
    end = time.monotonic() + seconds
    start_done = driver.tally.done

    async def worker() -> None:
        while time.monotonic() < end:
            await driver.one()
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (driver.tally.done - start_done) / (time.monotonic() - started)


async def paced(driver: Driver, rate: float, until: float) -> None:
    """Open loop: requests started at `rate` per second until the monotonic time `until`, at
    most MAX_OUTSTANDING in flight (the rest counted as skipped)."""
    tasks: set[asyncio.Task[None]] = set()
    interval = 1 / rate
    due = time.monotonic()
    try:
        while (now := time.monotonic()) < until:
            while due <= now:
                due += interval
                if len(tasks) >= MAX_OUTSTANDING:
                    driver.tally.skipped += 1
                    continue
                task = asyncio.create_task(driver.one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(min(0.01, max(0.0, due - time.monotonic())))
    finally:
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        for task in tasks:
            task.cancel()


async def gauges(url: str) -> tuple[float, float]:
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        text = (await client.get(f"{url}/metrics")).text
    found = dict(re.findall(r"^(gateway_upstream_in_flight|gateway_queue_waiting) (\S+)$", text,
                            re.MULTILINE))
    return float(found.get("gateway_upstream_in_flight", -1)), \
        float(found.get("gateway_queue_waiting", -1))


async def ttl_less_keys(redis: Redis) -> tuple[int, int]:
    """(keys without a TTL, all keys) under the gateway's prefix, on the real Redis."""
    keys = ttl_less = 0
    async for key in redis.scan_iter(match=f"{PREFIX}:*", count=1000):
        keys += 1
        if await redis.pttl(key) == -1:
            ttl_less += 1
    return ttl_less, keys


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Faults:
    """Switches the next fault of FAULTS on every `every` seconds for `length` seconds."""

    def __init__(self, rig: Rig, every: float, length: float) -> None:
        self.rig = rig
        self.every = every
        self.length = length
        self.current = "-"
        self.index = 0

    async def run(self, until: float, settle: float) -> None:
        """Faults centred in each period; none that would not be over `settle` s before the end."""
        start = time.monotonic() + (self.every - self.length) / 2
        try:
            while start + self.length + settle <= until:
                await asyncio.sleep(max(0.0, start - time.monotonic()))
                side, name, settings, cut = FAULTS[self.index % len(FAULTS)]
                self.index += 1
                proxy = self.rig.redis_proxy if side == "redis" else self.rig.upstream_proxy
                assert proxy is not None
                proxy.set(**settings)
                if cut:
                    proxy.cut()
                self.current = name
                print(f"soak: fault on: {name}", flush=True)
                await asyncio.sleep(self.length)
                proxy.set()
                self.current = "-"
                print(f"soak: healed: {name}", flush=True)
                start += self.every
        finally:
            self.rig.heal()


async def soak(rig: Rig, profile: Profile) -> bool:
    assert rig.gateway is not None
    pid = rig.gateway.pid
    tally = Tally()
    driver = Driver(rig.url, tally)
    redis = Redis.from_url(rig.redis.url)
    samples: list[Sample] = []
    idle_fds = fd_count(pid)
    try:
        capacity = await measure_capacity(driver, profile.measure)
        rate = max(1.0, capacity * profile.share)
        print(f"soak: capacity {capacity:.0f} req/s (closed loop, 32 clients, this mix); "
              f"pacing at {rate:.0f} req/s for {profile.seconds:g}s, a fault every "
              f"{profile.fault_every:g}s for {profile.fault_length:g}s", flush=True)
        started = time.monotonic()
        until = started + profile.seconds
        faults = Faults(rig, profile.fault_every, profile.fault_length)
        traffic = asyncio.create_task(paced(driver, rate, until))
        fault_task = asyncio.create_task(faults.run(until, profile.sample_every))
        print(f"{'t/s':>6} {'rss MiB':>8} {'fds':>5} {'inflight':>8} {'queue':>6} "
              f"{'keys':>6} {'no-TTL':>6} {'req/s':>7}  fault", flush=True)
        last_done, last_at = tally.done, started
        while not traffic.done():
            await asyncio.wait({traffic}, timeout=profile.sample_every)
            now = time.monotonic()
            in_flight, waiting = await gauges(rig.url)
            ttl_less, keys = await ttl_less_keys(redis)
            sample = Sample(now - started, status_kb(pid, "VmRSS") or 0,
                            fd_count(pid), in_flight, waiting, ttl_less,
                            keys, (tally.done - last_done) / max(1e-9, now - last_at),
                            faults.current)
            last_done, last_at = tally.done, now
            samples.append(sample)
            print(f"{sample.at:6.0f} {sample.rss_kib / 1024:8.1f} {sample.fds:5d} "
                  f"{sample.in_flight:8g} {sample.waiting:6g} {sample.keys:6d} "
                  f"{sample.ttl_less:6d} {sample.rate:7.0f}  {sample.fault}", flush=True)
        await traffic
        await fault_task
        await driver.aclose()
        return await verdict(rig, redis, samples, tally, profile, idle_fds)
    finally:
        await driver.aclose()
        await redis.aclose()


async def verdict(rig: Rig, redis: Redis, samples: list[Sample], tally: Tally,
                  profile: Profile, idle_fds: int) -> bool:
    """Print the verdict; True when flat and nothing was left behind. Called with the traffic
    stopped and the driver's connections closed."""
    assert rig.gateway is not None
    deadline = time.monotonic() + 15
    in_flight = waiting = -1.0
    fds = 0
    idle_bound = idle_fds + GATEWAY_ENV_POOL + 2        # the upstream pool may stay filled
    while time.monotonic() < deadline:
        in_flight, waiting = await gauges(rig.url)
        fds = fd_count(rig.gateway.pid)
        if (in_flight, waiting) == (0, 0) and fds <= idle_bound:
            break
        await asyncio.sleep(0.1)
    ttl_less, keys = await ttl_less_keys(redis)
    # the flatness of the run: samples after warm-up taken with no fault on
    steady = [s for s in samples if s.at >= profile.warm_up and s.fault == "-"] or samples
    third = max(1, len(steady) // 3)
    first, last = steady[:third], steady[-third:]
    rss_first = statistics.median(s.rss_kib for s in first) / 1024
    rss_last = statistics.median(s.rss_kib for s in last) / 1024
    fds_first = statistics.median(s.fds for s in first)
    fds_last = statistics.median(s.fds for s in last)
    rss_flat = rss_last <= rss_first * 1.10 + 4
    fds_flat = fds_last <= fds_first + 10
    no_ttl_ever = max(s.ttl_less for s in samples) if samples else 0
    odd = {k: v for k, v in tally.statuses.items() if k.isdigit() and int(k) not in DOCUMENTED}
    print(f"soak: {tally.done} requests {dict(tally.statuses.most_common())}, "
          f"{tally.skipped} skipped (driver at its limit)")
    print(f"soak: RSS median {rss_first:.1f} MiB in the first third after warm-up, "
          f"{rss_last:.1f} MiB in the last ({'flat' if rss_flat else 'GROWING'}; bound +10% +4 MiB)")
    print(f"soak: fds median {fds_first:g} first third, {fds_last:g} last "
          f"({'flat' if fds_flat else 'GROWING'}; bound +10)")
    print(f"soak: keys without TTL: {no_ttl_ever} at worst during the run, {ttl_less} of "
          f"{keys} at the end")
    print(f"soak: at the end in-flight {in_flight:g}, queue {waiting:g}; fds {fds} with the "
          f"clients gone ({idle_fds} before any traffic, bound {idle_bound})")
    if odd:
        print(f"soak: undocumented statuses {odd}")
    ok = (rss_flat and fds_flat and fds <= idle_bound and no_ttl_ever == 0 and ttl_less == 0
          and (in_flight, waiting) == (0, 0) and not odd)
    print(f"soak: verdict {'FLAT, nothing left behind' if ok else 'NOT OK'}", flush=True)
    return ok


def parse(argv: list[str] | None) -> Profile:
    parser = argparse.ArgumentParser(prog="./dev soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the paced run")
    parser.add_argument("--seconds", type=float, help="length in seconds (overrides --minutes)")
    parser.add_argument("--measure", type=float, default=5.0, help="capacity measurement, s")
    parser.add_argument("--sample-every", type=float, default=15.0)
    parser.add_argument("--fault-every", type=float, default=60.0)
    parser.add_argument("--fault-length", type=float, default=10.0)
    parser.add_argument("--warm-up", type=float, default=30.0,
                        help="seconds of samples left out of the verdict")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    return Profile(seconds, args.measure, args.sample_every, args.fault_every,
                   args.fault_length, args.warm_up)


def main(argv: list[str] | None = None) -> int:
    profile = parse(argv)
    # SIGTERM like Ctrl-C: unwind through the finally below, which stops everything
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    rig = Rig(workdir)
    ok = False
    try:
        rig.start()
        ok = asyncio.run(soak(rig, profile))
    except KeyboardInterrupt:
        print("soak: interrupted; stopping everything", flush=True)
        return 130
    finally:
        rig.stop()
        print("soak: stopped redis-server, backend, gateway and the fault proxies", flush=True)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"soak: logs kept in {workdir}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

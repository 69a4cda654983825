"""Several gateway replicas (separate ``python -m proxy`` processes) sharing one Redis enforce ONE
limit, exactly, and keep doing so through faults. Everything runs as real processes on loopback;
client IPs are played by binding clients to 127.0.0.2, 127.0.0.3 ...; every load is bounded in
count and time; every wait polls a condition with a deadline.

What each test proves:

* contention -- 300 concurrent requests from one client, round-robin over 3 replicas (1 or 2
  Hypercorn workers each), limit 50: exactly 50 reach the upstream, exactly 250 get 429 with an
  integer Retry-After in [1, 60], and the 50 admitted saw the remaining budgets 49..0 once each
  (one counter, no lost or double counts).
* isolation -- three client IPs each get their own budget, shared by all replicas; an
  X-Forwarded-For / Forwarded sent by these untrusted peers changes neither the key nor what the
  upstream is told.
* SCRIPT FLUSH mid-run -- the limiter reloads its script (NOSCRIPT) transparently: no 5xx, the
  limit still holds exactly.
* Redis restart, fail open -- during the outage requests are admitted (no 5xx); once Redis is
  back every replica enforces limits again without being restarted; no key is left without a TTL.
* Redis down, fail closed -- every replica answers 503 limiter_unavailable and reports DEGRADED
  on /health; when Redis returns they recover without a restart.
* SIGKILL of one replica mid-run -- the survivors keep serving, and what was admitted in total
  (including the victim's requests that had reached the upstream) equals the limit exactly; every
  key keeps its TTL.
* upstream stopped and restarted -- 502 upstream_unreachable while it is down, 200 once it is
  back on the same port, with the same gateway processes.
* MAX_CONCURRENT_REQUESTS with 2 workers -- the cap is per process: at most 2 x 2 requests are
  ever in flight upstream.
"""
from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

import httpx
import pytest
from redis.asyncio import Redis

from integration.conftest import (POLL, CountingUpstream, DemoBackend, RedisSource, Replica,
                                  Replicas)
from integration.faults import keys_and_ttls

LOAD_DEADLINE = 90.0          # seconds any one load run may take
WAIT_DEADLINE = 30.0          # seconds any one condition may take to become true
CLIENT = "127.0.0.2"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    replica: int
    status: int | None                # None: the request failed at the transport level
    error: str | None                 # problem+json "error", or the transport exception's name
    retry_after: str | None
    remaining: str | None
    sent: float
    done: float

    @property
    def server_error(self) -> bool:
        return self.status is not None and self.status >= 500


async def call(client: httpx.AsyncClient, replica: int, path: str,
               headers: dict[str, str] | None = None) -> Outcome:
    sent = time.monotonic()
    try:
        response = await client.get(path, headers=headers)
    except httpx.TransportError as exc:
        return Outcome(replica, None, type(exc).__name__, None, None, sent, time.monotonic())
    error = None
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        error = response.json().get("error")
    return Outcome(replica, response.status_code, error, response.headers.get("retry-after"),
                   response.headers.get("x-ratelimit-remaining"), sent, time.monotonic())


async def load(clients: Sequence[httpx.AsyncClient], total: int, path: str, *,
               concurrency: int, results: list[Outcome] | None = None,
               stop: asyncio.Event | None = None,
               headers: Callable[[int], dict[str, str]] | None = None,
               replica_ids: Sequence[int] | None = None,
               gate: asyncio.Event | None = None,
               on_result: Callable[[int], Awaitable[None]] | None = None) -> list[Outcome]:
    """`total` GETs of `path`, request i to clients[i % n], at most `concurrency` at once;
    ends early when `stop` is set; bounded by LOAD_DEADLINE. Outcomes are appended to
    `results` as they complete. A request is sent only while `gate` is set; `on_result(n)` is
    awaited after the n-th outcome is recorded."""
    results = [] if results is None else results
    ids = list(replica_ids) if replica_ids is not None else list(range(len(clients)))
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            if gate is not None:
                await gate.wait()
            if stop is not None and stop.is_set():
                return
            k = i % len(clients)
            results.append(await call(clients[k], ids[k], path, headers(i) if headers else None))
            if on_result is not None:
                await on_result(len(results))

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(total))), LOAD_DEADLINE)
    return results


async def until(condition: Callable[[], object], what: str,
                deadline: float = WAIT_DEADLINE) -> None:
    """Poll `condition` (sync or async) until true; fail naming `what` after the deadline."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline}s waiting for {what}")
        await asyncio.sleep(POLL)


def tally(outcomes: Sequence[Outcome]) -> Counter[int | str | None]:
    return Counter(o.status if o.status is not None else o.error for o in outcomes)


def key(prefix: str, client: str) -> str:
    return f"{prefix}:fw1:{{{client}}}"


async def get_value(redis_url: str, name: str) -> str | None:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        value = await client.get(name)
        return value if value is None else str(value)
    finally:
        await client.aclose()


async def close_all(clients: Sequence[httpx.AsyncClient]) -> None:
    await asyncio.gather(*(c.aclose() for c in clients))


def assert_limit_responses(outcomes: Sequence[Outcome], window: int) -> None:
    """Every 429 is a rate_limited problem with an integer Retry-After in [1, window]."""
    for o in outcomes:
        if o.status == 429:
            assert o.error == "rate_limited", o
            assert o.retry_after is not None and o.retry_after.isdigit(), o
            assert 1 <= int(o.retry_after) <= window, o


# ----------------------------------------------------------------------------------------------
# exactness and isolation
# ----------------------------------------------------------------------------------------------

@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [1, 2], ids=["1worker", "2workers"])
async def test_one_limit_exactly_under_contention(replicas: Replicas, upstream: CountingUpstream,
                                                  redis_url: str, key_prefix: str,
                                                  workers: int) -> None:
    group = await replicas.start(3, upstream=upstream.url, RATE_LIMIT=50, TIME_WINDOW=60,
                                 GATEWAY_WORKERS=workers)
    clients = [r.client(CLIENT) for r in group]
    try:
        outcomes = await load(clients, 300, "/api/contention", concurrency=300)
    finally:
        await close_all(clients)
    counts = await upstream.counts()
    statuses = tally(outcomes)
    remaining = sorted(int(o.remaining) for o in outcomes if o.status == 200 and o.remaining)
    retry_after = Counter(int(o.retry_after) for o in outcomes if o.status == 429 and o.retry_after)
    print(f"\n[contention workers={workers}] responses {dict(statuses)}; upstream received "
          f"{counts['paths']}; per replica 200s "
          f"{dict(Counter(o.replica for o in outcomes if o.status == 200))}; Retry-After values "
          f"{dict(sorted(retry_after.items()))}")
    assert statuses == {200: 50, 429: 250}
    assert counts["paths"] == {"/api/contention": 50}
    assert counts["clients"] == {CLIENT: 50}
    assert remaining == list(range(50))                # one counter: 49, 48, ... 0, each once
    assert_limit_responses(outcomes, 60)
    assert await get_value(redis_url, key(key_prefix, CLIENT)) == "50"
    ttls = await keys_and_ttls(redis_url, key_prefix)
    assert list(ttls) == [key(key_prefix, CLIENT)] and all(t > 0 for t in ttls.values()), ttls


@pytest.mark.timeout(120)
async def test_each_client_ip_has_its_own_budget_on_every_replica(
        replicas: Replicas, upstream: CountingUpstream, redis_url: str, key_prefix: str) -> None:
    """Limit 5. Three client IPs send 12 requests each, round-robin over 3 replicas, every one
    with forged X-Forwarded-For / Forwarded naming someone else. Untrusted peers: the forged
    headers change neither whose budget is used nor what the upstream is told."""
    sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    group = await replicas.start(3, upstream=upstream.url, RATE_LIMIT=5, TIME_WINDOW=60)

    def forged(source: str) -> Callable[[int], dict[str, str]]:
        others = [s for s in sources if s != source] + ["127.0.0.1", "10.1.2.3"]
        return lambda i: {"X-Forwarded-For": f"203.0.113.{i}, {others[i % len(others)]}",
                          "Forwarded": f'for="198.51.100.{i}"'}

    clients = {s: [r.client(s) for r in group] for s in sources}
    try:
        runs = await asyncio.gather(*(load(clients[s], 12, "/api/iso", concurrency=12,
                                           headers=forged(s)) for s in sources))
        by_source = dict(zip(sources, runs))
        # afterwards: each exhausted client is refused by every replica ...
        after = {}
        for s in sources:                     # a loop: Python 3.10 has no nested async comprehension
            after[s] = [await call(c, r.index, "/api/iso") for c, r in zip(clients[s], group)]
    finally:
        await close_all([c for cs in clients.values() for c in cs])
    # ... while a fresh client IP is still admitted by every replica
    fresh = [r.client("127.0.0.5") for r in group]
    try:
        newcomer = [await call(c, r.index, "/api/iso") for c, r in zip(fresh, group)]
    finally:
        await close_all(fresh)
    counts = await upstream.counts()
    for s in sources:
        print(f"\n[isolation] {s}: {dict(tally(by_source[s]))}, then "
              f"{[o.status for o in after[s]]} from the 3 replicas")
    print(f"[isolation] 127.0.0.5: {[o.status for o in newcomer]}; upstream saw "
          f"X-Forwarded-For {counts['clients']}")
    for s in sources:
        assert tally(by_source[s]) == {200: 5, 429: 7}, s
        assert sorted(int(o.remaining) for o in by_source[s] if o.status == 200 and o.remaining) \
            == [0, 1, 2, 3, 4]
        assert_limit_responses(by_source[s], 60)
        assert [o.status for o in after[s]] == [429, 429, 429], s
    assert [o.status for o in newcomer] == [200, 200, 200]
    assert counts["clients"] == {"127.0.0.2": 5, "127.0.0.3": 5, "127.0.0.4": 5, "127.0.0.5": 3}
    ttls = await keys_and_ttls(redis_url, key_prefix)
    assert sorted(ttls) == sorted(key(key_prefix, s) for s in [*sources, "127.0.0.5"]), ttls
    assert all(t > 0 for t in ttls.values()), ttls


# ----------------------------------------------------------------------------------------------
# Redis faults
# ----------------------------------------------------------------------------------------------

@pytest.mark.timeout(180)
async def test_script_flush_mid_run_keeps_the_limit_exact(
        replicas: Replicas, upstream: CountingUpstream, redis_url: str, key_prefix: str) -> None:
    """300 requests, 10 at a time, over 3 replicas, limit 50. SCRIPT FLUSH runs twice while
    requests are in flight: after the 10th response (budget left: at most 19 admitted so far,
    since no new request starts until the flush returned) and after the 150th (refusing by then).
    Every replica's next EVALSHA meets NOSCRIPT and reloads the script transparently."""
    group = await replicas.start(3, upstream=upstream.url, RATE_LIMIT=50, TIME_WINDOW=60)
    clients = [r.client(CLIENT) for r in group]
    admin = Redis.from_url(redis_url)
    outcomes: list[Outcome] = []
    gate = asyncio.Event()
    gate.set()
    flushes: list[dict[str, int]] = []

    async def flush_at(n: int) -> None:
        if n in (10, 150):
            gate.clear()                     # no new request starts; those in flight go on
            await admin.script_flush()
            flushes.append({"after": n, "admitted": sum(o.status == 200 for o in outcomes),
                            "refused": sum(o.status == 429 for o in outcomes)})
            gate.set()

    try:
        await load(clients, 300, "/api/flush", concurrency=10, results=outcomes, gate=gate,
                   on_result=flush_at)
        reloads = [await r.metric("gateway_script_reloads_total") for r in group]
    finally:
        await admin.aclose()
        await close_all(clients)
    counts = await upstream.counts()
    statuses = tally(outcomes)
    print(f"\n[script flush] flushes {flushes}; responses {dict(statuses)}; upstream received "
          f"{counts['paths']}; script reloads per replica {reloads}")
    assert len(flushes) == 2
    assert flushes[0]["admitted"] < 50 and flushes[1]["refused"] > 0
    assert not [o for o in outcomes if o.server_error or o.status is None]
    assert statuses == {200: 50, 429: 250}
    assert counts["paths"] == {"/api/flush": 50}
    assert sorted(int(o.remaining) for o in outcomes if o.status == 200 and o.remaining) \
        == list(range(50))
    assert_limit_responses(outcomes, 60)
    # the first flush meets clients still under the limit (NOSCRIPT, reload); after the budget is
    # spent, refusals come from each replica's deny cache and never reach Redis
    assert sum(reloads) >= 1
    ttls = await keys_and_ttls(redis_url, key_prefix)
    assert list(ttls) == [key(key_prefix, CLIENT)] and all(t > 0 for t in ttls.values()), ttls


@pytest.mark.timeout(180)
async def test_redis_restart_fail_open(replicas: Replicas, upstream: CountingUpstream,
                                       redis_source: RedisSource, redis_url: str,
                                       key_prefix: str) -> None:
    """Fail open: while Redis is down requests are admitted (and nothing answers 5xx); when it
    is back (empty: no persistence), every replica enforces the limit again without a restart,
    and every key the gateways wrote carries a TTL."""
    # the budget must outlast the run-up: a client refused before the outage would stay refused
    # through it (each replica remembers refusals until the window ends, by design)
    group = await replicas.start(3, upstream=upstream.url, RATE_LIMIT=40, TIME_WINDOW=60,
                                 RATE_LIMIT_FAIL_MODE="open")
    pids = [r.process.pid for r in group]
    clients = [r.client(CLIENT) for r in group]
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    gate = asyncio.Event()
    gate.set()
    stopped = math.inf

    async def outage_after_ten_admitted(n: int) -> None:
        # decided on each response, not by polling: at ~1,000 responses/s a poll interval lets
        # the run-up spend the whole budget, and a replica refused before the outage would
        # answer from its deny cache through it without ever meeting the dead Redis
        nonlocal stopped
        if gate.is_set() and stopped == math.inf and sum(o.status == 200 for o in outcomes) >= 10:
            gate.clear()                     # no new request starts; those in flight go on
            await asyncio.to_thread(redis_source.stop)
            stopped = time.monotonic()
            gate.set()

    try:
        run = asyncio.create_task(load(clients, 3000, "/api/open", concurrency=4,
                                       results=outcomes, stop=stop, gate=gate,
                                       on_result=outage_after_ten_admitted))
        await until(lambda: stopped < math.inf, "the limiter to admit requests before the outage")
        await until(lambda: sum(o.sent >= stopped for o in outcomes) >= 30,
                    "30 responses during the outage")
        restarting = time.monotonic()
        redis_source.start()
        started = time.monotonic()

        def refused_by_each() -> bool:
            return {o.replica for o in outcomes if o.sent >= started and o.status == 429} \
                == {r.index for r in group}
        await until(lambda: refused_by_each() or run.done(),
                    "a 429 from every replica after the restart")
        stop.set()
        await run
        errors = [await r.metric("gateway_redis_errors_total") for r in group]
    finally:
        stop.set()
        await close_all(clients)
    before = [o for o in outcomes if o.done < stopped]
    outage = [o for o in outcomes if o.sent >= stopped and o.done < restarting]
    after = [o for o in outcomes if o.sent >= started]
    admitted_after = sum(o.status == 200 for o in after)
    ttls = await keys_and_ttls(redis_url, key_prefix)
    print(f"\n[redis restart, fail open] before {dict(tally(before))}; during the outage "
          f"{dict(tally(outage))}; after the restart {dict(tally(after))} ({admitted_after} admitted "
          f"before the limit bit again); redis errors per replica {errors}; keys {ttls}")
    assert refused_by_each(), "the load ended before every replica refused again"
    assert not [o for o in outcomes if o.server_error or o.status is None], tally(outcomes)
    assert outage and all(o.status == 200 for o in outage), tally(outage)
    assert all(e > 0 for e in errors)               # every replica really saw the outage
    assert all(r.process.alive for r in group) and [r.process.pid for r in group] == pids
    assert ttls and all(t > 0 for t in ttls.values()), ttls
    assert_limit_responses(outcomes, 60)


@pytest.mark.timeout(180)
async def test_redis_down_fail_closed(replicas: Replicas, upstream: CountingUpstream,
                                      redis_source: RedisSource, redis_url: str) -> None:
    """Fail closed: with Redis stopped every replica answers 503 limiter_unavailable
    (Retry-After: 1) and /health says DEGRADED; once Redis is back they recover by themselves."""
    group = await replicas.start(3, upstream=upstream.url, RATE_LIMIT=100, TIME_WINDOW=60,
                                 RATE_LIMIT_FAIL_MODE="closed")
    pids = [r.process.pid for r in group]
    clients = [r.client(CLIENT) for r in group]
    try:
        baseline = [await call(c, r.index, "/api/closed") for c, r in zip(clients, group)]
        redis_source.stop()
        down = [await call(c, r.index, "/api/closed") for _ in range(3)
                for c, r in zip(clients, group)]
        health_down: list[dict[str, object]] = []
        for r in group:
            last: list[httpx.Response] = []

            async def degraded(r: Replica = r, last: list[httpx.Response] = last) -> bool:
                last[:] = [await r.health()]
                return bool(last[0].json()["redis_status"] == "Disconnected")
            await until(degraded, f"replica{r.index} /health to see Redis down")
            assert last[0].status_code == 503
            health_down.append(last[0].json())
        redis_source.start()
        polls = Counter[int]()
        for c, r in zip(clients, group):
            async def admitted(c: httpx.AsyncClient = c, r: Replica = r) -> bool:
                polls[r.index] += 1
                return (await call(c, r.index, "/api/closed")).status == 200
            await until(admitted, f"replica{r.index} to admit again")
        recovered = [await call(c, r.index, "/api/closed") for c, r in zip(clients, group)]
        health_up = []
        for r in group:
            await until(partial(_health_ok, r), f"replica{r.index} /health OK again")
            health_up.append((await r.health()).status_code)
    finally:
        await close_all(clients)
    print(f"\n[redis down, fail closed] baseline {[o.status for o in baseline]}; with Redis down "
          f"{dict(Counter((o.status, o.error, o.retry_after) for o in down))}; /health "
          f"{[(h['status'], h['redis_status']) for h in health_down]}; requests until admitted "
          f"again per replica {dict(polls)}; then {[o.status for o in recovered]}, /health "
          f"{health_up}")
    assert [o.status for o in baseline] == [200, 200, 200]
    assert all((o.status, o.error, o.retry_after) == (503, "limiter_unavailable", "1")
               for o in down), down
    assert {o.replica for o in down} == {0, 1, 2}
    assert all(h["status"] == "DEGRADED" and h["redis_status"] == "Disconnected"
               and h["backend_status"] == "Connected" for h in health_down), health_down
    assert [o.status for o in recovered] == [200, 200, 200]
    assert health_up == [200, 200, 200]
    assert all(r.process.alive for r in group) and [r.process.pid for r in group] == pids


async def _health_ok(replica: Replica) -> bool:
    response = await replica.health()
    return response.status_code == 200 and response.json()["redis_status"] == "Connected"


# ----------------------------------------------------------------------------------------------
# process faults
# ----------------------------------------------------------------------------------------------

@pytest.mark.timeout(180)
async def test_sigkill_of_one_replica_mid_run(replicas: Replicas, upstream: CountingUpstream,
                                              redis_url: str, key_prefix: str) -> None:
    """Limit 30. Six requests through the victim are held at the upstream (admitted and
    forwarded); while 90 requests run through the two survivors, the victim gets SIGKILL. Its
    clients lose their connections, the survivors never fail, and admitted in total (what reached
    the upstream, the Redis counter) is exactly 30: 6 through the victim + 24 through the others."""
    group = await replicas.start(3, upstream=upstream.url, RATE_LIMIT=30, TIME_WINDOW=60)
    victim, survivors = group[2], group[:2]
    victim_client = victim.client(CLIENT)
    clients = [r.client(CLIENT) for r in survivors]
    outcomes: list[Outcome] = []
    try:
        held = [asyncio.create_task(call(victim_client, victim.index, "/hold/victim"))
                for _ in range(6)]

        async def all_held() -> bool:
            return bool((await upstream.counts())["in_flight"] == 6)
        await until(all_held, "the victim's 6 requests to be held at the upstream")
        gate = asyncio.Event()
        gate.set()
        killed: list[tuple[int, int]] = []      # (survivor responses so far, exit status)

        async def kill_after_ten(n: int) -> None:
            # on the 10th response itself, not by polling: 90 fast requests can all finish
            # within one poll interval
            if n == 10:
                gate.clear()                 # no new request starts; those in flight go on
                killed.append((n, await asyncio.to_thread(victim.process.kill)))
                gate.set()

        run = asyncio.create_task(load(clients, 90, "/api/kill", concurrency=6,
                                       results=outcomes, replica_ids=[0, 1], gate=gate,
                                       on_result=kill_after_ten))
        await until(lambda: killed, "10 responses from the survivors, then the kill")
        killed_after, status = killed[0]
        lost = await asyncio.wait_for(asyncio.gather(*held), WAIT_DEADLINE)
        probe = await call(victim_client, victim.index, "/api/kill")
        await run
    finally:
        await close_all([victim_client, *clients])
        await upstream.release()
    counts = await upstream.counts()
    statuses = tally(outcomes)
    ttls = await keys_and_ttls(redis_url, key_prefix)
    counter = await get_value(redis_url, key(key_prefix, CLIENT))
    print(f"\n[sigkill] victim exit {status} after {killed_after} survivor responses; victim's "
          f"held requests {[o.error for o in lost]}; probe after the kill {probe.error}; survivors "
          f"{dict(statuses)}; upstream received {counts['paths']}; redis counter {counter}; "
          f"keys {ttls}")
    assert status == -9
    assert all(o.status is None for o in lost)          # their connections died with the victim
    assert probe.status is None and probe.error == "ConnectError"
    assert statuses == {200: 24, 429: 66}
    assert counts["paths"] == {"/hold/victim": 6, "/api/kill": 24}
    assert sum(counts["paths"].values()) == 30 and counter == "30"
    assert_limit_responses(outcomes, 60)
    assert list(ttls) == [key(key_prefix, CLIENT)] and all(t > 0 for t in ttls.values()), ttls
    assert all(r.process.alive for r in survivors)


@pytest.mark.timeout(120)
async def test_upstream_stopped_and_restarted(replicas: Replicas, backend: DemoBackend) -> None:
    """The demo backend (``python -m backend``) is stopped: every replica answers 502
    upstream_unreachable and /health reports the backend Disconnected; started again on the same
    port, every replica answers 200 again, with no gateway restarted."""
    group = await replicas.start(2, upstream=backend.url, RATE_LIMIT=1000, TIME_WINDOW=60)
    pids = [r.process.pid for r in group]
    clients = [r.client(CLIENT) for r in group]
    try:
        baseline = [await call(c, r.index, "/products/") for c, r in zip(clients, group)]
        exit_status = backend.process.stop()
        down = [await call(c, r.index, "/products/") for _ in range(3)
                for c, r in zip(clients, group)]
        for r in group:
            async def backend_down(r: Replica = r) -> bool:
                response = await r.health()
                return response.status_code == 503 and \
                    response.json()["backend_status"] == "Disconnected"
            await until(backend_down, f"replica{r.index} /health to see the backend down")
        backend.start()                                     # same port
        polls = Counter[int]()
        for c, r in zip(clients, group):
            async def served(c: httpx.AsyncClient = c, r: Replica = r) -> bool:
                polls[r.index] += 1
                return (await call(c, r.index, "/products/")).status == 200
            await until(served, f"replica{r.index} to reach the backend again")
        back = [await call(c, r.index, "/products/") for _ in range(3)
                for c, r in zip(clients, group)]
    finally:
        await close_all(clients)
    print(f"\n[upstream restart] baseline {[o.status for o in baseline]}; backend exit "
          f"{exit_status}; while down {dict(Counter((o.status, o.error) for o in down))}; "
          f"requests until 200 per replica {dict(polls)}; then {[o.status for o in back]}")
    assert [o.status for o in baseline] == [200, 200]
    assert all((o.status, o.error) == (502, "upstream_unreachable") for o in down), down
    assert [o.status for o in back] == [200] * 6
    assert all(r.process.alive for r in group) and [r.process.pid for r in group] == pids


@pytest.mark.timeout(120)
async def test_concurrency_cap_is_per_process(replicas: Replicas,
                                              upstream: CountingUpstream) -> None:
    """MAX_CONCURRENT_REQUESTS caps the requests in flight to the upstream *per process*: one
    replica with GATEWAY_WORKERS=2 and a cap of 2 lets at most 2 x 2 = 4 through at once (more
    than 2 is allowed: each worker process has its own 2 slots). 12 requests over fresh
    connections are held at the upstream until released; the upstream records the largest number
    it held at once. The bound is semantic (slots), not a timing threshold."""
    [replica] = await replicas.start(1, upstream=upstream.url, GATEWAY_WORKERS=2,
                                     MAX_CONCURRENT_REQUESTS=2, QUEUE_TIMEOUT=60,
                                     UPSTREAM_TIMEOUT=60, RATE_LIMIT=1000, TIME_WINDOW=60)
    client = replica.client(CLIENT, fresh_connections=True)
    try:
        requests = [asyncio.create_task(call(client, 0, "/hold/cap")) for _ in range(12)]

        async def slots_full() -> bool:
            return bool((await upstream.counts())["in_flight"] >= 2)
        await until(slots_full, "the first worker's 2 slots to fill")
        at_release = await upstream.counts()
        await upstream.release()
        outcomes = await asyncio.wait_for(asyncio.gather(*requests), WAIT_DEADLINE)
    finally:
        await upstream.release()
        await client.aclose()
    counts = await upstream.counts()
    log_text = replica.process.log_path.read_text()
    workers = set(re.findall(r"\[(\d+)\][^\n]*Running on", log_text))
    served = Counter(re.findall(r"\[(\d+)\][^\n]*GET /hold/cap", log_text))
    print(f"\n[concurrency cap] worker pids {sorted(workers)}, requests per worker (access log) "
          f"{dict(served)}; in flight upstream when released "
          f"{at_release['in_flight']}; max in flight {counts['max_in_flight']}; responses "
          f"{dict(tally(outcomes))}")
    assert tally(outcomes) == {200: 12}
    assert counts["paths"] == {"/hold/cap": 12}
    assert 2 <= counts["max_in_flight"] <= 4

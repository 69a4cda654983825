"""Fault injection: a FaultProxy (tests/faultproxy.py) between one ``python -m proxy`` and its
Redis, and one between it and its upstream (the counting upstream). Every scenario switches its
fault on while traffic runs (bounded in count and time), then checks:

* only documented answers -- every response is one the README's error table allows for that
  fault (a body cut short only where the upstream itself cut it); never a 500, never a dropped
  connection before the response head;
* decisions bounded -- on the Redis side, no request waits longer than REDIS_TIMEOUT plus a
  small margin (the upstream answers at once);
* nothing leaks -- gateway_upstream_in_flight and gateway_queue_waiting back to 0 once the
  traffic stops (fault still on), and the gateway's fd count (/proc/PID/fd) back to its
  baseline after healing;
* recovery -- after healing, a fresh client address gets exactly RATE_LIMIT requests through
  (and the upstream sees exactly those), then 429s; every key under the prefix has a TTL
  (SCAN + PTTL on the real Redis);
* honest books -- the forwarded count in /metrics equals the complete upstream responses the
  clients received, and one log line names the failing side.

Redis-side scenarios run in both RATE_LIMIT_FAIL_MODEs. Timeouts are small (REDIS_TIMEOUT=0.3,
UPSTREAM_TIMEOUT=1) so the whole file runs in a few minutes.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.conftest import CountingUpstream, Replicas
from integration.faults import (DECISION_MARGIN, LIMITER_DOWN, NORMAL, RATE_LIMIT, REDIS_TIMEOUT,
                                SHED, UPSTREAM_DOWN, UPSTREAM_SLOW, Answer, Rig, Traffic,
                                response_head_length, start_rig)
from tests.faultproxy import FaultProxy

PATH = "/api/fault"
REDIS_TRAFFIC = 3               # concurrent clients: fewer than the slots, so nobody queues
UPSTREAM_TRAFFIC = 6            # more than MAX_CONCURRENT_REQUESTS (4): the queue is exercised
PEER_READS = 0.2               # pause before a reset, so the gateway reads what passed first
Switch = Callable[[Rig, Traffic], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    side: str                                   # "redis" or "upstream"
    switch: Switch                              # turns the fault on (traffic is running)
    during: int                                 # answers to collect with the fault on
    allowed: frozenset[tuple[int | None, str | None]] = frozenset()
    cut_bodies: bool = False                    # a 200 whose body was cut is expected
    felt: tuple[int | None, str | None] | None = None   # an answer that shows the fault bit
    felt_by_errors: bool = True                 # Redis side: the limiter saw errors


def faults(side: str, **settings: object) -> Switch:
    async def switch(rig: Rig, traffic: Traffic) -> None:
        proxy = rig.redis_proxy if side == "redis" else rig.upstream_proxy
        proxy.set(**settings)
    return switch


def refuse(side: str) -> Switch:
    """Stop listening and reset what is open, so every reconnect is refused."""
    async def switch(rig: Rig, traffic: Traffic) -> None:
        proxy = rig.redis_proxy if side == "redis" else rig.upstream_proxy
        proxy.set(refuse=True)
        proxy.cut()
    return switch


async def cut_thrice(rig: Rig, traffic: Traffic) -> None:
    """Reset every Redis connection, three times, with traffic in between."""
    for _ in range(3):
        rig.redis_proxy.cut()
        await traffic.until(len(traffic.answers) + 8)


async def slow_reconnect(rig: Rig, traffic: Traffic) -> None:
    """Each reply slower, but within REDIS_TIMEOUT, and every connection reset: the handshake
    of the new one must not add round trip after round trip to the decisions waiting on it."""
    rig.redis_proxy.set(latency_down=REDIS_TIMEOUT * 2 / 3)
    rig.redis_proxy.cut()


async def reset_mid_body(rig: Rig, traffic: Traffic) -> None:
    """Reset a few bytes into the body of each new upstream connection's first response; the
    pooled connections are cut first, so every request meets a new one."""
    rig.upstream_proxy.set(reset_after_down=response_head_length(rig.upstream.port) + 5,
                           reset_pause=PEER_READS)
    rig.upstream_proxy.cut()


REDIS_SCENARIOS = {
    "latency_above_timeout": Scenario("redis", faults("redis", latency_down=2 * REDIS_TIMEOUT), 20),
    # "+PONG\r\n", the reply to the handshake's first command, passes; then the reset
    "reset_during_handshake": Scenario("redis", faults("redis", reset_after_down=7), 30),
    "reset_mid_stream": Scenario("redis", faults("redis", reset_after_down=300), 30),
    "latency_below_timeout_across_a_reconnect": Scenario("redis", slow_reconnect, 20,
                                                         felt_by_errors=False),
    "blackhole": Scenario("redis", faults("redis", blackhole=True), 20),
    "refused_connects": Scenario("redis", refuse("redis"), 30),
    "half_close": Scenario("redis", faults("redis", half_close_after_down=0), 30),
    "cut_every_connection": Scenario("redis", cut_thrice, 10, felt_by_errors=False),
}
UPSTREAM_SCENARIOS = {
    "latency_above_timeout": Scenario(
        "upstream", faults("upstream", latency_down=1.5), 12,
        frozenset({UPSTREAM_SLOW, SHED}), felt=UPSTREAM_SLOW),
    "reset_mid_head": Scenario(
        "upstream", faults("upstream", reset_after_down=20, reset_pause=PEER_READS), 20,
        frozenset({UPSTREAM_DOWN}), felt=UPSTREAM_DOWN),
    "reset_mid_body": Scenario(
        "upstream", reset_mid_body, 30, frozenset({UPSTREAM_DOWN}), cut_bodies=True),
    "blackhole": Scenario(
        "upstream", faults("upstream", blackhole=True), 12,
        frozenset({UPSTREAM_SLOW, SHED}), felt=UPSTREAM_SLOW),
    "refused": Scenario(
        "upstream", refuse("upstream"), 20, frozenset({UPSTREAM_DOWN}), felt=UPSTREAM_DOWN),
    "half_close": Scenario(
        "upstream", faults("upstream", half_close_after_down=0), 20,
        frozenset({UPSTREAM_DOWN}), felt=UPSTREAM_DOWN),
}


@dataclass
class Run:
    answers: list[Answer]
    traffic: Traffic
    recovery: list[Answer]
    redis_errors: float
    forwarded: float
    reconnects: int                             # connections the Redis proxy accepted meanwhile


RigFactory = Callable[[str], Awaitable[Rig]]


@pytest.fixture
async def make_rig(tmp_path: Path, redis_url: str, key_prefix: str,
                   upstream: CountingUpstream) -> AsyncIterator[RigFactory]:
    stack: list[object] = []

    async def make(fail_mode: str) -> Rig:
        return await start_rig(tmp_path, redis_url, key_prefix, upstream, fail_mode, stack)
    try:
        yield make
    finally:
        for thing in reversed(stack):               # the gateway first, then the proxies
            if isinstance(thing, Replicas):
                thing.stop_all()
            elif isinstance(thing, FaultProxy):
                thing.stop()


async def exercise(rig: Rig, scenario: Scenario) -> Run:
    """Warm up, run traffic, switch the fault on, collect answers, stop the traffic, check the
    slots are free (fault still on), heal, wait for recovery."""
    concurrency = REDIS_TRAFFIC if scenario.side == "redis" else UPSTREAM_TRAFFIC
    await rig.warm_up(PATH, concurrency)
    errors_before = await rig.metric("gateway_redis_errors_total")
    forwarded_before = await rig.metric("gateway_requests_total", outcome="forwarded")
    accepted = rig.redis_proxy.accepted
    traffic = Traffic(rig.gateway.url, PATH, concurrency=concurrency).start()
    try:
        await traffic.until(10)
        await scenario.switch(rig, traffic)
        await traffic.until(len(traffic.answers) + scenario.during)
    finally:
        answers = await traffic.finish()
    await rig.slots_free()
    rig.redis_proxy.set()
    rig.upstream_proxy.set()
    recovery = await rig.recovered(PATH)
    return Run(answers, traffic, recovery,
               await rig.metric("gateway_redis_errors_total") - errors_before,
               forwarded_before, rig.redis_proxy.accepted - accepted)


def summary(name: str, run: Run) -> str:
    kinds = Counter((a.status, a.error, "whole" if a.whole else "cut") for a in run.answers)
    slowest = max(a.seconds for a in run.answers)
    return (f"\n[{name}] {len(run.answers)} answers {dict(kinds)}; slowest {slowest:.3f}s; "
            f"redis errors {run.redis_errors:g}; after healing "
            f"{[a.status for a in run.recovery]}")


async def check_common(rig: Rig, run: Run, culprit: str | None) -> None:
    """The properties every scenario shares, after healing; `culprit` is what the warning
    the fault must have caused names (None: the fault causes none)."""
    assert [(a.status, a.whole) for a in run.recovery] == \
        [(200, True)] * RATE_LIMIT + [(429, True)] * 2, run.recovery
    assert [a.remaining for a in run.recovery[:RATE_LIMIT]] == list(range(RATE_LIMIT - 1, -1, -1))
    counts = await rig.upstream.counts()
    assert counts["clients"].get("127.3.0.1") == RATE_LIMIT, counts["clients"]
    await rig.fds_back()
    assert await rig.keys_without_ttl() == {}
    if culprit is None:
        return
    log = rig.log_since_warm_up()
    assert [line for line in log.splitlines()
            if (" WARNING " in line or " ERROR " in line) and culprit in line.lower()], \
        f"no warning naming {culprit} in the gateway's log:\n{log[-3000:]}"


async def check_books(rig: Rig, run: Run, probes_and_recovery_whole: int) -> None:
    """Every request counted forwarded reached the client whole."""
    whole = sum(a.status == 200 and a.whole for a in run.answers) + probes_and_recovery_whole
    forwarded = await rig.metric("gateway_requests_total", outcome="forwarded") - run.forwarded
    assert forwarded == whole, f"{forwarded:g} counted forwarded, {whole} relayed whole"


def check_exact_per_client(run: Run) -> None:
    """Every traffic address that sent all its requests (none may have, when each answer takes
    UPSTREAM_TIMEOUT) had exactly RATE_LIMIT decided admissions, then refusals."""
    complete = run.traffic.complete_clients()
    for address, answers in complete.items():
        assert [a.status == 429 for a in answers] == [False] * RATE_LIMIT + [True] * 2, \
            (address, answers)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fail_mode", ["open", "closed"])
@pytest.mark.parametrize("name", list(REDIS_SCENARIOS))
async def test_redis_fault_answers_within_timeout_leaks_nothing_and_recovers(
        make_rig: RigFactory, name: str, fail_mode: str) -> None:
    scenario = REDIS_SCENARIOS[name]
    rig = await make_rig(fail_mode)
    run = await exercise(rig, scenario)
    print(summary(f"redis {name}, fail {fail_mode}", run))
    allowed = NORMAL | ({LIMITER_DOWN} if fail_mode == "closed" else set())
    assert {a.kind for a in run.answers} <= allowed, Counter(a.kind for a in run.answers)
    assert all(a.whole for a in run.answers), [a for a in run.answers if not a.whole]
    bound = REDIS_TIMEOUT + DECISION_MARGIN
    assert max(a.seconds for a in run.answers) <= bound, \
        sorted(a.seconds for a in run.answers)[-5:]
    if scenario.felt_by_errors:
        assert run.redis_errors > 0, "the fault was never felt"
    else:
        assert run.reconnects > 0, "the fault was never felt"
    # a fault the gateway got through without one failed call (a cut idle connection, seen
    # before use) has nothing to report
    await check_common(rig, run, "redis" if run.redis_errors else None)
    await check_books(rig, run, RATE_LIMIT + rig.probes_whole)


@pytest.mark.timeout(90)
async def test_redis_latency_below_timeout_keeps_every_decision_exact(
        make_rig: RigFactory) -> None:
    rig = await make_rig("closed")
    run = await exercise(rig, Scenario("redis", faults("redis", latency_down=REDIS_TIMEOUT / 4),
                                       30))
    print(summary("redis latency below timeout", run))
    assert {a.kind for a in run.answers} <= NORMAL, Counter(a.kind for a in run.answers)
    assert all(a.whole for a in run.answers)
    assert max(a.seconds for a in run.answers) <= REDIS_TIMEOUT + DECISION_MARGIN
    assert run.redis_errors == 0
    assert run.traffic.complete_clients()
    check_exact_per_client(run)
    await check_common(rig, run, culprit=None)
    await check_books(rig, run, RATE_LIMIT + rig.probes_whole)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", list(UPSTREAM_SCENARIOS))
async def test_upstream_fault_gets_its_documented_answer_leaks_nothing_and_recovers(
        make_rig: RigFactory, name: str) -> None:
    scenario = UPSTREAM_SCENARIOS[name]
    rig = await make_rig("open")
    run = await exercise(rig, scenario)
    print(summary(f"upstream {name}", run))
    allowed = NORMAL | scenario.allowed
    whole = [a for a in run.answers if a.whole]
    assert {a.kind for a in whole} <= allowed, Counter(a.kind for a in whole)
    cut = [a for a in run.answers if not a.whole]
    if scenario.cut_bodies:
        assert cut and all(a.status == 200 for a in cut), Counter(a.kind for a in cut)
    else:
        assert not cut, cut
    if scenario.felt is not None:
        assert any(a.kind == scenario.felt for a in run.answers), "the fault was never felt"
    assert run.redis_errors == 0
    check_exact_per_client(run)
    await check_common(rig, run, "upstream")
    await check_books(rig, run, RATE_LIMIT + rig.probes_whole)

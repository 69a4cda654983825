"""Prometheus metrics for the whole gateway instance.

Under `python -m proxy` PROMETHEUS_MULTIPROC_DIR is always set (before any worker imports
prometheus_client), so every worker writes its samples to shared files and one scrape of any
worker shows the sum over all of them. Without it (in-process tests) samples live in memory.
Labels are bounded: outcome, method (known verbs or OTHER), status class, decision, error kind —
never a client address or a path."""
from __future__ import annotations

import os
from typing import Any

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest, values)
from prometheus_client.multiprocess import MultiProcessCollector

OUTCOMES = ("forwarded", "rate_limited", "shed", "upstream_error", "upstream_aborted",
            "limiter_error", "client_error", "client_closed", "internal_error")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0, 60.0)
NEAR_LIMIT = 0.8                               # share of the quota used that counts as "near"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created doubles the scrape


class _Pid:
    """This process's id, cached and renewed after fork. In multiprocess mode prometheus-client
    asks for the pid on every increment (to notice a fork) and os.getpid() is a system call:
    with a histogram observation costing two increments, that was ~7% of a refused request."""
    value = os.getpid()

    @classmethod
    def renew(cls) -> None:
        cls.value = os.getpid()

    @classmethod
    def get(cls) -> int:
        return cls.value


os.register_at_fork(after_in_child=_Pid.renew)
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # the same value class prometheus-client picks for itself in this mode, minus the syscall
    values.ValueClass = values.MultiProcessValue(process_identifier=_Pid.get)  # type: ignore[no-untyped-call]


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric the gateway exports; one instance per process (per app in tests)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "gateway_requests", "Requests on the proxied path, by outcome.",
            ["outcome", "method", "status_class"], registry=registry)
        self.decisions = Counter(
            "gateway_ratelimit_decisions",
            "Rate-limit decisions: within_limit, near_limit (>= 80% of the quota used), over_limit.",
            ["policy", "decision"], registry=registry)
        self.request_seconds = Histogram(
            "gateway_request_duration_seconds", "Whole request, until the last byte is relayed.",
            ["outcome"], buckets=BUCKETS, registry=registry)
        self.upstream_seconds = Histogram(
            "gateway_upstream_duration_seconds", "From sending upstream to its response headers.",
            buckets=BUCKETS, registry=registry)
        self.limiter_seconds = Histogram(
            "gateway_limiter_duration_seconds", "One limiter decision (an EVALSHA round trip).",
            buckets=BUCKETS, registry=registry)
        self.queue_seconds = Histogram(
            "gateway_queue_wait_seconds", "Time spent waiting for a forwarding slot.",
            buckets=BUCKETS, registry=registry)
        self.in_flight = Gauge(
            "gateway_upstream_in_flight", "Requests holding a forwarding slot.",
            registry=registry, multiprocess_mode="livesum")
        self.waiting = Gauge(
            "gateway_queue_waiting", "Requests waiting for a forwarding slot.",
            registry=registry, multiprocess_mode="livesum")
        self.redis_errors = Counter(
            "gateway_redis_errors", "Redis failures seen by the limiter, by kind.", ["kind"],
            registry=registry)
        self.script_reloads = Counter(
            "gateway_script_reloads", "Lua script reloads after NOSCRIPT.", registry=registry)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._decisions = {kind: self.decisions.labels("default", kind)
                           for kind in ("within_limit", "near_limit", "over_limit")}

    def count(self, outcome: str, method: str, status: int, seconds: float) -> None:
        """One finished request: its outcome counter and its duration."""
        key = (outcome, method, status // 100)
        children = self._children.get(key)
        if children is None:                  # labels() is slow; the label sets are few
            children = self._children[key] = (
                self.requests.labels(outcome, method if method in METHODS else "OTHER",
                                     f"{status // 100}xx"),
                self.request_seconds.labels(outcome))
        children[0].inc()
        children[1].observe(seconds)

    def decision(self, allowed: bool, remaining: int, limit: int) -> None:
        if not allowed:
            kind = "over_limit"
        elif limit - remaining >= NEAR_LIMIT * limit:
            kind = "near_limit"
        else:
            kind = "within_limit"
        self._decisions[kind].inc()

    def slots(self, in_use: int, waiting: int) -> None:
        self.in_flight.set(in_use)
        self.waiting.set(waiting)

    def _instance(self) -> CollectorRegistry:
        """What a scrape reads: every worker's files in multiprocess mode, else this registry."""
        directory = multiprocess_dir()
        if directory is None:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        return registry

    def render(self) -> bytes:
        """Prometheus text exposition of the whole instance."""
        return generate_latest(self._instance())

    def totals(self) -> tuple[int, int]:
        """(all requests, rate-limited requests) over the whole instance, for /health."""
        total = blocked = 0.0
        for family in self._instance().collect():
            if family.name != "gateway_requests":
                continue
            for sample in family.samples:
                if sample.name == "gateway_requests_total":
                    total += sample.value
                    if sample.labels.get("outcome") == "rate_limited":
                        blocked += sample.value
        return int(total), int(blocked)

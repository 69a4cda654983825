"""A Python load generator for when wrk is not installed: asyncio (uvloop when installed) with raw
keep-alive HTTP/1.1 connections, a fixed number of them, each sending its next request as soon
as the previous response is complete (closed loop, like wrk; no coordinated-omission correction).

Bounded: it stops sending at `--duration` seconds or after `--max-requests` requests, whichever
comes first, then waits at most `--timeout` for the answers still in flight, so every request
sent is counted (answered, or an error) and per-request figures are exact. A request unanswered
for `--timeout` seconds counts as a timeout and its connection is replaced.

`python -m bench.loadgen --url http://127.0.0.1:8000/ --connections 64 --duration 5` prints
one JSON object on stdout: requests, duration_s, rps, latency percentiles (ms), status counts,
errors, its own CPU seconds, and the latency histogram (so several processes can be merged)."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bench.upstream import BAD, BODY, CHUNK_SIZE, HEAD, MAX_HEAD, MORE, BodySkipper, new_event_loop

LOOPBACK_PREFIXES = ("127.", "localhost", "::1", "[::1]")


# -- latency histogram -------------------------------------------------------------------------

class Histogram:
    """Log-linear histogram of microseconds: exact below 1024 µs, then 512 buckets per power of
    two (under 0.2 % relative error). Mergeable, bounded in size."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.total = 0
        self.sum_us = 0
        self.max_us = 0

    @staticmethod
    def index(us: int) -> int:
        if us < 1024:
            return max(us, 0)
        e = us.bit_length() - 10
        return 1024 + (e - 1) * 512 + ((us >> e) - 512)

    @staticmethod
    def bounds(index: int) -> tuple[int, int]:
        """[low, high] microseconds of a bucket."""
        if index < 1024:
            return index, index
        e, m = divmod(index - 1024, 512)
        e += 1
        low = (m + 512) << e
        return low, low + (1 << e) - 1

    def record(self, us: int) -> None:
        self.counts[self.index(us)] += 1
        self.total += 1
        self.sum_us += us
        if us > self.max_us:
            self.max_us = us

    def merge(self, other: Histogram) -> None:
        self.counts.update(other.counts)
        self.total += other.total
        self.sum_us += other.sum_us
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, q: float) -> float:
        """The q-th percentile in microseconds (bucket midpoint); 0 when empty."""
        if not self.total:
            return 0.0
        rank = max(1, math.ceil(q / 100 * self.total))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                low, high = self.bounds(index)
                return min((low + high) / 2, self.max_us)
        return float(self.max_us)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": {str(k): v for k, v in sorted(self.counts.items())},
                "total": self.total, "sum_us": self.sum_us, "max_us": self.max_us}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        hist = cls()
        hist.counts.update({int(k): int(v) for k, v in data.get("counts", {}).items()})
        hist.total = int(data.get("total", sum(hist.counts.values())))
        hist.sum_us = int(data.get("sum_us", 0))
        hist.max_us = int(data.get("max_us", 0))
        return hist


# -- results -----------------------------------------------------------------------------------

@dataclass
class LoadResult:
    """What one load run measured, whichever generator ran it."""

    requests: int                       # responses completed within the run
    duration_s: float
    latency_ms: dict[str, float]        # p50, p90, p99, max, mean
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0                    # responses with status >= 300 (wrk: >= 400)
    generator: str = "python"
    cpu_s: float | None = None          # the generator's own CPU time, when known

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def share(self, status: int) -> float | None:
        counted = sum(self.statuses.values())
        return self.statuses.get(status, 0) / counted if counted else None

    def to_dict(self) -> dict[str, Any]:
        return {"generator": self.generator, "requests": self.requests,
                "duration_s": round(self.duration_s, 4), "rps": round(self.rps, 1),
                "latency_ms": self.latency_ms,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "errors": self.errors, "non_2xx": self.non_2xx, "cpu_s": self.cpu_s}


def latency_summary(hist: Histogram) -> dict[str, float]:
    return {"p50": round(hist.percentile(50) / 1000, 3), "p90": round(hist.percentile(90) / 1000, 3),
            "p99": round(hist.percentile(99) / 1000, 3), "max": round(hist.max_us / 1000, 3),
            "mean": round(hist.sum_us / hist.total / 1000, 3) if hist.total else 0.0}


def parse_loadgen_output(text: str) -> tuple[LoadResult, Histogram]:
    """The JSON line printed by `python -m bench.loadgen` (the last line starting with '{')."""
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise ValueError(f"no JSON result in load generator output: {text[-500:]!r}")
    data = json.loads(lines[-1])
    hist = Histogram.from_dict(data.get("histogram", {}))
    result = LoadResult(
        requests=int(data["requests"]), duration_s=float(data["duration_s"]),
        latency_ms={k: float(v) for k, v in data["latency_ms"].items()},
        statuses={int(k): int(v) for k, v in data.get("statuses", {}).items()},
        errors={k: int(v) for k, v in data.get("errors", {}).items()},
        non_2xx=int(data.get("non_2xx", 0)), generator="python",
        cpu_s=float(data["cpu_s"]) if data.get("cpu_s") is not None else None)
    return result, hist


def merge_results(parts: list[tuple[LoadResult, Histogram]]) -> LoadResult:
    """Several generator processes that ran side by side, as one result."""
    hist = Histogram()
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for result, part in parts:
        hist.merge(part)
        statuses.update(result.statuses)
        errors.update(result.errors)
    cpu = [r.cpu_s for r, _ in parts]
    return LoadResult(
        requests=sum(r.requests for r, _ in parts),
        duration_s=max(r.duration_s for r, _ in parts), latency_ms=latency_summary(hist),
        statuses=dict(statuses), errors=dict(errors), non_2xx=sum(r.non_2xx for r, _ in parts),
        generator="python", cpu_s=None if None in cpu else sum(c for c in cpu if c is not None))


# -- the client --------------------------------------------------------------------------------



class Run:
    """Shared state of one load run. `stopping`: send no new request (the in-flight ones are
    still awaited and counted); `closing`: the run is over, nothing more is counted."""

    def __init__(self, request: bytes, max_requests: int) -> None:
        self.request = request
        self.max_requests = max_requests
        self.hist = Histogram()
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.done = 0
        self.sent = 0
        self.in_flight = 0
        self.last_done = 0.0
        self.stopping = False
        self.closing = False
        self.all_sent = asyncio.Event()     # max_requests sent: stop early
        self.drained = asyncio.Event()      # stopping and nothing in flight

    def may_send(self) -> bool:
        return not self.stopping and self.sent < self.max_requests

    def on_send(self) -> None:
        self.sent += 1
        self.in_flight += 1
        if self.sent >= self.max_requests:
            self.all_sent.set()

    def on_answer(self, status: int, us: int) -> None:
        self.in_flight -= 1
        if self.closing:
            return
        self.done += 1
        self.statuses[status] += 1
        self.hist.record(us)
        self.last_done = time.perf_counter()
        self._check_drained()

    def on_failure(self, kind: str) -> None:
        """A request in flight failed (its connection is replaced)."""
        self.in_flight -= 1
        if not self.closing:
            self.errors[kind] += 1
        self._check_drained()

    def stop(self) -> None:
        self.stopping = True
        self._check_drained()

    def _check_drained(self) -> None:
        if self.stopping and self.in_flight <= 0:
            self.drained.set()


class Client(asyncio.Protocol, BodySkipper):
    """One keep-alive connection sending the same request back to back."""

    def __init__(self, run: Run, lost: asyncio.Future[None]) -> None:
        self.run = run
        self.lost = lost
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = HEAD
        self.left = 0
        self.status = 0
        self.close_after = False
        self.sent_at = 0
        self.waiting = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        self.send_next()

    def send_next(self) -> None:
        assert self.transport is not None
        if not self.run.may_send():
            self.transport.close()
            return
        self.state = HEAD
        self.waiting = True
        self.run.on_send()
        self.sent_at = time.perf_counter_ns()
        self.transport.write(self.run.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while self.waiting:
            if self.state == HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        self.fail("protocol")
                    return
                if not self.parse_head(bytes(buf[:end])):
                    self.fail("protocol")
                    return
                del buf[:end + 4]
                if self.state == HEAD:
                    self.complete()
            else:
                outcome = self.skip_body(buf)
                if outcome == MORE:
                    return
                if outcome == BAD:
                    self.fail("protocol")
                    return
                self.complete()

    def parse_head(self, head: bytes) -> bool:
        """Status and framing of a response head; sets the state for its body."""
        if not head.startswith(b"HTTP/1."):
            return False
        try:
            self.status = int(head[9:12])
        except ValueError:
            return False
        length = None
        chunked = False
        self.close_after = head.startswith(b"HTTP/1.0")
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                self.close_after = value.strip().lower() == b"close"
        if chunked:
            self.state = CHUNK_SIZE
        elif length:
            self.state, self.left = BODY, length
        elif length is None and self.status not in (204, 304) and self.status >= 200:
            return False                         # read-until-close bodies are not supported
        else:
            self.state = HEAD
        return True

    def complete(self) -> None:
        self.waiting = False
        self.run.on_answer(self.status, (time.perf_counter_ns() - self.sent_at) // 1000)
        assert self.transport is not None
        if self.close_after:
            self.transport.close()
            return
        self.send_next()

    def fail(self, kind: str) -> None:
        if self.waiting:
            self.waiting = False
            self.run.on_failure(kind)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting:
            self.waiting = False
            self.run.on_failure("read")
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)


async def connection(run: Run, host: str, port: int, timeout: float) -> None:
    """Keep one connection busy until the run stops sending, reconnecting when it is closed."""
    loop = asyncio.get_running_loop()
    while run.may_send():
        lost: asyncio.Future[None] = loop.create_future()
        try:
            transport, client = await asyncio.wait_for(
                loop.create_connection(lambda: Client(run, lost), host, port), timeout)
        except (OSError, asyncio.TimeoutError):
            if not run.closing:
                run.errors["connect"] += 1
            await asyncio.sleep(0.05)            # do not spin on a refusing server
            continue
        try:
            while not lost.done():
                sent = client.sent_at
                try:
                    await asyncio.wait_for(asyncio.shield(lost), timeout)
                except asyncio.TimeoutError:
                    if client.waiting and client.sent_at == sent:
                        client.fail("timeout")   # unanswered for `timeout`: replace it
        finally:
            transport.close()


def build_request(host: str, port: int, path: str, method: str, body_size: int) -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"User-Agent: bench-loadgen\r\nAccept: */*\r\n")
    if body_size or method in ("POST", "PUT", "PATCH"):
        head += f"Content-Type: application/octet-stream\r\nContent-Length: {body_size}\r\n"
    return head.encode() + b"\r\n" + b"x" * body_size


async def run_load(url: str, *, connections: int, duration: float, method: str = "GET",
                   body_size: int = 0, max_requests: int = 10_000_000,
                   timeout: float = 10.0) -> tuple[LoadResult, Histogram]:
    """Drive `url` with `connections` keep-alive connections for `duration` seconds, then wait
    (at most `timeout`) for the requests still in flight, so every request sent is counted: its
    answer, or an error. The run's duration ends with the last answer."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if not host.startswith(LOOPBACK_PREFIXES):
        raise ValueError(f"the load generator only targets loopback addresses, not {host!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    run = Run(build_request(host, port, path, method, body_size), max_requests)
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    tasks = [asyncio.create_task(connection(run, host, port, timeout))
             for _ in range(connections)]
    try:
        await asyncio.wait_for(run.all_sent.wait(), duration)
    except asyncio.TimeoutError:
        pass
    run.stop()                                   # no new requests; await those in flight
    try:
        await asyncio.wait_for(run.drained.wait(), timeout)
    except asyncio.TimeoutError:
        run.errors["timeout"] += max(0, run.in_flight)
    run.closing = True
    end = run.last_done if run.last_done > start else time.perf_counter()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0)                       # let the closed transports call back
    result = LoadResult(
        requests=run.done, duration_s=end - start, latency_ms=latency_summary(run.hist),
        statuses=dict(run.statuses), errors=dict(run.errors),
        non_2xx=sum(n for s, n in run.statuses.items() if not 200 <= s < 300),
        generator="python", cpu_s=round(_cpu_seconds() - cpu0, 3))
    return result, run.hist


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="loopback http:// URL")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds (at most 3600)")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body-size", type=int, default=0, help="request body bytes")
    parser.add_argument("--max-requests", type=int, default=10_000_000)
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 3600 or args.connections < 1 or args.max_requests < 1:
        parser.error("need 0 < --duration <= 3600, --connections >= 1, --max-requests >= 1")
    loop = new_event_loop()
    try:
        result, hist = loop.run_until_complete(run_load(
            args.url, connections=args.connections, duration=args.duration,
            method=args.method.upper(), body_size=args.body_size,
            max_requests=args.max_requests, timeout=args.timeout))
    finally:
        loop.close()
    print(json.dumps({**result.to_dict(), "histogram": hist.to_dict()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""wrk as the load generator: command line, the Lua script of a scenario, output parsing.

Every run gets a Lua script whose done() prints one `BENCH_JSON {...}` line (request count,
duration, latency percentiles, socket errors). A response() callback counting status codes is
added only when a scenario needs the counts (blocked: the 429 share), since it slows wrk down;
without it, wrk's own "Non-2xx or 3xx responses" count is all there is. The POST scenario sets
wrk.method and wrk.body (wrk adds Content-Length)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

from bench.loadgen import LoadResult

MARKER = "BENCH_JSON "

_DONE = r"""
threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local statuses = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("codes")
    if counts then
      for status, n in pairs(counts) do statuses[status] = (statuses[status] or 0) + n end
    end
  end
  local parts = {}
  for status, n in pairs(statuses) do
    parts[#parts + 1] = string.format('"%d":%d', status, n)
  end
  local e = summary.errors
  io.write(string.format(
    '__MARKER__{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f},"statuses":{%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    math.floor(latency:percentile(50)), math.floor(latency:percentile(90)),
    math.floor(latency:percentile(99)), math.floor(latency.max), latency.mean, table.concat(parts, ",")))
end
""".replace("__MARKER__", MARKER)

_COUNT = r"""
codes = {}

function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
end
"""


def find_wrk() -> str | None:
    return shutil.which("wrk")


def wrk_version(wrk: str) -> str:
    """`wrk 4.1.0 [epoll] ...` -> `wrk 4.1.0 [epoll]` (wrk -v exits 1)."""
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
    match = re.search(r"wrk \S+( \[\w+\])?", out.stdout + out.stderr)
    return match.group(0) if match else "wrk (unknown version)"


def install_wrk() -> str | None:
    """`apt-get install -y wrk` (root only; runs `apt-get update` once if the first try fails)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in range(2):
        if attempt:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, timeout=300)
        done = subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, check=False,
                              timeout=300)
        if done.returncode == 0 and find_wrk():
            return find_wrk()
    return None


def lua_script(method: str = "GET", body_size: int = 0, count_statuses: bool = False) -> str:
    lines = []
    if method != "GET" or body_size:
        lines.append(f'wrk.method = "{method}"')
    if body_size:
        lines.append(f'wrk.body = string.rep("x", {int(body_size)})')
        lines.append('wrk.headers["Content-Type"] = "application/octet-stream"')
    return "\n".join(lines) + "\n" + (_COUNT if count_statuses else "") + _DONE


def wrk_command(wrk: str, url: str, *, connections: int, threads: int, duration: float,
                script: str, timeout: float = 10.0) -> list[str]:
    threads = max(1, min(threads, connections))
    return [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
            "--timeout", f"{max(1, round(timeout))}s", "--latency", "-s", script, url]


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk_output(text: str) -> LoadResult:
    """wrk's output as a LoadResult: the BENCH_JSON line when the script printed one, else
    wrk's human-readable report (run with --latency for the percentiles)."""
    for line in reversed(text.splitlines()):
        if line.startswith(MARKER):
            return _from_json(json.loads(line[len(MARKER):]))
    return _from_text(text)


def _from_json(data: dict) -> LoadResult:  # type: ignore[type-arg]
    lat = data["latency_us"]
    errors = {k: int(v) for k, v in data["errors"].items() if k != "status"}
    return LoadResult(
        requests=int(data["requests"]), duration_s=int(data["duration_us"]) / 1e6,
        latency_ms={k: round(float(lat[k]) / 1000, 3) for k in ("p50", "p90", "p99", "max", "mean")},
        statuses={int(k): int(v) for k, v in data.get("statuses", {}).items()},
        errors=errors, non_2xx=int(data["errors"]["status"]), generator="wrk")


def _from_text(text: str) -> LoadResult:
    done = re.search(r"(\d+) requests in ([\d.]+(?:us|ms|s|m|h))", text)
    if not done:
        raise ValueError(f"unrecognised wrk output: {text[-500:]!r}")
    latency = {}
    for pct, key in (("50", "p50"), ("90", "p90"), ("99", "p99")):
        match = re.search(rf"^\s*{pct}(?:\.0+)?%\s+(\S+)", text, re.M)
        if match:
            latency[key] = round(_ms(match.group(1)), 3)
    stats = re.search(r"^\s*Latency\s+(\S+)\s+\S+\s+(\S+)", text, re.M)
    if stats:
        latency["mean"] = round(_ms(stats.group(1)), 3)
        latency["max"] = round(_ms(stats.group(2)), 3)
    errors = {}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups())))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return LoadResult(requests=int(done.group(1)), duration_s=_ms(done.group(2)) / 1000,
                      latency_ms=latency, errors=errors,
                      non_2xx=int(non_2xx.group(1)) if non_2xx else 0, generator="wrk")

"""The benchmark's pure parts (parsers, /proc readers, stats deltas, pinning plan, report) and
one smoke run of the Python load generator against the bench upstream on loopback. No timing
thresholds: only counts and shapes are asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import nginx, wrk
from bench.floor import refusal_answer
from bench.loadgen import Histogram, LoadResult, build_request, merge_results, parse_loadgen_output
from bench.procs import (Service, cpus_busy_seconds, descendants, max_status_kb, parse_cpu_busy,
                         parse_stat, parse_status_kb, plan_pinning, read_stat, tree_cpu_seconds,
                         wait_ready)
from bench.redisstats import commandstats_delta, parse_commandstats, script_calls
from bench.report import add_floor_ratio, format_table, markdown, summarize
from bench.runner import check_upstream, python_env
from bench.scenarios import SCENARIOS, select
from bench.upstream import LARGE_BODY, LARGE_SIZE
from proxy.embedded_redis import free_port

ROOT = Path(__file__).resolve().parent.parent

WRK_TEXT = """\
Running 5s test @ http://127.0.0.1:8000/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.34ms    2.00ms   1.20s    90.00%
    Req/Sec     5.20k   300.00     5.80k    70.00%
  Latency Distribution
     50%   11.50ms
     75%   13.00ms
     90%  800.00us
     99%    1.05s
  26000 requests in 5.01s, 3.10MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 25999
Requests/sec:   5189.62
Transfer/sec:    633.50KB
"""


# -- wrk -----------------------------------------------------------------------------------------

def test_parse_wrk_json_marker_line() -> None:
    data = {"requests": 1000, "duration_us": 2_000_000, "bytes": 5000,
            "errors": {"connect": 0, "read": 1, "write": 0, "status": 999, "timeout": 2},
            "latency_us": {"p50": 1500, "p90": 2500, "p99": 9000, "max": 20000, "mean": 1700.5},
            "statuses": {"429": 999, "200": 1}}
    result = wrk.parse_wrk_output(WRK_TEXT + wrk.MARKER + json.dumps(data) + "\n")
    assert result.generator == "wrk"
    assert result.requests == 1000
    assert result.duration_s == 2.0
    assert result.rps == 500.0
    assert result.latency_ms == {"p50": 1.5, "p90": 2.5, "p99": 9.0, "max": 20.0, "mean": 1.7}
    assert result.statuses == {429: 999, 200: 1}
    assert result.share(429) == 0.999
    assert result.non_2xx == 999
    assert result.errors == {"connect": 0, "read": 1, "write": 0, "timeout": 2}


def test_parse_wrk_text_report() -> None:
    result = wrk.parse_wrk_output(WRK_TEXT)
    assert result.requests == 26000
    assert result.duration_s == pytest.approx(5.01)
    assert result.latency_ms["p50"] == 11.5
    assert result.latency_ms["p90"] == 0.8
    assert result.latency_ms["p99"] == 1050.0
    assert result.latency_ms["mean"] == 12.34
    assert result.latency_ms["max"] == 1200.0
    assert result.errors == {"connect": 0, "read": 2, "write": 0, "timeout": 3}
    assert result.non_2xx == 25999
    assert result.statuses == {}


def test_parse_wrk_output_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        wrk.parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_lua_script_only_counts_statuses_when_asked() -> None:
    plain = wrk.lua_script()
    assert "function done" in plain and wrk.MARKER in plain
    assert "function response" not in plain
    assert "wrk.method" not in plain
    counting = wrk.lua_script(count_statuses=True)
    assert "function response(status, headers, body)" in counting
    upload = wrk.lua_script("POST", 1024 * 1024)
    assert 'wrk.method = "POST"' in upload
    assert 'wrk.body = string.rep("x", 1048576)' in upload


def test_wrk_command() -> None:
    argv = wrk.wrk_command("/usr/bin/wrk", "http://127.0.0.1:1/", connections=64, threads=2,
                           duration=2.6, script="/tmp/x.lua", timeout=10)
    assert argv == ["/usr/bin/wrk", "-t", "2", "-c", "64", "-d", "3s", "--timeout", "10s",
                    "--latency", "-s", "/tmp/x.lua", "http://127.0.0.1:1/"]


# -- the Python load generator's numbers ---------------------------------------------------------

def test_histogram_buckets_are_monotonic_and_cover_their_values() -> None:
    previous = -1
    for us in [0, 1, 500, 1023, 1024, 1025, 2047, 2048, 4095, 4096, 10**5, 10**6, 10**7 + 3]:
        index = Histogram.index(us)
        low, high = Histogram.bounds(index)
        assert low <= us <= high
        assert index >= previous
        previous = index
        assert (high - low) <= max(1, us // 256)        # relative precision under 0.4 %


def test_histogram_percentiles_and_round_trip() -> None:
    hist = Histogram()
    for us in range(1, 1001):                           # 1..1000 µs, exact buckets
        hist.record(us)
    assert hist.percentile(50) == 500
    assert hist.percentile(99) == 990
    assert hist.percentile(100) == 1000
    assert hist.max_us == 1000
    again = Histogram.from_dict(json.loads(json.dumps(hist.to_dict())))
    assert again.percentile(50) == 500 and again.total == 1000
    again.merge(hist)
    assert again.total == 2000 and again.percentile(50) == 500
    assert Histogram().percentile(50) == 0.0


def _loadgen_line(requests: int, statuses: dict[str, int], us: list[int],
                  errors: dict[str, int] | None = None) -> str:
    hist = Histogram()
    for value in us:
        hist.record(value)
    return json.dumps({"generator": "python", "requests": requests, "duration_s": 2.0,
                       "rps": requests / 2, "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0,
                                                           "max": 4.0, "mean": 1.5},
                       "statuses": statuses, "errors": errors or {}, "non_2xx": 0,
                       "cpu_s": 0.5, "histogram": hist.to_dict()})


def test_parse_and_merge_loadgen_output() -> None:
    a = parse_loadgen_output("a warning on stderr\n" + _loadgen_line(100, {"200": 100}, [100] * 100))
    b = parse_loadgen_output(_loadgen_line(300, {"200": 299, "429": 1}, [300] * 300,
                                           {"read": 2}))
    assert a[0].requests == 100 and a[0].rps == 50.0 and a[0].statuses == {200: 100}
    merged = merge_results([a, b])
    assert merged.requests == 400
    assert merged.rps == 200.0
    assert merged.statuses == {200: 399, 429: 1}
    assert merged.errors == {"read": 2}
    assert merged.cpu_s == 1.0
    assert merged.latency_ms["p50"] == 0.3                  # 300 of 400 samples at 300 µs
    with pytest.raises(ValueError):
        parse_loadgen_output("Traceback (most recent call last):\n")


def test_build_request_frames_the_body() -> None:
    request = build_request("127.0.0.1", 80, "/upload", "POST", 10)
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:80\r\n")
    assert b"Content-Length: 10" in head and body == b"x" * 10
    assert b"Content-Length" not in build_request("127.0.0.1", 80, "/", "GET", 0)


# -- /proc ---------------------------------------------------------------------------------------

def test_parse_stat_counts_fields_after_the_command_name() -> None:
    fields = ["S", "7", "8", "8", "0", "-1", "4194560", "100", "0", "0", "0",
              "250", "50", "30", "20"] + ["0"] * 37
    stat = parse_stat("4242 (we) ird (name)) " + " ".join(fields))
    assert (stat.pid, stat.ppid, stat.utime, stat.stime, stat.cutime, stat.cstime) == (
        4242, 7, 250, 50, 30, 20)


def test_cpu_time_of_the_current_process_grows_with_work() -> None:
    me = read_stat(os.getpid())
    assert me is not None and me.pid == os.getpid() and me.ppid == os.getppid()
    before = tree_cpu_seconds(os.getpid())
    deadline = time.monotonic() + 10
    while tree_cpu_seconds(os.getpid()) <= before and time.monotonic() < deadline:
        sum(i * i for i in range(20_000))               # burn CPU until a tick is counted
    assert tree_cpu_seconds(os.getpid()) > before


def test_descendants_and_memory_of_a_process_tree() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in descendants(os.getpid())
        assert descendants(os.getpid())[0] == os.getpid()
        hwm = max_status_kb(os.getpid(), "VmHWM")
        assert hwm is not None and hwm > 0
    finally:
        child.kill()
        child.wait()
    assert parse_status_kb("Name:\tx\nVmHWM:\t  12345 kB\nVmRSS:\t 99 kB\n", "VmHWM") == 12345
    assert parse_status_kb("Name:\tx\n", "VmRSS") is None


def test_cpu_busy_ticks_from_proc_stat() -> None:
    text = ("cpu  10 0 10 1000 5 0 0 0 0 0\n"
            "cpu0 7 1 3 400 2 1 1 0 0 0\n"
            "cpu1 3 0 7 600 3 0 0 0 0 0\n"
            "intr 12345\n")
    assert parse_cpu_busy(text) == {0: 13, 1: 10}          # idle and iowait left out
    assert cpus_busy_seconds([0]) > 0


# -- Redis ---------------------------------------------------------------------------------------

COMMANDSTATS = """# Commandstats\r
cmdstat_evalsha:calls={e},usec=1000,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r
cmdstat_get:calls={e},usec=10,usec_per_call=0.10,rejected_calls=0,failed_calls=0\r
cmdstat_info:calls={i},usec=10,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r
cmdstat_client|setname:calls=3,usec=1,usec_per_call=0.33,rejected_calls=0,failed_calls=0\r
"""


def test_commandstats_parsing_and_delta() -> None:
    before = parse_commandstats(COMMANDSTATS.format(e=10, i=4))
    assert before == {"evalsha": 10, "get": 10, "info": 4, "client|setname": 3}
    after = parse_commandstats(COMMANDSTATS.format(e=110, i=6)
                               + "cmdstat_ping:calls=2,usec=1,usec_per_call=0.5\r\n")
    delta = commandstats_delta(before, after)
    assert delta == {"evalsha": 100, "get": 100, "ping": 2}     # INFO and unchanged left out
    assert script_calls(delta) == 100
    assert parse_commandstats("# Commandstats\r\n") == {}


# -- pinning, scenarios, report ------------------------------------------------------------------

def test_pinning_plan() -> None:
    two = plan_pinning([0, 1], taskset=True)
    assert (two.sut, two.load, two.aux, two.workers) == ((0,), (1,), (1,), (0, 1))
    assert two.prefix(two.sut) == ["taskset", "-c", "0"]
    four = plan_pinning([3, 2, 1, 0], taskset=True)
    assert (four.sut, four.aux, four.load) == ((0,), (1,), (2, 3))
    for plan in (plan_pinning([0], taskset=True), plan_pinning([0, 1], taskset=False),
                 plan_pinning([0, 1], taskset=True, enabled=False)):
        assert not plan.enabled and plan.prefix(plan.sut) == []
        assert plan.describe()[0].startswith("unpinned: ")


def test_scenario_selection_adds_the_floor() -> None:
    assert [s.name for s in select(None)] == list(SCENARIOS)
    assert [s.name for s in select("blocked,pass")] == ["pass", "blocked", "floor"]
    with pytest.raises(ValueError):
        select("pass,nope")


def test_floor_refusal_variant_sends_the_gateways_own_429() -> None:
    """The blocked scenario's yardstick must answer exactly what the gateway answers."""
    start, body = refusal_answer()
    headers = dict(start["headers"])
    assert start["status"] == 429 and body["more_body"] is False
    assert headers[b"content-type"] == b"application/problem+json"
    assert int(headers[b"content-length"]) == len(body["body"])
    assert {b"ratelimit", b"ratelimit-policy", b"x-ratelimit-limit", b"x-ratelimit-remaining",
            b"x-ratelimit-reset", b"retry-after", b"x-request-id"} <= set(headers)
    assert json.loads(body["body"])["retry_after"] == 59


def test_yardstick_scenarios_run_the_floor_app_variants() -> None:
    assert SCENARIOS["floor-429"].target == SCENARIOS["floor-upload"].target == "floor"
    assert (SCENARIOS["floor-429"].variant, SCENARIOS["floor-upload"].variant) == ("refusal", "sink")
    assert SCENARIOS["floor-upload"].body_size == SCENARIOS["upload"].body_size


def test_summary_table_and_markdown() -> None:
    def run(rps: float, hwm: int) -> dict:  # type: ignore[type-arg]
        return {"rps": rps, "p50_ms": 1.0, "p99_ms": 5.0, "cpu_us_per_req": 100.0,
                "hwm_kb": hwm, "rss_peak_kb": hwm, "requests": 10, "bad_responses": 0,
                "socket_errors": 0, "share_429": None}
    rounds = {"pass": [run(100, 1000), run(300, 3000), run(200, 2000)],
              "floor": [run(1000, 500), run(1000, 500), run(1000, 500)]}
    summary = {name: summarize(runs) for name, runs in rounds.items()}
    add_floor_ratio(summary)
    assert summary["pass"]["rps"] == 200 and summary["pass"]["hwm_kb"] == 3000
    assert summary["pass"]["vs_floor"] == 0.2 and summary["pass"]["requests"] == 30
    table = format_table(summary)
    assert "pass" in table and "20.0%" in table
    meta = {"timestamp": "t", "command": "python -m bench", "git": "abc", "cpus": 2,
            "python": "3.11", "platform": "linux", "loadgen": "python", "connections": 64,
            "duration_s": 1, "warmup_s": 1, "rounds": 3, "upstream": "python",
            "redis": "redis", "pinning": ["unpinned"], "scenarios": {"pass": "p", "floor": "f"}}
    text = markdown({"meta": meta, "summary": summary, "rounds": rounds})
    assert "| pass | 200 |" in text and "| 3 | 200 | 1,000 |" in text


def test_nginx_config_is_loopback_and_self_contained(tmp_path: Path) -> None:
    config = nginx.write_config(tmp_path, "127.0.0.1", 12345).read_text()
    assert "listen 127.0.0.1:12345" in config
    assert "master_process off;" in config and "daemon off;" in config
    assert "client_max_body_size 2m;" in config
    for line in config.splitlines():
        if line.strip().startswith(("pid ", "error_log ", "alias ")) or "_temp_path" in line:
            assert str(tmp_path) in line
    assert (tmp_path / "www" / "large.bin").read_bytes() == LARGE_BODY
    assert len(LARGE_BODY) == LARGE_SIZE


# -- smoke: the Python load generator against a local server -------------------------------------

def test_python_loadgen_smoke(tmp_path: Path) -> None:
    port = free_port()
    upstream = Service("upstream", [sys.executable, "-m", "bench.upstream", "--port", str(port)],
                       env=python_env(), cwd=tmp_path, log_dir=tmp_path)
    try:
        upstream.start()
        wait_ready(upstream, "127.0.0.1", port, "/", timeout=30)
        check_upstream(port)                            # /, /large, 1 MiB upload, keep-alive
        results: list[LoadResult] = []
        for path, extra in (("/", []), ("/upload", ["--method", "POST", "--body-size", "65536"])):
            out = subprocess.run(
                [sys.executable, "-m", "bench.loadgen", "--url", f"http://127.0.0.1:{port}{path}",
                 "--connections", "4", "--duration", "1", *extra],
                env=python_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            results.append(parse_loadgen_output(out.stdout)[0])
        for result in results:
            assert result.requests > 0
            assert result.errors == {}
            assert result.statuses == {200: result.requests}
            assert result.latency_ms["p50"] > 0
        pid = upstream.pid
    finally:
        upstream.stop()
    assert not Path(f"/proc/{pid}").exists()            # stopped and reaped


def test_loadgen_refuses_non_loopback_targets() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.loadgen", "--url", "http://example.invalid/",
                          "--duration", "1"], env=python_env(), capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode != 0 and "loopback" in out.stderr

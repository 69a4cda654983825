"""Setup, pinning, warm-up and the interleaved measured rounds.

Everything is started by this process on 127.0.0.1 and registered on an ExitStack before it is
started, so it is stopped (process groups) and its temp dir removed on any exit, Ctrl-C
included."""
from __future__ import annotations

import http.client
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.embedded_redis import RedisProcess, free_port
from proxy.settings import Settings

from bench import nginx as nginx_mod
from bench import wrk as wrk_mod
from bench.loadgen import LoadResult, merge_results, parse_loadgen_output
from bench.procs import (Pinning, RssSampler, Service, available_cpus, cpus_busy_seconds,
                         have_taskset,
                         max_status_kb, pin_pid, plan_pinning, settle, stop_all, tree_cpu_seconds,
                         wait_ready)
from bench.redisstats import commandstats, commandstats_delta, info, script_calls
from bench.report import add_floor_ratio, summarize
from bench.scenarios import PASS_LIMIT, Scenario
from bench.upstream import LARGE_SIZE, SMALL_BODY, UPLOAD_REPLY, UPLOAD_SIZE

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
READY_TIMEOUT = 60.0
LOAD_GRACE = 30.0                      # a load generator gets duration + this, then is killed
DISTURBED = 0.10                       # share of the SUT's CPU taken by others that taints a run
GATEWAY_VARS = frozenset(name.upper() for name in Settings.__dataclass_fields__)

Say = Callable[[str], None]


@dataclass
class Options:
    scenarios: list[Scenario]
    connections: int = 64
    duration: float = 10.0
    warmup: float = 3.0
    rounds: int = 3
    loadgen: str = "auto"              # auto | wrk | python
    install_wrk: bool = False
    upstream: str = "auto"             # auto | nginx | python
    pin: bool = True
    timeout: float = 10.0              # per request, seconds
    command: str = "python -m bench"


@dataclass
class Target:
    scenario: Scenario
    service: Service
    port: int


@dataclass
class Setup:
    pinning: Pinning
    wrk: str | None
    tmp: Path
    logs: Path
    redis_port: int = 0
    upstream_url: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    scripts: dict[str, str] = field(default_factory=dict)


def python_env(**extra: str) -> dict[str, str]:
    """The environment for our Python children: this one, with the repo on PYTHONPATH and none
    of the gateway's settings leaking in from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if k not in GATEWAY_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def gateway_env(scenario: Scenario, *, port: int, redis_url: str, upstream_url: str,
                workers: int, connections: int) -> dict[str, str]:
    settings = {
        "GATEWAY_HOST": HOST, "GATEWAY_PORT": str(port),
        "GATEWAY_WORKERS": str(workers if scenario.workers else 1),
        "REDIS_URL": redis_url, "UPSTREAM_BACKEND_URL": upstream_url,
        "RATE_LIMIT": PASS_LIMIT, "TIME_WINDOW": "3600",
        "MAX_CONCURRENT_REQUESTS": str(max(256, connections)),
        "QUEUE_TIMEOUT": "30", "UPSTREAM_TIMEOUT": "30",
        # closed: a Redis failure shows up as 503s instead of silently skipping the limiter
        "RATE_LIMIT_FAIL_MODE": "closed",
        "REDIS_KEY_PREFIX": f"bench-{scenario.name}",  # scenarios never share a counter
        "SHUTDOWN_TIMEOUT": "2", "LOG_LEVEL": "WARNING",
    }
    settings.update(scenario.env)
    return python_env(**settings)


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' (uncommitted changes)' if dirty else ''}"


# -- setup ---------------------------------------------------------------------------------------

def choose_wrk(opts: Options, say: Say) -> str | None:
    """wrk's path, or None for the Python load generator."""
    if opts.loadgen == "python":
        return None
    wrk = wrk_mod.find_wrk()
    if wrk is None and opts.install_wrk:
        if os.geteuid() != 0:
            say("--install-wrk: not root, not installing (run `apt-get install wrk` as root)")
        else:
            say("installing wrk: apt-get install -y wrk")
            wrk = wrk_mod.install_wrk()
            if wrk is None:
                say("apt-get could not install wrk")
    if wrk is None:
        if opts.loadgen == "wrk":
            raise RuntimeError("wrk is not installed: `apt-get install wrk`, or pass "
                               "--install-wrk as root, or --loadgen python")
        say("wrk not found (`apt-get install wrk`, or --install-wrk as root): using the Python "
            "load generator (bench/loadgen.py)")
    return wrk


def start_upstream(opts: Options, setup: Setup, stack: ExitStack, say: Say) -> Service:
    pin = setup.pinning
    port = free_port(HOST)
    nginx = nginx_mod.find_nginx() if opts.upstream in ("auto", "nginx") else None
    if opts.upstream == "nginx" and nginx is None:
        raise RuntimeError("--upstream nginx: nginx is not on PATH")
    if nginx is not None:
        directory = setup.tmp / "nginx"
        directory.mkdir()
        config = nginx_mod.write_config(directory, HOST, port)
        argv = pin.prefix(pin.aux) + nginx_mod.nginx_command(nginx, directory, config)
        version = nginx_mod.nginx_version(nginx)
        setup.meta["upstream"] = (f"nginx {'.'.join(map(str, version or ())) or '?'} "
                                  "(generated config, one process)")
        service = Service("upstream-nginx", argv, cwd=directory, log_dir=setup.logs)
    else:
        argv = pin.prefix(pin.aux) + [sys.executable, "-m", "bench.upstream", "--host", HOST,
                                      "--port", str(port)]
        setup.meta["upstream"] = "bench/upstream.py (raw asyncio HTTP/1.1, uvloop)"
        service = Service("upstream-python", argv, env=python_env(), cwd=setup.tmp,
                          log_dir=setup.logs)
    stack.callback(service.stop)
    service.start()
    wait_ready(service, HOST, port, "/", READY_TIMEOUT)
    check_upstream(port)
    setup.upstream_url = f"http://{HOST}:{port}"
    say(f"upstream: {setup.meta['upstream']} on {setup.upstream_url} (checked /, /large, "
        f"1 MiB POST /upload answered only after its last byte)")
    return service


def check_upstream(port: int) -> None:
    """The upstream serves what the scenarios expect, on one keep-alive connection, and
    answers an upload only once the whole body has arrived."""
    answers_early = _answers_before_body(port)
    if answers_early:
        raise RuntimeError(f"upstream self-check failed: POST /upload answered before the body "
                           f"was sent ({answers_early!r})")
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        checks: list[tuple[str, str, bytes | None, Callable[[bytes], bool]]] = [
            ("GET", "/", None, lambda b: b == SMALL_BODY),
            ("GET", "/large", None, lambda b: len(b) == LARGE_SIZE),
            ("POST", "/upload", b"x" * UPLOAD_SIZE, lambda b: b == UPLOAD_REPLY),
            ("GET", "/", None, lambda b: b == SMALL_BODY),
        ]
        for method, path, body, ok in checks:
            conn.request(method, path, body=body,
                         headers={"Content-Type": "application/octet-stream"} if body else {})
            response = conn.getresponse()
            data = response.read()
            if response.status != 200 or not ok(data):
                raise RuntimeError(f"upstream self-check failed: {method} {path} -> "
                                   f"{response.status}, {len(data)} bytes")
    finally:
        conn.close()


def _answers_before_body(port: int, wait: float = 0.5) -> bytes:
    """Send an upload's head and half its body, then listen: a correct sink says nothing yet."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(f"POST /upload HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                     f"Content-Length: {UPLOAD_SIZE}\r\n\r\n".encode()
                     + b"x" * (UPLOAD_SIZE // 2))
        sock.settimeout(wait)
        try:
            early = sock.recv(256)
        except socket.timeout:
            early = b""
        return early


def start_targets(opts: Options, setup: Setup, stack: ExitStack, say: Say) -> dict[str, Target]:
    """The floor app and one gateway process per gateway scenario, started side by side."""
    pin = setup.pinning
    cpus = len(available_cpus())
    redis_url = f"redis://{HOST}:{setup.redis_port}/0"
    targets: dict[str, Target] = {}
    services: list[Service] = []
    stack.callback(stop_all, services)
    for scenario in opts.scenarios:
        port = free_port(HOST)
        if scenario.target == "floor":
            argv = pin.prefix(pin.sut) + [sys.executable, "-m", "bench.floor", "--host", HOST,
                                          "--port", str(port), "--variant", scenario.variant]
            env = python_env()
        else:
            argv = pin.prefix(pin.workers if scenario.workers else pin.sut) + [
                sys.executable, "-m", "proxy"]
            env = gateway_env(scenario, port=port, redis_url=redis_url,
                              upstream_url=setup.upstream_url, workers=cpus,
                              connections=opts.connections)
        # cwd: an empty dir, so no .env is read
        service = Service(f"{scenario.target}-{scenario.name}", argv, env=env, cwd=setup.tmp,
                          log_dir=setup.logs)
        services.append(service)
        service.start()
        targets[scenario.name] = Target(scenario, service, port)
    for target in targets.values():
        path = "/" if target.scenario.target == "floor" else "/health"
        status = 429 if target.scenario.variant == "refusal" else 200
        wait_ready(target.service, HOST, target.port, path, READY_TIMEOUT, status=status)
    say("started: " + ", ".join(f"{t.service.name} (pid {t.service.pid}, :{t.port})"
                                for t in targets.values()))
    return targets


# -- load --------------------------------------------------------------------------------------

def run_load(opts: Options, setup: Setup, target: Target, duration: float) -> LoadResult:
    """One load run against `target` with the scenario's request, bounded in time."""
    scenario = target.scenario
    pin = setup.pinning
    url = f"http://{HOST}:{target.port}{scenario.path}"
    generators: list[Service] = []
    try:
        if setup.wrk is not None:
            threads = len(pin.load) if pin.load else max(1, len(available_cpus()) // 2)
            argv = pin.prefix(pin.load) + wrk_mod.wrk_command(
                setup.wrk, url, connections=opts.connections, threads=threads,
                duration=duration, script=setup.scripts[scenario.name], timeout=opts.timeout)
            generators.append(Service("wrk", argv, cwd=setup.tmp, log_dir=setup.logs))
        else:
            cores = list(pin.load) if pin.load else [None]
            cores = cores[:opts.connections]
            for i, core in enumerate(cores):
                share = opts.connections // len(cores) + (i < opts.connections % len(cores))
                argv = (pin.prefix((core,)) if core is not None else []) + [
                    sys.executable, "-m", "bench.loadgen", "--url", url,
                    "--connections", str(share), "--duration", f"{duration:g}",
                    "--method", scenario.method, "--body-size", str(scenario.body_size),
                    "--timeout", f"{opts.timeout:g}"]
                generators.append(Service(f"loadgen-{i}", argv, env=python_env(), cwd=setup.tmp,
                                          log_dir=setup.logs))
        for generator in generators:
            generator.start()
        deadline = time.monotonic() + duration + LOAD_GRACE
        for generator in generators:
            if not generator.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"{generator.name} still running {LOAD_GRACE:g}s after its "
                                   f"duration; killed")
    finally:
        stop_all(generators)
    outputs = []
    for generator in generators:
        assert generator.log_path is not None
        text = generator.log_path.read_text(errors="replace")
        if generator.returncode != 0:
            raise RuntimeError(f"{generator.name} exited with {generator.returncode}:\n"
                               f"{generator.log_tail()}")
        outputs.append(text)
    if setup.wrk is not None:
        return wrk_mod.parse_wrk_output(outputs[0])
    return merge_results([parse_loadgen_output(text) for text in outputs])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(opts: Options, setup: Setup, target: Target, duration: float) -> dict[str, Any]:
    """A load run with the system under test's CPU, memory and Redis traffic around it."""
    scenario = target.scenario
    root = target.service.pid
    # other processes busy on the SUT's own CPU disturb the run: measure them too
    sut_cpus = None if scenario.workers else setup.pinning.sut
    stats0 = commandstats(HOST, setup.redis_port)
    busy0 = cpus_busy_seconds(sut_cpus) if sut_cpus else 0.0
    cpu0, load_cpu0 = tree_cpu_seconds(root), _children_cpu()
    with RssSampler(root) as sampler:
        result = run_load(opts, setup, target, duration)
    cpu1, load_cpu1 = tree_cpu_seconds(root), _children_cpu()
    busy1 = cpus_busy_seconds(sut_cpus) if sut_cpus else 0.0
    stats1 = commandstats(HOST, setup.redis_port)
    hwm = max_status_kb(root, "VmHWM")
    settle(root)                      # its leftovers must not land in the next run's numbers
    cpu = cpu1 - cpu0
    redis_cmds = commandstats_delta(stats0, stats1)
    requests = result.requests
    if result.statuses:
        bad = sum(n for s, n in result.statuses.items() if s not in scenario.expected)
    else:
        bad = result.non_2xx
    return {
        "requests": requests, "duration_s": round(result.duration_s, 3),
        "rps": result.rps,
        "p50_ms": result.latency_ms.get("p50"), "p90_ms": result.latency_ms.get("p90"),
        "p99_ms": result.latency_ms.get("p99"), "max_ms": result.latency_ms.get("max"),
        "mean_ms": result.latency_ms.get("mean"),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_req": cpu / requests * 1e6 if requests else None,
        "sut_cpu_util": cpu / result.duration_s if result.duration_s else None,
        # busy time of the SUT's CPU not spent by the SUT (kernel work for it included), or None
        "others_on_sut_cpu": (max(0.0, busy1 - busy0 - cpu) / result.duration_s
                              if sut_cpus and result.duration_s else None),
        "redis_cmds": redis_cmds,
        "redis_cmds_per_req": sum(redis_cmds.values()) / requests if requests else None,
        "redis_scripts_per_req": script_calls(redis_cmds) / requests if requests else None,
        "rss_peak_kb": sampler.peak_kb or None, "hwm_kb": hwm,
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "share_429": result.share(429) if scenario.count_statuses else None,
        "bad_responses": bad, "socket_errors": sum(result.errors.values()),
        "errors": result.errors,
        "loadgen_cpu_util": ((load_cpu1 - load_cpu0) / result.duration_s
                             if result.duration_s else None),
    }


def raise_fd_limit() -> None:
    """Many connections need many descriptors, here and in every child (inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def describe_run(name: str, run: dict[str, Any]) -> str:
    def num(key: str, spec: str) -> str:
        value = run.get(key)
        return "-" if value is None else format(value, spec)
    text = (f"{name:8} {num('rps', ',.0f'):>8} req/s  p50 {num('p50_ms', '.2f')} ms  "
            f"p99 {num('p99_ms', '.2f')} ms  {num('cpu_us_per_req', '.0f')} µs CPU/req  "
            f"SUT CPU {num('sut_cpu_util', '.0%')}  load gen CPU {num('loadgen_cpu_util', '.0%')}")
    if run.get("share_429") is not None:
        text += f"  429 {run['share_429']:.2%}"
    if (run.get("others_on_sut_cpu") or 0) > DISTURBED:
        text += f"  !! other processes took {run['others_on_sut_cpu']:.0%} of the SUT's CPU"
    if run.get("bad_responses") or run.get("socket_errors"):
        text += (f"  !! {run['bad_responses']} unexpected statuses {run.get('statuses')}, "
                 f"{run['socket_errors']} socket errors {run.get('errors')}")
    return text


# -- the benchmark -----------------------------------------------------------------------------

def run_bench(opts: Options, say: Say = print) -> dict[str, Any]:
    raise_fd_limit()
    cpus = available_cpus()
    pinning = plan_pinning(cpus, have_taskset(), opts.pin)
    wrk = choose_wrk(opts, say)
    names = [s.name for s in opts.scenarios]
    estimate = len(names) * (opts.warmup + opts.rounds * (opts.duration + 0.5)) + 10
    say(f"scenarios: {', '.join(names)}; {opts.connections} connections, {opts.duration:g} s x "
        f"{opts.rounds} rounds + {opts.warmup:g} s warm-up each; about {estimate:.0f} s")
    pin_lines = pinning.describe()
    if pinning.aux and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, pinning.aux)      # this orchestrator stays off the SUT's CPU
        pin_lines.append("this benchmark process (starts runs, samples /proc): CPU "
                         + ",".join(map(str, pinning.aux)))
    for line in pin_lines:
        say(f"pinning: {line}")
    timestamp = time.strftime("%Y%m%d-%H%M%S")
    meta: dict[str, Any] = {
        "timestamp": timestamp, "command": opts.command, "git": git_describe(),
        "python": platform.python_version(), "platform": platform.platform(), "cpus": len(cpus),
        "connections": opts.connections, "duration_s": opts.duration, "warmup_s": opts.warmup,
        "rounds": opts.rounds, "pinning": pin_lines,
        "loadgen": (wrk_mod.wrk_version(wrk) if wrk else "bench/loadgen.py (Python, uvloop)")
        + (f", {len(pinning.load)} thread(s)/process(es)" if pinning.load else ""),
        "scenarios": {s.name: s.description for s in opts.scenarios},
    }
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-bench-")))
        setup = Setup(pinning=pinning, wrk=wrk, tmp=tmp, logs=tmp / "logs", meta=meta)
        setup.logs.mkdir()
        if wrk is not None:
            for scenario in opts.scenarios:
                script = tmp / f"{scenario.name}.lua"
                script.write_text(wrk_mod.lua_script(scenario.method, scenario.body_size,
                                                     scenario.count_statuses))
                setup.scripts[scenario.name] = str(script)

        redis = RedisProcess(port=free_port(HOST), host=HOST)
        stack.callback(redis.stop)
        redis.start()
        pin_pid(redis.pid or 0, pinning.aux)
        setup.redis_port = int(redis.url.rsplit(":", 1)[1].split("/")[0])
        version = next((line.split(":", 1)[1].strip() for line in info(
            HOST, setup.redis_port, "server").splitlines()
            if line.startswith("redis_version:")), "?")
        meta["redis"] = f"redis-server {version} (private, no persistence)"
        say(f"redis: {meta['redis']} on {HOST}:{setup.redis_port}")

        start_upstream(opts, setup, stack, say)
        targets = start_targets(opts, setup, stack, say)

        if opts.warmup > 0:
            say(f"warm-up ({opts.warmup:g} s per scenario, not recorded)")
            for name in names:
                say("  " + describe_run(name, measure(opts, setup, targets[name], opts.warmup)))
        for r in range(opts.rounds):
            say(f"round {r + 1}/{opts.rounds}")
            shift = r % len(names)                     # rotate the order: no fixed position
            for name in names[shift:] + names[:shift]:
                run = measure(opts, setup, targets[name], opts.duration)
                run["round"] = r + 1
                rounds[name].append(run)
                say("  " + describe_run(name, run))
        say("stopping everything")

    summary = {name: summarize(runs) for name, runs in rounds.items()}
    add_floor_ratio(summary)
    runs = [run for name_runs in rounds.values() for run in name_runs]
    disturbed = sum(1 for run in runs if (run.get("others_on_sut_cpu") or 0) > DISTURBED)
    meta["disturbed_runs"] = disturbed
    if disturbed:
        say(f"warning: in {disturbed} of {len(runs)} runs other processes took over "
            f"{DISTURBED:.0%} of the system under test's CPU (column 'others'); for clean "
            "numbers rerun on an otherwise idle machine")
    return {"meta": meta, "summary": summary, "rounds": rounds}

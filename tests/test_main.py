"""`python -m proxy` as a real process: config errors, embedded Redis, workers, shutdown."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from proxy.embedded_redis import free_port

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 20.0


def gateway_env(**env: object) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL",)}
    base["PYTHONPATH"] = str(ROOT)
    base.update({k: str(v) for k, v in env.items()})
    return base


@asynccontextmanager
async def gateway_process(tmp_path: Path, **env: object) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, list[str]]]:
    """Start `python -m proxy` (cwd = an empty dir, so no .env is read); yield it once /health
    answers, with its base URL and the log lines read so far; always stop it."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", cwd=tmp_path, env=gateway_env(GATEWAY_PORT=port, **env),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    log: list[str] = []
    reader = asyncio.create_task(_collect(proc, log))
    try:
        await _wait_health(proc, url)
        yield proc, url, log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await reader


async def _collect(proc: asyncio.subprocess.Process, log: list[str]) -> None:
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        log.append(line.decode(errors="replace").rstrip())


async def _wait_health(proc: asyncio.subprocess.Process, url: str) -> None:
    end = time.monotonic() + DEADLINE
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < end:
            assert proc.returncode is None, f"gateway exited with {proc.returncode}"
            try:
                if (await client.get(f"{url}/health")).json()["redis_status"] == "Connected":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"gateway at {url} not healthy after {DEADLINE}s")


async def _wait_refused(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            return
        writer.close()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{url} still accepts connections after SIGTERM")


async def wait_exit(proc: asyncio.subprocess.Process) -> int:
    return await asyncio.wait_for(proc.wait(), DEADLINE)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                                       # a zombie is not alive; reap it if it is ours
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


@pytest.mark.parametrize("name,value", [
    ("RATE_LIMIT", "zero"), ("TIME_WINDOW", "0"), ("UPSTREAM_BACKEND_URL", "ftp://x"),
    ("TRUSTED_PROXIES", "10.0.0.0/33"), ("RATE_LIMIT_FAIL_MODE", "maybe"), ("GATEWAY_PORT", "-1"),
])
def test_bad_setting_exits_before_binding_with_one_line(tmp_path, name, value):
    import subprocess
    port = free_port()
    env = gateway_env(GATEWAY_PORT=port)
    env[name] = value
    done = subprocess.run([sys.executable, "-m", "proxy"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert name in lines[0] and value in lines[0]
    assert "Traceback" not in done.stderr


def test_dotenv_is_read_and_environment_wins(tmp_path):
    import subprocess
    (tmp_path / ".env").write_text("RATE_LIMIT=7\nTIME_WINDOW=oops\n")
    env = gateway_env(TIME_WINDOW="not-a-number-either")
    done = subprocess.run([sys.executable, "-m", "proxy"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 2
    assert "TIME_WINDOW" in done.stderr and "not-a-number-either" in done.stderr


async def test_embedded_redis_starts_and_stops_cleanly(tmp_path, upstream):
    async with gateway_process(tmp_path, UPSTREAM_BACKEND_URL=upstream[1], RATE_LIMIT=2) as (proc, url, log):
        started = next(line for line in log if "embedded redis-server" in line)
        match = re.search(r"pid=(\d+) at unix://(\S+)/redis.sock", started)
        assert match, started
        redis_pid, redis_dir = int(match[1]), Path(match[2])
        assert pid_alive(redis_pid) and redis_dir.is_dir()
        async with httpx.AsyncClient(base_url=url) as client:
            codes = [(await client.get("/echo")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    end = time.monotonic() + DEADLINE
    while pid_alive(redis_pid) and time.monotonic() < end:
        await asyncio.sleep(0.05)
    assert not pid_alive(redis_pid)
    assert not redis_dir.exists()


async def test_sigterm_lets_in_flight_requests_finish(tmp_path, upstream, redis_server):
    async with gateway_process(tmp_path, UPSTREAM_BACKEND_URL=upstream[1], REDIS_URL=redis_server.url,
                               SHUTDOWN_TIMEOUT=10) as (proc, url, log):
        async with httpx.AsyncClient(base_url=url, timeout=DEADLINE) as client:
            in_flight = asyncio.create_task(client.get("/hold"))
            end = time.monotonic() + DEADLINE
            while upstream[0].in_flight == 0 and time.monotonic() < end:
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            await _wait_refused(url)           # shutdown has begun: no new connections
            upstream[0].release.set()
            response = await in_flight
        assert response.status_code == 200 and response.text == "held"
        assert await wait_exit(proc) == 0


async def test_workers_share_one_limit(tmp_path, upstream, redis_server):
    async with gateway_process(tmp_path, UPSTREAM_BACKEND_URL=upstream[1], REDIS_URL=redis_server.url,
                               GATEWAY_WORKERS=2, RATE_LIMIT=5, REDIS_KEY_PREFIX=f"w{free_port()}") as (proc, url, log):
        end = time.monotonic() + DEADLINE
        while sum("Running on" in line for line in log) < 2 and time.monotonic() < end:
            await asyncio.sleep(0.05)                           # both workers have bound
        limits = httpx.Limits(max_keepalive_connections=0)     # a new connection per request
        async with httpx.AsyncClient(base_url=url, limits=limits) as client:
            responses = await asyncio.gather(*(client.get("/echo") for _ in range(30)))
        pids = {line.split("[")[1].split("]")[0] for line in log if "Running on" in line}
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 5 and codes.count(429) == 25
    assert len(pids) == 2

"""`./dev demo`: the demo backend and the gateway (with its embedded Redis) in the foreground.

Ctrl-C or SIGTERM stops both; the gateway stops its own Redis and removes its temp dir."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

import httpx

from proxy.embedded_redis import die_with_parent

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def _spawn(module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", module], env=env, preexec_fn=die_with_parent())


def _wait_ready(url: str, proc: subprocess.Popen[bytes], name: str) -> None:
    """Poll `url` until it answers 200; fail early if the process died."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} while starting")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)                             # polling interval, not synchronisation
    raise RuntimeError(f"{name} not ready at {url} after {READY_TIMEOUT:g}s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    gateway_port = os.environ.get("GATEWAY_PORT", "8000")
    backend_port = os.environ.get("BACKEND_PORT", "8001")
    backend_url = f"http://127.0.0.1:{backend_port}"
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    env = {**os.environ, "BACKEND_PORT": backend_port, "GATEWAY_PORT": gateway_port,
           "GATEWAY_HOST": "127.0.0.1", "UPSTREAM_BACKEND_URL": backend_url,
           "REDIS_URL": ""}                          # empty: the gateway starts its own Redis
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(_spawn("backend", env))
        _wait_ready(f"{backend_url}/health", procs[0], "backend")
        procs.insert(0, _spawn("proxy", env))        # stopped first: it drains, then its Redis
        _wait_ready(f"{gateway_url}/health", procs[0], "gateway")
        rate, window = env.get("RATE_LIMIT", "5"), env.get("TIME_WINDOW", "60")
        print(f"""
  demo ready (gateway pid {procs[0].pid}, backend pid {procs[1].pid})
    gateway  {gateway_url}   limit {rate} requests per {window} s per client
    backend  {backend_url}
    redis    embedded, private to the gateway (see its log line above)

  try:
    curl -i {gateway_url}/users/1                      # forwarded, with RateLimit headers
    for i in $(seq 7); do curl -s -o /dev/null -w '%{{http_code}}\\n' {gateway_url}/products/; done
    curl -i '{gateway_url}/slow?delay=2'               # concurrency shaping
    curl -s {gateway_url}/health
    curl -s {gateway_url}/metrics

  Ctrl-C stops everything.
""", flush=True)
        while not stopping:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"pid {proc.pid} exited with status {proc.returncode}")
            time.sleep(0.2)                          # waiting for a signal, not synchronising
        print("demo: stopping", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        _stop(procs)


if __name__ == "__main__":
    sys.exit(main())

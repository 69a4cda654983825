"""Smoke test of the real compose stack: the image is built, `docker compose up --wait` starts
Redis, the demo backend, two gateway replicas and HAProxy, and one client's traffic through the
balancer meets one limit shared by both replicas. `docker compose down -v` removes it all.

Needs a Docker engine with the compose plugin and every image the stack uses already present
(no registry is asked); skipped otherwise. Select it with `-m compose`. DOCKER_BUILDKIT and the
other Docker variables of the environment reach `docker compose` unchanged.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from integration.conftest import SETTINGS_VARS
from proxy.embedded_redis import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
RATE_LIMIT = 5
REQUESTS = 12
BUILD_DEADLINE = 600           # a cold build installs the runtime requirements from PyPI
UP_DEADLINE = 180              # health checks run every 5-10 s; the gateways need Redis first
ANSWER_DEADLINE = 60           # the balancer's first health checks of the replicas
DOWN_DEADLINE = 120
POLL = 0.5

pytestmark = [pytest.mark.compose, pytest.mark.timeout(BUILD_DEADLINE + UP_DEADLINE + 300)]


def engine_problem() -> str | None:
    """None if a Docker engine and its compose plugin answer, else why not."""
    if shutil.which("docker") is None:
        return "no docker command on PATH"
    for argv in (["docker", "info", "--format", "{{.ServerVersion}}"], ["docker", "compose", "version"]):
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(argv)}` failed: {exc}"
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
            return f"`{' '.join(argv[:2])}` failed: {lines[-1]}"
    return None


def stack_images() -> list[str]:
    """The images the default profile pulls: each non-built service's and the Dockerfile's FROMs."""
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    images = [svc["image"] for svc in services.values()
              if "build" not in svc and not svc.get("profiles")]
    stages: set[str] = set()
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\s*FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            if match.group(1) not in stages:
                images.append(match.group(1))
            if match.group(2):
                stages.add(match.group(2))
    return sorted(set(images))


def missing_images() -> list[str]:
    return [image for image in stack_images()
            if subprocess.run(["docker", "image", "inspect", image], capture_output=True,
                              timeout=30).returncode != 0]


@dataclass
class Stack:
    """One compose project of our own: its name, files and environment."""

    project: str
    files: list[Path]
    env_file: Path
    env: dict[str, str]
    port: int

    def run(self, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["docker", "compose", "-p", self.project, "--project-directory", str(ROOT),
                "--env-file", str(self.env_file)]
        for file in self.files:
            argv += ["-f", str(file)]
        result = subprocess.run([*argv, *args], cwd=ROOT, env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n"
                                 f"{self.logs()}")
        return result

    def logs(self) -> str:
        try:
            result = self.run("logs", "--no-color", "--tail", "30", timeout=60, check=False)
        except subprocess.TimeoutExpired:
            return "(docker compose logs timed out)"
        return result.stdout[-6000:]

    def metrics(self, service: str) -> str:
        """The /metrics text of one replica, read inside its container (replicas publish no port)."""
        script = ("import urllib.request; print(urllib.request.urlopen("
                  "'http://127.0.0.1:8000/metrics', timeout=5).read().decode())")
        return self.run("exec", "-T", service, "python", "-c", script, timeout=60).stdout

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes of the project still on the engine."""
        label = f"label=com.docker.compose.project={self.project}"
        found = {}
        for kind, argv in (("containers", ["docker", "ps", "-a", "-q"]),
                           ("networks", ["docker", "network", "ls", "-q"]),
                           ("volumes", ["docker", "volume", "ls", "-q"])):
            result = subprocess.run([*argv, "--filter", label], capture_output=True, text=True,
                                    timeout=30, check=True)
            found[kind] = result.stdout.split()
        return found


def requests_total(metrics: str, outcome: str) -> float:
    samples = re.findall(rf'^gateway_requests_total{{[^}}]*outcome="{outcome}"[^}}]*}} (\S+)$',
                         metrics, re.MULTILINE)
    return sum(float(value) for value in samples)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    problem = engine_problem()
    if problem:
        pytest.skip(f"no Docker engine with compose answers: {problem}")
    missing = missing_images()
    if missing:
        pytest.skip(f"images not on the Docker engine (no registry is asked): {', '.join(missing)}")
    port = free_port()
    override = tmp_path / "compose.loopback.yaml"
    # !override replaces lb's list instead of adding to it: only this loopback port is published
    override.write_text(f'services:\n  lb:\n    ports: !override ["127.0.0.1:{port}:8000"]\n',
                        encoding="utf-8")
    env_file = tmp_path / "empty.env"           # the developer's .env must not change the stack
    env_file.write_text("", encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if k not in SETTINGS_VARS and not k.endswith("_PUBLISH") and not k.startswith("COMPOSE_")}
    env.update(RATE_LIMIT=str(RATE_LIMIT), TIME_WINDOW="60")
    yield Stack(f"gwsmoke-{uuid.uuid4().hex[:8]}", [COMPOSE, override], env_file, env, port)


def test_compose_stack_shares_one_limit_across_both_replicas(stack: Stack) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    stack.run("build", timeout=BUILD_DEADLINE)
    timings["build"] = time.monotonic() - started
    try:
        started = time.monotonic()
        stack.run("up", "--detach", "--wait", "--wait-timeout", str(UP_DEADLINE),
                  timeout=UP_DEADLINE + 60)
        timings["up"] = time.monotonic() - started
        started = time.monotonic()
        published = stack.run("port", "lb", "8000", timeout=30).stdout.strip()
        assert published == f"127.0.0.1:{stack.port}", published

        base = f"http://127.0.0.1:{stack.port}"
        # a fresh connection per request: the balancer picks a replica for each one
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=base, timeout=10, trust_env=False, limits=limits) as client:
            end = time.monotonic() + ANSWER_DEADLINE
            while True:                             # /health is never limited nor counted
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < end, f"lb not answering /health:\n{stack.logs()}"
                time.sleep(POLL)
            answers = [client.get("/") for _ in range(REQUESTS)]
        statuses = [r.status_code for r in answers]
        assert statuses == [200] * RATE_LIMIT + [429] * (REQUESTS - RATE_LIMIT), statuses
        refused = answers[-1]
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert json.loads(refused.text)["error"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1

        per_replica = {name: stack.metrics(name) for name in ("gateway1", "gateway2")}
        forwarded = {name: requests_total(text, "forwarded") for name, text in per_replica.items()}
        limited = {name: requests_total(text, "rate_limited") for name, text in per_replica.items()}
        # both replicas admitted some of the 5 and refused some of the rest: one shared budget
        assert all(count >= 1 for count in forwarded.values()), forwarded
        assert all(count >= 1 for count in limited.values()), limited
        assert sum(forwarded.values()) == RATE_LIMIT, forwarded
        assert sum(limited.values()) == REQUESTS - RATE_LIMIT, limited
        timings["test"] = time.monotonic() - started
    finally:
        started = time.monotonic()
        down = stack.run("down", "--volumes", "--remove-orphans", "--timeout", "20",
                         timeout=DOWN_DEADLINE, check=False)
        timings["down"] = time.monotonic() - started
        print("compose smoke timings (s): "
              + ", ".join(f"{name} {secs:.1f}" for name, secs in timings.items()))
    assert down.returncode == 0, down.stderr
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}

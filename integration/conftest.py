"""Fixtures for the multi-process tests: one Redis for the session, upstreams and gateway
replicas as real processes on loopback, each stopped by its own handle.

* ``redis_source`` -- ``redis:7`` in a container when Docker can run it here (a daemon on this
  machine answers, has or can pull the image, and the testcontainers variables allow it),
  otherwise a local ``redis-server`` (``RedisProcess``) on a free port. Force one with
  ``INTEGRATION_REDIS=docker|local`` (docker where it cannot run: a skip saying why). The source
  in use, and why Docker was passed over, are logged and shown in the summary.
* ``upstream`` -- ``integration/counting_upstream.py`` (counts what reaches it);
  ``backend`` -- the demo upstream ``python -m backend``.
* ``replicas`` -- ``await replicas.start(3, RATE_LIMIT=50, ...)`` runs ``python -m proxy``
  processes sharing the Redis, with a key prefix of their own per test.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis as redis_sync

from proxy.embedded_redis import RedisProcess, die_with_parent, free_port
from proxy.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COUNTING_UPSTREAM = Path(__file__).resolve().parent / "counting_upstream.py"
START_DEADLINE = 30.0          # seconds a process gets to answer after it is spawned
STOP_DEADLINE = 15.0           # seconds a process gets to exit after SIGTERM, then SIGKILL
POLL = 0.05                    # poll interval while waiting for a condition (with a deadline)

log = logging.getLogger("integration")
SETTINGS_VARS = frozenset(f.name.upper() for f in fields(Settings))
_SOURCE_KEY = pytest.StashKey[str]()


# ----------------------------------------------------------------------------------------------
# Redis: Docker container or local redis-server behind one small interface
# ----------------------------------------------------------------------------------------------

def wait_redis(url: str, deadline: float = START_DEADLINE) -> None:
    """Poll PING on `url` until it answers or the deadline passes."""
    end = time.monotonic() + deadline
    client = redis_sync.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis_sync.RedisError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"redis at {url} not answering after {deadline}s")
            time.sleep(POLL)
    finally:
        client.close()


class RedisSource:
    """A Redis the tests may stop and start again on the same address.

    Call stop()/start() from the main thread: a local redis-server is tied to the thread that
    spawned it (PR_SET_PDEATHSIG)."""

    def __init__(self) -> None:
        self.kind = "unset"
        self.url = ""

    # overridden below
    def start(self) -> None: raise NotImplementedError
    def stop(self) -> None: raise NotImplementedError
    def close(self) -> None: raise NotImplementedError
    def describe(self) -> str: raise NotImplementedError

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def restart(self) -> None:
        """Stop, then start on the same port (an empty Redis: no persistence on either path)."""
        self.stop()
        self.start()

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()
            client.script_flush()


class LocalRedis(RedisSource):
    """A private redis-server (no persistence) on a fixed free loopback port."""

    def __init__(self, not_docker: str = "") -> None:
        super().__init__()
        self.kind = "local"
        self.not_docker = not_docker              # why Docker was passed over, if it was
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._server: RedisProcess | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def pid(self) -> int | None:
        return self._server.pid if self._server is not None else None

    def start(self) -> None:
        if self._server is not None:
            return
        server = RedisProcess(port=self.port)     # a new process on the same port
        server.start()
        self._server = server

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def close(self) -> None:
        self.stop()

    def describe(self) -> str:
        why = f" (not Docker: {self.not_docker})" if self.not_docker else ""
        return f"local redis-server pid={self.pid} at {self.url}{why}"


class DockerRedis(RedisSource):
    """``redis:7`` via testcontainers, published on a fixed loopback port so a stop/start of the
    container keeps the URL. Only chosen where `docker_redis_problem` finds nothing wrong."""

    IMAGE = "redis:7"

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        super().__init__()
        from testcontainers.core.config import testcontainers_config
        from testcontainers.core.container import DockerContainer

        # testcontainers caches the variable at its first read; the choice saw it as it is now.
        testcontainers_config.ryuk_disabled = ryuk_disabled(environ)
        self.kind = "docker"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        # no persistence, like the local path: a restarted Redis comes back empty
        container = DockerContainer(self.IMAGE).with_command("redis-server --save '' --appendonly no")
        # published on loopback only, on a port fixed for the whole session (docker-py accepts
        # (host_ip, host_port); testcontainers' with_bind_ports has no host_ip)
        container.ports["6379"] = ("127.0.0.1", self.port)  # type: ignore[assignment]
        self._container = container
        self._started = False
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> None:
        if self._running:
            return
        if not self._started:
            # Marked first: a start that fails after the container exists must still remove it.
            self._started = True
            # The URL is known, so testcontainers' own host guess (a bridge gateway when
            # /.dockerenv exists) never comes into play.
            self._container.start()
        else:
            self._container.get_wrapped_container().start()
        wait_redis(self.url)
        self._running = True

    def stop(self) -> None:
        if self._running:
            self._container.get_wrapped_container().stop(timeout=2)
            self._running = False

    def close(self) -> None:
        if self._started:
            self._container.stop()                # removes the container, if it was created
        self._started = self._running = False

    def describe(self) -> str:
        return f"docker {self.IMAGE} container at {self.url}"


def ryuk_disabled(environ: Mapping[str, str]) -> bool:
    """TESTCONTAINERS_RYUK_DISABLED as testcontainers reads it (unset: its properties file)."""
    from testcontainers.core.config import ENABLE_FLAGS, TestcontainersConfiguration

    flag = environ.get("TESTCONTAINERS_RYUK_DISABLED")
    if flag is not None:
        return flag.lower() in ENABLE_FLAGS
    return TestcontainersConfiguration().ryuk_disabled


def docker_host_is_local(docker_host: str) -> bool:
    """Whether DOCKER_HOST names a daemon on this machine, whose 127.0.0.1 is ours."""
    if not docker_host:
        return True
    url = urlsplit(docker_host)
    if url.scheme in ("unix", "npipe"):
        return True
    if url.scheme in ("tcp", "http", "https") and url.hostname:
        if url.hostname == "localhost":
            return True
        try:
            return ipaddress.ip_address(url.hostname).is_loopback
        except ValueError:
            return False
    return False


def image_problem(client: Any, image: str, environ: Mapping[str, str],
                  pull_timeout: float) -> str | None:
    """None if `image` is on the daemon or could be pulled now, else why not."""
    import docker

    try:
        client.images.get(image)
        return None
    except docker.errors.ImageNotFound:
        pass
    except docker.errors.DockerException as exc:
        return f"`docker image inspect {image}` failed: {exc}"
    repository, colon, tag = image.rpartition(":")
    if not colon or "/" in tag:                   # no tag, or the colon was a registry's port
        repository, tag = image, "latest"
    try:
        # A client of its own: the pull's time limit is its socket timeout.
        puller = docker.from_env(environment=dict(environ), timeout=pull_timeout)
        try:
            puller.api.pull(repository, tag=tag)
        finally:
            puller.close()
        client.images.get(image)
        return None
    except docker.errors.APIError as exc:
        return f"image {image} is not on the daemon and cannot be pulled ({exc.explanation})"
    except (docker.errors.DockerException, OSError) as exc:   # OSError: requests' errors
        return f"image {image} is not on the daemon and cannot be pulled ({exc})"


def docker_redis_problem(environ: Mapping[str, str], timeout: float = 5.0,
                         pull_timeout: float = 60.0) -> str | None:
    """None if the Docker path can run here, else the reason, in the terms of the variable
    that decides it (DOCKER_HOST, TESTCONTAINERS_CONNECTION_MODE, TESTCONTAINERS_RYUK_DISABLED)."""
    mode = environ.get("TESTCONTAINERS_CONNECTION_MODE", "")
    if mode not in ("", "docker_host"):
        return (f"TESTCONTAINERS_CONNECTION_MODE={mode}: the Redis container is published on "
                "127.0.0.1 only, which needs docker_host")
    docker_host = environ.get("DOCKER_HOST", "")
    if not docker_host_is_local(docker_host):
        return (f"DOCKER_HOST={docker_host} is not on this machine: ports published on its "
                "127.0.0.1 are not reachable here")
    try:
        import docker
        import testcontainers.core.container  # noqa: F401 - the Docker path needs it
        from testcontainers.core.config import testcontainers_config
    except ImportError as exc:
        return f"the Docker path needs the testcontainers package ({exc})"
    try:
        client = docker.from_env(environment=dict(environ), timeout=timeout)
    except docker.errors.DockerException as exc:
        return f"no Docker daemon answers ({exc})"
    try:
        try:
            client.ping()
        except (docker.errors.DockerException, OSError) as exc:
            return f"no Docker daemon answers at {docker_host or 'the default socket'} ({exc})"
        problem = image_problem(client, DockerRedis.IMAGE, environ, pull_timeout)
        if problem:
            return problem
        if not ryuk_disabled(environ):
            ryuk_image = environ.get("RYUK_CONTAINER_IMAGE", testcontainers_config.ryuk_image)
            problem = image_problem(client, ryuk_image, environ, pull_timeout)
            if problem:
                return (f"testcontainers' reaper (Ryuk) is enabled and {problem}; set "
                        "TESTCONTAINERS_RYUK_DISABLED=true (the fixture removes its container itself)")
        return None
    finally:
        client.close()


def pick_redis_source(environ: Mapping[str, str] = os.environ) -> RedisSource:
    """The Redis the session uses: Docker when it can run here (forced by
    INTEGRATION_REDIS=docker: a skip otherwise), else a local redis-server."""
    choice = environ.get("INTEGRATION_REDIS", "auto").lower()
    if choice == "local":
        return LocalRedis()
    if choice not in ("auto", "docker"):
        raise pytest.UsageError(f"INTEGRATION_REDIS={choice!r}: expected auto, docker or local")
    problem = docker_redis_problem(environ)
    if problem is None:
        return DockerRedis(environ)
    if choice == "docker":
        pytest.skip(f"INTEGRATION_REDIS=docker, but Docker cannot be used: {problem}")
    return LocalRedis(not_docker=problem)         # redis_source logs the line saying why


@pytest.fixture(scope="session")
def redis_source(request: pytest.FixtureRequest) -> Iterator[RedisSource]:
    """The session's Redis (never 6379), running and empty at the start of each test that
    asks for `redis_url`."""
    source = pick_redis_source()
    try:
        source.start()
        line = f"integration tests use {source.describe()}"
        log.warning(line)
        request.config.stash[_SOURCE_KEY] = line
        yield source
    finally:
        source.close()


@pytest.fixture
def redis_url(redis_source: RedisSource) -> Iterator[str]:
    """The Redis URL for one test: started if an earlier test left it stopped, and flushed."""
    redis_source.start()
    redis_source.flushall()
    yield redis_source.url
    redis_source.start()                          # a failed fault test must not leave it down


@pytest.fixture
def key_prefix() -> str:
    """A REDIS_KEY_PREFIX of this test's own, so tests never see each other's keys."""
    return f"it{uuid.uuid4().hex[:12]}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    line = config.stash.get(_SOURCE_KEY, None)
    if line:
        terminalreporter.write_line(line)


# ----------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------

class ManagedProcess:
    """A child process we started: own process group, output to a log file, stopped by handle."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], cwd: Path,
                 log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.cwd = cwd
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} already running"
        with open(self.log_path, "ab") as out:
            # Own session: stop_group() can reach Hypercorn's worker processes too and only
            # them. PDEATHSIG: if pytest dies, the child gets SIGTERM (spawned from the main
            # thread, which lives as long as the session).
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True, preexec_fn=die_with_parent())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(log empty)"

    def terminate(self) -> None:
        """SIGTERM to the process (not waiting)."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, deadline: float = STOP_DEADLINE) -> int | None:
        """Wait for the exit after terminate(); SIGKILL its process group if it is late.
        Returns the exit status of the process (negative: killed by that signal)."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %ss; SIGKILL to its process group",
                        self.name, deadline)
            self._kill_group()            # the leader is not reaped yet: the group is ours
            return self.proc.wait()

    def stop(self, deadline: float = STOP_DEADLINE) -> int | None:
        self.terminate()
        return self.wait_stopped(deadline)

    def kill(self) -> int:
        """SIGKILL the process itself (a crash, as the fault tests want it)."""
        assert self.proc is not None
        self.proc.kill()
        return self.proc.wait()

    def _kill_group(self) -> None:
        """SIGKILL whatever is left in the process group we created (e.g. orphaned workers)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def base_env(**env: object) -> dict[str, str]:
    """The environment of a child: ours minus every gateway setting, plus `env`."""
    out = {k: v for k, v in os.environ.items() if k not in SETTINGS_VARS}
    out["PYTHONPATH"] = str(ROOT)
    out["PYTHONUNBUFFERED"] = "1"
    out.update({k: str(v) for k, v in env.items()})
    return out


def wait_http(process: ManagedProcess, url: str, ok: Any = None,
              deadline: float = START_DEADLINE) -> httpx.Response:
    """Poll GET `url` until `ok(response)` is true (default: status 200); fail with the log tail
    if the process exits or the deadline passes."""
    ok = ok or (lambda r: r.status_code == 200)
    end = time.monotonic() + deadline
    last: object = None
    with httpx.Client(timeout=2, trust_env=False) as client:
        while True:
            if not process.alive:
                raise AssertionError(f"{process.name} exited with {process.proc and process.proc.returncode}"
                                     f"; log:\n{process.log_tail()}")
            try:
                response = client.get(url)
                if ok(response):
                    return response
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            if time.monotonic() > end:
                raise AssertionError(f"{process.name}: {url} not ready after {deadline}s "
                                     f"(last: {last}); log:\n{process.log_tail()}")
            time.sleep(POLL)


# ----------------------------------------------------------------------------------------------
# upstreams
# ----------------------------------------------------------------------------------------------

class CountingUpstream:
    """``integration/counting_upstream.py`` on a fixed port; stop()/start() keep the port."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = ManagedProcess(
            f"counting upstream :{self.port}",
            [sys.executable, str(COUNTING_UPSTREAM), str(self.port)],
            base_env(), tmp_path, tmp_path / "counting-upstream.log")

    def start(self) -> None:
        self.process.spawn()
        wait_http(self.process, f"{self.url}/__count")

    def stop(self) -> None:
        self.process.stop()

    async def counts(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            response = await client.get(f"{self.url}/__count")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    async def reset(self) -> None:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            (await client.post(f"{self.url}/__reset")).raise_for_status()

    async def release(self) -> None:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            (await client.post(f"{self.url}/__release")).raise_for_status()

    def release_sync(self) -> None:
        if self.process.alive:
            try:
                httpx.post(f"{self.url}/__release", timeout=5, trust_env=False)
            except httpx.HTTPError:
                pass


class DemoBackend:
    """The demo upstream ``python -m backend`` on a fixed port (BACKEND_PORT)."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = ManagedProcess(
            f"demo backend :{self.port}", [sys.executable, "-m", "backend"],
            base_env(BACKEND_HOST="127.0.0.1", BACKEND_PORT=self.port), tmp_path,
            tmp_path / "backend.log")

    def start(self) -> None:
        self.process.spawn()
        wait_http(self.process, f"{self.url}/health")

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[CountingUpstream]:
    server = CountingUpstream(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.release_sync()                 # held requests must not delay the gateways' stop
        server.stop()


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[DemoBackend]:
    server = DemoBackend(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------
# gateway replicas
# ----------------------------------------------------------------------------------------------

@dataclass
class Replica:
    index: int
    port: int
    process: ManagedProcess
    workers: int = 1

    def workers_running(self) -> int:
        """How many Hypercorn workers have logged "Running on" (INFO level) so far."""
        try:
            text = self.process.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return 0
        return text.count("Running on http")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, source: str = "127.0.0.1", *, fresh_connections: bool = False,
               max_connections: int = 100, timeout: float = 30.0) -> httpx.AsyncClient:
        """An async client to this replica whose connections come from `source`
        (127.0.0.2, 127.0.0.3 ... play distinct client IPs)."""
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=0 if fresh_connections else max_connections)
        transport = httpx.AsyncHTTPTransport(local_address=source, limits=limits)
        return httpx.AsyncClient(base_url=self.url, transport=transport, timeout=timeout,
                                 trust_env=False)

    async def health(self) -> httpx.Response:
        async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
            return await client.get(f"{self.url}/health")

    async def metric(self, name: str) -> float:
        """The sum of every sample of metric `name` (whatever its labels) in this replica's
        /metrics -- one process's, with one worker."""
        async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
            text = (await client.get(f"{self.url}/metrics")).text
        samples = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        assert samples, f"{name} not in /metrics:\n{text}"
        return sum(float(v) for v in samples)


class Replicas:
    """Factory of gateway replicas for one test; every one is stopped at teardown."""

    def __init__(self, tmp_path: Path, redis_url: str, key_prefix: str) -> None:
        self.tmp_path = tmp_path
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.started: list[Replica] = []

    def spawn(self, upstream: str, **env: object) -> Replica:
        index = len(self.started)
        port = free_port()
        workdir = self.tmp_path / f"replica{index}"           # empty: no .env is read
        workdir.mkdir()
        settings = {
            "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": port, "REDIS_URL": self.redis_url,
            "UPSTREAM_BACKEND_URL": upstream, "REDIS_KEY_PREFIX": self.key_prefix,
            "SHUTDOWN_TIMEOUT": 3, "LOG_LEVEL": "INFO", **env,
        }
        process = ManagedProcess(f"replica{index} :{port}", [sys.executable, "-m", "proxy"],
                                 base_env(**settings), workdir,
                                 self.tmp_path / f"replica{index}.log")
        process.spawn()
        replica = Replica(index, port, process, int(str(settings.get("GATEWAY_WORKERS", 1))))
        if str(settings["LOG_LEVEL"]).upper() not in ("INFO", "DEBUG"):
            replica.workers = 0                   # "Running on" is not logged: cannot count
        self.started.append(replica)
        return replica

    async def start(self, count: int, *, upstream: str, require_redis: bool = True,
                    **env: object) -> list[Replica]:
        """Start `count` replicas at once and wait until each answers /health (200 or 503) with
        redis_status Connected (unless require_redis=False) and all its workers are running
        (otherwise the first requests all land on the first worker up)."""
        new = [self.spawn(upstream, **env) for _ in range(count)]
        await asyncio.gather(*(self.wait_ready(r, require_redis) for r in new))
        return new

    async def wait_ready(self, replica: Replica, require_redis: bool = True,
                         deadline: float = START_DEADLINE) -> None:
        end = time.monotonic() + deadline
        last: object = None
        async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
            while True:
                if not replica.process.alive:
                    raise AssertionError(f"{replica.process.name} exited; log:\n"
                                         f"{replica.process.log_tail()}")
                try:
                    response = await client.get(f"{replica.url}/health")
                    body = response.json()
                    running = replica.workers_running()
                    if response.status_code in (200, 503) and running >= replica.workers and (
                            not require_redis or body.get("redis_status") == "Connected"):
                        return
                    last = f"{response.status_code} {body}, {running} worker(s) running"
                except (httpx.HTTPError, ValueError) as exc:
                    last = repr(exc)
                if time.monotonic() > end:
                    raise AssertionError(f"{replica.process.name} not ready after {deadline}s "
                                         f"(last: {last}); log:\n{replica.process.log_tail()}")
                await asyncio.sleep(POLL)

    def stop_all(self) -> None:
        for replica in self.started:                  # SIGTERM all first, then wait for each
            replica.process.terminate()
        for replica in self.started:
            replica.process.wait_stopped()


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str, key_prefix: str) -> Iterator[Replicas]:
    factory = Replicas(tmp_path, redis_url, key_prefix)
    try:
        yield factory
    finally:
        factory.stop_all()

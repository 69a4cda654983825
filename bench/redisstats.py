"""Redis commands per request: INFO commandstats over a raw socket, before and after a run."""
from __future__ import annotations

import socket
from collections.abc import Mapping

# commands the benchmark itself sends, not the gateway
OWN_COMMANDS = frozenset({"info"})
# commands that run a script: one client round trip each, whatever the script calls inside
SCRIPT_COMMANDS = frozenset({"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"})


def parse_commandstats(text: str) -> dict[str, int]:
    """`cmdstat_evalsha:calls=12,usec=34,...` lines -> {"evalsha": 12}. Subcommands keep their
    Redis name (`client|setname`)."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("cmdstat_"):
            continue
        name, _, fields = line[len("cmdstat_"):].partition(":")
        for item in fields.split(","):
            key, _, value = item.partition("=")
            if key == "calls":
                calls[name.lower()] = int(value)
    return calls


def commandstats_delta(before: Mapping[str, int], after: Mapping[str, int],
                       exclude: frozenset[str] = OWN_COMMANDS) -> dict[str, int]:
    """Calls per command made between two snapshots (commands new in `after` count from 0),
    without the benchmark's own INFO calls; only commands that were called."""
    delta = {name: calls - before.get(name, 0) for name, calls in after.items()
             if name not in exclude}
    return {name: n for name, n in sorted(delta.items()) if n > 0}


def script_calls(delta: Mapping[str, int]) -> int:
    """Script invocations in a delta. commandstats also counts the commands a script runs
    (redis.call), so for a gateway that only sends EVALSHA, total calls = scripts x (1 + the
    script's inner calls), while scripts = round trips."""
    return sum(n for name, n in delta.items() if name in SCRIPT_COMMANDS)


def _read_line(sock: socket.socket, buf: bytearray) -> bytes:
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        buf += chunk
    end = buf.index(b"\r\n")
    line = bytes(buf[:end])
    del buf[:end + 2]
    return line


def info(host: str, port: int, section: str = "commandstats", timeout: float = 5.0) -> str:
    """The text of `INFO section` (RESP bulk string) from a Redis at host:port."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"INFO {section}\r\n".encode())
        buf = bytearray()
        header = _read_line(sock, buf)
        if header.startswith(b"-"):
            raise ConnectionError(f"redis answered {header.decode(errors='replace')}")
        if not header.startswith(b"$"):
            raise ConnectionError(f"unexpected reply to INFO: {header[:80]!r}")
        length = int(header[1:])
        while len(buf) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            buf += chunk
        return bytes(buf[:length]).decode("utf-8", errors="replace")


def commandstats(host: str, port: int) -> dict[str, int]:
    return parse_commandstats(info(host, port, "commandstats"))

"""Private temp dirs: a SIGKILLed owner's dir is swept by the next one made."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from proxy.tempdirs import private_tempdir


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_dirs_of_dead_owners_are_swept_and_live_ones_kept() -> None:
    root = Path(tempfile.gettempdir())
    stale = Path(tempfile.mkdtemp(prefix=f"gateway-metrics-{dead_pid()}-", dir=root))
    (stale / "counter_1.db").write_bytes(b"x")
    live = Path(tempfile.mkdtemp(prefix=f"gateway-metrics-{os.getppid()}-", dir=root))
    try:
        fresh = private_tempdir("metrics")
        try:
            assert not stale.exists()
            assert live.is_dir()
            assert fresh.is_dir() and fresh.name.startswith(f"gateway-metrics-{os.getpid()}-")
        finally:
            fresh.rmdir()
    finally:
        live.rmdir()


def test_other_kinds_are_left_alone() -> None:
    other = Path(tempfile.mkdtemp(prefix=f"gateway-redis-{dead_pid()}-"))
    try:
        private_tempdir("metrics").rmdir()
        assert other.is_dir()
    finally:
        other.rmdir()

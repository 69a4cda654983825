"""Private temp dirs that never pile up: each is named after its owner's PID, and making one
first removes those whose owner no longer runs (killed with SIGKILL, so it could not clean up)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def private_tempdir(kind: str) -> Path:
    """A new `gateway-<kind>-<pid>-*` dir in the system temp dir, after sweeping dead owners'."""
    root = Path(tempfile.gettempdir())
    for stale in root.glob(f"gateway-{kind}-*-*"):
        owner = stale.name.split("-")[2]
        if owner.isdigit() and not _running(int(owner)) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"gateway-{kind}-{os.getpid()}-"))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                                # someone else's process: not ours to judge
    return True

"""The soak (tools/soak.py) run for a few seconds with a tiny profile, so it cannot rot: it
measures, paces, switches faults, samples, judges, and stops everything it started."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from integration.conftest import ROOT, base_env


@pytest.mark.timeout(150)
def test_tiny_soak_samples_judges_and_stops_everything_it_started() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tools.soak", "--seconds", "8", "--measure", "1",
         "--sample-every", "2", "--fault-every", "3", "--fault-length", "1", "--warm-up", "0"],
        cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120)
    out = run.stdout
    print(out, run.stderr[-2000:])
    started = re.search(r"redis-server pid (\d+), backend pid (\d+), gateway pid (\d+)", out)
    assert started, out
    samples = re.findall(r"^\s+\d+\s+[\d.]+\s+\d+\s+\S+\s+\S+\s+\d+\s+(\d+)\s+\d+ ", out, re.M)
    assert len(samples) >= 3 and set(samples) == {"0"}, out          # no key without a TTL
    assert "soak: at the end in-flight 0, queue 0; fds" in out
    assert "keys without TTL: 0 at worst during the run, 0 of" in out
    assert re.search(r"soak: verdict (FLAT, nothing left behind|NOT OK)$", out, re.M), out
    assert run.returncode in (0, 1), run.stderr[-2000:]
    assert "soak: stopped redis-server, backend, gateway and the fault proxies" in out
    for pid in started.groups():
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} still running"

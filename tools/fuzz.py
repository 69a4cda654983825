"""`./dev fuzz --minutes N`: the protocol fuzzer's properties (tests/test_fuzz.py, marker
`fuzz`) in rounds of fresh random examples until N minutes have passed or one fails.

Each round is one pytest run with FUZZ_EXAMPLES examples per property and a new seed; failures
are kept in .hypothesis/fuzz and replayed first by the next run. Prints a summary at the end."""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

GRACE = 600.0                          # a round may overrun the budget by this much, then it is stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="time budget (default 10)")
    parser.add_argument("--examples", type=int, default=300,
                        help="examples per property per round (default 300)")
    args, pytest_args = parser.parse_known_args(argv)      # the rest goes to pytest (-k framing)
    if args.minutes <= 0 or args.examples <= 0:
        parser.error("--minutes and --examples must be positive")
    end = time.monotonic() + args.minutes * 60
    examples: Counter[str] = Counter()
    rounds = 0
    status = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        report = Path(tmp) / "examples.jsonl"
        while time.monotonic() < end:
            rounds += 1
            seed = random.randrange(2**32)
            print(f"fuzz: round {rounds}, seed {seed}, {args.examples} examples per property",
                  flush=True)
            env = {**os.environ, "FUZZ_EXAMPLES": str(args.examples), "FUZZ_REPORT": str(report)}
            command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "fuzz",
                       "-o", "timeout=0", "-q", f"--hypothesis-seed={seed}",
                       "--hypothesis-show-statistics", "tests/test_fuzz.py", *pytest_args]
            try:
                status = subprocess.run(command, env=env,
                                        timeout=max(0.0, end - time.monotonic()) + GRACE).returncode
            except subprocess.TimeoutExpired:
                print(f"fuzz: round {rounds} overran the budget by {GRACE:g} s; stopped", flush=True)
                status = 1
            if report.exists():
                for line in report.read_text().splitlines():
                    entry = json.loads(line)
                    examples[entry["test"]] += entry["examples"]
                report.unlink()
            if status != 0:
                break
    minutes = (time.monotonic() - started) / 60
    print(f"\nfuzz: {rounds} round(s) in {minutes:.1f} min, "
          f"{'FAILED (see above; replayed first next time)' if status else 'no failure'}")
    for test, count in sorted(examples.items()):
        print(f"  {count:8d} examples  {test}")
    return status


if __name__ == "__main__":
    sys.exit(main())

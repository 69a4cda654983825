"""`python -m bench`: benchmark the gateway against a bare Hypercorn app, loopback only.

Starts a private Redis, a fast upstream (nginx when on PATH, else bench/upstream.py), the floor
app and one gateway process per scenario; pins the system under test and the load generator to
separate CPUs; warms up; runs interleaved rounds; prints medians and writes
bench-results/results-<timestamp>.md and .json. Everything it starts is stopped on exit,
Ctrl-C included."""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from types import FrameType

from bench.report import format_table, write_results
from bench.runner import ROOT, Options, run_bench
from bench.scenarios import SCENARIOS, select

QUICK = {"duration": 3.0, "warmup": 1.0, "rounds": 2}
DEFAULT = {"duration": 10.0, "warmup": 3.0, "rounds": 3}
MAX_DURATION = 600.0
MAX_ROUNDS = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios: " + "; ".join(f"{s.name}: {s.description}"
                                         for s in SCENARIOS.values()))
    parser.add_argument("--quick", action="store_true",
                        help=f"about a minute: {QUICK['duration']:g} s runs, "
                             f"{QUICK['rounds']} rounds (default: {DEFAULT['duration']:g} s, "
                             f"{DEFAULT['rounds']} rounds, a few minutes)")
    parser.add_argument("--scenarios", help="comma-separated subset, e.g. pass,blocked "
                        "(floor is always added: the ratios need it)")
    parser.add_argument("--connections", type=int, default=64,
                        help="keep-alive connections (default 64)")
    parser.add_argument("--duration", type=float, help="seconds per measured run")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (medians reported)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per scenario")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="auto: wrk when installed, else the Python load generator")
    parser.add_argument("--install-wrk", action="store_true",
                        help="as root: `apt-get install -y wrk` when wrk is missing")
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto",
                        help="auto: nginx when on PATH, else bench/upstream.py")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds before a request counts as timed out (default 10)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results",
                        help="results directory (default: bench-results/ in the repo)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULT
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:g}] seconds")
    if not 0 <= args.warmup <= MAX_DURATION:
        parser.error(f"--warmup must be in [0, {MAX_DURATION:g}] seconds")
    if not 1 <= args.rounds <= MAX_ROUNDS:
        parser.error(f"--rounds must be 1 to {MAX_ROUNDS}")
    if not 1 <= args.connections <= 10_000:
        parser.error("--connections must be 1 to 10000")
    if not 0 < args.timeout <= 120:
        parser.error("--timeout must be in (0, 120] seconds")
    try:
        args.selected = select(args.scenarios)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """First Ctrl-C or SIGTERM: unwind (the finally blocks stop everything); later ones are
    ignored so the cleanup itself is not interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = Options(
        scenarios=args.selected, connections=args.connections, duration=args.duration,
        warmup=args.warmup, rounds=args.rounds, loadgen=args.loadgen,
        install_wrk=args.install_wrk, upstream=args.upstream, pin=not args.no_pin,
        timeout=args.timeout,
        command=shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]))
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = run_bench(options, say=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_table(results["summary"]))
    md_path, json_path = write_results(args.out, results)
    print(f"\nwritten: {md_path}\n         {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

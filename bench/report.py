"""Medians over rounds, the printed table, and bench-results/results-<timestamp>.{md,json}."""
from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# per-run metrics summarised by their median over rounds
MEDIAN_KEYS = ("rps", "p50_ms", "p90_ms", "p99_ms", "cpu_us_per_req", "sut_cpu_util",
               "redis_cmds_per_req", "redis_scripts_per_req", "share_429", "loadgen_cpu_util",
               "others_on_sut_cpu")
# memory only grows: the largest value of any round
MAX_KEYS = ("rss_peak_kb", "hwm_kb")
SUM_KEYS = ("requests", "bad_responses", "socket_errors")


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"rounds": len(rounds)}
    for key in MEDIAN_KEYS:
        summary[key] = median([r.get(key) for r in rounds])
    for key in MAX_KEYS:
        values = [r[key] for r in rounds if r.get(key) is not None]
        summary[key] = max(values) if values else None
    for key in SUM_KEYS:
        summary[key] = sum(r.get(key) or 0 for r in rounds)
    return summary


def add_floor_ratio(summaries: dict[str, dict[str, Any]]) -> None:
    floor = summaries.get("floor", {}).get("rps")
    for summary in summaries.values():
        rps = summary.get("rps")
        summary["vs_floor"] = rps / floor if floor and rps is not None else None


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value * scale, spec)


COLUMNS = (
    ("scenario", "scenario", None, 1.0),
    ("req/s", "rps", ",.0f", 1.0),
    ("p50 ms", "p50_ms", ".2f", 1.0),
    ("p99 ms", "p99_ms", ".2f", 1.0),
    ("CPU µs/req", "cpu_us_per_req", ".0f", 1.0),
    ("SUT CPU", "sut_cpu_util", ".0%", 1.0),
    ("others", "others_on_sut_cpu", ".0%", 1.0),
    ("Redis cmd/req", "redis_cmds_per_req", ".3f", 1.0),
    ("scripts/req", "redis_scripts_per_req", ".3f", 1.0),
    ("RSS MiB (run peak)", "rss_peak_kb", ".1f", 1 / 1024),
    ("VmHWM MiB", "hwm_kb", ".1f", 1 / 1024),
    ("vs floor", "vs_floor", ".1%", 1.0),
    ("429 share", "share_429", ".2%", 1.0),
    ("bad resp / sock err", None, None, 1.0),
)


def table_rows(summaries: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name, summary in summaries.items():
        row = []
        for _, key, spec, scale in COLUMNS:
            if key == "scenario":
                row.append(name)
            elif key is None:
                row.append(f"{summary.get('bad_responses', 0)} / {summary.get('socket_errors', 0)}")
            else:
                assert spec is not None
                row.append(_fmt(summary.get(key), spec, scale))
        rows.append(row)
    return rows


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """A plain-text table, numbers right-aligned."""
    header = [title for title, *_ in COLUMNS]
    rows = table_rows(summaries)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    summaries = results["summary"]
    header = [title for title, *_ in COLUMNS]
    out = [f"# Gateway benchmark {meta['timestamp']}", ""]
    out += [f"- command: `{meta['command']}`",
            f"- commit: {meta['git']}",
            f"- machine: {meta['cpus']} CPUs available, Python {meta['python']}, {meta['platform']}",
            f"- load generator: {meta['loadgen']}; {meta['connections']} keep-alive connections, "
            f"{meta['duration_s']} s per run, {meta['warmup_s']} s warm-up per scenario, "
            f"{meta['rounds']} interleaved rounds (medians reported)",
            f"- upstream: {meta['upstream']}; Redis: {meta['redis']}",
            "- pinning: " + "; ".join(meta["pinning"]),
            ""]
    if meta.get("disturbed_runs"):
        out += [f"**Disturbed:** in {meta['disturbed_runs']} run(s) other processes took over "
                "10% of the system under test's CPU (column `others`); rerun on an idle machine "
                "for clean numbers.", ""]
    out += ["| " + " | ".join(header) + " |",
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in table_rows(summaries)]
    out += ["", "## Scenarios", ""]
    out += [f"- **{name}**: {desc}" for name, desc in meta["scenarios"].items()]
    out += ["", "## Requests/s per round", ""]
    names = list(results["rounds"])
    count = max((len(v) for v in results["rounds"].values()), default=0)
    out += ["| round | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i in range(count):
        cells = []
        for name in names:
            runs = results["rounds"][name]
            cells.append(f"{runs[i]['rps']:,.0f}" if i < len(runs) else "-")
        out.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    out += ["", "## Columns", ""]
    out += [f"- {line}" for line in NOTES]
    return "\n".join(out) + "\n"


NOTES = (
    "req/s, p50, p99: completed responses per second of the run and their latency, from the "
    "load generator (closed loop, no coordinated-omission correction); median over rounds.",
    "CPU µs/req: utime+stime of the system under test and all its descendants (/proc/<pid>/stat, "
    "before and after the run) divided by the responses completed.",
    "SUT CPU: that CPU time over the run's wall time; near 100% on one pinned CPU means the "
    "system under test, not the load generator, was the bottleneck.",
    "others: busy time of the SUT's CPU (/proc/stat) not used by the SUT itself: other "
    "processes on the machine, plus kernel work such as softirqs; high values mean a disturbed "
    "run (not measured for workers, which spans all CPUs).",
    "Redis cmd/req: INFO commandstats calls made during the run (the benchmark's own INFO "
    "excluded) per response. Redis counts the commands a Lua script runs as well, so one EVALSHA "
    "whose script calls GET, INCR and PTTL counts 4; scripts/req counts the EVAL/EVALSHA/FCALL "
    "calls alone, i.e. the limiter's round trips per response.",
    "RSS MiB (run peak): the largest VmRSS of any one process of the system under test, sampled "
    "every 100 ms during the runs; VmHWM: the largest high-water mark since the process started.",
    "vs floor: req/s over the bare Hypercorn app's req/s in the same benchmark run.",
    "429 share: 429 answers over all answers (blocked only; counted by status).",
    "With wrk, requests still in flight when it stops are abandoned: their CPU and Redis work "
    "is counted but not their answers, which inflates per-request figures by about "
    "connections / requests. The Python load generator waits for them, so its figures are exact.",
    "bad resp / sock err: answers with an unexpected status, and connect/read/write/timeout "
    "errors, summed over the rounds.",
)


def write_results(out_dir: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"results-{results['meta']['timestamp']}"
    md_path, json_path = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    md_path.write_text(markdown(results))
    return md_path, json_path

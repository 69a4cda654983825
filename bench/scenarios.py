"""The benchmark's scenarios: what the system under test is, and what load it gets."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from bench.upstream import UPLOAD_SIZE

PASS_LIMIT = str(10**9)               # "huge": every request is admitted


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    target: str = "gateway"            # "gateway" or "floor"
    path: str = "/"
    method: str = "GET"
    body_size: int = 0
    env: Mapping[str, str] = field(default_factory=dict)   # gateway settings for this scenario
    count_statuses: bool = False       # wrk: add the (slower) response() callback
    expected: frozenset[int] = frozenset({200})
    workers: bool = False              # GATEWAY_WORKERS = number of CPUs
    variant: str = "plain"             # the floor app's variant (bench/floor.py)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("pass", "RATE_LIMIT huge: every request forwarded, small body"),
    Scenario("blocked", "RATE_LIMIT=1: one client far over its limit, all but its first "
             "request answered 429 by the gateway",
             env={"RATE_LIMIT": "1"}, count_statuses=True, expected=frozenset({200, 429})),
    Scenario("large", "RATE_LIMIT huge: 64 KiB responses relayed", path="/large"),
    Scenario("upload", "RATE_LIMIT huge: 1 MiB request bodies streamed upstream",
             path="/upload", method="POST", body_size=UPLOAD_SIZE),
    Scenario("workers", "as pass, with GATEWAY_WORKERS = number of CPUs", workers=True),
    Scenario("floor", "bare Hypercorn app, constant small body: the ceiling", target="floor"),
    # yardsticks: the server alone doing what blocked and upload make the gateway do
    Scenario("floor-429", "bare Hypercorn app answering the gateway's own 429 (same headers "
             "and body): the ceiling for blocked", target="floor", variant="refusal",
             count_statuses=True, expected=frozenset({429})),
    Scenario("floor-upload", "bare Hypercorn app reading and discarding 1 MiB request bodies: "
             "the ceiling for upload", target="floor", variant="sink", path="/upload",
             method="POST", body_size=UPLOAD_SIZE),
)}


def select(names: str | None) -> list[Scenario]:
    """Scenarios named in a comma-separated list (all when None), in the canonical order; the
    floor is always added since every ratio is taken against it."""
    if names is None:
        return list(SCENARIOS.values())
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in SCENARIOS]
    if unknown or not wanted:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(SCENARIOS)}")
    chosen = set(wanted) | {"floor"}
    return [s for s in SCENARIOS.values() if s.name in chosen]

"""Request counters and their Prometheus text exposition (per process)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

OUTCOMES = ("forwarded", "rate_limited", "shed", "upstream_error", "limiter_error",
            "client_error", "client_closed", "internal_error")


class Metrics:
    """Counts every request of the limited path by outcome."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    @property
    def total_requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def blocked_requests(self) -> int:
        return self.outcomes["rate_limited"]

    def render(self, extra: Iterable[tuple[str, str, str, float]]) -> str:
        """Prometheus text format: the outcome counter, then (name, type, help, value) samples."""
        lines = [
            "# HELP gateway_requests_total Requests on the limited path, by outcome.",
            "# TYPE gateway_requests_total counter",
            *(f'gateway_requests_total{{outcome="{o}"}} {self.outcomes[o]}' for o in OUTCOMES),
            "# HELP gateway_blocked_requests_total Requests refused with 429.",
            "# TYPE gateway_blocked_requests_total counter",
            f"gateway_blocked_requests_total {self.blocked_requests}",
        ]
        for name, kind, help_text, value in extra:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"

"""Server metrics in the Prometheus text format (version 0.0.4), written by hand: no client library needed.

Counters of requests by endpoint and status, histograms of request latency and batch size, and gauges read when
scraped (queue depth, adapters loaded and resident).
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    """Cumulative buckets, sum and count of observed values."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative; made cumulative when rendered
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Add one value."""
        index = bisect.bisect_left(self.bounds, value)
        if index < len(self.bounds):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        """Exposition lines: ``name_bucket{le=...}``, ``name_sum``, ``name_count``."""
        sep = "," if labels else ""
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{_num(bound)}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.total:.6f}", f"{name}_count{braces} {self.count}"]
        return out


class Metrics:
    """Everything /metrics shows; safe to update from any thread."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]] | None = None) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.gauges = gauges or {}

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, size: int) -> None:
        """Record the size of one batch run through the model."""
        with self._lock:
            self.batch_size.observe(size)

    def render(self) -> str:
        """The exposition text."""
        with self._lock:
            lines = ["# HELP adapterkit_requests_total HTTP requests answered, by endpoint and status.",
                     "# TYPE adapterkit_requests_total counter"]
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(f'adapterkit_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
            lines += ["# HELP adapterkit_request_seconds Time from request received to answer sent.",
                      "# TYPE adapterkit_request_seconds histogram"]
            for endpoint, hist in sorted(self.latency.items()):
                lines += hist.lines("adapterkit_request_seconds", f'endpoint="{endpoint}"')
            lines += ["# HELP adapterkit_batch_size Rows per model call (a decode step of the running batch, "
                      "or a whole batch).",
                      "# TYPE adapterkit_batch_size histogram", *self.batch_size.lines("adapterkit_batch_size")]
        for name, (help_text, read) in self.gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_num(read())}"]
        return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))

"""A node's request counters, latencies and recent rates, pure (no I/O, no
clock of its own: the caller passes the time).

``RequestStats`` counts client requests by op and outcome (``ok`` or the
error code), sorts their durations into histogram buckets per op, and keeps
per-second buckets of the last ``WINDOW`` seconds so that ``qkv status`` can
show requests and errors per second without two samples. Recording is a few
dictionary and list updates per request, with no lock: the Prometheus
collector (``quorum.metrics``) reads these numbers when it is scraped, so
the hot path pays nothing for metrics beyond this.
"""

from __future__ import annotations

import bisect
import collections
import math

__all__ = ["LATENCY_BUCKETS", "WINDOW", "Latencies", "RequestStats"]

#: seconds over which rates are averaged
WINDOW = 10
#: upper bounds (seconds) of the latency histogram: from a fast read on
#: loopback (~0.3 ms) to past the request deadline
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Latencies:
    """A histogram of durations: a count per bucket (the last one unbounded)
    and their sum."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(bound, observations <= bound)`` per bucket, infinity last (the
        Prometheus histogram shape)."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class RequestStats:
    def __init__(
        self, now: float, window: int = WINDOW, ops: tuple[str, ...] = ("get", "set", "delete", "cas", "incr")
    ) -> None:
        self.started = now
        self.window = window
        #: (op, outcome) -> count since start
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        #: op -> durations of its requests, every outcome included
        self.latencies: dict[str, Latencies] = {op: Latencies() for op in ops}
        # second -> [requests, errors]; only the last ``window`` seconds kept
        self._buckets: collections.OrderedDict[int, list[int]] = collections.OrderedDict()

    def record(self, op: str, outcome: str, now: float, seconds: float) -> None:
        """One request of ``op`` finished with ``outcome`` (``ok`` or an
        error code) after ``seconds``."""
        self.counts[(op, outcome)] += 1
        latencies = self.latencies.get(op)
        if latencies is None:
            latencies = self.latencies[op] = Latencies()
        latencies.observe(seconds)
        second = int(now)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = [0, 0]
            self._expire(second)
        bucket[0] += 1
        if outcome != "ok":
            bucket[1] += 1

    def _expire(self, second: int) -> None:
        while self._buckets and next(iter(self._buckets)) <= second - self.window:
            self._buckets.popitem(last=False)

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    @property
    def errors(self) -> int:
        return sum(n for (_, outcome), n in self.counts.items() if outcome != "ok")

    def rates(self, now: float) -> tuple[float, float]:
        """Requests and errors per second over the last ``window`` complete
        seconds (fewer just after the start)."""
        second = int(now)
        self._expire(second)
        span = max(1.0, min(float(self.window), now - self.started))
        requests = errors = 0
        for s, (r, e) in self._buckets.items():
            if s > second - self.window:
                requests += r
                errors += e
        return requests / span, errors / span

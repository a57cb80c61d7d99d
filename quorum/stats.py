"""A node's request counters and recent rates, pure (no I/O, no clock of
its own: the caller passes the time).

``RequestStats`` counts client requests by op and outcome (``ok`` or the
error code), and keeps per-second buckets of the last ``WINDOW`` seconds so
that ``qkv status`` can show requests and errors per second without two
samples. Counting is O(1) per request.
"""

from __future__ import annotations

import collections

__all__ = ["WINDOW", "RequestStats"]

#: seconds over which rates are averaged
WINDOW = 10


class RequestStats:
    def __init__(self, now: float, window: int = WINDOW) -> None:
        self.started = now
        self.window = window
        #: (op, outcome) -> count since start
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        # second -> [requests, errors]; only the last ``window`` seconds kept
        self._buckets: collections.OrderedDict[int, list[int]] = collections.OrderedDict()

    def record(self, op: str, outcome: str, now: float) -> None:
        """One request of ``op`` finished with ``outcome`` (``ok`` or an
        error code)."""
        self.counts[(op, outcome)] += 1
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

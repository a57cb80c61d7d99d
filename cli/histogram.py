"""A latency histogram in the manner of HdrHistogram: log-linear buckets.

Values (microseconds) fall into one of ``SUB`` linear sub-buckets of their
power of two, so every recorded value is known within 1/SUB (about 1.6%)
whatever its magnitude, in constant memory and O(1) per record.
"""

from __future__ import annotations

import math
from fractions import Fraction

SUB_BITS = 6
SUB = 1 << SUB_BITS


class Histogram:
    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.max = 0

    @staticmethod
    def _index(value: int) -> int:
        if value < SUB:
            return value
        shift = value.bit_length() - SUB_BITS - 1
        return ((shift + 1) << SUB_BITS) + ((value >> shift) - SUB)

    @staticmethod
    def _upper(index: int) -> int:
        """The largest value that falls into bucket ``index``."""
        if index < SUB:
            return index
        shift = (index >> SUB_BITS) - 1
        sub = (index & (SUB - 1)) + SUB
        return ((sub + 1) << shift) - 1

    def record(self, micros: int) -> None:
        micros = max(0, micros)
        i = self._index(micros)
        self.counts[i] = self.counts.get(i, 0) + 1
        self.total += 1
        if micros > self.max:
            self.max = micros

    def merge(self, other: Histogram) -> None:
        for i, n in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + n
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, p: float) -> int:
        """The value at or below which ``p`` percent of records fall."""
        if not self.total:
            return 0
        # Exact arithmetic: 99.9 is not exactly representable, and a float
        # rank can come out one too high.
        rank = max(1, math.ceil(Fraction(str(p)) * self.total / 100))
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                return min(self._upper(i), self.max)
        return self.max

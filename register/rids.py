"""Recent request ids, bounded by count and by age.

A coordinator retrying a write with the same rid must find the first
attempt's tag on any node of its query majority; so every replica keeps the
rids it stored, with their tags, durably. The table cannot grow forever: it
keeps at most ``max_count`` records, none older than ``max_age`` seconds.
Expiry is the documented limit of de-duplication: a retry arriving after its
rid expired writes again (still linearizable, as a new write).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from register.model import RidRecord

DEFAULT_MAX_COUNT = 100_000
DEFAULT_MAX_AGE = 600.0


@attrs.define
class RidTable:
    """An insertion-ordered map rid -> record (oldest first)."""

    max_count: int = DEFAULT_MAX_COUNT
    max_age: float = DEFAULT_MAX_AGE
    _records: dict[bytes, RidRecord] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return len(self._records)

    def lookup(self, rid: bytes) -> RidRecord | None:
        return self._records.get(rid)

    def records(self) -> list[RidRecord]:
        return list(self._records.values())

    def add(self, records: Iterable[RidRecord], now: float) -> list[bytes]:
        """Remember ``records``; return the rids that fell out (to delete
        from storage in the same commit)."""
        for record in records:
            # Re-adding a rid moves it to the end (it is fresh again); a rid
            # keeps the first tag it was stored under.
            first = self._records.pop(record.rid, None)
            self._records[record.rid] = record if first is None else attrs.evolve(first, at=record.at)
        return self.expire(now)

    def expire(self, now: float) -> list[bytes]:
        dropped: list[bytes] = []
        horizon = now - self.max_age
        for rid, record in self._records.items():
            if len(self._records) - len(dropped) <= self.max_count and record.at >= horizon:
                break
            dropped.append(rid)
        for rid in dropped:
            del self._records[rid]
        return dropped

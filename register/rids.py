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

from register.model import RidNote, RidRecord, Tag

DEFAULT_MAX_COUNT = 100_000
DEFAULT_MAX_AGE = 600.0


@attrs.define
class RidTable:
    """An insertion-ordered map rid -> record (oldest first)."""

    max_count: int = DEFAULT_MAX_COUNT
    max_age: float = DEFAULT_MAX_AGE
    _records: dict[bytes, RidRecord] = attrs.field(factory=dict)
    #: version tag -> the notes that came with that version, as they came:
    #: the write that made it, and those it built on (its lineage)
    _by_tag: dict[Tag, list[RidNote]] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return len(self._records)

    def lookup(self, rid: bytes) -> RidRecord | None:
        return self._records.get(rid)

    def lineage(self, tag: Tag) -> tuple[RidNote, ...]:
        """The notes that came with the version stored under ``tag`` (the
        write that made it first, if on record), newest first."""
        notes = self._by_tag.get(tag)
        if notes is None:
            return ()
        records = self._records
        # As they came, not as on record: a rid's record keeps its highest
        # tag, and a version may have been built on an earlier attempt.
        return tuple(note for note in notes if note.rid in records)

    def records(self) -> list[RidRecord]:
        return list(self._records.values())

    def add(
        self, records: Iterable[RidRecord], now: float, came_with: Iterable[Tag] | None = None
    ) -> list[bytes]:
        """Remember ``records``; return the rids that fell out (to delete
        from storage in the same commit). ``came_with``: for each record,
        the tag of the version it was stored with (default: its own)."""
        records = list(records)
        tags = [r.tag for r in records] if came_with is None else list(came_with)
        for record, with_tag in zip(records, tags, strict=True):
            # Re-adding a rid moves it to the end (it is fresh again). A rid
            # keeps the highest tag it was stored under: a write refused by
            # a majority retries under a higher tag, and the retry's record
            # is the one a later retry must finish.
            came = record.note
            held = self._records.pop(record.rid, None)
            if held is not None and held.tag > record.tag:
                record = attrs.evolve(held, at=record.at)
            self._records[record.rid] = record
            lineage = self._by_tag.setdefault(with_tag, [])
            if all(note.rid != record.rid for note in lineage):
                lineage.append(came)
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
        if dropped and len(self._by_tag) > 2 * len(self._records) + 64:
            # Lineages whose records all expired.
            records = self._records
            self._by_tag = {
                tag: kept
                for tag, notes in self._by_tag.items()
                if (kept := [n for n in notes if n.rid in records])
            }
        return dropped

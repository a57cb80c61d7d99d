"""The storage interface, and the in-memory engine.

A ``Store`` is a durable key-value engine for one node, written in two
steps so that a replica can go on working while the disk does:

- ``apply(batch)`` writes a ``Batch`` (the updates of one group commit)
  atomically: all of it or, raising ``StorageError``, none of it. It is
  quick (the page cache, not the disk) and not yet durable.
- ``sync()`` makes everything applied so far durable; it blocks on the disk
  (an fsync), and may run in another thread while later ``apply`` calls
  go on. It raises ``StorageError`` if the disk failed; what was applied
  since the previous sync is then of unknown fate.

Nothing is acknowledged to anyone before the ``sync`` that covers it has
returned (``quorum.replica``). Calls come from one writer at a time, except
that ``sync`` may overlap ``apply``. ``checkpoint`` is housekeeping that the
writer runs between applies, when ``checkpoint_due`` says so.

``MemoryStore`` keeps the same contract without a disk. An in-process test
cluster keeps a node's ``MemoryStore`` across a restart of that node (its
"disk" survives), and hands a new one to simulate a lost disk.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from register.model import Key, NodeId, RidRecord, Versioned


class StorageError(Exception):
    """A write or read of durable state failed; nothing was acknowledged."""


@attrs.frozen(kw_only=True)
class Meta:
    """What a node must remember about itself besides its registers.

    ``ready``: the node has caught up once and may answer quorum queries
    (false on a new or wiped data dir). ``counter_reserved``: every tag this
    node has issued or may issue before the next reservation has a counter
    at most this; a restarted node resumes above it, so it never reissues a
    tag (see ``quorum.replica``). ``promise_reserved``: every promise this
    node has made (a prepare of a cas or incr, ``quorum.protocol.acceptor``)
    has a ballot counter at most this; a restarted node, which has forgotten
    its promises, refuses every ballot and store up to it, so it never
    accepts what it promised to refuse.
    """

    node_id: NodeId
    ready: bool = False
    counter_reserved: int = 0
    promise_reserved: int = 0


@attrs.frozen(kw_only=True)
class Snapshot:
    """Everything a store holds, as loaded at start."""

    meta: Meta | None
    entries: list[tuple[Key, Versioned]]
    rids: list[RidRecord]


@attrs.frozen(kw_only=True)
class Batch:
    """One group commit: all of it becomes durable, or none of it."""

    entries: list[tuple[Key, Versioned]] = attrs.field(factory=list)
    rids: list[RidRecord] = attrs.field(factory=list)
    rids_dropped: list[bytes] = attrs.field(factory=list)
    meta: Meta | None = None

    def __bool__(self) -> bool:
        return bool(self.entries or self.rids or self.rids_dropped or self.meta)


class Store(Protocol):
    """A node's durable storage engine."""

    #: whether ``sync`` and ``checkpoint`` block on a disk (and so run in
    #: a worker thread)
    blocking: bool

    def load(self) -> Snapshot: ...

    def apply(self, batch: Batch) -> None: ...

    def sync(self) -> None: ...

    def checkpoint_due(self) -> bool:
        """Whether ``checkpoint`` should run before the next ``apply``."""

    def checkpoint(self) -> None: ...

    def close(self) -> None: ...


@attrs.define
class MemoryStore:
    """A ``Store`` in memory: durable only as long as the process lives.

    ``fail_writes`` is a fault switch for tests: while set, every ``apply``
    raises ``StorageError`` and changes nothing, as a full or failing disk
    would.
    """

    blocking: bool = attrs.field(default=False, init=False)
    fail_writes: bool = False
    _meta: Meta | None = None
    _entries: dict[Key, Versioned] = attrs.field(factory=dict)
    _rids: dict[bytes, RidRecord] = attrs.field(factory=dict)

    def load(self) -> Snapshot:
        return Snapshot(
            meta=self._meta,
            entries=list(self._entries.items()),
            rids=list(self._rids.values()),
        )

    def apply(self, batch: Batch) -> None:
        if self.fail_writes:
            raise StorageError("injected write failure")
        self._entries.update(batch.entries)
        for record in batch.rids:
            self._rids[record.rid] = record
        for rid in batch.rids_dropped:
            self._rids.pop(rid, None)
        if batch.meta is not None:
            self._meta = batch.meta

    def sync(self) -> None:
        pass  # applied is as durable as this engine gets

    def checkpoint_due(self) -> bool:
        return False

    def checkpoint(self) -> None:
        pass

    def close(self) -> None:
        pass

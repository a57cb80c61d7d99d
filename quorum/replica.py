"""A node's replica: its register state, durable storage and group commit.

The state is an immutable mapping (``register.state``) that only the commit
task replaces, in one assignment, after the batch that changed it is
durable. So whatever a query reads has been fsynced: a node never reports a
version it could lose in a crash, which the read fast path relies on.

Group commit: ``submit`` queues updates and returns at once; the commit task
takes everything queued, merges it into the state, writes the changes in one
``Store.write`` (in the loop or a worker thread, below), swaps the state in,
and only then calls every waiting ``done`` callback. Under load many
requests' updates share one fsync.

Where a commit runs: a disk engine's write blocks. It runs in the event
loop itself when the node is idle, the previous write took under
``INLINE_COMMIT_LIMIT`` and the batch is small (``INLINE_COMMIT_ROWS``,
``INLINE_COMMIT_BYTES``); in a worker thread otherwise. Handing a write to
a thread and its result back costs two wake-ups, 0.3-0.5 ms each way on the
development VM, more than a fast commit (~0.3 ms), and that is what a
lightly loaded node's writes wait for. But a write in the loop stalls every
client of the node: so a busy node (the loop not idle within ``IDLE_WAIT``)
keeps serving while the thread commits, and one slow write (a disk stall, a
checkpoint) sends the next ones to the thread until a write is fast again.
Before an in-loop commit the task lets every task woken with work run first
(``wait_to_coalesce``): the store messages the same operations queued for
the peers leave before this node's commit holds the loop, so the peers
commit while it does.

Tag uniqueness across restarts: the highest counter this node issued is
covered by ``Meta.counter_reserved``, persisted ahead of use in steps of
``RESERVE_STEP``; a restarted node resumes above the reservation, so it
never issues a tag twice even if its last writes reached no other node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import attrs
import trio

from net.stream import wait_to_coalesce
from register.model import Key, NodeId, RidRecord, Tag, Versioned, request_fingerprint
from register.rids import RidTable
from register.state import RegisterState, apply_updates, empty_state, highest_counter
from register.store import Batch, Meta, StorageError, Store

__all__ = ["Replica", "Update"]

log = logging.getLogger("qkv.replica")

RESERVE_STEP = 100_000
#: a commit runs in the event loop while the previous write took less (s)
INLINE_COMMIT_LIMIT = 0.002
#: ... and while the batch has at most this many rows and value bytes
INLINE_COMMIT_ROWS = 256
INLINE_COMMIT_BYTES = 64 * 1024
#: ... and while the loop goes idle within this (s) once the commit task is
#: woken; a busy node hands the commit to the thread instead
IDLE_WAIT = 0.0005
Done = Callable[[StorageError | None], None]


@attrs.frozen
class Update:
    key: Key
    version: Versioned
    rid: bytes | None = None


class Replica:
    def __init__(self, node_id: NodeId, store: Store, rids: RidTable | None = None) -> None:
        self.node_id = node_id
        self.store = store
        self.rids = rids if rids is not None else RidTable()
        snapshot = store.load()
        if snapshot.meta is not None and snapshot.meta.node_id != node_id:
            raise StorageError(f"the data belongs to node {snapshot.meta.node_id!r}, not {node_id!r}")
        self.meta = snapshot.meta or Meta(node_id=node_id)
        self.state: RegisterState = apply_updates(empty_state(), snapshot.entries)[0]
        self._pending_drops = self.rids.add(snapshot.rids, time.time())
        # Every tag issued from now on is above what was reserved before.
        #: the largest tag counter held (for ``qkv status``)
        self.max_counter = highest_counter(self.state)
        self._floor = max(self.meta.counter_reserved, self.max_counter)
        self._queue: list[tuple[Update, Done | None]] = []
        self._meta_waiters: list[Done] = []
        self._next_meta: Meta | None = None
        self._wakeup = trio.Event()
        self.commits = 0
        #: seconds the previous storage write took (0.0: none yet)
        self.last_write = 0.0
        self.inline_limit = INLINE_COMMIT_LIMIT
        self.idle_wait = IDLE_WAIT
        self.committed_updates = 0
        #: called after each durable commit with (seconds, updates) (metrics)
        self.on_commit: Callable[[float, int], None] | None = None

    # --- reads -------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.meta.ready

    @property
    def fresh(self) -> bool:
        """Never served and holds nothing: a brand-new node."""
        return not self.meta.ready and not self.state and not self.meta.counter_reserved

    def get(self, key: Key) -> Versioned | None:
        return self.state.get(key)

    def rid_seen(self, rid: bytes | None) -> tuple[Tag, bytes] | None:
        """What this node has on record for ``rid``: the tag its write was
        stored under and the write's fingerprint (``None``: unknown)."""
        if rid is None:
            return None
        record = self.rids.lookup(rid)
        return None if record is None else (record.tag, record.request)

    # --- writes ------------------------------------------------------------

    def submit(self, updates: Iterable[Update], done: Done | None) -> None:
        """Queue updates for the next group commit; ``done`` is called once
        all of them are durable (``None``) or failed (the error)."""
        items = list(updates)
        for i, update in enumerate(items):
            # One callback per submission: attach it to the last update.
            self._queue.append((update, done if i == len(items) - 1 else None))
        if not items and done is not None:
            done(None)
            return
        self._wakeup.set()

    async def persist(self, updates: Iterable[Update]) -> None:
        """Submit and wait until durable; raises ``StorageError``."""
        items = list(updates)
        await _until_done(lambda done: self.submit(items, done))

    async def set_meta(self, meta: Meta) -> None:
        """Make ``meta`` durable (in the next group commit)."""
        await _until_done(lambda done: self._enqueue_meta(meta, done))

    def _enqueue_meta(self, meta: Meta, done: Done) -> None:
        pending = self._next_meta
        if pending is not None and self._meta_waiters:
            # Both changes go into the same commit; neither may undo the
            # other (reservations only grow, ready is never unset).
            meta = attrs.evolve(
                meta,
                counter_reserved=max(meta.counter_reserved, pending.counter_reserved),
                ready=meta.ready or pending.ready,
            )
        self._next_meta = meta
        self._meta_waiters.append(done)
        self._wakeup.set()

    def issue_tag(self, seen: Tag, ready: Callable[[Tag | StorageError], None]) -> None:
        """Issue a new tag above ``seen`` and above every tag this node
        issued, and pass it to ``ready``: at once when the durable
        reservation covers it, else once a larger reservation is on disk."""
        tag = seen.successor(self._floor, self.node_id)
        self._floor = tag.counter
        if tag.counter <= self.meta.counter_reserved:
            ready(tag)
            return
        reservation = attrs.evolve(self.meta, counter_reserved=tag.counter + RESERVE_STEP)
        self._enqueue_meta(reservation, lambda error: ready(tag if error is None else error))

    def raise_floor(self, counter: int) -> None:
        self._floor = max(self._floor, counter)

    async def mark_ready(self) -> None:
        await self.set_meta(
            attrs.evolve(self.meta, ready=True, counter_reserved=max(self.meta.counter_reserved, self._floor))
        )

    # --- the commit task ---------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._queue and not self._meta_waiters:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            idle = False
            if self.store.blocking and self.last_write < self.inline_limit:
                # Maybe a commit in the loop: first let the tasks woken with
                # this work send it on (see the module docstring); the
                # checkpoint lets those woken in the same pass run too.
                idle = await wait_to_coalesce(self.idle_wait)
                await trio.lowlevel.checkpoint()
            await self._commit_once(idle)

    async def _commit_once(self, idle: bool) -> None:
        queue, self._queue = self._queue, []
        meta_waiters, self._meta_waiters = self._meta_waiters, []
        meta = self._next_meta if meta_waiters else None
        now = time.time()
        new_state, changed = apply_updates(self.state, ((u.key, u.version) for u, _ in queue))
        records = [
            RidRecord(
                rid=u.rid, request=request_fingerprint(u.key, u.version.value), tag=u.version.tag, at=now
            )
            for u, _ in queue
            if u.rid
        ]
        batch = Batch(entries=changed, rids=records, rids_dropped=self._pending_drops, meta=meta)
        error: StorageError | None = None
        began = time.perf_counter()
        if batch:
            try:
                if self._in_a_thread(batch, idle):
                    await trio.to_thread.run_sync(self._write, batch)
                else:
                    self._write(batch)
            except StorageError as exc:
                error = exc
                log.error(
                    "storage write failed, %d updates not acknowledged: %s",
                    len(queue),
                    exc,
                    extra={"event": "storage_error", "updates": len(queue), "error": str(exc)},
                )
        if error is None:
            self.state = new_state
            if changed:
                self.max_counter = max(self.max_counter, max(v.tag.counter for _, v in changed))
            if meta is not None:
                self.meta = meta
            self._pending_drops = self.rids.add(records, now)
            self.commits += 1
            self.committed_updates += len(queue)
            if batch and self.on_commit is not None:
                self.on_commit(time.perf_counter() - began, len(queue))
        for _, done in queue:
            if done is not None:
                done(error)
        for done in meta_waiters:
            done(error)

    def _in_a_thread(self, batch: Batch, idle: bool) -> bool:
        if not self.store.blocking:
            return False
        if not idle or self.last_write >= self.inline_limit:
            return True
        rows = len(batch.entries) + len(batch.rids) + len(batch.rids_dropped)
        if rows > INLINE_COMMIT_ROWS:
            return True
        size = sum(len(key) + len(version.value or b"") for key, version in batch.entries)
        return size > INLINE_COMMIT_BYTES

    def _write(self, batch: Batch) -> None:
        """The storage write, timed (in the loop or in a worker thread)."""
        began = time.perf_counter()
        try:
            self.store.write(batch)
        finally:
            self.last_write = time.perf_counter() - began


async def _until_done(enqueue: Callable[[Done], None]) -> None:
    """Enqueue work with a completion callback and wait for it; re-raise
    its ``StorageError``."""
    result: list[StorageError | None] = []
    finished = trio.Event()

    def done(error: StorageError | None) -> None:
        result.append(error)
        finished.set()

    enqueue(done)
    await finished.wait()
    if result[0] is not None:
        raise result[0]

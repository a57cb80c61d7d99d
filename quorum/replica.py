"""A node's replica: its register state, durable storage and group commit.

The state is an immutable mapping (``register.state``) that the replica
replaces, in one assignment, once the batch that changed it is durable. So
whatever a query reads has been fsynced: a node never reports a version it
could lose in a crash, which the read fast path relies on.

Group commit, pipelined: ``submit`` queues updates and returns at once. The
commit task takes everything queued, merges it into the newest state (the
*head*: durable state plus what is applied but not yet synced), and
``apply``s the batch to the store in the event loop (page cache, no fsync:
a fraction of a millisecond). A ``sync`` (the fsync) then runs in the
replica's disk thread, and when it returns, every batch applied before it
started is durable: the state swaps to the head of the last of them and
their ``done`` callbacks run. While one sync is on the disk, the next
batches are applied, and the next sync covers them all: the disk never
waits for the loop and the loop never waits for the disk.

Where a sync runs: handing it to the thread and getting the result back
costs two wake-ups, 0.3-0.5 ms each way on the development VM, more than a
fast fsync (~0.15 ms), and that is what a lightly loaded node's writes wait
for. So while the node is idle (the loop goes idle within ``IDLE_WAIT`` of
the commit task waking), nothing else is syncing, the previous sync took
under ``INLINE_SYNC_LIMIT`` and the batch is small, the sync runs in the
loop itself. Before it does, the task lets every task woken with the same
work run first (``wait_to_coalesce``): the store messages the operations
queued for the peers leave before this node's fsync holds the loop, so the
peers commit while it does. A batch too large to apply quickly
(``THREAD_APPLY_ROWS``, ``THREAD_APPLY_BYTES``) is applied in the thread as
well, so that it never stalls the node's other clients.

Tag uniqueness across restarts: the highest counter this node issued is
covered by ``Meta.counter_reserved``, persisted ahead of use in steps of
``RESERVE_STEP``; a restarted node resumes above the reservation, so it
never issues a tag twice even if its last writes reached no other node.

The acceptor (``quorum.protocol.acceptor``): every store is judged when it
is submitted, against the *tip* (the head plus what is queued, so that two
stores of one key in one batch are judged in order) and the key's promise.
A refusal is answered at once (refusing is always safe, durable or not);
what is stored or a duplicate is acknowledged once durable. Promises live
in memory; ``Meta.promise_reserved`` bounds them on disk, reserved ahead of
use in steps of ``RESERVE_STEP`` as tag counters are, and a restarted node
takes every register as promised up to the reservation. A prepare is
answered once the promise is covered by the reservation on disk and the
key has nothing waiting for a sync: it reports what the node durably holds,
which includes every store judged before the promise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

import attrs
import outcome
import trio

from net.stream import wait_to_coalesce
from quorum.disk_thread import DiskThread
from quorum.protocol.acceptor import Judged, Verdict, floor_after, prepare_verdict, store_verdict
from quorum.protocol.operation import Nack, QueryResult
from register.model import Key, NodeId, RidNote, RidRecord, Tag, Versioned
from register.rids import RidTable
from register.state import RegisterState, apply_updates, empty_state, highest_counter
from register.store import Batch, Meta, StorageError, Store

__all__ = ["Replica", "Update"]

log = logging.getLogger("qkv.replica")

RESERVE_STEP = 100_000
#: a sync may run in the event loop while the previous one took less (s)
INLINE_SYNC_LIMIT = 0.002
#: ... and while the loop goes idle within this (s) once the commit task is
#: woken; a busy node syncs in the thread instead
IDLE_WAIT = 0.0005
#: a batch with more rows or value bytes than this is applied in the disk
#: thread (and never synced in the loop)
THREAD_APPLY_ROWS = 256
THREAD_APPLY_BYTES = 64 * 1024
#: seconds the commit task waits at shutdown for a sync still on the disk
SHUTDOWN_SYNC_WAIT = 10.0
Done = Callable[[StorageError | None], None]
Reply = QueryResult | Nack | StorageError


@attrs.frozen
class Update:
    key: Key
    version: Versioned
    #: the rid notes that travel with the version (``RidNote``)
    notes: tuple[RidNote, ...] = ()


_ACCEPTED = Judged(Verdict.ACCEPT)
_ZERO = Tag.zero()


@attrs.define
class _Applied:
    """A batch applied to the store and waiting for the sync that makes it
    durable: what to swap in then, and whom to tell."""

    state: RegisterState
    meta: Meta | None
    records: list[RidRecord]
    #: for each record, the tag of the version it came with
    came_with: list[Tag]
    callbacks: list[Done]
    updates: int
    max_counter: int
    began: float


class Replica:
    def __init__(self, node_id: NodeId, store: Store, rids: RidTable | None = None) -> None:
        self.node_id = node_id
        self.store = store
        self.rids = rids if rids is not None else RidTable()
        snapshot = store.load()
        if snapshot.meta is not None and snapshot.meta.node_id != node_id:
            raise StorageError(f"the data belongs to node {snapshot.meta.node_id!r}, not {node_id!r}")
        #: durable: what the store holds once synced
        self.meta = snapshot.meta or Meta(node_id=node_id)
        self.state: RegisterState = apply_updates(empty_state(), snapshot.entries)[0]
        #: the newest state and meta: durable, or applied and being synced
        self._head = self.state
        self._head_meta = self.meta
        self._pending_drops = self.rids.add(snapshot.rids, time.time())
        #: the newest state including what is queued (stores are judged on it)
        self._tip = self.state
        #: promises made since the start (in memory; see the module docstring)
        self._promises: dict[Key, Tag] = {}
        #: the promise every register has after a restart
        self.promise_floor = floor_after(self.meta.promise_reserved)
        # Every tag issued from now on is above what was reserved before,
        # and above this node's own promise floor.
        #: the largest tag counter held (for ``qkv status``)
        self.max_counter = highest_counter(self.state)
        self._floor = max(self.meta.counter_reserved, self.max_counter, self.promise_floor.counter)
        self._queue: list[tuple[Update, Done | None]] = []
        self._meta_waiters: list[Done] = []
        self._wakeup = trio.Event()
        #: applied batches, oldest first, not yet covered by a finished sync
        self._unsynced: list[_Applied] = []
        self._syncing = False
        self._sync_over: trio.Event | None = None
        self._disk: DiskThread | None = None
        self.commits = 0
        #: seconds the previous sync took (0.0: none yet)
        self.last_sync = 0.0
        self.inline_limit = INLINE_SYNC_LIMIT
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

    def promise(self, key: Key) -> Tag:
        promise = self._promises.get(key, _ZERO)
        floor = self.promise_floor
        return floor if floor > promise else promise

    def known(self, key: Key) -> Tag:
        """The highest tag this node knows for ``key``: held, queued or
        promised (a new ballot or tag goes above it)."""
        held = self._tip.get(key)
        promise = self.promise(key)
        return held.tag if held is not None and held.tag > promise else promise

    def query(self, key: Key, rid: bytes | None) -> QueryResult:
        """This node's answer to a query (or, once durable, a prepare):
        its durable version, its record of ``rid``, its promise when above
        the held tag, and the rid notes that came with the version."""
        version = self.state.get(key)
        promise: Tag | None = self.promise(key)
        rids = self.rids
        if version is None:
            origin: tuple[RidNote, ...] = ()
            if promise == _ZERO:
                promise = None
        else:
            origin = rids.lineage(version.tag)
            if promise is not None and promise <= version.tag:
                promise = None
        if rid is None:
            return QueryResult(version, None, promise, origin)
        seen = rids.lookup(rid)
        return QueryResult(version, None if seen is None else seen.note, promise, origin)

    # --- writes ------------------------------------------------------------

    def submit(self, updates: Iterable[Update], done: Done | None) -> None:
        """Merge updates in the next group commit, with no acceptor rule (a
        recovering node taking in a peer's state); ``done`` is called once
        all of them are durable (``None``) or failed (the error)."""
        self._queue_all(list(updates), done, merge_tip=True)

    def offer(self, updates: Sequence[Update], done: Done | None) -> list[Judged]:
        """Judge each update by the acceptor rule (``store_verdict``) and
        queue those stored or duplicated for the next group commit; ``done``
        is called once these are durable (``None``) or failed (the error),
        and not at all when every update was refused. Returns one verdict
        per update."""
        judged: list[Judged] = []
        queued: list[Update] = []
        tip = self._tip
        promises = self._promises
        floor = self.promise_floor
        rids = self.rids
        for update in updates:
            key, version = update.key, update.version
            held = tip.get(key)
            promise = promises.get(key, _ZERO)
            if floor > promise:
                promise = floor
            if (held is None or version.tag > held.tag) and version.tag >= promise:
                verdict = _ACCEPTED  # the common case, without a call
            else:
                stored_for_rid = None
                for note in update.notes:
                    if note.tag == version.tag:
                        record = rids.lookup(note.rid)
                        stored_for_rid = None if record is None else record.tag
                verdict = store_verdict(held, promise, version.tag, stored_for_rid)
            judged.append(verdict)
            if verdict.verdict is Verdict.REFUSE:
                continue
            if verdict.verdict is Verdict.ACCEPT:
                tip = tip.set(key, version)
                if key in promises and version.tag >= promises[key]:
                    del promises[key]  # the held tag now refuses as much
            queued.append(update)
        self._tip = tip
        if queued:
            self._queue_all(queued, done, merge_tip=False)
        return judged

    def _queue_all(self, items: list[Update], done: Done | None, *, merge_tip: bool) -> None:
        """Queue ``items``; ``merge_tip``: they are not in the tip yet."""
        for i, update in enumerate(items):
            # One callback per submission: attach it to the last update.
            self._queue.append((update, done if i == len(items) - 1 else None))
        if not items:
            if done is not None:
                done(None)
            return
        if merge_tip:
            self._tip = apply_updates(self._tip, ((u.key, u.version) for u in items))[0]
        self._wakeup.set()

    def prepare(self, key: Key, ballot: Tag, rid: bytes | None, reply: Callable[[Reply], None]) -> None:
        """Promise ``ballot`` for ``key`` unless the acceptor rule refuses
        (``prepare_verdict``); ``reply`` gets the node's ``QueryResult``
        once the promise and the key's state are durable, a ``Nack`` at
        once, or the ``StorageError`` that kept it from disk."""
        held = self._tip.get(key)
        judged = prepare_verdict(held, self.promise(key), ballot)
        if judged.verdict is Verdict.REFUSE:
            assert judged.above is not None
            reply(Nack(judged.above))
            return
        self._promises[key] = ballot

        def answer(error: StorageError | None = None) -> None:
            reply(self.query(key, rid) if error is None else error)

        reserved = max(self.meta.promise_reserved, self._head_meta.promise_reserved)
        if ballot.counter > self.meta.promise_reserved:
            reservation = attrs.evolve(
                self._head_meta, promise_reserved=max(reserved, ballot.counter + RESERVE_STEP)
            )
            self._enqueue_meta(reservation, answer)
        elif held is not self.state.get(key):
            # The key has a store waiting for its sync: answer once it is
            # durable, so that the promise reports it.
            self._enqueue_meta(self._head_meta, answer)
        else:
            answer()

    async def persist(self, updates: Iterable[Update]) -> None:
        """Submit and wait until durable; raises ``StorageError``."""
        items = list(updates)
        await _until_done(lambda done: self.submit(items, done))

    async def set_meta(self, meta: Meta) -> None:
        """Make ``meta`` durable (in the next group commit)."""
        await _until_done(lambda done: self._enqueue_meta(meta, done))

    def _enqueue_meta(self, meta: Meta, done: Done) -> None:
        # Meta only moves forward (reservations grow, ready is never unset):
        # merged with the newest one, applied or queued, a change can never
        # undo another that is not durable yet.
        head = self._head_meta
        self._head_meta = attrs.evolve(
            meta,
            counter_reserved=max(meta.counter_reserved, head.counter_reserved),
            promise_reserved=max(meta.promise_reserved, head.promise_reserved),
            ready=meta.ready or head.ready,
        )
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

    def raise_promise_floor(self, counter: int) -> None:
        """Take every register as promised up to ``counter`` (a node whose
        data dir was lost has forgotten its promises too); made durable by
        ``mark_ready``."""
        self.promise_floor = max(self.promise_floor, floor_after(counter))
        self._floor = max(self._floor, self.promise_floor.counter)

    async def mark_ready(self) -> None:
        await self.set_meta(
            attrs.evolve(
                self.meta,
                ready=True,
                counter_reserved=max(self.meta.counter_reserved, self._floor),
                promise_reserved=max(self.meta.promise_reserved, self.promise_floor.counter - 1),
            )
        )

    # --- the commit task ---------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.store.blocking:
            self._disk = DiskThread(f"qkv-disk-{self.node_id}")
            self._disk.start()
        task_status.started()
        try:
            while True:
                if not self._queue and not self._meta_waiters:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                idle = False
                if self._disk is not None and not self._syncing and self.last_sync < self.inline_limit:
                    # Maybe a sync in the loop: first let the tasks woken
                    # with this work send it on (see the module docstring).
                    idle = await wait_to_coalesce(self.idle_wait)
                # Let the tasks woken in the same pass run (and queue more).
                await trio.lowlevel.checkpoint()
                if self._disk is not None and self.store.checkpoint_due():
                    await self._checkpoint(self._disk)
                await self._apply_queued(idle)
        finally:
            with trio.CancelScope(shield=True):
                await self._stop_disk()

    async def _checkpoint(self, disk: DiskThread) -> None:
        """Between two applies (the store's writer waits for it)."""
        try:
            await disk.run(self.store.checkpoint)
        except StorageError as exc:
            log.error(
                "storage checkpoint failed, the log keeps growing: %s",
                exc,
                extra={"event": "storage_error", "error": str(exc)},
            )

    async def _stop_disk(self) -> None:
        disk, self._disk = self._disk, None
        if disk is None:
            return
        if self._syncing:
            self._sync_over = over = trio.Event()
            with trio.move_on_after(SHUTDOWN_SYNC_WAIT):
                await over.wait()
        disk.stop()

    async def _apply_queued(self, idle: bool) -> None:
        queue, self._queue = self._queue, []
        meta_waiters, self._meta_waiters = self._meta_waiters, []
        meta = self._head_meta if meta_waiters else None
        now = time.time()
        # The tip is the head with everything queued merged in already
        # (``offer`` and ``submit`` keep it so): it is the new head, and the
        # rows to write are the queued versions it holds (a duplicate, or a
        # version overtaken in the same batch, is not one of them).
        new_state = self._tip
        latest = {u.key: u.version for u, _ in queue if new_state.get(u.key) is u.version}
        changed = list(latest.items())
        records = [RidRecord.of(n, now) for u, _ in queue for n in u.notes]
        came_with = [u.version.tag for u, _ in queue for _ in u.notes]
        callbacks = [done for _, done in queue if done is not None]
        callbacks += meta_waiters
        drops, self._pending_drops = self._pending_drops, []
        batch = Batch(entries=changed, rids=records, rids_dropped=drops, meta=meta)
        began = time.perf_counter()
        large = _large(batch)
        if batch:
            try:
                if large and self._disk is not None:
                    await self._disk.run(lambda: self.store.apply(batch))
                else:
                    self.store.apply(batch)
            except StorageError as exc:
                log.error(
                    "storage write failed, %d updates not acknowledged: %s",
                    len(queue),
                    exc,
                    extra={"event": "storage_error", "updates": len(queue), "error": str(exc)},
                )
                self._pending_drops = drops + self._pending_drops  # for the next batch
                _run_all(callbacks, exc)
                return
        elif not self._unsynced:
            # Nothing changed and everything is already durable.
            _run_all(callbacks, None)
            return
        self._head = new_state
        top = max((v.tag.counter for _, v in changed), default=0)
        self._unsynced.append(
            _Applied(new_state, meta, records, came_with, callbacks, len(queue), top, began)
        )
        self._start_sync(in_loop=idle and not large)

    def _start_sync(self, *, in_loop: bool = False) -> None:
        """Sync what is applied, unless a sync is on the disk already (its
        end starts the next one)."""
        if self._syncing or not self._unsynced:
            return
        covered = len(self._unsynced)
        disk = self._disk
        if disk is None or in_loop:
            try:
                self._sync()
            except StorageError as exc:
                self._synced(covered, outcome.Error(exc))
            else:
                self._synced(covered, outcome.Value(None))
            return
        self._syncing = True
        disk.submit(self._sync, lambda result: self._synced(covered, result))

    def _sync(self) -> None:
        """The store's sync, timed (in the loop or in the disk thread)."""
        began = time.perf_counter()
        try:
            self.store.sync()
        finally:
            self.last_sync = time.perf_counter() - began

    def _synced(self, covered: int, result: outcome.Outcome[None]) -> None:
        """The sync that started with ``covered`` batches applied is over."""
        self._syncing = False
        done, self._unsynced = self._unsynced[:covered], self._unsynced[covered:]
        error: StorageError | None = None
        if isinstance(result, outcome.Error):
            exc = result.error
            error = exc if isinstance(exc, StorageError) else StorageError(f"sync failed: {exc!r}")
            log.error(
                "storage sync failed, %d updates not acknowledged: %s",
                sum(a.updates for a in done),
                error,
                extra={"event": "storage_error", "error": str(error)},
            )
            # What those batches applied is of unknown fate: merge what
            # comes next against what is known durable, so that an update
            # they held is written (and refused by the store) again rather
            # than acknowledged as already there.
            self._head, self._head_meta = self.state, self.meta
            self._tip = apply_updates(self.state, ((u.key, u.version) for u, _ in self._queue))[0]
        else:
            now = time.perf_counter()
            self.state = done[-1].state
            for applied in done:
                if applied.meta is not None:
                    self.meta = applied.meta
                self._pending_drops += self.rids.add(applied.records, time.time(), applied.came_with)
                self.max_counter = max(self.max_counter, applied.max_counter)
                self.commits += 1
                self.committed_updates += applied.updates
                if self.on_commit is not None:
                    self.on_commit(now - applied.began, applied.updates)
        for applied in done:
            _run_all(applied.callbacks, error)
        if self._sync_over is not None and not self._unsynced:
            self._sync_over.set()
        self._start_sync()


def _run_all(callbacks: list[Done], error: StorageError | None) -> None:
    """Tell every waiter; one that fails (a bug) must not keep the others
    from their answers, nor take the disk thread's delivery down."""
    for callback in callbacks:
        try:
            callback(error)
        except Exception:
            log.exception("a commit callback failed", extra={"event": "internal_error"})


def _large(batch: Batch) -> bool:
    """Too large to apply in the loop without holding up its other work."""
    if len(batch.entries) + len(batch.rids) + len(batch.rids_dropped) > THREAD_APPLY_ROWS:
        return True
    return sum(len(key) + len(version.value or b"") for key, version in batch.entries) > THREAD_APPLY_BYTES


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

"""A replica's pipelined group commit (quorum.replica): nothing is visible
or acknowledged before the sync that covers it, later batches are applied
while a sync is on the disk, and where applies and syncs run (the event
loop while the node is idle and the disk fast, the disk thread otherwise)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator

import pytest
import trio

from net.stream import wait_to_coalesce
from quorum.replica import THREAD_APPLY_BYTES, THREAD_APPLY_ROWS, Replica, Update
from register.model import Key, NodeId, RidNote, Tag, Versioned
from register.rids import RidTable
from register.store import Batch, MemoryStore, Meta, Snapshot, StorageError

NODE = NodeId("n1")


class DiskLikeStore:
    """A blocking store that records the thread of each call, and whose
    syncs can be made slow, held back or failed (as a disk would)."""

    blocking = True

    def __init__(self) -> None:
        self.inner = MemoryStore()
        #: what has been synced (the "disk"): batches applied before a sync
        self.durable = MemoryStore()
        self._applied: list[Batch] = []
        self.delay = 0.0
        self.gate: threading.Event | None = None
        self.fail_sync = False
        self.calls: list[tuple[str, bool]] = []  # (apply|sync, in the main thread)
        self.on_call: list[str] | None = None

    def _record(self, what: str) -> None:
        self.calls.append((what, threading.get_ident() == threading.main_thread().ident))
        if self.on_call is not None:
            self.on_call.append(what)

    def load(self) -> Snapshot:
        return self.inner.load()

    def apply(self, batch: Batch) -> None:
        self._record("apply")
        self.inner.apply(batch)
        self._applied.append(batch)

    def sync(self) -> None:
        self._record("sync")
        covered, self._applied = self._applied, []
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        if self.fail_sync:
            raise StorageError("injected sync failure")
        for batch in covered:
            self.durable.apply(batch)

    def checkpoint_due(self) -> bool:
        return False

    def checkpoint(self) -> None:
        pass

    def close(self) -> None:
        pass

    def in_loop(self, what: str, n: int = 0) -> bool:
        """Whether the ``n``-th call of kind ``what`` ran in the event loop."""
        return [main for kind, main in self.calls if kind == what][n]


def update(counter: int, value: bytes = b"v", key: bytes = b"k") -> Update:
    return Update(Key(key), Versioned(Tag(counter, NODE), value))


@pytest.fixture
async def store() -> DiskLikeStore:
    return DiskLikeStore()


@pytest.fixture
async def replica(store: DiskLikeStore, nursery: trio.Nursery) -> AsyncIterator[Replica]:
    replica = Replica(NODE, store)
    # Generous bounds, so that a busy test machine descheduling the process
    # mid-commit cannot change where a sync runs.
    replica.inline_limit = 0.2
    replica.idle_wait = 0.2
    await nursery.start(replica.run)
    yield replica


async def test_fast_small_commits_on_an_idle_node_run_in_the_event_loop(
    store: DiskLikeStore, replica: Replica
) -> None:
    for counter in range(1, 4):
        await replica.persist([update(counter)])
    assert [main for _, main in store.calls] == [True] * 6
    assert replica.get(Key(b"k")) == update(3).version


async def test_a_slow_sync_sends_syncs_to_the_thread_until_one_is_fast(
    store: DiskLikeStore, replica: Replica
) -> None:
    store.delay = 0.25  # over the limit
    await replica.persist([update(1)])  # nothing measured yet: in the loop
    await replica.persist([update(2)])  # after a slow sync: in the thread
    assert [store.in_loop("sync", 0), store.in_loop("sync", 1)] == [True, False]
    store.delay = 0.0
    await replica.persist([update(3)])  # the previous sync was slow
    assert not store.in_loop("sync", 2)
    await replica.persist([update(4)])  # fast again: back in the loop
    assert store.in_loop("sync", 3)
    assert all(store.in_loop("apply", i) for i in range(4))  # small batches: always the loop
    assert replica.get(Key(b"k")) == update(4).version


@pytest.mark.parametrize(
    "updates",
    [
        [update(1, key=b"k%d" % i) for i in range(THREAD_APPLY_ROWS + 1)],
        [update(1, value=bytes(THREAD_APPLY_BYTES))],
    ],
    ids=["many rows", "large value"],
)
async def test_large_batches_are_applied_and_synced_in_the_thread(
    store: DiskLikeStore, replica: Replica, updates: list[Update]
) -> None:
    await replica.persist(updates)
    assert not store.in_loop("apply") and not store.in_loop("sync")


async def test_messages_woken_with_the_work_leave_before_an_in_loop_sync(
    store: DiskLikeStore, replica: Replica, nursery: trio.Nursery
) -> None:
    """As a coordinator does: queue the store for the peers (waking their
    writers, which wait for the loop to idle) and submit it here, in one
    step. The writers must send before this node's fsync holds the loop,
    or the peers would only start committing after it."""
    order: list[str] = []
    store.on_call = order
    queued = trio.Event()

    async def writer() -> None:
        await queued.wait()
        await wait_to_coalesce()
        order.append("sent")

    nursery.start_soon(writer)
    await trio.testing.wait_all_tasks_blocked()
    committed = trio.Event()
    queued.set()
    replica.submit([update(1)], lambda error: committed.set())
    await committed.wait()
    assert order == ["sent", "apply", "sync"]
    assert store.in_loop("sync")


async def test_a_busy_node_syncs_in_the_thread(
    store: DiskLikeStore, replica: Replica, nursery: trio.Nursery
) -> None:
    """While other tasks keep the loop busy, an fsync in the loop would hold
    them all up: it goes to the thread even though the disk is fast."""
    committed = trio.Event()

    async def busy() -> None:
        while not committed.is_set():  # runnable at every pass: never idle
            await trio.lowlevel.checkpoint()

    nursery.start_soon(busy)
    await replica.persist([update(1)])
    committed.set()
    assert not store.in_loop("sync")
    await trio.testing.wait_all_tasks_blocked()
    await replica.persist([update(2)])  # idle again: in the loop
    assert store.in_loop("sync", 1)


async def test_nothing_is_visible_or_acknowledged_before_its_sync(
    store: DiskLikeStore, replica: Replica
) -> None:
    await replica.persist([update(1)])
    replica.inline_limit = 0.0  # every sync in the thread, where it can be held
    store.gate = threading.Event()
    acked: list[StorageError | None] = []
    replica.submit([update(2)], acked.append)
    with trio.fail_after(5):
        while ("sync", False) not in store.calls:
            await trio.sleep(0.005)
    # the sync is on the disk ...
    await trio.sleep(0.05)
    assert acked == []  # ... so no acknowledgement yet,
    assert replica.get(Key(b"k")) == update(1).version  # and queries see the durable version
    store.gate.set()
    with trio.fail_after(5):
        while not acked:
            await trio.sleep(0.005)
    assert acked == [None]
    assert replica.get(Key(b"k")) == update(2).version
    assert store.durable.load().entries == [(Key(b"k"), update(2).version)]


async def test_batches_applied_during_a_sync_wait_for_the_next_one(
    store: DiskLikeStore, replica: Replica
) -> None:
    replica.inline_limit = 0.0
    store.gate = threading.Event()
    first: list[StorageError | None] = []
    later: list[StorageError | None] = []
    replica.submit([update(1, key=b"a")], first.append)
    with trio.fail_after(5):
        while ("sync", False) not in store.calls:
            await trio.sleep(0.005)
    # The disk is busy with the first sync: these are applied meanwhile ...
    replica.submit([update(2, key=b"b")], later.append)
    await trio.sleep(0.02)
    replica.submit([update(3, key=b"c")], later.append)
    with trio.fail_after(5):
        while [kind for kind, _ in store.calls].count("apply") < 3:
            await trio.sleep(0.005)
    assert [kind for kind, _ in store.calls].count("sync") == 1
    assert first == [] and later == []
    store.gate.set()  # ... and one more sync covers both of them
    with trio.fail_after(5):
        while len(later) < 2:
            await trio.sleep(0.005)
    assert first == [None] and later == [None, None]
    assert [kind for kind, _ in store.calls] == ["apply", "sync", "apply", "apply", "sync"]
    assert {k for k, _ in store.durable.load().entries} == {b"a", b"b", b"c"}
    assert replica.get(Key(b"c")) == update(3, key=b"c").version


async def test_a_failed_sync_fails_what_it_covered_and_keeps_the_durable_state(
    store: DiskLikeStore, replica: Replica
) -> None:
    await replica.persist([update(1)])
    store.fail_sync = True
    with pytest.raises(StorageError, match="injected sync failure"):
        await replica.persist([update(2)])
    assert replica.get(Key(b"k")) == update(1).version
    assert replica.commits == 1
    # The same update again (a retry, a read's write-back): what the failed
    # sync covered is not durable, so it is written and synced again, never
    # acknowledged as already held.
    with pytest.raises(StorageError, match="injected sync failure"):
        await replica.persist([update(2)])
    store.fail_sync = False
    await replica.persist([update(2)])
    assert replica.get(Key(b"k")) == update(2).version
    assert store.durable.load().entries == [(Key(b"k"), update(2).version)]


async def test_rids_that_fall_out_of_the_table_are_dropped_from_storage(nursery: trio.Nursery) -> None:
    store = DiskLikeStore()
    replica = Replica(NODE, store, RidTable(max_count=2))
    await nursery.start(replica.run)
    for i in range(6):
        tag = Tag(i + 1, NODE)
        note = RidNote(rid=b"rid-%05d" % i, request=b"r" * 16, tag=tag)
        await replica.persist([Update(Key(b"k%d" % i), Versioned(tag, b"v"), (note,))])
    await replica.persist([update(99)])  # carries the last drops
    kept = {r.rid for r in replica.rids.records()}
    assert kept == {b"rid-00004", b"rid-00005"}
    assert {r.rid for r in store.durable.load().rids} == kept


async def test_stopping_waits_for_the_sync_on_the_disk(store: DiskLikeStore) -> None:
    """A node stopping with a sync in flight lets it finish (and answers
    its waiters) before the store may be closed."""
    replica = Replica(NODE, store)
    replica.inline_limit = 0.0
    store.gate = threading.Event()
    acked: list[StorageError | None] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.run)
        replica.submit([update(1)], acked.append)
        with trio.fail_after(5):
            while ("sync", False) not in store.calls:
                await trio.sleep(0.005)
        threading.Timer(0.1, store.gate.set).start()
        nursery.cancel_scope.cancel()
    assert acked == [None]
    assert store.durable.load().entries == [(Key(b"k"), update(1).version)]


async def test_a_reservation_does_not_undo_a_meta_change_still_on_its_way(
    store: DiskLikeStore, replica: Replica
) -> None:
    """``ready`` applied but not yet synced, then a tag reservation (which
    starts from the durable meta): the reservation keeps ``ready``."""
    replica.inline_limit = 0.0
    store.gate = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(replica.mark_ready)
        with trio.fail_after(5):
            while ("sync", False) not in store.calls:
                await trio.sleep(0.005)
        tags: list[Tag | StorageError] = []
        replica.issue_tag(Tag.zero(), tags.append)
        await trio.sleep(0.02)
        store.gate.set()
    with trio.fail_after(5):
        while not tags:
            await trio.sleep(0.005)
    assert tags == [Tag(1, NODE)]
    meta = store.durable.load().meta
    assert meta is not None and meta.ready and meta.counter_reserved > 1
    assert replica.meta == meta


async def test_memory_store_commits_at_once() -> None:
    replica = Replica(NODE, MemoryStore())
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.run)
        await replica.persist([update(1)])
        await replica.set_meta(Meta(node_id=NODE, ready=True))
        nursery.cancel_scope.cancel()
    assert replica.get(Key(b"k")) == update(1).version and replica.ready

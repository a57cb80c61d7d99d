"""Where a replica's group commit runs: in the event loop while the disk is
fast and the batch small, in a worker thread otherwise (quorum.replica)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator

import pytest
import trio

from net.stream import wait_to_coalesce
from quorum.replica import INLINE_COMMIT_BYTES, INLINE_COMMIT_ROWS, Replica, Update
from register.model import Key, NodeId, Tag, Versioned
from register.store import Batch, MemoryStore, Snapshot

NODE = NodeId("n1")


class DiskLikeStore:
    """A blocking store that records the thread of each write and can be
    made slow (as a disk stall would)."""

    blocking = True

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.delay = 0.0
        self.threads: list[int] = []
        self.on_write: list[str] | None = None

    def load(self) -> Snapshot:
        return self.inner.load()

    def write(self, batch: Batch) -> None:
        self.threads.append(threading.get_ident())
        if self.on_write is not None:
            self.on_write.append("write")
        time.sleep(self.delay)
        self.inner.write(batch)

    def in_loop(self, write: int) -> bool:
        return self.threads[write] == threading.main_thread().ident


def update(counter: int, value: bytes = b"v", key: bytes = b"k") -> Update:
    return Update(Key(key), Versioned(Tag(counter, NODE), value))


@pytest.fixture
async def store() -> DiskLikeStore:
    return DiskLikeStore()


@pytest.fixture
async def replica(store: DiskLikeStore, nursery: trio.Nursery) -> AsyncIterator[Replica]:
    replica = Replica(NODE, store)
    # Generous bounds, so that a busy test machine descheduling the process
    # mid-commit cannot change where a commit runs.
    replica.inline_limit = 0.2
    replica.idle_wait = 0.2
    await nursery.start(replica.run)
    yield replica


async def test_fast_small_commits_run_in_the_event_loop(store: DiskLikeStore, replica: Replica) -> None:
    for counter in range(1, 4):
        await replica.persist([update(counter)])
    assert [store.in_loop(i) for i in range(3)] == [True, True, True]
    assert replica.get(Key(b"k")) == update(3).version


async def test_a_slow_write_sends_commits_to_a_thread_until_one_is_fast(
    store: DiskLikeStore, replica: Replica
) -> None:
    store.delay = 0.25  # over the limit
    await replica.persist([update(1)])  # nothing measured yet: in the loop
    await replica.persist([update(2)])  # after a slow write: in a thread
    assert [store.in_loop(0), store.in_loop(1)] == [True, False]
    store.delay = 0.0
    await replica.persist([update(3)])  # the previous write was slow
    assert not store.in_loop(2)
    await replica.persist([update(4)])  # fast again: back in the loop
    assert store.in_loop(3)
    assert replica.get(Key(b"k")) == update(4).version


@pytest.mark.parametrize(
    "updates",
    [
        [update(1, key=b"k%d" % i) for i in range(INLINE_COMMIT_ROWS + 1)],
        [update(1, value=bytes(INLINE_COMMIT_BYTES))],
    ],
    ids=["many rows", "large value"],
)
async def test_large_batches_commit_in_a_thread(
    store: DiskLikeStore, replica: Replica, updates: list[Update]
) -> None:
    await replica.persist(updates)
    assert store.threads and not store.in_loop(0)


async def test_messages_woken_with_the_work_leave_before_an_in_loop_commit(
    store: DiskLikeStore, replica: Replica, nursery: trio.Nursery
) -> None:
    """As a coordinator does: queue the store for the peers (waking their
    writers, which wait for the loop to idle) and submit it here, in one
    step. The writers must send before this node's commit holds the loop,
    or the peers would only start committing after it."""
    order: list[str] = []
    store.on_write = order
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
    assert order == ["sent", "write"]
    assert store.in_loop(0)


async def test_a_busy_node_commits_in_a_thread(
    store: DiskLikeStore, replica: Replica, nursery: trio.Nursery
) -> None:
    """While other tasks keep the loop busy, a commit in the loop would hold
    them all up: it goes to the thread even though writes are fast."""
    committed = trio.Event()

    async def busy() -> None:
        while not committed.is_set():  # runnable at every pass: never idle
            await trio.lowlevel.checkpoint()

    nursery.start_soon(busy)
    await replica.persist([update(1)])
    committed.set()
    assert not store.in_loop(0)
    await trio.testing.wait_all_tasks_blocked()
    await replica.persist([update(2)])  # idle again: in the loop
    assert store.in_loop(1)

"""A 3-node cluster in this process, over real loopback sockets."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
import trio

from net.errors import Unavailable
from quorum.cluster import LocalCluster, open_cluster
from register.model import Key, Versioned


async def wait_serving(cluster: LocalCluster, i: int) -> None:
    with trio.fail_after(10):
        while cluster.node(i).state != "serving":
            await trio.sleep(0.01)


@pytest.fixture
async def cluster() -> AsyncIterator[LocalCluster]:
    async with open_cluster(3, request_timeout=1.0) as c:
        for i in range(c.size):
            await wait_serving(c, i)
        yield c


async def test_set_through_any_node_reads_through_every_other(cluster: LocalCluster) -> None:
    for writer in range(3):
        async with cluster.client([writer]) as client:
            tag = await client.set(b"key", f"from {writer}".encode())
        for reader in range(3):
            async with cluster.client([reader]) as client:
                result = await client.get(b"key")
            assert result.found
            assert result.value == f"from {writer}".encode()
            assert result.tag == tag


async def test_delete_reads_as_not_found_with_its_tag(cluster: LocalCluster) -> None:
    async with cluster.client([0]) as a, cluster.client([2]) as c:
        await a.set(b"doomed", b"v")
        tag = await c.delete(b"doomed")
        result = await a.get(b"doomed")
        assert (result.found, result.value, result.tag) == (False, None, tag)
        never = await c.get(b"never written")
        assert (never.found, never.value, never.tag) == (False, None, None)


async def test_empty_and_binary_values_round_trip(cluster: LocalCluster) -> None:
    async with cluster.client() as client:
        await client.set(b"\x00\xff", b"")
        assert (await client.get(b"\x00\xff")).value == b""
        blob = bytes(range(256)) * 4096  # 1 MiB, the default max_value
        await client.set(b"big", blob)
        assert (await client.get(b"big")).value == blob


async def test_fifty_concurrent_clients_see_only_written_values_and_their_own_writes(
    cluster: LocalCluster,
) -> None:
    shared = [Key(f"shared{i}".encode()) for i in range(5)]
    written: dict[bytes, set[bytes | None]] = {k: {None} for k in shared}
    rounds = 8

    async def client_task(c: int) -> None:
        rng = random.Random(c)
        own = f"own{c}".encode()
        async with cluster.client([c % 3, (c + 1) % 3]) as client:
            for r in range(rounds):
                key = rng.choice(shared)
                value = f"{c}:{r}".encode()
                written[key].add(value)
                await client.set(key, value)
                seen = await client.get(rng.choice(shared))
                assert seen.value in written[key] or any(seen.value in w for w in written.values())
                await client.set(own, value)
                mine = await client.get(own)
                assert mine.value == value, f"client {c} lost its own write"

    async with trio.open_nursery() as nursery:
        for c in range(50):
            nursery.start_soon(client_task, c)
    async with cluster.client() as client:
        for key in shared:
            final = await client.get(key)
            assert final.value in written[key]


async def test_one_node_stopped_everything_still_works(cluster: LocalCluster) -> None:
    await cluster.stop(1)
    async with cluster.client([0]) as a, cluster.client([2]) as c:
        await a.set(b"k", b"v1")
        assert (await c.get(b"k")).value == b"v1"
        await c.delete(b"k")
        assert not (await a.get(b"k")).found


async def test_two_nodes_stopped_answers_unavailable_within_the_deadline(cluster: LocalCluster) -> None:
    await cluster.stop(1)
    await cluster.stop(2)
    async with cluster.client([0], timeout=10) as client:
        for op in (client.get(b"k"), client.set(b"k", b"v"), client.delete(b"k")):
            with trio.fail_after(5), pytest.raises(Unavailable):
                await op


async def test_unavailable_within_the_deadline_when_peers_hang() -> None:
    """Peers that accept connections but never answer (paused) must not
    hold a request past its deadline."""
    async with open_cluster(3, request_timeout=0.5) as cluster:
        for i in range(3):
            await wait_serving(cluster, i)
        for i in (1, 2):
            cluster.node(i).switches.drop_stores = True
        async with cluster.client([0], timeout=10) as client:
            with trio.fail_after(5), pytest.raises(Unavailable, match=r"no majority answered within 0\.5 s"):
                await client.set(b"k", b"v")


async def test_restarted_node_serves_the_newest_values(cluster: LocalCluster) -> None:
    async with cluster.client([1]) as client:
        await client.set(b"k", b"old")
        await cluster.stop(0)
        await client.set(b"k", b"new")
        await client.set(b"other", b"x")
    await cluster.start(0)
    await wait_serving(cluster, 0)
    async with cluster.client([0]) as client:
        assert (await client.get(b"k")).value == b"new"
        assert (await client.get(b"other")).value == b"x"


async def test_read_writes_back_a_tag_held_by_less_than_a_majority(cluster: LocalCluster) -> None:
    # n3 holds back its updates: the write lands on n1 and n2 only.
    cluster.node(2).switches.drop_stores = True
    async with cluster.client([0]) as client:
        tag = await client.set(b"k", b"v")
    assert cluster.node(2).replica.get(Key(b"k")) is None
    # With n2 gone, n1 is the only node holding the newest tag.
    await cluster.stop(1)
    cluster.node(2).switches.drop_stores = False
    n3 = cluster.node(2)
    async with cluster.client([2]) as client:
        result = await client.get(b"k")
    assert result.value == b"v"
    assert n3.coordinator.write_backs == 1
    # The read stored it on a majority ({n1, n3}) before answering.
    assert n3.replica.get(Key(b"k")) == Versioned(tag, b"v")


async def test_retried_set_with_the_same_rid_returns_the_original_tag(cluster: LocalCluster) -> None:
    rid = b"request-0000001"
    async with cluster.client([0]) as first, cluster.client([2]) as retry:
        tag = await first.set(b"k", b"v", rid=rid)
        # The answer was "lost": the client retries on another node.
        again = await retry.set(b"k", b"v", rid=rid)
        assert again == tag
        for i in range(3):
            assert cluster.node(i).replica.get(Key(b"k")) in (Versioned(tag, b"v"), None)
        assert (await first.get(b"k")).tag == tag
        # A different request id is a new write.
        assert await retry.set(b"k", b"v", rid=b"request-0000002") > tag


async def test_retried_delete_with_the_same_rid_returns_the_original_tag(cluster: LocalCluster) -> None:
    async with cluster.client() as client:
        await client.set(b"k", b"v")
        tag = await client.delete(b"k", rid=b"delete-rid-1")
        await client.set(b"k", b"back")
        assert await client.delete(b"k", rid=b"delete-rid-1") == tag
        # The retry did not delete again: the newer set stands.
        assert (await client.get(b"k")).value == b"back"


async def test_concurrent_writes_through_one_node_get_distinct_tags(cluster: LocalCluster) -> None:
    tags = []
    async with cluster.client([0]) as client:

        async def write(i: int) -> None:
            tags.append(await client.set(b"same", str(i).encode()))

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(write, i)
    assert len(set(tags)) == 40


async def test_wiped_node_catches_up_before_serving(cluster: LocalCluster) -> None:
    async with cluster.client([1]) as client:
        for i in range(300):
            await client.set(f"k{i}".encode(), f"v{i}".encode())
    await cluster.stop(0)
    cluster.wipe(0)
    node = await cluster.start(0)
    await wait_serving(cluster, 0)
    assert len(node.replica.state) == 300
    async with cluster.client([0]) as client:
        assert (await client.get(b"k299")).value == b"v299"


async def test_a_wiped_node_refuses_what_it_may_have_promised(cluster: LocalCluster) -> None:
    """Its promises went with its disk: once caught up it takes every
    register as promised above all it copied, and the cluster still counts."""
    async with cluster.client([1]) as client:
        for _ in range(5):
            await client.incr(b"counter")
    await cluster.stop(0)
    cluster.wipe(0)
    node = await cluster.start(0)
    await wait_serving(cluster, 0)
    copied = node.replica.state[Key(b"counter")].tag
    assert node.replica.promise_floor > copied
    assert node.replica.meta.promise_reserved >= node.replica.promise_floor.counter - 1
    async with cluster.client([0]) as client:
        assert (await client.incr(b"counter")).value == 6
        assert (await client.cas(b"counter", b"6", b"7")).swapped


async def test_a_rid_reused_for_a_different_write_is_refused(cluster: LocalCluster) -> None:
    from net.errors import BadRequest

    async with cluster.client() as client:
        tag = await client.set(b"k1", b"x", rid=b"shared-rid-1")
        with pytest.raises(BadRequest, match="already used"):
            await client.set(b"k2", b"y", rid=b"shared-rid-1")
        with pytest.raises(BadRequest, match="already used"):
            await client.set(b"k1", b"other value", rid=b"shared-rid-1")
        with pytest.raises(BadRequest, match="already used"):
            await client.delete(b"k1", rid=b"shared-rid-1")
        assert not (await client.get(b"k2")).found
        assert (await client.get(b"k1")).tag == tag


async def test_finished_operations_leave_the_deadline_queue_long_before_the_timeout() -> None:
    """The coordinator's deadline timer must not keep every operation of the
    last request timeout (with its replies) alive until the oldest expires:
    an operation leaves the running set when it finishes."""
    async with open_cluster(3, request_timeout=30.0) as cluster:
        for i in range(cluster.size):
            await wait_serving(cluster, i)
        async with cluster.client([0]) as client:
            for i in range(50):
                await client.set(b"k%d" % i, b"v")
        assert not cluster.node(0).coordinator.running  # the deadline is 30 s away

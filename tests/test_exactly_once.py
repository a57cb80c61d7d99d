"""Exactly once: a cas or an incr whose reply is lost on its way to the
client, retried with the same rid through another node, takes effect once
(docs/protocol.md, "Request ids of cas and incr").

Real ``qkv serve`` processes (SQLite); each node's clients reach it through
a proxy (``tests.support.proxy.open_fronts``) that can drop its replies:
the node gets the request and carries it out, the client hears nothing,
times out and retries elsewhere. Each test first waits until the lost
attempt's effect is visible through another node (so it has taken effect
on a majority, and its rid is on record there), then retries: the retry
must answer what the first attempt did, and change nothing. A retry with a
fresh rid, as a control, applies again: the scenario is not vacuous.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from net.address import Address
from net.client import Client, IncrResult, open_client
from net.errors import Unavailable
from tests.support.procs import ProcCluster
from tests.support.proxy import Proxy, open_fronts

pytestmark = pytest.mark.subprocess

T = TypeVar("T")

#: the client's timeout per attempt: a lost reply costs this much
TIMEOUT = 1.0
#: how long a wait for an effect may take (only a hang comes near it)
WITHIN = 15.0
RID = b"exactly-once-rid-0001"


@asynccontextmanager
async def cluster_with_fronts(root: Path) -> AsyncIterator[tuple[ProcCluster, list[Proxy]]]:
    cluster = ProcCluster(root, 3, extra_args=["--request-timeout", "1"])
    try:
        cluster.start_all()
        await cluster.wait_serving_async(30)
        await cluster.wait_coordinating_async(30)
        async with open_fronts(cluster.addresses) as fronts:
            yield cluster, fronts
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(cluster.close)


@asynccontextmanager
async def client_of(*addresses: Address) -> AsyncIterator[Client]:
    async with open_client(list(addresses), timeout=TIMEOUT) as client:
        yield client


async def value_through(address: Address, key: bytes) -> bytes | None:
    async with client_of(address) as client:
        return (await client.get(key)).value


async def wait_value(address: Address, key: bytes, want: bytes) -> None:
    """Until a get through ``address`` reads ``want``."""
    seen: list[bytes | None] = []
    with trio.move_on_after(WITHIN):
        while True:
            try:
                seen.append(await value_through(address, key))
            except Unavailable:
                seen.append(None)
            if seen[-1] == want:
                return
            await trio.sleep(0.05)
    raise AssertionError(f"{key!r} never read {want!r} through {address} (last reads {seen[-5:]})")


async def answered(call: Callable[[], Awaitable[T]]) -> T:
    """``await call()`` until it answers (a retry that meets a node still
    unsure of the first attempt's fate is answered ``unavailable``: asked
    again, with the same rid, it may answer)."""
    errors: list[str] = []
    with trio.move_on_after(WITHIN):
        while True:
            try:
                return await call()
            except Unavailable as exc:
                errors.append(exc.message)
            await trio.sleep(0.1)
    raise AssertionError(f"never answered: {errors[-3:]}")


async def lost_reply(front: Proxy, call: Callable[[Client], Awaitable[object]]) -> None:
    """Make a request through ``front`` with its replies dropped: it
    reaches the node, the answer never comes back (the client gives up)."""
    front.drop_replies()
    try:
        async with client_of(front.address) as client:
            with pytest.raises(Unavailable):
                await call(client)
    finally:
        front.heal()


@pytest.mark.parametrize("lost", [0, 1, 2])
async def test_an_incr_whose_reply_is_lost_adds_once(lost: int, tmp_path: Path) -> None:
    """The reply of node ``lost`` is dropped; the retry goes to the next."""
    other = (lost + 1) % 3
    key = b"counter"
    async with cluster_with_fronts(tmp_path) as (cluster, fronts):
        async with client_of(cluster.addresses[other]) as client:
            assert (await client.incr(key, 10)).value == 10
        await lost_reply(fronts[lost], lambda c: c.incr(key, 5, rid=RID))
        await wait_value(cluster.addresses[other], key, b"15")  # it took effect...
        async with client_of(cluster.addresses[other]) as retry:
            again = await answered(lambda: retry.incr(key, 5, rid=RID))
            assert again.value == 15, f"the retry added again: {again}"  # ...once
            for i in range(3):
                assert await value_through(cluster.addresses[i], key) == b"15"
            # control: a fresh rid is a new request, and adds
            assert (await retry.incr(key, 5)).value == 20


async def test_an_incr_retried_by_the_clients_own_fail_over_adds_once(tmp_path: Path) -> None:
    """The client's fail-over (same rid, next node) after a lost reply."""
    key = b"counter"
    async with cluster_with_fronts(tmp_path) as (cluster, fronts):
        total = 0
        for n in range(1, 4):
            rid = b"fail-over-rid-%04d" % n
            # a new client each time: it tries node 0 (whose reply is lost) first
            async with client_of(fronts[0].address, cluster.addresses[1], cluster.addresses[2]) as client:
                fronts[0].drop_replies()
                try:
                    result: IncrResult = await answered(lambda: client.incr(key, 7, rid=rid))  # noqa: B023
                finally:
                    fronts[0].heal()
            total += 7
            assert result.value == total, f"incr {n} answered {result.value}, not {total}"
        for i in range(3):
            assert await value_through(cluster.addresses[i], key) == b"%d" % total
        assert fronts[0].stats.bytes_dropped > 0  # a reply was lost each time


async def test_a_cas_whose_reply_is_lost_answers_swapped_when_retried(tmp_path: Path) -> None:
    """The retry of a cas that swapped answers ``swapped: true`` from the
    record, though the key no longer holds what it expected; nothing
    changes."""
    key = b"lock"
    async with cluster_with_fronts(tmp_path) as (cluster, fronts):
        async with client_of(cluster.addresses[1]) as client:
            await client.set(key, b"free")
        await lost_reply(fronts[0], lambda c: c.cas(key, b"free", b"mine", rid=RID))
        await wait_value(cluster.addresses[2], key, b"mine")
        async with client_of(cluster.addresses[2]) as retry:
            again = await answered(lambda: retry.cas(key, b"free", b"mine", rid=RID))
            assert again.swapped, f"the retry did not answer the record: {again}"
            assert again.value == b"mine"
            # control: a fresh rid is evaluated afresh, and does not swap
            fresh = await retry.cas(key, b"free", b"mine")
            assert (fresh.swapped, fresh.value) == (False, b"mine")
        assert await value_through(cluster.addresses[0], key) == b"mine"


async def test_an_incr_whose_coordinator_dies_after_the_lost_reply_adds_once(tmp_path: Path) -> None:
    """The node whose reply was lost is killed (-9) before the retry; back
    up, it agrees."""
    key = b"counter"
    async with cluster_with_fronts(tmp_path) as (cluster, fronts):
        await lost_reply(fronts[0], lambda c: c.incr(key, -4, rid=RID))
        await wait_value(cluster.addresses[1], key, b"-4")
        cluster.kill9(0)
        async with client_of(cluster.addresses[2], cluster.addresses[1]) as retry:
            again = await answered(lambda: retry.incr(key, -4, rid=RID))
            assert again.value == -4, f"the retry added again: {again}"
        cluster.start(0)
        await cluster.wait_serving_async(30)
        await wait_value(cluster.addresses[0], key, b"-4")
        assert await value_through(cluster.addresses[2], key) == b"-4"

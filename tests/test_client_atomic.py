"""``Client.cas`` and ``Client.incr`` against a 3-node cluster in this
process (the "Atomic updates" section of ``/work/shared/spec/wire-protocol.md``).

cas: swap, no swap, expect-absent, delete-if-unchanged, the empty value
against absence; incr: on absent keys, by positive, negative and zero,
not_integer for every non-canonical decimal (nothing changed), overflow at
both ends of the signed 64-bit range; request ids: a retry with the same
rid answers the first result without applying again (also through the
client's own fail-over, after a lost reply), and the same rid for another
request is bad_request. Definite errors are not retried on another node.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import net.client
from net.address import Address
from net.client import MAX_INT64, MIN_INT64, CasResult, Client, open_client
from net.errors import BadRequest, NotInteger
from quorum.cluster import LocalCluster, open_cluster
from register.model import Tag

LOOPBACK = "127.0.0.1"


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


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[Client]:
    async with cluster.client() as c:
        yield c


async def value_of(client: Client, key: bytes) -> bytes | None:
    return (await client.get(key)).value


# --- cas -----------------------------------------------------------------------------------


async def test_cas_swaps_when_the_value_is_the_expected_one(cluster: LocalCluster) -> None:
    async with cluster.client([0]) as a, cluster.client([2]) as c:
        old = await a.set(b"k", b"v1")
        result = await c.cas(b"k", b"v1", b"v2")
        assert (result.swapped, result.found, result.value) == (True, True, b"v2")
        assert result.tag is not None and result.tag > old
        got = await a.get(b"k")
        assert (got.found, got.value) == (True, b"v2")
        assert got.tag is not None and got.tag >= result.tag


async def test_cas_does_not_swap_another_value_and_shows_the_current_one(client: Client) -> None:
    tag = await client.set(b"k", b"current")
    result = await client.cas(b"k", b"something else", b"new")
    assert (result.swapped, result.found, result.value) == (False, True, b"current")
    assert result.tag is not None and result.tag >= tag
    assert await value_of(client, b"k") == b"current"


async def test_cas_expecting_a_value_on_an_absent_key_does_not_swap(client: Client) -> None:
    result = await client.cas(b"never written", b"v", b"new")
    assert (result.swapped, result.found, result.value, result.tag) == (False, False, None, None)
    assert not (await client.get(b"never written")).found


async def test_cas_expect_absent_writes_once(client: Client) -> None:
    first = await client.cas(b"k", None, b"mine")
    assert (first.swapped, first.found, first.value) == (True, True, b"mine")
    assert first.tag is not None
    second = await client.cas(b"k", None, b"theirs")
    assert (second.swapped, second.found, second.value) == (False, True, b"mine")
    assert await value_of(client, b"k") == b"mine"


async def test_cas_expect_absent_swaps_on_a_deleted_key(client: Client) -> None:
    await client.set(b"k", b"v")
    deleted = await client.delete(b"k")
    result = await client.cas(b"k", None, b"again")
    assert (result.swapped, result.found, result.value) == (True, True, b"again")
    assert result.tag is not None and result.tag > deleted


async def test_cas_delete_if_unchanged(client: Client) -> None:
    await client.set(b"k", b"v")
    kept = await client.cas(b"k", b"not v", None)
    assert (kept.swapped, kept.found, kept.value) == (False, True, b"v")
    gone = await client.cas(b"k", b"v", None)
    assert (gone.swapped, gone.found, gone.value) == (True, False, None)
    assert gone.tag is not None  # the tombstone's
    got = await client.get(b"k")
    assert (got.found, got.value) == (False, None)
    again = await client.cas(b"k", b"v", None)
    assert (again.swapped, again.found, again.value) == (False, False, None)


async def test_cas_absent_to_absent_swaps_and_leaves_it_absent(client: Client) -> None:
    result = await client.cas(b"k", None, None)
    assert (result.swapped, result.found, result.value) == (True, False, None)
    assert not (await client.get(b"k")).found


async def test_the_empty_value_is_not_absence(client: Client) -> None:
    await client.set(b"k", b"")
    absent = await client.cas(b"k", None, b"x")
    assert (absent.swapped, absent.found, absent.value) == (False, True, b"")
    empty = await client.cas(b"k", b"", b"x")
    assert (empty.swapped, empty.value) == (True, b"x")
    back = await client.cas(b"k", b"x", b"")
    assert (back.swapped, back.found, back.value) == (True, True, b"")


async def test_concurrent_cas_from_absent_lets_exactly_one_win(cluster: LocalCluster) -> None:
    results: list[tuple[bytes, CasResult]] = []

    async def attempt(i: int) -> None:
        mine = f"writer {i}".encode()
        async with cluster.client([i % 3]) as c:
            results.append((mine, await c.cas(b"race", None, mine)))

    async with trio.open_nursery() as nursery:
        for i in range(9):
            nursery.start_soon(attempt, i)
    winners = [mine for mine, r in results if r.swapped]
    assert len(winners) == 1, results
    async with cluster.client() as c:
        assert await value_of(c, b"race") == winners[0]


# --- incr ----------------------------------------------------------------------------------


async def test_incr_on_an_absent_key_counts_from_zero(client: Client) -> None:
    assert (await client.incr(b"a")).value == 1
    assert (await client.incr(b"b", 41)).value == 41
    assert (await client.incr(b"c", -3)).value == -3
    zero = await client.incr(b"d", 0)
    assert zero.value == 0
    assert [await value_of(client, k) for k in (b"a", b"b", b"c", b"d")] == [b"1", b"41", b"-3", b"0"]


async def test_incr_adds_positive_negative_and_zero(cluster: LocalCluster) -> None:
    async with cluster.client([0]) as a, cluster.client([1]) as b:
        first = await a.incr(b"n", 10)
        assert first.value == 10
        second = await b.incr(b"n", -25)
        assert second.value == -15 and second.tag > first.tag
        same = await a.incr(b"n", 0)
        assert same.value == -15
        assert (await b.incr(b"n")).value == -14
        assert await value_of(a, b"n") == b"-14"


async def test_incr_of_a_deleted_key_counts_from_zero(client: Client) -> None:
    await client.set(b"k", b"100")
    await client.delete(b"k")
    assert (await client.incr(b"k", 2)).value == 2


@pytest.mark.parametrize("stored", [b"0", b"7", b"-7", b"1234567890", str(MAX_INT64).encode()])
async def test_incr_reads_canonical_decimals(client: Client, stored: bytes) -> None:
    await client.set(b"k", stored)
    assert (await client.incr(b"k", 0)).value == int(stored)
    assert (await client.incr(b"k", -1)).value == int(stored) - 1
    assert await value_of(client, b"k") == str(int(stored) - 1).encode()


NOT_INTEGERS = [
    b"05",
    b"-0",
    b"+5",
    b" 5",
    b"5 ",
    b"abc",
    b"",
    b"-",
    b"1.0",
    b"1e3",
    b"0x10",
    b"1_000",
    "\u0663".encode(),  # an Arabic-Indic digit three
    str(MAX_INT64 + 1).encode(),
    str(MIN_INT64 - 1).encode(),
]


@pytest.mark.parametrize("stored", NOT_INTEGERS, ids=[repr(v) for v in NOT_INTEGERS])
async def test_incr_of_a_non_canonical_value_is_not_integer_and_changes_nothing(
    client: Client, stored: bytes
) -> None:
    await client.set(b"k", stored)
    for by in (1, 0, -1):
        with pytest.raises(NotInteger):
            await client.incr(b"k", by)
    got = await client.get(b"k")
    assert (got.found, got.value) == (True, stored)


async def test_incr_overflow_at_both_ends_is_not_integer(client: Client) -> None:
    assert (await client.incr(b"top", MAX_INT64)).value == MAX_INT64
    with pytest.raises(NotInteger):
        await client.incr(b"top", 1)
    with pytest.raises(NotInteger):
        await client.incr(b"top", MAX_INT64)
    assert await value_of(client, b"top") == str(MAX_INT64).encode()
    assert (await client.incr(b"top", 0)).value == MAX_INT64

    assert (await client.incr(b"bottom", MIN_INT64)).value == MIN_INT64
    with pytest.raises(NotInteger):
        await client.incr(b"bottom", -1)
    with pytest.raises(NotInteger):
        await client.incr(b"bottom", MIN_INT64)
    assert await value_of(client, b"bottom") == str(MIN_INT64).encode()
    # from one end to the other, in range
    assert (await client.incr(b"bottom", MAX_INT64)).value == -1
    await client.set(b"top2", str(MAX_INT64).encode())
    assert (await client.incr(b"top2", MIN_INT64)).value == -1


async def test_incr_by_outside_int64_is_refused_before_sending(client: Client) -> None:
    for by in (MAX_INT64 + 1, MIN_INT64 - 1):
        with pytest.raises(ValueError, match="64-bit"):
            await client.incr(b"k", by)
    assert not (await client.get(b"k")).found


async def test_concurrent_incrs_all_count(cluster: LocalCluster) -> None:
    async def add(i: int) -> None:
        async with cluster.client([i % 3]) as c:
            for _ in range(5):
                await c.incr(b"counter", 1)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(add, i)
    async with cluster.client() as c:
        assert await value_of(c, b"counter") == b"40"


# --- request ids ---------------------------------------------------------------------------


async def test_incr_retried_with_the_same_rid_adds_once(cluster: LocalCluster) -> None:
    rid = b"incr-rid-0000001"
    async with cluster.client([0]) as first, cluster.client([2]) as retry:
        done = await first.incr(b"n", 5, rid=rid)
        assert done.value == 5
        again = await retry.incr(b"n", 5, rid=rid)
        assert again == done
        assert await value_of(first, b"n") == b"5"
        # A new rid is a new request.
        assert (await retry.incr(b"n", 5)).value == 10


async def test_cas_retried_with_the_same_rid_answers_the_first_swap(client: Client) -> None:
    rid = b"cas-rid-00000001"
    first = await client.cas(b"k", None, b"v1", rid=rid)
    assert first.swapped
    again = await client.cas(b"k", None, b"v1", rid=rid)
    assert (again.swapped, again.found, again.value) == (True, True, b"v1")
    assert await value_of(client, b"k") == b"v1"


async def test_cas_that_did_not_swap_is_evaluated_afresh_on_retry(client: Client) -> None:
    rid = b"cas-rid-00000002"
    await client.set(b"k", b"other")
    missed = await client.cas(b"k", b"x", b"y", rid=rid)
    assert not missed.swapped
    await client.set(b"k", b"x")
    retried = await client.cas(b"k", b"x", b"y", rid=rid)
    assert (retried.swapped, retried.value) == (True, b"y")


async def test_a_rid_reused_with_other_arguments_is_bad_request(client: Client) -> None:
    rid = b"shared-atomic-01"
    assert (await client.incr(b"n", 1, rid=rid)).value == 1
    with pytest.raises(BadRequest):
        await client.incr(b"n", 2, rid=rid)
    with pytest.raises(BadRequest):
        await client.incr(b"other", 1, rid=rid)
    with pytest.raises(BadRequest):
        await client.cas(b"n", None, b"x", rid=rid)
    with pytest.raises(BadRequest):
        await client.set(b"n", b"x", rid=rid)
    assert await value_of(client, b"n") == b"1"
    assert not (await client.get(b"other")).found

    cas_rid = b"shared-atomic-02"
    assert (await client.cas(b"c", None, b"v", rid=cas_rid)).swapped
    with pytest.raises(BadRequest):
        await client.cas(b"c", None, b"w", rid=cas_rid)
    with pytest.raises(BadRequest):
        await client.incr(b"c", 1, rid=cas_rid)
    assert await value_of(client, b"c") == b"v"


async def _drop_replies(target: Address, *, task_status: trio.TaskStatus[Address]) -> None:
    """Forward requests to ``target`` and swallow every reply: the node
    executes each request and the client never hears of it."""
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listeners[0].socket.getsockname()[1]

    async def serve(downstream: trio.SocketStream) -> None:
        async with downstream, await trio.open_tcp_stream(target.host, target.port) as upstream:

            async def forward() -> None:
                while data := await downstream.receive_some(65536):
                    await upstream.send_all(data)

            async def swallow() -> None:
                while await upstream.receive_some(65536):
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(forward)
                nursery.start_soon(swallow)

    async with trio.open_nursery() as nursery:
        task_status.started(Address(LOOPBACK, port))
        await trio.serve_listeners(serve, listeners, handler_nursery=nursery)


@pytest.fixture
async def lossy_client(cluster: LocalCluster) -> AsyncIterator[Client]:
    """A client whose first node (n1) loses every reply; n2 is its second."""
    async with trio.open_nursery() as nursery:
        lossy = await nursery.start(_drop_replies, cluster.addresses[0])
        async with open_client([lossy, cluster.addresses[1]], timeout=1.0) as c:
            yield c
        nursery.cancel_scope.cancel()


async def test_an_incr_whose_reply_was_lost_is_retried_without_adding_twice(
    cluster: LocalCluster, lossy_client: Client
) -> None:
    with trio.fail_after(10):
        result = await lossy_client.incr(b"n", 7)
    assert result.value == 7
    async with cluster.client([2]) as c:
        assert await value_of(c, b"n") == b"7"


async def test_a_cas_whose_reply_was_lost_is_retried_as_the_same_swap(
    cluster: LocalCluster, lossy_client: Client
) -> None:
    with trio.fail_after(10):
        result = await lossy_client.cas(b"k", None, b"mine")
    # Without the rid the retry would find b"mine" there and not swap.
    assert (result.swapped, result.value) == (True, b"mine")


async def test_definite_errors_are_not_retried_on_another_node(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    await client.set(b"text", b"abc")
    sent: list[Any] = []
    request = net.client.Connection.request

    async def counting(self: net.client.Connection, message: Any, expected: type[Any]) -> Any:
        sent.append(message)
        return await request(self, message, expected)

    monkeypatch.setattr(net.client.Connection, "request", counting)
    with pytest.raises(NotInteger):
        await client.incr(b"text", 1)
    assert len(sent) == 1
    await client.incr(b"n", 1, rid=b"reused-rid-00001")
    sent.clear()
    with pytest.raises(BadRequest):
        await client.incr(b"n", 2, rid=b"reused-rid-00001")
    assert len(sent) == 1


async def test_tags_of_a_key_grow_with_every_change(client: Client) -> None:
    tags: list[Tag] = [await client.set(b"k", b"0")]
    tags.append((await client.incr(b"k", 1)).tag)
    swapped = await client.cas(b"k", b"1", b"2")
    assert swapped.tag is not None
    tags.append(swapped.tag)
    tags.append((await client.incr(b"k", -2)).tag)
    tags.append(await client.delete(b"k"))
    assert tags == sorted(tags) and len(set(tags)) == len(tags), tags

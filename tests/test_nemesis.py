"""Proof under faults: concurrent clients against clusters that a nemesis
keeps breaking, every history checked for linearizability.

* The proxy that the partitions (and lost replies) are made of, on its own.
* CI runs on subprocess clusters (``qkv serve``, SQLite, every
  node-to-node link behind a proxy): three seeds on 3 nodes, each
  injecting its share of the fault kinds first and then random ones, and
  one 5-node run that injects every kind. Each must end linearizable, with
  every key readable through every node after a ``kill -9`` of all nodes.
* An in-process run with crashes, graceful stops, held-back updates and
  lost storage.
* The suite catches real bugs: for each test-only fault switch
  (``quorum.faults``), a fixed schedule of in-process faults, with a
  background workload, on which the checker reports a violation when the
  switch is on, and which passes when it is off.
* Findings: a request id reused for a different request is neither refused
  nor served correctly (see the end of the file); these tests fail until
  the product is fixed.

The same under the atomic workloads (cas, incr): ``test_nemesis_atomic.py``.
Long schedules: ``scripts/torture.sh`` (see docs/testing.md).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from net.address import Address
from net.errors import BadRequest, PeerUnavailable, QkvError
from quorum.cluster import LocalCluster, open_cluster
from quorum.faults import FaultSwitches
from register.model import Key
from tests.support.history import HistoryRecorder, Op
from tests.support.linearizability import check, check_key
from tests.support.nemesis import (
    ALL_PROC_KINDS,
    LOCAL_KINDS,
    PROC_KINDS,
    NemesisReport,
    Planner,
    run_in_process,
    run_subprocess,
)
from tests.support.proxy import Mesh, Mode, open_proxy
from tests.support.workload import Workload, WorkloadConfig

# --- the proxy ----------------------------------------------------------------------------


async def echo_server(nursery: trio.Nursery) -> Address:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    listeners = await nursery.start(trio.serve_tcp, echo, 0)
    return Address("127.0.0.1", listeners[0].socket.getsockname()[1])


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise trio.BrokenResourceError("closed")
        data += chunk
    return data


async def closed_soon(stream: trio.SocketStream) -> bool:
    """Whether the proxy closes ``stream`` within a second."""
    with trio.move_on_after(1):
        try:
            while await stream.receive_some(1024):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return True
    return False


async def test_proxy_forwards_both_ways_and_delays_in_order() -> None:
    async with trio.open_nursery() as nursery:
        target = await echo_server(nursery)
        async with open_proxy(target) as proxy:
            stream = await trio.open_tcp_stream(proxy.address.host, proxy.address.port)
            async with stream:
                await stream.send_all(b"hello")
                assert await receive_exactly(stream, 5) == b"hello"
                proxy.delay(0.15)
                t = trio.current_time()
                for i in range(20):
                    await stream.send_all(b"%02d" % i)
                got = await receive_exactly(stream, 40)
                # delayed each way, in the order sent
                assert got == b"".join(b"%02d" % i for i in range(20))
                assert trio.current_time() - t >= 0.3
                proxy.heal()
                assert proxy.healthy
        nursery.cancel_scope.cancel()


async def test_proxy_cut_closes_and_refuses_until_healed() -> None:
    async with trio.open_nursery() as nursery:
        target = await echo_server(nursery)
        async with open_proxy(target) as proxy:
            stream = await trio.open_tcp_stream(proxy.address.host, proxy.address.port)
            async with stream:
                await stream.send_all(b"x")
                assert await receive_exactly(stream, 1) == b"x"
                proxy.cut()
                assert await closed_soon(stream)
            again = await trio.open_tcp_stream(proxy.address.host, proxy.address.port)
            async with again:
                assert await closed_soon(again)
            proxy.heal()
            healed = await trio.open_tcp_stream(proxy.address.host, proxy.address.port)
            async with healed:
                await healed.send_all(b"back")
                assert await receive_exactly(healed, 4) == b"back"
            assert proxy.stats.cuts == 1 and proxy.stats.refused >= 1
        nursery.cancel_scope.cancel()


async def test_proxy_blackhole_drops_silently_and_heal_closes() -> None:
    async with trio.open_nursery() as nursery:
        target = await echo_server(nursery)
        async with open_proxy(target) as proxy:
            stream = await trio.open_tcp_stream(proxy.address.host, proxy.address.port)
            async with stream:
                proxy.blackhole()
                assert proxy.mode is Mode.BLACKHOLE
                await stream.send_all(b"lost")
                with trio.move_on_after(0.3) as waited:
                    await stream.receive_some(10)
                assert waited.cancelled_caught, "a blackhole answered"
                assert proxy.connections == 1  # still open
                proxy.heal()
                assert await closed_soon(stream)
            assert proxy.stats.bytes_dropped >= 4
            healed = await trio.open_tcp_stream(proxy.address.host, proxy.address.port)
            async with healed:
                await healed.send_all(b"ok")
                assert await receive_exactly(healed, 2) == b"ok"
        nursery.cancel_scope.cancel()


async def test_proxy_drop_replies_forwards_requests_and_drops_answers() -> None:
    received: list[bytes] = []

    async def record_and_echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    received.append(data)
                    await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, record_and_echo, 0)
        target = Address("127.0.0.1", listeners[0].socket.getsockname()[1])
        async with open_proxy(target) as proxy:
            stream = await trio.open_tcp_stream(proxy.address.host, proxy.address.port)
            async with stream:
                await stream.send_all(b"a")
                assert await receive_exactly(stream, 1) == b"a"
                proxy.drop_replies()
                assert proxy.mode is Mode.DROP_REPLIES
                await stream.send_all(b"request")
                with trio.fail_after(5):
                    while b"".join(received) != b"arequest":
                        await trio.sleep(0.01)  # the target got it...
                with trio.move_on_after(0.3) as waited:
                    await stream.receive_some(10)
                assert waited.cancelled_caught, "a reply got through"  # ...its answer was lost
                proxy.heal()
                assert await closed_soon(stream)  # its reply stream has a hole
            assert proxy.stats.reply_drops == 1 and proxy.stats.bytes_dropped >= len(b"request")
            healed = await trio.open_tcp_stream(proxy.address.host, proxy.address.port)
            async with healed:
                await healed.send_all(b"ok")
                assert await receive_exactly(healed, 2) == b"ok"
        nursery.cancel_scope.cancel()


def test_partition_shapes() -> None:
    assert Mesh.links_between([[0, 1], [2]]) == [(0, 2), (1, 2), (2, 0), (2, 1)]
    assert sorted(Mesh.links_of(1, 3)) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    planner = Planner(random.Random(3), ALL_PROC_KINDS, 5, pinned_nodes=[0, 2])
    for kind in ALL_PROC_KINDS:
        fault = planner.make(kind, hold=1.0)
        assert all(i != j and 0 <= i < 5 and 0 <= j < 5 for i, j in fault.links)
        if kind == "bridge":
            # two sides, neither linked to the other, both to the bridge
            assert len(fault.links) == 2 * 2 * 2
        if kind == "isolate-coordinator":
            assert fault.detail.startswith(("n1 ", "n3 "))
    # the same seed gives the same schedule
    a = Planner(random.Random(7), PROC_KINDS, 3)
    b = Planner(random.Random(7), PROC_KINDS, 3)
    assert [a.next_step() for _ in range(30)] == [b.next_step() for _ in range(30)]


# --- subprocess clusters under the nemesis --------------------------------------------------

#: CI seeds; each injects a third of the kinds first (so that together they
#: inject every kind), then random ones until its time is up
CI_SEEDS = (1, 2, 3)
CI_FAULT_SECONDS = 10.0


def assert_good(report: NemesisReport) -> None:
    print("\n" + report.text())
    assert report.linearizable, report.violation
    assert not report.final_read_failures, "some key could not be read through some node after healing"
    assert not report.anomalies, report.anomalies
    assert not report.log_errors, report.log_error_samples
    assert report.ops.get("ok", 0) > 0


@pytest.mark.subprocess
@pytest.mark.parametrize("seed", CI_SEEDS)
async def test_three_nodes_under_every_fault_stay_linearizable(seed: int, tmp_path: Path) -> None:
    share = PROC_KINDS[CI_SEEDS.index(seed) :: len(CI_SEEDS)]
    report = await run_subprocess(
        tmp_path,
        nodes=3,
        seed=seed,
        duration=CI_FAULT_SECONDS,
        cover=share,
        hold=(0.3, 1.2),
        gap=(0.1, 0.4),
        workload=WorkloadConfig(clients=6, keys=4, timeout=1.5),
    )
    assert_good(report)
    assert all(report.faults[k] >= 1 for k in share)


@pytest.mark.subprocess
async def test_five_nodes_under_every_fault_stay_linearizable(tmp_path: Path) -> None:
    report = await run_subprocess(
        tmp_path,
        nodes=5,
        seed=5,
        duration=CI_FAULT_SECONDS,
        hold=(0.3, 1.2),
        gap=(0.1, 0.4),
        workload=WorkloadConfig(clients=8, keys=4, timeout=1.5),
    )
    assert_good(report)
    assert all(report.faults[k] >= 1 for k in PROC_KINDS)


# --- in-process clusters ----------------------------------------------------------------------


async def test_in_process_faults_stay_linearizable() -> None:
    report = await run_in_process(seed=11, duration=4.0)
    assert_good(report)
    assert all(report.faults[k] >= 1 for k in LOCAL_KINDS)


# --- the suite catches real bugs --------------------------------------------------------------

PROBE = b"probe"
PROBE_CLIENT = 900
REQUEST_TIMEOUT = 0.5


class Probe:
    """Targeted operations on one key, each through a chosen node on a new
    connection, recorded in the same history as the background workload."""

    def __init__(self, cluster: LocalCluster, recorder: HistoryRecorder) -> None:
        self.cluster = cluster
        self.recorder = recorder
        self.seen: list[str] = []

    async def _op(self, node: int, value: bytes | None, kind: str) -> bool:
        handle = self.recorder.invoke(PROBE_CLIENT, kind, PROBE, value)  # type: ignore[arg-type]
        try:
            with trio.fail_after(5):
                async with self.cluster.client([node], timeout=2.0) as client:
                    if kind == "set":
                        assert value is not None
                        await client.set(PROBE, value)
                        result = None
                    else:
                        got = await client.get(PROBE)
                        result = got.value if got.found else None
        except (QkvError, PeerUnavailable, trio.TooSlowError, OSError) as exc:
            self.recorder.complete(handle, "unknown")
            self.seen.append(f"{kind} via n{node + 1}: unknown ({type(exc).__name__})")
            return False
        self.recorder.complete(handle, "ok", result)
        self.seen.append(f"{kind} via n{node + 1}: ok {value if kind == 'set' else result!r}")
        return True

    async def set(self, node: int, value: bytes) -> bool:
        return await self._op(node, value, "set")

    async def get(self, node: int, *, attempts: int = 5) -> bool:
        """Read until one attempt answers (each attempt is an op)."""
        for attempt in range(attempts):
            if attempt:
                await trio.sleep(0.1)
            if await self._op(node, None, "get"):
                return True
        return False


async def wait_for(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    with trio.fail_after(within):
        while not condition():
            await trio.sleep(0.01)


def holds(cluster: LocalCluster, i: int, value: bytes) -> bool:
    held = cluster.node(i).replica.get(Key(PROBE))
    return held is not None and held.value == value


def link_up(cluster: LocalCluster, i: int, j: int) -> bool:
    return cluster.running(i) and cluster.node(i).links[cluster.ids[j]].connected


def serving(cluster: LocalCluster, i: int) -> bool:
    return cluster.running(i) and cluster.node(i).state == "serving"


async def lost_write(cluster: LocalCluster, probe: Probe, broken: bool) -> None:
    """write_quorum=1: a write acknowledged by its coordinator alone is
    lost when that node goes down."""
    cluster.node(0).switches.write_quorum = 1 if broken else None
    for i in (1, 2):
        cluster.node(i).switches.drop_stores = True  # n2, n3 hold back updates
    assert await probe.set(0, b"v1") is broken  # broken: acknowledged by n1 alone
    for i in (1, 2):
        cluster.node(i).switches.drop_stores = False
    await cluster.stop(0, grace=0)
    assert await probe.get(1)  # majority {n2, n3}: v1 is not there


async def stale_read(cluster: LocalCluster, probe: Probe, broken: bool) -> None:
    """skip_read_write_back: a read returns a version only one node holds;
    with that node gone, a later read goes back in time."""
    cluster.node(0).switches.skip_read_write_back = broken
    assert await probe.set(0, b"v1")
    await wait_for(lambda: all(holds(cluster, i, b"v1") for i in range(3)), "v1 everywhere")
    for i in (1, 2):
        cluster.node(i).switches.drop_stores = True
    assert not await probe.set(0, b"v2")  # unknown: stored on n1 only
    cluster.node(1).switches.drop_stores = False
    await cluster.stop(2, grace=0)
    assert await probe.get(0)  # {n1, n2}: v2, written back unless broken
    await cluster.stop(0, grace=0)
    await cluster.start(2)
    await wait_for(lambda: link_up(cluster, 1, 2), "n2 -> n3")
    assert await probe.get(1)  # {n2, n3}: broken: v1 again


async def read_from_wiped_node(cluster: LocalCluster, probe: Probe, broken: bool) -> None:
    """serve_before_catch_up: a node that lost its data answers queries
    before copying its peers' state, and a read misses an acknowledged write."""
    cluster.node(2).switches.drop_stores = True
    assert await probe.set(0, b"v1")  # acknowledged by n1 and n2
    cluster.node(2).switches.drop_stores = False
    await cluster.stop(0, grace=0)
    await cluster.stop(1, grace=0)
    cluster.wipe(0)
    await cluster.start(0, switches=FaultSwitches(serve_before_catch_up=broken))
    await wait_for(lambda: link_up(cluster, 0, 2), "n1 -> n3")
    # broken: n1 (empty) and n3 answer "not found"; correct: n1 refuses
    assert await probe.get(0, attempts=3) is broken
    await cluster.start(1)
    await wait_for(lambda: serving(cluster, 0), "n1 caught up")


SCENARIOS: dict[str, Callable[[LocalCluster, Probe, bool], Awaitable[None]]] = {
    "write_quorum": lost_write,
    "skip_read_write_back": stale_read,
    "serve_before_catch_up": read_from_wiped_node,
}


async def run_scenario(name: str, broken: bool) -> tuple[list[Op], Probe]:
    async with open_cluster(3, request_timeout=REQUEST_TIMEOUT) as cluster:
        await wait_for(lambda: all(serving(cluster, i) for i in range(3)), "cluster serving")
        recorder = HistoryRecorder(time.monotonic)
        background = Workload(
            cluster.addresses,
            WorkloadConfig(clients=3, keys=3, timeout=1.0, key_prefix="bg", think=0.01),
            seed=17,
            recorder=recorder,
        )
        probe = Probe(cluster, recorder)
        stop = trio.Event()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(background.run, stop)
                await trio.sleep(0.2)
                await SCENARIOS[name](cluster, probe, broken)
                stop.set()
            for i in range(3):
                if not cluster.running(i):
                    await cluster.start(i)
            await wait_for(lambda: all(serving(cluster, i) for i in range(3)), "all serving")
            await background.final_reads()
            for i in range(3):
                assert await probe.get(i)
    return background.history(), probe


@pytest.mark.parametrize("switch", sorted(SCENARIOS))
async def test_checker_catches_a_broken_switch_and_passes_without_it(switch: str) -> None:
    history, probe = await run_scenario(switch, broken=False)
    result = check(history)
    assert result.ok, f"{switch} off:\n{result.describe()}\nprobe: {probe.seen}"

    history, probe = await run_scenario(switch, broken=True)
    result = check(history)
    print(f"\n{switch} on: probe {probe.seen}\n{result.describe()}")
    assert not result.ok, f"{switch} on, yet the history is linearizable; probe: {probe.seen}"
    probe_only = check_key([op for op in history if op.key == PROBE])
    assert not probe_only.ok, f"the probe key is linearizable; probe: {probe.seen}"


# --- findings: a request id reused for a different request ------------------------------------
#
# A node looks a rid up by the rid alone (``Replica.rid_tag`` ->
# ``RidTable.lookup``), although every rid record holds the key it was
# written for, and a coordinator that finds the rid recorded stores the
# recorded *tag* with the *new request's* value (``Operation._after_query``).
# A client that reuses a rid for another request (a restarted counter, two
# programs choosing ids the same way) therefore gets "ok" for writes that
# never happen, and can split a register into replicas that hold the same tag
# with different values forever. The protocol's promise for a retry (same
# request, same rid) is kept; these tests are about bad input, which must
# get a clear error or be served correctly, and hurt no one else.

RID = b"rid-used-twice"


async def test_a_rid_reused_for_another_key_is_refused_or_written() -> None:
    async with open_cluster(3, request_timeout=REQUEST_TIMEOUT) as cluster:
        await wait_for(lambda: all(serving(cluster, i) for i in range(3)), "cluster serving")
        async with cluster.client() as client:
            await client.set(b"k1", b"x", rid=RID)
            await client.set(b"k2", b"old")
            try:
                tag = await client.set(b"k2", b"new", rid=RID)
            except BadRequest:
                return  # refused: a clear error, nothing written
            got = await client.get(b"k2")
            assert got.value == b"new", (
                f"set k2=new was acknowledged (tag {tag}) but k2 still reads {got.value!r} "
                f"(tag {got.tag}): the rid was recorded for k1, and its tag was reused for k2"
            )


async def test_a_rid_reused_with_another_value_does_not_split_the_register() -> None:
    async with open_cluster(3, request_timeout=REQUEST_TIMEOUT) as cluster:
        await wait_for(lambda: all(serving(cluster, i) for i in range(3)), "cluster serving")
        cluster.node(2).switches.drop_stores = True
        async with cluster.client([0]) as client:
            await client.set(PROBE, b"a", rid=RID)  # on n1 and n2
        cluster.node(2).switches.drop_stores = False
        await cluster.stop(1)
        # the same rid, another value, through n3: its majority {n3, n1} has the rid
        async with cluster.client([2]) as client:
            with contextlib.suppress(QkvError):
                await client.set(PROBE, b"b", rid=RID)
        await cluster.start(1)
        await wait_for(
            lambda: (
                all(serving(cluster, i) for i in range(3))
                and all(link_up(cluster, i, j) for i in range(3) for j in range(3) if i != j)
            ),
            "all serving and linked",
        )
        held = {cluster.ids[i]: cluster.node(i).replica.get(Key(PROBE)) for i in range(3)}
        by_tag: dict[object, set[bytes | None]] = {}
        for version in held.values():
            if version is not None:
                by_tag.setdefault(version.tag, set()).add(version.value)
        reads = {}
        for i in range(3):
            async with cluster.client([i]) as client:
                reads[cluster.ids[i]] = (await client.get(PROBE)).value
        assert all(len(values) == 1 for values in by_tag.values()), (
            f"one tag names two values: replicas hold {held}; reads through each node: {reads}"
        )
        assert len(set(reads.values())) == 1, f"reads through different nodes disagree: {reads}"

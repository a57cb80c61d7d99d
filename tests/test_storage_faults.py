"""Storage faults and lost disks, on in-process clusters.

- A failing disk makes the writes it touches fail with an error, never an
  acknowledgement; the node keeps running and serves again once the disk
  recovers.
- A node whose data is lost does not answer quorum queries until it has
  caught up, so no read through it goes back in time; with the catch-up
  gate switched off (a test-only switch) the same scenario does read stale
  data, which shows the test can fail.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import attrs
import pytest
import trio

from net.errors import Unavailable
from quorum.cluster import LocalCluster, open_cluster
from quorum.faults import FaultSwitches
from register.model import Key
from register.sqlite_store import SqliteStore
from register.store import MemoryStore


async def wait_state(cluster: LocalCluster, i: int, state: str = "serving") -> None:
    with trio.fail_after(10):
        while cluster.node(i).state != state:
            await trio.sleep(0.01)


async def wait_all_serving(cluster: LocalCluster) -> None:
    for i in range(cluster.size):
        await wait_state(cluster, i)


def fail_disk(cluster: LocalCluster, i: int, failing: bool) -> None:
    store = cluster.node(i).replica.store
    assert isinstance(store, MemoryStore | SqliteStore)
    store.fail_writes = failing


@pytest.mark.parametrize("engine", ["memory", "sqlite"])
async def test_failing_disks_fail_writes_and_recover(engine: str, tmp_path: Path) -> None:
    data_dir = tmp_path if engine == "sqlite" else None
    async with open_cluster(3, data_dir=data_dir, request_timeout=1.0) as cluster:
        await wait_all_serving(cluster)
        async with cluster.client([0]) as client:
            first = await client.set(b"k", b"before")
            # One failing disk: the other two still make a majority.
            fail_disk(cluster, 0, True)
            await client.set(b"k", b"one disk down")
            # Two failing disks: no majority can store, so no acknowledgement.
            fail_disk(cluster, 1, True)
            with pytest.raises(Unavailable):
                await client.set(b"k", b"never acknowledged")
            assert cluster.node(0).replica.get(Key(b"k")).tag == first  # type: ignore[union-attr]
            # The disks recover; so does the cluster, with no restart.
            fail_disk(cluster, 0, False)
            fail_disk(cluster, 1, False)
            await client.set(b"k", b"after")
            assert (await client.get(b"k")).value == b"after"


async def test_full_tmpfs_fails_writes_and_recovers(tmp_path: Path) -> None:
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        filler = mount / "filler"
        filler.write_bytes(b"\0" * 512 * 1024)
        async with open_cluster(3, data_dir=tmp_path / "ok", request_timeout=1.0, start=False) as cluster:
            # n1 and n2 on the small disk (the majority), n3 on a roomy one.
            for i in (0, 1):
                cluster.configs[i] = attrs.evolve(cluster.configs[i], data_dir=mount / f"n{i + 1}")
            for i in range(3):
                await cluster.start(i)
            await wait_all_serving(cluster)
            acked: dict[bytes, bytes] = {}
            async with cluster.client([2]) as client:
                failed = 0
                for i in range(400):
                    key, value = f"k{i}".encode(), bytes([i % 256]) * 8192
                    try:
                        await client.set(key, value)
                        acked[key] = value
                    except Unavailable:
                        failed += 1
                        if failed >= 3:
                            break
                assert failed >= 3, "the disk never filled up"
                filler.unlink()
                await client.set(b"after", b"space again")
                for key, value in acked.items():
                    assert (await client.get(key)).value == value
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def read_through_quorum_with_wiped_node(gate: bool) -> list[bytes | None]:
    """Write v1 to {n1, n2} only; wipe n1; with n2 down, read through n1.

    Returns what the reads through n1 returned (unavailable reads are left
    out): with the gate, n1 cannot catch up while n2 is down and refuses;
    without it, n1 answers from its empty disk and the read misses v1.
    """
    seen: list[bytes | None] = []
    async with open_cluster(3, request_timeout=0.5) as cluster:
        await wait_all_serving(cluster)
        cluster.node(2).switches.drop_stores = True
        async with cluster.client([0]) as client:
            await client.set(b"k", b"v1")  # acknowledged by n1 and n2
        cluster.node(2).switches.drop_stores = False
        await cluster.stop(0)
        await cluster.stop(1)
        cluster.wipe(0)
        await cluster.start(0, switches=FaultSwitches(serve_before_catch_up=not gate))
        async with cluster.client([0], timeout=3) as client:
            for _ in range(5):
                with contextlib.suppress(Unavailable):  # refused while recovering
                    seen.append((await client.get(b"k")).value)
            # n2 comes back: n1 can now catch up, and every read sees v1.
            await cluster.start(1)
            await wait_state(cluster, 0)
            seen.append((await client.get(b"k")).value)
    return seen


async def test_wiped_node_never_serves_a_stale_read() -> None:
    seen = await read_through_quorum_with_wiped_node(gate=True)
    assert seen and all(v == b"v1" for v in seen), seen


async def test_without_the_catch_up_gate_the_same_scenario_reads_stale() -> None:
    seen = await read_through_quorum_with_wiped_node(gate=False)
    assert None in seen, "the scenario no longer exercises the catch-up gate"


async def test_wiped_node_catches_up_while_writes_continue() -> None:
    """Reads through a node that lost its disk never go back in time while
    a writer keeps writing through another node."""
    async with open_cluster(3, request_timeout=1.0) as cluster:
        await wait_all_serving(cluster)
        acked = 0
        stop = trio.Event()

        async def writer() -> None:
            nonlocal acked
            async with cluster.client([1]) as client:
                n = 0
                while not stop.is_set():
                    n += 1
                    await client.set(b"counter", str(n).encode())
                    acked = n

        async def reader() -> None:
            async with cluster.client([0], timeout=3) as client:
                for _ in range(200):
                    floor = acked
                    try:
                        result = await client.get(b"counter")
                    except Unavailable:
                        await trio.sleep(0.005)
                        continue
                    got = int(result.value or b"0")
                    assert got >= floor, f"read {got} after {floor} was acknowledged"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            for _ in range(3):
                await trio.sleep(0.05)
                await cluster.stop(0)
                cluster.wipe(0)
                await cluster.start(0)
                await reader()
            stop.set()
        assert acked > 0

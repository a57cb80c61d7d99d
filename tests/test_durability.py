"""Durability across crashes of real ``qkv serve`` processes (SQLite data dirs).

The contract under test (``/work/shared/spec/node-cli.md``): a node
restarted on its data dir comes back with every write it acknowledged; a
write acknowledged to a client is on a majority of disks, so it survives
``kill -9`` of every node. A write whose outcome the client never learnt may
or may not have happened, but if it did, it holds exactly its value.

Run with ``-s`` to see the per-round counts.
"""

from __future__ import annotations

import hashlib
import random
import signal
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest
import trio

from net.address import Address
from net.client import Client, open_client
from net.errors import QkvError, Unavailable
from tests.support.procs import ProcCluster

pytestmark = pytest.mark.subprocess

SEED = 20240917
ROUNDS = 3
WRITERS = 8
#: each writer's client: seconds per attempt on one node
CLIENT_TIMEOUT = 2.0
#: nodes answer "unavailable" well before the client gives up on them
SERVE_ARGS = ["--request-timeout", "1.0"]
MAX_WRITES_PER_WRITER = 5000


def value_for(key: bytes, round_: int) -> bytes:
    """A value derived from key and round: binary, of varying length."""
    digest = hashlib.blake2b(key + b"|round %d" % round_, digest_size=32).digest()
    return key + b"=" + digest * (1 + digest[0] % 6)


def rotated(addresses: Sequence[Address], start: int) -> list[Address]:
    """The node list starting at ``start``: writers spread over coordinators."""
    return [addresses[(start + k) % len(addresses)] for k in range(len(addresses))]


@attrs.define
class Writes:
    acked: dict[bytes, bytes] = attrs.field(factory=dict)
    unknown: dict[bytes, bytes] = attrs.field(factory=dict)
    errors: dict[str, int] = attrs.field(factory=dict)

    _waiting: list[tuple[int, trio.Event]] = attrs.field(factory=list)

    def ack(self, key: bytes, value: bytes) -> None:
        self.acked[key] = value
        for count, event in self._waiting:
            if len(self.acked) >= count:
                event.set()

    async def wait_acked(self, count: int) -> None:
        """Return once ``count`` writes in all have been acknowledged."""
        event = trio.Event()
        if len(self.acked) < count:
            self._waiting.append((count, event))
            await event.wait()

    def update(self, other: Writes) -> None:
        self.acked.update(other.acked)
        self.unknown.update(other.unknown)


async def write_until(cluster: ProcCluster, stop: trio.Event, writes: Writes, round_: int) -> None:
    """``WRITERS`` tasks, each with its own client over all nodes, setting
    distinct keys until ``stop``; every write ends acknowledged or unknown."""

    async def writer(w: int) -> None:
        async with open_client(rotated(cluster.addresses, w), timeout=CLIENT_TIMEOUT) as client:
            for seq in range(MAX_WRITES_PER_WRITER):
                if stop.is_set():
                    return
                key = b"r%d-w%d-%d" % (round_, w, seq)
                value = value_for(key, round_)
                try:
                    await client.set(key, value)
                except QkvError as exc:
                    # unavailable, internal...: the outcome is unknown.
                    # (definite errors such as bad_request would be a bug here)
                    assert not exc.definite, exc
                    writes.unknown[key] = value
                    name = type(exc).__name__
                    writes.errors[name] = writes.errors.get(name, 0) + 1
                else:
                    writes.ack(key, value)

    async with trio.open_nursery() as nursery:
        for w in range(WRITERS):
            nursery.start_soon(writer, w)


@attrs.define
class Mismatches:
    lost: list[bytes] = attrs.field(factory=list)
    wrong: list[tuple[bytes, bytes | None]] = attrs.field(factory=list)
    unknown_wrong: list[tuple[bytes, bytes | None]] = attrs.field(factory=list)
    unknown_present: int = 0


async def read_back(cluster: ProcCluster, writes: Writes, *, within: float = 60.0) -> Mismatches:
    """Read every key of ``writes`` through the cluster (8 readers, each
    over all nodes, down ones included: the client fails over; a read that
    finds no majority yet is retried)."""
    expected = [(k, v, True) for k, v in writes.acked.items()]
    expected += [(k, v, False) for k, v in writes.unknown.items()]
    found = Mismatches()
    send, receive = trio.open_memory_channel[tuple[bytes, bytes, bool]](len(expected))
    for item in expected:
        send.send_nowait(item)
    send.close()

    async def get(client: Client, key: bytes) -> tuple[bool, bytes | None]:
        for _attempt in range(50):
            try:
                result = await client.get(key)
            except Unavailable:
                await trio.sleep(0.1)
                continue
            return result.found, result.value
        raise AssertionError(f"get {key!r}: no majority after 50 attempts\n{cluster.logs_tail()}")

    async def reader(r: int) -> None:
        async with open_client(rotated(cluster.addresses, r), timeout=CLIENT_TIMEOUT) as client:
            async for key, value, acked in receive:
                present, got = await get(client, key)
                if acked:
                    if not present:
                        found.lost.append(key)
                    elif got != value:
                        found.wrong.append((key, got))
                elif present:
                    found.unknown_present += 1
                    if got != value:
                        found.unknown_wrong.append((key, got))

    with trio.fail_after(within):
        async with trio.open_nursery() as nursery:
            for r in range(WRITERS):
                nursery.start_soon(reader, r)
    return found


def assert_nothing_lost(found: Mismatches, what: str) -> None:
    assert not found.lost, f"{what}: {len(found.lost)} acknowledged writes lost, e.g. {found.lost[:5]}"
    assert not found.wrong, f"{what}: acknowledged keys with another value, e.g. {found.wrong[:3]}"
    assert not found.unknown_wrong, (
        f"{what}: unknown-outcome keys holding a value never written, e.g. {found.unknown_wrong[:3]}"
    )


async def restart(cluster: ProcCluster, nodes: Sequence[int]) -> None:
    """Start ``nodes`` on their data dirs; wait until each serves as coordinator."""
    for i in nodes:
        cluster.start(i)
    await cluster.wait_serving_async(30, nodes=nodes)
    await cluster.wait_coordinating_async(30, nodes=nodes)


async def restart_all(cluster: ProcCluster) -> None:
    await restart(cluster, range(cluster.size))


@attrs.frozen
class Schedule:
    """One round's crash points, drawn from the seeded RNG."""

    victim: int  # killed alone mid-burst, then restarted
    first_kill: float  # seconds into the burst
    down_for: float  # at least this long, and until DOWN_ACKS more writes were acknowledged
    before_all: float  # after the victim serves again, kill -9 all three
    left_out: int  # restarted last: the read-back goes through the two others

    @classmethod
    def draw(cls, rng: random.Random, size: int) -> Schedule:
        return cls(
            victim=rng.randrange(size),
            first_kill=rng.uniform(0.3, 1.0),
            down_for=rng.uniform(0.1, 0.6),
            before_all=rng.uniform(0.2, 0.8),
            left_out=rng.randrange(size),
        )


#: writes that must be acknowledged while the victim is down (the cluster
#: keeps serving with a majority)
DOWN_ACKS = 20


async def crash(
    cluster: ProcCluster, plan: Schedule, writes: Writes, stop: trio.Event, progress: dict[str, int]
) -> None:
    """Kill -9 ``plan.victim`` mid-burst, restart it, then kill -9 every node
    at once while the writers are busy; ``stop`` the writers."""
    try:
        await trio.sleep(plan.first_kill)
        progress["acked before the first kill"] = before = len(writes.acked)
        cluster.kill9(plan.victim)
        await trio.sleep(plan.down_for)
        with trio.fail_after(30):  # generous: only a cluster that stopped serving breaks it
            await writes.wait_acked(before + DOWN_ACKS)
        progress["acked when the victim restarts"] = len(writes.acked)
        cluster.start(plan.victim)
        await cluster.wait_serving_async(30, nodes=[plan.victim])
        await trio.sleep(plan.before_all)
        progress["acked at kill -9 of all"] = len(writes.acked)
        cluster.kill9_all()  # all three at once, writes in flight
    finally:
        stop.set()


async def test_kill9_of_one_then_all_nodes_loses_no_acknowledged_write(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    everything = Writes()
    print(f"\nkill -9 durability: seed {SEED}, {ROUNDS} rounds, {WRITERS} writers")
    with ProcCluster(tmp_path, 3, extra_args=SERVE_ARGS) as cluster:
        cluster.start_all()
        await cluster.wait_serving_async(30)
        for round_ in range(ROUNDS):
            plan = Schedule.draw(rng, cluster.size)
            writes = Writes()
            stop = trio.Event()
            progress: dict[str, int] = {}
            with trio.fail_after(90):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(write_until, cluster, stop, writes, round_)
                    nursery.start_soon(crash, cluster, plan, writes, stop, progress)

            # Restart only two nodes first and read everything through them:
            # an acknowledged write must be on a majority of disks, so any
            # two nodes hold it (with all three up, one copy would suffice).
            started = trio.current_time()
            await restart(cluster, [i for i in range(cluster.size) if i != plan.left_out])
            restarted = trio.current_time()
            found = await read_back(cluster, writes)
            read = trio.current_time()
            await restart(cluster, [plan.left_out])
            print(
                f"round {round_}: kill -9 {cluster.ids[plan.victim]} after {plan.first_kill:.2f} s, "
                f"restart it, kill -9 all {plan.before_all:.2f} s after it serves again; "
                f"read back without {cluster.ids[plan.left_out]}: "
                f"acked {len(writes.acked)}, unknown {len(writes.unknown)} "
                f"(present after restart: {found.unknown_present}), errors {writes.errors}, {progress}; "
                f"restart {restarted - started:.1f} s, read back {read - restarted:.1f} s"
            )
            assert_nothing_lost(found, f"round {round_}")
            everything.update(writes)

        # every earlier round's writes survived the later rounds' crashes too
        # (the last round's were just read)
        found = await read_back(cluster, everything)
        print(
            f"all rounds: {len(everything.acked)} acked and {len(everything.unknown)} unknown re-read, 0 lost"
        )
        assert_nothing_lost(found, "after all rounds")


async def test_rid_deduplication_survives_a_restart_of_every_node(tmp_path: Path) -> None:
    rid = bytes.fromhex("5eed0123456789abcdef0123456789ab")
    with ProcCluster(tmp_path, 3, extra_args=SERVE_ARGS) as cluster:
        cluster.start_all()
        await cluster.wait_serving_async(30)
        async with open_client([cluster.addresses[0]], timeout=5) as client:
            tag = await client.set(b"dedup", b"once", rid=rid)

        for i in range(cluster.size):
            cluster.send_signal(i, signal.SIGTERM)
        for i in range(cluster.size):
            assert await cluster.wait_exit_async(i, within=10) == 0, cluster.log(i)

        await restart_all(cluster)
        async with open_client([cluster.addresses[1]], timeout=5) as client:
            again = await client.set(b"dedup", b"once", rid=rid)
            assert again == tag, "the retry wrote a second time instead of answering the first write's tag"
            got = await client.get(b"dedup")
            assert (got.found, got.value, got.tag) == (True, b"once", tag)
        async with open_client([cluster.addresses[2]], timeout=5) as client:
            assert await client.set(b"dedup", b"once", rid=rid) == tag
            fresh = await client.set(b"dedup", b"twice")
            assert fresh > tag
            assert (await client.get(b"dedup")).tag == fresh


async def test_sigterm_while_writing_exits_0_and_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    writes = Writes()
    stop = trio.Event()
    codes: dict[str, int] = {}
    with ProcCluster(tmp_path, 3, extra_args=SERVE_ARGS) as cluster:
        cluster.start_all()
        await cluster.wait_serving_async(30)

        async def terminate_all() -> None:
            try:
                await trio.sleep(1.0)
                assert writes.acked, "writers made no progress"
                for i in range(cluster.size):  # all at once, writes in flight
                    cluster.send_signal(i, signal.SIGTERM)

                async def wait(i: int) -> None:
                    codes[cluster.ids[i]] = await cluster.wait_exit_async(i, within=10)

                async with trio.open_nursery() as nursery:
                    for i in range(cluster.size):
                        nursery.start_soon(wait, i)
            finally:
                stop.set()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_until, cluster, stop, writes, 0)
                nursery.start_soon(terminate_all)
        assert codes == {"n1": 0, "n2": 0, "n3": 0}, cluster.logs_tail()
        for i in range(cluster.size):
            assert "Traceback" not in cluster.log(i)

        await restart_all(cluster)
        found = await read_back(cluster, writes)
        print(
            f"\nSIGTERM while writing: acked {len(writes.acked)}, unknown {len(writes.unknown)} "
            f"(present after restart: {found.unknown_present}), errors {writes.errors}"
        )
        assert_nothing_lost(found, "after SIGTERM")

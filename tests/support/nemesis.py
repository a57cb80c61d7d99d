"""Fault injection for qkv clusters, and whole checked runs of it.

A *nemesis* breaks a running cluster on a schedule that a seeded RNG
chooses, heals every fault after a random hold, and counts what it did.
Two of them:

``ProcNemesis``: a ``ProxiedProcCluster`` (``qkv serve`` processes) whose
    every directed node-to-node link runs through a ``tests.support.proxy``
    proxy: node A's ``--peer B=...`` is the address of the proxy A->B, which
    forwards to B. Faults: ``kill -9`` and restart, SIGSTOP/SIGCONT, loss of
    a node's disk, and partitions of every shape built from cutting,
    blackholing or delaying directed links (see ``PROC_KINDS``); and, with
    ``CLIENT_KINDS``, faults on the clients' links to the nodes, which then
    run through one proxy per node (``tests.support.proxy.open_fronts``):
    ``drop-replies``, a node's answers to its clients lost on the way.
``LocalNemesis``: an in-process ``quorum.cluster.LocalCluster``. Faults:
    crash (stop at once) or graceful stop and restart, a node holding back
    the updates it receives (the ``drop_stores`` switch), loss of a node's
    storage (see ``LOCAL_KINDS``).

A step of the schedule is one fault, sometimes with a second one on other
nodes/links overlapping it; a step ends when all its faults are healed;
faults that would make a majority of disks lost at once (``wipe``) or that
involve every node run alone. With ``cover`` the first steps go through
every kind once (in a seeded order), so even a short run injects them all.

``run_subprocess`` and ``run_in_process`` start a cluster, run a
``tests.support.workload.Workload`` under the nemesis, then heal
everything, restart every node (``kill -9`` for processes), wait until all
serve, read every key through every node, and check the whole history for
linearizability (and, for the ``counter`` workload, every counter against
its increments: ``tests.support.workload.check_counters``). They return a
``NemesisReport``: faults per kind, ops ok/failed/unknown, throughput with
and without faults, the verdicts.

Every wait is bounded; every process started is stopped (SIGCONT first for
a paused one) when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import queue
import random
import shutil
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from net.address import Address
from quorum.cluster import LocalCluster, open_cluster
from quorum.protocol.decide import majority
from tests.support.history import KINDS, Op
from tests.support.linearizability import check
from tests.support.procs import LOOPBACK, QKV, ProcCluster, free_ports, ping_states
from tests.support.proxy import Link, Mesh, Proxy, open_fronts, open_mesh
from tests.support.workload import FINAL_CLIENT, Workload, WorkloadConfig, check_counters

__all__ = [
    "ALL_PROC_KINDS",
    "CLIENT_KINDS",
    "LOCAL_KINDS",
    "PROC_KINDS",
    "Fault",
    "LocalNemesis",
    "NemesisReport",
    "Planner",
    "ProcNemesis",
    "ProxiedProcCluster",
    "pick_ports",
    "bounded_check",
    "run_in_process",
    "run_subprocess",
    "save_history",
]

#: fault kinds on subprocess clusters
PROC_KINDS: tuple[str, ...] = (
    "kill9",  # kill -9 one node, restart it after the hold
    "kill9-majority",  # kill -9 a majority at once
    "kill9-all",  # kill -9 every node (alone in its step)
    "pause",  # SIGSTOP one node, SIGCONT after the hold
    "pause-majority",  # SIGSTOP a majority
    "wipe",  # kill -9 one node, delete its data dir, restart it empty (alone)
    "isolate",  # cut every link of one node, both ways (it is a minority)
    "isolate-coordinator",  # the same, for a node that pinned clients talk to
    "split",  # majority | minority groups
    "no-majority",  # groups none of which is a majority
    "bridge",  # two sides that only one bridge node connects
    "one-way",  # one node cannot dial anyone, or nobody can dial it
    "cut-link",  # one directed link
    "blackhole",  # every link of one node silently drops bytes
    "delay",  # latency on the links of one node, or of all
)

#: fault kinds on the links from the clients to the nodes of a subprocess
#: cluster (the run then puts a proxy in front of every node for clients)
CLIENT_KINDS: tuple[str, ...] = (
    "drop-replies",  # one node's replies to its clients are dropped (requests still arrive)
)

#: every fault kind of a subprocess cluster
ALL_PROC_KINDS: tuple[str, ...] = PROC_KINDS + CLIENT_KINDS

#: fault kinds on in-process clusters
LOCAL_KINDS: tuple[str, ...] = (
    "crash",  # stop one node at once, restart it after the hold
    "stop",  # graceful stop, restart after the hold
    "crash-majority",  # stop a majority at once
    "drop-stores",  # one node drops the updates it receives
    "drop-stores-majority",  # a majority does (writes cannot complete)
    "wipe",  # stop, lose the storage, restart empty (alone)
)

#: kinds that run alone in their step
EXCLUSIVE = frozenset({"wipe", "kill9-all"})

#: how long healing one fault may take (restart, SIGCONT, catch-up)
HEAL_BOUND = 45.0
#: how long a node that lost its data may take to catch up once healed
CATCH_UP_BOUND = 30.0


# --- ports -------------------------------------------------------------------------------


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def pick_ports(n: int, *, attempts: int = 2000) -> list[int]:
    """``n`` distinct loopback ports free right now, chosen outside the
    kernel's ephemeral range when there is room: a node restarted many times
    must find its port free, and an outgoing connection (which takes an
    ephemeral port) could otherwise hold it while the node is down."""
    low, high = _ephemeral_range()
    ranges = [r for r in ((10000, low - 1), (high + 1, 65000)) if r[1] - r[0] > 1000]
    if not ranges:
        return free_ports(n)
    rng = random.SystemRandom()
    chosen: list[int] = []
    for _ in range(attempts):
        lo, hi = rng.choice(ranges)
        port = rng.randint(lo, hi)
        if port in chosen:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == n:
            return chosen
    raise RuntimeError(f"found no {n} free ports outside the ephemeral range")


# --- the schedule ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Fault:
    kind: str
    #: nodes whose process or state the fault acts on
    nodes: tuple[int, ...] = ()
    #: directed links it cuts, blackholes or delays
    links: tuple[Link, ...] = ()
    hold: float = 1.0
    #: seconds after the start of its step
    offset: float = 0.0
    latency: float = 0.0
    detail: str = ""

    def describe(self) -> str:
        parts = [self.kind]
        if self.nodes:
            parts.append("nodes " + ",".join(f"n{i + 1}" for i in self.nodes))
        if self.detail:
            parts.append(self.detail)
        if self.latency:
            parts.append(f"+{self.latency * 1000:.0f} ms")
        parts.append(f"for {self.hold:.2f} s")
        return " ".join(parts)

    def compatible(self, other: Fault) -> bool:
        return (
            self.kind not in EXCLUSIVE
            and other.kind not in EXCLUSIVE
            and not set(self.nodes) & set(other.nodes)
            and not set(self.links) & set(other.links)
        )


def _groups_text(groups: Sequence[Sequence[int]]) -> str:
    return " | ".join(",".join(f"n{i + 1}" for i in sorted(g)) for g in groups)


class Planner:
    """Draws the schedule from a seeded RNG: which faults, on which nodes
    and links, for how long, and the quiet gaps between steps. The draws do
    not depend on timing, so a seed always gives the same schedule."""

    def __init__(
        self,
        rng: random.Random,
        kinds: Sequence[str],
        size: int,
        *,
        pinned_nodes: Sequence[int] = (),
        hold: tuple[float, float] = (0.4, 2.0),
        gap: tuple[float, float] = (0.1, 0.6),
        overlap: float = 0.3,
        cover: bool | Sequence[str] = True,
    ) -> None:
        unknown = set(kinds) - set(ALL_PROC_KINDS) - set(LOCAL_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        if not kinds:
            raise ValueError("no fault kinds")
        self.rng = rng
        self.kinds = list(kinds)
        self.size = size
        self.pinned_nodes = list(pinned_nodes)
        self.hold = hold
        self.gap = gap
        self.overlap = overlap
        # kinds the first steps go through, once each, in a seeded order
        self._to_cover = list(kinds) if cover is True else [] if cover is False else list(cover)
        rng.shuffle(self._to_cover)

    @property
    def covered(self) -> bool:
        return not self._to_cover

    def next_step(self) -> tuple[list[Fault], float]:
        """The faults of the next step (offsets within it) and the gap after."""
        rng = self.rng
        kind = self._to_cover.pop(0) if self._to_cover else rng.choice(self.kinds)
        primary = self.make(kind, hold=rng.uniform(*self.hold))
        step = [primary]
        if primary.kind not in EXCLUSIVE and rng.random() < self.overlap:
            for _ in range(5):
                other = self.make(
                    rng.choice(self.kinds),
                    hold=rng.uniform(*self.hold),
                    offset=rng.uniform(0, 0.7 * primary.hold),
                )
                if primary.compatible(other):
                    step.append(other)
                    break
        return step, rng.uniform(*self.gap)

    def make(self, kind: str, *, hold: float, offset: float = 0.0) -> Fault:
        rng, n = self.rng, self.size
        maj = majority(n)
        everyone = list(range(n))
        one = rng.randrange(n)
        f = attrs.evolve(Fault(kind=kind), hold=hold, offset=offset)
        match kind:
            case "kill9" | "pause" | "wipe" | "crash" | "stop" | "drop-stores":
                return attrs.evolve(f, nodes=(one,))
            case "kill9-majority" | "pause-majority" | "crash-majority" | "drop-stores-majority":
                return attrs.evolve(f, nodes=tuple(sorted(rng.sample(everyone, maj))))
            case "kill9-all":
                return attrs.evolve(f, nodes=tuple(everyone))
            case "isolate" | "blackhole":
                return attrs.evolve(f, links=tuple(Mesh.links_of(one, n)), detail=f"n{one + 1} cut off")
            case "isolate-coordinator":
                node = rng.choice(self.pinned_nodes) if self.pinned_nodes else one
                return attrs.evolve(
                    f,
                    links=tuple(Mesh.links_of(node, n)),
                    detail=f"n{node + 1} (a client's coordinator) cut off",
                )
            case "split":
                order = rng.sample(everyone, n)
                groups = [order[:maj], order[maj:]]
                return attrs.evolve(f, links=tuple(Mesh.links_between(groups)), detail=_groups_text(groups))
            case "no-majority":
                order = rng.sample(everyone, n)
                width = max(1, maj - 1)
                groups = [order[i : i + width] for i in range(0, n, width)]
                return attrs.evolve(f, links=tuple(Mesh.links_between(groups)), detail=_groups_text(groups))
            case "bridge":
                order = rng.sample(everyone, n)
                bridge, rest = order[0], order[1:]
                half = len(rest) // 2
                sides = [rest[:half], rest[half:]]
                return attrs.evolve(
                    f,
                    links=tuple(Mesh.links_between(sides)),
                    detail=f"{_groups_text(sides)} bridged by n{bridge + 1}",
                )
            case "one-way":
                if rng.random() < 0.5:
                    links = [(one, j) for j in everyone if j != one]
                    detail = f"n{one + 1} cannot dial out"
                else:
                    links = [(j, one) for j in everyone if j != one]
                    detail = f"nobody can dial n{one + 1}"
                return attrs.evolve(f, links=tuple(links), detail=detail)
            case "drop-replies":
                return attrs.evolve(f, nodes=(one,), detail="its replies to clients dropped")
            case "cut-link":
                i, j = rng.sample(everyone, 2)
                return attrs.evolve(f, links=((i, j),), detail=f"n{i + 1}->n{j + 1}")
            case "delay":
                latency = rng.uniform(0.01, 0.2)
                if rng.random() < 0.5:
                    return attrs.evolve(
                        f, links=tuple(Mesh.links_of(one, n)), latency=latency, detail=f"links of n{one + 1}"
                    )
                links = [(i, j) for i in everyone for j in everyone if i != j]
                return attrs.evolve(f, links=tuple(links), latency=latency, detail="every link")
        raise ValueError(f"unknown fault kind {kind!r}")


# --- running a schedule -------------------------------------------------------------------


@attrs.define
class FaultRecord:
    fault: Fault
    start: float
    end: float = 0.0


class Nemesis:
    """Runs a ``Planner``'s schedule; subclasses apply and heal faults."""

    def __init__(
        self,
        planner: Planner,
        *,
        clock: Callable[[], float] = time.monotonic,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.planner = planner
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.records: list[FaultRecord] = []
        self.anomalies: list[str] = []
        self.progress = progress
        self.steps = 0

    async def apply(self, fault: Fault) -> None:
        raise NotImplementedError

    async def heal(self, fault: Fault) -> None:
        raise NotImplementedError

    async def heal_all(self) -> None:
        raise NotImplementedError

    async def between_steps(self) -> None:
        """Called after each step (all its faults healed)."""

    async def run(self, duration: float) -> None:
        """Inject faults for ``duration`` seconds (longer until every kind
        has been injected once, with ``cover``); everything is healed when
        this returns."""
        start = self.clock()
        try:
            while self.clock() - start < duration or not self.planner.covered:
                faults, gap = self.planner.next_step()
                self.steps += 1
                async with trio.open_nursery() as nursery:
                    for fault in faults:
                        nursery.start_soon(self._one, fault)
                await self.between_steps()
                await trio.sleep(gap)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(HEAL_BOUND):
                await self.heal_all()

    async def _one(self, fault: Fault) -> None:
        await trio.sleep(fault.offset)
        record = FaultRecord(fault, self.clock())
        self.records.append(record)
        self.counts[fault.kind] += 1
        if self.progress is not None:
            self.progress(f"fault: {fault.describe()}")
        try:
            await self.apply(fault)
            await trio.sleep(fault.hold)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(HEAL_BOUND):
                await self.heal(fault)
            record.end = self.clock()

    def fault_intervals(self) -> list[tuple[float, float]]:
        """The union of the times some fault was active, as sorted intervals."""
        spans = sorted((r.start, r.end or self.clock()) for r in self.records)
        merged: list[tuple[float, float]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        return merged


class ProxiedProcCluster(ProcCluster):
    """A ``ProcCluster`` whose nodes dial each other through ``mesh``."""

    def __init__(
        self,
        root: Path,
        mesh: Mesh,
        ports: Sequence[int],
        *,
        extra_args: Sequence[str] = (),
        fronts: Sequence[Proxy] = (),
    ) -> None:
        super().__init__(root, mesh.size, extra_args=extra_args, ports=ports)
        self.mesh = mesh
        #: with client faults: the proxy in front of each node, for clients
        self.fronts = list(fronts)
        if self.fronts and len(self.fronts) != self.size:
            raise ValueError("one front proxy per node")
        self.paused: set[int] = set()

    @property
    def client_addresses(self) -> list[Address]:
        """Where clients reach each node: its front proxy, if it has one."""
        return [f.address for f in self.fronts] if self.fronts else self.addresses

    def front(self, i: int) -> Proxy:
        if not self.fronts:
            raise ValueError("this cluster has no front proxies: client faults need them")
        return self.fronts[i]

    def serve_args(self, i: int) -> list[str]:
        args = [str(QKV), "serve", "--id", self.ids[i], "--listen", self.address(i)]
        for j in range(self.size):
            if j != i:
                args += ["--peer", f"{self.ids[j]}={self.mesh.peer_address(i, j)}"]
        return [*args, "--data-dir", str(self.data_dir(i)), *self.extra_args]

    def _signal(self, i: int, sig: int) -> bool:
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        return True

    def pause(self, i: int) -> None:
        if self._signal(i, signal.SIGSTOP):
            self.paused.add(i)

    def resume(self, i: int) -> None:
        self.paused.discard(i)
        self._signal(i, signal.SIGCONT)

    def resume_all(self) -> None:
        for i in range(self.size):
            self.resume(i)

    def close(self) -> None:
        # A stopped process would sit out its SIGTERM until SIGKILLed.
        try:
            self.resume_all()
        finally:
            super().close()


class ProcNemesis(Nemesis):
    def __init__(self, cluster: ProxiedProcCluster, planner: Planner, **options: Any) -> None:
        super().__init__(planner, **options)
        self.cluster = cluster
        self.mesh = cluster.mesh
        self.restarts = 0
        #: nodes this nemesis killed and has not restarted yet
        self.killed: set[int] = set()
        #: wiped nodes that did not catch up in time
        self.lagging: list[int] = []

    def _start(self, i: int) -> None:
        if not self.cluster.running(i):
            self.cluster.paused.discard(i)
            self.cluster.start(i)
            self.restarts += 1
        self.killed.discard(i)

    def _kill(self, i: int) -> None:
        self.killed.add(i)
        self.cluster.paused.discard(i)
        self.cluster.kill9(i)

    def check_processes(self) -> None:
        """A node that exited although nobody killed it is a finding: note
        it (with the end of its log) and start it again."""
        for i in range(self.cluster.size):
            proc = self.cluster.procs[i]
            if i in self.killed or proc is None or proc.poll() is None:
                continue
            tail = "\n".join(self.cluster.log(i).splitlines()[-10:])
            self.anomalies.append(f"n{i + 1} exited on its own (status {proc.returncode}):\n{tail}")
            self._start(i)

    async def between_steps(self) -> None:
        self.check_processes()

    async def apply(self, fault: Fault) -> None:
        cluster, mesh = self.cluster, self.mesh
        match fault.kind:
            case "kill9" | "kill9-majority" | "kill9-all":
                for i in fault.nodes:
                    self._kill(i)
            case "pause" | "pause-majority":
                for i in fault.nodes:
                    cluster.pause(i)
            case "wipe":
                (i,) = fault.nodes
                if self.lagging:
                    # a disk lost while another has not caught up could lose
                    # acknowledged writes legitimately: not a test any more
                    self.anomalies.append(f"wipe of n{i + 1} skipped: n{self.lagging[0] + 1} never caught up")
                    return
                self._kill(i)
                shutil.rmtree(cluster.data_dir(i), ignore_errors=True)
                self._start(i)
            case "blackhole":
                mesh.blackhole(fault.links)
            case "delay":
                mesh.delay(fault.links, fault.latency)
            case "drop-replies":
                for i in fault.nodes:
                    cluster.front(i).drop_replies()
            case _:
                mesh.cut(fault.links)

    async def heal(self, fault: Fault) -> None:
        cluster = self.cluster
        match fault.kind:
            case "kill9" | "kill9-majority" | "kill9-all":
                for i in fault.nodes:
                    self._start(i)
            case "pause" | "pause-majority":
                for i in fault.nodes:
                    cluster.resume(i)
            case "wipe":
                (i,) = fault.nodes
                self._start(i)
                # No other disk may be lost before this one has caught up.
                if not await self._wait_serving(i, CATCH_UP_BOUND):
                    self.lagging.append(i)
                    self.anomalies.append(
                        f"n{i + 1} did not catch up within {CATCH_UP_BOUND:g} s after losing its data"
                    )
            case "drop-replies":
                for i in fault.nodes:
                    cluster.front(i).heal()
            case _:
                self.mesh.heal(fault.links)

    async def _wait_serving(self, i: int, within: float) -> bool:
        with trio.move_on_after(within):
            # another process's state: polled
            while (await ping_states([self.cluster.addresses[i]]))[0] != "serving":
                await trio.sleep(0.1)
            return True
        return False

    async def heal_all(self) -> None:
        self.mesh.heal()
        for front in self.cluster.fronts:
            front.heal()
        self.cluster.resume_all()
        self.check_processes()
        for i in range(self.cluster.size):
            self._start(i)


class LocalNemesis(Nemesis):
    def __init__(self, cluster: LocalCluster, planner: Planner, **options: Any) -> None:
        super().__init__(planner, **options)
        self.cluster = cluster
        self.restarts = 0

    async def _start(self, i: int) -> None:
        if not self.cluster.running(i):
            await self.cluster.start(i)
            self.restarts += 1

    async def apply(self, fault: Fault) -> None:
        cluster = self.cluster
        match fault.kind:
            case "crash" | "crash-majority":
                async with trio.open_nursery() as nursery:
                    for i in fault.nodes:
                        nursery.start_soon(functools.partial(cluster.stop, i, grace=0))
            case "stop":
                for i in fault.nodes:
                    await cluster.stop(i)
            case "drop-stores" | "drop-stores-majority":
                for i in fault.nodes:
                    if cluster.running(i):
                        cluster.node(i).switches.drop_stores = True
            case "wipe":
                (i,) = fault.nodes
                await cluster.stop(i, grace=0)
                cluster.wipe(i)
                await self._start(i)
            case _:
                raise ValueError(f"{fault.kind} is not an in-process fault")

    async def heal(self, fault: Fault) -> None:
        cluster = self.cluster
        match fault.kind:
            case "drop-stores" | "drop-stores-majority":
                for i in fault.nodes:
                    if cluster.running(i):
                        cluster.node(i).switches.drop_stores = False
            case "wipe":
                (i,) = fault.nodes
                await self._start(i)
                if not await self._wait_serving(i, CATCH_UP_BOUND):
                    self.anomalies.append(
                        f"n{i + 1} did not catch up within {CATCH_UP_BOUND:g} s after losing its data"
                    )
            case _:
                for i in fault.nodes:
                    await self._start(i)

    async def _wait_serving(self, i: int, within: float) -> bool:
        with trio.move_on_after(within):
            # a node has no event for "serving": polled
            while not (self.cluster.running(i) and self.cluster.node(i).state == "serving"):
                await trio.sleep(0.02)
            return True
        return False

    async def heal_all(self) -> None:
        for i in range(self.cluster.size):
            await self._start(i)
            self.cluster.node(i).switches.drop_stores = False


# --- the report ------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class NemesisReport:
    cluster: str
    nodes: int
    seed: int
    clients: int
    keys: int
    routing: str
    kinds: list[str]
    #: the operations (``WorkloadConfig.workload``)
    workload: str = "register"
    #: seconds the workload ran (faults and quiet), final reads excluded
    duration: float = 0.0
    #: seconds during which at least one fault was active
    fault_seconds: float = 0.0
    steps: int = 0
    faults: dict[str, int] = attrs.field(factory=dict)
    schedule: list[dict[str, Any]] = attrs.field(factory=list)
    ops: dict[str, int] = attrs.field(factory=dict)
    ops_by_kind: dict[str, dict[str, int]] = attrs.field(factory=dict)
    #: ok cas and incr answers by what they said (swapped, not_integer, ...)
    answers: dict[str, int] = attrs.field(factory=dict)
    attempts: int = 0
    retries: int = 0
    shadow_writes: int = 0
    errors: dict[str, int] = attrs.field(factory=dict)
    restarts: int = 0
    final_reads: int = 0
    final_read_retries: int = 0
    final_read_failures: int = 0
    throughput: float = 0.0
    throughput_faults: float = 0.0
    throughput_quiet: float = 0.0
    linearizable: bool | None = None
    violation: str = ""
    check_seconds: float = 0.0
    history_ops: int = 0
    #: the counter workload: each counter key against its increments
    counters: list[str] = attrs.field(factory=list)
    counter_failures: int = 0
    #: where the history was saved (a violation, or no verdict)
    history_file: str = ""
    anomalies: list[str] = attrs.field(factory=list)
    #: ERROR/CRITICAL lines and tracebacks in the nodes' logs (first few)
    log_errors: int = 0
    log_error_samples: list[str] = attrs.field(factory=list)
    proxies: dict[str, int] = attrs.field(factory=dict)
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Linearizable, every counter right, every final read answered, no
        node exited on its own or logged an error, every wiped node caught up."""
        return (
            bool(self.linearizable)
            and not self.counter_failures
            and not self.final_read_failures
            and not self.anomalies
            and not self.log_errors
        )

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["ok"] = self.ok
        return out

    def text(self) -> str:
        total_faults = sum(self.faults.values())
        fault_share = 100 * self.fault_seconds / self.duration if self.duration else 0.0
        pinned = sum(
            1
            for c in range(self.clients)
            if self.routing == "pinned" or (self.routing == "mixed" and c % 2 == 0)
        )
        lines = [
            f"nemesis run: {self.cluster} cluster of {self.nodes} nodes, seed {self.seed}, "
            f"{self.clients} clients ({pinned} pinned, {self.clients - pinned} fail-over), {self.keys} keys, "
            f"workload {self.workload}",
            f"  workload {self.duration:.1f} s, faults active {self.fault_seconds:.1f} s "
            f"({fault_share:.0f}%), {self.steps} steps, wall clock {self.wall_seconds:.1f} s",
            f"  faults injected ({total_faults}): "
            + ", ".join(f"{k} {self.faults.get(k, 0)}" for k in self.kinds),
            f"  node restarts {self.restarts}",
            f"  ops {sum(self.ops.values())}: ok {self.ops.get('ok', 0)}, failed {self.ops.get('fail', 0)}, "
            f"unknown {self.ops.get('unknown', 0)}",
        ]
        for kind, outcomes in self.ops_by_kind.items():
            counts = ", ".join(f"{o} {outcomes.get(o, 0)}" for o in ("ok", "fail", "unknown"))
            lines.append(f"    {kind:<6} {counts}")
        if self.answers:
            lines.append("  answers: " + ", ".join(f"{k} {v}" for k, v in sorted(self.answers.items())))
        lines += [
            f"  attempts {self.attempts} (fail-over retries {self.retries}), "
            f"shadow writes {self.shadow_writes}",
            "  errors seen: " + (", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"),
            f"  throughput (ok ops/s): {self.throughput:.1f} overall, "
            f"{self.throughput_faults:.1f} during faults, {self.throughput_quiet:.1f} without",
            f"  final reads {self.final_reads} (retried {self.final_read_retries}, "
            f"never answered {self.final_read_failures})",
            f"  history {self.history_ops} ops; checker: "
            + (
                "linearizable"
                if self.linearizable
                else "NOT LINEARIZABLE"
                if self.linearizable is False
                else "not run"
            )
            + f" ({self.check_seconds:.1f} s)",
        ]
        if self.counters:
            lines.append(
                f"  counters: {len(self.counters) - self.counter_failures} of {len(self.counters)} "
                "add up (final = acknowledged + a subset of the unknown increments)"
            )
            lines.extend(f"    {line}" for line in self.counters)
        if self.proxies:
            p = self.proxies
            lines.append(
                f"  proxies: {p.get('accepted', 0)} connections, {p.get('refused', 0)} refused (cut), "
                f"{p.get('closed_by_fault', 0)} closed by faults, "
                f"{p.get('bytes_forwarded', 0) / 1e6:.1f} MB forwarded, "
                f"{p.get('bytes_dropped', 0) / 1e3:.1f} kB dropped (blackhole)"
            )
        lines.append(f"  node logs: {self.log_errors} ERROR/CRITICAL lines or tracebacks")
        lines.extend(f"    {sample}" for sample in self.log_error_samples)
        if self.anomalies:
            lines.append("  anomalies: " + "; ".join(self.anomalies))
        if self.history_file:
            lines.append(f"  history saved to {self.history_file}")
        if self.violation:
            lines.append(self.violation)
        return "\n".join(lines)


def _fill(report: NemesisReport, workload: Workload, nemesis: Nemesis, started: float, ended: float) -> None:
    stats = workload.stats
    report.duration = ended - started
    intervals = [(max(s, started), min(e, ended)) for s, e in nemesis.fault_intervals()]
    intervals = [(s, e) for s, e in intervals if e > s]
    report.fault_seconds = sum(e - s for s, e in intervals)
    report.steps = nemesis.steps
    report.faults = {k: nemesis.counts.get(k, 0) for k in report.kinds}
    report.schedule = [
        {
            "kind": r.fault.kind,
            "what": r.fault.describe(),
            "start": round(r.start - started, 3),
            "end": round(r.end - started, 3),
        }
        for r in sorted(nemesis.records, key=lambda r: r.start)
    ]
    ops = [op for op in workload.recorder.ops() if op.client < FINAL_CLIENT]
    report.ops = dict(Counter(op.outcome for op in ops))
    by_kind: dict[str, dict[str, int]] = {}
    for op in ops:
        by_kind.setdefault(op.kind, {}).setdefault(op.outcome, 0)
        by_kind[op.kind][op.outcome] += 1
    report.ops_by_kind = {k: by_kind[k] for k in KINDS if k in by_kind}
    report.answers = dict(stats.answers)
    report.attempts, report.retries, report.shadow_writes = stats.attempts, stats.retries, stats.shadows
    report.errors = dict(stats.errors)
    report.final_reads = stats.final_reads
    report.final_read_retries = stats.final_read_retries
    report.final_read_failures = stats.final_read_failures
    done = [op.ret for op in ops if op.outcome == "ok" and op.ret is not None and started <= op.ret <= ended]
    in_faults = sum(1 for t in done if any(s <= t <= e for s, e in intervals))
    quiet_seconds = report.duration - report.fault_seconds
    report.throughput = len(done) / report.duration if report.duration else 0.0
    report.throughput_faults = in_faults / report.fault_seconds if report.fault_seconds else 0.0
    report.throughput_quiet = (len(done) - in_faults) / quiet_seconds if quiet_seconds > 0 else 0.0
    report.anomalies = list(nemesis.anomalies)


_LOG_ERRORS = (" ERROR ", " CRITICAL ", "Traceback (most recent call last)")


def _scan_logs(report: NemesisReport, cluster: ProcCluster, samples: int = 5) -> None:
    for i in range(cluster.size):
        for line in cluster.log(i).splitlines():
            if any(marker in line for marker in _LOG_ERRORS):
                report.log_errors += 1
                if len(report.log_error_samples) < samples:
                    report.log_error_samples.append(f"{cluster.ids[i]}: {line[:200]}")


#: memory a bounded check may use (bytes of address space of its process)
CHECK_MEMORY = 4 * 2**30

#: a verdict: linearizable (True), not (False), or none (None); and the
#: checker's description of the violation, or why there is no verdict
Verdict = tuple[bool | None, str]


def _check_child(history: list[Op], answers: Any, memory: int) -> None:
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    try:
        result = check(history)
    except MemoryError:
        answers.put((None, f"the checker ran out of memory ({memory / 2**30:g} GiB)"))
        return
    answers.put((result.ok, "" if result.ok else result.describe()))


def bounded_check(history: list[Op], seconds: float, *, memory: int = CHECK_MEMORY) -> Verdict:
    """``check(history)`` in a process of its own, given ``seconds`` and
    ``memory`` bytes. The search has no budget of its own, and on some
    histories (with a violation deep in them, above all) it can take
    minutes and gigabytes: this keeps a run from doing that to a shared
    machine, and says so instead of hanging."""
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    child = context.Process(target=_check_child, args=(history, answers, memory), daemon=True)
    child.start()
    deadline = time.monotonic() + seconds
    try:
        while True:
            try:
                verdict: Verdict = answers.get(timeout=0.2)
                return verdict
            except queue.Empty:
                if not child.is_alive():
                    return None, f"the checker's process died (exit status {child.exitcode})"
                if time.monotonic() > deadline:
                    return None, f"the checker gave no verdict within {seconds:g} s"
    finally:
        if child.is_alive():
            child.kill()
        child.join(10)
        answers.close()


def save_history(path: Path, ops: Sequence[Op]) -> None:
    """``ops`` as JSON lines, one op a line (bytes as UTF-8, replaced)."""
    with path.open("w") as out:
        for op in ops:
            row = {
                k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                for k, v in attrs.asdict(op).items()
            }
            out.write(json.dumps(row) + "\n")


def _check(report: NemesisReport, history: list[Op], timeout: float | None = None) -> None:
    """The verdicts on ``history``: linearizability (in a bounded process of
    its own with ``timeout``), and the counters of a counter workload."""
    report.history_ops = len(history)
    t = time.monotonic()
    if timeout is None:
        result = check(history)
        report.linearizable, report.violation = result.ok, "" if result.ok else result.describe()
    else:
        report.linearizable, report.violation = bounded_check(history, timeout)
        if report.linearizable is None:
            report.violation = f"no verdict: {report.violation}"
    report.check_seconds = time.monotonic() - t
    if report.workload == "counter":
        verdicts = check_counters(history)
        report.counters = [v.describe() for v in verdicts]
        report.counter_failures = sum(1 for v in verdicts if not v.ok)


async def _run_under_nemesis(
    workload: Workload, nemesis: Nemesis, duration: float, settle: float
) -> tuple[float, float]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(workload.run, stop)
        started = time.monotonic()
        await trio.sleep(settle)
        await nemesis.run(duration)
        await trio.sleep(settle)
        stop.set()
    return started, time.monotonic()


async def run_subprocess(
    root: Path,
    *,
    nodes: int = 3,
    seed: int = 0,
    duration: float = 15.0,
    workload: WorkloadConfig | None = None,
    kinds: Sequence[str] = PROC_KINDS,
    request_timeout: float = 1.0,
    hold: tuple[float, float] = (0.4, 2.0),
    gap: tuple[float, float] = (0.1, 0.6),
    overlap: float = 0.3,
    cover: bool | Sequence[str] = True,
    settle: float = 0.5,
    progress: Callable[[str], None] | None = None,
    keep_history: list[list[Op]] | None = None,
    keep_workload: list[Workload] | None = None,
    check_timeout: float | None = None,
) -> NemesisReport:
    """A ``qkv serve`` cluster behind proxies, under a workload and a
    ``ProcNemesis``, checked at the end (see the module docstring).
    ``keep_history``: a list to which the checked history is appended;
    ``keep_workload``: one to which the workload is (its stats, its trace);
    ``check_timeout``: run the checker in a process of its own, bounded
    (``bounded_check``)."""
    wall = time.monotonic()
    config = workload or WorkloadConfig()
    say = progress or (lambda _: None)
    report = NemesisReport(
        cluster="subprocess",
        nodes=nodes,
        seed=seed,
        clients=config.clients,
        keys=config.keys,
        routing=config.routing,
        kinds=list(kinds),
        workload=config.workload,
    )
    ports = pick_ports(nodes)
    targets = [Address(LOOPBACK, p) for p in ports]
    async with contextlib.AsyncExitStack() as stack:
        mesh = await stack.enter_async_context(open_mesh(targets))
        fronts = (
            await stack.enter_async_context(open_fronts(targets))
            if any(k in CLIENT_KINDS for k in kinds)
            else []
        )
        extra = ["--request-timeout", f"{request_timeout:g}"]
        cluster = ProxiedProcCluster(root, mesh, ports, extra_args=extra, fronts=fronts)
        try:
            cluster.start_all()
            await cluster.wait_serving_async(30)
            say(
                f"{nodes} nodes serving on {cluster.nodes_arg}"
                + (" (clients through proxies)" if fronts else "")
            )
            load = Workload(cluster.client_addresses, config, seed=seed)
            if keep_workload is not None:
                keep_workload.append(load)
            planner = Planner(
                random.Random(seed),
                kinds,
                nodes,
                pinned_nodes=load.pinned_nodes,
                hold=hold,
                gap=gap,
                overlap=overlap,
                cover=cover,
            )
            nemesis = ProcNemesis(cluster, planner, progress=progress)
            started, ended = await _run_under_nemesis(load, nemesis, duration, settle)
            say("healed; restarting every node (kill -9)")
            with trio.fail_after(HEAL_BOUND):
                await nemesis.heal_all()
            cluster.kill9_all()
            for i in range(nodes):
                cluster.start(i)
            nemesis.restarts += nodes
            await cluster.wait_serving_async(30)
            await load.final_reads()
            report.restarts = nemesis.restarts
            report.proxies = mesh.stats()
            for front in fronts:
                for name, value in attrs.asdict(front.stats).items():
                    report.proxies[name] = report.proxies.get(name, 0) + value
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(cluster.close)
            _scan_logs(report, cluster)
    _fill(report, load, nemesis, started, ended)
    history = load.history()
    if keep_history is not None:
        keep_history.append(history)
    say(f"checking {len(history)} ops")
    _check(report, history, check_timeout)
    if not report.linearizable or report.counter_failures:
        report.history_file = str(root / "history.jsonl")
        save_history(root / "history.jsonl", history)
    report.wall_seconds = time.monotonic() - wall
    return report


def _all_serving(cluster: LocalCluster) -> bool:
    return all(cluster.running(i) and cluster.node(i).state == "serving" for i in range(cluster.size))


async def _local_wait_serving(cluster: LocalCluster, within: float = 20.0) -> None:
    with trio.fail_after(within):
        while not _all_serving(cluster):
            await trio.sleep(0.02)


async def run_in_process(
    *,
    nodes: int = 3,
    seed: int = 0,
    duration: float = 5.0,
    workload: WorkloadConfig | None = None,
    kinds: Sequence[str] = LOCAL_KINDS,
    request_timeout: float = 0.5,
    hold: tuple[float, float] = (0.2, 1.0),
    gap: tuple[float, float] = (0.05, 0.3),
    overlap: float = 0.3,
    cover: bool | Sequence[str] = True,
    settle: float = 0.3,
    progress: Callable[[str], None] | None = None,
    check_timeout: float | None = None,
) -> NemesisReport:
    """An in-process cluster under a workload and a ``LocalNemesis``."""
    wall = time.monotonic()
    config = workload or WorkloadConfig(timeout=1.0)
    report = NemesisReport(
        cluster="in-process",
        nodes=nodes,
        seed=seed,
        clients=config.clients,
        keys=config.keys,
        routing=config.routing,
        kinds=list(kinds),
        workload=config.workload,
    )
    async with open_cluster(nodes, request_timeout=request_timeout) as cluster:
        await _local_wait_serving(cluster)
        load = Workload(cluster.addresses, config, seed=seed)
        planner = Planner(
            random.Random(seed),
            kinds,
            nodes,
            pinned_nodes=load.pinned_nodes,
            hold=hold,
            gap=gap,
            overlap=overlap,
            cover=cover,
        )
        nemesis = LocalNemesis(cluster, planner, progress=progress)
        started, ended = await _run_under_nemesis(load, nemesis, duration, settle)
        with trio.fail_after(HEAL_BOUND):
            await nemesis.heal_all()
            for i in range(nodes):
                await cluster.restart(i)
            nemesis.restarts += nodes
        await _local_wait_serving(cluster)
        await load.final_reads()
        report.restarts = nemesis.restarts
    _fill(report, load, nemesis, started, ended)
    _check(report, load.history(), check_timeout)
    report.wall_seconds = time.monotonic() - wall
    return report


def environment() -> dict[str, Any]:
    """Facts about the machine for a report."""
    return {"cpus": os.cpu_count(), "load": os.getloadavg() if hasattr(os, "getloadavg") else None}
